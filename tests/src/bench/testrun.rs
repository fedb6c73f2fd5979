//! Per-packet cost of the TC program, measured with BPF_PROG_TEST_RUN: the
//! kernel runs the program `repeat` times on one packet and reports the mean
//! time per run. The maps hold the benchmark's N services, loaded the way
//! the agent loads them (manifest -> model -> encoder -> diff -> apply).
//!
//! The kernel's repeat loop runs the program again on the same, already
//! rewritten, packet, and a "new flow" cannot be repeated at all. So each
//! case is timed as single runs (one BPF_PROG_TEST_RUN call each, which
//! starts from the original packet; the kernel's timer overhead is
//! included), and the packet the program leaves alone also with a repeat
//! loop. Cases: an established flow (conntrack hit, DNAT), a new flow (a
//! SYN to the service from a source port never seen: service lookup,
//! endpoint pick, conntrack entry created, DNAT — every call a distinct
//! packet, so every call is a conntrack miss), a packet to no service (a
//! SYN to a pod IP on a port no Service uses: untracked), a connection
//! straight to an endpoint (tracked untranslated so no Service flow takes
//! its tuple: a conntrack hit after the first call), a service without
//! endpoints (REJECT reply). The egress program is timed on a forwarded
//! packet (it returns at once) and on one the node itself sends to a pod,
//! of no flow.
//!
//! A single run's time includes the harness (skb setup, two clock reads):
//! the pod-IP packet timed both ways gives that overhead (single run minus
//! repeat-loop mean), and it is subtracted from the established and new
//! flow medians for an estimate of the program's own cost.
//!
//! The node programs are timed too, on a NodePort whose endpoint is behind
//! another node, from inside a [`FibNode`] namespace (their FIB lookups need
//! a node's routes): the XDP fast path opening a flow and sending an
//! established one back out (`XDP_TX`), and the TC node program doing the
//! same established packet by FIB redirect, what it does when XDP is off.
//! XDP's own harness overhead is measured the same way, with a packet it
//! passes.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use proxy_common::proto;
use proxy_userspace::contents::MapContents;
use proxy_userspace::datapath::{Datapath, DatapathConfig, Hooks, unpin_all};
use proxy_userspace::encode::Encoder;
use proxy_userspace::{diff, model, source::manifests};
use serde::Serialize;

use super::rules::{self, BenchService};
use crate::fib_node::{self, FibNode};
use crate::{addr, yaml};

/// ClusterIP of the extra service with no endpoints (REJECT path).
pub const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 200);
/// The extra NodePort Service (endpoint: backend 0, behind the other node
/// of the [`FibNode`]).
const NODEPORT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 201);
const NODE_PORT: u16 = 30080;

/// One packet kind's cost.
#[derive(Debug, Clone, Serialize)]
pub struct PacketCost {
    pub case: String,
    /// `1 run per call` (kernel-timed single runs, timer overhead included)
    /// or `mean of R repeats` (one sample per BPF_PROG_TEST_RUN call).
    pub method: String,
    pub services: usize,
    pub repeat: u32,
    /// Program return value (TC action).
    pub verdict: u32,
    /// The output packet, summarised (`src -> dst`, IP protocol).
    pub output: String,
    /// ns per run, one per BPF_PROG_TEST_RUN call.
    pub samples_ns: Vec<f64>,
    pub min_ns: f64,
    pub median_ns: f64,
    /// For the net rows: what was subtracted from every sample.
    pub harness_overhead_ns: Option<f64>,
}

/// A datapath pinned under `/sys/fs/bpf/kep-bench-<pid>-<n>`, unpinned on drop.
struct Fixture {
    dp: Datapath,
    hooks: Hooks,
    pin_dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = unpin_all(&self.pin_dir) {
            eprintln!("bench: unpinning {}: {e}", self.pin_dir.display());
        }
    }
}

