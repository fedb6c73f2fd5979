//! Parsing: the packet bounds both hooks give, the header offsets the
//! programs rewrite, and what a packet is to the datapath ([`Parsed`]): a
//! TCP/UDP packet with its 5-tuple ([`Flow`]), or ICMP (which
//! [`crate::icmp`] reads further).
//!
//! A fragmented TCP/UDP datagram's first fragment parses as a [`Flow`]
//! (it carries the ports) marked as such; its later fragments carry no
//! ports and parse as [`Parsed::Fragment`], translated like their first
//! (see [`crate::frag`]).
//!
//! What is deliberately not parsed (so passed untouched): anything that is
//! not IPv4 TCP/UDP or such an ICMP error (ICMP echo included); packets too
//! short for the headers they announce.

use aya_ebpf::programs::{TcContext, XdpContext};
use proxy_common::{CtKey, FragKey, proto};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IP_TTL_OFF: usize = ETH_HLEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// SCTP chunk types whose meaning the flow's state follows (as TCP flags).
const SCTP_INIT: u8 = 1;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN: u8 = 7;
const SCTP_SHUTDOWN_ACK: u8 = 8;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;
/// Fragment offset bits of `frag_off`.
const IP_OFFSET_MASK: u16 = 0x1fff;
/// More-fragments flag of `frag_off`.
const IP_MF: u16 = 0x2000;
/// `BPF_F_MARK_MANGLED_0`: a zero UDP checksum means "no checksum" and must
/// stay zero; the kernel skips the update and maps a computed 0 to 0xffff.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// The packet bounds both hooks give, so parsing is written once.
pub trait Packet {
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
pub fn ptr_at<C: Packet, T>(ctx: &C, off: usize) -> Result<*mut T, ()> {
    let start = ctx.start();
    if start + off + core::mem::size_of::<T>() > ctx.end() {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// The parsed 5-tuple and where its L4 header starts.
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ...); for SCTP its
    /// first chunk as TCP would say it (INIT: SYN, SHUTDOWN and
    /// SHUTDOWN ACK: FIN, ABORT and SHUTDOWN COMPLETE: RST, others: ACK);
    /// 0 for UDP.
    pub tcp_flags: u8,
    pub ttl: u8,
    /// The first fragment of a fragmented datagram.
    pub first_fragment: bool,
    pub l4_off: usize,
}

impl Flow {
    pub fn key(&self) -> CtKey {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    /// Offset of the L4 checksum field (TCP and UDP).
    pub fn csum_off(&self) -> usize {
        self.l4_off + if self.proto == proto::TCP { 16 } else { 6 }
    }

    /// Flags for `bpf_l4_csum_replace` on this flow's L4 checksum.
    pub fn l4_csum_flags(&self) -> u64 {
        if self.proto == proto::UDP {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        }
    }
}

/// What a packet is to the datapath.
pub enum Parsed {
    /// TCP or UDP: a packet of a flow.
    L4(Flow),
    /// ICMP, maybe an error about a flow: [`crate::icmp::parse_error`]
    /// tells, in a stack frame of its own.
    Icmp(Icmp),
    /// A later fragment (no ports) of a TCP or UDP datagram (see
    /// [`fragment`]).
    Fragment,
    /// Not ours: pass it.
    Other,
}

/// An ICMP message's outer addresses and where it starts.
pub struct Icmp {
    pub saddr: u32,
    pub daddr: u32,
    pub icmp_off: usize,
}

/// Parses Ethernet/IPv4 and then TCP/UDP or an ICMP error.
#[inline(always)]
pub fn parse<C: Packet>(ctx: &C) -> Result<Parsed, ()> {
    let ether_type = unsafe { *ptr_at::<_, u16>(ctx, 12)? };
    if ether_type != ETH_P_IP_BE {
        return Ok(Parsed::Other);
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
    let (saddr, daddr) = (u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
    let frags = u16::from_be_bytes(frags);
    if frags & IP_OFFSET_MASK != 0 {
        return Ok(if l4proto == proto::TCP || l4proto == proto::UDP {
            Parsed::Fragment
        } else {
            Parsed::Other
        });
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Ok(Parsed::Other);
    }
    let l4_off = ETH_HLEN + ihl;
    let first_fragment = frags & IP_MF != 0;
    if first_fragment && l4proto == proto::ICMP {
        return Ok(Parsed::Other);
    }
    if l4proto == proto::ICMP {
        return Ok(Parsed::Icmp(Icmp {
            saddr,
            daddr,
            icmp_off: l4_off,
        }));
    }
    if l4proto != proto::TCP && l4proto != proto::UDP && l4proto != proto::SCTP {
        return Ok(Parsed::Other);
    }
    // The CRC32c of an SCTP datagram covers every fragment.
    if first_fragment && l4proto == proto::SCTP {
        return Ok(Parsed::Other);
    }
    // The whole fixed header (with the checksum, and SCTP's first chunk
    // type) must be present before anything is rewritten; each is read
    // whole, through the one bounds check the verifier sees.
    let ((sport, dport), tcp_flags) = match l4proto {
        proto::TCP => {
            let h = unsafe { *ptr_at::<_, [u8; 20]>(ctx, l4_off)? };
            (ports_of(&h), h[13])
        }
        proto::UDP => {
            let h = unsafe { *ptr_at::<_, [u8; 8]>(ctx, l4_off)? };
            (ports_of(&h), 0)
        }
        _ => {
            let h = unsafe { *ptr_at::<_, [u8; 16]>(ctx, l4_off)? };
            let flags = match h[12] {
                SCTP_INIT => TCP_SYN,
                SCTP_SHUTDOWN | SCTP_SHUTDOWN_ACK => TCP_FIN | TCP_ACK,
                SCTP_ABORT | SCTP_SHUTDOWN_COMPLETE => TCP_RST | TCP_ACK,
                _ => TCP_ACK,
            };
            (ports_of(&h), flags)
        }
    };
    Ok(Parsed::L4(Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto: l4proto,
        tcp_flags,
        ttl,
        first_fragment,
        l4_off,
    }))
}

/// The ports (as stored) at the start of an L4 header.
#[inline(always)]
fn ports_of<const N: usize>(h: &[u8; N]) -> (u16, u16) {
    (
        u16::from_ne_bytes([h[0], h[1]]),
        u16::from_ne_bytes([h[2], h[3]]),
    )
}

/// The datagram of a TCP/UDP fragment, as it comes (before any
/// translation), and whether it is the first (`None` for any other
/// packet).
#[inline(always)]
pub fn fragment<C: Packet>(ctx: &C) -> Option<(FragKey, bool)> {
    let ip = ptr_at::<_, network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN).ok()?;
    let (frags, l4proto) = unsafe { (u16::from_be_bytes((*ip).frags), (*ip).proto) };
    if frags & (IP_MF | IP_OFFSET_MASK) == 0
        || (l4proto != proto::TCP && l4proto != proto::UDP)
        || unsafe { *ptr_at::<_, u16>(ctx, 12).ok()? } != ETH_P_IP_BE
    {
        return None;
    }
    let key = unsafe {
        FragKey {
            saddr: u32::from_ne_bytes((*ip).src_addr),
            daddr: u32::from_ne_bytes((*ip).dst_addr),
            id: u16::from_ne_bytes((*ip).id),
            proto: l4proto,
            _pad: 0,
        }
    };
    Some((key, frags & IP_OFFSET_MASK == 0))
}
