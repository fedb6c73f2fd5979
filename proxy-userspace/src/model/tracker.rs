//! Work proportional to the change: the objects as they arrive one by one,
//! and which frontends a change may have altered.
//!
//! kube-proxy's Service and EndpointSlice change trackers, and Cilium's
//! per-frontend reconcile, in one place: a Service is derived again only
//! when it, one of its slices, or the node changes; the rest keeps what it
//! had. Services can still meet: two claiming one frontend (only invalid
//! input or a stale view of a reused IP does that) or one health check port.
//! Claims are kept per frontend in (namespace, name) order, so the first
//! Service keeps it exactly as a derivation from scratch would decide, and a
//! change to either claimant re-decides only that frontend. A load-balancer
//! or external IP that is another Service's cluster IP is refused whatever
//! the order: the tracker indexes cluster IPs, and derives again the
//! Services asking for an address whose cluster-IP owner changed.
//!
//! What is kept per Service is its [`ServiceFacts`] and its slices' facts
//! (names shared, no API object), what it claimed, and its frontends'
//! states.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    Derived, Frontend, FrontendState, HealthCheck, NodeInfo, ServiceFacts, ServiceName,
    SliceEndpoints, SliceFacts, Warning, api, derive_service, duplicate, frontend_taken,
    health_check_taken,
};

/// Tells apart copies of one object name: a directory of manifests may hold
/// two (a broken one, but it must not depend on file order); the API
/// server never does, so its objects all have origin 0.
pub type Origin = u64;

/// An EndpointSlice's namespace, name and origin.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SliceName {
    namespace: Arc<str>,
    name: Arc<str>,
    origin: Origin,
}

/// A sorted map that is nearly always of one entry (a Service's copies and
/// slices, a frontend's claimants): a boxed slice of exactly its entries,
/// because a `BTreeMap` of one entry allocates room for eleven and a
/// vector's first push room for four, which for 30,000 Services is tens of
/// megabytes.
#[derive(Debug)]
struct Few<K, V>(Box<[(K, V)]>);

impl<K, V> Default for Few<K, V> {
    fn default() -> Self {
        Self(Box::new([]))
    }
}