fn load(services: &[BenchService], tag: usize) -> Result<Fixture> {
    crate::agent::ensure_bpffs()?;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/kep-bench-{}-{tag}",
        std::process::id()
    ));
    let _ = unpin_all(&pin_dir);
    let (dp, _, hooks) =
        Datapath::load(&DatapathConfig::new(&pin_dir)).context("load the eBPF datapath")?;
    let mut fx = Fixture { dp, hooks, pin_dir };

    let dir = std::env::temp_dir().join(format!("kep-bench-{}-testrun-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut text = rules::manifest(services);
    text.push_str("---\n");
    text.push_str(&yaml::service(
        "bench-empty",
        &EMPTY_VIP.to_string(),
        &[("http", rules::SERVICE_PORT, "TCP", "8080")],
        "nothing",
    ));
    text.push_str("---\n");
    text.push_str(
        &yaml::service(
            "bench-nodeport",
            &NODEPORT_VIP.to_string(),
            &[("http", rules::SERVICE_PORT, "TCP", "8080")],
            "bench-nodeport",
        )
        .replace("type: ClusterIP", "type: NodePort"),
    );
    text.push_str(&format!("    nodePort: {NODE_PORT}\n---\n"));
    text.push_str(&yaml::endpoint_slice(
        "bench-nodeport-1",
        "bench-nodeport",
        &[("http", rules::TARGET_PORT, "TCP")],
        &[(addr::backend_ip(0), "nodeport-backend".into(), true)],
    ));
    std::fs::write(dir.join("services.yaml"), text)?;
    let (objects, warnings) = manifests::load_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if !warnings.is_empty() {
        bail!(
            "manifest warnings: {:?}",
            &warnings[..warnings.len().min(3)]
        );
    }
    let node = model::NodeInfo {
        addresses: vec![fib_node::NODE.into()],
        ..model::NodeInfo::default()
    };
    let (desired, _) = model::compute(&objects.services, &objects.slices, &node);
    let contents = Encoder::new().encode(&desired);
    let ops = diff::diff(&MapContents::default(), &contents);
    let failed = fx.dp.apply(&ops);
    if !failed.is_empty() {
        bail!("{} of {} map writes failed", failed.len(), ops.len());
    }
    fx.dp.set_node_addr(Some(fib_node::NODE))?;
    Ok(fx)
}

/// Which program a packet is fed to.
#[derive(Clone, Copy)]
enum Hook {
    /// `kep_tc_ingress`, no ingress interface.
    Pod,
    /// `kep_tc_node`, arriving on interface `ifindex` of the calling
    /// thread's namespace.
    TcNode { ifindex: u32 },
    /// `kep_xdp_node`, likewise.
    Xdp { ifindex: u32 },
    /// `kep_tc_egress`, the skb from interface `ingress_ifindex` (0: sent
    /// by the node itself).
    Egress { ingress_ifindex: u32 },
}

impl Fixture {
    /// Runs `packet` `repeat` times through the pod program; returns
    /// (verdict, mean time per run, output summary).
    fn run(&mut self, packet: &[u8], repeat: u32) -> Result<(u32, Duration, String)> {
        self.run_on(Hook::Pod, packet, repeat)
    }

    fn run_on(
        &mut self,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration, String)> {
        let mut out = vec![0u8; 4096];
        // struct __sk_buff up to `ifindex` (`ingress_ifindex` at 36), or
        // struct xdp_md (data, data_end, data_meta, ingress_ifindex, ...).
        let skb = |ingress_ifindex: u32, ifindex: u32| {
            let mut c = vec![0u8; 44];
            c[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
            c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
            c
        };
        let ctx: Vec<u8> = match hook {
            Hook::Pod | Hook::Egress { ingress_ifindex: 0 } => Vec::new(),
            Hook::TcNode { ifindex } => skb(ifindex, ifindex),
            Hook::Egress { ingress_ifindex } => skb(ingress_ifindex, 0),
            Hook::Xdp { ifindex } => [0, packet.len() as u32, 0, ifindex, 0, 0]
                .iter()
                .flat_map(|w: &u32| w.to_ne_bytes())
                .collect(),
        };
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: (!ctx.is_empty()).then_some(&ctx[..]),
            repeat,
            ..TestRunOptions::new()
        };
        let res = match hook {
            Hook::Pod => self.hooks.classifier().test_run(opts),
            Hook::TcNode { .. } => self
                .hooks
                .hook_program(proxy_userspace::datapath::Hook::Node)
                .test_run(opts),
            Hook::Xdp { .. } => self.hooks.xdp_program().test_run(opts),
            Hook::Egress { .. } => self.hooks.egress_program().test_run(opts),
        }
        .map_err(|e| anyhow::anyhow!("BPF_PROG_TEST_RUN: {e:?}"))?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, res.duration, summarise(&out)))
    }
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn csum(sum: u32) -> u16 {
    let mut s = sum;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Ethernet + IPv4 + TCP with `flags` and a 6-byte payload, valid checksums.
pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    const ETH: usize = 14;
    let payload = b"hello\n";
    let l4_len = 20 + payload.len();
    let mut p = Vec::with_capacity(ETH + 20 + l4_len);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa, 0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto::TCP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ipc = csum(sum16(&p[ETH..ETH + 20]));
    p[ETH + 10..ETH + 12].copy_from_slice(&ipc.to_be_bytes());
    let l4 = p.len();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    let pseudo =
        sum16(&src.octets()) + sum16(&dst.octets()) + u32::from(proto::TCP) + l4_len as u32;
    let c = csum(pseudo + sum16(&p[l4..]));
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    p
}

