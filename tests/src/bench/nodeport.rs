//! NodePort in the two-node [`Cluster`]: the external client connects to
//! node 1's IP and node port while the Service's endpoints are all on node
//! 0, so every connection is forwarded across the fabric and masqueraded to
//! node 1's address (externalTrafficPolicy Cluster). The same peers as the
//! ClusterIP measurement, made active on node 1 one at a time:
//!
//! - `direct`: the backend pod's IP, with a route in the client for node
//!   0's pod range via node 1 (this peer only), no NAT. Replies go from node
//!   0 straight to the client, one hop shorter than a masqueraded reply.
//! - `ours`: both agents with `--node-interfaces eth0` and
//!   [`Settings::nodeport_agent_args`].
//! - `iptables` / `nftables`: kube-proxy's rule shapes (with node ports,
//!   see [`rules`]) in node 1's namespace; node 0 needs none, since it sees
//!   plain pod traffic.
//!
//! Two trial kinds, [`Kind::TcpConnect`] and [`Kind::TcpConnectAsIs`],
//! through the same trial code as the ClusterIP peers ([`peers::measure`]).

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Settings;
use super::peers::{self, ClientSysctls, Kind, Peer, Programming, StagedRules, Trial, TrialPath};
use super::rules::{self, BenchService};
use crate::cluster::{self, Cluster, ClusterConfig, addr};

/// The node whose NodePort the client connects to.
pub const ENTRY: usize = 1;
/// The node holding every endpoint.
pub const HOME: usize = 0;

const MANIFEST: &str = "bench-nodeport.yaml";

/// What one peer's NodePort turn produced.
pub struct Turn {
    /// One per trial kind.
    pub trials: Vec<Trial>,
    pub programming: Option<Programming>,
}

/// The cluster for the measurement: `backends` pods on node 0, none on
/// node 1, no client pods; the client's sysctls set.
pub fn cluster(settings: &Settings) -> Result<(Cluster, ClientSysctls)> {
    let cluster = Cluster::with_config(ClusterConfig {
        backends_per_node: [settings.backends, 0],
        client_pod: false,
        tcp_port: rules::TARGET_PORT,
        udp_port: rules::UDP_TARGET_PORT,
    })?;
    let sysctls = ClientSysctls::apply(cluster.ext(), &settings.client_sysctls)?;
    Ok((cluster, sysctls))
}

/// What a NodePort turn runs its trials with.
pub struct Plan<'a> {
    pub settings: &'a Settings,
    pub sysctls: &'a ClientSysctls,
}

/// `n` services whose endpoints are node 0's backend pods (see
/// [`rules::node_port_services`]).
pub fn services(cluster: &Cluster, n: usize) -> Vec<BenchService> {
    let endpoints: Vec<Ipv4Addr> = cluster.node(HOME).backends.iter().map(|p| p.ip).collect();
    rules::node_port_services(n, &endpoints)
}

/// The target's node port (the last service's).
fn node_port(services: &[BenchService]) -> Result<u16> {
    match services.last().and_then(|s| s.node_port) {
        Some(np) => Ok(np),
        None => bail!("the target service has no node port"),
    }
}

/// The client-side view: what the client connects to.
fn target(cluster: &Cluster, peer: Peer, services: &[BenchService]) -> Result<SocketAddrV4> {
    Ok(match peer {
        Peer::Direct => cluster.backend_tcp(HOME, 0),
        _ => SocketAddrV4::new(cluster.node_ip(ENTRY), node_port(services)?),
    })
}

/// The TCP connect-request-close trials from the external client: as the
/// ClusterIP ones, then as a user has it.
fn trials(
    cluster: &Cluster,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &Plan<'_>,
) -> Result<Vec<Trial>> {
    let tcp = target(cluster, peer, services)?;
    let path = TrialPath {
        client: cluster.ext(),
        conntrack: &[cluster.node_ns(HOME), cluster.node_ns(ENTRY)],
        sysctls: plan.sysctls,
        tcp,
        // Only TCP trials run here.
        udp: tcp,
    };
    [Kind::TcpConnect, Kind::TcpConnectAsIs]
        .into_iter()
        .map(|kind| {
            peers::measure(
                &path,
                kind,
                peer,
                services.len(),
                round,
                plan.settings.trial,
            )
        })
        .collect()
}