impl<K: Ord, V> Few<K, V> {
    fn find(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    fn insert(&mut self, key: K, value: V) {
        match self.find(&key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => {
                let mut entries = std::mem::take(&mut self.0).into_vec();
                entries.reserve_exact(1);
                entries.insert(i, (key, value));
                self.0 = entries.into_boxed_slice();
            }
        }
    }

    fn remove(&mut self, key: &K) {
        if let Ok(i) = self.find(key) {
            let mut entries = std::mem::take(&mut self.0).into_vec();
            entries.remove(i);
            self.0 = entries.into_boxed_slice();
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

/// One slice as last seen.
struct Slice {
    /// The Service it belongs to and what it contributes; `None` when no
    /// Service of ours reads it.
    parsed: Option<(ServiceName, SliceEndpoints)>,
    warnings: Box<[Warning]>,
}

/// Everything held under one Service name.
#[derive(Default)]
struct Entry {
    /// The Service by origin: one copy, unless a broken static source.
    copies: Few<Origin, ServiceFacts>,
    /// The slices naming it.
    slices: Few<SliceName, ()>,
    /// What its last derivation claimed (the states themselves are in
    /// [`Tracker::claims`]).
    claimed: Claimed,
}

impl Entry {
    /// The copy that counts: the smallest, so the outcome does not depend
    /// on file or list order.
    fn chosen(&self) -> Option<&ServiceFacts> {
        self.copies.values().min()
    }

    /// Its cluster IPs and the load-balancer and external IPs it asks for.
    fn addresses(&self) -> (Vec<IpAddr>, Vec<IpAddr>) {
        self.chosen()
            .and_then(|facts| facts.spec.as_deref())
            .map(|spec| {
                (
                    spec.cluster_ips.to_vec(),
                    spec.exposure.addresses().collect(),
                )
            })
            .unwrap_or_default()
    }
}

#[derive(Default)]
struct Claimed {
    frontends: Box<[Frontend]>,
    health_check: Option<u16>,
    /// Addresses refused as another Service's cluster IP.
    refused: u16,
    /// The Service's own warnings and those of its derivation.
    warnings: Box<[Warning]>,
}

/// One claim of a frontend: the Service port's name and the state it asks
/// for.
type Claim = (Arc<str>, FrontendState);

/// Services by address, for the cluster-IP rule.
type AddressIndex = HashMap<IpAddr, Few<ServiceName, ()>>;

/// Objects by name, what each Service claims, and the frontends whose state
/// may have changed since the last [`Tracker::settle`].
pub struct Tracker {
    node: NodeInfo,
    /// Node objects (trimmed) by (name, origin); the one named as this node
    /// gives its topology labels (and, to the health server, whether it is
    /// being deleted).
    nodes: BTreeMap<(String, Origin), Node>,
    services: HashMap<ServiceName, Entry>,
    slices: HashMap<SliceName, Slice>,
    /// Every claim of each frontend, first in (namespace, name) order wins.
    claims: HashMap<Frontend, Few<ServiceName, Claim>>,
    /// The Services whose cluster IP each address is.
    cluster_ips: AddressIndex,
    /// The Services asking for each address as a load-balancer or external
    /// IP: derived again when the address's cluster-IP owners change.
    wanted_ips: AddressIndex,
    /// Frontends with more than one claimant, for the warnings.
    contested: BTreeSet<Frontend>,
    health_claims: BTreeMap<u16, Few<ServiceName, HealthCheck>>,
    /// The winning health check of each port.
    health_checks: BTreeMap<u16, HealthCheck>,
    /// Services to derive again at the next settle.
    dirty: BTreeSet<ServiceName>,
    /// Frontends whose claims changed since the last settle.
    touched: BTreeSet<Frontend>,
    /// Something a warning is made of changed since the last
    /// [`Tracker::warnings_changed`].
    warnings_changed: bool,
    /// Addresses refused as another Service's cluster IP, over all
    /// Services.
    refused: usize,
}

impl Tracker {
    /// An empty tracker for `node` (its labels come from Node objects put
    /// later; its addresses are those given here until
    /// [`Tracker::set_node_addresses`]).
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            nodes: BTreeMap::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            claims: HashMap::new(),
            cluster_ips: HashMap::new(),
            wanted_ips: HashMap::new(),
            contested: BTreeSet::new(),
            health_claims: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            dirty: BTreeSet::new(),
            touched: BTreeSet::new(),
            warnings_changed: false,
            refused: 0,
        }
    }

    /// Adds or replaces the copy `origin` of a Service.
    pub fn put_service(&mut self, origin: Origin, service: api::Service) {
        self.put_service_facts(origin, ServiceFacts::of(&service));
    }

    /// [`Tracker::put_service`] of a Service already read into its facts.
    pub fn put_service_facts(&mut self, origin: Origin, mut facts: ServiceFacts) {
        facts.name = self.canonical(&facts.name);
        let name = facts.name.clone();
        let entry = self.services.get_mut(&name).expect("made by canonical");
        // A relist sends every object again: the same one changes nothing.
        if entry.copies.get(&origin) == Some(&facts) {
            return;
        }
        let before = entry.addresses();
        entry.copies.insert(origin, facts);
        let after = entry.addresses();
        self.reindex(&name, before, after);
        self.dirty.insert(name);
    }

    /// Removes the copy `origin` of Service `namespace/name`, if present.
    pub fn delete_service(&mut self, origin: Origin, namespace: &str, name: &str) {
        let key = ServiceName::new(namespace, name);
        let Some(entry) = self.services.get_mut(&key) else {
            return;
        };
        if entry.copies.get(&origin).is_none() {
            return;
        }
        let before = entry.addresses();
        entry.copies.remove(&origin);
        let after = entry.addresses();
        self.reindex(&key, before, after);
        self.dirty.insert(key);
    }

    /// The tracker's own copy of `name` (so every map shares one), making
    /// an empty entry for it if there is none.
    fn canonical(&mut self, name: &ServiceName) -> ServiceName {
        if let Some((key, _)) = self.services.get_key_value(name) {
            return key.clone();
        }
        self.services.insert(name.clone(), Entry::default());
        name.clone()
    }

    /// Keeps the address indexes up to date with `name`'s addresses
    /// (cluster IPs, wanted IPs) going from `before` to `after`; a cluster
    /// IP coming or going re-derives the Services that want its address.
    fn reindex(
        &mut self,
        name: &ServiceName,
        before: (Vec<IpAddr>, Vec<IpAddr>),
        after: (Vec<IpAddr>, Vec<IpAddr>),
    ) {
        if before == after {
            return;
        }
        let changed = update_index(&mut self.cluster_ips, name, &before.0, &after.0);
        update_index(&mut self.wanted_ips, name, &before.1, &after.1);
        for addr in changed {
            if let Some(wanting) = self.wanted_ips.get(&addr) {
                self.dirty
                    .extend(wanting.keys().filter(|k| *k != name).cloned());
            }
        }
    }

    /// Adds or replaces the copy `origin` of an EndpointSlice.
    pub fn put_slice(&mut self, origin: Origin, slice: api::EndpointSlice) {
        self.put_slice_facts(origin, SliceFacts::of(&slice));
    }

    /// [`Tracker::put_slice`] of a slice already reduced to its facts.
    pub fn put_slice_facts(&mut self, origin: Origin, facts: SliceFacts) {
        let SliceFacts {
            namespace,
            name,
            parsed,
            warnings,
        } = facts;
        let key = SliceName {
            namespace,
            name,
            origin,
        };
        if let Some(old) = self.slices.get(&key)
            && old.parsed == parsed
            && *old.warnings == *warnings
        {
            return;
        }
        self.remove_slice(&key);
        self.warnings_changed |= !warnings.is_empty();
        let parsed = parsed.map(|(service, endpoints)| {
            let service = self.canonical(&service);
            let entry = self.services.get_mut(&service).expect("made by canonical");
            entry.slices.insert(key.clone(), ());
            self.dirty.insert(service.clone());
            (service, endpoints)
        });
        self.slices.insert(
            key,
            Slice {
                parsed,
                warnings: warnings.into(),
            },
        );
    }

    /// Removes the copy `origin` of EndpointSlice `namespace/name`.
    pub fn delete_slice(&mut self, origin: Origin, namespace: &str, name: &str) {
        let service = ServiceName::new(namespace, name);
        self.remove_slice(&SliceName {
            namespace: service.namespace,
            name: service.name,
            origin,
        });
    }

    fn remove_slice(&mut self, key: &SliceName) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        self.warnings_changed |= !old.warnings.is_empty();
        if let Some((service, _)) = old.parsed {
            if let Some(entry) = self.services.get_mut(&service) {
                entry.slices.remove(key);
            }
            self.dirty.insert(service);
        }
    }

    /// Adds or replaces the copy `origin` of a Node.
    pub fn put_node(&mut self, origin: Origin, mut node: Node) {
        trim_node(&mut node);
        let name = node.metadata.name.clone().unwrap_or_default();
        self.nodes.insert((name, origin), node);
        self.node_changed();
    }

    /// The Node objects held.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn delete_node(&mut self, origin: Origin, name: &str) {
        if self.nodes.remove(&(name.to_string(), origin)).is_some() {
            self.node_changed();
        }
    }

