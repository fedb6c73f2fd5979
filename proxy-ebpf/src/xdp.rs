//! `kep_xdp_node`: the XDP fast path on node interfaces.
//!
//! It serves the external flows (NodePort, LoadBalancer and external-IP
//! traffic that the TC program would send out by FIB lookup) whose packets
//! leave by the interface they came in on: a node forwarding to an endpoint
//! on another node, and that endpoint's replies to the client. New flows
//! are opened here with the same decision and the same conntrack entries as
//! the TC program (`open_flow`), established ones translated from the
//! shared entry; the packet is rewritten in place, its TTL decremented, and
//! sent back out with `XDP_TX` before the kernel allocates an skb.
//!
//! Everything else passes (`XDP_PASS`) to `kep_tc_node` behind it, which
//! then finds the flow's entry and translates it the same way: packets for
//! an endpoint on this node (redirecting into a pod's veth only works when
//! the pod side runs XDP itself, which the agent cannot arrange), flows that
//! go out of another interface, next hops without a neighbour entry yet,
//! FIN/RST (the closing bookkeeping), REJECT (the ICMP answer), and
//! everything that is not a service flow. Drops (source ranges,
//! externalTrafficPolicy Local without local endpoints, no SNAT port) are
//! done here, before the skb exists.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    macros::xdp,
    programs::XdpContext,
};
use proxy_common::{CtValue, proto, stat};

use crate::csum;
use crate::fib::fib_lookup;
use crate::flow::{Origin, Tuple, live_entry, open_flow, opened, touch, translated, usable};
use crate::maps::{account, config, count};
use crate::packet::{ETH_HLEN, Flow, Parsed, TCP_FIN, TCP_RST, parse, ptr_at};

#[xdp]
pub fn kep_xdp_node(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    const PASS: Result<u32, ()> = Ok(xdp_action::XDP_PASS);
    // ICMP errors are rare and fragments need the skb: both are TC's.
    let Parsed::L4(flow) = parse(ctx)? else {
        return PASS;
    };
    // SCTP's CRC is updated by TC's skb helpers.
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0
        || flow.ttl <= 1
        || flow.first_fragment
        || flow.proto == proto::SCTP
    {
        return PASS;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cfg = config();
    let (entry, ct) = match live_entry(&flow, cfg, now) {
        Some((entry, ct)) if usable(&ct) => (Some(entry), ct),
        _ => {
            let mut forward = CtValue::default();
            match open_flow(&flow, Origin::Node, now, &mut forward) {
                opened::FLOW => (None, forward),
                opened::DROP => return Ok(xdp_action::XDP_DROP),
                _ => return PASS,
            }
        }
    };
    // Flows the stack forwards itself (client address kept, endpoint on
    // this node) are the TC program's: XDP only does earlier what it would
    // do by FIB redirect.
    if !ct.redirects() {
        return PASS;
    }
    let to = translated(&flow, &ct);
    let Some(macs) = same_way_out(ctx, &flow, &to) else {
        return PASS;
    };
    rewrite(ctx, &flow, &to)?;
    unsafe {
        *ptr_at::<_, [[u8; 6]; 2]>(ctx, 0)? = macs;
    }
    if let Some(entry) = entry {
        touch(&flow, entry, &ct, now);
        count(if ct.is_reply() {
            stat::REPLY_HITS
        } else {
            stat::FORWARD_HITS
        });
    }
    count(stat::XDP_TX);
    account(
        ct.svc_id,
        ct.backend_id,
        (ctx.data_end() - ctx.data()) as u32,
    );
    Ok(xdp_action::XDP_TX)
}

/// The next hop's and this interface's MAC addresses when the translated
/// packet leaves by the interface it came in on and the neighbour is known.
#[inline(never)]
fn same_way_out(ctx: &XdpContext, flow: &Flow, to: &Tuple) -> Option<[[u8; 6]; 2]> {
    let ip = ptr_at::<_, network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN).ok()?;
    let ingress = ctx.ingress_ifindex() as u32;
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len });
    let mut params = unsafe { core::mem::zeroed() };
    let rc = fib_lookup(
        ctx,
        flow.proto,
        tot_len,
        to.saddr,
        to.daddr,
        ingress,
        &mut params,
    );
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || params.ifindex != ingress {
        return None;
    }
    Some([params.dmac, params.smac])
}

/// Writes the translated tuple and the decremented TTL, updating the IPv4
/// and L4 checksums incrementally (frames from a wire carry complete ones).
#[inline(always)]
fn rewrite(ctx: &XdpContext, flow: &Flow, to: &Tuple) -> Result<(), ()> {
    // One bounds check per header, each write through its own pointer: the
    // verifier loses track of checks the compiler merged across them.
    let ip = ptr_at::<_, network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN)?;
    let mut ip_check = u16::from_ne_bytes(unsafe { (*ip).check });
    ip_check = csum::replace32(ip_check, flow.saddr, to.saddr);
    ip_check = csum::replace32(ip_check, flow.daddr, to.daddr);
    // TTL and protocol share one 16-bit word of the header.
    let [old, new] = [flow.ttl, flow.ttl - 1].map(|t| u16::from_ne_bytes([t, flow.proto]));
    ip_check = csum::replace16(ip_check, old, new);
    unsafe {
        (*ip).src_addr = to.saddr.to_ne_bytes();
        (*ip).dst_addr = to.daddr.to_ne_bytes();
        (*ip).ttl = flow.ttl - 1;
        (*ip).check = ip_check.to_ne_bytes();
    }

    let l4_check = ptr_at::<_, u16>(ctx, flow.csum_off())?;
    let mut l4 = unsafe { *l4_check };
    // A zero UDP checksum means "none" and stays zero.
    if flow.proto == proto::TCP || l4 != 0 {
        // The pseudo-header covers the addresses, the header the ports.
        l4 = csum::replace32(l4, flow.saddr, to.saddr);
        l4 = csum::replace32(l4, flow.daddr, to.daddr);
        l4 = csum::replace16(l4, flow.sport, to.sport);
        l4 = csum::replace16(l4, flow.dport, to.dport);
        if flow.proto == proto::UDP && l4 == 0 {
            l4 = 0xffff;
        }
    }
    unsafe { *l4_check = l4 };
    let ports = ptr_at::<_, [u16; 2]>(ctx, flow.l4_off)?;
    unsafe { *ports = [to.sport, to.dport] };
    Ok(())
}