/// `src:sport -> dst:dport proto P` of an Ethernet + IPv4 packet.
fn summarise(p: &[u8]) -> String {
    if p.len() < 38 {
        return format!("{} bytes", p.len());
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let l4 = 14 + usize::from(p[14] & 0x0f) * 4;
    let port = |o: usize| u16::from_be_bytes([p[l4 + o], p[l4 + o + 1]]);
    match p[23] {
        proto::TCP | proto::UDP if p.len() >= l4 + 4 => format!(
            "{}:{} -> {}:{} proto {}",
            ip(26),
            port(0),
            ip(30),
            port(2),
            p[23]
        ),
        other => format!("{} -> {} proto {other}", ip(26), ip(30)),
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { 0.0 } else { s[s.len() / 2] }
}

fn cost(
    case: &str,
    method: &str,
    n: usize,
    repeat: u32,
    verdict: u32,
    output: String,
    samples: Vec<f64>,
) -> PacketCost {
    PacketCost {
        case: case.to_string(),
        method: method.to_string(),
        services: n,
        repeat,
        verdict,
        output,
        min_ns: samples.iter().copied().fold(f64::INFINITY, f64::min),
        median_ns: median(&samples),
        samples_ns: samples,
        harness_overhead_ns: None,
    }
}

/// Costs at `n` services (target = the last): `batches` runs of `repeat`.
pub fn measure(n: usize, backends: usize, repeat: u32, batches: usize) -> Result<Vec<PacketCost>> {
    let services = rules::services(n, backends);
    let target = services.last().context("no services")?.vip;
    let mut fx = load(&services, n)?;
    let client = addr::CLIENT_IP;
    // Open the flow: a SYN creates the conntrack entry, the ACK then hits it.
    let (v, _, _) = fx.run(
        &tcp_packet(client, target, 40_000, rules::SERVICE_PORT, SYN),
        1,
    )?;
    if v == 2 {
        bail!("the SYN to {target} was dropped (verdict {v})");
    }
    let cases = [
        (
            ESTABLISHED,
            tcp_packet(client, target, 40_000, rules::SERVICE_PORT, ACK),
        ),
        (
            NOT_A_SERVICE,
            tcp_packet(client, addr::backend_ip(0), 40_001, NOT_SERVED_PORT, SYN),
        ),
        (
            DIRECT,
            tcp_packet(client, addr::backend_ip(0), 40_003, rules::TARGET_PORT, SYN),
        ),
        (
            REJECT,
            tcp_packet(client, EMPTY_VIP, 40_002, rules::SERVICE_PORT, SYN),
        ),
    ];
    let mut out = Vec::new();
    let node_own = addr::backend_gw(0);
    let hooked = cases
        .into_iter()
        .map(|(case, packet)| (case, Hook::Pod, packet));
    let egress = [
        (
            EGRESS_FORWARDED,
            Hook::Egress { ingress_ifindex: 1 },
            tcp_packet(client, addr::backend_ip(0), 40_001, NOT_SERVED_PORT, ACK),
        ),
        (
            EGRESS_OWN,
            Hook::Egress { ingress_ifindex: 0 },
            tcp_packet(node_own, addr::backend_ip(0), 40_004, NOT_SERVED_PORT, ACK),
        ),
    ];
    for (case, hook, packet) in hooked.chain(egress) {
        // One run per call: every call starts from the original packet.
        let calls = batches * 1_000;
        let mut single = Vec::with_capacity(calls);
        let mut verdict = 0;
        let mut output = String::new();
        for i in 0..calls {
            // REJECT answers are rate-limited per client (as the kernel's
            // ICMP errors): every call comes from a client of its own, so
            // every call is answered.
            let packet = if case == REJECT {
                let client = Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250) as u8 + 1);
                tcp_packet(client, EMPTY_VIP, 40_002, rules::SERVICE_PORT, SYN)
            } else {
                packet.clone()
            };
            let (v, d, o) = fx.run_on(hook, &packet, 1)?;
            verdict = v;
            output = o;
            single.push(d.as_nanos() as f64);
        }
        out.push(cost(case, SINGLE, n, 1, verdict, output, single));
        // The kernel repeats on the same skb, so a rewritten packet would be
        // measured rewritten: only a packet the program leaves alone gives
        // a clean repeat loop.
        if [NOT_A_SERVICE, DIRECT, EGRESS_FORWARDED, EGRESS_OWN].contains(&case) {
            let mut batched = Vec::with_capacity(batches);
            let mut last = (0, String::new());
            for _ in 0..batches {
                let (v, d, o) = fx.run_on(hook, &packet, repeat)?;
                last = (v, o);
                batched.push(d.as_nanos() as f64);
            }
            let method = format!("mean of {repeat} repeats");
            out.push(cost(case, &method, n, repeat, last.0, last.1, batched));
        }
    }
    out.push(new_flows(&mut fx, n, target, batches * 1_000)?);
    out.extend(net_of_harness(&out, n));
    let node = FibNode::new()?;
    let mut node_costs = node
        .ns
        .try_run(|| node_programs(&mut fx, &node, n, repeat, batches * 1_000))??;
    out.append(&mut node_costs);
    Ok(out)
}