    /// Sets the node addresses NodePorts answer on; every Service is
    /// derived again when they changed. Whether they did.
    pub fn set_node_addresses(&mut self, mut addresses: Vec<IpAddr>) -> bool {
        addresses.sort();
        addresses.dedup();
        if self.node.addresses == addresses {
            return false;
        }
        self.node.addresses = addresses;
        self.all_dirty();
        true
    }

    /// The node addresses NodePorts answer on, sorted.
    pub fn node_addresses(&self) -> &[IpAddr] {
        &self.node.addresses
    }

    /// Topology labels decide endpoint sets everywhere: when this node's
    /// change, every Service is derived again.
    fn node_changed(&mut self) {
        // Two copies of one Node can only come from a broken static source;
        // the smallest label set wins so the outcome does not depend on order.
        let labels = self
            .nodes
            .iter()
            .filter(|((name, _), _)| !self.node.name.is_empty() && *name == self.node.name)
            .map(|(_, node)| node.metadata.labels.clone().unwrap_or_default())
            .min()
            .unwrap_or_default();
        if labels != self.node.labels {
            self.node.labels = labels;
            self.all_dirty();
        }
    }

    fn all_dirty(&mut self) {
        self.dirty.extend(self.services.keys().cloned());
    }

    /// Derives every changed Service again and returns the frontends whose
    /// state may differ from before (added, removed or changed).
    pub fn settle(&mut self) -> BTreeSet<Frontend> {
        let mut emptied = false;
        for name in std::mem::take(&mut self.dirty) {
            self.unclaim(&name);
            let Some(entry) = self.services.get(&name) else {
                continue;
            };
            let Some(facts) = entry.chosen() else {
                if entry.slices.is_empty() {
                    self.services.remove(&name);
                    emptied = true;
                }
                continue;
            };
            let derived = match facts.spec.as_deref() {
                Some(spec) => {
                    let slices: Vec<&SliceEndpoints> = entry
                        .slices
                        .keys()
                        .filter_map(|key| self.slices.get(key))
                        .filter_map(|slice| slice.parsed.as_ref().map(|(_, parsed)| parsed))
                        .collect();
                    let owner = |addr: IpAddr| {
                        self.cluster_ips
                            .get(&addr)
                            .and_then(|owners| owners.keys().find(|k| **k != name).cloned())
                    };
                    derive_service(&name, spec, &slices, &self.node, &owner)
                }
                None => Derived::default(),
            };
            let mut warnings = facts.warnings.clone();
            warnings.extend((1..entry.copies.len()).map(|_| duplicate(&name)));
            self.claim(name, derived, warnings);
        }
        if emptied {
            super::intern::prune();
        }
        std::mem::take(&mut self.touched)
    }

