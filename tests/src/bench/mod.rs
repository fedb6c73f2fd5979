//! `cargo xtask bench`: direct, ours, kube-proxy iptables shape and
//! kube-proxy nftables shape in one lab, over the same N services, measured
//! in rounds with the peers in random order (TCP connection rate, TCP and
//! UDP request/response, one TCP stream's throughput, programming time,
//! endpoint changes); then the same peers serving a NodePort in the
//! two-node cluster lab (TCP connection rate, external client through node
//! 1 to endpoints on node 0); plus the TC program's per-packet cost with
//! BPF_PROG_TEST_RUN. Writes `latest.md`, `latest.json` and `latest.svg`.
//!
//! - [`rules`]: the services and the manifest / iptables / nft text, and
//!   the same objects as an API server stores them.
//! - [`control`]: the control plane at scale, both sources.
//! - [`peers`]: making one peer active, its trials, removal.
//! - [`nodeport`]: the NodePort turns in the cluster lab.
//! - [`stream`]: the iperf3 stream.
//! - [`switch`]: probing an endpoint switch from the client.
//! - [`testrun`]: per-packet cost.
//! - [`live`]: per-packet cost under the trials' traffic (bpf_stats).
//! - [`report`]: summaries, the Markdown table, the JSON.
//! - [`chart`]: the SVG.

pub mod chart;
pub mod control;
pub mod live;
pub mod nodeport;
pub mod peers;
pub mod report;
pub mod rules;
pub mod stream;
pub mod switch;
pub mod testrun;

use std::time::Instant;

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::{Lab, LabConfig};
use control::ControlSettings;
use peers::{Peer, TrialSettings, TurnPlan};
use switch::SwitchSettings;

/// What a run measures.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub mode: String,
    pub service_counts: Vec<usize>,
    pub rounds: usize,
    pub backends: usize,
    pub trial: TrialSettings,
    pub switch: SwitchSettings,
    /// nftables is not run above this N (its `nft -f` time grows faster
    /// than linearly; see `skipped` in the results).
    pub nft_max_services: Option<usize>,
    pub testrun_repeat: u32,
    pub testrun_batches: usize,
    /// Seed of the peer order shuffles.
    pub seed: u64,
    /// Set in the client namespace: sequential connections to one
    /// destination would otherwise leave thousands of TIME_WAIT sockets, and
    /// connect() then spends more and more time searching for a free port.
    /// Every peer also runs one connection trial with the kernel's values
    /// back and no conntrack flush ([`peers::Kind::TcpConnectAsIs`]), as a
    /// user has them: that is where reused ports show.
    pub client_sysctls: Vec<(String, String)>,
    /// Extra arguments for both agents of the NodePort measurement (after
    /// `--node-interfaces eth0`), e.g. an XDP mode.
    pub nodeport_agent_args: Vec<String>,
    /// Rounds of the NodePort measurement (at every N of
    /// `service_counts`).
    pub nodeport_rounds: usize,
    /// The control plane at scale (its own N, both sources).
    pub control: ControlSettings,
    /// Only the control-plane part (`--control-plane-only`).
    pub control_only: bool,
    /// Only the per-packet rows (`--packet-costs-only`): no lab.
    pub packet_costs_only: bool,
}

impl Settings {
    pub fn quick() -> Settings {
        Settings {
            mode: "quick".into(),
            service_counts: vec![1, 1_000],
            rounds: 2,
            backends: 3,
            trial: TrialSettings {
                connections: 500,
                warmup: 20,
                per_connection_timeout_ms: 2_000,
                deadline_s: 60,
                session_requests: 500,
                udp_requests: 500,
                udp_timeout_ms: 1_000,
                stream_seconds: 1,
            },
            switch: SwitchSettings {
                repetitions: 2,
                probe_interval_us: 1_000,
                probe_timeout_ms: 1_000,
                max_s: 60,
                confirm: 20,
            },
            nft_max_services: None,
            testrun_repeat: 100_000,
            testrun_batches: 10,
            seed: rand::rng().random(),
            // The lab's fabric takes native XDP_TX frames, as a NIC's wire
            // does: what `auto` would pick on a node with a NIC.
            nodeport_agent_args: vec!["--xdp-mode".into(), "native".into()],
            nodeport_rounds: 2,
            control: ControlSettings {
                service_counts: vec![1, 1_000],
                idle_s: 5,
                switches: 5,
                switch: SwitchSettings {
                    repetitions: 1,
                    probe_interval_us: 1_000,
                    probe_timeout_ms: 1_000,
                    max_s: 60,
                    confirm: 20,
                },
            },
            control_only: false,
            packet_costs_only: false,
            client_sysctls: vec![
                ("net.ipv4.tcp_max_tw_buckets".into(), "0".into()),
                ("net.ipv4.ip_local_port_range".into(), "10000 65001".into()),
            ],
        }
    }

