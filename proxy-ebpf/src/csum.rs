//! RFC 1071 Internet checksum over small fixed-size buffers (headers the
//! datapath builds itself, where an incremental update has nothing to start
//! from), and RFC 1624 incremental updates where no kernel helper does them
//! (XDP).

/// One's-complement partial sum of big-endian 16-bit words; buffers summed
/// separately may be added as long as each has an even length.
#[inline(always)]
pub fn sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    if N % 2 == 1 {
        sum += (bytes[N - 1] as u32) << 8;
    }
    sum
}

/// Folds a partial sum and inverts it, ready to store in network order.
#[inline(always)]
pub fn finish(mut sum: u32) -> [u8; 2] {
    // Two folds always suffice for a 32-bit sum; a `while` would be an
    // unbounded loop to the verifier.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The value `v` for a checksum field over bytes whose other words sum to
/// `rest` such that a software completion of the field (the kernel's
/// `skb_checksum_help`: the inverted fold of every covered word, the field
/// included) writes `v` again. In one's-complement arithmetic (integers
/// mod 0xffff) it solves v = -(rest + v), i.e. v = -rest / 2; halving is a
/// rotation by one bit, since 2^16 = 1 (mod 0xffff). (0 and 0xffff are the
/// same number there, so a completion mapping 0 to 0xffff changes nothing
/// a sum over the field sees.)
#[inline(always)]
pub fn completion_fixed_point(rest: u32) -> u16 {
    let folded = (rest & 0xffff) + (rest >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    (!(folded as u16)).rotate_right(1)
}

/// RFC 1624 update of `check` for one 16-bit word going from `old` to
/// `new`. Values are as stored in the packet: a one's-complement sum does
/// not depend on byte order as long as it is the same throughout.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    // Two folds suffice for a sum of three 16-bit values.
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// [`replace16`] for a 32-bit field (an address), as stored.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let check = replace16(check, old as u16, new as u16);
    replace16(check, (old >> 16) as u16, (new >> 16) as u16)
}