    /// Withdraws every claim of `name`.
    fn unclaim(&mut self, name: &ServiceName) {
        let Some(entry) = self.services.get_mut(name) else {
            return;
        };
        let old = std::mem::take(&mut entry.claimed);
        self.warnings_changed |= !old.warnings.is_empty() || old.health_check.is_some();
        self.refused -= usize::from(old.refused);
        for frontend in old.frontends.into_vec() {
            if let Some(claims) = self.claims.get_mut(&frontend) {
                claims.remove(name);
                match claims.len() {
                    0 => {
                        self.claims.remove(&frontend);
                        self.warnings_changed |= self.contested.remove(&frontend);
                    }
                    1 => {
                        self.warnings_changed |= self.contested.remove(&frontend);
                    }
                    _ => {}
                }
            }
            self.touched.insert(frontend);
        }
        if let Some(port) = old.health_check {
            if let Some(claims) = self.health_claims.get_mut(&port) {
                claims.remove(name);
                if claims.is_empty() {
                    self.health_claims.remove(&port);
                }
            }
            self.decide_health_check(port);
        }
    }

    /// Records what `name`'s derivation claims; `own` are the Service's
    /// own warnings (its facts', its copies').
    fn claim(&mut self, name: ServiceName, derived: Derived, mut own: Vec<Warning>) {
        let Derived {
            claims,
            health_check,
            warnings,
            refused,
        } = derived;
        own.extend(warnings);
        self.warnings_changed |= !own.is_empty() || health_check.is_some();
        let refused = u16::try_from(refused).unwrap_or(u16::MAX);
        self.refused += usize::from(refused);
        let mut claimed = Claimed {
            frontends: claims.iter().map(|(frontend, _, _)| *frontend).collect(),
            health_check: None,
            refused,
            warnings: own.into(),
        };
        for (frontend, port, state) in claims {
            let all = self.claims.entry(frontend).or_default();
            all.insert(name.clone(), (port, state));
            if all.len() > 1 {
                self.contested.insert(frontend);
                self.warnings_changed = true;
            }
            self.touched.insert(frontend);
        }
        if let Some((port, check)) = health_check {
            self.health_claims
                .entry(port)
                .or_default()
                .insert(name.clone(), check);
            claimed.health_check = Some(port);
            self.decide_health_check(port);
        }
        if let Some(entry) = self.services.get_mut(&name) {
            entry.claimed = claimed;
        }
    }

