//! Summaries across rounds, the machine description, and the Markdown and
//! JSON outputs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::Results;
use super::peers::{Peer, Trial};

/// Where the numbers were taken.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub date_utc: String,
    pub iptables: String,
    pub nft: String,
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|m| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            kernel: command_output("uname", &["-r"]),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            date_utc: command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            iptables: command_output("iptables", &["--version"]),
            nft: command_output("nft", &["--version"]),
        }
    }
}

/// Sets each trial's rate as a ratio to the complete `direct` trial of the
/// same N and round.
pub fn fill_ratios(trials: &mut [Trial]) {
    let direct: BTreeMap<(usize, usize), f64> = trials
        .iter()
        .filter(|t| t.peer == Peer::Direct && t.complete && t.rate > 0.0)
        .map(|t| ((t.services, t.round), t.rate))
        .collect();
    for t in trials.iter_mut() {
        t.ratio_to_direct = match direct.get(&(t.services, t.round)) {
            Some(d) if t.complete => Some(t.rate / d),
            _ => None,
        };
    }
}

pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    })
}

/// One peer at one N, medians over its complete rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub peer: Peer,
    pub services: usize,
    pub rounds: usize,
    pub complete_rounds: usize,
    pub rate: Option<f64>,
    pub ratio_to_direct: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub load_wall_ms: Option<f64>,
    pub load_agent_took_us: Option<f64>,
    pub endpoint_change_wall_ms: Option<f64>,
    pub endpoint_change_agent_took_us: Option<f64>,
    pub agent_peak_rss_kb: Option<f64>,
}

pub fn summaries(r: &Results) -> Vec<Summary> {
    let mut out = Vec::new();
    for &n in &r.settings.service_counts {
        for peer in Peer::ALL {
            let trials: Vec<&Trial> = r
                .trials
                .iter()
                .filter(|t| t.peer == peer && t.services == n)
                .collect();
            let ok: Vec<&&Trial> = trials.iter().filter(|t| t.complete).collect();
            let prog = |what: &'static str| {
                r.programming
                    .iter()
                    .filter(move |p| p.peer == peer && p.services == n && p.what == what)
            };
            out.push(Summary {
                peer,
                services: n,
                rounds: trials.len(),
                complete_rounds: ok.len(),
                rate: median(ok.iter().map(|t| t.rate)),
                ratio_to_direct: median(ok.iter().filter_map(|t| t.ratio_to_direct)),
                p50_us: median(ok.iter().map(|t| t.p50_us)),
                p99_us: median(ok.iter().map(|t| t.p99_us)),
                load_wall_ms: median(prog("load").map(|p| p.wall_ms)),
                load_agent_took_us: median(
                    prog("load").filter_map(|p| p.agent_took_us.map(|u| u as f64)),
                ),
                endpoint_change_wall_ms: median(prog("endpoint change").map(|p| p.wall_ms)),
                endpoint_change_agent_took_us: median(
                    prog("endpoint change").filter_map(|p| p.agent_took_us.map(|u| u as f64)),
                ),
                agent_peak_rss_kb: prog("load")
                    .filter_map(|p| p.agent_peak_rss_kb.map(|k| k as f64))
                    .reduce(f64::max),
            });
        }
    }
    out
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

fn duration_ms(ms: f64) -> String {
    if ms >= 1_000.0 {
        format!("{:.2} s", ms / 1e3)
    } else {
        format!("{ms:.1} ms")
    }
}

