//! kube-ebpf-proxy datapath.
//!
//! `kep_tc_ingress` runs at TC ingress of every pod-facing interface of a
//! node, `kep_tc_node` at TC ingress of the node's own interfaces. Every
//! packet enters the node through one of them, so together they see both
//! directions of every flow: they DNAT client -> VIP:port to a backend
//! before the node routes the packet, and reverse-translate backend ->
//! client replies back to VIP:port, whichever interface those come in on
//! (a reply from an endpoint on another node arrives on a node interface).
//! Traffic from a node interface uses a frontend's external entry: only
//! local endpoints for externalTrafficPolicy Local, masquerade to the node's
//! address for Cluster, loadBalancerSourceRanges.
//!
//! What is deliberately passed untouched (documented in the README):
//! - anything that is not IPv4 TCP/UDP, including ICMP: ICMP errors about a
//!   translated flow are not rewritten (the embedded header still carries the
//!   backend address), exactly like traffic that matches no service;
//! - IP fragments (non-zero offset or more-fragments set): only the first
//!   fragment carries ports, so translating it alone would split the datagram
//!   between two destinations; fragmented service traffic is not supported;
//! - packets too short for the headers they announce.
#![no_std]
#![no_main]

mod csum;
mod lb;
mod maps;
mod reject;
mod sock;
mod xdp;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
        TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    CT_FLAG_CLOSING, CT_FLAG_REDIRECT, CT_FLAG_REPLY, CT_FLAG_SNAT, Config, CtKey, CtValue, maglev,
    proto, stat,
};

use crate::maps::{BACKENDS, CONNTRACK, account, config, count};

const ETH_HLEN: usize = 14;
const AF_INET: u8 = 2;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// More-fragments flag and fragment offset bits of `frag_off`.
const IP_FRAG_MASK: u16 = 0x3fff;
/// `BPF_F_MARK_MANGLED_0`: a zero UDP checksum means "no checksum" and must
/// stay zero; the kernel skips the update and maps a computed 0 to 0xffff.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Where a packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// From a pod (its veth).
    Pod,
    /// From outside the node (a node interface).
    Node,
}

#[classifier]
pub fn kep_tc_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Pod)
}

#[classifier]
pub fn kep_tc_node(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Node)
}

/// What to do with a packet once [`try_ingress`] has returned: REJECT is
/// sent from here, outside its stack frame, so the two frames never add up
/// past the verifier's 512 bytes.
enum Verdict {
    Act(i32),
    Reject { proto: u8, l4_off: usize },
}

#[inline(always)]
fn run(ctx: &TcContext, origin: Origin) -> i32 {
    match try_ingress(ctx, origin) {
        Ok(Verdict::Act(verdict)) => verdict,
        Ok(Verdict::Reject { proto, l4_off }) => reject(ctx, proto, l4_off),
        Err(()) => TC_ACT_OK,
    }
}

/// Source ports tried for a masqueraded flow whose own port is taken on the
/// node address (another client used it towards the same endpoint).
const SNAT_PORT_TRIES: u32 = 4;
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_SPAN: u32 = 28_000;

/// The parsed 5-tuple and where its L4 header starts.
struct Flow {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ...); 0 for UDP.
    tcp_flags: u8,
    ttl: u8,
    l4_off: usize,
}

impl Flow {
    fn key(&self) -> CtKey {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    /// Offset of the L4 checksum field.
    fn csum_off(&self) -> usize {
        self.l4_off + if self.proto == proto::TCP { 16 } else { 6 }
    }

    fn l4_csum_flags(&self) -> u64 {
        if self.proto == proto::UDP {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        }
    }
}

/// The packet bounds both hooks give, so parsing is written once.
trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

macro_rules! packet {
    ($($context:ty),*) => {$(
        impl Packet for $context {
            #[inline(always)]
            fn start(&self) -> usize {
                self.data()
            }
            #[inline(always)]
            fn end(&self) -> usize {
                self.data_end()
            }
        }
    )*};
}
packet!(TcContext, XdpContext);

#[inline(always)]
fn ptr_at<C: Packet, T>(ctx: &C, off: usize) -> Result<*mut T, ()> {
    let start = ctx.start();
    if start + off + core::mem::size_of::<T>() > ctx.end() {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// Parses Ethernet/IPv4/TCP|UDP. `Ok(None)` means "not ours, pass".
#[inline(always)]
fn parse<C: Packet>(ctx: &C) -> Result<Option<Flow>, ()> {
    let ether_type = unsafe { *ptr_at::<_, u16>(ctx, 12)? };
    if ether_type != ETH_P_IP_BE {
        return Ok(None);
    }
    let ip = ptr_at::<_, network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN)?;
    let (vihl, l4proto, frags, src, dst, ttl) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            (*ip).frags,
            (*ip).src_addr,
            (*ip).dst_addr,
            (*ip).ttl,
        )
    };
    if l4proto != proto::TCP && l4proto != proto::UDP {
        return Ok(None);
    }
    if u16::from_be_bytes(frags) & IP_FRAG_MASK != 0 {
        return Ok(None);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Ok(None);
    }
    let l4_off = ETH_HLEN + ihl;
    // Ports are the first four bytes of both TCP and UDP; the whole fixed
    // header (with the checksum) must be present before anything is
    // rewritten.
    let ports = ptr_at::<_, [u16; 2]>(ctx, l4_off)?;
    let hdr_end = l4_off + if l4proto == proto::TCP { 20 } else { 8 };
    if ctx.start() + hdr_end > ctx.end() {
        return Err(());
    }
    let [sport, dport] = unsafe { *ports };
    let tcp_flags = if l4proto == proto::TCP {
        unsafe { *ptr_at::<_, u8>(ctx, l4_off + 13)? }
    } else {
        0
    };
    Ok(Some(Flow {
        saddr: u32::from_ne_bytes(src),
        daddr: u32::from_ne_bytes(dst),
        sport,
        dport,
        proto: l4proto,
        tcp_flags,
        ttl,
        l4_off,
    }))
}

