//! The four peers, each made active in the lab, measured, and removed again,
//! so only one translates at a time: `direct` (pod IP, no translation),
//! `ours` (the agent), `iptables` and `nftables` (kube-proxy's rule shapes in
//! the node namespace).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::rules::{self, BenchService};
use crate::loadgen;
use crate::{Agent, Lab, addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    Direct,
    Ours,
    Iptables,
    Nftables,
}

impl Peer {
    pub const ALL: [Peer; 4] = [Peer::Direct, Peer::Ours, Peer::Iptables, Peer::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Ours => "ours",
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

/// Connection-rate settings of one trial.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrialSettings {
    pub connections: usize,
    /// Connections made before measuring (not counted).
    pub warmup: usize,
    pub per_connection_timeout_ms: u64,
    pub deadline_s: u64,
}

/// One peer's connection trial at one N in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
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
    /// Latency of every connection, µs.
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
    pub trial: Trial,
    pub programming: Vec<Programming>,
}

/// The measured target: the last service's ClusterIP, or backend 0's pod IP
/// for `direct`.
fn target(peer: Peer, services: &[BenchService]) -> SocketAddrV4 {
    match peer {
        Peer::Direct => SocketAddrV4::new(addr::backend_ip(0), rules::TARGET_PORT),
        _ => SocketAddrV4::new(
            services.last().expect("at least one service").vip,
            rules::SERVICE_PORT,
        ),
    }
}

/// `conntrack -F` in the node namespace, if the tool exists.
pub fn flush_conntrack(lab: &Lab) {
    if Path::new("/usr/sbin/conntrack").exists() || Path::new("/sbin/conntrack").exists() {
        // Fails harmlessly when no conntrack table exists in the namespace.
        let _ = lab.node().exec("conntrack", &["-F"]);
    }
}

fn run_trial(
    lab: &Lab,
    peer: Peer,
    n: usize,
    round: usize,
    target: SocketAddrV4,
    s: TrialSettings,
) -> Trial {
    flush_conntrack(lab);
    let per = Duration::from_millis(s.per_connection_timeout_ms);
    let deadline = Duration::from_secs(s.deadline_s);
    let report = lab.client().run(move || {
        let _ = loadgen::tcp_requests(target, s.warmup, per, deadline);
        loadgen::tcp_requests(target, s.connections, per, deadline)
    });
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Trial {
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
        elapsed_ms: report.elapsed.as_secs_f64() * 1e3,
        latencies_us: report.latencies.iter().map(|d| us(*d)).collect(),
        ratio_to_direct: None,
    }
}

/// Makes `peer` active with `services`, runs the trial, optionally measures
/// one endpoint change, and removes the peer again.
pub fn turn(
    lab: &Lab,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    settings: TrialSettings,
    endpoint_change: bool,
) -> Result<Turn> {
    let n = services.len();
    let target = target(peer, services);
    match peer {
        Peer::Direct => Ok(Turn {
            trial: run_trial(lab, peer, n, round, target, settings),
            programming: Vec::new(),
        }),
        Peer::Ours => ours(lab, services, round, settings, endpoint_change),
        Peer::Iptables | Peer::Nftables => {
            let result = rules_turn(lab, peer, services, round, settings, endpoint_change);
            let cleanup = remove_rules(lab, peer);
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
fn wait_programmed(agent: &Agent<'_>, count: usize, timeout: Duration) -> Result<Option<u64>> {
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
fn peak_rss_kb(pid: u32) -> Option<u64> {
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
    services: &[BenchService],
    round: usize,
    settings: TrialSettings,
    endpoint_change: bool,
) -> Result<Turn> {
    let n = services.len();
    let timeout = Duration::from_secs(120);
    lab.write_manifest(MANIFEST, &rules::manifest(services))?;
    let t0 = Instant::now();
    let agent = lab.start_agent(&lab.manifest_dir())?;
    let took = wait_programmed(&agent, 1, timeout)?;
    let wall = t0.elapsed();
    let mut programming = vec![Programming {
        peer: Peer::Ours,
        services: n,
        round,
        what: "load".into(),
        wall_ms: wall.as_secs_f64() * 1e3,
        agent_took_us: took,
        agent_peak_rss_kb: peak_rss_kb(agent.pid()),
    }];
    let trial = run_trial(
        lab,
        Peer::Ours,
        n,
        round,
        target(Peer::Ours, services),
        settings,
    );
    if endpoint_change {
        let text = rules::manifest(&one_endpoint_less(services));
        let before = agent.log_count(PROGRAMMED);
        let t0 = Instant::now();
        lab.write_manifest(MANIFEST, &text)?;
        let took = wait_programmed(&agent, before + 1, timeout)?;
        programming.push(Programming {
            peer: Peer::Ours,
            services: n,
            round,
            what: "endpoint change".into(),
            wall_ms: t0.elapsed().as_secs_f64() * 1e3,
            agent_took_us: took,
            agent_peak_rss_kb: peak_rss_kb(agent.pid()),
        });
    }
    drop(agent);
    detach_tc(lab);
    lab.remove_manifest(MANIFEST)?;
    Ok(Turn { trial, programming })
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

/// Loads the rules for `services` into the node namespace; returns the
/// wall time of the one `iptables-restore` / `nft -f`.
fn load_rules(lab: &Lab, peer: Peer, services: &[BenchService]) -> Result<Duration> {
    let (text, file, program) = match peer {
        Peer::Iptables => (
            rules::iptables_restore(services),
            "iptables.rules",
            "iptables-restore",
        ),
        Peer::Nftables => (rules::nft_script(services), "nftables.nft", "nft"),
        _ => bail!("{peer} has no rules"),
    };
    let path = lab.dir().join(file);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    let args: Vec<&str> = match peer {
        Peer::Iptables => vec![&path],
        _ => vec!["-f", &path],
    };
    let t0 = Instant::now();
    lab.node().exec(program, &args)?;
    Ok(t0.elapsed())
}

fn rules_turn(
    lab: &Lab,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    settings: TrialSettings,
    endpoint_change: bool,
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
    let trial = run_trial(lab, peer, n, round, target(peer, services), settings);
    if endpoint_change {
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
    }
    Ok(Turn { trial, programming })
}

/// Flushes and deletes the peer's chains, then the table itself, so no NAT
/// hook (and so no netfilter conntrack) is left for the next peer.
fn remove_rules(lab: &Lab, peer: Peer) -> Result<()> {
    let node = lab.node();
    match peer {
        Peer::Iptables => {
            node.exec("iptables", &["-t", "nat", "-F"])?;
            node.exec("iptables", &["-t", "nat", "-X"])?;
            // iptables-nft keeps the base chains (and their hooks) otherwise.
            let _ = node.exec("nft", &["delete", "table", "ip", "nat"]);
        }
        Peer::Nftables => {
            node.exec("nft", &["delete", "table", "ip", rules::NFT_TABLE])?;
        }
        _ => {}
    }
    Ok(())
}
