//! The TC programs: `kep_tc_ingress` at ingress of every pod-facing
//! interface, `kep_tc_node` at ingress of the node's own interfaces,
//! `kep_tc_egress` at egress of both, and the glue that rewrites a packet,
//! picks its way out and sends REJECT's answer.
//!
//! Every packet enters the node through one of them, so together they see
//! both directions of every flow: they DNAT client -> VIP:port to a backend
//! before the node routes the packet, and reverse-translate backend ->
//! client replies back to VIP:port, whichever interface those come in on
//! (a reply from an endpoint on another node arrives on a node interface).
//! Traffic from a node interface uses a frontend's external entry: only
//! local endpoints for externalTrafficPolicy Local, masquerade to the node's
//! address for Cluster, loadBalancerSourceRanges.
//!
//! What the node itself sends never enters it: a hostNetwork endpoint's
//! answers, the ICMP errors its stack sends (a "fragmentation needed" about
//! a DNAT-ed packet it cannot forward, a "port unreachable" from a host
//! endpoint). Those leave by an interface's egress, where `kep_tc_egress`
//! reverse-translates them by their flow's reply entry. It looks only at
//! packets the node generated (no ingress interface): everything it
//! forwards was seen, and translated, where it came in.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_coarse_ns,
    macros::classifier,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use proxy_common::{CtValue, FragKey, proto, stat};

use crate::csum;
use crate::fast;
use crate::fib::fib_redirect;
use crate::flow::{
    Origin, Tuple, any_node_address, live_entry, may_be_ours, open_flow, opened, touch, translated,
    usable,
};
use crate::frag::{self, First};
use crate::icmp;
use crate::maps::{CONNTRACK, account, config, count, is_node_address};
use crate::packet::{ETH_HLEN, Flow, Icmp, Parsed, fragment, parse, ptr_at};
use crate::reject;
use crate::sctp;

#[classifier]
pub fn kep_tc_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Pod)
}

#[classifier]
pub fn kep_tc_node(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Node)
}

#[classifier]
pub fn kep_tc_egress(ctx: TcContext) -> i32 {
    // Forwarded packets were translated where they came in.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_OK;
    }
    let first = first_fragment(&ctx);
    let verdict = try_egress(&ctx);
    if let Some(key) = first
        && !frag::first(&ctx, &key, First::Forward { redirect: false }, false)
    {
        return TC_ACT_SHOT;
    }
    match verdict {
        // Already routed: it leaves where the stack sends it.
        Ok(Verdict::Act(FIB_REDIRECT) | Verdict::Reject { .. }) | Err(()) => TC_ACT_OK,
        Ok(Verdict::Act(verdict)) => verdict,
        Ok(Verdict::Icmp(msg)) => related(&ctx, &msg, false),
        Ok(Verdict::Fragment) => frag::later(&ctx, false),
        Ok(Verdict::Open) => TC_ACT_OK,
    }
}

/// What to do with a packet once [`try_ingress`] has returned: REJECT is
/// sent, and ICMP read, from here, outside its stack frame, so the frames
/// never add up past the verifier's 512 bytes.
enum Verdict {
    /// A TC action, or [`FIB_REDIRECT`]. (A variant of its own for the
    /// redirect let the compiler store an undefined payload, which the
    /// verifier refuses.)
    Act(i32),
    Reject {
        proto: u8,
        l4_off: usize,
    },
    Icmp(Icmp),
    /// A later fragment: [`frag::later`] reads it again.
    Fragment,
    /// No live conntrack entry: [`try_open`] opens the flow.
    Open,
}

/// Translated; to be sent past the stack by FIB redirect (no TC action
/// has this value).
const FIB_REDIRECT: i32 = i32::MIN;

/// The datagram of a first fragment, as it comes.
#[inline(always)]
fn first_fragment(ctx: &TcContext) -> Option<FragKey> {
    match fragment(ctx) {
        Some((key, true)) => Some(key),
        _ => None,
    }
}

#[inline(always)]
fn run(ctx: &TcContext, origin: Origin) -> i32 {
    let first = first_fragment(ctx);
    let mut verdict = try_ingress(ctx, origin);
    if let Ok(Verdict::Open) = verdict {
        verdict = try_open(ctx, origin);
    }
    if let Some(key) = first {
        let outcome = match verdict {
            Ok(Verdict::Act(TC_ACT_SHOT) | Verdict::Reject { .. }) => First::Drop,
            Ok(Verdict::Act(FIB_REDIRECT)) => First::Forward { redirect: true },
            _ => First::Forward { redirect: false },
        };
        if !frag::first(ctx, &key, outcome, true) {
            return TC_ACT_SHOT;
        }
    }
    match verdict {
        Ok(Verdict::Act(FIB_REDIRECT)) => fib_redirect(ctx),
        Ok(Verdict::Act(verdict)) => verdict,
        Ok(Verdict::Reject { proto, l4_off }) => send_reject(ctx, proto, l4_off),
        Ok(Verdict::Icmp(msg)) => related(ctx, &msg, true),
        Ok(Verdict::Fragment) => frag::later(ctx, true),
        Ok(Verdict::Open) | Err(()) => TC_ACT_OK,
    }
}

