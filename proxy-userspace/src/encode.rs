//! Desired state -> the exact contents of the services and backends maps.
//!
//! The [`Encoder`] owns the id allocators and lives as long as the agent, so
//! a frontend keeps its `svc_id` and an `(addr, port, proto)` keeps its
//! backend id for as long as they exist. Stable ids are what make updates
//! small: an endpoint added to one Service changes one slot and one backend,
//! not every entry after it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::{
    SVC_FLAG_DROP, SVC_FLAG_EXTERNAL_SCOPE, SVC_FLAG_MAGLEV, SVC_FLAG_MASQUERADE,
    SVC_FLAG_NODE_ADDRESS, SVC_FLAG_REJECT, SVC_FLAG_SOURCE_RANGES, ServiceValue, scope,
};

use crate::contents::{
    AnyBackend, Footprint, MapContents, RangeEntry, SvcKey, ip_from_map, ip_to_map, port_from_map,
    port_to_map,
};
use crate::maglev::{TableBackend, TableSpec};
use crate::model::{
    DesiredState, EmptyAction, Endpoint, ExternalTraffic, Frontend, FrontendKind, FrontendState,
    Protocol,
};

/// The range entries of one services-map entry.
fn source_ranges(
    svc_id: u32,
    frontend: Frontend,
    external: &ExternalTraffic,
) -> impl Iterator<Item = RangeEntry> + '_ {
    let ranges = external.source_ranges.iter().map(move |cidr| RangeEntry {
        svc_id,
        addr: cidr.addr,
        prefix_len: cidr.prefix_len,
    });
    // Socket-level translation of the node's own processes asks with
    // client 0.0.0.0 (`::` for IPv6; a socket has no source yet): the node
    // is let in exactly when this entry exists.
    let (unspecified, len) = match frontend.addr {
        IpAddr::V4(_) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32),
        IpAddr::V6(_) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),
    };
    let node = external.allow_node.then_some(RangeEntry {
        svc_id,
        addr: unspecified,
        prefix_len: len,
    });
    ranges.chain(node)
}

/// How new flows pick among a frontend's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbAlgorithm {
    /// A random slot per new flow.
    Random,
    /// The frontend's Maglev table of this (prime) size, indexed by the
    /// flow's hash: the same flow reaches the same endpoint on every node,
    /// and an endpoint change moves few flows.
    Maglev { table_size: u32 },
}

/// The algorithm of each kind of services-map entry.
///
/// Traffic from outside the cluster (the `scope::EXTERNAL` entry of a
/// NodePort, load-balancer IP or external IP) may reach any node, and after
/// a node or its conntrack state is lost, another one: only a table every
/// node builds alike sends the flow to the same endpoint there. Traffic
/// from inside (cluster IPs, and pods or the node reaching any frontend) is
/// always translated on the client's own node, which keeps the flow in its
/// conntrack: consistent hashing buys little there and costs a table of
/// `4 × (3 + M)` bytes per frontend, so it is `Random` by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbAlgorithms {
    pub external: LbAlgorithm,
    pub internal: LbAlgorithm,
}

impl LbAlgorithms {
    /// The same algorithm for every entry.
    pub const fn everywhere(algorithm: LbAlgorithm) -> Self {
        Self {
            external: algorithm,
            internal: algorithm,
        }
    }

    fn of(&self, entry_scope: u8) -> LbAlgorithm {
        if entry_scope == scope::EXTERNAL {
            self.external
        } else {
            self.internal
        }
    }
}

/// What a backend id stands for: the frontend's protocol is part of it
/// because the datapath's backend entry carries one.
type BackendKey = (IpAddr, u16, Protocol);

/// Hands out the lowest free id >= 1 (0 means "none" in the maps) per key.
#[derive(Debug)]
struct Ids<K> {
    by_key: BTreeMap<K, u32>,
    /// Ids not available for allocation: owned by a key, or still present in
    /// the live maps without an owner (see [`Encoder::seed_from`]).
    taken: BTreeSet<u32>,
    /// Released ids below `next`.
    free: BTreeSet<u32>,
    /// Lowest id never handed out; `u64` so exhausting `u32` is not an
    /// overflow.
    next: u64,
    /// Ids reserved by seeding without an owner, released after the next
    /// round.
    orphans: BTreeSet<u32>,
}

impl<K: Ord + Clone> Ids<K> {
    fn new() -> Self {
        Self {
            by_key: BTreeMap::new(),
            taken: BTreeSet::new(),
            free: BTreeSet::new(),
            next: 1,
            orphans: BTreeSet::new(),
        }
    }

    fn get_or_alloc(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.by_key.get(key) {
            return Some(*id);
        }
        let id = self.alloc()?;
        self.by_key.insert(key.clone(), id);
        Some(id)
    }

