//! The four peers, each made active in the lab, measured, and removed again,
//! so only one translates at a time: `direct` (pod IP, no translation),
//! `ours` (the agent), `iptables` and `nftables` (kube-proxy's rule shapes in
//! the node namespace). A turn runs every trial kind ([`Kind`]), the
//! iperf3 stream ([`super::stream`]) and, at the peer's largest N, the
//! control-plane changes ([`super::switch`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::rules::{self, BenchService};
use super::stream::{self, Throughput};
use super::switch::{Prober, Switch, SwitchSettings};
use crate::addr::{FamilyAddr, IpFamily};
use crate::loadgen::{self, Report};
use crate::netns::Netns;
use crate::{Agent, Lab, addr, backend_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    Direct,
    Ours,
    /// ClusterIP only: the agent with `--fast-path off`, so every packet
    /// takes the node's stack after the program (as `direct`'s do).
    OursStack,
    /// NodePort only: the agents with `--xdp-mode off`, so the TC node
    /// program does alone what `ours` does with XDP in front of it.
    OursTc,
    Iptables,
    Nftables,
}

impl Peer {
    /// The ClusterIP peers (no node interface, so no XDP either way).
    pub const ALL: [Peer; 5] = [
        Peer::Direct,
        Peer::Ours,
        Peer::OursStack,
        Peer::Iptables,
        Peer::Nftables,
    ];
    /// The NodePort peers.
    pub const NODEPORT: [Peer; 5] = [
        Peer::Direct,
        Peer::Ours,
        Peer::OursTc,
        Peer::Iptables,
        Peer::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Ours => "ours",
            Peer::OursStack => "ours-stack",
            Peer::OursTc => "ours-tc",
            Peer::Iptables => "iptables",
            Peer::Nftables => "nftables",
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a trial measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Connect, 6-byte request, reply line, close: a new flow each.
    TcpConnect,
    /// [`Kind::TcpConnect`] as a user has it: no conntrack flush before,
    /// and the client's own port range and TIME_WAIT limit (the ones the
    /// other trials widen, see [`ClientSysctls`]). Ports are then reused
    /// soon, across destinations too, which the other trials hide.
    TcpConnectAsIs,
    /// Request/response exchanges on one persistent TCP connection.
    TcpSession,
    /// Request/response datagrams on one connected UDP socket (one flow).
    UdpSession,
    /// One datagram and its reply per new UDP socket (a new flow each).
    UdpNewSocket,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::TcpConnect,
        Kind::TcpSession,
        Kind::UdpSession,
        Kind::UdpNewSocket,
        Kind::TcpConnectAsIs,
    ];

    /// What one counted unit is.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::TcpConnect => "TCP connect + request + reply + close (new connection each)",
            Kind::TcpConnectAsIs => {
                "the same, without conntrack flush, with the client's default port range"
            }
            Kind::TcpSession => "TCP request/response on one persistent connection",
            Kind::UdpSession => "UDP request/response on one connected socket",
            Kind::UdpNewSocket => "UDP request/response, new socket (new flow) each",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::TcpConnect => "tcp-connect",
            Kind::TcpConnectAsIs => "tcp-connect-as-is",
            Kind::TcpSession => "tcp-session",
            Kind::UdpSession => "udp-session",
            Kind::UdpNewSocket => "udp-new-socket",
        })
    }
}

/// Trial sizes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrialSettings {
    pub connections: usize,
    /// Requests (connections, exchanges) made before measuring each kind
    /// (not counted).
    pub warmup: usize,
    pub per_connection_timeout_ms: u64,
    pub deadline_s: u64,
    /// Exchanges per [`Kind::TcpSession`] trial.
    pub session_requests: usize,
    /// Exchanges per [`Kind::UdpSession`] and [`Kind::UdpNewSocket`] trial.
    pub udp_requests: usize,
    /// Reply timeout of one UDP exchange.
    pub udp_timeout_ms: u64,
    /// Duration of the iperf3 stream.
    pub stream_seconds: u64,
}

