//! `cargo xtask bench`: direct, ours, kube-proxy iptables shape and
//! kube-proxy nftables shape in one lab, over the same N services, measured
//! in rounds with the peers in random order; plus the TC program's
//! per-packet cost with BPF_PROG_TEST_RUN. Writes `latest.md`, `latest.json`
//! and `latest.svg`.
//!
//! - [`rules`]: the services and the manifest / iptables / nft text.
//! - [`peers`]: making one peer active, a connection trial, removal.
//! - [`testrun`]: per-packet cost.
//! - [`report`]: summaries, the Markdown table, the JSON.
//! - [`chart`]: the SVG.

pub mod chart;
pub mod peers;
pub mod report;
pub mod rules;
pub mod testrun;

use std::time::Instant;

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::{Lab, LabConfig};
use peers::{Peer, TrialSettings};

/// What a run measures.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub mode: String,
    pub service_counts: Vec<usize>,
    pub rounds: usize,
    pub backends: usize,
    pub trial: TrialSettings,
    pub testrun_repeat: u32,
    pub testrun_batches: usize,
    /// Seed of the peer order shuffles.
    pub seed: u64,
    /// Set in the client namespace: sequential connections to one
    /// destination would otherwise leave thousands of TIME_WAIT sockets, and
    /// connect() then spends more and more time searching for a free port.
    pub client_sysctls: Vec<(String, String)>,
    /// The agent's manifest poll interval (its default), which bounds how
    /// soon it sees a rewritten manifest.
    pub agent_poll_interval_ms: u64,
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
            },
            testrun_repeat: 100_000,
            testrun_batches: 10,
            seed: rand::rng().random(),
            agent_poll_interval_ms: 200,
            client_sysctls: vec![
                ("net.ipv4.tcp_max_tw_buckets".into(), "0".into()),
                ("net.ipv4.ip_local_port_range".into(), "10000 65001".into()),
            ],
        }
    }

    pub fn full() -> Settings {
        Settings {
            mode: "full".into(),
            service_counts: vec![1, 1_000, 10_000],
            rounds: 5,
            trial: TrialSettings {
                connections: 2_000,
                warmup: 50,
                per_connection_timeout_ms: 2_000,
                deadline_s: 120,
            },
            testrun_repeat: 1_000_000,
            testrun_batches: 10,
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
    pub programming: Vec<peers::Programming>,
    pub packet_costs: Vec<testrun::PacketCost>,
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

/// Runs the whole benchmark.
pub fn run(settings: Settings) -> Result<Results> {
    let started = Instant::now();
    let machine = report::Machine::detect();
    let mut results = Results {
        settings: settings.clone(),
        machine,
        trials: Vec::new(),
        programming: Vec::new(),
        packet_costs: Vec::new(),
        failures: Vec::new(),
        duration_s: 0.0,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    };
    let largest = settings.service_counts.iter().copied().max().unwrap_or(1);
    {
        let lab = Lab::with_config(LabConfig {
            backends: settings.backends,
            ..LabConfig::default()
        })?;
        for (key, value) in &settings.client_sysctls {
            lab.client().sysctl(key, value)?;
        }
        let mut rng = StdRng::seed_from_u64(settings.seed);
        for &n in &settings.service_counts {
            let services = rules::services(n, settings.backends);
            for round in 0..settings.rounds {
                let mut order = Peer::ALL.to_vec();
                order.shuffle(&mut rng);
                for peer in order {
                    let change = n == largest && round == 0;
                    match peers::turn(&lab, peer, &services, round, settings.trial, change) {
                        Ok(turn) => {
                            let t = &turn.trial;
                            println!(
                                "N={n:<6} round {round} {peer:<9} {:>7.0} conn/s p50 {:>6.0} µs p99 {:>6.0} µs ok {}/{}{}",
                                t.rate,
                                t.p50_us,
                                t.p99_us,
                                t.ok,
                                t.requested,
                                turn.programming
                                    .iter()
                                    .map(|p| format!(", {} {:.1} ms", p.what, p.wall_ms))
                                    .collect::<String>()
                            );
                            results.trials.push(turn.trial);
                            results.programming.extend(turn.programming);
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
    }
    report::fill_ratios(&mut results.trials);

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
    results.duration_s = started.elapsed().as_secs_f64();
    results.loadavg_end = loadavg();
    Ok(results)
}
