//! Summaries across rounds, the machine description, and the Markdown and
//! JSON outputs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::Results;
use super::peers::{Kind, Peer, Programming, Trial};
use super::stream::Throughput;

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
/// same kind, N and round.
pub fn fill_ratios(trials: &mut [Trial]) {
    let direct: BTreeMap<(Kind, usize, usize), f64> = trials
        .iter()
        .filter(|t| t.peer == Peer::Direct && t.complete && t.rate > 0.0)
        .map(|t| ((t.kind, t.services, t.round), t.rate))
        .collect();
    for t in trials.iter_mut() {
        t.ratio_to_direct = match direct.get(&(t.kind, t.services, t.round)) {
            Some(d) if t.complete => Some(t.rate / d),
            _ => None,
        };
    }
}

/// Sets each stream's throughput as a ratio to the complete `direct`
/// stream of the same N and round.
pub fn fill_throughput_ratios(streams: &mut [Throughput]) {
    let direct: BTreeMap<(usize, usize), f64> = streams
        .iter()
        .filter(|t| t.peer == Peer::Direct && t.complete && t.bits_per_second > 0.0)
        .map(|t| ((t.services, t.round), t.bits_per_second))
        .collect();
    for t in streams.iter_mut() {
        t.ratio_to_direct = match direct.get(&(t.services, t.round)) {
            Some(d) if t.complete => Some(t.bits_per_second / d),
            _ => None,
        };
    }
}