#[inline(never)]
fn try_ingress(ctx: &TcContext, origin: Origin) -> Result<Verdict, ()> {
    let Some(flow) = parse(ctx)? else {
        return Ok(Verdict::Act(TC_ACT_OK));
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let cfg = config();
    if let Some((entry, ct)) = live_entry(&flow, cfg, now) {
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && !ct.is_closing() {
            mark_closing(entry, &ct, &flow);
        }
        if let Some(verdict) = established(ctx, &flow, entry, &ct, now)? {
            return Ok(Verdict::Act(verdict));
        }
        // The backend this flow used is gone: choose again below, as a new
        // flow, instead of sending it to an address that no longer serves.
    }
    match open_flow(&flow, origin, cfg, now) {
        Opened::Flow(forward) => {
            translate(ctx, &flow, &translated(&flow, &forward))?;
            account(forward.svc_id, forward.backend_id, ctx.len());
            Ok(Verdict::Act(out(ctx, &forward)))
        }
        Opened::Pass => Ok(Verdict::Act(TC_ACT_OK)),
        Opened::Drop => Ok(Verdict::Act(TC_ACT_SHOT)),
        Opened::Reject => Ok(Verdict::Reject {
            proto: flow.proto,
            l4_off: flow.l4_off,
        }),
    }
}

/// The flow's conntrack entry while it stands. An idle flow is over: a new
/// one on the same tuple is chosen anew, and a late reply is not
/// translated. A client opening a new connection on the tuple of one that
/// is closing (ports are reused quickly) also starts a new flow, balanced
/// afresh, as netfilter does for a SYN in TIME_WAIT; otherwise it would keep
/// an endpoint the Service may no longer have chosen.
#[inline(always)]
fn live_entry(flow: &Flow, cfg: Option<&Config>, now: u64) -> Option<(*mut CtValue, CtValue)> {
    let entry = CONNTRACK.get_ptr_mut(flow.key())?;
    let ct = unsafe { *entry };
    let expired = match cfg {
        Some(c) => ct.expired(&flow.key(), c, now),
        None => false,
    };
    let reopened =
        ct.is_closing() && !ct.is_reply() && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if expired || reopened {
        None
    } else {
        Some((entry, ct))
    }
}

/// What a packet without a live conntrack entry becomes.
enum Opened {
    /// A new flow: both conntrack entries are in; this is the forward one,
    /// which the packet is to be translated with.
    Flow(CtValue),
    Pass,
    Drop,
    Reject,
}

/// Chooses the endpoint of a new flow and writes its conntrack entries:
/// one decision, whichever hook (TC or XDP) sees the flow's first packet.
#[inline(always)]
fn open_flow(flow: &Flow, origin: Origin, cfg: Option<&Config>, now: u64) -> Opened {
    let hash = maglev::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    let (backend_id, backend, svc_id, masquerade, node_address) = match lb::choose(
        flow.daddr,
        flow.dport,
        flow.proto,
        flow.saddr,
        hash,
        origin == Origin::Node,
    ) {
        lb::Choice::Backend {
            id,
            backend,
            svc_id,
            masquerade,
            node_address,
        } => (id, backend, svc_id, masquerade, node_address),
        lb::Choice::Pass => return Opened::Pass,
        lb::Choice::Drop => return Opened::Drop,
        lb::Choice::Reject => return Opened::Reject,
    };

    // A pod that picked itself gets a source it does not own, so its reply
    // comes back through this node instead of being a martian to itself
    // (kube-proxy masquerades hairpin traffic for the same reason). An
    // external client of a Cluster-policy frontend gets the node's address,
    // so an endpoint on another node answers through this one.
    let snat_addr = match cfg {
        Some(c) if backend.addr == flow.saddr => c.hairpin_addr,
        Some(c) if masquerade => c.node_addr,
        _ => 0,
    };
    if masquerade && snat_addr == 0 {
        count(stat::SNAT_FAILED);
        return Opened::Drop;
    }
    let snat = snat_addr != 0;
    let mut flags = if snat { CT_FLAG_SNAT } else { 0 };
    if masquerade || node_address {
        flags |= CT_FLAG_REDIRECT;
    }

    // The reply entry goes in first: without it the backend's answer could not
    // be translated back, so a flow that cannot get one is not started.
    let reply_dst = if snat { snat_addr } else { flow.saddr };
    let mut snat_port = flow.sport;
    let mut reply_key = CtKey::new(backend.addr, reply_dst, backend.port, snat_port, flow.proto);
    if snat {
        // The translated source is shared (the node's or the hairpin
        // address): keep the client's port unless another flow to the same
        // endpoint holds it, then try a few others.
        let mut tries = 0;
        while let Some(held) = unsafe { CONNTRACK.get(reply_key) } {
            // Left by an earlier flow of this very client tuple (re-chosen
            // after expiry or a reopen): overwritten, not avoided.
            if held.snat_addr == flow.saddr && held.snat_port == flow.sport {
                break;
            }
            if tries == SNAT_PORT_TRIES {
                count(stat::SNAT_FAILED);
                return Opened::Drop;
            }
            let port = SNAT_PORT_MIN + (hash >> (tries * 4)) % SNAT_PORT_SPAN;
            snat_port = (port as u16).to_be();
            reply_key.dport = snat_port;
            tries += 1;
        }
    }
    let reply = CtValue {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        flags: CT_FLAG_REPLY | flags,
        _pad: 0,
        backend_id,
        svc_id,
        snat_addr: if snat { flow.saddr } else { 0 },
        snat_port: if snat { flow.sport } else { 0 },
        _pad2: 0,
        last_seen_ns: now,
    };
    if CONNTRACK.insert(reply_key, reply, 0).is_err() {
        count(stat::CT_INSERT_FAILED);
        return Opened::Drop;
    }
    let forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        snat_addr,
        snat_port: if snat { snat_port } else { 0 },
        ..reply
    };
    if CONNTRACK.insert(flow.key(), forward, 0).is_err() {
        // Still translated: this packet is fine, a later one re-chooses.
        count(stat::CT_INSERT_FAILED);
    }
    count(stat::NEW_FLOWS);
    Opened::Flow(forward)
}