    fn alloc(&mut self) -> Option<u32> {
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => {
                // Seeded ids may sit anywhere above `next`; step over them.
                while u32::try_from(self.next).is_ok_and(|id| self.taken.contains(&id)) {
                    self.next += 1;
                }
                let id = u32::try_from(self.next).ok()?;
                self.next += 1;
                id
            }
        };
        self.taken.insert(id);
        Some(id)
    }

    fn release(&mut self, id: u32) {
        if self.taken.remove(&id) && u64::from(id) < self.next {
            self.free.insert(id);
        }
    }

    /// Adopts `id` for `key` if both are unclaimed; otherwise keeps the id
    /// out of circulation until the next round, because the live maps still
    /// hold it and reusing it at once would repoint entries not yet deleted.
    fn seed(&mut self, key: Option<K>, id: u32) {
        if id == 0 || self.taken.contains(&id) {
            return;
        }
        self.free.remove(&id);
        self.taken.insert(id);
        match key {
            Some(key) if !self.by_key.contains_key(&key) => {
                self.by_key.insert(key, id);
            }
            _ => {
                self.orphans.insert(id);
            }
        }
    }

    /// Frees the id of `key`, if it has one.
    fn release_key(&mut self, key: &K) {
        if let Some(id) = self.by_key.remove(key) {
            self.release(id);
        }
    }

    /// Frees the ids seeding found without an owner: the round that
    /// removes their entries from the maps has been computed.
    fn release_orphans(&mut self) {
        for id in std::mem::take(&mut self.orphans) {
            self.release(id);
        }
    }
}

/// What one frontend put into the maps, so that a change to it can take
/// exactly that back. Kept for every frontend, so it is kept small: its
/// services-map keys follow from its entries' scopes and slot counts.
#[derive(Debug, Default)]
struct Written {
    /// Its services-map entries (slot 0 and slots `1..=count`) by scope;
    /// Maglev tables and source ranges hang off their svc ids.
    entries: [Option<Entry>; 2],
    /// Backend ids it references (slots and lingering endpoints), once each.
    backends: Box<[u32]>,
    /// A cluster IP: it needs its address's port-less entry.
    cluster_ip: bool,
}

/// One services-map entry of a frontend, in one scope.
#[derive(Clone, Copy, Debug)]
struct Entry {
    scope: u8,
    svc_id: u32,
    count: u16,
}

impl Written {
    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().flatten()
    }

    /// Its svc ids by scope.
    fn svc_ids(&self) -> impl Iterator<Item = (u8, u32)> + '_ {
        self.entries().map(|e| (e.scope, e.svc_id))
    }

    /// Its services-map keys (both scopes, slot 0 and slots).
    fn keys(&self, frontend: Frontend) -> impl Iterator<Item = SvcKey> + '_ {
        let key = frontend_key(frontend);
        self.entries().flat_map(move |e| {
            (0..=e.count).map(move |slot| key.with_scope(e.scope).with_slot(slot))
        })
    }

    fn add(&mut self, entry: Entry) {
        if let Some(free) = self.entries.iter_mut().find(|e| e.is_none()) {
            *free = Some(entry);
        }
    }
}

/// The slot-0 key of `frontend`'s entry for everyone (scope `ALL`).
fn frontend_key(frontend: Frontend) -> SvcKey {
    SvcKey::new(
        ip_to_map(frontend.addr),
        port_to_map(frontend.port),
        frontend.proto.number(),
        0,
    )
}

/// One frontend's map contents, before they are merged.
#[derive(Default)]
struct Encoded {
    written: Written,
    services: Vec<(SvcKey, ServiceValue)>,
    tables: Vec<(u32, TableSpec)>,
    ranges: Vec<RangeEntry>,
    backends: BTreeMap<u32, (BackendKey, AnyBackend)>,
}

/// Turns frontends into map contents with ids stable across calls, keeping
/// the whole desired contents up to date one frontend at a time.
#[derive(Debug)]
pub struct Encoder {
    /// Per frontend and scope (`proxy_common::scope`).
    svc_ids: Ids<(Frontend, u8)>,
    backend_ids: Ids<BackendKey>,
    algorithms: LbAlgorithms,
    /// Everything the maps should hold.
    desired: MapContents,
    written: std::collections::HashMap<Frontend, Written>,
    /// Frontends referencing each backend id.
    backend_refs: std::collections::HashMap<u32, u32>,
    /// Cluster-IP frontends on each address (its port-less entry).
    cluster_ip_refs: std::collections::HashMap<IpAddr, u32>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// Random selection (no tables); the agent picks with
    /// [`Encoder::with_algorithms`].
    pub fn new() -> Self {
        Self::with_algorithms(LbAlgorithms::everywhere(LbAlgorithm::Random))
    }

    pub fn with_algorithms(algorithms: LbAlgorithms) -> Self {
        Self {
            svc_ids: Ids::new(),
            backend_ids: Ids::new(),
            algorithms,
            desired: MapContents::default(),
            written: Default::default(),
            backend_refs: Default::default(),
            cluster_ip_refs: Default::default(),
        }
    }