    fn decide_health_check(&mut self, port: u16) {
        match self
            .health_claims
            .get(&port)
            .and_then(|claims| claims.values().next())
        {
            Some(winner) => {
                self.health_checks.insert(port, winner.clone());
            }
            None => {
                self.health_checks.remove(&port);
            }
        }
    }

    /// The state of `frontend`: the first claimant's.
    pub fn frontend(&self, frontend: &Frontend) -> Option<&FrontendState> {
        self.claims
            .get(frontend)
            .and_then(|claims| claims.values().next())
            .map(|(_, state)| state)
    }

    /// Every frontend and its state, in no particular order.
    pub fn frontends(&self) -> impl Iterator<Item = (&Frontend, &FrontendState)> {
        self.claims.iter().filter_map(|(frontend, claims)| {
            claims.values().next().map(|(_, state)| (frontend, state))
        })
    }

    pub fn frontend_count(&self) -> usize {
        self.claims.len()
    }

    /// The health-check servers to run, by port.
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
    }

    /// Services, EndpointSlices and Nodes held (copies counted).
    pub fn object_counts(&self) -> (usize, usize, usize) {
        (
            self.services.values().map(|e| e.copies.len()).sum(),
            self.slices.len(),
            self.nodes.len(),
        )
    }

    /// Load-balancer and external IPs refused because they are another
    /// Service's cluster IP (one per Service and address).
    pub fn refused(&self) -> usize {
        self.refused
    }

    /// Whether [`Tracker::warnings`] may differ from when this was last
    /// asked (computing them walks every object).
    pub fn warnings_changed(&mut self) -> bool {
        std::mem::take(&mut self.warnings_changed)
    }

    /// Everything skipped, sorted: the objects' own problems and the
    /// claims lost to another Service.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out: Vec<Warning> = self
            .services
            .values()
            .flat_map(|e| e.claimed.warnings.iter().cloned())
            .chain(
                self.slices
                    .values()
                    .flat_map(|s| s.warnings.iter().cloned()),
            )
            .collect();
        for frontend in &self.contested {
            let mut claims = self.claims[frontend].iter();
            let Some((_, (_, winner))) = claims.next() else {
                continue;
            };
            for (service, (port, _)) in claims {
                out.push(frontend_taken(service, port, *frontend, &winner.service));
            }
        }
        for (port, claims) in &self.health_claims {
            let mut claims = claims.iter();
            let Some((_, winner)) = claims.next() else {
                continue;
            };
            for (service, _) in claims {
                out.push(health_check_taken(service, *port, winner));
            }
        }
        out.sort();
        out
    }
}

/// Moves `name` in `index` from the addresses `before` to `after` (both
/// sorted); the addresses that changed.
fn update_index(
    index: &mut AddressIndex,
    name: &ServiceName,
    before: &[IpAddr],
    after: &[IpAddr],
) -> Vec<IpAddr> {
    let mut changed = Vec::new();
    for addr in before.iter().filter(|a| after.binary_search(a).is_err()) {
        if let Some(names) = index.get_mut(addr) {
            names.remove(name);
            if names.is_empty() {
                index.remove(addr);
            }
        }
        changed.push(*addr);
    }
    for addr in after.iter().filter(|a| before.binary_search(a).is_err()) {
        index.entry(*addr).or_default().insert(name.clone(), ());
        changed.push(*addr);
    }
    changed
}

