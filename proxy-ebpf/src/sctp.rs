//! SCTP: its packets are translated like TCP's (addresses and ports, the
//! same conntrack), but its checksum is a CRC32c over the SCTP packet alone
//! (RFC 4960 appendix B): no pseudo-header, so addresses change nothing in
//! it, and the ports are its first four bytes.
//!
//! A CRC is linear over XOR for messages of one length, so changing the
//! ports by `D` changes the CRC by the raw CRC (no initial value, no final
//! XOR) of `D` followed by as many zero bytes as the rest of the packet:
//! `raw(D) * x^(8k) mod P`. The powers `x^(8k)` are a table built at
//! compile time, one multiplication per packet: the packet's payload is
//! never read. (Cilium keeps SCTP ports unchanged instead and drops
//! Services whose targetPort differs; here they work.)
//!
//! A CRC field of zero is left alone: the sender's kernel offloaded the
//! CRC (a pod's SCTP over its veth is CHECKSUM_PARTIAL, computed when the
//! packet leaves or never, for local delivery) and the CRC is computed
//! later over the packet as it then is. A real CRC of zero (one packet in
//! 2^32) is then left wrong, and the peer's retransmission carries another.

use aya_ebpf::{cty::c_void, helpers::bpf_loop, programs::TcContext};
use proxy_common::stat;

use crate::maps::count;
use crate::packet::{ETH_HLEN, Flow};

/// CRC32c's polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;
/// Longest SCTP packet whose CRC can be updated (a 9,000-byte MTU's).
pub const MAX_LEN: usize = 9216;
/// Offset of the CRC in the SCTP common header.
pub const CRC_OFF: usize = 8;

const fn byte_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static BYTES: [u32; 256] = byte_table();

/// `x^(8k) mod P` (reflected) for k zero bytes appended.
const fn zero_bytes_table() -> [u32; MAX_LEN] {
    let bytes = byte_table();
    let mut table = [0u32; MAX_LEN];
    // x^0: the highest bit in the reflected representation.
    let mut power = 1u32 << 31;
    let mut k = 0;
    while k < MAX_LEN {
        table[k] = power;
        power = (power >> 8) ^ bytes[(power & 0xff) as usize];
        k += 1;
    }
    table
}

static ZERO_BYTES: [u32; MAX_LEN] = zero_bytes_table();

/// One step of [`multiply`]: bit `i` (from the top) of `a`.
#[repr(C)]
struct Product {
    a: u32,
    b: u32,
    product: u32,
}

unsafe extern "C" fn multiply_step(i: u32, ctx: *mut c_void) -> i64 {
    let p = unsafe { &mut *(ctx as *mut Product) };
    p.product ^= p.b & 0u32.wrapping_sub((p.a >> (31 - (i & 31))) & 1);
    p.b = (p.b >> 1) ^ (POLY & 0u32.wrapping_sub(p.b & 1));
    0
}

/// `a * b mod P` in the reflected representation, by `bpf_loop`: the
/// verifier checks the step once instead of 32 unrolled copies on every
/// path that reaches it.
#[inline(always)]
fn multiply(a: u32, b: u32) -> u32 {
    let mut p = Product { a, b, product: 0 };
    unsafe {
        bpf_loop(
            32,
            multiply_step as *mut c_void,
            &mut p as *mut Product as *mut c_void,
            0,
        )
    };
    p.product
}

/// The CRC change of a packet of `len` bytes whose first four bytes change
/// by `delta` (as stored).
#[inline(always)]
pub fn crc_delta(delta: [u8; 4], len: usize) -> Option<u32> {
    let k = len.checked_sub(4)?;
    let power = *ZERO_BYTES.get(k)?;
    let mut raw = 0u32;
    for d in delta {
        raw = (raw >> 8) ^ BYTES[((raw ^ d as u32) & 0xff) as usize];
    }
    Some(multiply(power, raw))
}

/// Updates the CRC of the SCTP packet `flow` for its ports becoming
/// `sport`, `dport` (which the caller writes). Fails (and counts) when the
/// packet is too long for the tables. (Through the skb helpers: with the
/// packet's own pointers the compiler hands this frame the packet bounds
/// as plain numbers, which the verifier refuses.)
#[inline(never)]
pub fn ports_changed(ctx: &TcContext, flow: &Flow, sport: u16, dport: u16) -> Result<(), ()> {
    let tot_len: [u8; 2] = ctx.load(ETH_HLEN + 2).map_err(|_| ())?;
    let len = (u16::from_be_bytes(tot_len) as usize).saturating_sub(flow.l4_off - ETH_HLEN);
    let old = u32::from_le_bytes(ctx.load(flow.l4_off + CRC_OFF).map_err(|_| ())?);
    if old == 0 || (sport, dport) == (flow.sport, flow.dport) {
        return Ok(());
    }
    let [a, b] = (flow.sport ^ sport).to_ne_bytes();
    let [c, d] = (flow.dport ^ dport).to_ne_bytes();
    let Some(delta) = crc_delta([a, b, c, d], len) else {
        count(stat::SCTP_CRC_FAILED);
        return Err(());
    };
    ctx.store(flow.l4_off + CRC_OFF, &(old ^ delta).to_le_bytes(), 0)
        .map_err(|_| ())
}