/// The Markdown report.
pub fn markdown(r: &Results) -> String {
    let s = &r.settings;
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# kube-ebpf-proxy benchmark ({} run)\n", s.mode);
    let _ = writeln!(
        out,
        "Machine: {} ({} CPUs), kernel {}, {}; {}; {}. Run took {:.0} s; \
         /proc/loadavg before {:?}, after {:?} (a shared machine: other work is noise in \
         every peer, which the per-round ratio to `direct` only partly cancels).\n",
        m.cpu_model,
        m.cpus,
        m.kernel,
        m.date_utc,
        m.iptables,
        m.nft,
        r.duration_s,
        r.loadavg_start,
        r.loadavg_end
    );
    let _ = writeln!(
        out,
        "Settings: services N = {:?} (each port 80/TCP -> 8080, {} endpoints, target = last); \
         {} rounds, peers in random order per round (seed {}); per trial {} sequential TCP \
         connections (connect, 6-byte request, reply line, close) after {} warm-up, \
         {} ms per-connection timeout, {} s deadline; conntrack flushed before each trial; \
         test_run {} repeats × {} batches; agent manifest poll {} ms; client sysctls {}.\n",
        s.service_counts,
        s.backends,
        s.rounds,
        s.seed,
        s.trial.connections,
        s.trial.warmup,
        s.trial.per_connection_timeout_ms,
        s.trial.deadline_s,
        s.testrun_repeat,
        s.testrun_batches,
        s.agent_poll_interval_ms,
        s.client_sysctls
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out.push_str("## Connection rate and latency (median over complete rounds)\n\n");
    out.push_str(
        "| N | peer | conn/s | vs direct | p50 | p99 | complete rounds | program all N | agent took_us | one endpoint change | agent peak RSS |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for x in summaries(r) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} |",
            x.services,
            x.peer,
            opt(x.rate, |v| format!("{v:.0}")),
            opt(x.ratio_to_direct, |v| format!("{v:.2}")),
            opt(x.p50_us, |v| format!("{v:.0} µs")),
            opt(x.p99_us, |v| format!("{v:.0} µs")),
            x.complete_rounds,
            x.rounds,
            opt(x.load_wall_ms, duration_ms),
            opt(x.load_agent_took_us, |v| format!("{:.1} ms", v / 1e3)),
            match (x.endpoint_change_wall_ms, x.endpoint_change_agent_took_us) {
                (Some(w), Some(t)) => format!("{} (took {:.1} ms)", duration_ms(w), t / 1e3),
                (w, _) => opt(w, duration_ms),
            },
            opt(x.agent_peak_rss_kb, |v| format!("{:.1} MiB", v / 1024.0)),
        );
    }
    out.push_str(
        "\n`program all N`: ours = agent process start until its first `datapath programmed` \
         line (`agent took_us` = the sync itself); iptables = one `iptables-restore`; nftables = \
         one `nft -f`. `one endpoint change` (largest N only): ours = manifest rewrite until the \
         next `datapath programmed` line (includes the poll interval); iptables/nftables = \
         re-applying the full ruleset, as kube-proxy's sync does.\n\n",
    );
    out.push_str("## Per-packet cost of the TC program (BPF_PROG_TEST_RUN)\n\n");
    out.push_str(
        "| N | packet | timed as | min | median | verdict | output |\n|---:|---|---|---:|---:|---:|---|\n",
    );
    for c in &r.packet_costs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} ns | {:.0} ns | {} | {} |",
            c.services, c.case, c.method, c.min_ns, c.median_ns, c.verdict, c.output
        );
    }
    out.push_str(
        "\nSingle runs include the kernel's timer overhead (two clock reads); the repeat loop \
         re-runs the same skb, so it is only used for the packet the program does not rewrite. \
         Verdicts: 0 = TC_ACT_OK, 7 = TC_ACT_REDIRECT (the REJECT reply goes back out).\n",
    );
    if !r.failures.is_empty() {
        out.push_str("\n## Failures\n\n");
        for f in &r.failures {
            let first = f.lines().next().unwrap_or("");
            let _ = writeln!(out, "- {first}");
        }
    }
    let failed: Vec<String> = r
        .trials
        .iter()
        .filter(|t| !t.complete)
        .map(|t| {
            format!(
                "- N={} round {} {}: {}/{} ok, errors {:?}",
                t.services, t.round, t.peer, t.ok, t.requested, t.errors
            )
        })
        .collect();
    if !failed.is_empty() {
        out.push_str("\n## Incomplete trials (excluded)\n\n");
        out.push_str(&failed.join("\n"));
        out.push('\n');
    }
    out
}

/// Writes `latest.md`, `latest.json` and `latest.svg` into `dir`.
pub fn write_all(r: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    };
    write("latest.md", &markdown(r))?;
    #[derive(Serialize)]
    struct Json<'a> {
        #[serde(flatten)]
        results: &'a Results,
        summaries: Vec<Summary>,
    }
    let json = serde_json::to_string(&Json {
        results: r,
        summaries: summaries(r),
    })?;
    write("latest.json", &json)?;
    write("latest.svg", &super::chart::svg(&summaries(r)))?;
    Ok(())
}