/// Keeps, of a Node, what is read: its name and labels (topology), and
/// what tells whether the node may take traffic: its deletion timestamp
/// and taints. Its status (images, conditions, addresses) goes.
fn trim_node(node: &mut Node) {
    let meta = &mut node.metadata;
    *meta = ObjectMeta {
        name: meta.name.take(),
        labels: meta.labels.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
    node.spec = node.spec.take().map(|spec| NodeSpec {
        taints: spec.taints,
        ..NodeSpec::default()
    });
    node.status = None;
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{service, slice};
    use super::*;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn only_the_changed_service_is_touched() {
        let mut t = Tracker::new(node());
        for i in 0..10 {
            let name = format!("svc-{i}");
            t.put_service(
                0,
                service(&name, &format!("10.96.0.{i}"), &[("", 80, "TCP")]),
            );
            t.put_slice(
                0,
                slice(&name, &name, &[("", 8080, "TCP")], &[("10.0.0.1", None)]),
            );
        }
        assert_eq!(t.settle().len(), 10);
        t.put_slice(
            0,
            slice(
                "svc-3",
                "svc-3",
                &[("", 8080, "TCP")],
                &[("10.0.0.1", None), ("10.0.0.2", None)],
            ),
        );
        let touched = t.settle();
        assert_eq!(
            touched.into_iter().map(|f| f.addr).collect::<Vec<_>>(),
            ["10.96.0.3".parse::<IpAddr>().unwrap()]
        );
        assert!(t.settle().is_empty(), "nothing left to do");
    }

    #[test]
    fn a_lost_frontend_goes_to_the_next_claimant_when_the_first_leaves() {
        let mut t = Tracker::new(node());
        t.put_service(0, service("a", "10.96.0.1", &[("", 80, "TCP")]));
        t.put_service(0, service("b", "10.96.0.1", &[("", 80, "TCP")]));
        t.settle();
        let fe = *t.frontends().next().unwrap().0;
        assert_eq!(&*t.frontend(&fe).unwrap().service, "default/a");
        assert_eq!(t.warnings().len(), 1);
        t.delete_service(0, "default", "a");
        assert!(t.settle().contains(&fe));
        assert_eq!(&*t.frontend(&fe).unwrap().service, "default/b");
        assert!(t.warnings().is_empty());
    }
}

#[cfg(test)]
mod cluster_ips {
    use super::super::fixtures::from;
    use super::*;
    use serde_json::json;

    /// The Service asking for 10.96.0.10 as an external IP arrives first
    /// and gets it; once the cluster IP's owner arrives it is taken back
    /// (the first Service derived again), and given back when the owner
    /// goes.
    #[test]
    fn a_cluster_ip_takes_its_address_back_whatever_came_first() {
        let mut t = Tracker::new(NodeInfo::default());
        t.put_service(
            0,
            from(json!({
                "metadata": {"name": "x", "namespace": "aaa"},
                "spec": {"clusterIP": "10.96.5.5", "externalIPs": ["10.96.0.10"],
                         "ports": [{"port": 53, "protocol": "UDP"}]},
            })),
        );
        t.settle();
        let dns = Frontend {
            addr: "10.96.0.10".parse().unwrap(),
            port: 53,
            proto: super::super::Protocol::Udp,
        };
        assert_eq!(&*t.frontend(&dns).unwrap().service, "aaa/x");
        t.put_service(
            0,
            from(json!({
                "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                "spec": {"clusterIP": "10.96.0.10",
                         "ports": [{"port": 53, "protocol": "UDP"}]},
            })),
        );
        assert!(t.settle().contains(&dns));
        assert_eq!(&*t.frontend(&dns).unwrap().service, "kube-system/kube-dns");
        assert_eq!(t.refused(), 1);
        assert!(t.warnings_changed());
        assert_eq!(t.warnings().len(), 1, "{:?}", t.warnings());
        t.delete_service(0, "kube-system", "kube-dns");
        assert!(t.settle().contains(&dns));
        assert_eq!(&*t.frontend(&dns).unwrap().service, "aaa/x");
        assert_eq!((t.refused(), t.warnings().len()), (0, 0));
    }
}

