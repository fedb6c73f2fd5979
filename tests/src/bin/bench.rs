//! `lab-bench [--quick] [--services N,N,...] [--nft-max-services N]
//! [--nodeport-agent-args "ARG ..."] [--control-plane-only] [--packet-costs-only]
//! [--out DIR]`: runs the benchmark (see
//! `lab::bench`) and writes `latest.md`, `latest.json` and `latest.svg` to
//! DIR (default `<workspace>/bench/results`); `quick.*` with `--quick`,
//! `partial.*` with `--services`, `--nft-max-services` or
//! `--nodeport-agent-args` (whitespace-separated extra arguments for the
//! NodePort measurement's agents, e.g. `"--xdp-mode native"`). Needs root;
//! the agent binary comes from `KEP_AGENT_BIN` (default
//! `target/debug/kube-ebpf-proxy`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use lab::bench::{self, Settings, report};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut settings = Settings::full();
    let mut out = lab::workspace_root().join("bench/results");
    let mut services = None;
    let mut nft_max = None;
    let mut nodeport_args = None;
    let mut control_only = false;
    let mut packet_costs_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => settings = Settings::quick(),
            // Only the control plane at scale (both sources), e.g. with
            // `--services 30000` for one N.
            "--control-plane-only" => control_only = true,
            // Only the per-packet rows (BPF_PROG_TEST_RUN) at the smallest
            // and largest N: no lab, no peers.
            "--packet-costs-only" => packet_costs_only = true,
            // Restricts N, e.g. `--services 1` for a smoke run of the full
            // settings; applied after `--quick` whatever the order.
            "--services" => match args.next() {
                Some(list) => services = Some(parse_services(&list)?),
                None => bail!("--services needs a comma-separated list"),
            },
            // nftables is not run above this N (`0`: no limit).
            "--nft-max-services" => match args.next().map(|v| v.parse::<usize>()) {
                Some(Ok(n)) => nft_max = Some((n > 0).then_some(n)),
                _ => bail!("--nft-max-services needs a number"),
            },
            // One value (it starts with `--` itself), split on whitespace.
            "--nodeport-agent-args" => match args.next() {
                Some(v) => {
                    nodeport_args = Some(v.split_whitespace().map(String::from).collect());
                }
                None => bail!("--nodeport-agent-args needs a value, e.g. \"--xdp-mode native\""),
            },
            "--out" => match args.next() {
                Some(d) => out = PathBuf::from(d),
                None => bail!("--out needs a directory"),
            },
            other => bail!(
                "unknown argument {other:?} (usage: lab-bench [--quick] [--services N,N,...] \
                 [--nft-max-services N] [--nodeport-agent-args \"ARG ...\"] \
                 [--control-plane-only] [--packet-costs-only] [--out DIR])"
            ),
        }
    }
    // A quick or partial run never overwrites the published full results.
    let stem = if services.is_some()
        || nft_max.is_some()
        || nodeport_args.is_some()
        || control_only
        || packet_costs_only
    {
        "partial"
    } else if settings.mode == "quick" {
        "quick"
    } else {
        "latest"
    };
    if let Some(list) = services {
        settings.control.service_counts = list.clone();
        settings.service_counts = list;
    }
    settings.control_only = control_only;
    settings.packet_costs_only = packet_costs_only;
    if let Some(max) = nft_max {
        settings.nft_max_services = max;
    }
    if let Some(extra) = nodeport_args {
        settings.nodeport_agent_args = extra;
    }
    let removed = lab::cleanup_stale()?;
    if !removed.is_empty() {
        eprintln!("bench: removed stale lab leftovers: {removed:?}");
    }
    println!("bench: {settings:?}");
    let results = bench::run(settings)?;
    report::write_all(&results, &out, stem)?;
    println!("\n{}", report::markdown(&results));
    println!("bench: wrote {}/{stem}.{{md,json,svg}}", out.display());
    Ok(())
}

fn parse_services(list: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',') {
        let n: usize = part
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("--services: {part:?}: {e}"))?;
        if n == 0 || n > 100_000 {
            bail!("--services: {n} not in 1..=100000");
        }
        out.push(n);
    }
    Ok(out)
}
