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
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{CtValue, FragKey, proto, stat};

use crate::fib::fib_redirect;
use crate::flow::{
    Opened, Origin, Tuple, any_node_address, live_entry, mark_closing, open_flow, translated,
    usable,
};
use crate::frag::{self, First};
use crate::icmp;
use crate::maps::{CONNTRACK, account, config, count, is_node_address};
use crate::packet::{
    Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, Icmp, Parsed, TCP_FIN, TCP_RST, fragment, parse,
};
use crate::reject;

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
        Ok(Verdict::Act(verdict)) => verdict,
        Ok(Verdict::Icmp(msg)) => related(&ctx, &msg, false),
        Ok(Verdict::Fragment) => frag::later(&ctx, false),
        // Already routed: it leaves where the stack sends it.
        Ok(Verdict::Redirect | Verdict::Reject { .. }) | Err(()) => TC_ACT_OK,
    }
}

/// What to do with a packet once [`try_ingress`] has returned: REJECT is
/// sent, and ICMP read, from here, outside its stack frame, so the frames
/// never add up past the verifier's 512 bytes.
enum Verdict {
    Act(i32),
    /// Translated; sent past the stack by FIB redirect.
    Redirect,
    Reject {
        proto: u8,
        l4_off: usize,
    },
    Icmp(Icmp),
    /// A later fragment: [`frag::later`] reads it again.
    Fragment,
}

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
    let verdict = try_ingress(ctx, origin);
    if let Some(key) = first {
        let outcome = match verdict {
            Ok(Verdict::Act(TC_ACT_SHOT) | Verdict::Reject { .. }) => First::Drop,
            Ok(Verdict::Redirect) => First::Forward { redirect: true },
            _ => First::Forward { redirect: false },
        };
        if !frag::first(ctx, &key, outcome, true) {
            return TC_ACT_SHOT;
        }
    }
    match verdict {
        Ok(Verdict::Act(verdict)) => verdict,
        Ok(Verdict::Redirect) => fib_redirect(ctx),
        Ok(Verdict::Reject { proto, l4_off }) => send_reject(ctx, proto, l4_off),
        Ok(Verdict::Icmp(msg)) => related(ctx, &msg, true),
        Ok(Verdict::Fragment) => frag::later(ctx, true),
        Err(()) => TC_ACT_OK,
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
    let now = unsafe { bpf_ktime_get_ns() };
    let cfg = config();
    if let Some((entry, ct)) = live_entry(&flow, cfg, now) {
        if established(ctx, &flow, entry, &ct, now)? {
            return Ok(out(&ct));
        }
        // The backend this flow used is gone: choose again below, as a new
        // flow, instead of sending it to an address that no longer serves.
    }
    match open_flow(&flow, origin, cfg, now) {
        Opened::Flow(forward) => {
            translate(ctx, &flow, &translated(&flow, &forward))?;
            if !forward.is_direct() {
                account(forward.svc_id, forward.backend_id, ctx.len());
            }
            Ok(out(&forward))
        }
        Opened::Pass => Ok(Verdict::Act(TC_ACT_OK)),
        Opened::Drop => Ok(Verdict::Act(TC_ACT_SHOT)),
        Opened::Reject => Ok(Verdict::Reject {
            proto: flow.proto,
            l4_off: flow.l4_off,
        }),
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
    let now = unsafe { bpf_ktime_get_ns() };
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

/// A packet of a known flow: reverse-translate a reply, or translate
/// forward to the flow's backend while it exists (`false` otherwise); a
/// direct flow's packets keep their tuple (or get their remapped port). A
/// FIN or RST starts the flow's closing timeout either way.
#[inline(always)]
fn established(
    ctx: &TcContext,
    flow: &Flow,
    entry: *mut CtValue,
    ct: &CtValue,
    now: u64,
) -> Result<bool, ()> {
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && !ct.is_closing() {
        mark_closing(entry, ct, flow);
    }
    if !usable(ct) {
        return Ok(false);
    }
    unsafe { (*entry).last_seen_ns = now };
    translate(ctx, flow, &translated(flow, ct))?;
    // A direct flow belongs to no Service.
    if !ct.is_direct() {
        count(if ct.is_reply() {
            stat::REPLY_HITS
        } else {
            stat::FORWARD_HITS
        });
        account(ct.svc_id, ct.backend_id, ctx.len());
    }
    Ok(true)
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
    let Some((_, ct)) = live_entry(&flow, config(), unsafe { bpf_ktime_get_ns() }) else {
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
fn out(ct: &CtValue) -> Verdict {
    if ct.redirects() {
        Verdict::Redirect
    } else {
        Verdict::Act(TC_ACT_OK)
    }
}

/// The one place REJECT is sent from, so the answer's buffers are on the
/// stack once (and never above [`try_ingress`]'s frame).
#[inline(never)]
fn send_reject(ctx: &TcContext, proto: u8, l4_off: usize) -> i32 {
    count(stat::REJECTS);
    reject::icmp_port_unreachable(ctx, proto, l4_off)
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
