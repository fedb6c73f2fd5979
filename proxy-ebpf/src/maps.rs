//! The datapath's maps. Layouts live in `proxy-common`; capacities here are
//! only defaults, the agent sets the real ones at load time.
#![allow(non_upper_case_globals)]

use core::borrow::Borrow;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    Addr6, AffinityKey, AffinityValue, Backend, Backend6, Config, Config6, CtKey, CtValue, FragKey,
    FragValue, FragmentBytes, RejectBucket, ServiceKey, ServiceKey6, ServiceValue, SockRevNat,
    SockRevNat6, SockRevNatKey, SockRevNatKey6, SourceRange, SourceRange6, StashKey, Traffic,
    defaults, maglev, served, stat,
};

// Static names are the pinned map names (`proxy_common::map_names`), which
// `bpftool map dump pinned` shows; keep them in step.
#[btf_map]
pub static kep_services: HashMap<ServiceKey, ServiceValue, { defaults::SERVICES_MAX as usize }> =
    HashMap::new();

#[btf_map]
pub static kep_backends: HashMap<u32, Backend, { defaults::BACKENDS_MAX as usize }> =
    HashMap::new();

/// TCP flows' conntrack entries. Reached only through [`CONNTRACK`].
#[btf_map]
pub static kep_ct_tcp: LruHashMap<CtKey, CtValue, { defaults::CONNTRACK_MAX as usize }> =
    LruHashMap::new();

/// Every other protocol's conntrack entries: its own LRU, so a flood of
/// short UDP flows evicts only its kind. Reached only through
/// [`CONNTRACK`].
#[btf_map]
pub static kep_ct_other: LruHashMap<CtKey, CtValue, { defaults::CONNTRACK_OTHER_MAX as usize }> =
    LruHashMap::new();

/// The conntrack table: the map an entry is in is chosen by its key's
/// protocol ([`CtKey::in_tcp_map`]), here and nowhere else. Each branch
/// calls the helper with one constant map, so the verifier still inlines
/// each lookup (one call site fed two maps would not be).
pub struct Conntrack;

pub static CONNTRACK: Conntrack = Conntrack;

impl Conntrack {
    #[inline(always)]
    pub fn get_ptr_mut(&self, key: impl Borrow<CtKey>) -> Option<*mut CtValue> {
        let key = key.borrow();
        if key.in_tcp_map() {
            kep_ct_tcp.get_ptr_mut(key)
        } else {
            kep_ct_other.get_ptr_mut(key)
        }
    }

    /// # Safety
    /// As [`LruHashMap::get`]: the entry may be changed or deleted
    /// concurrently.
    #[inline(always)]
    pub unsafe fn get(&self, key: impl Borrow<CtKey>) -> Option<&CtValue> {
        self.get_ptr_mut(key).map(|p| unsafe { &*p })
    }

    #[inline(always)]
    pub fn insert(
        &self,
        key: impl Borrow<CtKey>,
        value: impl Borrow<CtValue>,
        flags: u64,
    ) -> Result<(), i32> {
        let (key, value) = (key.borrow(), value.borrow());
        if key.in_tcp_map() {
            kep_ct_tcp.insert(key, value, flags)
        } else {
            kep_ct_other.insert(key, value, flags)
        }
    }
}

#[btf_map]
pub static kep_stats: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static kep_config: Array<Config, 1> = Array::new();

#[btf_map]
pub static kep_sock_rnat: LruHashMap<
    SockRevNatKey,
    SockRevNat,
    { defaults::SOCK_REVNAT_MAX as usize },
> = LruHashMap::new();

#[btf_map]
pub static kep_affinity: LruHashMap<
    AffinityKey,
    AffinityValue,
    { defaults::AFFINITY_MAX as usize },
> = LruHashMap::new();

/// Indexed by svc id (dense, from 1): a per-CPU array's lookup is a few
/// instructions the verifier inlines, where a hash map's is a call.
#[btf_map]
pub static kep_svc_traffic: PerCpuArray<Traffic, { defaults::TRAFFIC_MAX as usize }> =
    PerCpuArray::new();

/// Indexed by backend id, likewise.
#[btf_map]
pub static kep_be_traffic: PerCpuArray<Traffic, { defaults::TRAFFIC_MAX as usize }> =
    PerCpuArray::new();

