//! Frontend lookup and backend choice, shared by the packet path (TC) and
//! the socket path (cgroup hooks) so both apply the same Service rules,
//! written once for both address families ([`Family`]: `u32` for IPv4,
//! [`Addr6`] for IPv6, each naming its own maps).

use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use proxy_common::{
    Addr6, AffinityKey, AffinityValue, BackendOf, MAX_SERVICE_CIDRS, ServiceKeyOf, ServiceValue,
    SourceRange, SourceRange6, scope, stat,
};

use crate::maps::{
    AFFINITY, BACKENDS, MAGLEV, SERVICES, SOURCE_RANGES, config, config6, count, kep_backends6,
    kep_services6, kep_src_ranges6,
};

/// An address family as the choice sees it: its frontend, backend and
/// source-range maps and its service CIDRs. Ids (svc ids, backend ids) are
/// shared by both families, so Maglev tables and affinity entries are too.
pub trait Family: Copy + PartialEq + 'static {
    fn service(key: ServiceKeyOf<Self>) -> Option<&'static ServiceValue>;
    fn backend(id: u32) -> Option<&'static BackendOf<Self>>;
    /// Whether `client` is inside one of frontend `svc_id`'s source ranges.
    fn source_allowed(svc_id: u32, client: Self) -> bool;
    /// The affinity entry of `client` at frontend `svc_id`.
    fn affinity_key(svc_id: u32, client: Self) -> AffinityKey;
    /// Whether the address is inside one of the family's service CIDRs.
    fn in_service_cidr(addr: &Self) -> bool;
}

impl Family for u32 {
    #[inline(always)]
    fn service(key: ServiceKeyOf<u32>) -> Option<&'static ServiceValue> {
        unsafe { SERVICES.get(key) }
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<&'static BackendOf<u32>> {
        unsafe { BACKENDS.get(id) }
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, client: u32) -> bool {
        let key = Key::new(
            SourceRange::SVC_BITS + 32,
            SourceRange {
                svc_id_be: svc_id.to_be(),
                addr: client,
            },
        );
        SOURCE_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn affinity_key(svc_id: u32, client: u32) -> AffinityKey {
        AffinityKey { svc_id, client }
    }

    #[inline(always)]
    fn in_service_cidr(addr: &u32) -> bool {
        config().is_some_and(|c| {
            any_cidr(&c.service_cidrs, c.service_cidr_count, |r| {
                r.contains(*addr)
            })
        })
    }
}

impl Family for Addr6 {
    #[inline(always)]
    fn service(key: ServiceKeyOf<Addr6>) -> Option<&'static ServiceValue> {
        unsafe { kep_services6.get(key) }
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<&'static BackendOf<Addr6>> {
        unsafe { kep_backends6.get(id) }
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, client: Addr6) -> bool {
        let key = Key::new(
            SourceRange6::SVC_BITS + 128,
            SourceRange6 {
                svc_id_be: svc_id.to_be(),
                addr: client,
            },
        );
        kep_src_ranges6.get(&key).is_some()
    }

    /// Only the socket hooks choose for IPv6 so far, and their client is
    /// the node itself (the unspecified address, as 0 for IPv4): one entry
    /// per frontend in the shared map, as for IPv4 sockets. Per-client
    /// IPv6 affinity needs its own map when the packet path comes.
    #[inline(always)]
    fn affinity_key(svc_id: u32, _client: Addr6) -> AffinityKey {
        AffinityKey { svc_id, client: 0 }
    }

    #[inline(always)]
    fn in_service_cidr(addr: &Addr6) -> bool {
        config6()
            .is_some_and(|c| any_cidr(&c.service_cidrs, c.service_cidr_count, |r| r.contains(addr)))
    }
}

/// What a new flow to `(addr, port, proto)` gets.
pub enum Choice<A = u32> {
    /// Translate to this backend; `masquerade`: also translate the source
    /// to the node's address (external traffic, externalTrafficPolicy
    /// Cluster); `node_address`: the frontend is one of the node's own
    /// addresses.
    Backend {
        id: u32,
        backend: BackendOf<A>,
        svc_id: u32,
        masquerade: bool,
        node_address: bool,
    },
    /// No usable endpoint, or a cluster IP on a port it does not serve:
    /// kube-proxy REJECT.
    Reject,
    /// kube-proxy DROP (no local endpoint for a Local policy, or an
    /// unallocated address in the service CIDR).
    Drop,
    /// Not a Service address: leave it alone.
    Pass,
}

