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
//! change to either claimant re-decides only that frontend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    Derived, Frontend, FrontendState, HealthCheck, NodeInfo, SliceEndpoints, SliceFacts, Warning,
    by_content, derive_service, duplicate, frontend_taken, health_check_taken, identity,
};

/// (namespace, name) of a Service.
pub type ServiceName = (String, String);

/// Tells apart copies of one object name: a directory of manifests may hold
/// two (a broken one, but it must not depend on file order); the API
/// server never does, so its objects all have origin 0.
pub type Origin = u64;

/// (namespace, name, origin) of an EndpointSlice.
type SliceName = (String, String, Origin);

/// A sorted map that is nearly always of one entry (a Service's copies and
/// slices, a frontend's claimants): a vector, because a `BTreeMap` of one
/// entry allocates room for eleven, which for 30,000 Services is hundreds
/// of megabytes.
#[derive(Debug)]
struct Few<K, V>(Vec<(K, V)>);

impl<K, V> Default for Few<K, V> {
    fn default() -> Self {
        Self(Vec::new())
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
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    fn remove(&mut self, key: &K) {
        if let Ok(i) = self.find(key) {
            self.0.remove(i);
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
    warnings: Vec<Warning>,
}

/// What a Service's last derivation claimed (the states themselves are in
/// [`Tracker::claims`]).
#[derive(Default)]
struct Claimed {
    frontends: Vec<Frontend>,
    health_check: Option<u16>,
    warnings: Vec<Warning>,
}

/// One claim of a frontend: the Service port's name and the state it asks
/// for.
type Claim = (String, FrontendState);

/// Objects by name, what each Service claims, and the frontends whose state
/// may have changed since the last [`Tracker::settle`].
pub struct Tracker {
    node: NodeInfo,
    /// Node objects (trimmed) by (name, origin); the one named as this node
    /// gives its topology labels (and, to the health server, whether it is
    /// being deleted).
    nodes: BTreeMap<(String, Origin), Node>,
    services: HashMap<ServiceName, Few<Origin, Box<Service>>>,
    slices: HashMap<SliceName, Slice>,
    slices_of: HashMap<ServiceName, Few<SliceName, ()>>,
    claimed: HashMap<ServiceName, Claimed>,
    /// Every claim of each frontend, first in (namespace, name) order wins.
    claims: HashMap<Frontend, Few<ServiceName, Claim>>,
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
            slices_of: HashMap::new(),
            claimed: HashMap::new(),
            claims: HashMap::new(),
            contested: BTreeSet::new(),
            health_claims: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            dirty: BTreeSet::new(),
            touched: BTreeSet::new(),
            warnings_changed: false,
        }
    }

    /// Adds or replaces the copy `origin` of a Service.
    pub fn put_service(&mut self, origin: Origin, mut service: Service) {
        crate::source::trim::service(&mut service);
        let name = service_name(&service);
        let copies = self.services.entry(name.clone()).or_default();
        // A relist sends every object again: the same one changes nothing.
        if copies.get(&origin).is_some_and(|old| **old == service) {
            return;
        }
        copies.insert(origin, Box::new(service));
        self.dirty.insert(name);
    }

    /// Removes the copy `origin` of Service `namespace/name`, if present.
    pub fn delete_service(&mut self, origin: Origin, namespace: &str, name: &str) {
        let key = (ns_or_default(namespace), name.to_string());
        if let Some(copies) = self.services.get_mut(&key) {
            copies.remove(&origin);
            if copies.is_empty() {
                self.services.remove(&key);
            }
            self.dirty.insert(key);
        }
    }

    /// Adds or replaces the copy `origin` of an EndpointSlice.
    pub fn put_slice(&mut self, origin: Origin, slice: EndpointSlice) {
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
        let key = (namespace, name, origin);
        if let Some(old) = self.slices.get(&key)
            && old.parsed == parsed
            && old.warnings == warnings
        {
            return;
        }
        self.remove_slice(&key);
        self.warnings_changed |= !warnings.is_empty();
        if let Some((service, _)) = &parsed {
            self.dirty.insert(service.clone());
            self.slices_of
                .entry(service.clone())
                .or_default()
                .insert(key.clone(), ());
        }
        self.slices.insert(key, Slice { parsed, warnings });
    }

    /// Removes the copy `origin` of EndpointSlice `namespace/name`.
    pub fn delete_slice(&mut self, origin: Origin, namespace: &str, name: &str) {
        self.remove_slice(&(ns_or_default(namespace), name.to_string(), origin));
    }

    fn remove_slice(&mut self, key: &SliceName) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        self.warnings_changed |= !old.warnings.is_empty();
        if let Some((service, _)) = old.parsed {
            if let Some(of) = self.slices_of.get_mut(&service) {
                of.remove(key);
                if of.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
    }

    /// Adds or replaces the copy `origin` of a Node.
    pub fn put_node(&mut self, origin: Origin, mut node: Node) {
        crate::source::trim::node(&mut node);
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
    pub fn set_node_addresses(&mut self, mut addresses: Vec<Ipv4Addr>) -> bool {
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
    pub fn node_addresses(&self) -> &[Ipv4Addr] {
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
        self.dirty.extend(self.claimed.keys().cloned());
    }

    /// Derives every changed Service again and returns the frontends whose
    /// state may differ from before (added, removed or changed).
    pub fn settle(&mut self) -> BTreeSet<Frontend> {
        for name in std::mem::take(&mut self.dirty) {
            self.unclaim(&name);
            let Some(copies) = self.services.get(&name) else {
                continue;
            };
            let service = copies
                .values()
                .min_by(|a, b| by_content(a, b))
                .expect("a Service entry holds at least one copy");
            let slices: Vec<&SliceEndpoints> = self
                .slices_of
                .get(&name)
                .into_iter()
                .flat_map(Few::keys)
                .filter_map(|key| self.slices.get(key))
                .filter_map(|slice| slice.parsed.as_ref().map(|(_, parsed)| parsed))
                .collect();
            let derived = derive_service(service, &slices, &self.node);
            let extra_copies = copies.len() - 1;
            self.claim(name, derived, extra_copies);
        }
        std::mem::take(&mut self.touched)
    }

    /// Withdraws every claim of `name`.
    fn unclaim(&mut self, name: &ServiceName) {
        let Some(old) = self.claimed.remove(name) else {
            return;
        };
        self.warnings_changed |= !old.warnings.is_empty() || old.health_check.is_some();
        for frontend in old.frontends {
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

    fn claim(&mut self, name: ServiceName, derived: Derived, extra_copies: usize) {
        let Derived {
            claims,
            health_check,
            mut warnings,
        } = derived;
        let label = format!("{}/{}", name.0, name.1);
        warnings.extend((0..extra_copies).map(|_| duplicate(&label)));
        self.warnings_changed |= !warnings.is_empty() || health_check.is_some();
        let mut claimed = Claimed {
            frontends: Vec::with_capacity(claims.len()),
            health_check: None,
            warnings,
        };
        for (frontend, port, state) in claims {
            let all = self.claims.entry(frontend).or_default();
            all.insert(name.clone(), (port, state));
            if all.len() > 1 {
                self.contested.insert(frontend);
                self.warnings_changed = true;
            }
            self.touched.insert(frontend);
            claimed.frontends.push(frontend);
        }
        if let Some((port, check)) = health_check {
            self.health_claims
                .entry(port)
                .or_default()
                .insert(name.clone(), check);
            claimed.health_check = Some(port);
            self.decide_health_check(port);
        }
        self.claimed.insert(name, claimed);
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
            self.services.values().map(Few::len).sum(),
            self.slices.len(),
            self.nodes.len(),
        )
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
            .claimed
            .values()
            .flat_map(|c| c.warnings.iter().cloned())
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
            for ((namespace, name), (port, _)) in claims {
                let service = format!("{namespace}/{name}");
                out.push(frontend_taken(&service, port, *frontend, &winner.service));
            }
        }
        for (port, claims) in &self.health_claims {
            let mut claims = claims.iter();
            let Some((_, winner)) = claims.next() else {
                continue;
            };
            for ((namespace, name), _) in claims {
                let service = format!("{namespace}/{name}");
                out.push(health_check_taken(&service, *port, winner));
            }
        }
        out.sort();
        out
    }
}

fn ns_or_default(namespace: &str) -> String {
    if namespace.is_empty() {
        super::DEFAULT_NAMESPACE.to_string()
    } else {
        namespace.to_string()
    }
}

fn service_name(service: &Service) -> ServiceName {
    let (namespace, name) = identity(service);
    (namespace.to_string(), name.to_string())
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
            ["10.96.0.3".parse::<Ipv4Addr>().unwrap()]
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
        assert_eq!(t.frontend(&fe).unwrap().service, "default/a");
        assert_eq!(t.warnings().len(), 1);
        t.delete_service(0, "default", "a");
        assert!(t.settle().contains(&fe));
        assert_eq!(t.frontend(&fe).unwrap().service, "default/b");
        assert!(t.warnings().is_empty());
    }
}

#[cfg(test)]
mod properties {
    //! Any sequence of changes leaves the tracker where a derivation from
    //! scratch of the final objects lands.

    use super::super::fixtures::{service, slice};
    use super::super::{DesiredState, compute};
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Service(u8, Option<(u8, u16)>),
        Slice(u8, u8, Option<Vec<(u8, bool)>>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (
                0u8..4,
                prop::option::of((0u8..3, prop::sample::select(vec![80u16, 53])))
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
                    Step::Service(s, Some((ip, port))) => {
                        // Few cluster IPs, so Services collide on frontends.
                        let svc = service(&format!("s{s}"), &format!("10.96.0.{ip}"), &[("", i32::from(port), "TCP")]);
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
        }
    }
}
