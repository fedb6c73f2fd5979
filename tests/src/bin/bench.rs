//! `lab-bench [--quick] [--out DIR]`: runs the benchmark (see `lab::bench`)
//! in one lab and writes `latest.md`, `latest.json` and `latest.svg` to DIR
//! (default `<workspace>/bench/results`). Needs root; the agent binary comes
//! from `KEP_AGENT_BIN` (default `target/debug/kube-ebpf-proxy`).

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
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => settings = Settings::quick(),
            "--out" => match args.next() {
                Some(d) => out = PathBuf::from(d),
                None => bail!("--out needs a directory"),
            },
            other => bail!("unknown argument {other:?} (usage: lab-bench [--quick] [--out DIR])"),
        }
    }
    let removed = lab::cleanup_stale()?;
    if !removed.is_empty() {
        eprintln!("bench: removed stale lab leftovers: {removed:?}");
    }
    println!("bench: {settings:?}");
    let results = bench::run(settings)?;
    report::write_all(&results, &out)?;
    println!("\n{}", report::markdown(&results));
    println!("bench: wrote {}/latest.{{md,json,svg}}", out.display());
    Ok(())
}