#[inline(never)]
fn try_ingress(ctx: &TcContext, origin: Origin) -> Result<Verdict, ()> {
    let flow = match parse(ctx)? {
        Parsed::L4(flow) => flow,
        Parsed::Icmp(msg) => return Ok(Verdict::Icmp(msg)),
        Parsed::Fragment => return Ok(Verdict::Fragment),
        Parsed::Other => return Ok(Verdict::Act(TC_ACT_OK)),
    };
    // The coarse clock (the last tick's time) is all idle timeouts of
    // seconds need, and costs a load instead of a clock read.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cfg = config();
    if let Some((entry, ct)) = live_entry(&flow, cfg, now) {
        if usable(&ct) {
            // The flow's first reply tells how its requests can be sent
            // past the stack (where its endpoint is).
            if ct.is_reply() && !ct.seen_reply() {
                fast::learn_endpoint(ctx, &flow, &ct, origin == Origin::Node);
            }
            touch(&flow, entry, &ct, now);
            translate(ctx, &flow, &translated(&flow, &ct))?;
            count_hit(ctx, &ct);
            if fast::applies(&ct, &flow, cfg) {
                return Ok(Verdict::Act(fast::send(ctx, &ct)));
            }
            return Ok(out(&ct));
        }
        // The backend this flow used is gone: choose again below, as a new
        // flow, instead of sending it to an address that no longer serves.
    }
    // No flow can open to it (see `open_flow`): passed without
    // `try_open`'s second parse.
    if !may_be_ours(flow.daddr, flow.dport, flow.proto) {
        return Ok(Verdict::Act(TC_ACT_OK));
    }
    Ok(Verdict::Open)
}