/// Quantile `q` (nearest rank) of `values`.
pub fn quantile(values: impl IntoIterator<Item = f64>, q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
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

/// The ClusterIP connection trials (`kind`: [`Kind::TcpConnect`] or
/// [`Kind::TcpConnectAsIs`]) and programming, per peer and N.
pub fn summaries(r: &Results, kind: Kind) -> Vec<Summary> {
    summarize(
        &r.settings.service_counts,
        &Peer::ALL,
        &r.trials,
        &r.programming,
        kind,
    )
}

/// The NodePort connection trials of `kind` and loads, per peer and N.
pub fn nodeport_summaries(r: &Results, kind: Kind) -> Vec<Summary> {
    summarize(
        &r.settings.service_counts,
        &Peer::NODEPORT,
        &r.nodeport_trials,
        &r.nodeport_programming,
        kind,
    )
}

fn summarize(
    service_counts: &[usize],
    peers: &[Peer],
    all_trials: &[Trial],
    programming: &[Programming],
    kind: Kind,
) -> Vec<Summary> {
    let mut out = Vec::new();
    for &n in service_counts {
        for &peer in peers {
            let trials: Vec<&Trial> = all_trials
                .iter()
                .filter(|t| t.kind == kind && t.peer == peer && t.services == n)
                .collect();
            if trials.is_empty()
                && !programming
                    .iter()
                    .any(|p| p.peer == peer && p.services == n)
            {
                continue;
            }
            let ok: Vec<&&Trial> = trials.iter().filter(|t| t.complete).collect();
            let prog = |what: &'static str| {
                programming
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

/// One trial kind (other than connections) for one peer at one N.
#[derive(Debug, Clone, Serialize)]
pub struct KindSummary {
    pub kind: Kind,
    pub peer: Peer,
    pub services: usize,
    pub rounds: usize,
    pub complete_rounds: usize,
    pub rate: Option<f64>,
    pub ratio_to_direct: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

pub fn kind_summaries(r: &Results) -> Vec<KindSummary> {
    let mut out = Vec::new();
    for kind in Kind::ALL
        .into_iter()
        .filter(|&k| !matches!(k, Kind::TcpConnect | Kind::TcpConnectAsIs))
    {
        for &n in &r.settings.service_counts {
            for peer in Peer::ALL {
                let trials: Vec<&Trial> = r
                    .trials
                    .iter()
                    .filter(|t| t.kind == kind && t.peer == peer && t.services == n)
                    .collect();
                if trials.is_empty() {
                    continue;
                }
                let ok: Vec<&&Trial> = trials.iter().filter(|t| t.complete).collect();
                out.push(KindSummary {
                    kind,
                    peer,
                    services: n,
                    rounds: trials.len(),
                    complete_rounds: ok.len(),
                    rate: median(ok.iter().map(|t| t.rate)),
                    ratio_to_direct: median(ok.iter().filter_map(|t| t.ratio_to_direct)),
                    p50_us: median(ok.iter().map(|t| t.p50_us)),
                    p99_us: median(ok.iter().map(|t| t.p99_us)),
                });
            }
        }
    }
    out
}

/// The iperf3 stream for one peer at one N.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    pub peer: Peer,
    pub services: usize,
    pub rounds: usize,
    pub complete_rounds: usize,
    pub gbit_per_s: Option<f64>,
    pub ratio_to_direct: Option<f64>,
    pub retransmits: Option<f64>,
}

pub fn stream_summaries(r: &Results) -> Vec<StreamSummary> {
    let mut out = Vec::new();
    for &n in &r.settings.service_counts {
        for peer in Peer::ALL {
            let all: Vec<&Throughput> = r
                .throughput
                .iter()
                .filter(|t| t.peer == peer && t.services == n)
                .collect();
            if all.is_empty() {
                continue;
            }
            let ok: Vec<&&Throughput> = all.iter().filter(|t| t.complete).collect();
            out.push(StreamSummary {
                peer,
                services: n,
                rounds: all.len(),
                complete_rounds: ok.len(),
                gbit_per_s: median(ok.iter().map(|t| t.bits_per_second / 1e9)),
                ratio_to_direct: median(ok.iter().filter_map(|t| t.ratio_to_direct)),
                retransmits: median(ok.iter().filter_map(|t| t.retransmits.map(|v| v as f64))),
            });
        }
    }
    out
}

/// The endpoint switches of one peer.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchSummary {
    pub peer: Peer,
    pub services: usize,
    pub switches: usize,
    /// Switches where a new backend answered within the prober's limit.
    pub switched: usize,
    pub first_new_median_ms: Option<f64>,
    pub first_new_p99_ms: Option<f64>,
    pub settled_median_ms: Option<f64>,
    pub settled_p99_ms: Option<f64>,
    pub programmed_median_ms: Option<f64>,
    pub probes_failed: u64,
    pub old_after_first_new: u64,
}

pub fn switch_summaries(r: &Results) -> Vec<SwitchSummary> {
    let mut out = Vec::new();
    for peer in Peer::ALL {
        let all: Vec<_> = r.switches.iter().filter(|w| w.peer == peer).collect();
        let Some(first) = all.first() else { continue };
        let times = || all.iter().filter_map(|w| w.change_to_first_new_ms);
        out.push(SwitchSummary {
            peer,
            services: first.services,
            switches: all.len(),
            switched: times().count(),
            first_new_median_ms: median(times()),
            first_new_p99_ms: quantile(times(), 0.99),
            settled_median_ms: median(all.iter().filter_map(|w| w.change_to_settled_ms)),
            settled_p99_ms: quantile(all.iter().filter_map(|w| w.change_to_settled_ms), 0.99),
            programmed_median_ms: median(all.iter().map(|w| w.programmed_ms)),
            probes_failed: all.iter().map(|w| w.probes_failed).sum(),
            old_after_first_new: all.iter().map(|w| w.old_after_first_new).sum(),
        });
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
         {} ms per-connection timeout, {} s deadline; conntrack flushed before each trial but the \
         as-is one; \
         test_run {} repeats × {} batches; client sysctls {}. \
         Request/response: {} exchanges on one TCP connection, {} UDP exchanges on one socket and \
         {} with a new socket each ({} ms reply timeout), each after the same warm-up; one iperf3 \
         TCP stream of {} s. Endpoint switches: {} per peer at its largest N, probed every {} µs \
         (limit {} s).\n",
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
        s.client_sysctls
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.trial.session_requests,
        s.trial.udp_requests,
        s.trial.udp_requests,
        s.trial.udp_timeout_ms,
        s.trial.stream_seconds,
        s.switch.repetitions,
        s.switch.probe_interval_us,
        s.switch.max_s,
    );
    if !r.skipped.is_empty() {
        out.push_str("Not run:\n\n");
        for k in &r.skipped {
            let _ = writeln!(out, "- {k}");
        }
        out.push('\n');
    }
    out.push_str("## Connection rate and latency (median over complete rounds)\n\n");
    out.push_str(
        "| N | peer | conn/s | vs direct | p50 | p99 | complete rounds | program all N | agent took_us | one endpoint change | agent peak RSS |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for x in summaries(r, Kind::TcpConnect) {
        let change = match (x.endpoint_change_wall_ms, x.endpoint_change_agent_took_us) {
            (Some(w), Some(t)) => format!("{} (took {:.1} ms)", duration_ms(w), t / 1e3),
            (w, _) => opt(w, duration_ms),
        };
        let _ = writeln!(out, "{}", connection_row(&x, Some(change)));
    }
    out.push_str(
        "\n`program all N`: ours = agent process start until its first `datapath programmed` \
         line (`agent took_us` = the sync itself); iptables = one `iptables-restore`; nftables = \
         one `nft -f`. `one endpoint change` (one endpoint removed, at each peer's largest N): ours = manifest rewrite until the \
         next `datapath programmed` line (the agent hears of it by inotify); iptables/nftables = \
         re-applying the full ruleset, as kube-proxy's sync does.\n\n",
    );
    out.push_str(&as_is_table(r));
    out.push_str(&request_response_table(r));
    out.push_str(&nodeport_table(r));
    out.push_str(&switch_table(r));
    out.push_str(&control_table(r));
    out.push_str("## Per-packet cost of the programs (BPF_PROG_TEST_RUN)\n\n");
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
         Verdicts: TC 0 = TC_ACT_OK, 7 = TC_ACT_REDIRECT (the REJECT reply goes back out, the \
         node program's FIB redirect); XDP 2 = XDP_PASS, 3 = XDP_TX. \
         The new flow is a SYN from a source port not seen before in every call, so every call is \
         a conntrack miss (service lookup, endpoint pick, conntrack entry, DNAT). `not a \
         service` is a SYN to a pod IP on a port no Service targets (untracked); `straight to an \
         endpoint` a SYN to an endpoint's address and port, tracked untranslated so no Service flow \
         takes its tuple (a conntrack hit after the first call). The egress program runs on every \
         packet leaving a pod or node interface: a forwarded one returns at once. \
         `− harness overhead` rows subtract the single-run median minus the repeat-loop median \
         of a packet the same program passes untouched (the cost of one BPF_PROG_TEST_RUN call \
         around the program) from each single run: an estimate of the program's own cost. The \
         node programs (XDP, TC node) run in a namespace with a node's routes, since they look \
         up the FIB; test_run cannot show what XDP saves beyond its own run (no skb, no stack).\n",
    );
    if !r.live_costs.is_empty() {
        out.push_str(
            "\n## Live per-packet cost during the trials (bpf_stats)\n\n\
             | N | peer | round | program | packets | ns per packet |\n|---:|---|---:|---|---:|---:|\n",
        );
        for c in &r.live_costs {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} |",
                c.services, c.peer, c.round, c.program, c.packets, c.ns_per_packet
            );
        }
        out.push_str(
            "\nThe kernel's `run_time_ns / run_cnt` of the pod program over one peer's trials \
             (every pod interface runs the same program): real skbs, both directions, new and \
             established flows together, statistics on only while sampled (`BPF_ENABLE_STATS`). \
             `ours-stack` is the agent with `--fast-path off`.\n",
        );
    }
    if !r.failures.is_empty() {
        out.push_str("\n## Failures\n\n");
        for f in &r.failures {
            let first = f.lines().next().unwrap_or("");
            let _ = writeln!(out, "- {first}");
        }
    }
    let incomplete = |trials: &[Trial], what: &'static str| -> Vec<String> {
        trials
            .iter()
            .filter(|t| !t.complete)
            .map(|t| {
                format!(
                    "- N={} round {} {} {what}{}: {}/{} ok, errors {:?}",
                    t.services, t.round, t.peer, t.kind, t.ok, t.requested, t.errors
                )
            })
            .collect()
    };
    let mut failed = incomplete(&r.trials, "");
    failed.extend(incomplete(&r.nodeport_trials, "NodePort "));
    let streams = r.throughput.iter().filter(|t| !t.complete).map(|t| {
        format!(
            "- N={} round {} {} tcp-stream: {}",
            t.services,
            t.round,
            t.peer,
            t.error.as_deref().unwrap_or("incomplete")
        )
    });
    let failed: Vec<String> = failed.into_iter().chain(streams).collect();
    if !failed.is_empty() {
        out.push_str("\n## Incomplete trials (excluded)\n\n");
        out.push_str(&failed.join("\n"));
        out.push('\n');
    }
    out
}