/// A packet of a known flow: reverse-translate a reply, or translate
/// forward to the flow's backend while it exists (`None` otherwise).
#[inline(always)]
fn established(
    ctx: &TcContext,
    flow: &Flow,
    entry: *mut CtValue,
    ct: &CtValue,
    now: u64,
) -> Result<Option<i32>, ()> {
    if !ct.is_reply() && !backend_still_valid(ct) {
        return Ok(None);
    }
    unsafe { (*entry).last_seen_ns = now };
    translate(ctx, flow, &translated(flow, ct))?;
    count(if ct.is_reply() {
        stat::REPLY_HITS
    } else {
        stat::FORWARD_HITS
    });
    account(ct.svc_id, ct.backend_id, ctx.len());
    Ok(Some(out(ctx, ct)))
}

/// FIN or RST: both entries of the flow switch to the closing timeout, so a
/// closed connection's state goes soon instead of after a day.
#[inline(always)]
fn mark_closing(entry: *mut CtValue, ct: &CtValue, flow: &Flow) {
    unsafe { (*entry).flags |= CT_FLAG_CLOSING };
    let twin = translated(flow, ct).reversed(flow.proto);
    if let Some(other) = CONNTRACK.get_ptr_mut(twin) {
        unsafe { (*other).flags |= CT_FLAG_CLOSING };
    }
}

