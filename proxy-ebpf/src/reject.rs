//! kube-proxy REJECT: a new flow to a frontend without usable endpoints is
//! answered with ICMP destination unreachable / port unreachable sent by the
//! frontend address, so a TCP connect() fails at once with ECONNREFUSED and a
//! connected UDP socket sees ECONNREFUSED, instead of waiting for a timeout.
//!
//! The request packet itself is turned into the answer: 28 bytes (new IPv4 +
//! ICMP headers) are inserted after the Ethernet header, the original IPv4
//! header and the fixed L4 header stay as the ICMP data, the rest is cut,
//! and the packet is sent back out of the interface it came in on.
//!
//! The whole fixed L4 header is quoted (not only the 8 bytes RFC 792 asks
//! for): packets from a pod usually carry CHECKSUM_PARTIAL, whose checksum
//! field the kernel refuses to trim away.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::proto;

use crate::{ETH_HLEN, csum::checksum};

const IP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
const ADDED: usize = IP_HLEN + ICMP_HLEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Quoted bytes: the IPv4 header (without options) and the fixed L4 header.
const TCP_QUOTE: usize = IP_HLEN + 20;
const UDP_QUOTE: usize = IP_HLEN + 8;

/// Returns the verdict: a redirect carrying the ICMP answer, or a drop when
/// the answer cannot be built (never a pass: the frontend has no endpoint
/// and the packet may already be half rewritten).
pub fn icmp_port_unreachable(ctx: &TcContext, l4_proto: u8, l4_off: usize) -> i32 {
    // Only option-less headers are quoted.
    if l4_off != ETH_HLEN + IP_HLEN {
        return TC_ACT_SHOT;
    }
    let built = if l4_proto == proto::TCP {
        build::<TCP_QUOTE, { ICMP_HLEN + TCP_QUOTE }>(ctx)
    } else {
        build::<UDP_QUOTE, { ICMP_HLEN + UDP_QUOTE }>(ctx)
    };
    if built.is_err() {
        return TC_ACT_SHOT;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// `Q` bytes are quoted; `M` is the ICMP message length (`ICMP_HLEN + Q`).
#[inline(always)]
fn build<const Q: usize, const M: usize>(ctx: &TcContext) -> Result<(), ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let quote: [u8; Q] = ctx.load(ETH_HLEN).map_err(|_| ())?;

    ctx.adjust_room(ADDED as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ADDED + Q) as u32, 0) } != 0 {
        return Err(());
    }

    let mut head = [0u8; ETH_HLEN + ADDED];
    // Ethernet: back to the sender.
    head[0..6].copy_from_slice(&macs[6..12]);
    head[6..12].copy_from_slice(&macs[0..6]);
    head[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: from the frontend the client addressed, to the client.
    let ip = ETH_HLEN;
    let mut ip_hdr = [0u8; IP_HLEN];
    ip_hdr[0] = 0x45;
    ip_hdr[2..4].copy_from_slice(&((ADDED + Q) as u16).to_be_bytes());
    ip_hdr[8] = 64;
    ip_hdr[9] = proto::ICMP;
    ip_hdr[12..16].copy_from_slice(&quote[16..20]);
    ip_hdr[16..20].copy_from_slice(&quote[12..16]);
    let ip_csum = checksum(&ip_hdr);
    ip_hdr[10..12].copy_from_slice(&ip_csum);
    head[ip..ip + IP_HLEN].copy_from_slice(&ip_hdr);
    // ICMP header, checksummed together with the quoted bytes.
    let mut icmp_msg = [0u8; M];
    icmp_msg[0] = ICMP_DEST_UNREACH;
    icmp_msg[1] = ICMP_PORT_UNREACH;
    icmp_msg[ICMP_HLEN..].copy_from_slice(&quote);
    let icmp_csum = checksum(&icmp_msg);
    let icmp = ip + IP_HLEN;
    head[icmp] = ICMP_DEST_UNREACH;
    head[icmp + 1] = ICMP_PORT_UNREACH;
    head[icmp + 2..icmp + 4].copy_from_slice(&icmp_csum);

    ctx.store(0, &head, 0).map_err(|_| ())
}