fn rate_cells(x: Option<&KindSummary>) -> String {
    match x {
        None => "— | — | — | —".into(),
        Some(x) => format!(
            "{} | {} | {} | {}",
            opt(x.rate, |v| format!("{v:.0}")),
            opt(x.ratio_to_direct, |v| format!("{v:.2}")),
            opt(x.p50_us, |v| format!("{v:.0} µs")),
            opt(x.p99_us, |v| format!("{v:.0} µs")),
        ),
    }
}

fn request_response_table(r: &Results) -> String {
    let kinds = kind_summaries(r);
    let streams = stream_summaries(r);
    let mut out = String::from(
        "## Request/response and throughput (median over complete rounds)\n\n\
         | N | peer | TCP session req/s | vs direct | p50 | p99 | UDP session req/s | vs direct | p50 | p99 | UDP new-socket req/s | vs direct | p50 | p99 | TCP stream | vs direct | complete rounds (tcp-s/udp-s/udp-n/stream) |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for &n in &r.settings.service_counts {
        for peer in Peer::ALL {
            let get = |k: Kind| {
                kinds
                    .iter()
                    .find(|x| x.kind == k && x.peer == peer && x.services == n)
            };
            let stream = streams.iter().find(|x| x.peer == peer && x.services == n);
            if get(Kind::TcpSession).is_none() && stream.is_none() {
                continue;
            }
            let complete = |x: Option<&KindSummary>| {
                x.map_or("—".into(), |x| {
                    format!("{}/{}", x.complete_rounds, x.rounds)
                })
            };
            let _ = writeln!(
                out,
                "| {n} | {peer} | {} | {} | {} | {} | {} | {} · {} · {} · {} |",
                rate_cells(get(Kind::TcpSession)),
                rate_cells(get(Kind::UdpSession)),
                rate_cells(get(Kind::UdpNewSocket)),
                opt(stream.and_then(|s| s.gbit_per_s), |v| format!(
                    "{v:.2} Gbit/s"
                )),
                opt(stream.and_then(|s| s.ratio_to_direct), |v| format!(
                    "{v:.2}"
                )),
                complete(get(Kind::TcpSession)),
                complete(get(Kind::UdpSession)),
                complete(get(Kind::UdpNewSocket)),
                stream.map_or("—".into(), |s| format!(
                    "{}/{}",
                    s.complete_rounds, s.rounds
                )),
            );
        }
    }
    out.push_str(
        "\nTCP session: request/response exchanges on one persistent connection (connect not \
         timed). UDP session: exchanges on one connected socket (one flow). UDP new-socket: one \
         datagram and reply per new socket (a new flow each, like a resolver with random source \
         ports). A lost datagram is an error and makes the trial incomplete. TCP stream: one \
         iperf3 stream client → target (the target service's `iperf` port, whose one endpoint is \
         backend 0: iperf3's control and data connections must reach the same server), \
         receiver-side rate (with its sender's retransmits in the JSON); a stream counts only \
         if iperf3 ended without error and the server counted at least 99 % of the bytes sent \
         (iperf3 stops counting at the end of the test with data still in flight).\n\n",
    );
    out
}