#[cfg(test)]
mod properties {
    //! Any sequence of changes leaves the tracker where a derivation from
    //! scratch of the final objects lands.

    use super::super::api::{EndpointSlice, Service};
    use super::super::fixtures::{service, slice};
    use super::super::{DesiredState, compute};
    use super::*;
    use proptest::prelude::*;

    /// A Service `s` with (cluster IP, port, external IP) from small
    /// pools, so Services collide on frontends and addresses.
    #[derive(Clone, Debug)]
    enum Step {
        Service(u8, Option<(u8, u16, Option<u8>)>),
        Slice(u8, u8, Option<Vec<(u8, bool)>>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (
                0u8..4,
                prop::option::of((
                    0u8..3,
                    prop::sample::select(vec![80u16, 53]),
                    prop::option::of(0u8..4)
                ))
            )
                .prop_map(|(s, spec)| Step::Service(s, spec)),
            (
                0u8..4,
                0u8..2,
                prop::option::of(prop::collection::vec((0u8..4, any::<bool>()), 0..3))
            )
                .prop_map(|(s, n, eps)| Step::Slice(s, n, eps)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 300,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn incremental_equals_from_scratch(steps in prop::collection::vec(step(), 1..24)) {
            let node = NodeInfo { name: "node-a".into(), ..NodeInfo::default() };
            let mut t = Tracker::new(node.clone());
            let mut services: BTreeMap<u8, Service> = BTreeMap::new();
            let mut slices: BTreeMap<(u8, u8), EndpointSlice> = BTreeMap::new();
            for step in steps {
                match step {
                    Step::Service(s, Some((ip, port, external))) => {
                        let mut svc = service(&format!("s{s}"), &format!("10.96.0.{ip}"), &[("", i32::from(port), "TCP")]);
                        if let (Some(spec), Some(e)) = (svc.spec.as_mut(), external) {
                            spec.external_ips = Some(vec![format!("10.96.0.{e}")]);
                        }
                        services.insert(s, svc.clone());
                        t.put_service(0, svc);
                    }
                    Step::Service(s, None) => {
                        services.remove(&s);
                        t.delete_service(0, "default", &format!("s{s}"));
                    }
                    Step::Slice(s, n, Some(eps)) => {
                        let eps: Vec<(String, Option<bool>)> = eps
                            .iter()
                            .map(|(e, ready)| (format!("10.0.0.{e}"), Some(*ready)))
                            .collect();
                        let refs: Vec<(&str, Option<bool>)> = eps.iter().map(|(a, r)| (a.as_str(), *r)).collect();
                        let sl = slice(&format!("s{s}-{n}"), &format!("s{s}"), &[("", 8080, "TCP")], &refs);
                        slices.insert((s, n), sl.clone());
                        t.put_slice(0, sl);
                    }
                    Step::Slice(s, n, None) => {
                        slices.remove(&(s, n));
                        t.delete_slice(0, "default", &format!("s{s}-{n}"));
                    }
                }
                t.settle();
            }
            let services: Vec<Service> = services.into_values().collect();
            let slices: Vec<EndpointSlice> = slices.into_values().collect();
            let (expected, warnings) = compute(&services, &slices, &node);
            let got = DesiredState {
                frontends: t.frontends().map(|(f, s)| (*f, s.clone())).collect(),
                health_checks: t.health_checks().clone(),
            };
            prop_assert_eq!(got, expected);
            prop_assert_eq!(t.warnings(), warnings);
            let mut fresh = Tracker::new(node);
            for service in services {
                fresh.put_service(0, service);
            }
            for slice in slices {
                fresh.put_slice(0, slice);
            }
            fresh.settle();
            prop_assert_eq!(t.refused(), fresh.refused());
        }
    }
}