/// One peer's trial of one kind at one N in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub kind: Kind,
    pub peer: Peer,
    pub services: usize,
    pub round: usize,
    pub requested: u64,
    pub ok: u64,
    /// Every request answered; a trial that is not is excluded.
    pub complete: bool,
    pub errors: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub elapsed_ms: f64,
    pub p90_us: f64,
    pub max_us: f64,
    /// Latency of every connection, µs ([`Kind::TcpConnect`] only: the
    /// request/response kinds make too many to keep in the JSON).
    pub latencies_us: Vec<f64>,
    /// `rate / direct rate` in the same round (filled in afterwards).
    pub ratio_to_direct: Option<f64>,
}

/// What one programming step cost.
#[derive(Debug, Clone, Serialize)]
pub struct Programming {
    pub peer: Peer,
    pub services: usize,
    pub round: usize,
    /// `load` (all N services) or `endpoint change` (one endpoint removed).
    pub what: String,
    /// Wall time: process start (or manifest rewrite) until programmed, or
    /// the iptables-restore / nft -f run.
    pub wall_ms: f64,
    /// The agent's own `took_us` from its `datapath programmed` line.
    pub agent_took_us: Option<u64>,
    /// Agent peak RSS (VmHWM), kB.
    pub agent_peak_rss_kb: Option<u64>,
}

/// What one peer's turn produced.
pub struct Turn {
    pub trials: Vec<Trial>,
    pub throughput: Throughput,
    pub programming: Vec<Programming>,
    pub switches: Vec<Switch>,
    /// Ours: the pod program's run time per packet during the trials.
    pub live: Vec<super::live::LiveCost>,
}

/// The client sysctls the benchmark sets (see
/// `Settings::client_sysctls`), with the values the kernel gave the
/// namespace, put back for [`Kind::TcpConnectAsIs`].
#[derive(Debug, Clone)]
pub struct ClientSysctls {
    pub set: Vec<(String, String)>,
    pub defaults: Vec<(String, String)>,
}