/// [`Kind::TcpConnectAsIs`], ClusterIP and NodePort.
fn as_is_table(r: &Results) -> String {
    let (cluster_ip, nodeport) = (
        summaries(r, Kind::TcpConnectAsIs),
        nodeport_summaries(r, Kind::TcpConnectAsIs),
    );
    if cluster_ip.is_empty() && nodeport.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "## Connection rate as a user has it: no conntrack flush, the client's default port \
         range and TIME_WAIT (median over complete rounds)\n\n\
         | N | path | peer | conn/s | vs direct | p50 | p99 | complete rounds |\n\
         |---:|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (path, rows) in [("ClusterIP", cluster_ip), ("NodePort", nodeport)] {
        for x in rows {
            let mut cells = connection_cells(&x);
            cells.insert(1, path.to_string());
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
    }
    let s = &r.settings;
    let _ = write!(
        out,
        "\nThe same connection trial as the tables above and below (after each peer's other \
         trials in its turn), but with nothing flushed before it and the client's kernel values \
         of the sysctls the other trials set ({}): connect() then reuses local ports soon, \
         also for another destination, as a pod's does; a datapath that takes a reused port for \
         an old flow shows here as failed or 1 s-retried connections.\n\n",
        s.client_sysctls
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    out
}

fn nodeport_table(r: &Results) -> String {
    let rows = nodeport_summaries(r, Kind::TcpConnect);
    if rows.is_empty() {
        return String::new();
    }
    let s = &r.settings;
    let mut out = format!(
        "## NodePort: external client through another node (median over complete rounds)\n\n\
         Two-node cluster lab: the external client (192.168.50.100) connects to node 1's \
         192.168.50.11:nodePort; the Service's {} endpoints are all on node 0, so every \
         connection is forwarded across the fabric bridge and masqueraded to node 1's address \
         (externalTrafficPolicy Cluster). N services as above, of which the last \
         min(N, {}) are NodePort services with node ports 30000, 30001, … (the default \
         range holds no more; the rest stay ClusterIP-only, and their ClusterIP rules still \
         come first in kube-proxy's KUBE-SERVICES chain); the target is the last. {} rounds, \
         peers in random order, the same TCP connection trial as above (conntrack flushed on \
         both nodes before each, but the as-is one). `direct`: the backend pod's IP, routed through node 1 by a \
         route in the client added for this peer only, no NAT (its replies go from node 0 \
         straight to the client, one hop fewer than a masqueraded reply). `ours`: both \
         agents with `--node-interfaces eth0`{} (XDP in front of TC: the fabric takes native \
         XDP_TX frames as a NIC's wire would); `ours-tc`: the same with `--xdp-mode off`, the \
         TC node program alone; `program all N` = both agents started until \
         both printed `datapath programmed` (`agent took_us`: node 1's). iptables / nftables: \
         kube-proxy's NodePort rules (KUBE-NODEPORTS → KUBE-EXT-* → KUBE-MARK-MASQ + KUBE-SVC-*; \
         the `service-nodeports` verdict map) in node 1 only, loaded by one \
         `iptables-restore` / `nft -f`.\n\n\
         | N | peer | conn/s | vs direct | p50 | p99 | complete rounds | program all N | agent took_us | agent peak RSS (node 1) |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        s.backends,
        super::rules::MAX_NODE_PORTS,
        s.nodeport_rounds,
        if s.nodeport_agent_args.is_empty() {
            String::new()
        } else {
            format!(" `{}`", s.nodeport_agent_args.join(" "))
        },
    );
    for x in rows {
        let _ = writeln!(out, "{}", connection_row(&x, None));
    }
    out.push('\n');
    out
}

/// The cells every connection table starts with: N, peer, conn/s, vs
/// direct, p50, p99, complete rounds.
fn connection_cells(x: &Summary) -> Vec<String> {
    vec![
        x.services.to_string(),
        x.peer.to_string(),
        opt(x.rate, |v| format!("{v:.0}")),
        opt(x.ratio_to_direct, |v| format!("{v:.2}")),
        opt(x.p50_us, |v| format!("{v:.0} µs")),
        opt(x.p99_us, |v| format!("{v:.0} µs")),
        format!("{}/{}", x.complete_rounds, x.rounds),
    ]
}

/// One row of a connection table; `change` is the endpoint-change column,
/// where the table has one.
fn connection_row(x: &Summary, change: Option<String>) -> String {
    let mut cells = connection_cells(x);
    cells.extend([
        opt(x.load_wall_ms, duration_ms),
        opt(x.load_agent_took_us, |v| format!("{:.1} ms", v / 1e3)),
    ]);
    cells.extend(change);
    cells.push(opt(x.agent_peak_rss_kb, |v| {
        format!("{:.1} MiB", v / 1024.0)
    }));
    format!("| {} |", cells.join(" | "))
}

/// The control plane at scale, per N and source.
fn control_table(r: &Results) -> String {
    if r.control.is_empty() {
        return String::new();
    }
    let c = &r.settings.control;
    let mut out = String::from("## Control plane at scale (both sources)\n\n");
    out.push_str(
        "| N | source | programmed | last Service answers | sync took | agent peak RSS | RSS idle | pinned maps (kernel) | idle CPU | change → map write p50 | p99 | change → client p50 | p99 | switches |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mib =
        |kb: Option<u64>| kb.map_or("—".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    for x in &r.control {
        let event_ms: Vec<f64> = x.event_to_map_us.iter().map(|u| *u as f64 / 1e3).collect();
        let q = |v: &[f64], p: f64| quantile(v.iter().copied(), p).map_or("—".into(), duration_ms);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |",
            x.services,
            x.source.map_or("?", |s| s.name()),
            opt(x.programmed_ms, duration_ms),
            opt(x.last_answer_ms, duration_ms),
            opt(x.agent_took_us.map(|u| u as f64 / 1e3), duration_ms),
            mib(x.peak_rss_kb),
            mib(x.rss_kb),
            mib(x.map_memlock_bytes.map(|b| b / 1024)),
            x.idle_cpu_percent
                .map_or("—".into(), |p| format!("{p:.2} %")),
            q(&event_ms, 0.5),
            q(&event_ms, 0.99),
            q(&x.seen_by_client_ms, 0.5),
            q(&x.seen_by_client_ms, 0.99),
            x.seen_by_client_ms.len(),
            c.switches,
        );
    }
    let _ = writeln!(
        out,
        "\nThe agent alone in the lab with N Services (port 80/TCP, 3 endpoints each) from \
         manifest files of 500 Services (`manifests`) or from the fake API server (`api`: list in pages of 500 and \
         watch, objects as an API server stores them: uid, timestamps, managedFields, the \
         last-applied annotation, the slices' ownerReferences and targetRefs). `programmed`: \
         agent start until its first `datapath programmed` line; `last Service answers`: until a \
         client's first answer from the last Service; `pinned maps (kernel)`: the sum of \
         `bytes_memlock` of the agent's pinned maps (`bpftool map show`); `idle CPU`: user + \
         system time over {} s with no change, in percent of one core; `RSS idle`: VmRSS after \
         that. Then {} endpoint switches of the last Service (alternately to the spare backend \
         and back): `change → map write` is the agent's own `since_event_us` (the change \
         reaching its source — inotify, or the watch event — to its last map write, what \
         `kep_network_programming_duration_seconds` observes); `change → client` from the \
         manifest write or the slice's apply to the API server to a client's first answer from \
         a new endpoint (a probe on a new connection every ~1 ms).\n",
        c.idle_s, c.switches
    );
    out
}

fn switch_table(r: &Results) -> String {
    let rows = switch_summaries(r);
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "## Endpoint switch seen by a client\n\n\
         | peer | N | switches | first answer from a new backend: median | p99 | only new backends from: median | p99 | peer done (median) | probes failed | old answers after first new |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for x in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
            x.peer,
            x.services,
            x.switched,
            x.switches,
            opt(x.first_new_median_ms, duration_ms),
            opt(x.first_new_p99_ms, duration_ms),
            opt(x.settled_median_ms, duration_ms),
            opt(x.settled_p99_ms, duration_ms),
            opt(x.programmed_median_ms, duration_ms),
            x.probes_failed,
            x.old_after_first_new,
        );
    }
    let _ = write!(
        out,
        "\nA prober in the client makes one TCP request on a new connection to the service every \
         ~1 ms while the target service's endpoints are replaced by backends it did not have \
         (alternately the spare backend alone and the original three). Time from the change \
         (ours: the manifest write, so including the agent's poll interval; iptables/nftables: the \
         start of the full `iptables-restore` / `nft -f` re-sync) to the first reply from a new \
         backend, and to the first answer after which only new backends answered (the prober \
         stops after {} of those in a row). The two differ when connections still reach old \
         backends after the change, e.g. a new connection from a reused source port that matches \
         a stale conntrack entry. `peer done`: until the agent's `datapath programmed` line, or \
         the command returned. `switches` = switched / attempted.\n\n",
        r.settings.switch.confirm
    );
    out
}