const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_NOT_A_SERVICE: &str = "XDP: not a service (passed)";
const XDP_ESTABLISHED: &str = "XDP: NodePort, endpoint on another node, established (XDP_TX)";
const XDP_NEW_FLOW: &str = "XDP: NodePort, endpoint on another node, new flow (XDP_TX)";
const TC_NODE_ESTABLISHED: &str =
    "TC node: NodePort, endpoint on another node, established (FIB redirect)";

/// The node programs on NodePort packets, run inside `node`'s namespace.
fn node_programs(
    fx: &mut Fixture,
    node: &FibNode,
    n: usize,
    repeat: u32,
    calls: usize,
) -> Result<Vec<PacketCost>> {
    let xdp = Hook::Xdp { ifindex: node.eth0 };
    let tc = Hook::TcNode { ifindex: node.eth0 };
    let client = fib_node::EXT_CLIENT;
    let to_nodeport =
        |sport: u16, flags: u8| tcp_packet(client, fib_node::NODE, sport, NODE_PORT, flags);
    let (v, _, o) = fx.run_on(xdp, &to_nodeport(40_000, SYN), 1)?;
    if v != XDP_TX {
        bail!("XDP did not send the NodePort SYN back out: verdict {v}, output {o}");
    }
    let mut out = Vec::new();
    for (case, hook, packet, expect) in [
        (
            XDP_NOT_A_SERVICE,
            xdp,
            tcp_packet(client, fib_node::NODE, 40_001, 22, SYN),
            XDP_PASS,
        ),
        (XDP_ESTABLISHED, xdp, to_nodeport(40_000, ACK), XDP_TX),
        (
            TC_NODE_ESTABLISHED,
            tc,
            to_nodeport(40_000, ACK),
            TC_ACT_REDIRECT,
        ),
    ] {
        let mut single = Vec::with_capacity(calls);
        let mut output = String::new();
        for _ in 0..calls {
            let (v, d, o) = fx.run_on(hook, &packet, 1)?;
            if v != expect {
                bail!("{case}: verdict {v}, expected {expect} (output {o})");
            }
            output = o;
            single.push(d.as_nanos() as f64);
        }
        out.push(cost(case, SINGLE, n, 1, expect, output.clone(), single));
        if case == XDP_NOT_A_SERVICE {
            let mut batched = Vec::with_capacity(calls / 1_000);
            for _ in 0..(calls / 1_000).max(1) {
                let (_, d, _) = fx.run_on(hook, &packet, repeat)?;
                batched.push(d.as_nanos() as f64);
            }
            let method = format!("mean of {repeat} repeats");
            out.push(cost(case, &method, n, repeat, expect, output, batched));
        }
    }
    let mut samples = Vec::with_capacity(calls);
    let mut output = String::new();
    for i in 0..calls.min(30_000) {
        let (v, d, o) = fx.run_on(xdp, &to_nodeport(1_024 + i as u16, SYN), 1)?;
        if v != XDP_TX {
            bail!("XDP new flow {i}: verdict {v}, output {o}");
        }
        output = o;
        samples.push(d.as_nanos() as f64);
    }
    out.push(cost(XDP_NEW_FLOW, SINGLE, n, 1, XDP_TX, output, samples));
    out.extend(net_of(
        &out,
        n,
        XDP_NOT_A_SERVICE,
        &[XDP_ESTABLISHED, XDP_NEW_FLOW],
    ));
    Ok(out)
}