/// A flow's addresses and ports after translation, as stored in packets.
struct Tuple {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

impl Tuple {
    /// The key of the flow's entry for the other direction: the answer to
    /// a packet leaving as this tuple.
    #[inline(always)]
    fn reversed(&self, proto: u8) -> CtKey {
        CtKey::new(self.daddr, self.saddr, self.dport, self.sport, proto)
    }
}

/// What the conntrack entry `ct` makes of this packet of its flow: a reply
/// leaves from the frontend (and, with `CT_FLAG_SNAT`, goes to the client's
/// own address and port, which the forward direction hid); a forward packet
/// goes to the backend (from the translated source with `CT_FLAG_SNAT`).
/// The one definition both hooks translate by.
#[inline(always)]
fn translated(flow: &Flow, ct: &CtValue) -> Tuple {
    if ct.is_reply() {
        let (daddr, dport) = if ct.is_snat() {
            (ct.snat_addr, ct.snat_port)
        } else {
            (flow.daddr, flow.dport)
        };
        Tuple {
            saddr: ct.nat_addr,
            sport: ct.nat_port,
            daddr,
            dport,
        }
    } else {
        let (saddr, sport) = if ct.is_snat() {
            (ct.snat_addr, ct.snat_port)
        } else {
            (flow.saddr, flow.sport)
        };
        Tuple {
            saddr,
            sport,
            daddr: ct.nat_addr,
            dport: ct.nat_port,
        }
    }
}

/// Rewrites the packet to `to` (what is unchanged is left alone).
#[inline(always)]
fn translate(ctx: &TcContext, flow: &Flow, to: &Tuple) -> Result<(), ()> {
    rewrite(
        ctx, flow, IP_SRC_OFF, flow.saddr, to.saddr, 0, flow.sport, to.sport,
    )?;
    rewrite(
        ctx, flow, IP_DST_OFF, flow.daddr, to.daddr, 2, flow.dport, to.dport,
    )
}

/// The verdict for a translated packet of the flow `ct`: on to the stack,
/// or out directly where the stack would drop it.
#[inline(always)]
fn out(ctx: &TcContext, ct: &CtValue) -> i32 {
    if ct.redirects() {
        fib_redirect(ctx)
    } else {
        TC_ACT_OK
    }
}

/// Sends the (translated) packet out of the interface the FIB picks for its
/// destination, with that next hop's MAC addresses, skipping the stack's
/// source validation. Where the FIB cannot say, the stack gets the packet.
#[inline(never)]
fn fib_redirect(ctx: &TcContext) -> i32 {
    let Ok(ip) = ptr_at::<_, network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN) else {
        return TC_ACT_OK;
    };
    let (ttl, l4proto) = unsafe { ((*ip).ttl, (*ip).proto) };
    if ttl <= 1 {
        // The stack sends the ICMP time-exceeded a router owes.
        return TC_ACT_OK;
    }
    let (rc, params) = unsafe {
        fib_lookup(
            ctx,
            l4proto,
            u16::from_be_bytes((*ip).tot_len),
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            (*ctx.skb.skb).ingress_ifindex,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK;
    }
    // Forwarded past the stack, so the hop it would have counted is
    // counted here.
    let [old, new] = [ttl, ttl - 1].map(|t| u16::from_ne_bytes([t, l4proto]));
    if ctx
        .l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 2)
        .is_err()
        || ctx.store(IP_TTL_OFF, &(ttl - 1), 0).is_err()
    {
        return TC_ACT_SHOT;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The kernel resolves the neighbour and sends it on.
        return unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    if ctx.store(0, &params.dmac, 0).is_err() || ctx.store(6, &params.smac, 0).is_err() {
        return TC_ACT_SHOT;
    }
    unsafe { bpf_redirect(params.ifindex, 0) as i32 }
}

/// The FIB's answer for forwarding an IPv4 packet (`tot_len` bytes, `src`
/// to `dst`, protocol `proto`) that came in on `ifindex`: the return code
/// and the filled-in parameters (egress interface, MACs).
#[inline(always)]
fn fib_lookup<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    tot_len: u16,
    src: u32,
    dst: u32,
    ifindex: u32,
) -> (i64, bpf_fib_lookup) {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    params.ifindex = ifindex;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    (rc, params)
}

/// The one place REJECT is sent from, so the answer's buffers are on the
/// stack once (and never above [`try_ingress`]'s frame).
#[inline(never)]
fn reject(ctx: &TcContext, proto: u8, l4_off: usize) -> i32 {
    count(stat::REJECTS);
    reject::icmp_port_unreachable(ctx, proto, l4_off)
}

/// A forward entry may be reused only while its backend id still names the
/// same address and port (ids are recycled after a backend is removed).
#[inline(always)]
fn backend_still_valid(ct: &CtValue) -> bool {
    match unsafe { BACKENDS.get(ct.backend_id) } {
        Some(b) => b.addr == ct.nat_addr && b.port == ct.nat_port,
        None => false,
    }
}

/// Rewrites one address (at `addr_off`) and the port at `l4_off + port_rel`,
/// updating the IPv4 header checksum and the L4 checksum (whose pseudo-header
/// covers the address) incrementally.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_rel: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let csum_off = flow.csum_off();
    let flags = flow.l4_csum_flags();
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, flags | 2)
            .map_err(|_| ())?;
        ctx.store(flow.l4_off + port_rel, &new_port, 0)
            .map_err(|_| ())?;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
