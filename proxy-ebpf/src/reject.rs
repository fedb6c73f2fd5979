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
//!
//! Such an skb keeps CHECKSUM_PARTIAL after the rewrite, with its checksum
//! start and offset still on the (now quoted) L4 header: where the answer's
//! way out finishes checksums in software (a veth with tx offload off), the
//! kernel then writes the fold of the quoted L4 bytes into the quoted
//! checksum field, after the ICMP checksum was computed over it. So that
//! field is given the one value that completion leaves as it is (see
//! [`csum::completion_fixed_point`]): the ICMP checksum is right whether
//! the kernel finishes the skb or not. Nothing reads a quoted L4 checksum
//! (the receiver matches the quote by addresses and ports), and under
//! CHECKSUM_PARTIAL it never held the sent checksum anyway.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    cty::c_void,
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use proxy_common::{RejectBucket, proto};

use crate::csum;
use crate::maps::{REJECT_RATE, config};
use crate::packet::{ETH_HLEN, IP_SRC_OFF};

/// Whether the client of the request in `ctx` may get another answer: the
/// kernel limits every ICMP error it sends per destination
/// (`icmp_ratelimit`: one per interval, a burst of six), iptables' REJECT
/// included, so a client hammering a Service without endpoints cannot make
/// the node answer every packet. A refused request is dropped: the client
/// retransmits, as under kube-proxy.
#[inline(always)]
pub fn allowed(ctx: &TcContext) -> bool {
    let Some(cfg) = config() else {
        return true;
    };
    let interval = cfg.reject_interval_ns;
    if interval == 0 {
        return true;
    }
    let Ok(client) = ctx.load::<u32>(IP_SRC_OFF) else {
        return true;
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The agent keeps both small enough not to overflow.
    let cap = interval.wrapping_mul(cfg.reject_burst as u64);
    let Some(bucket) = REJECT_RATE.get_ptr_mut(client) else {
        // A client not seen (lately) starts with a full bucket.
        let fresh = RejectBucket {
            credit_ns: cap - interval.min(cap),
            last_ns: now,
        };
        let _ = REJECT_RATE.insert(client, fresh, 0);
        return true;
    };
    let b = unsafe { &mut *bucket };
    let credit = b
        .credit_ns
        .saturating_add(now.saturating_sub(b.last_ns))
        .min(cap);
    b.last_ns = now;
    if credit >= interval {
        b.credit_ns = credit - interval;
        true
    } else {
        b.credit_ns = credit;
        false
    }
}

const IP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
const ADDED: usize = IP_HLEN + ICMP_HLEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Quoted bytes: the IPv4 header (without options) and the fixed L4 header.
const TCP_QUOTE: usize = IP_HLEN + 20;
const UDP_QUOTE: usize = IP_HLEN + 8;
/// Where the checksum sits in the quoted L4 header.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

/// Returns the verdict: a redirect carrying the ICMP answer, or a drop when
/// the answer cannot be built (never a pass: the frontend has no endpoint
/// and the packet may already be half rewritten).
pub fn icmp_port_unreachable(ctx: &TcContext, l4_proto: u8, l4_off: usize) -> i32 {
    // Only option-less headers are quoted.
    if l4_off != ETH_HLEN + IP_HLEN {
        return TC_ACT_SHOT;
    }
    let quote_len = if l4_proto == proto::TCP {
        TCP_QUOTE
    } else {
        UDP_QUOTE
    };
    if build(ctx, quote_len).is_err() {
        return TC_ACT_SHOT;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Quotes `quote_len` (`TCP_QUOTE` or `UDP_QUOTE`) bytes. One buffer serves
/// both lengths (its unused tail stays zero, which adds nothing to a
/// checksum) so the answer fits the verifier's stack budget once.
#[inline(always)]
fn build(ctx: &TcContext, quote_len: usize) -> Result<(), ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut quote = [0u8; TCP_QUOTE];
    // The raw helper with a constant length per branch: the verifier must
    // see a non-zero size (aya's load_bytes clamps it to the packet).
    let len = if quote_len == TCP_QUOTE {
        TCP_QUOTE
    } else {
        UDP_QUOTE
    } as u32;
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            ETH_HLEN as u32,
            quote.as_mut_ptr() as *mut c_void,
            len,
        )
    };
    if loaded != 0 {
        return Err(());
    }
    let l4_csum = IP_HLEN
        + if quote_len == TCP_QUOTE {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
    quote[l4_csum] = 0;
    quote[l4_csum + 1] = 0;
    // The unused tail of a UDP quote is zero, so the whole L4 part can be
    // summed at the TCP length.
    let mut l4 = [0u8; TCP_QUOTE - IP_HLEN];
    l4.copy_from_slice(&quote[IP_HLEN..]);
    let fixed = csum::completion_fixed_point(csum::sum(&l4)).to_be_bytes();
    quote[l4_csum] = fixed[0];
    quote[l4_csum + 1] = fixed[1];

    ctx.adjust_room(ADDED as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ADDED + quote_len) as u32, 0) } != 0 {
        return Err(());
    }

    let mut head = [0u8; ETH_HLEN + ADDED];
    // Ethernet: back to the sender.
    head[0..6].copy_from_slice(&macs[6..12]);
    head[6..12].copy_from_slice(&macs[0..6]);
    head[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: from the frontend the client addressed, to the client.
    let ip = ETH_HLEN;
    head[ip] = 0x45;
    head[ip + 2..ip + 4].copy_from_slice(&((ADDED + quote_len) as u16).to_be_bytes());
    head[ip + 8] = 64;
    head[ip + 9] = proto::ICMP;
    head[ip + 12..ip + 16].copy_from_slice(&quote[16..20]);
    head[ip + 16..ip + 20].copy_from_slice(&quote[12..16]);
    let mut ip_hdr = [0u8; IP_HLEN];
    ip_hdr.copy_from_slice(&head[ip..ip + IP_HLEN]);
    head[ip + 10..ip + 12].copy_from_slice(&csum::finish(csum::sum(&ip_hdr)));
    // ICMP header (type, code, checksum, 4 unused bytes), checksummed
    // together with the quoted bytes.
    let icmp = ip + IP_HLEN;
    head[icmp] = ICMP_DEST_UNREACH;
    head[icmp + 1] = ICMP_PORT_UNREACH;
    let icmp_sum =
        (((ICMP_DEST_UNREACH as u32) << 8) | ICMP_PORT_UNREACH as u32) + csum::sum(&quote);
    head[icmp + 2..icmp + 4].copy_from_slice(&csum::finish(icmp_sum));

    ctx.store(0, &head, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + ADDED + l4_csum, &fixed, 0)
        .map_err(|_| ())
}