    /// Adopt ids already present in live maps (agent restart): the same
    /// (addr, port, proto) keeps its backend id and the same frontend keeps
    /// its svc_id, so a restart rewrites nothing and established flows keep
    /// matching their conntrack entries. Meant to be called before the first
    /// [`Encoder::update`]; ids already owned are never taken over.
    pub fn seed_from(&mut self, live: &MapContents) {
        for (id, backend) in &live.backends {
            let key = Protocol::from_number(backend.proto).map(|proto| {
                (
                    ip_from_map(backend.addr),
                    port_from_map(backend.port),
                    proto,
                )
            });
            self.backend_ids.seed(key, *id);
        }
        for (key, value) in live.services.iter().filter(|(key, _)| key.slot == 0) {
            let frontend = Protocol::from_number(key.proto).map(|proto| {
                let frontend = Frontend {
                    addr: ip_from_map(key.addr),
                    port: port_from_map(key.port),
                    proto,
                };
                (frontend, key.scope)
            });
            self.svc_ids.seed(frontend, value.svc_id);
        }
    }

    /// Everything the maps should hold after the updates so far.
    pub fn desired(&self) -> &MapContents {
        &self.desired
    }

    /// The exact map contents for `desired`, as a whole.
    pub fn encode(&mut self, desired: &DesiredState) -> MapContents {
        let gone: Vec<Frontend> = self
            .written
            .keys()
            .filter(|f| !desired.frontends.contains_key(f))
            .copied()
            .collect();
        self.update(
            gone.into_iter().map(|f| (f, None)).chain(
                desired
                    .frontends
                    .iter()
                    .map(|(frontend, state)| (*frontend, Some(state))),
            ),
        );
        self.desired.clone()
    }

    /// Re-encodes the frontends given (`None`: removed) and returns the keys
    /// whose desired contents may have changed. Ids given up are released
    /// only after this call, so an id is never reused within the update that
    /// removes its previous owner.
    pub fn update<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (Frontend, Option<&'a FrontendState>)>,
    ) -> Footprint {
        let mut footprint = Footprint::default();
        let mut dropped_frontends: Vec<(Frontend, u8)> = Vec::new();
        let mut dropped_backends: Vec<BackendKey> = Vec::new();
        for (frontend, state) in changes {
            let new = state.map(|state| self.encode_frontend(frontend, state));
            let old = self.written.remove(&frontend);
            // Take references first, then drop the old ones, so what both
            // use never drops to zero in between.
            if let Some(new) = new {
                for (id, (key, backend)) in new.backends {
                    let refs = self.backend_refs.entry(id).or_default();
                    *refs += 1;
                    if *refs == 1 {
                        self.desired.backends.insert(id, backend);
                        footprint.backends.insert(id);
                    }
                    let _ = key;
                }
                if new.written.cluster_ip {
                    let addr = frontend.addr;
                    let refs = self.cluster_ip_refs.entry(addr).or_default();
                    *refs += 1;
                    if *refs == 1 {
                        let key = SvcKey::cluster_ip(ip_to_map(addr));
                        self.desired
                            .services
                            .insert(key, ServiceValue::service(0, 0, SVC_FLAG_REJECT));
                        footprint.services.insert(key);
                    }
                }
                if let Some(old) = &old {
                    for key in old.keys(frontend) {
                        self.desired.services.remove(&key);
                        footprint.services.insert(key);
                    }
                    for (_, id) in old.svc_ids() {
                        self.forget_svc_id(id, &mut footprint);
                    }
                }
                for (key, value) in new.services {
                    self.desired.services.insert(key, value);
                    footprint.services.insert(key);
                }
                for (id, table) in new.tables {
                    self.desired.tables.insert(id, table);
                }
                self.desired.source_ranges.extend(new.ranges);
                footprint
                    .svc_ids
                    .extend(new.written.svc_ids().map(|(_, id)| id));
                if let Some(old) = old {
                    self.drop_references(
                        &old,
                        Some(&new.written),
                        frontend,
                        &mut footprint,
                        &mut dropped_frontends,
                        &mut dropped_backends,
                    );
                }
                self.written.insert(frontend, new.written);
            } else if let Some(old) = old {
                for key in old.keys(frontend) {
                    self.desired.services.remove(&key);
                    footprint.services.insert(key);
                }
                for (_, id) in old.svc_ids() {
                    self.forget_svc_id(id, &mut footprint);
                }
                self.drop_references(
                    &old,
                    None,
                    frontend,
                    &mut footprint,
                    &mut dropped_frontends,
                    &mut dropped_backends,
                );
            }
        }
        for key in dropped_frontends {
            if !self
                .written
                .get(&key.0)
                .is_some_and(|w| w.svc_ids().any(|(scope, _)| scope == key.1))
            {
                self.svc_ids.release_key(&key);
            }
        }
        for key in dropped_backends {
            let unused = self
                .backend_ids
                .by_key
                .get(&key)
                .is_some_and(|id| !self.backend_refs.contains_key(id));
            if unused {
                self.backend_ids.release_key(&key);
            }
        }
        self.svc_ids.release_orphans();
        self.backend_ids.release_orphans();
        footprint
    }

    /// Removes the table and source ranges of `svc_id` from the desired
    /// contents.
    fn forget_svc_id(&mut self, svc_id: u32, footprint: &mut Footprint) {
        self.desired.tables.remove(&svc_id);
        let ranges: Vec<RangeEntry> = self.desired.ranges_of(svc_id).copied().collect();
        for range in ranges {
            self.desired.source_ranges.remove(&range);
        }
        footprint.svc_ids.insert(svc_id);
    }