/// `client` is the source address, for ClientIP session affinity and
/// source ranges; `flow_hash` picks the Maglev table position
/// (`maglev::flow_hash` of the packet's 5-tuple, or any well-spread value
/// where there is none); `external`: the packet arrived on a node interface,
/// so a frontend's external entry applies.
#[inline(always)]
pub fn choose<A: Family>(
    addr: A,
    port: u16,
    proto: u8,
    client: A,
    flow_hash: u32,
    external: bool,
) -> Choice<A> {
    let mut key = ServiceKeyOf::new(addr, port, proto, 0);
    let Some(found) = A::service(key) else {
        return not_a_frontend(addr);
    };
    let mut svc = *found;
    if external && svc.has_external_scope() {
        let ext = key.with_scope(scope::EXTERNAL);
        // Without it (not written yet) the entry for everyone serves.
        if let Some(found) = A::service(ext) {
            key = ext;
            svc = *found;
        }
    }
    if svc.checks_source_ranges() && !A::source_allowed(svc.svc_id, client) {
        count(stat::SOURCE_RANGE_DROPS);
        return Choice::Drop;
    }
    if svc.count == 0 {
        if svc.drops() {
            count(stat::DROPS);
            return Choice::Drop;
        }
        return Choice::Reject;
    }
    let masquerade = external && svc.masquerades();
    if svc.affinity_timeout_s == 0 {
        return pick(key, &svc, flow_hash, masquerade);
    }
    // ClientIP affinity: the endpoint this client used last, while its
    // entry is fresh and the endpoint still exists.
    let akey = A::affinity_key(svc.svc_id, client);
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
    if let Some(entry) = AFFINITY.get_ptr_mut(akey) {
        let kept = unsafe { *entry };
        if now.saturating_sub(kept.last_used_ns) <= timeout_ns {
            if let Some(backend) = A::backend(kept.backend_id) {
                unsafe { (*entry).last_used_ns = now };
                return Choice::Backend {
                    id: kept.backend_id,
                    backend: *backend,
                    svc_id: svc.svc_id,
                    masquerade,
                    node_address: svc.on_node_address(),
                };
            }
        }
    }
    // The flow's own hash, not the client's: once the affinity times out the
    // client must be able to land elsewhere (Kubernetes' conformance test
    // waits for a different endpoint; a client-keyed position would always
    // give the same one).
    let choice = pick(key, &svc, flow_hash, masquerade);
    if let Choice::Backend { id, .. } = choice {
        let value = AffinityValue {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        };
        // Without the entry the next flow is simply balanced afresh.
        let _ = AFFINITY.insert(akey, value, 0);
    }
    choice
}

/// The backend of the frontend at `key` (slot 0): its Maglev table's entry
/// for `hash`, or a random slot (the algorithm chosen, or no table).
#[inline(always)]
fn pick<A: Family>(
    key: ServiceKeyOf<A>,
    svc: &ServiceValue,
    hash: u32,
    masquerade: bool,
) -> Choice<A> {
    let from_table = if svc.uses_maglev() {
        maglev_entry(svc.svc_id, hash)
    } else {
        None
    };
    let id = match from_table {
        Some(id) => id,
        None => {
            let slot = (unsafe { bpf_get_prandom_u32() } % svc.count as u32) as u16 + 1;
            let Some(id) = A::service(key.with_slot(slot)).map(|v| v.backend_id) else {
                count(stat::UNTRANSLATABLE);
                return Choice::Drop;
            };
            id
        }
    };
    match A::backend(id) {
        Some(backend) => Choice::Backend {
            id,
            backend: *backend,
            svc_id: svc.svc_id,
            masquerade,
            node_address: svc.on_node_address(),
        },
        None => {
            count(stat::UNTRANSLATABLE);
            Choice::Drop
        }
    }
}

#[inline(always)]
fn maglev_entry(svc_id: u32, hash: u32) -> Option<u32> {
    let table = unsafe { MAGLEV.get(&svc_id) }?;
    let size = table.size();
    if size == 0 {
        return None;
    }
    table.entry(hash % size)
}

/// Inside the service CIDR, kube-proxy rejects traffic to a cluster IP on a
/// port or protocol it does not serve, and drops traffic to addresses no
/// Service has; everything else is not ours.
#[inline(always)]
fn not_a_frontend<A: Family>(addr: A) -> Choice<A> {
    if !A::in_service_cidr(&addr) {
        Choice::Pass
    } else if A::service(ServiceKeyOf::cluster_ip(addr)).is_some() {
        Choice::Reject
    } else {
        count(stat::UNALLOCATED_DROPS);
        Choice::Drop
    }
}

/// Whether one of the first `count` prefixes `contains` the address (none
/// until the agent writes its settings). Every slot is looked at: one
/// bounded loop, whatever the count.
#[inline(always)]
fn any_cidr<C>(cidrs: &[C; MAX_SERVICE_CIDRS], count: u32, contains: impl Fn(&C) -> bool) -> bool {
    let mut inside = false;
    let mut i = 0;
    while i < MAX_SERVICE_CIDRS {
        if (i as u32) < count && contains(&cidrs[i]) {
            inside = true;
        }
        i += 1;
    }
    inside
}
