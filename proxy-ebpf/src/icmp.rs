//! ICMP errors about translated flows, translated as netfilter does for
//! RELATED packets (`nf_nat_icmp_reply_translation`): a "fragmentation
//! needed" a router sends about a DNAT-ed request, a backend's "port
//! unreachable", a client's answer to a reverse-translated reply.
//!
//! The error quotes the packet it is about, as it travelled: its tuple
//! reversed is the flow's conntrack entry for the direction the error goes
//! in. That entry's translation `T` of the reversed tuple gives the error's
//! outer addresses (`T.saddr -> T.daddr`, as a packet of the flow going that
//! way) and the quote (`T` reversed: what the peer sent, or expects). Every
//! changed quoted byte is folded into the ICMP checksum, the quoted IPv4
//! header keeps a right checksum, and so does the quoted L4 checksum where
//! the quote holds it. The kernel always sends ICMP with a finished
//! checksum and never with a partial one, so the updates are done here
//! directly (RFC 1624); each change inside the ICMP message is matched by
//! one of its checksum, and the outer ones by the IPv4 checksum, so an skb
//! with CHECKSUM_COMPLETE stays consistent too.

use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use proxy_common::proto;

use crate::csum;
use crate::flow::Tuple;
use crate::packet::{ETH_HLEN, Flow, Icmp, Packet, ptr_at};

const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
const ICMP_HLEN: usize = 8;
/// Most bytes an ICMP error's headers and quoted headers can take: outer
/// IPv4 with options, ICMP, quoted IPv4 with options, 20 bytes of L4.
const MAX_HEADERS: usize = ETH_HLEN + 60 + ICMP_HLEN + 60 + 20;

/// An ICMP error quoting a TCP or UDP packet.
///
/// Offsets are bytes (all fall within [`MAX_HEADERS`]): kept that narrow,
/// they stay bounded for the verifier when the error is handed to another
/// function through the stack.
pub struct IcmpError {
    pub saddr: u32,
    pub daddr: u32,
    /// Where the ICMP header starts.
    icmp_off: u8,
    /// Where the quoted IPv4 header starts.
    inner_off: u8,
    /// Where the quoted L4 header starts.
    inner_l4_off: u8,
    /// Whether the quote reaches the quoted L4 header's checksum.
    l4_csum_quoted: bool,
    /// The quoted packet's tuple.
    quoted: Flow,
}

impl IcmpError {
    /// The quoted tuple reversed: a packet of the flow going the way the
    /// error goes, whose conntrack entry says how to translate it.
    #[inline(always)]
    pub fn flow(&self) -> Flow {
        let q = &self.quoted;
        Flow {
            saddr: q.daddr,
            daddr: q.saddr,
            sport: q.dport,
            dport: q.sport,
            proto: q.proto,
            tcp_flags: 0,
            ttl: 0,
            first_fragment: false,
            l4_off: self.inner_l4_off as usize,
        }
    }
}