    /// Drops what `old` referenced; ids nobody references any more are
    /// released at the end of the update.
    fn drop_references(
        &mut self,
        old: &Written,
        new: Option<&Written>,
        frontend: Frontend,
        footprint: &mut Footprint,
        dropped_frontends: &mut Vec<(Frontend, u8)>,
        dropped_backends: &mut Vec<BackendKey>,
    ) {
        for (scope, _) in old.svc_ids() {
            if !new.is_some_and(|n| n.svc_ids().any(|(s, _)| s == scope)) {
                dropped_frontends.push((frontend, scope));
            }
        }
        for id in &old.backends {
            let Some(refs) = self.backend_refs.get_mut(id) else {
                continue;
            };
            *refs -= 1;
            if *refs == 0 {
                self.backend_refs.remove(id);
                if let Some(backend) = self.desired.backends.remove(id)
                    && let Some(proto) = Protocol::from_number(backend.proto)
                {
                    dropped_backends.push((
                        ip_from_map(backend.addr),
                        port_from_map(backend.port),
                        proto,
                    ));
                }
                footprint.backends.insert(*id);
            }
        }
        if old.cluster_ip {
            let addr = frontend.addr;
            let refs = self.cluster_ip_refs.entry(addr).or_default();
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.cluster_ip_refs.remove(&addr);
                let key = SvcKey::cluster_ip(ip_to_map(addr));
                self.desired.services.remove(&key);
                footprint.services.insert(key);
            }
        }
    }

    /// One frontend's entries, with its ids.
    fn encode_frontend(&mut self, frontend: Frontend, state: &FrontendState) -> Encoded {
        let mut out = Encoded::default();
        let key = frontend_key(frontend);
        let Some(mut entry) = self.entry(
            &mut out,
            frontend,
            key,
            &state.service,
            &state.endpoints,
            state.empty_action,
        ) else {
            return out;
        };
        // Endpoints no longer chosen but still present keep their backend
        // entry (no slot): the datapath keeps serving the flows they already
        // have, and never picks them for a new one.
        for endpoint in &state.lingering {
            self.backend(&mut out, frontend, *endpoint);
        }
        let affinity = state.affinity_timeout_s.unwrap_or(0);
        if let Some(external) = &state.external {
            let ext_key = key.with_scope(scope::EXTERNAL);
            if let Some(mut ext) = self.entry(
                &mut out,
                frontend,
                ext_key,
                &state.service,
                &external.endpoints,
                external.empty_action,
            ) {
                if external.masquerade {
                    ext.flags |= SVC_FLAG_MASQUERADE;
                }
                if !external.source_ranges.is_empty() {
                    // They guard pods too (kube-proxy applies them in its
                    // service chain, whoever the client): both entries check
                    // the same list under their own id.
                    for value in [&mut ext, &mut entry] {
                        value.flags |= SVC_FLAG_SOURCE_RANGES;
                        out.ranges
                            .extend(source_ranges(value.svc_id, frontend, external));
                    }
                }
                if state.kind == FrontendKind::NodePort {
                    ext.flags |= SVC_FLAG_NODE_ADDRESS;
                }
                out.services.push((ext_key, ext.with_affinity(affinity)));
                entry.flags |= SVC_FLAG_EXTERNAL_SCOPE;
            }
        }
        if state.kind == FrontendKind::NodePort {
            entry.flags |= SVC_FLAG_NODE_ADDRESS;
        }
        out.services.push((key, entry.with_affinity(affinity)));
        out.written.backends = out.backends.keys().copied().collect();
        // Every cluster IP also gets its port-less entry, so the datapath can
        // tell "a cluster IP, but no such port" (REJECT) from "no cluster IP
        // at all" (DROP inside the service CIDR).
        out.written.cluster_ip = state.kind == FrontendKind::ClusterIp;
        out
    }

    /// Writes the slots (and Maglev table) of one services-map entry for
    /// `endpoints` and returns its slot-0 value, without affinity; `None`
    /// when no svc id is left.
    fn entry(
        &mut self,
        out: &mut Encoded,
        frontend: Frontend,
        key: SvcKey,
        service: &str,
        endpoints: &[Endpoint],
        empty_action: EmptyAction,
    ) -> Option<ServiceValue> {
        let Some(svc_id) = self.svc_ids.get_or_alloc(&(frontend, key.scope)) else {
            tracing::error!("{service}: no service id left, frontend {frontend} skipped");
            return None;
        };
        if endpoints.len() > usize::from(u16::MAX) {
            tracing::warn!(
                "{service}: {} endpoints, only the first {} are used",
                endpoints.len(),
                u16::MAX
            );
        }
        let mut count: u16 = 0;
        let mut table_backends = Vec::new();
        for endpoint in endpoints.iter().take(usize::from(u16::MAX)) {
            let Some(id) = self.backend(out, frontend, *endpoint) else {
                tracing::error!(
                    "{service}: no backend id left, endpoint {}:{} skipped",
                    endpoint.addr,
                    endpoint.port
                );
                continue;
            };
            count += 1;
            table_backends.push(TableBackend {
                addr: endpoint.addr,
                port: endpoint.port,
                id,
            });
            out.services
                .push((key.with_slot(count), ServiceValue::slot(id)));
        }
        let mut flags = match (count, empty_action) {
            (0, EmptyAction::Reject) => SVC_FLAG_REJECT,
            (0, EmptyAction::Drop) => SVC_FLAG_DROP,
            _ => 0,
        };
        if let LbAlgorithm::Maglev { table_size } = self.algorithms.of(key.scope)
            && count > 0
        {
            out.tables
                .push((svc_id, TableSpec::new(table_size, table_backends)));
            flags |= SVC_FLAG_MAGLEV;
        }
        out.written.add(Entry {
            scope: key.scope,
            svc_id,
            count,
        });
        Some(ServiceValue::service(svc_id, count, flags))
    }

    /// The backend entry of `endpoint` under `frontend`'s protocol.
    fn backend(
        &mut self,
        out: &mut Encoded,
        frontend: Frontend,
        endpoint: Endpoint,
    ) -> Option<u32> {
        let backend_key = (endpoint.addr, endpoint.port, frontend.proto);
        let id = self.backend_ids.get_or_alloc(&backend_key)?;
        out.backends.insert(
            id,
            (
                backend_key,
                AnyBackend::new(
                    ip_to_map(endpoint.addr),
                    port_to_map(endpoint.port),
                    frontend.proto.number(),
                ),
            ),
        );
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, FrontendState};

    fn frontend(addr: &str, port: u16) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn state(endpoints: &[(&str, u16)]) -> FrontendState {
        FrontendState {
            service: "default/web:http".into(),
            kind: crate::model::FrontendKind::ClusterIp,
            endpoints: endpoints
                .iter()
                .map(|(addr, port)| Endpoint {
                    addr: addr.parse().unwrap(),
                    port: *port,
                })
                .collect(),
            empty_action: EmptyAction::Reject,
            affinity_timeout_s: None,
            lingering: Vec::new(),
            external: None,
        }
    }

    fn desired(entries: &[(Frontend, FrontendState)]) -> DesiredState {
        DesiredState {
            frontends: entries.iter().cloned().collect(),
            health_checks: Default::default(),
        }
    }

    fn key(frontend: Frontend, slot: u16) -> SvcKey {
        SvcKey::new(
            ip_to_map(frontend.addr),
            port_to_map(frontend.port),
            frontend.proto.number(),
            slot,
        )
    }

    /// Backend id of the endpoint at `slot` of `frontend`.
    fn slot_id(contents: &MapContents, frontend: Frontend, slot: u16) -> u32 {
        contents.services[&key(frontend, slot)].backend_id
    }

    fn backend_of(contents: &MapContents, id: u32) -> (IpAddr, u16) {
        let b = contents.backends[&id];
        (ip_from_map(b.addr), port_from_map(b.port))
    }

    /// Both families in one encoding: IPv6 frontends get IPv6 keys (their
    /// own port-less cluster-IP entry too) and IPv6 backends, ids come from
    /// one allocator (a Maglev table or a counter never mixes two
    /// endpoints), and a restart adopts the IPv6 ids as the IPv4 ones.
    #[test]
    fn dual_stack_frontends_encode_into_their_family_with_shared_ids() {
        let v4 = frontend("10.96.0.10", 80);
        let v6 = frontend("fd00:96::10", 80);
        let want = desired(&[
            (v4, state(&[("10.0.0.1", 8080), ("10.0.0.2", 8080)])),
            (v6, state(&[("fd00::1", 8080), ("fd00::2", 8080)])),
        ]);
        let maglev = LbAlgorithms::everywhere(LbAlgorithm::Maglev { table_size: 251 });
        let out = Encoder::with_algorithms(maglev).encode(&want);
        let v6_entry = out.services[&key(v6, 0)];
        assert_eq!(v6_entry.count, 2);
        assert!(v6_entry.uses_maglev());
        assert_ne!(v6_entry.svc_id, out.services[&key(v4, 0)].svc_id);
        assert!(matches!(key(v6, 0).addr, crate::contents::MapAddr::V6(_)));
        let cluster_ip6 = SvcKey::cluster_ip(ip_to_map(v6.addr));
        assert!(out.services[&cluster_ip6].rejects());
        let v6_backends: Vec<(IpAddr, u16)> = (1..=2)
            .map(|s| backend_of(&out, slot_id(&out, v6, s)))
            .collect();
        assert_eq!(
            v6_backends,
            [
                ("fd00::1".parse().unwrap(), 8080),
                ("fd00::2".parse().unwrap(), 8080)
            ]
        );
        let ids: BTreeSet<u32> = out.backends.keys().copied().collect();
        assert_eq!(ids.len(), 4, "one id space for both families");
        let table = &out.tables[&v6_entry.svc_id];
        assert!(
            table
                .backends()
                .iter()
                .all(|b| b.addr.is_ipv6() && out.backends[&b.id].addr == ip_to_map(b.addr))
        );

        let mut restarted = Encoder::with_algorithms(maglev);
        restarted.seed_from(&out);
        let again = restarted.encode(&want);
        assert_eq!(again.services, out.services, "same ids after a restart");
        assert_eq!(again.backends, out.backends);
    }

    #[test]
    fn byte_order_is_wire_order() {
        let addr: IpAddr = "10.1.2.3".parse().unwrap();
        let crate::contents::MapAddr::V4(v4) = ip_to_map(addr) else {
            panic!("IPv4 in the IPv4 map form")
        };
        assert_eq!(v4.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(ip_from_map(ip_to_map(addr)), addr);
        assert_eq!(port_to_map(0x1f90).to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(port_from_map(port_to_map(8080)), 8080);
    }

    #[test]
    fn layout_of_one_frontend() {
        let web = frontend("10.96.0.10", 80);
        let out = Encoder::new().encode(&desired(&[(
            web,
            state(&[("10.0.0.1", 8080), ("10.0.0.2", 8080)]),
        )]));
        // Slot 0, two slots, and the cluster IP's port-less entry.
        assert_eq!(out.services.len(), 4);
        assert_eq!(out.services[&key(web, 0)], ServiceValue::service(1, 2, 0));
        let cluster_ip = SvcKey::cluster_ip(ip_to_map(web.addr));
        assert_eq!(
            out.services[&cluster_ip],
            ServiceValue::service(0, 0, SVC_FLAG_REJECT)
        );
        assert_eq!(
            backend_of(&out, slot_id(&out, web, 1)),
            ("10.0.0.1".parse().unwrap(), 8080)
        );
        assert_eq!(
            backend_of(&out, slot_id(&out, web, 2)),
            ("10.0.0.2".parse().unwrap(), 8080)
        );
        assert_eq!(out.backends.len(), 2);
        assert!(
            out.backends
                .values()
                .all(|b| b.proto == proxy_common::proto::TCP)
        );
    }

    #[test]
    fn lingering_endpoints_keep_a_backend_but_no_slot() {
        let web = frontend("10.96.0.10", 80);
        let mut encoder = Encoder::new();
        let both = encoder.encode(&desired(&[(
            web,
            state(&[("10.0.0.1", 8080), ("10.0.0.2", 8080)]),
        )]));
        let mut one = state(&[("10.0.0.1", 8080)]);
        one.lingering = vec![Endpoint {
            addr: "10.0.0.2".parse().unwrap(),
            port: 8080,
        }];
        let out = encoder.encode(&desired(&[(web, one)]));
        assert_eq!(out.services[&key(web, 0)].count, 1);
        assert_eq!(
            out.backends.len(),
            2,
            "the lingering endpoint keeps its backend"
        );
        // ...under the same id, so flows that named it still find it.
        assert_eq!(
            out.backends
                .iter()
                .find(|(_, b)| b.addr == ip_to_map("10.0.0.2".parse().unwrap()))
                .map(|(id, _)| *id),
            both.backends
                .iter()
                .find(|(_, b)| b.addr == ip_to_map("10.0.0.2".parse().unwrap()))
                .map(|(id, _)| *id)
        );
    }

    #[test]
    fn maglev_tables_for_frontends_with_endpoints_only() {
        let web = frontend("10.96.0.10", 80);
        let empty = frontend("10.96.0.11", 80);
        let mut encoder = Encoder::with_algorithms(LbAlgorithms::everywhere(LbAlgorithm::Maglev {
            table_size: 251,
        }));
        let out = encoder.encode(&desired(&[
            (web, state(&[("10.0.0.2", 8080), ("10.0.0.1", 8080)])),
            (empty, state(&[])),
        ]));
        let entry = out.services[&key(web, 0)];
        assert!(entry.uses_maglev());
        assert_eq!(
            entry.count, 2,
            "slots stay: the fallback and what dump shows"
        );
        let table = &out.tables[&entry.svc_id];
        assert_eq!(table.size(), 251);
        let ids: BTreeSet<u32> = table.build().into_iter().collect();
        let slot_ids: BTreeSet<u32> = (1..=2).map(|s| slot_id(&out, web, s)).collect();
        assert_eq!(ids, slot_ids, "the table uses exactly the slots' backends");
        let empty_entry = out.services[&key(empty, 0)];
        assert!(!empty_entry.uses_maglev() && empty_entry.rejects());
        assert_eq!(out.tables.len(), 1);

        let random = Encoder::new().encode(&desired(&[(web, state(&[("10.0.0.1", 8080)]))]));
        assert!(random.tables.is_empty());
        assert!(!random.services[&key(web, 0)].uses_maglev());
    }

    #[test]
    fn affinity_timeout_is_on_the_service_entry() {
        let web = frontend("10.96.0.10", 80);
        let mut sticky = state(&[("10.0.0.1", 8080)]);
        sticky.affinity_timeout_s = Some(30);
        let out = Encoder::new().encode(&desired(&[(web, sticky)]));
        assert_eq!(out.services[&key(web, 0)].affinity_timeout_s, 30);
        let plain = Encoder::new().encode(&desired(&[(web, state(&[("10.0.0.1", 8080)]))]));
        assert_eq!(plain.services[&key(web, 0)].affinity_timeout_s, 0);
    }

    #[test]
    fn empty_frontend_gets_flag_and_count_zero() {
        let web = frontend("10.96.0.10", 80);
        let mut dropping = state(&[]);
        dropping.empty_action = EmptyAction::Drop;
        let dns = frontend("10.96.0.53", 53);
        let out = Encoder::new().encode(&desired(&[(web, state(&[])), (dns, dropping)]));
        let web_entry = out.services[&key(web, 0)];
        assert_eq!((web_entry.count, web_entry.flags), (0, SVC_FLAG_REJECT));
        assert!(web_entry.rejects());
        let dns_entry = out.services[&key(dns, 0)];
        assert_eq!((dns_entry.count, dns_entry.flags), (0, SVC_FLAG_DROP));
        // Two slot-0 entries and the two cluster IPs' port-less entries.
        assert_eq!(out.services.len(), 4);
        assert!(out.backends.is_empty());
    }

    #[test]
    fn ids_stable_across_reencode() {
        let web = frontend("10.96.0.10", 80);
        let api = frontend("10.96.0.11", 80);
        let mut encoder = Encoder::new();
        let first = encoder.encode(&desired(&[
            (api, state(&[("10.0.0.5", 9000)])),
            (web, state(&[("10.0.0.2", 8080)])),
        ]));
        // A new endpoint sorting first shifts slots but not ids.
        let second = encoder.encode(&desired(&[
            (api, state(&[("10.0.0.5", 9000)])),
            (web, state(&[("10.0.0.1", 8080), ("10.0.0.2", 8080)])),
        ]));
        assert_eq!(
            second.services[&key(web, 0)].svc_id,
            first.services[&key(web, 0)].svc_id
        );
        assert_eq!(
            second.services[&key(api, 0)].svc_id,
            first.services[&key(api, 0)].svc_id
        );
        assert_eq!(slot_id(&second, web, 2), slot_id(&first, web, 1));
        assert_eq!(slot_id(&second, api, 1), slot_id(&first, api, 1));
        assert_eq!(
            encoder.encode(&desired(&[
                (api, state(&[("10.0.0.5", 9000)])),
                (web, state(&[("10.0.0.1", 8080), ("10.0.0.2", 8080)])),
            ])),
            second
        );
    }

    #[test]
    fn shared_backend_has_one_id_per_protocol() {
        let tcp = frontend("10.96.0.53", 53);
        let udp = Frontend {
            proto: Protocol::Udp,
            ..tcp
        };
        let other = frontend("10.96.0.54", 53);
        let out = Encoder::new().encode(&desired(&[
            (tcp, state(&[("10.0.0.5", 53)])),
            (udp, state(&[("10.0.0.5", 53)])),
            (other, state(&[("10.0.0.5", 53)])),
        ]));
        assert_eq!(slot_id(&out, tcp, 1), slot_id(&out, other, 1));
        assert_ne!(slot_id(&out, tcp, 1), slot_id(&out, udp, 1));
        assert_eq!(out.backends.len(), 2);
    }

    #[test]
    fn ids_reused_after_release_not_before() {
        let web = frontend("10.96.0.10", 80);
        let mut encoder = Encoder::new();
        let first = encoder.encode(&desired(&[(
            web,
            state(&[("10.0.0.1", 80), ("10.0.0.2", 80)]),
        )]));
        assert_eq!(first.backends.keys().copied().collect::<Vec<_>>(), [1, 2]);
        // 10.0.0.1 leaves while 10.0.0.3 arrives: 1 is still live in the
        // maps during this update, so the newcomer must not get it.
        let second = encoder.encode(&desired(&[(
            web,
            state(&[("10.0.0.2", 80), ("10.0.0.3", 80)]),
        )]));
        assert_eq!(second.backends.keys().copied().collect::<Vec<_>>(), [2, 3]);
        let third = encoder.encode(&desired(&[(
            web,
            state(&[("10.0.0.2", 80), ("10.0.0.3", 80), ("10.0.0.4", 80)]),
        )]));
        assert_eq!(backend_of(&third, 1), ("10.0.0.4".parse().unwrap(), 80));

        let api = frontend("10.96.0.11", 80);
        encoder.encode(&desired(&[(api, state(&[]))]));
        let again = encoder.encode(&desired(&[(api, state(&[])), (web, state(&[]))]));
        assert_eq!(again.services[&key(api, 0)].svc_id, 2);
        assert_eq!(again.services[&key(web, 0)].svc_id, 1);
    }

    #[test]
    fn seed_from_keeps_ids() {
        let web = frontend("10.96.0.10", 80);
        let api = frontend("10.96.0.11", 80);
        let wanted = desired(&[
            (web, state(&[("10.0.0.1", 80), ("10.0.0.2", 80)])),
            (api, state(&[("10.0.0.3", 80)])),
        ]);
        let mut old = Encoder::new();
        // Churn first so ids are not simply 1, 2, 3 in sort order.
        old.encode(&desired(&[(
            api,
            state(&[("10.0.0.9", 1), ("10.0.0.3", 80)]),
        )]));
        let live = old.encode(&wanted);

        let mut restarted = Encoder::new();
        restarted.seed_from(&live);
        assert_eq!(restarted.encode(&wanted), live);
        // New keys after seeding get ids nobody holds.
        let grown = restarted.encode(&desired(&[
            (
                web,
                state(&[("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.7", 80)]),
            ),
            (api, state(&[("10.0.0.3", 80)])),
        ]));
        assert_eq!(grown.backends.len(), 4);
    }

    #[test]
    fn seed_from_does_not_reuse_live_orphans_at_once() {
        let web = frontend("10.96.0.10", 80);
        let dup = AnyBackend::new(ip_to_map("10.0.0.1".parse().unwrap()), port_to_map(80), 6);
        let live = MapContents {
            services: [
                (key(web, 0), ServiceValue::service(1, 2, 0)),
                (key(web, 1), ServiceValue::slot(1)),
                (key(web, 2), ServiceValue::slot(2)),
            ]
            .into_iter()
            .collect(),
            // Id 2 duplicates id 1's endpoint: adopted by nobody, but live.
            backends: [(1, dup), (2, dup)].into_iter().collect(),
            tables: BTreeMap::new(),
            source_ranges: BTreeSet::new(),
        };
        let mut encoder = Encoder::new();
        encoder.seed_from(&live);
        let out = encoder.encode(&desired(&[(
            web,
            state(&[("10.0.0.1", 80), ("10.0.0.5", 80)]),
        )]));
        assert_eq!(slot_id(&out, web, 1), 1);
        assert_eq!(slot_id(&out, web, 2), 3);
        let next = encoder.encode(&desired(&[(
            web,
            state(&[("10.0.0.1", 80), ("10.0.0.5", 80), ("10.0.0.6", 80)]),
        )]));
        assert_eq!(slot_id(&next, web, 3), 2);
    }

    #[test]
    fn backends_are_exactly_the_referenced_ones() {
        let web = frontend("10.96.0.10", 80);
        let mut encoder = Encoder::new();
        encoder.encode(&desired(&[(
            web,
            state(&[("10.0.0.1", 80), ("10.0.0.2", 80)]),
        )]));
        let out = encoder.encode(&desired(&[(web, state(&[("10.0.0.2", 80)]))]));
        let referenced: BTreeSet<u32> = out
            .services
            .iter()
            .filter(|(k, _)| k.slot > 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        assert_eq!(
            out.backends.keys().copied().collect::<BTreeSet<_>>(),
            referenced
        );
    }

    #[test]
    fn id_allocator_exhaustion_returns_none() {
        let mut ids: Ids<u8> = Ids::new();
        ids.next = u64::from(u32::MAX);
        assert_eq!(ids.get_or_alloc(&1), Some(u32::MAX));
        assert_eq!(ids.get_or_alloc(&2), None);
        ids.release_key(&1);
        assert_eq!(ids.get_or_alloc(&2), Some(u32::MAX));
    }

    #[test]
    fn source_ranges_guard_both_entries_and_let_the_node_in_only_when_allowed() {
        let lb = frontend("192.168.60.10", 80);
        let cidr = |text: &str| text.parse::<crate::model::IpCidr>().unwrap();
        let with = |allow_node: bool| {
            let mut st = state(&[("10.0.0.1", 8080)]);
            st.kind = FrontendKind::LoadBalancer;
            st.external = Some(ExternalTraffic {
                endpoints: st.endpoints.clone(),
                empty_action: EmptyAction::Reject,
                masquerade: true,
                source_ranges: vec![cidr("10.1.0.0/16")],
                allow_node,
            });
            desired(&[(lb, st)])
        };
        let out = Encoder::new().encode(&with(false));
        let all = out.services[&key(lb, 0)];
        let ext = out.services[&key(lb, 0).with_scope(scope::EXTERNAL)];
        for value in [all, ext] {
            assert!(value.checks_source_ranges(), "{value:?}");
        }
        let entries = |id: u32| -> Vec<(IpAddr, u8)> {
            out.source_ranges
                .iter()
                .filter(|r| r.svc_id == id)
                .map(|r| (r.addr, r.prefix_len))
                .collect()
        };
        let range = ("10.1.0.0".parse().unwrap(), 16);
        assert_eq!(entries(all.svc_id), [range]);
        assert_eq!(entries(ext.svc_id), [range]);
        assert_eq!(out.source_ranges.len(), 2);

        let out = Encoder::new().encode(&with(true));
        let node = (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32);
        for value in [
            out.services[&key(lb, 0)],
            out.services[&key(lb, 0).with_scope(scope::EXTERNAL)],
        ] {
            let got: Vec<_> = out
                .source_ranges
                .iter()
                .filter(|r| r.svc_id == value.svc_id)
                .map(|r| (r.addr, r.prefix_len))
                .collect();
            assert_eq!(got, [node, range], "the node's sockets ask as 0.0.0.0");
        }
    }
}