/// A packet without a live conntrack entry: the flow it opens (or what
/// becomes of it). In a frame of its own beside [`try_ingress`]'s (the
/// packet is parsed again): stacked on it, the frames passed the
/// verifier's 512 bytes.
#[inline(never)]
fn try_open(ctx: &TcContext, origin: Origin) -> Result<Verdict, ()> {
    let Parsed::L4(flow) = parse(ctx)? else {
        return Ok(Verdict::Act(TC_ACT_OK));
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut forward = CtValue::default();
    match open_flow(&flow, origin, now, &mut forward) {
        opened::FLOW => {
            if origin == Origin::Pod {
                fast::remember_client(ctx, &flow, &forward);
            }
            translate(ctx, &flow, &translated(&flow, &forward))?;
            if !forward.is_direct() {
                account(forward.svc_id, forward.backend_id, ctx.len());
            }
            Ok(out(&forward))
        }
        opened::PASS => Ok(Verdict::Act(TC_ACT_OK)),
        opened::REJECT => Ok(Verdict::Reject {
            proto: flow.proto,
            l4_off: flow.l4_off,
        }),
        _ => Ok(Verdict::Act(TC_ACT_SHOT)),
    }
}

/// A packet the node itself sends: a host endpoint's answer (by its flow's
/// reply entry; the node never starts a flow here) or an ICMP error.
///
/// (The dispatch on [`parse`] is written out as in [`try_ingress`]: a
/// shared helper returning it as a nested `Result` made the compiler pack
/// registers in a way the verifier refuses.)
#[inline(never)]
fn try_egress(ctx: &TcContext) -> Result<Verdict, ()> {
    let flow = match parse(ctx)? {
        Parsed::L4(flow) => flow,
        Parsed::Icmp(msg) => return Ok(Verdict::Icmp(msg)),
        Parsed::Fragment => return Ok(Verdict::Fragment),
        Parsed::Other => return Ok(Verdict::Act(TC_ACT_OK)),
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match live_entry(&flow, config(), now) {
        Some((entry, ct)) => {
            if ct.is_reply() {
                established(ctx, &flow, entry, &ct, now)?;
            }
        }
        None => host_udp_reply(ctx, &flow, now)?,
    }
    // Already routed: it leaves where the stack sends it.
    Ok(Verdict::Act(TC_ACT_OK))
}

/// A UDP answer of a host endpoint from another of the node's addresses
/// than the one its client's flow was sent to (see
/// [`any_node_address`]): translated by that flow's reply entry.
#[inline(always)]
fn host_udp_reply(ctx: &TcContext, flow: &Flow, now: u64) -> Result<(), ()> {
    if flow.proto != proto::UDP || !is_node_address(flow.saddr) {
        return Ok(());
    }
    let key = any_node_address(&flow.key());
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        let ct = unsafe { *entry };
        if ct.is_reply() && !config().is_some_and(|c| ct.expired(&key, c, now)) {
            established(ctx, flow, entry, &ct, now)?;
        }
    }
    Ok(())
}

/// A reply the node itself sends, by its flow's reply entry.
#[inline(always)]
fn established(
    ctx: &TcContext,
    flow: &Flow,
    entry: *mut CtValue,
    ct: &CtValue,
    now: u64,
) -> Result<(), ()> {
    touch(flow, entry, ct, now);
    translate(ctx, flow, &translated(flow, ct))?;
    count_hit(ctx, ct);
    Ok(())
}

/// Counts a packet of a Service flow (a direct flow belongs to none).
#[inline(always)]
fn count_hit(ctx: &TcContext, ct: &CtValue) {
    if !ct.is_direct() {
        count(if ct.is_reply() {
            stat::REPLY_HITS
        } else {
            stat::FORWARD_HITS
        });
        account(ct.svc_id, ct.backend_id, ctx.len());
    }
}

/// An ICMP error about a packet of a tracked flow: translated like a
/// packet of that flow going its way; `ingress`: it may then need the
/// flow's way out (a FIB redirect where its source became the node's).
/// Other ICMP passes.
#[inline(never)]
fn related(ctx: &TcContext, msg: &Icmp, ingress: bool) -> i32 {
    let Ok(Some(error)) = icmp::parse_error(ctx, msg) else {
        return TC_ACT_OK;
    };
    let flow = error.flow();
    let Some((_, ct)) = live_entry(&flow, config(), unsafe { bpf_ktime_get_coarse_ns() }) else {
        return TC_ACT_OK;
    };
    let to = translated(&flow, &ct);
    // A direct flow's errors need nothing.
    if to.unchanged(&flow) || icmp::rewrite(ctx, &error, &to).is_err() {
        return TC_ACT_OK;
    }
    count(stat::ICMP_ERRORS);
    if ingress && ct.redirects() {
        fib_redirect(ctx)
    } else {
        TC_ACT_OK
    }
}

/// Rewrites the packet to `to` (what is unchanged is left alone): the L4
/// checksum by the kernel's helpers (they know how the skb carries it: a
/// partial checksum holds the pseudo-header sum, a complete one also
/// updates `skb->csum`), the IPv4 header and the ports in place. (A frame
/// of its own keeps its temporaries off the callers' stacks.)
#[inline(never)]
fn translate(ctx: &TcContext, flow: &Flow, to: &Tuple) -> Result<(), ()> {
    if to.unchanged(flow) {
        return Ok(());
    }
    if flow.proto == proto::SCTP {
        // CRC32c covers no pseudo-header: only the ports count.
        sctp::ports_changed(ctx, flow, to.sport, to.dport)?;
    } else {
        let csum_off = flow.csum_off();
        let flags = flow.l4_csum_flags();
        let pseudo = flags | BPF_F_PSEUDO_HDR as u64 | 4;
        for (old, new) in [(flow.saddr, to.saddr), (flow.daddr, to.daddr)] {
            if old != new {
                ctx.l4_csum_replace(csum_off, old as u64, new as u64, pseudo)
                    .map_err(|_| ())?;
            }
        }
        for (old, new) in [(flow.sport, to.sport), (flow.dport, to.dport)] {
            if old != new {
                ctx.l4_csum_replace(csum_off, old as u64, new as u64, flags | 2)
                    .map_err(|_| ())?;
            }
        }
    }
    let ip = ptr_at::<_, Ipv4Hdr>(ctx, ETH_HLEN)?;
    let mut check = u16::from_ne_bytes(unsafe { (*ip).check });
    check = csum::replace32(check, flow.saddr, to.saddr);
    check = csum::replace32(check, flow.daddr, to.daddr);
    unsafe {
        (*ip).src_addr = to.saddr.to_ne_bytes();
        (*ip).dst_addr = to.daddr.to_ne_bytes();
        (*ip).check = check.to_ne_bytes();
    }
    let ports = ptr_at::<_, [u16; 2]>(ctx, flow.l4_off)?;
    unsafe { *ports = [to.sport, to.dport] };
    Ok(())
}

/// The verdict for a translated packet of the flow `ct`: on to the stack,
/// or out directly where the stack would drop it.
#[inline(always)]
fn out(ct: &CtValue) -> Verdict {
    if ct.redirects() {
        Verdict::Act(FIB_REDIRECT)
    } else {
        Verdict::Act(TC_ACT_OK)
    }
}

/// The one place REJECT is sent from, so the answer's buffers are on the
/// stack once (and never above [`try_ingress`]'s frame).
#[inline(never)]
fn send_reject(ctx: &TcContext, proto: u8, l4_off: usize) -> i32 {
    // No ICMP answer quotes SCTP here: a sender's offloaded CRC32c sits
    // past what the answer keeps, where the kernel would still complete
    // it. Dropped instead (the association attempt times out).
    if proto == proto::SCTP {
        count(stat::DROPS);
        return TC_ACT_SHOT;
    }
    if !reject::allowed(ctx) {
        count(stat::REJECT_RATE_LIMITED);
        return TC_ACT_SHOT;
    }
    count(stat::REJECTS);
    reject::icmp_port_unreachable(ctx, proto, l4_off)
}