/// The ICMP error `msg` is, `None` for any other ICMP message or an error
/// quoting anything but the start of a TCP/UDP packet. (TC only: XDP
/// leaves ICMP to TC.)
#[inline(always)]
pub fn parse_error(ctx: &TcContext, msg: &Icmp) -> Result<Option<IcmpError>, ()> {
    let Icmp {
        saddr,
        daddr,
        icmp_off,
    } = *msg;
    // Bounded for the verifier: the outer header has at most 60 bytes.
    let icmp_off = icmp_off & 0x7f;
    if ctx.start() + MAX_HEADERS > ctx.end() {
        // An skb's quote may lie beyond its linear part; short packets
        // simply stay short.
        let _ = ctx.pull_data(core::cmp::min(MAX_HEADERS as u32, ctx.len()));
    }
    // The whole header at once: a one-byte bounds check compiles to a
    // comparison the verifier cannot use.
    let [kind, ..] = unsafe { *ptr_at::<_, [u8; ICMP_HLEN]>(ctx, icmp_off)? };
    if kind != DEST_UNREACH && kind != TIME_EXCEEDED && kind != PARAMETER_PROBLEM {
        return Ok(None);
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let inner = ptr_at::<_, Ipv4Hdr>(ctx, inner_off)?;
    let (vihl, l4proto, frags, src, dst) = unsafe {
        (
            (*inner).vihl,
            (*inner).proto,
            (*inner).frags,
            (*inner).src_addr,
            (*inner).dst_addr,
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // Only the first fragment of a datagram carries its ports.
    if vihl >> 4 != 4
        || ihl < 20
        || u16::from_be_bytes(frags) & 0x1fff != 0
        || (l4proto != proto::TCP && l4proto != proto::UDP)
    {
        return Ok(None);
    }
    let l4_off = inner_off + ihl;
    // RFC 792 quotes at least 8 bytes of the L4 header: the ports, and for
    // UDP its checksum.
    let ports = ptr_at::<_, [u16; 4]>(ctx, l4_off)?;
    let [sport, dport, _, _] = unsafe { *ports };
    let csum_end = l4_off + if l4proto == proto::TCP { 18 } else { 8 };
    Ok(Some(IcmpError {
        saddr,
        daddr,
        icmp_off: icmp_off as u8,
        inner_off: inner_off as u8,
        inner_l4_off: l4_off as u8,
        l4_csum_quoted: ctx.start() + csum_end <= ctx.end(),
        quoted: Flow {
            saddr: u32::from_ne_bytes(src),
            daddr: u32::from_ne_bytes(dst),
            sport,
            dport,
            proto: l4proto,
            tcp_flags: 0,
            ttl: 0,
            first_fragment: false,
            l4_off,
        },
    }))
}

/// Rewrites the error as a packet of its flow translated to `to` (the
/// entry's translation of [`IcmpError::flow`]): outer `to.saddr ->
/// to.daddr`, quote `to` reversed. Every header written was found whole by
/// [`parse_error`], so the error is either wholly translated or untouched.
#[inline(always)]
pub fn rewrite<C: Packet>(ctx: &C, e: &IcmpError, to: &Tuple) -> Result<(), ()> {
    let q = &e.quoted;
    let (q_saddr, q_daddr, q_sport, q_dport) = (to.daddr, to.saddr, to.dport, to.sport);
    let l4_off = e.inner_l4_off as usize;
    let icmp_check = ptr_at::<_, u16>(ctx, e.icmp_off as usize + 2)?;
    let mut icmp = unsafe { *icmp_check };

    if e.l4_csum_quoted {
        let rel = if q.proto == proto::TCP { 16 } else { 6 };
        let l4_check = ptr_at::<_, u16>(ctx, l4_off + rel)?;
        let old = unsafe { *l4_check };
        // A zero UDP checksum means "none" and stays zero.
        if q.proto == proto::TCP || old != 0 {
            let mut l4 = csum::replace32(old, q.saddr, q_saddr);
            l4 = csum::replace32(l4, q.daddr, q_daddr);
            l4 = csum::replace16(l4, q.sport, q_sport);
            l4 = csum::replace16(l4, q.dport, q_dport);
            if q.proto == proto::UDP && l4 == 0 {
                l4 = 0xffff;
            }
            icmp = csum::replace16(icmp, old, l4);
            unsafe { *l4_check = l4 };
        }
    }

    let ports = ptr_at::<_, [u16; 2]>(ctx, l4_off)?;
    icmp = csum::replace16(icmp, q.sport, q_sport);
    icmp = csum::replace16(icmp, q.dport, q_dport);
    unsafe { *ports = [q_sport, q_dport] };

    let inner = ptr_at::<_, Ipv4Hdr>(ctx, e.inner_off as usize)?;
    let old_check = u16::from_ne_bytes(unsafe { (*inner).check });
    let mut check = csum::replace32(old_check, q.saddr, q_saddr);
    check = csum::replace32(check, q.daddr, q_daddr);
    icmp = csum::replace32(icmp, q.saddr, q_saddr);
    icmp = csum::replace32(icmp, q.daddr, q_daddr);
    icmp = csum::replace16(icmp, old_check, check);
    unsafe {
        (*inner).src_addr = q_saddr.to_ne_bytes();
        (*inner).dst_addr = q_daddr.to_ne_bytes();
        (*inner).check = check.to_ne_bytes();
    }

    let icmp_check = ptr_at::<_, u16>(ctx, e.icmp_off as usize + 2)?;
    unsafe { *icmp_check = icmp };

    let outer = ptr_at::<_, Ipv4Hdr>(ctx, ETH_HLEN)?;
    let mut check = u16::from_ne_bytes(unsafe { (*outer).check });
    check = csum::replace32(check, e.saddr, to.saddr);
    check = csum::replace32(check, e.daddr, to.daddr);
    unsafe {
        (*outer).src_addr = to.saddr.to_ne_bytes();
        (*outer).dst_addr = to.daddr.to_ne_bytes();
        (*outer).check = check.to_ne_bytes();
    }
    Ok(())
}
