//! The fast path: Service flows between pods delivered past the host's
//! routing and netfilter, as Cilium's BPF host routing does.
//!
//! Each direction of a flow learns its way from a packet of the other
//! direction, so the agent keeps no interface table and no FIB lookup runs
//! per packet: a request from a pod came in on that pod's host-side veth,
//! so the flow's replies are delivered into that pod with
//! `bpf_redirect_peer` (the veth's peer, inside the pod's namespace), MAC
//! addresses swapped; the flow's first reply came in on the endpoint's
//! veth (an endpoint on this node: requests go into it the same way) or on
//! a node interface (an endpoint on another node: requests leave by that
//! interface with `bpf_redirect_neigh`, the kernel's route and neighbour,
//! once the FIB agrees they would). Until then, a flow's packets take the
//! stack.
//!
//! Everything else keeps the stack (`TC_ACT_OK`): hairpin flows, direct
//! connections, flows with a FIB redirect of their own (masqueraded,
//! NodePort replies), answers of host endpoints (sent by the node, they
//! never enter an interface), the egress hook, XDP, fragments, a TTL
//! about to run out (the stack sends the time-exceeded), ICMP errors, and
//! every flow while `Config::flags` lacks `CONFIG_FLAG_FAST_PATH`
//! (`--fast-path off`). Skipping netfilter skips whatever rules it holds
//! for this traffic (e.g. a CNI's NetworkPolicy in iptables): such nodes
//! run with the fast path off.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK},
    helpers::{bpf_check_mtu, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use proxy_common::{
    CONFIG_FLAG_FAST_PATH, CT_FLAG_DIRECT, CT_FLAG_NEIGH, CT_FLAG_PEER, CT_FLAG_REDIRECT,
    CT_FLAG_SNAT, Config, CtValue, stat,
};

use crate::csum;
use crate::fib::fib_lookup;
use crate::maps::{CONNTRACK, count};
use crate::packet::{ETH_HLEN, Flow, ptr_at};

#[inline(always)]
fn enabled(cfg: Option<&Config>) -> bool {
    cfg.is_some_and(|c| c.flags & CONFIG_FLAG_FAST_PATH != 0)
}

/// Whether the flow of `entry` (either of its entries) may take the fast
/// path, and this packet (`flow`) with it.
#[inline(always)]
fn eligible(entry: &CtValue, flow: &Flow, cfg: Option<&Config>) -> bool {
    entry.flags & (CT_FLAG_SNAT | CT_FLAG_DIRECT | CT_FLAG_REDIRECT) == 0
        && !flow.first_fragment
        && enabled(cfg)
}

/// Whether this packet of the flow `ct` goes on the fast path.
#[inline(always)]
pub fn applies(ct: &CtValue, flow: &Flow, cfg: Option<&Config>) -> bool {
    ct.has_fast_path() && ct.ifindex != 0 && flow.ttl > 1 && eligible(ct, flow, cfg)
}

/// This packet's interface and its MAC addresses swapped: the way back
/// into where it came from.
#[inline(always)]
fn way_back(ctx: &TcContext) -> Option<(u32, [u8; 12])> {
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if ifindex == 0 {
        return None;
    }
    let macs = unsafe { *ptr_at::<_, [u8; 12]>(ctx, 0).ok()? };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    Some((ifindex, swapped))
}

/// A new flow from a pod (the packet `flow`, opened as `forward`): its
/// replies will be delivered into that pod.
#[inline(never)]
pub fn remember_client(ctx: &TcContext, flow: &Flow, forward: &CtValue) {
    if !eligible(forward, flow, crate::maps::config()) {
        return;
    }
    let Some((ifindex, macs)) = way_back(ctx) else {
        return;
    };
    if let Some(reply) = CONNTRACK.get_ptr_mut(forward.twin_key(&flow.key())) {
        unsafe {
            (*reply).ifindex = ifindex;
            (*reply).macs = macs;
            (*reply).flags |= CT_FLAG_PEER;
        }
    }
}

/// The flow's first reply (`flow`, by its entry `ct`) came in here: its
/// requests go the same way, into the endpoint's pod (`from_node`: no,
/// out of the node interface it came in on, when the FIB agrees).
#[inline(never)]
pub fn learn_endpoint(ctx: &TcContext, flow: &Flow, ct: &CtValue, from_node: bool) {
    if !eligible(ct, flow, crate::maps::config()) {
        return;
    }
    let Some((ifindex, macs)) = way_back(ctx) else {
        return;
    };
    let fast = if !from_node {
        CT_FLAG_PEER
    } else if same_way_back(ctx, flow, ifindex) {
        CT_FLAG_NEIGH
    } else {
        return;
    };
    if let Some(forward) = CONNTRACK.get_ptr_mut(ct.twin_key(&flow.key())) {
        unsafe {
            (*forward).ifindex = ifindex;
            (*forward).macs = macs;
            (*forward).flags |= fast;
        }
    }
}

/// Whether the flow's requests (to the endpoint that sent `flow`, from
/// where `flow` goes) leave by interface `ifindex`, as the FIB says.
#[inline(always)]
fn same_way_back(ctx: &TcContext, flow: &Flow, ifindex: u32) -> bool {
    let mut params = unsafe { core::mem::zeroed() };
    let rc = fib_lookup(
        ctx,
        flow.proto,
        0,
        flow.daddr,
        flow.saddr,
        ifindex,
        &mut params,
    );
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64)
        && params.ifindex == ifindex
}

/// Sends the translated packet of the flow `ct` on its fast path, its TTL
/// decremented as by the router it skips (so a loop still ends).
#[inline(never)]
pub fn send(ctx: &TcContext, ct: &CtValue) -> i32 {
    let Ok(ip) = ptr_at::<_, Ipv4Hdr>(ctx, ETH_HLEN) else {
        return TC_ACT_OK;
    };
    let (ttl, l4proto, check) = unsafe { ((*ip).ttl, (*ip).proto, (*ip).check) };
    // Too big for the interface: the stack answers "fragmentation needed"
    // (a redirect would drop it silently).
    let mut mtu_len = 0u32;
    if ttl <= 1
        || unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, ct.ifindex, &mut mtu_len, 0, 0) } != 0
    {
        return TC_ACT_OK;
    }
    // TTL and protocol share one 16-bit word of the header.
    let [old, new] = [ttl, ttl - 1].map(|t| u16::from_ne_bytes([t, l4proto]));
    let check = csum::replace16(u16::from_ne_bytes(check), old, new);
    unsafe {
        (*ip).ttl = ttl - 1;
        (*ip).check = check.to_ne_bytes();
    }
    if ct.flags & CT_FLAG_PEER != 0 {
        let Ok(eth) = ptr_at::<_, [u8; 12]>(ctx, 0) else {
            return TC_ACT_OK;
        };
        unsafe { *eth = ct.macs };
        count(stat::FAST_PATH_PEER);
        return unsafe { bpf_redirect_peer(ct.ifindex, 0) } as i32;
    }
    count(stat::FAST_PATH_NEIGH);
    unsafe { bpf_redirect_neigh(ct.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