/// Makes `peer` serve the NodePort (or, for `direct`, routes the pod range
/// through node 1), runs the trial, and undoes it again, also on failure.
pub fn turn(
    cluster: &Cluster,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &Plan<'_>,
) -> Result<Turn> {
    match peer {
        Peer::Direct => {
            let (net, len) = addr::pod_cidr(HOME);
            let prefix = format!("{net}/{len}");
            cluster.route_external(&prefix, ENTRY)?;
            let result = trials(cluster, peer, services, round, plan);
            let trials = undone(result, cluster.unroute_external(&prefix))?;
            Ok(Turn {
                trials,
                programming: None,
            })
        }
        Peer::Ours | Peer::OursTc => {
            let result = ours(cluster, peer, services, round, plan);
            detach_leftovers(cluster);
            undone(result, remove_manifest(cluster))
        }
        Peer::OursStack => anyhow::bail!("{peer} is a ClusterIP peer"),
        Peer::Iptables | Peer::Nftables => {
            let node = cluster.node_ns(ENTRY);
            let result = rules_turn(cluster, peer, services, round, plan);
            undone(result, peers::remove_rules(node, peer))
        }
    }
}

/// A turn's result once its cleanup ran: the turn's error first, else the
/// cleanup's.
fn undone<T>(result: Result<T>, cleanup: Result<()>) -> Result<T> {
    let value = result?;
    cleanup?;
    Ok(value)
}

/// Loads `peer`'s rules into node 1 with one `iptables-restore` / `nft
/// -f`, then the trial.
fn rules_turn(
    cluster: &Cluster,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &Plan<'_>,
) -> Result<Turn> {
    let wall = StagedRules::write(cluster.dir(), peer, services)?.apply(cluster.node_ns(ENTRY))?;
    let trials = trials(cluster, peer, services, round, plan)?;
    Ok(Turn {
        trials,
        programming: Some(Programming {
            peer,
            services: services.len(),
            round,
            what: "load".into(),
            wall_ms: wall.as_secs_f64() * 1e3,
            agent_took_us: None,
            agent_peak_rss_kb: None,
        }),
    })
}

fn ours(
    cluster: &Cluster,
    peer: Peer,
    services: &[BenchService],
    round: usize,
    plan: &Plan<'_>,
) -> Result<Turn> {
    let settings = plan.settings;
    let pod_name = |ip: Ipv4Addr| {
        let j = cluster
            .node(HOME)
            .backends
            .iter()
            .position(|p| p.ip == ip)
            .unwrap_or(usize::MAX);
        cluster::backend_name(HOME, j)
    };
    let text = rules::manifest_on(services, &cluster::node_name(HOME), &pod_name);
    cluster.write_manifest(MANIFEST, &text)?;
    let mut args: Vec<OsString> = vec!["--node-interfaces".into(), "eth0".into()];
    let mut extra = settings.nodeport_agent_args.iter();
    while let Some(arg) = extra.next() {
        // `ours-tc` sets the mode itself (the flag may be given once).
        if peer == Peer::OursTc && arg == "--xdp-mode" {
            extra.next();
            continue;
        }
        args.push(arg.into());
    }
    if peer == Peer::OursTc {
        args.extend(["--xdp-mode".into(), "off".into()]);
    }
    // Loading 30,000 services took ~8 s for one agent; two share the CPUs.
    let timeout = Duration::from_secs(300);
    let t0 = Instant::now();
    let home = cluster.start_agent(HOME, &args)?;
    let entry = cluster.start_agent(ENTRY, &args)?;
    peers::wait_programmed(&home, 1, timeout).context("node 0's agent")?;
    let took = peers::wait_programmed(&entry, 1, timeout).context("node 1's agent")?;
    let programming = Programming {
        peer,
        services: services.len(),
        round,
        what: "load".into(),
        wall_ms: t0.elapsed().as_secs_f64() * 1e3,
        agent_took_us: took,
        agent_peak_rss_kb: peers::peak_rss_kb(entry.pid()),
    };
    let trials = trials(cluster, peer, services, round, plan)?;
    if !entry.is_running() || !home.is_running() {
        bail!(
            "an agent exited during the trial; node 0:\n{}\nnode 1:\n{}",
            home.log_tail(20),
            entry.log_tail(20)
        );
    }
    Ok(Turn {
        trials,
        programming: Some(programming),
    })
}

/// Removes whatever an agent attached by netlink (which outlives it, where
/// a link does not): TC on every node interface, XDP on `eth0`. Each is
/// usually absent, so failures are expected and ignored.
fn detach_leftovers(cluster: &Cluster) {
    for k in 0..addr::NODES {
        let node = cluster.node(k);
        let mut ifaces = vec!["eth0".to_string()];
        ifaces.extend(node.backends.iter().map(|p| p.node_if.clone()));
        for i in &ifaces {
            let _ = node.netns.exec("tc", &["qdisc", "del", "dev", i, "clsact"]);
        }
        for mode in ["xdpgeneric", "xdpdrv"] {
            let _ = node.netns.ip(&["link", "set", "dev", "eth0", mode, "off"]);
        }
    }
}

fn remove_manifest(cluster: &Cluster) -> Result<()> {
    if cluster.manifest_dir(HOME).join(MANIFEST).exists() {
        cluster.remove_manifest(MANIFEST)?;
    }
    Ok(())
}