/// Writes `<stem>.md`, `<stem>.json` and `<stem>.svg` into `dir`.
pub fn write_all(r: &Results, dir: &Path, stem: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    };
    write(&format!("{stem}.md"), &markdown(r))?;
    #[derive(Serialize)]
    struct Json<'a> {
        #[serde(flatten)]
        results: &'a Results,
        summaries: Vec<Summary>,
        as_is_summaries: Vec<Summary>,
        kind_summaries: Vec<KindSummary>,
        stream_summaries: Vec<StreamSummary>,
        switch_summaries: Vec<SwitchSummary>,
        nodeport_summaries: Vec<Summary>,
        nodeport_as_is_summaries: Vec<Summary>,
    }
    let json = serde_json::to_string(&Json {
        results: r,
        summaries: summaries(r, Kind::TcpConnect),
        as_is_summaries: summaries(r, Kind::TcpConnectAsIs),
        kind_summaries: kind_summaries(r),
        stream_summaries: stream_summaries(r),
        switch_summaries: switch_summaries(r),
        nodeport_summaries: nodeport_summaries(r, Kind::TcpConnect),
        nodeport_as_is_summaries: nodeport_summaries(r, Kind::TcpConnectAsIs),
    })?;
    write(&format!("{stem}.json"), &json)?;
    write(
        &format!("{stem}.svg"),
        &super::chart::svg(
            &summaries(r, Kind::TcpConnect),
            &kind_summaries(r),
            &stream_summaries(r),
        ),
    )?;
    Ok(())
}