/// No preallocation: 64 KiB per table, allocated only for frontends that
/// have one, and a replaced value is swapped in whole under RCU.
#[btf_map]
pub static kep_maglev: HashMap<
    u32,
    maglev::MaglevTable,
    { defaults::MAGLEV_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Value 1 for every allowed (frontend, client prefix).
#[btf_map]
pub static kep_src_ranges: LpmTrie<SourceRange, u8, { defaults::SOURCE_RANGES_MAX as usize }> =
    LpmTrie::new();

/// The node's own addresses, written by the agent: an endpoint there is
/// this node itself (a hostNetwork pod).
#[btf_map]
pub static kep_node_addrs: HashMap<u32, u8, { defaults::NODE_ADDRS_MAX as usize }> = HashMap::new();

/// Every endpoint's (address, port, protocol) (flags 0), written by the
/// agent: connections straight to one are tracked.
#[btf_map]
pub static kep_endpoints: HashMap<Backend, u8, { defaults::BACKENDS_MAX as usize }> =
    HashMap::new();

/// Datagrams being fragmented through: where their later fragments go.
#[btf_map]
pub static kep_frags: LruHashMap<FragKey, FragValue, { defaults::FRAGS_MAX as usize }> =
    LruHashMap::new();

/// Early fragments waiting for their first. LRU: under pressure the oldest
/// goes (that datagram is lost), never a new one's room.
#[btf_map]
pub static kep_frag_stash: LruHashMap<
    StashKey,
    FragmentBytes,
    { defaults::FRAG_STASH_MAX as usize },
> = LruHashMap::new();

/// Room for one fragment's bytes (a map value may be that big, the stack
/// may not).
#[btf_map]
pub static kep_frag_buf: PerCpuArray<FragmentBytes, 1> = PerCpuArray::new();

/// REJECT answers' rate per client address.
#[btf_map]
pub static kep_reject_rate: LruHashMap<u32, RejectBucket, { defaults::REJECT_RATE_MAX as usize }> =
    LruHashMap::new();

/// Per-CPU room to build a conntrack entry (key and value) in, off the
/// stack.
#[btf_map]
pub static kep_ct_scratch: PerCpuArray<(CtKey, CtValue), 1> = PerCpuArray::new();

// The IPv6 twins of the frontend maps (layouts: `proxy_common`'s generic
// types at `Addr6`). Without preallocation: an IPv4-only node pays nothing
// for them, a dual-stack one for the entries it writes.

#[btf_map]
pub static kep_services6: HashMap<
    ServiceKey6,
    ServiceValue,
    { defaults::SERVICES6_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
pub static kep_backends6: HashMap<
    u32,
    Backend6,
    { defaults::BACKENDS6_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
pub static kep_endpoints6: HashMap<
    Backend6,
    u8,
    { defaults::BACKENDS6_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
pub static kep_node_addrs6: HashMap<
    Addr6,
    u8,
    { defaults::NODE_ADDRS6_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
pub static kep_src_ranges6: LpmTrie<SourceRange6, u8, { defaults::SOURCE_RANGES_MAX as usize }> =
    LpmTrie::new();

#[btf_map]
pub static kep_config6: Array<Config6, 1> = Array::new();

#[btf_map]
pub static kep_sock_rnat6: LruHashMap<
    SockRevNatKey6,
    SockRevNat6,
    { defaults::SOCK_REVNAT_MAX as usize },
> = LruHashMap::new();

/// Written by the agent: see [`proxy_common::served`].
#[btf_map]
pub static kep_served: Array<served::Chunk, { served::CHUNKS as usize }> = Array::new();

pub use kep_affinity as AFFINITY;
pub use kep_backends as BACKENDS;
pub use kep_ct_scratch as CT_SCRATCH;
pub use kep_frag_buf as FRAG_BUF;
pub use kep_frag_stash as FRAG_STASH;
pub use kep_frags as FRAGS;
pub use kep_maglev as MAGLEV;
pub use kep_reject_rate as REJECT_RATE;
pub use kep_services as SERVICES;
pub use kep_sock_rnat as SOCK_REVNAT;
pub use kep_src_ranges as SOURCE_RANGES;

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = kep_stats.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Whether `to` (flags 0) is some Service's endpoint.
#[inline(always)]
pub fn is_endpoint(to: &Backend) -> bool {
    unsafe { kep_endpoints.get(to) }.is_some()
}

/// Whether `(addr, port, proto)` may be a frontend or an endpoint: false
/// proves it is neither (an array load, where each map's answer is a hash
/// lookup).
#[inline(always)]
pub fn may_be_served(addr: u32, port: u16, proto: u8) -> bool {
    let (chunk, word, mask) = served::bit(addr, port, proto);
    match kep_served.get(chunk) {
        Some(c) => c.get(word).is_some_and(|w| w & mask != 0),
        // Unreachable (the chunk is always inside the array): look it up.
        None => true,
    }
}

/// Whether `addr` (network byte order) is one of this node's own.
#[inline(always)]
pub fn is_node_address(addr: u32) -> bool {
    unsafe { kep_node_addrs.get(addr) }.is_some()
}

/// The agent's settings; all zero (no service CIDR, no hairpin address)
/// until it writes them.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    kep_config.get(0)
}

/// The agent's IPv6 settings, likewise.
#[inline(always)]
pub fn config6() -> Option<&'static Config6> {
    kep_config6.get(0)
}

/// Counts one translated packet of `bytes` for its frontend and backend.
#[inline(always)]
pub fn account(svc_id: u32, backend_id: u32, bytes: u32) {
    bump(&kep_svc_traffic, svc_id, bytes);
    bump(&kep_be_traffic, backend_id, bytes);
}

#[inline(always)]
fn bump(map: &PerCpuArray<Traffic, { defaults::TRAFFIC_MAX as usize }>, id: u32, bytes: u32) {
    // An id past the array is not counted (the agent says so when it hands
    // one out).
    if let Some(t) = map.get_ptr_mut(id) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes as u64;
        }
    }
}
