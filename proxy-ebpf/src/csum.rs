//! RFC 1071 Internet checksum over small fixed-size buffers (headers the
//! datapath builds itself, where an incremental update has nothing to start
//! from).

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