    pub fn full() -> Settings {
        Settings {
            mode: "full".into(),
            service_counts: vec![1, 1_000, 10_000, 30_000],
            rounds: 5,
            trial: TrialSettings {
                connections: 2_000,
                warmup: 50,
                per_connection_timeout_ms: 2_000,
                deadline_s: 120,
                session_requests: 5_000,
                udp_requests: 5_000,
                udp_timeout_ms: 1_000,
                stream_seconds: 3,
            },
            switch: SwitchSettings {
                // Each nft switch at N = 10,000 is a ~100 s re-sync.
                repetitions: 3,
                probe_interval_us: 1_000,
                probe_timeout_ms: 1_000,
                // nft's full re-sync took ~100 s at N = 10,000.
                max_s: 600,
                confirm: 20,
            },
            // `nft -f` took 32 s to load and 98 s to re-sync 10,000
            // services (growing faster than linearly); at 30,000 five
            // rounds of loads plus the re-syncs would take most of an hour.
            nft_max_services: Some(10_000),
            testrun_repeat: 1_000_000,
            testrun_batches: 10,
            // Five rounds, like the ClusterIP trials: each NodePort turn
            // restarts both agents or reloads the rules at that N.
            nodeport_rounds: 5,
            control: ControlSettings {
                service_counts: vec![1, 10_000, 30_000, 100_000],
                idle_s: 60,
                switches: 20,
                ..Settings::quick().control
            },
            ..Settings::quick()
        }
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub settings: Settings,
    pub machine: report::Machine,
    pub trials: Vec<peers::Trial>,
    pub throughput: Vec<stream::Throughput>,
    pub programming: Vec<peers::Programming>,
    pub switches: Vec<switch::Switch>,
    /// The agent's programs' run time per packet during ours' trials.
    pub live_costs: Vec<live::LiveCost>,
    /// NodePort: one [`peers::Kind::TcpConnect`] trial per peer, N and
    /// round.
    pub nodeport_trials: Vec<peers::Trial>,
    /// NodePort: each peer's load (ours: both agents programmed).
    pub nodeport_programming: Vec<peers::Programming>,
    /// Peers not run at some N, and why.
    pub skipped: Vec<String>,
    pub packet_costs: Vec<testrun::PacketCost>,
    /// The control plane at scale, per source and N.
    pub control: Vec<control::ControlRun>,
    /// Turns or measurements that failed outright, with the error.
    pub failures: Vec<String>,
    pub duration_s: f64,
    /// `/proc/loadavg` before and after: the machine is shared, and other
    /// work shows up as noise in every peer's numbers.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// One trial's progress line; `what` is its kind, with anything before it.
fn print_trial(n: usize, round: usize, peer: Peer, what: &str, t: &peers::Trial, suffix: &str) {
    println!(
        "N={n:<6} round {round} {peer:<9} {what:<26} {:>7.0}/s p50 {:>6.0} µs p99 {:>6.0} µs ok {}/{}{suffix}",
        t.rate, t.p50_us, t.p99_us, t.ok, t.requested,
    );
}

fn print_turn(n: usize, round: usize, peer: Peer, turn: &peers::Turn) {
    for t in &turn.trials {
        print_trial(n, round, peer, &t.kind.to_string(), t, "");
    }
    let s = &turn.throughput;
    println!(
        "N={n:<6} round {round} {peer:<9} {:<15} {:>7.2} Gbit/s {}",
        "tcp-stream",
        s.bits_per_second / 1e9,
        s.error.as_deref().unwrap_or("")
    );
    for p in &turn.programming {
        println!(
            "N={n:<6} round {round} {peer:<9} {} {:.1} ms",
            p.what, p.wall_ms
        );
    }
    for w in &turn.switches {
        println!(
            "N={n:<6} round {round} {peer:<9} switch {} to {:?}: first new answer {} ms, only new from {} ms, programmed {:.1} ms, probes {}/{} answered",
            w.repetition,
            w.to,
            w.change_to_first_new_ms
                .map_or("never".into(), |v| format!("{v:.1}")),
            w.change_to_settled_ms
                .map_or("never".into(), |v| format!("{v:.1}")),
            w.programmed_ms,
            w.probes_answered,
            w.probes_sent,
        );
    }
}

/// The NodePort turns: every N, `nodeport_rounds` rounds, peers in random
/// order, in one cluster (dropped, and so removed, at the end).
fn run_nodeport(
    settings: &Settings,
    runs_at: &dyn Fn(Peer, usize) -> bool,
    rng: &mut StdRng,
    results: &mut Results,
) -> Result<()> {
    let (cluster, sysctls) = nodeport::cluster(settings)?;
    let plan = nodeport::Plan {
        settings,
        sysctls: &sysctls,
    };
    for &n in &settings.service_counts {
        let services = nodeport::services(&cluster, n);
        for round in 0..settings.nodeport_rounds {
            let mut order: Vec<Peer> = Peer::NODEPORT
                .into_iter()
                .filter(|&p| runs_at(p, n))
                .collect();
            order.shuffle(rng);
            for peer in order {
                match nodeport::turn(&cluster, peer, &services, round, &plan) {
                    Ok(turn) => {
                        let load = turn
                            .programming
                            .as_ref()
                            .map_or(String::new(), |p| format!(" (load {:.1} ms)", p.wall_ms));
                        for t in &turn.trials {
                            print_trial(n, round, peer, &format!("nodeport {}", t.kind), t, &load);
                        }
                        results.nodeport_trials.extend(turn.trials);
                        results.nodeport_programming.extend(turn.programming);
                    }
                    Err(e) => {
                        let msg = format!("NodePort N={n} round {round} {peer}: {e:#}");
                        eprintln!("bench: {msg}");
                        results.failures.push(msg);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs the whole benchmark.
pub fn run(settings: Settings) -> Result<Results> {
    let started = Instant::now();
    let machine = report::Machine::detect();
    let mut results = Results {
        settings: settings.clone(),
        machine,
        trials: Vec::new(),
        throughput: Vec::new(),
        programming: Vec::new(),
        switches: Vec::new(),
        live_costs: Vec::new(),
        nodeport_trials: Vec::new(),
        nodeport_programming: Vec::new(),
        skipped: Vec::new(),
        packet_costs: Vec::new(),
        control: Vec::new(),
        failures: Vec::new(),
        duration_s: 0.0,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    };
    if settings.packet_costs_only {
        packet_costs(&settings, &mut results);
        results.duration_s = started.elapsed().as_secs_f64();
        results.loadavg_end = loadavg();
        return Ok(results);
    }
    let runs_at = |peer: Peer, n: usize| {
        peer != Peer::Nftables || settings.nft_max_services.is_none_or(|max| n <= max)
    };
    // Changes are measured at the largest N each peer runs at.
    let largest_for = |peer: Peer| {
        settings
            .service_counts
            .iter()
            .copied()
            .filter(|&n| runs_at(peer, n))
            .max()
    };
    for &n in &settings.service_counts {
        if !runs_at(Peer::Nftables, n) {
            let changes = match largest_for(Peer::Nftables) {
                Some(m) => format!("its endpoint changes are measured at N={m}"),
                None => "it is not measured at any N in this run".into(),
            };
            let msg = format!(
                "nftables not run at N={n} (nft_max_services = {:?}): its `nft -f` load took 32 s \
                 and a full re-sync 98 s at N=10,000 in an earlier full run, growing faster than \
                 linearly, so {} rounds plus the re-syncs at N={n} would not fit the run; {changes}",
                settings.nft_max_services, settings.rounds,
            );
            println!("bench: {msg}");
            results.skipped.push(msg);
        }
    }
    let mut rng = StdRng::seed_from_u64(settings.seed);
    {
        let lab = Lab::with_config(LabConfig {
            // One more than the endpoints: the spare the switches go to.
            backends: settings.backends + 1,
            ..LabConfig::default()
        })?;
        let sysctls = peers::ClientSysctls::apply(lab.client(), &settings.client_sysctls)?;
        let _iperf = stream::IperfServer::start(lab.backend(0))?;
        let data_plane = if settings.control_only {
            &[][..]
        } else {
            &settings.service_counts[..]
        };
        for &n in data_plane {
            let services = rules::services(n, settings.backends);
            for round in 0..settings.rounds {
                let mut order: Vec<Peer> =
                    Peer::ALL.into_iter().filter(|&p| runs_at(p, n)).collect();
                order.shuffle(&mut rng);
                for peer in order {
                    let plan = TurnPlan {
                        trial: settings.trial,
                        sysctls: &sysctls,
                        changes: round == 0 && largest_for(peer) == Some(n),
                        switch: settings.switch,
                        spare: settings.backends,
                    };
                    match peers::turn(&lab, peer, &services, round, &plan) {
                        Ok(turn) => {
                            print_turn(n, round, peer, &turn);
                            results.trials.extend(turn.trials);
                            results.throughput.push(turn.throughput);
                            results.programming.extend(turn.programming);
                            results.switches.extend(turn.switches);
                            results.live_costs.extend(turn.live);
                        }
                        Err(e) => {
                            let msg = format!("N={n} round {round} {peer}: {e:#}");
                            eprintln!("bench: {msg}");
                            results.failures.push(msg);
                        }
                    }
                }
            }
        }
        results.control = control::run(&lab, &settings.control, settings.backends);
        results
            .failures
            .extend(results.control.iter().filter_map(|r| {
                r.error.as_ref().map(|e| {
                    let source = r.source.map_or("?", control::CpSource::name);
                    format!("control plane {source} N={}: {e}", r.services)
                })
            }));
    }
    if settings.control_only {
        results.duration_s = started.elapsed().as_secs_f64();
        results.loadavg_end = loadavg();
        return Ok(results);
    }
    if let Err(e) = run_nodeport(&settings, &runs_at, &mut rng, &mut results) {
        let msg = format!("NodePort: {e:#}");
        eprintln!("bench: {msg}");
        results.failures.push(msg);
    }
    report::fill_ratios(&mut results.trials);
    report::fill_ratios(&mut results.nodeport_trials);
    report::fill_throughput_ratios(&mut results.throughput);

    packet_costs(&settings, &mut results);
    results.duration_s = started.elapsed().as_secs_f64();
    results.loadavg_end = loadavg();
    Ok(results)
}

/// The per-packet rows (BPF_PROG_TEST_RUN) at the smallest and largest N,
/// into `results`; a failure is recorded like a failed trial.
fn packet_costs(settings: &Settings, results: &mut Results) {
    let largest = settings.service_counts.iter().copied().max().unwrap_or(1);
    let mut sizes = vec![settings.service_counts.iter().copied().min().unwrap_or(1)];
    if largest != sizes[0] {
        sizes.push(largest);
    }
    for n in sizes {
        match testrun::measure(
            n,
            settings.backends,
            settings.testrun_repeat,
            settings.testrun_batches,
        ) {
            Ok(costs) => {
                for c in &costs {
                    println!(
                        "test_run N={n:<6} {:<36} {:<24} min {:>6.1} ns median {:>6.1} ns (verdict {}, out {})",
                        c.case, c.method, c.min_ns, c.median_ns, c.verdict, c.output
                    );
                }
                results.packet_costs.extend(costs);
            }
            Err(e) => {
                let msg = format!("test_run N={n}: {e:#}");
                eprintln!("bench: {msg}");
                results.failures.push(msg);
            }
        }
    }
}