impl ClientSysctls {
    /// Reads `set`'s keys in `ns`, then sets them.
    pub fn apply(ns: &Netns, set: &[(String, String)]) -> Result<ClientSysctls> {
        let defaults = set
            .iter()
            .map(|(key, _)| {
                let value = ns.exec("sysctl", &["-n", key])?;
                // Multi-valued sysctls come back tab-separated.
                Ok((
                    key.clone(),
                    value.split_whitespace().collect::<Vec<_>>().join(" "),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let sysctls = ClientSysctls {
            set: set.to_vec(),
            defaults,
        };
        sysctls.put(ns, &sysctls.set)?;
        Ok(sysctls)
    }

    fn put(&self, ns: &Netns, values: &[(String, String)]) -> Result<()> {
        for (key, value) in values {
            ns.sysctl(key, value)?;
        }
        Ok(())
    }
}

/// What a turn does besides the trials.
#[derive(Debug, Clone, Copy)]
pub struct TurnPlan<'a> {
    pub trial: TrialSettings,
    pub sysctls: &'a ClientSysctls,
    /// Measure the one-endpoint removal and the switches (the peer's
    /// largest N, round 0).
    pub changes: bool,
    pub switch: SwitchSettings,
    /// The backend index that is no service's endpoint, switched to.
    pub spare: usize,
}

/// The measured target for `service_port`: the last service's ClusterIP,
/// or backend 0's pod IP and `pod_port` for `direct`.
fn target_for(
    peer: Peer,
    services: &[BenchService],
    service_port: u16,
    pod_port: u16,
) -> SocketAddrV4 {
    match peer {
        Peer::Direct => SocketAddrV4::new(addr::backend_ip(0), pod_port),
        _ => SocketAddrV4::new(
            services.last().expect("at least one service").vip,
            service_port,
        ),
    }
}

fn target(peer: Peer, services: &[BenchService]) -> SocketAddrV4 {
    target_for(peer, services, rules::SERVICE_PORT, rules::TARGET_PORT)
}

/// `conntrack -F` in `node`, if the tool exists.
pub fn flush_conntrack(node: &Netns) {
    if Path::new("/usr/sbin/conntrack").exists() || Path::new("/sbin/conntrack").exists() {
        // Fails harmlessly when no conntrack table exists in the namespace.
        let _ = node.exec("conntrack", &["-F"]);
    }
}

fn trial_from(kind: Kind, peer: Peer, n: usize, round: usize, report: &Report) -> Trial {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Trial {
        kind,
        peer,
        services: n,
        round,
        requested: report.requested,
        ok: report.ok,
        complete: report.ok == report.requested && report.error_count() == 0,
        errors: report
            .errors
            .iter()
            .map(|(k, v)| (k.name().to_string(), *v))
            .collect(),
        error_samples: report.error_samples.clone(),
        rate: report.rate(),
        p50_us: us(report.p50()),
        p99_us: us(report.p99()),
        p90_us: us(report.p90()),
        max_us: us(report.max()),
        elapsed_ms: report.elapsed.as_secs_f64() * 1e3,
        latencies_us: if kind == Kind::TcpConnect {
            report.latencies.iter().map(|d| us(*d)).collect()
        } else {
            Vec::new()
        },
        ratio_to_direct: None,
    }
}

/// Where a trial runs and what it reaches.
pub(super) struct TrialPath<'a> {
    pub client: &'a Netns,
    /// Namespaces whose netfilter conntrack is flushed before the trial.
    pub conntrack: &'a [&'a Netns],
    /// The client's sysctls, put back to the kernel's values for
    /// [`Kind::TcpConnectAsIs`].
    pub sysctls: &'a ClientSysctls,
    pub tcp: SocketAddrV4,
    pub udp: SocketAddrV4,
}

/// One trial of `kind` from `path.client` (warm-up first, conntrack
/// flushed before but for [`Kind::TcpConnectAsIs`], which runs with the
/// client's default sysctls); `n` is the number of services loaded.
pub(super) fn measure(
    path: &TrialPath<'_>,
    kind: Kind,
    peer: Peer,
    n: usize,
    round: usize,
    s: TrialSettings,
) -> Result<Trial> {
    let as_is = kind == Kind::TcpConnectAsIs;
    if as_is {
        path.sysctls.put(path.client, &path.sysctls.defaults)?;
    } else {
        for ns in path.conntrack {
            flush_conntrack(ns);
        }
    }
    let per = Duration::from_millis(s.per_connection_timeout_ms);
    let udp_per = Duration::from_millis(s.udp_timeout_ms);
    let deadline = Duration::from_secs(s.deadline_s);
    let (tcp, udp) = (path.tcp, path.udp);
    let report = path.client.run(move || {
        let (count, run): (usize, &dyn Fn(usize) -> Report) = match kind {
            Kind::TcpConnect | Kind::TcpConnectAsIs => (s.connections, &|c| {
                loadgen::tcp_requests(tcp, c, per, deadline)
            }),
            Kind::TcpSession => (s.session_requests, &|c| {
                loadgen::tcp_session_requests(tcp, c, per, deadline)
            }),
            Kind::UdpSession => (s.udp_requests, &|c| {
                loadgen::udp_session_requests(udp, c, udp_per, deadline)
            }),
            Kind::UdpNewSocket => (s.udp_requests, &|c| {
                loadgen::udp_requests(udp, c, udp_per, deadline)
            }),
        };
        let _ = run(s.warmup);
        run(count)
    });
    if as_is {
        path.sysctls.put(path.client, &path.sysctls.set)?;
    }
    Ok(trial_from(kind, peer, n, round, &report))
}

/// One trial of `kind` against `peer`'s target in the one-node lab.
fn run_trial(
    lab: &Lab,
    kind: Kind,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &TurnPlan<'_>,
) -> Result<Trial> {
    let path = TrialPath {
        client: lab.client(),
        conntrack: &[lab.node()],
        sysctls: plan.sysctls,
        tcp: target(peer, services),
        udp: target_for(
            peer,
            services,
            rules::UDP_SERVICE_PORT,
            rules::UDP_TARGET_PORT,
        ),
    };
    measure(&path, kind, peer, services.len(), round, plan.trial)
}

/// Every trial kind, then the iperf3 stream.
fn run_all(
    lab: &Lab,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &TurnPlan<'_>,
) -> Result<(Vec<Trial>, Throughput)> {
    let trials = Kind::ALL
        .iter()
        .map(|&k| run_trial(lab, k, peer, services, round, plan))
        .collect::<Result<_>>()?;
    let s = plan.trial;
    flush_conntrack(lab.node());
    let stream_target = target_for(peer, services, rules::IPERF_PORT, rules::IPERF_PORT);
    let throughput = stream::measure(
        lab.client(),
        peer,
        services.len(),
        round,
        stream_target,
        s.stream_seconds,
    );
    Ok((trials, throughput))
}

/// `services` with the target's endpoints (http and dns) replaced.
fn with_endpoints(services: &[BenchService], endpoints: &[Ipv4Addr]) -> Vec<BenchService> {
    let mut changed = services.to_vec();
    if let Some(last) = changed.last_mut() {
        last.endpoints = endpoints.to_vec();
    }
    changed
}

/// The endpoint sets of switch `rep`: the spare backend alone, then back
/// to the original endpoints, alternating, so every switch is to backends
/// the service did not have. Returns (services, backend names).
fn switch_target(
    services: &[BenchService],
    plan: &TurnPlan<'_>,
    rep: usize,
) -> (Vec<BenchService>, Vec<String>) {
    let original = &services.last().expect("at least one service").endpoints;
    let indices: Vec<usize> = if rep.is_multiple_of(2) {
        vec![plan.spare]
    } else {
        original
            .iter()
            .map(|ip| usize::from(ip.octets()[2]) - 10)
            .collect()
    };
    let ips: Vec<Ipv4Addr> = indices.iter().map(|&i| addr::backend_ip(i)).collect();
    (
        with_endpoints(services, &ips),
        indices.into_iter().map(backend_name).collect(),
    )
}

/// Makes `peer` active with `services`, runs the trials, optionally
/// measures the changes, and removes the peer again.
pub fn turn(
    lab: &Lab,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &TurnPlan<'_>,
) -> Result<Turn> {
    match peer {
        Peer::Direct => {
            let (trials, throughput) = run_all(lab, peer, services, round, plan)?;
            Ok(Turn {
                trials,
                throughput,
                programming: Vec::new(),
                switches: Vec::new(),
                live: Vec::new(),
            })
        }
        Peer::Ours | Peer::OursStack => ours(lab, peer, services, round, plan),
        Peer::OursTc => bail!("{peer} is a NodePort peer"),
        Peer::Iptables | Peer::Nftables => {
            let result = rules_turn(lab, peer, services, round, plan);
            let cleanup = remove_rules(lab.node(), peer);
            let turn = result?;
            cleanup?;
            Ok(turn)
        }
    }
}

/// `services` with the target's first endpoint removed.
fn one_endpoint_less(services: &[BenchService]) -> Vec<BenchService> {
    let mut changed = services.to_vec();
    if let Some(last) = changed.last_mut() {
        last.endpoints.remove(0);
    }
    changed
}

const MANIFEST: &str = "bench-services.yaml";
const PROGRAMMED: &str = "datapath programmed";

/// Waits (polling every 2 ms, at most `timeout`) for the `count`-th
/// `datapath programmed` line; returns its `took_us`.
pub(super) fn wait_programmed(
    agent: &Agent<'_>,
    count: usize,
    timeout: Duration,
) -> Result<Option<u64>> {
    let deadline = Instant::now() + timeout;
    while agent.log_count(PROGRAMMED) < count {
        if !agent.is_running() {
            bail!("agent exited; last output:\n{}", agent.log_tail(30));
        }
        if Instant::now() >= deadline {
            bail!(
                "agent not programmed within {timeout:?}; last output:\n{}",
                agent.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let logs = agent.logs();
    let line = logs
        .lines()
        .filter(|l| l.contains(PROGRAMMED))
        .nth(count - 1);
    Ok(line.and_then(|l| {
        l.split("took_us=")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
    }))
}

/// VmHWM of `pid` in kB.
pub(super) fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn ours(
    lab: &Lab,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &TurnPlan<'_>,
) -> Result<Turn> {
    let n = services.len();
    let timeout = Duration::from_secs(300);
    lab.write_manifest(MANIFEST, &rules::manifest(services))?;
    let t0 = Instant::now();
    let fast_path = if peer == Peer::OursStack { "off" } else { "on" };
    let agent = lab.start_agent_args(&[
        "--manifests".into(),
        lab.manifest_dir().into(),
        "--fast-path".into(),
        fast_path.into(),
    ])?;
    let took = wait_programmed(&agent, 1, timeout)?;
    let wall = t0.elapsed();
    let mut programming = vec![Programming {
        peer,
        services: n,
        round,
        what: "load".into(),
        wall_ms: wall.as_secs_f64() * 1e3,
        agent_took_us: took,
        agent_peak_rss_kb: peak_rss_kb(agent.pid()),
    }];
    let link = lab
        .bpffs_dir()
        .join("links")
        .join(format!("tc-ingress-{}", lab.client_pod().node_if));
    let sampler = super::live::Sampler::start(&link, "kep_tc_ingress");
    let (trials, throughput) = run_all(lab, peer, services, round, plan)?;
    let live = match sampler.and_then(|s| s.finish(peer, n, round)) {
        Ok(cost) => vec![cost],
        Err(e) => {
            eprintln!("bench: bpf_stats of {peer} at N={n}: {e:#}");
            Vec::new()
        }
    };
    let mut switches = Vec::new();
    // Endpoint changes are the control plane's: measured with `ours` only.
    if plan.changes && peer == Peer::Ours {
        let text = rules::manifest(&one_endpoint_less(services));
        let before = agent.log_count(PROGRAMMED);
        let t0 = Instant::now();
        lab.write_manifest(MANIFEST, &text)?;
        let took = wait_programmed(&agent, before + 1, timeout)?;
        programming.push(Programming {
            peer,
            services: n,
            round,
            what: "endpoint change".into(),
            wall_ms: t0.elapsed().as_secs_f64() * 1e3,
            agent_took_us: took,
            agent_peak_rss_kb: peak_rss_kb(agent.pid()),
        });
        for rep in 0..plan.switch.repetitions {
            let (changed, to) = switch_target(services, plan, rep);
            let text = rules::manifest(&changed);
            let prober = Prober::start(lab, target(peer, services), &to, plan.switch)?;
            let before = agent.log_count(PROGRAMMED);
            let t0 = Instant::now();
            lab.write_manifest(MANIFEST, &text)?;
            let waited = wait_programmed(&agent, before + 1, timeout);
            let programmed = t0.elapsed();
            let switch = prober.finish(peer, n, rep, to, t0, programmed);
            waited?;
            switches.push(switch);
        }
    }
    drop(agent);
    detach_tc(lab);
    lab.remove_manifest(MANIFEST)?;
    Ok(Turn {
        trials,
        throughput,
        programming,
        switches,
        live,
    })
}

/// Removes any TC program left on the node's veths (a netlink-attached
/// filter outlives the agent; a TCX link does not).
fn detach_tc(lab: &Lab) {
    let mut ifaces = vec![lab.client_pod().node_if.clone()];
    ifaces.extend(lab.backends().iter().map(|b| b.node_if.clone()));
    for i in ifaces {
        let _ = lab
            .node()
            .exec("tc", &["qdisc", "del", "dev", &i, "clsact"]);
    }
}

/// A rules file written and ready to load.
pub(super) struct StagedRules {
    program: &'static str,
    args: Vec<String>,
}

impl StagedRules {
    /// Writes `peer`'s rules for `services` (rendered by `rules`' iptables
    /// or nft generator, for the services' family) into `dir`.
    pub(super) fn write<A: FamilyAddr>(
        dir: &Path,
        peer: Peer,
        services: &[BenchService<A>],
    ) -> Result<StagedRules> {
        let (text, file, program) = match peer {
            Peer::Iptables => (
                rules::iptables_restore(services),
                "iptables.rules",
                rules::restore_program(A::FAMILY),
            ),
            Peer::Nftables => (rules::nft_script(services), "nftables.nft", "nft"),
            _ => bail!("{peer} has no rules"),
        };
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        let path = path.to_string_lossy().into_owned();
        let args = match peer {
            Peer::Iptables => vec![path],
            _ => vec!["-f".into(), path],
        };
        Ok(StagedRules { program, args })
    }

    /// Runs the one `iptables-restore` / `nft -f` in `node`; returns its
    /// wall time.
    pub(super) fn apply(&self, node: &Netns) -> Result<Duration> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        node.exec(self.program, &args)?;
        Ok(t0.elapsed())
    }
}

/// Loads the rules for `services` into the lab's node namespace; returns
/// the wall time of the one `iptables-restore` / `nft -f`.
fn load_rules(lab: &Lab, peer: Peer, services: &[BenchService]) -> Result<Duration> {
    StagedRules::write(lab.dir(), peer, services)?.apply(lab.node())
}

fn rules_turn(
    lab: &Lab,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &TurnPlan<'_>,
) -> Result<Turn> {
    let n = services.len();
    let wall = load_rules(lab, peer, services)?;
    let mut programming = vec![Programming {
        peer,
        services: n,
        round,
        what: "load".into(),
        wall_ms: wall.as_secs_f64() * 1e3,
        agent_took_us: None,
        agent_peak_rss_kb: None,
    }];
    let (trials, throughput) = run_all(lab, peer, services, round, plan)?;
    let mut switches = Vec::new();
    if plan.changes {
        // kube-proxy's resync re-applies the whole ruleset.
        let wall = load_rules(lab, peer, &one_endpoint_less(services))?;
        programming.push(Programming {
            peer,
            services: n,
            round,
            what: "endpoint change".into(),
            wall_ms: wall.as_secs_f64() * 1e3,
            agent_took_us: None,
            agent_peak_rss_kb: None,
        });
        for rep in 0..plan.switch.repetitions {
            let (changed, to) = switch_target(services, plan, rep);
            let staged = StagedRules::write(lab.dir(), peer, &changed)?;
            let prober = Prober::start(lab, target(peer, services), &to, plan.switch)?;
            let t0 = Instant::now();
            let loaded = staged.apply(lab.node());
            let programmed = t0.elapsed();
            let switch = prober.finish(peer, n, rep, to, t0, programmed);
            loaded?;
            switches.push(switch);
        }
    }
    Ok(Turn {
        trials,
        throughput,
        programming,
        switches,
        live: Vec::new(),
    })
}

/// Flushes and deletes the peer's chains in `node`, then the table itself,
/// so no NAT hook (and so no netfilter conntrack) is left for the next
/// peer.
pub(super) fn remove_rules(node: &Netns, peer: Peer) -> Result<()> {
    remove_family_rules(node, peer, IpFamily::V4)
}

/// [`remove_rules`] for the rules of `family` (`ip6tables`, the `ip6`
/// tables).
pub(super) fn remove_family_rules(node: &Netns, peer: Peer, family: IpFamily) -> Result<()> {
    let nft_family = rules::nft_family(family);
    match peer {
        Peer::Iptables => {
            let iptables = rules::iptables_program(family);
            node.exec(iptables, &["-t", "nat", "-F"])?;
            node.exec(iptables, &["-t", "nat", "-X"])?;
            // iptables-nft keeps the base chains (and their hooks) otherwise.
            let _ = node.exec("nft", &["delete", "table", nft_family, "nat"]);
        }
        Peer::Nftables => {
            node.exec("nft", &["delete", "table", nft_family, rules::NFT_TABLE])?;
        }
        _ => {}
    }
    Ok(())
}
