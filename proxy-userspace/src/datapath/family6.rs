//! The IPv6 frontend maps (`map_names::FAMILY6`): the twins of the IPv4
//! services, backends, endpoints, node-address and source-range maps, with
//! the same layouts at [`Addr6`]. The agent's contents hold both families
//! in one ([`MapAddr`]); the key's family picks the map here, and nowhere
//! else.

use std::collections::BTreeSet;

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie},
};
use proxy_common::{
    Addr6, Backend6, ServiceKey6, ServiceValue, SourceRange6, SourceRangeOf, map_names,
};

use super::{DatapathError, ignore_missing, map_err, read_hash, take_map};
use crate::contents::{
    AnyBackend, MapAddr, RangeEntry, SvcKey, backend6, ip_from_map, ip_to_map, svc_key6,
};

/// The IPv6 services and backends as [`Maps6::read`] finds them.
pub(super) type Read6 = (Vec<(SvcKey, ServiceValue)>, Vec<(u32, AnyBackend)>);

pub(super) struct Maps6 {
    pub(super) services: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub(super) backends: HashMap<MapData, u32, Backend6>,
    pub(super) endpoints: HashMap<MapData, Backend6, u8>,
    pub(super) node_addrs: HashMap<MapData, Addr6, u8>,
    pub(super) source_ranges: LpmTrie<MapData, SourceRange6, u8>,
}

impl Maps6 {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            services: take_map(ebpf, map_names::SERVICES6)?,
            backends: take_map(ebpf, map_names::BACKENDS6)?,
            endpoints: take_map(ebpf, map_names::ENDPOINTS6)?,
            node_addrs: take_map(ebpf, map_names::NODE_ADDRS6)?,
            source_ranges: ebpf
                .take_map(map_names::SOURCE_RANGES6)
                .ok_or(DatapathError::MissingMap(map_names::SOURCE_RANGES6))?
                .try_into()
                .map_err(map_err(map_names::SOURCE_RANGES6))?,
        })
    }

    /// The IPv6 services and backends, in the agent's form.
    pub(super) fn read(&self) -> Result<Read6, DatapathError> {
        let services = read_hash(&self.services).map_err(map_err(map_names::SERVICES6))?;
        let backends = read_hash(&self.backends).map_err(map_err(map_names::BACKENDS6))?;
        Ok((
            services
                .into_iter()
                .map(|(k, v)| (svc_key6(k), v))
                .collect(),
            backends
                .into_iter()
                .map(|(id, b)| (id, backend6(b)))
                .collect(),
        ))
    }

    pub(super) fn read_ranges(&self) -> Result<BTreeSet<RangeEntry>, DatapathError> {
        read_ranges(&self.source_ranges, MapAddr::V6).map_err(map_err(map_names::SOURCE_RANGES6))
    }

    pub(super) fn put_range(&mut self, r: &RangeEntry, addr: Addr6) -> Result<(), MapError> {
        self.source_ranges.insert(&range_key(r, addr), 1, 0)
    }

    pub(super) fn delete_range(&mut self, r: &RangeEntry, addr: Addr6) -> Result<(), MapError> {
        ignore_missing(self.source_ranges.remove(&range_key(r, addr)))
    }
}

/// Every allowed prefix in a source-ranges trie of either family.
pub(crate) fn read_ranges<A: Copy>(
    trie: &LpmTrie<MapData, SourceRangeOf<A>, u8>,
    family: fn(A) -> MapAddr,
) -> Result<BTreeSet<RangeEntry>, MapError>
where
    SourceRangeOf<A>: aya::Pod,
{
    trie.keys()
        .map(|key| {
            let key = key?;
            let data = key.data();
            Ok(RangeEntry {
                svc_id: u32::from_be(data.svc_id_be),
                addr: ip_from_map(family(data.addr)),
                prefix_len: key
                    .prefix_len()
                    .saturating_sub(SourceRangeOf::<A>::SVC_BITS) as u8,
            })
        })
        .collect()
}

/// The trie key of one allowed prefix (`addr`: its address in its family's
/// map form): the svc id matched whole, then the prefix's own length.
pub(super) fn range_key<A>(r: &RangeEntry, addr: A) -> lpm_trie::Key<SourceRangeOf<A>>
where
    SourceRangeOf<A>: aya::Pod,
{
    lpm_trie::Key::new(
        SourceRangeOf::<A>::SVC_BITS + u32::from(r.prefix_len),
        SourceRangeOf {
            svc_id_be: r.svc_id.to_be(),
            addr,
        },
    )
}

/// Makes the keys of a set-like map (`key -> 1`) exactly `want`; how many
/// changed. The endpoints and node-address maps of both families.
pub(super) fn sync_set<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u8>,
    want: &BTreeSet<K>,
) -> Result<usize, MapError> {
    let have: BTreeSet<K> = map.keys().filter_map(Result::ok).collect();
    for gone in have.difference(want) {
        ignore_missing(map.remove(gone))?;
    }
    for new in want.difference(&have) {
        map.insert(new, 1, 0)?;
    }
    Ok(have.symmetric_difference(want).count())
}

/// A range's address in the map form of its family.
pub(super) fn range_addr(r: &RangeEntry) -> MapAddr {
    ip_to_map(r.addr)
}