const SINGLE: &str = "1 run per call";
const NOT_A_SERVICE: &str = "not a service (pod IP)";
/// A pod port no bench Service targets (its packets stay untracked).
const NOT_SERVED_PORT: u16 = 9999;
const DIRECT: &str = "straight to an endpoint (tracked, untranslated)";
const EGRESS_FORWARDED: &str = "egress: forwarded packet (returns at once)";
const EGRESS_OWN: &str = "egress: the node's own packet, no flow";
const ESTABLISHED: &str = "established flow (conntrack hit)";
const REJECT: &str = "service without endpoints (REJECT, a client's first)";
const NEW_FLOW: &str = "new flow (service hit, conntrack miss)";
const NET: &str = "1 run per call − harness overhead";

/// `calls` SYNs to the service, each from a source port not used before
/// (1024, 1025, ...; the other cases use 40000-40002), so each is a
/// conntrack miss that creates an entry. Every one must be translated to a
/// backend.
fn new_flows(fx: &mut Fixture, n: usize, target: Ipv4Addr, calls: usize) -> Result<PacketCost> {
    if calls > 30_000 {
        bail!("{calls} new flows would reuse source ports");
    }
    let client = addr::CLIENT_IP;
    let mut samples = Vec::with_capacity(calls);
    let mut verdict = 0;
    let mut output = String::new();
    for i in 0..calls {
        let sport = 1_024 + i as u16;
        let packet = tcp_packet(client, target, sport, rules::SERVICE_PORT, SYN);
        let (v, d, o) = fx.run(&packet, 1)?;
        if v != 0 || !o.contains(":8080 proto 6") || o.contains(&target.to_string()) {
            bail!("new flow {i} (sport {sport}) not translated: verdict {v}, output {o}");
        }
        verdict = v;
        output = o;
        samples.push(d.as_nanos() as f64);
    }
    Ok(cost(NEW_FLOW, SINGLE, n, 1, verdict, output, samples))
}

/// The established and new-flow single runs with the harness overhead
/// (pod-IP single-run median minus its repeat-loop median) subtracted.
fn net_of_harness(costs: &[PacketCost], n: usize) -> Vec<PacketCost> {
    net_of(costs, n, NOT_A_SERVICE, &[ESTABLISHED, NEW_FLOW])
}

/// The single runs of `cases` less the harness overhead: the single-run
/// median of `untouched` (a packet the program passes) minus its
/// repeat-loop median.
fn net_of(costs: &[PacketCost], n: usize, untouched: &str, cases: &[&str]) -> Vec<PacketCost> {
    let find = |case: &str, single: bool| {
        costs
            .iter()
            .find(|c| c.case == case && (c.method == SINGLE) == single)
    };
    let (Some(pass_single), Some(pass_loop)) = (find(untouched, true), find(untouched, false))
    else {
        return Vec::new();
    };
    let overhead = pass_single.median_ns - pass_loop.median_ns;
    cases
        .iter()
        .filter_map(|case| find(case, true))
        .map(|c| {
            let samples = c.samples_ns.iter().map(|v| v - overhead).collect();
            let mut net = cost(&c.case, NET, n, 1, c.verdict, c.output.clone(), samples);
            net.harness_overhead_ns = Some(overhead);
            net
        })
        .collect()
}
