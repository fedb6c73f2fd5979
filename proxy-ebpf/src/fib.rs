//! FIB lookups: where a translated packet leaves, and sending it there past
//! the stack (TC) where the stack would drop it.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::packet::{ETH_HLEN, IP_CSUM_OFF, IP_TTL_OFF, ptr_at};

const AF_INET: u8 = 2;

/// The FIB's answer for forwarding an IPv4 packet (`tot_len` bytes, `src`
/// to `dst`, protocol `proto`) that came in on `ifindex`: the return code,
/// and the parameters (egress interface, MACs) filled in `params` (not
/// returned: a copy of them took the callers' frames past the verifier's
/// budget).
#[inline(always)]
pub fn fib_lookup<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    tot_len: u16,
    src: u32,
    dst: u32,
    ifindex: u32,
    params: &mut aya_ebpf::bindings::bpf_fib_lookup,
) -> i64 {
    *params = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    params.ifindex = ifindex;
    unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<aya_ebpf::bindings::bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// Sends the (translated) packet out of the interface the FIB picks for its
/// destination, with that next hop's MAC addresses, skipping the stack's
/// source validation. Where the FIB cannot say, the stack gets the packet.
#[inline(never)]
pub fn fib_redirect(ctx: &TcContext) -> i32 {
    let Ok(ip) = ptr_at::<_, network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN) else {
        return TC_ACT_OK;
    };
    let (ttl, l4proto) = unsafe { ((*ip).ttl, (*ip).proto) };
    if ttl <= 1 {
        // The stack sends the ICMP time-exceeded a router owes.
        return TC_ACT_OK;
    }
    let mut params = unsafe { core::mem::zeroed() };
    let rc = unsafe {
        fib_lookup(
            ctx,
            l4proto,
            u16::from_be_bytes((*ip).tot_len),
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            (*ctx.skb.skb).ingress_ifindex,
            &mut params,
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
