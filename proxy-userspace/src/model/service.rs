//! One Service: what it asks for, read and validated once as it arrives
//! ([`ServiceFacts`]: its cluster IPs, ports, exposure and affinity), and
//! its frontends and health check on this node ([`derive_service`]), the
//! claims it makes before conflicts with other Services are settled by the
//! tracker.

use super::*;

/// Everything the model reads of one Service, validated once: a few
/// hundred bytes in place of the object, which is what the tracker keeps
/// for each of them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceFacts {
    pub name: ServiceName,
    /// `None` when nothing is programmed for it: another proxy's, headless,
    /// ExternalName, or unusable (a warning says why).
    pub(crate) spec: Option<Box<Spec>>,
    /// What was skipped while reading it.
    pub(crate) warnings: Vec<Warning>,
}

/// The valid part of a Service's spec (and status).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Spec {
    /// The cluster IPs, at most one per family, sorted (IPv4 first).
    pub(crate) cluster_ips: Box<[IpAddr]>,
    /// The family of its primary cluster IP (`ipFamilies[0]`): the one
    /// its health check counts endpoints of.
    pub(crate) primary: Family,
    /// The valid ports, in spec order.
    pub(super) ports: Box<[Port]>,
    pub(super) policy: TrafficPolicy,
    pub(super) affinity_timeout_s: Option<u32>,
    pub(crate) exposure: Exposure,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Port {
    pub(super) name: Arc<str>,
    pub(super) number: u16,
    pub(super) protocol: Protocol,
    /// Served only on types NodePort and LoadBalancer.
    pub(super) node_port: Option<u16>,
}

impl ServiceFacts {
    /// Reads `service` (see the module documentation of [`super`] for the
    /// rules); problems become warnings, skipped as narrowly as possible.
    pub fn of(service: &api::Service) -> Self {
        let (namespace, name) = identity(&service.metadata);
        let mut out = Self {
            name: ServiceName::new(namespace, name),
            spec: None,
            warnings: Vec::new(),
        };
        let object = format!("Service {namespace}/{name}");
        let warnings = &mut out.warnings;
        if name.is_empty() {
            warn(warnings, &object, Problem::NoName);
            return out;
        }
        if !is_ours(&service.metadata) {
            return out;
        }
        let Some(spec) = &service.spec else {
            warn(warnings, &object, Problem::NoClusterIp);
            return out;
        };
        let cluster_ips = match cluster_ips(spec, &mut |problem| warn(warnings, &object, problem)) {
            Ok(Some(addrs)) => addrs,
            Ok(None) => return out,
            Err(problem) => {
                warn(warnings, &object, problem);
                return out;
            }
        };
        let affinity_timeout_s = match session_affinity(spec) {
            Ok(timeout) => timeout,
            Err(problem) => {
                // Without affinity the Service still works; only stickiness
                // is lost, which is better than dropping the Service.
                warn(warnings, &object, problem);
                None
            }
        };
        let families: BTreeSet<Family> = cluster_ips.1.iter().map(|a| Family::of(*a)).collect();
        let exposure = Exposure::of(service, spec, &families, &mut |problem| {
            warn(warnings, &object, problem)
        });
        let mut ports = Vec::new();
        for port in spec.ports.iter().flatten() {
            let (number, protocol) = match service_port(port) {
                Ok(parsed) => parsed,
                Err(problem) => {
                    warn(warnings, &object, problem);
                    continue;
                }
            };
            let node_port = if exposure.node_ports {
                node_port(port).unwrap_or_else(|problem| {
                    warn(warnings, &object, problem);
                    None
                })
            } else {
                None
            };
            ports.push(Port {
                name: intern(port.name.as_deref().unwrap_or("")),
                number,
                protocol,
                node_port,
            });
        }
        let (primary, cluster_ips) = cluster_ips;
        out.spec = Some(Box::new(Spec {
            cluster_ips: cluster_ips.into_iter().collect(),
            primary,
            ports: ports.into(),
            policy: TrafficPolicy::of(spec),
            affinity_timeout_s,
            exposure,
        }));
        out
    }
}

/// What one Service asks for, before conflicts with other Services are
/// settled: every frontend it claims and its health check.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Derived {
    /// (frontend, the Service port's name, its state), in claim order.
    pub claims: Vec<(Frontend, Arc<str>, FrontendState)>,
    pub health_check: Option<(u16, HealthCheck)>,
    /// Problems of this derivation (the Service's own are in its facts).
    pub warnings: Vec<Warning>,
    /// Load-balancer and external IPs refused because they are another
    /// Service's cluster IP.
    pub refused: usize,
}

/// One Service's frontends and health check on `node`, from its facts and
/// slices (see the module documentation for the rules). `cluster_ip_owner`
/// names the Service whose cluster IP an address is, if that is another
/// Service: such an address is never taken as a load-balancer or external
/// IP (the API server allocated it to that Service; kube-proxy lets any
/// Service's `externalIPs` capture it, CVE-2020-8554).
pub(crate) fn derive_service(
    name: &ServiceName,
    spec: &Spec,
    service_slices: &[&SliceEndpoints],
    node: &NodeInfo,
    cluster_ip_owner: &dyn Fn(IpAddr) -> Option<ServiceName>,
) -> Derived {
    let mut out = Derived::default();
    let (namespace, service_name) = (&*name.namespace, &*name.name);
    let exposure = spec.exposure.clone().allowing_node(&node.addresses);
    let families: BTreeSet<Family> = spec.cluster_ips.iter().map(|a| Family::of(*a)).collect();
    // NodePorts answer on the node's addresses of the Service's families
    // (kube-proxy's per-family proxiers each use their family's).
    let node_addresses: BTreeSet<IpAddr> = node
        .addresses
        .iter()
        .copied()
        .filter(|a| families.contains(&Family::of(*a)))
        .collect();
    // Addresses of another Service's cluster IP, refused once each.
    let mut taken: BTreeMap<IpAddr, Option<ServiceName>> = BTreeMap::new();
    let mut refuse = |addr: IpAddr, kind: FrontendKind, out: &mut Derived| {
        let owner = taken.entry(addr).or_insert_with(|| {
            let owner = cluster_ip_owner(addr).filter(|owner| owner != name);
            if let Some(owner) = &owner {
                out.refused += 1;
                out.warnings.push(cluster_ip_taken(name, kind, addr, owner));
            }
            owner
        });
        owner.is_some()
    };
    // Frontends this Service claimed, by the port that claimed them.
    let mut own: BTreeMap<Frontend, Arc<str>> = BTreeMap::new();
    for port in &spec.ports {
        // Endpoints are chosen per family, from that family's slices only,
        // as kube-proxy's proxier of each family does.
        let sets: BTreeMap<Family, _> = families
            .iter()
            .map(|family| {
                let candidates = candidates_for(service_slices, &port.name, port.protocol, *family);
                (*family, categorize(&candidates, spec.policy, node))
            })
            .collect();
        let label: Arc<str> = service_port_name(namespace, service_name, &port.name).into();
        let state = |kind: FrontendKind, family: Family| {
            let exposure = exposure.for_family(family);
            sets[&family].state(label.clone(), kind, &exposure, spec.affinity_timeout_s)
        };
        let mut claims: Vec<(Frontend, FrontendKind)> = Vec::new();
        let on = |addr: IpAddr, number: u16| Frontend {
            addr,
            port: number,
            proto: port.protocol,
        };
        claims.extend(
            spec.cluster_ips
                .iter()
                .map(|a| (on(*a, port.number), FrontendKind::ClusterIp)),
        );
        if let Some(node_port) = port.node_port {
            claims.extend(
                node_addresses
                    .iter()
                    .map(|a| (on(*a, node_port), FrontendKind::NodePort)),
            );
        }
        claims.extend(
            exposure
                .load_balancer_ips
                .iter()
                .map(|a| (on(*a, port.number), FrontendKind::LoadBalancer)),
        );
        claims.extend(
            exposure
                .external_ips
                .iter()
                .map(|a| (on(*a, port.number), FrontendKind::ExternalIp)),
        );
        for (frontend, kind) in claims {
            if matches!(kind, FrontendKind::LoadBalancer | FrontendKind::ExternalIp)
                && refuse(frontend.addr, kind, &mut out)
            {
                continue;
            }
            if let Some(owner) = own.get(&frontend) {
                if *owner == port.name {
                    // One Service naming one address twice (an external
                    // IP that is also its load-balancer IP): the first
                    // kind in ClusterIp, NodePort, LoadBalancer,
                    // ExternalIp order keeps it, so an LB IP keeps its
                    // source ranges, as kube-proxy's firewall applies
                    // them to any traffic to the LB IP.
                    tracing::debug!("Service {name}: {frontend} is claimed twice ({kind:?})");
                    continue;
                }
                // Two ports of one Service on one frontend: only invalid
                // input gets here (the API server rejects duplicate ports).
                let problem = Problem::FrontendTaken {
                    name: port.name.to_string(),
                    frontend,
                    owner: service_port_name(namespace, service_name, owner),
                };
                warn(&mut out.warnings, &format!("Service {name}"), problem);
                continue;
            }
            own.insert(frontend, port.name.clone());
            let state = state(kind, Family::of(frontend.addr));
            out.claims.push((frontend, port.name.clone(), state));
        }
    }
    // kube-proxy keeps health checks per service port, so a Service
    // without a usable port has none.
    if let Some(port) = exposure
        .health_check_port
        .filter(|_| !spec.ports.is_empty())
    {
        let check = HealthCheck {
            namespace: namespace.to_string(),
            name: service_name.to_string(),
            local_endpoints: local_ready_addresses(service_slices, node, spec.primary),
        };
        out.health_check = Some((port, check));
    }
    out
}

/// The warning of a Service whose load-balancer or external IP `addr` is
/// `owner`'s cluster IP.
fn cluster_ip_taken(
    service: &ServiceName,
    kind: FrontendKind,
    addr: IpAddr,
    owner: &ServiceName,
) -> Warning {
    let field = match kind {
        FrontendKind::LoadBalancer => "status.loadBalancer.ingress",
        _ => "externalIPs",
    };
    Warning {
        object: format!("Service {service}"),
        reason: Problem::ClusterIpTaken {
            field,
            addr,
            owner: owner.to_string(),
        }
        .to_string(),
    }
}

/// The warning of a Service that lost `frontend` (claimed by its port
/// `port_name`) to `owner`, a Service earlier in (namespace, name) order.
pub(crate) fn frontend_taken(
    service: &ServiceName,
    port_name: &str,
    frontend: Frontend,
    owner: &str,
) -> Warning {
    Warning {
        object: format!("Service {service}"),
        reason: Problem::FrontendTaken {
            name: port_name.to_string(),
            frontend,
            owner: owner.to_string(),
        }
        .to_string(),
    }
}

/// The warning of a Service that lost health check `port` to `owner`.
pub(crate) fn health_check_taken(service: &ServiceName, port: u16, owner: &HealthCheck) -> Warning {
    Warning {
        object: format!("Service {service}"),
        reason: Problem::HealthCheckPortTaken {
            port,
            owner: format!("{}/{}", owner.namespace, owner.name),
        }
        .to_string(),
    }
}

/// The warning of each extra copy of one Service name.
pub(crate) fn duplicate(service: &ServiceName) -> Warning {
    Warning {
        object: format!("Service {service}"),
        reason: Problem::Duplicate.to_string(),
    }
}

/// kube-proxy's `ServicePortName.String()`.
pub(super) fn service_port_name(namespace: &str, name: &str, port: &str) -> String {
    if port.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port}")
    }
}

/// `sessionAffinity: ClientIP` and its timeout (default 10800 s), as
/// kube-proxy reads them; `None` (the default) is no affinity.
pub(super) fn session_affinity(spec: &api::ServiceSpec) -> Result<Option<u32>, Problem> {
    match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S as i32).contains(&t) => Ok(Some(t as u32)),
                Some(t) => Err(Problem::AffinityTimeout(t)),
            }
        }
        Some(other) => Err(Problem::AffinityKind(other.to_string())),
    }
}

/// The cluster IPs to serve, at most one per family, and the primary
/// family; `None` for Services kube-proxy does not proxy.
///
/// Families as the API server allocates them: `ipFamilies` (when given)
/// lists the families served, primary first, and `ipFamilyPolicy:
/// SingleStack` keeps only the primary one; without them, every family
/// `clusterIPs` lists is served (a static manifest may leave both out). An
/// address of another family, a second one of a family or an IPv4-mapped
/// IPv6 address is warned about (through `warn`) and skipped; the rest is
/// served. An unparseable address makes the whole Service unusable, as
/// before: nothing says which family it meant.
pub(super) fn cluster_ips(
    spec: &api::ServiceSpec,
    warn: &mut dyn FnMut(Problem),
) -> Result<Option<(Family, BTreeSet<IpAddr>)>, Problem> {
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if listed.contains(&"None") || spec.cluster_ip.as_deref() == Some("None") {
        return Ok(None);
    }
    if listed.iter().all(|ip| ip.is_empty()) {
        return Err(Problem::NoClusterIp);
    }
    let declared: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| Family::from_api(f))
        .collect();
    let single = spec.ip_family_policy.as_deref() == Some("SingleStack");
    let mut parsed = Vec::new();
    for ip in listed.iter().filter(|ip| !ip.is_empty()) {
        match parse_ip(ip) {
            Ok(addr) => parsed.push(addr),
            Err(source @ IpError::Ipv4Mapped) => warn(Problem::BadFamilyAddress {
                field: "clusterIPs",
                addr: ip.to_string(),
                source,
            }),
            Err(IpError::NotAnAddress) => return Err(Problem::BadClusterIp(ip.to_string())),
        }
    }
    let Some(first) = parsed.first() else {
        return Err(Problem::NoClusterIp);
    };
    let primary = declared.first().copied().unwrap_or(Family::of(*first));
    let allowed = |family: Family| {
        if single {
            family == primary
        } else {
            declared.is_empty() || declared.contains(&family)
        }
    };
    let families_text = || {
        let names: Vec<&str> = if declared.is_empty() {
            vec![primary.as_str()]
        } else {
            declared.iter().map(Family::as_str).collect()
        };
        let policy = spec.ip_family_policy.as_deref().unwrap_or("unset");
        format!("[{}], ipFamilyPolicy {policy}", names.join(", "))
    };
    let mut addrs: BTreeMap<Family, IpAddr> = BTreeMap::new();
    for addr in parsed {
        let family = Family::of(addr);
        if !allowed(family) {
            warn(Problem::FamilyNotServed {
                field: "clusterIPs",
                addr: addr.to_string(),
                family,
                families: families_text(),
            });
        } else if let std::collections::btree_map::Entry::Vacant(free) = addrs.entry(family) {
            free.insert(addr);
        } else {
            warn(Problem::SecondClusterIp { family, addr });
        }
    }
    if addrs.is_empty() {
        return Err(Problem::NoClusterIp);
    }
    let primary = if addrs.contains_key(&primary) {
        primary
    } else {
        *addrs.keys().next().expect("not empty")
    };
    Ok(Some((primary, addrs.into_values().collect())))
}

pub(super) fn service_port(port: &api::ServicePort) -> Result<(u16, Protocol), Problem> {
    let name = port.name.clone().unwrap_or_default();
    let protocol = Protocol::from_api(port.protocol.as_deref()).map_err(|source| {
        Problem::ServicePortProtocol {
            name: name.clone(),
            source,
        }
    })?;
    let number = port_number(port.port).ok_or(Problem::ServicePortRange {
        name,
        port: port.port,
    })?;
    Ok((number, protocol))
}

/// The port's `nodePort`; unset and 0 (what `allocateLoadBalancerNodePorts:
/// false` leaves) mean none.
pub(super) fn node_port(port: &api::ServicePort) -> Result<Option<u16>, Problem> {
    match port.node_port {
        None | Some(0) => Ok(None),
        Some(number) => port_number(number)
            .map(Some)
            .ok_or_else(|| Problem::NodePortRange {
                name: port.name.clone().unwrap_or_default(),
                port: number,
            }),
    }
}

/// What a Service exposes beyond its cluster IPs, read as kube-proxy's
/// service change tracker reads it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Exposure {
    /// Type NodePort or LoadBalancer: its ports' `nodePort`s are served. (The
    /// API server only allows them on those types; kube-proxy itself does
    /// not look at the type, which only matters for static manifests.)
    pub(super) node_ports: bool,
    /// `externalTrafficPolicy: Local`, which only means something on the
    /// NodePort and LoadBalancer types (kube-proxy's `ExternalPolicyLocal`):
    /// the external IPs of a ClusterIP Service always use Cluster.
    pub(super) external_local: bool,
    /// VIP-mode ingress IPs of the Service's families, whatever the type,
    /// as kube-proxy. Sorted.
    pub(crate) load_balancer_ips: Vec<IpAddr>,
    /// Of the Service's families. Sorted.
    pub(crate) external_ips: Vec<IpAddr>,
    /// Both families'; [`Exposure::for_family`] keeps one.
    pub(super) source_ranges: Vec<IpCidr>,
    /// See [`ExternalTraffic::allow_node`]; set per node by
    /// [`Exposure::allowing_node`].
    pub(super) allow_node: bool,
    pub(super) health_check_port: Option<u16>,
}

impl Exposure {
    /// kube-proxy's "allow from node": source ranges that contain a node
    /// address also let in the Service's LB IPs and the node itself.
    pub(super) fn allowing_node(mut self, node_addresses: &[IpAddr]) -> Self {
        self.allow_node = self
            .source_ranges
            .iter()
            .any(|range| node_addresses.iter().any(|a| range.contains(*a)));
        if self.allow_node {
            let mut ranges: BTreeSet<IpCidr> = self.source_ranges.drain(..).collect();
            ranges.extend(self.load_balancer_ips.iter().map(|ip| IpCidr::host(*ip)));
            self.source_ranges = ranges.into_iter().collect();
        }
        self
    }

    /// What the frontends of one family see: that family's source ranges
    /// only (kube-proxy's proxier of each family filters them so).
    pub(super) fn for_family(&self, family: Family) -> Self {
        let mut out = self.clone();
        out.source_ranges.retain(|range| range.family() == family);
        out
    }

    /// The addresses this Service asks for beyond its cluster IPs (and
    /// node ports), sorted.
    pub(crate) fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let mut all: Vec<IpAddr> = self
            .load_balancer_ips
            .iter()
            .chain(&self.external_ips)
            .copied()
            .collect();
        all.sort();
        all.dedup();
        all.into_iter()
    }

    pub(super) fn of(
        service: &api::Service,
        spec: &api::ServiceSpec,
        families: &BTreeSet<Family>,
        warn: &mut dyn FnMut(Problem),
    ) -> Self {
        // An address of a family the Service has no cluster IP of is not
        // served (kube-proxy's proxier of that family skips the Service).
        let mut of_family =
            |field: &'static str, text: &str, bad: fn(String) -> Problem| match parse_ip(text) {
                Ok(addr) if families.contains(&Family::of(addr)) => Some(addr),
                Ok(addr) => {
                    let names: Vec<&str> = families.iter().map(Family::as_str).collect();
                    warn(Problem::FamilyNotServed {
                        field,
                        addr: addr.to_string(),
                        family: Family::of(addr),
                        families: format!("[{}]", names.join(", ")),
                    });
                    None
                }
                Err(source @ IpError::Ipv4Mapped) => {
                    warn(Problem::BadFamilyAddress {
                        field,
                        addr: text.to_string(),
                        source,
                    });
                    None
                }
                Err(IpError::NotAnAddress) => {
                    warn(bad(text.to_string()));
                    None
                }
            };
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
        let external_local = node_ports && spec.external_traffic_policy.as_deref() == Some("Local");

        let mut external_ips = BTreeSet::new();
        for ip in spec.external_ips.iter().flatten() {
            external_ips.extend(of_family("externalIPs", ip, Problem::BadExternalIp));
        }

        let mut load_balancer_ips = BTreeSet::new();
        let ingress = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            // `ipMode: Proxy` load balancers deliver to the node with the
            // node as destination, so no rule may capture the LB IP (its
            // traffic would skip the load balancer's proxying). Unset is VIP.
            if entry.ip_mode.as_deref().is_some_and(|mode| mode != "VIP") {
                continue;
            }
            // Hostname-only ingress entries have no IP to serve.
            let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue;
            };
            load_balancer_ips.extend(of_family(
                "status.loadBalancer.ingress",
                ip,
                Problem::BadIngressIp,
            ));
        }

        let mut source_ranges = BTreeSet::new();
        for range in spec.load_balancer_source_ranges.iter().flatten() {
            // API validation lets whitespace padding through; kube-proxy
            // trims it.
            let range = range.trim();
            match range.parse::<IpCidr>() {
                Ok(cidr) => {
                    source_ranges.insert(cidr);
                }
                Err(e) => warn(Problem::BadSourceRange(e)),
            }
        }

        let health_check_port = if type_ == "LoadBalancer" && external_local {
            match spec.health_check_node_port {
                None | Some(0) => {
                    warn(Problem::NoHealthCheckPort);
                    None
                }
                Some(port) => {
                    let number = port_number(port);
                    if number.is_none() {
                        warn(Problem::HealthCheckPortRange(port));
                    }
                    number
                }
            }
        } else {
            None
        };

        Self {
            node_ports,
            external_local,
            load_balancer_ips: load_balancer_ips.into_iter().collect(),
            external_ips: external_ips.into_iter().collect(),
            source_ranges: source_ranges.into_iter().collect(),
            allow_node: false,
            health_check_port,
        }
    }
}

#[cfg(test)]
mod cluster_ips {
    use super::super::fixtures::{fe, from};
    use super::*;
    use serde_json::json;

    fn kube_dns() -> Service {
        from(json!({
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]},
        }))
    }

    /// Namespace `aaa` sorts before `kube-system`: by name order alone it
    /// would win every frontend it shares with kube-dns.
    fn external_ip_thief() -> Service {
        from(json!({
            "metadata": {"name": "x", "namespace": "aaa"},
            "spec": {"clusterIP": "10.96.5.5", "externalIPs": ["10.96.0.10", "192.0.2.7"],
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "web", "port": 8080}]},
        }))
    }

    fn lb_ip_thief() -> Service {
        from(json!({
            "metadata": {"name": "y", "namespace": "aab"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.5.6",
                     "ports": [{"name": "dns", "port": 53, "protocol": "TCP", "nodePort": 30053}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.96.0.10"}]}},
        }))
    }

    /// Issue 17.4 (kube-proxy's CVE-2020-8554): an external or
    /// load-balancer IP never takes another Service's cluster IP, on any
    /// port and in any order; the refusal names both Services and is
    /// counted.
    #[test]
    fn a_cluster_ip_is_never_taken_by_another_services_external_or_lb_ip() {
        let services = [kube_dns(), external_ip_thief(), lb_ip_thief()];
        let node = NodeInfo {
            name: "node-a".into(),
            ..NodeInfo::default()
        }
        .with_addresses(["192.168.0.2".parse::<IpAddr>().unwrap()]);
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2]] {
            let services: Vec<Service> = order.iter().map(|i| services[*i].clone()).collect();
            let (state, warnings) = compute(&services, &[], &node);
            let dns = &state.frontends[&fe("10.96.0.10", 53, Protocol::Udp)];
            assert_eq!(
                (&*dns.service, dns.kind),
                ("kube-system/kube-dns:dns", FrontendKind::ClusterIp)
            );
            let dns_tcp = &state.frontends[&fe("10.96.0.10", 53, Protocol::Tcp)];
            assert_eq!(dns_tcp.kind, FrontendKind::ClusterIp);
            // Not even a port the owner does not serve.
            assert!(
                !state
                    .frontends
                    .contains_key(&fe("10.96.0.10", 8080, Protocol::Tcp))
            );
            // The thieves keep everything else.
            for kept in [
                fe("10.96.5.5", 53, Protocol::Udp),
                fe("192.0.2.7", 8080, Protocol::Tcp),
                fe("10.96.5.6", 53, Protocol::Tcp),
                fe("192.168.0.2", 30053, Protocol::Tcp),
            ] {
                assert!(state.frontends.contains_key(&kept), "{kept}");
            }
            let refusals: Vec<&Warning> = warnings
                .iter()
                .filter(|w| w.reason.contains("is the cluster IP of"))
                .collect();
            assert_eq!(refusals.len(), 2, "{warnings:?}");
            assert_eq!(refusals[0].object, "Service aaa/x");
            assert!(
                refusals[0].reason.starts_with("externalIPs: 10.96.0.10")
                    && refusals[0].reason.contains("Service kube-system/kube-dns"),
                "{}",
                refusals[0]
            );
            assert_eq!(refusals[1].object, "Service aab/y");
            assert!(
                refusals[1]
                    .reason
                    .starts_with("status.loadBalancer.ingress: 10.96.0.10"),
                "{}",
                refusals[1]
            );
            assert_eq!(warnings.len(), 2, "nothing else: {warnings:?}");
            let mut tracker = Tracker::new(node.clone());
            for service in services {
                tracker.put_service(0, service);
            }
            tracker.settle();
            assert_eq!(tracker.refused(), 2);
        }
    }

    /// A Service may name its own cluster IP among its external IPs: that
    /// is one frontend, the cluster IP's, and nothing is refused.
    #[test]
    fn its_own_cluster_ip_as_an_external_ip_is_no_refusal() {
        let svc: Service = from(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "externalIPs": ["10.96.0.20"],
                     "ports": [{"name": "http", "port": 80}]},
        }));
        let (state, warnings) = compute(&[svc], &[], &NodeInfo::default());
        assert_eq!(warnings, []);
        assert_eq!(state.frontends.len(), 1);
        let st = &state.frontends[&fe("10.96.0.20", 80, Protocol::Tcp)];
        assert_eq!(st.kind, FrontendKind::ClusterIp);
    }
}

#[cfg(test)]
mod tests {
    //! NodePort, LoadBalancer and external IPs, through [`compute`] as the
    //! agent derives them.

    use super::super::api::ServiceSpec;
    use super::super::fixtures::*;
    use super::*;
    use serde_json::{Value, json};

    const NODE_IP2: &str = "172.16.0.1";
    const LB_IP: &str = "203.0.113.1";
    const EXT_IP: &str = "198.51.100.7";

    /// `web` (10.96.0.10, port http 80 -> nodePort 30080) with `spec`
    /// fields overriding, and `status`.
    fn exposed(spec: Value, status: Value) -> Service {
        exposed_named("web", "10.96.0.10", spec, status)
    }

    fn exposed_named(name: &str, cluster_ip: &str, spec: Value, status: Value) -> Service {
        let mut svc = json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip,
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]},
            "status": status,
        });
        for (key, value) in spec.as_object().unwrap() {
            svc["spec"][key] = value.clone();
        }
        from(svc)
    }

    fn lb_status(ips: &[&str]) -> Value {
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        json!({"loadBalancer": {"ingress": ingress}})
    }

    fn node_a() -> NodeInfo {
        node("node-a", None).with_addresses([ip(NODE_IP), ip(NODE_IP2), ip(NODE_IP)])
    }

    /// Ready on node-a, ready on node-b, terminating on node-a.
    fn mixed_slices() -> Vec<EndpointSlice> {
        vec![web_slice(
            "web-a",
            &[
                on("10.0.0.1", "node-a", READY),
                on("10.0.0.2", "node-b", READY),
                on("10.0.0.3", "node-a", TERMINATING),
            ],
        )]
    }

    fn kinds(state: &DesiredState) -> Vec<(Frontend, FrontendKind)> {
        state.frontends.iter().map(|(f, s)| (*f, s.kind)).collect()
    }

    fn external(state: &DesiredState, frontend: Frontend) -> &ExternalTraffic {
        state.frontends[&frontend]
            .external
            .as_ref()
            .expect("external frontend")
    }

    #[test]
    fn node_port_answers_on_every_node_address() {
        let svc = exposed(json!({"type": "NodePort"}), Value::Null);
        let (state, warnings) = compute(std::slice::from_ref(&svc), &mixed_slices(), &node_a());
        assert_eq!(warnings, []);
        assert_eq!(
            kinds(&state),
            [
                (fe("10.96.0.10", 80, Protocol::Tcp), FrontendKind::ClusterIp),
                (fe(NODE_IP2, 30080, Protocol::Tcp), FrontendKind::NodePort),
                (fe(NODE_IP, 30080, Protocol::Tcp), FrontendKind::NodePort),
            ]
        );
        assert_eq!(
            state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)].external,
            None
        );
        let np = &state.frontends[&fe(NODE_IP, 30080, Protocol::Tcp)];
        assert_eq!(&*np.service, "default/web:http");
        assert_eq!(np.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);
        assert_eq!(
            np.external,
            Some(ExternalTraffic {
                endpoints: vec![ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)],
                empty_action: EmptyAction::Reject,
                masquerade: true,
                source_ranges: vec![],
                allow_node: false,
            })
        );
        assert_eq!(np.lingering, [ep("10.0.0.3", 8080)]);
        // A node without NodePort addresses serves none.
        let (state, _) = compute(&[svc], &[], &node("node-a", None));
        assert_eq!(state.frontends.len(), 1);
        // nodePort on a ClusterIP Service (only a static manifest can say
        // that): not served.
        let cluster_ip = exposed(json!({}), Value::Null);
        let (state, _) = compute(&[cluster_ip], &[], &node_a());
        assert_eq!(
            kinds(&state),
            [(fe("10.96.0.10", 80, Protocol::Tcp), FrontendKind::ClusterIp)]
        );
    }

    #[test]
    fn node_port_out_of_range_warns_and_keeps_the_rest() {
        let svc = exposed(
            json!({"type": "NodePort",
                   "ports": [{"name": "http", "port": 80, "nodePort": 70000}]}),
            Value::Null,
        );
        let (state, warnings) = compute(&[svc], &[], &node_a());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].reason.contains("nodePort 70000"),
            "{}",
            warnings[0]
        );
        assert_eq!(
            kinds(&state),
            [(fe("10.96.0.10", 80, Protocol::Tcp), FrontendKind::ClusterIp)]
        );
    }

    #[test]
    fn load_balancer_ingress_ips_in_vip_mode() {
        let status = json!({"loadBalancer": {"ingress": [
            {"ip": LB_IP},
            {"ip": "203.0.113.2", "ipMode": "VIP"},
            {"ip": "203.0.113.3", "ipMode": "Proxy"},
            {"hostname": "lb.example.com"},
            {"ip": "2001:db8::1"},
        ]}});
        let svc = exposed(json!({"type": "LoadBalancer"}), status);
        let (state, warnings) = compute(&[svc], &mixed_slices(), &node_a());
        // An IPv6 ingress IP on a Service without an IPv6 cluster IP is
        // not served (kube-proxy's IPv6 proxier skips the Service), and
        // said so.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0]
                .reason
                .contains("2001:db8::1 is IPv6 but the Service has no IPv6"),
            "{}",
            warnings[0]
        );
        assert_eq!(
            kinds(&state),
            [
                (fe("10.96.0.10", 80, Protocol::Tcp), FrontendKind::ClusterIp),
                (fe(NODE_IP2, 30080, Protocol::Tcp), FrontendKind::NodePort),
                (fe(NODE_IP, 30080, Protocol::Tcp), FrontendKind::NodePort),
                (fe(LB_IP, 80, Protocol::Tcp), FrontendKind::LoadBalancer),
                (
                    fe("203.0.113.2", 80, Protocol::Tcp),
                    FrontendKind::LoadBalancer
                ),
            ]
        );
        let lb = external(&state, fe(LB_IP, 80, Protocol::Tcp));
        assert_eq!(lb.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);
        assert!(lb.masquerade);
    }

    #[test]
    fn no_node_port_frontend_without_allocated_node_ports() {
        let svc = exposed(
            json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                   "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
            lb_status(&[LB_IP]),
        );
        let (state, warnings) = compute(&[svc], &[], &node_a());
        assert_eq!(warnings, []);
        assert_eq!(
            kinds(&state),
            [
                (fe("10.96.0.10", 80, Protocol::Tcp), FrontendKind::ClusterIp),
                (fe(LB_IP, 80, Protocol::Tcp), FrontendKind::LoadBalancer),
            ]
        );
    }

    #[test]
    fn external_ips_on_any_service_type_and_cluster_policy_on_cluster_ip() {
        // externalTrafficPolicy only means something on NodePort and
        // LoadBalancer Services, so Local is ignored here.
        let svc = exposed(
            json!({"externalIPs": [EXT_IP, "fd00::7"], "externalTrafficPolicy": "Local"}),
            Value::Null,
        );
        let (state, warnings) = compute(&[svc], &mixed_slices(), &node("node-b", None));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].reason.contains("externalIPs: fd00::7 is IPv6"));
        assert_eq!(
            kinds(&state),
            [
                (fe("10.96.0.10", 80, Protocol::Tcp), FrontendKind::ClusterIp),
                (fe(EXT_IP, 80, Protocol::Tcp), FrontendKind::ExternalIp),
            ]
        );
        let ext = external(&state, fe(EXT_IP, 80, Protocol::Tcp));
        assert_eq!(ext.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);
        assert!(ext.masquerade);
        assert_eq!(ext.empty_action, EmptyAction::Reject);
    }

    #[test]
    fn external_traffic_policy_local_uses_local_endpoints_and_keeps_the_client() {
        let svc = exposed(
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": 32000, "externalIPs": [EXT_IP]}),
            lb_status(&[LB_IP]),
        );
        let (state, warnings) = compute(std::slice::from_ref(&svc), &mixed_slices(), &node_a());
        assert_eq!(warnings, []);
        for frontend in [
            fe(NODE_IP, 30080, Protocol::Tcp),
            fe(LB_IP, 80, Protocol::Tcp),
            fe(EXT_IP, 80, Protocol::Tcp),
        ] {
            let st = &state.frontends[&frontend];
            // In-cluster traffic is not subject to the external policy.
            assert_eq!(st.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);
            assert_eq!(st.empty_action, EmptyAction::Reject);
            let ext = st.external.as_ref().unwrap();
            assert_eq!(ext.endpoints, [ep("10.0.0.1", 8080)], "{frontend}");
            assert_eq!(ext.empty_action, EmptyAction::Drop);
            assert!(!ext.masquerade);
            assert_eq!(st.lingering, [ep("10.0.0.3", 8080)]);
        }
        // The cluster IP is untouched by the external policy.
        let cip = &state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(cip.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);

        // A node without local endpoints drops external traffic.
        let c = node("node-c", None).with_addresses([ip(NODE_IP)]);
        let (state, _) = compute(std::slice::from_ref(&svc), &mixed_slices(), &c);
        let st = &state.frontends[&fe(NODE_IP, 30080, Protocol::Tcp)];
        let ext = st.external.as_ref().unwrap();
        assert_eq!(ext.endpoints, []);
        assert_eq!(ext.empty_action, EmptyAction::Drop);
        assert_eq!(st.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);

        // No usable endpoint anywhere: rejected, whatever the policy.
        let (state, _) = compute(std::slice::from_ref(&svc), &[], &node_a());
        let ext = external(&state, fe(LB_IP, 80, Protocol::Tcp));
        assert_eq!(ext.empty_action, EmptyAction::Reject);

        // Only a terminating endpoint here: external traffic uses it while
        // in-cluster traffic goes to the ready remote one; it is in the
        // external set, so it is not lingering.
        let draining = [web_slice(
            "web-a",
            &[
                on("10.0.0.2", "node-b", READY),
                on("10.0.0.3", "node-a", TERMINATING),
            ],
        )];
        let (state, _) = compute(&[svc], &draining, &node_a());
        let st = &state.frontends[&fe(LB_IP, 80, Protocol::Tcp)];
        assert_eq!(st.endpoints, [ep("10.0.0.2", 8080)]);
        assert_eq!(
            st.external.as_ref().unwrap().endpoints,
            [ep("10.0.0.3", 8080)]
        );
        assert_eq!(st.lingering, []);
    }

    #[test]
    fn external_traffic_policy_cluster_uses_topology_like_cluster_ips() {
        let svc = exposed(json!({"type": "NodePort"}), Value::Null);
        let slices = [web_slice(
            "web-a",
            &[
                with_hints("10.0.0.1", &["zone-a"], &[]),
                with_hints("10.0.0.2", &["zone-b"], &[]),
            ],
        )];
        let a = node("node-a", Some("zone-a")).with_addresses([ip(NODE_IP)]);
        let (state, _) = compute(&[svc], &slices, &a);
        let st = &state.frontends[&fe(NODE_IP, 30080, Protocol::Tcp)];
        assert_eq!(st.endpoints, [ep("10.0.0.1", 8080)]);
        assert_eq!(
            st.external.as_ref().unwrap().endpoints,
            [ep("10.0.0.1", 8080)]
        );
        assert_eq!(st.lingering, [ep("10.0.0.2", 8080)]);
    }

    #[test]
    fn internal_local_and_external_cluster_combined() {
        let svc = exposed(
            json!({"type": "NodePort", "internalTrafficPolicy": "Local",
                   "externalTrafficPolicy": "Cluster"}),
            Value::Null,
        );
        let (state, warnings) = compute(
            &[svc],
            &mixed_slices(),
            &node("node-b", None).with_addresses([ip(NODE_IP)]),
        );
        assert_eq!(warnings, []);
        let cip = &state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(
            cip.endpoints,
            [ep("10.0.0.2", 8080)],
            "iTP Local: this node's"
        );
        assert_eq!(cip.external, None);
        let np = &state.frontends[&fe(NODE_IP, 30080, Protocol::Tcp)];
        // iTP governs cluster IPs only.
        assert_eq!(np.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);
        let ext = np.external.as_ref().unwrap();
        assert_eq!(ext.endpoints, [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]);
        assert!(ext.masquerade);
        assert_eq!(ext.empty_action, EmptyAction::Reject);
    }

    #[test]
    fn source_ranges_apply_to_load_balancer_frontends_only() {
        let svc = exposed(
            json!({"type": "LoadBalancer", "externalIPs": [EXT_IP],
                   "loadBalancerSourceRanges":
                       [" 10.0.0.0/8 ", "192.168.1.7/24", "10.0.0.0/8", "2001:db8::/32", "bogus", "1.2.3.4/33"]}),
            lb_status(&[LB_IP]),
        );
        let (state, warnings) = compute(&[svc], &[], &node_a());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().all(|w| w.object == "Service default/web"));
        assert!(
            warnings.iter().any(|w| w.reason.contains("bogus")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.reason.contains("1.2.3.4/33")),
            "{warnings:?}"
        );
        let cidr = |text: &str| text.parse::<IpCidr>().unwrap();
        assert_eq!(
            external(&state, fe(LB_IP, 80, Protocol::Tcp)).source_ranges,
            [cidr("10.0.0.0/8"), cidr("192.168.1.0/24")]
        );
        assert_eq!(
            external(&state, fe(NODE_IP, 30080, Protocol::Tcp)).source_ranges,
            []
        );
        assert_eq!(
            external(&state, fe(EXT_IP, 80, Protocol::Tcp)).source_ranges,
            []
        );
    }

    #[test]
    fn source_ranges_with_a_node_address_let_in_the_node_and_the_lb_ips() {
        let svc = |ranges: &str| {
            exposed(
                json!({"type": "LoadBalancer",
                       "loadBalancerSourceRanges": [ranges]}),
                lb_status(&[LB_IP]),
            )
        };
        let cidr = |text: &str| text.parse::<IpCidr>().unwrap();
        let (state, _) = compute(&[svc("203.0.113.0/24")], &[], &node_a());
        let ext = external(&state, fe(LB_IP, 80, Protocol::Tcp));
        assert_eq!(ext.source_ranges, [cidr("203.0.113.0/24")]);
        assert!(!ext.allow_node);
        // A range holding this node's address: kube-proxy also accepts the
        // LB IP as a source (a node's own request looping back) and the node.
        let (state, _) = compute(&[svc(&format!("{NODE_IP}/32"))], &[], &node_a());
        let ext = external(&state, fe(LB_IP, 80, Protocol::Tcp));
        assert_eq!(
            ext.source_ranges,
            [cidr(&format!("{NODE_IP}/32")), cidr(&format!("{LB_IP}/32"))]
        );
        assert!(ext.allow_node);
        // NodePorts still bypass them.
        let np = external(&state, fe(NODE_IP, 30080, Protocol::Tcp));
        assert!(np.source_ranges.is_empty() && !np.allow_node);
    }

    #[test]
    fn health_check_counts_local_ready_endpoint_addresses() {
        let two_ports = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                      {"name": "https", "port": 443, "nodePort": 30443}]});
        let svc = exposed(two_ports.clone(), lb_status(&[LB_IP]));
        let slices: Vec<EndpointSlice> = vec![from(json!({
            "metadata": {"name": "web-a", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
            "endpoints": [
                on("10.0.0.1", "node-a", READY),
                on("10.0.0.2", "node-a", READY),
                on("10.0.0.3", "node-a", TERMINATING),
                on("10.0.0.4", "node-b", READY),
                on("10.0.0.5", "node-a", (false, false, false)),
            ],
        }))];
        let (state, warnings) = compute(std::slice::from_ref(&svc), &slices, &node_a());
        assert_eq!(warnings, []);
        assert_eq!(
            state.health_checks,
            BTreeMap::from([(
                32000,
                HealthCheck {
                    namespace: "default".into(),
                    name: "web".into(),
                    local_endpoints: 2,
                }
            )])
        );
        let (state, _) = compute(std::slice::from_ref(&svc), &slices, &node("node-c", None));
        assert_eq!(state.health_checks[&32000].local_endpoints, 0);
        let (state, _) = compute(std::slice::from_ref(&svc), &[], &node_a());
        assert_eq!(state.health_checks[&32000].local_endpoints, 0);

        // Only eTP Local LoadBalancers have one.
        for spec in [
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
                   "healthCheckNodePort": 32000}),
            json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": 32000}),
        ] {
            let (state, warnings) = compute(&[exposed(spec, Value::Null)], &slices, &node_a());
            assert_eq!(warnings, []);
            assert!(state.health_checks.is_empty());
        }
        // Missing port: a warning, the Service still served.
        let (state, warnings) = compute(
            &[exposed(
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
                lb_status(&[LB_IP]),
            )],
            &slices,
            &node_a(),
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(state.health_checks.is_empty());
        assert!(state.frontends.contains_key(&fe(LB_IP, 80, Protocol::Tcp)));
        // No usable port, no health check (kube-proxy keeps them per port).
        let portless = exposed(
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": 32000, "ports": []}),
            Value::Null,
        );
        let (state, _) = compute(&[portless], &slices, &node_a());
        assert!(state.health_checks.is_empty());
        // Two Services on one port: the first in name order keeps it.
        let other = exposed_named("api", "10.96.0.11", two_ports, Value::Null);
        let (state, warnings) = compute(&[svc, other], &slices, &node_a());
        assert_eq!(state.health_checks[&32000].name, "api");
        assert_eq!(
            warnings.len(),
            5,
            "hc port, two nodePorts on two addresses: {warnings:?}"
        );
        assert!(warnings.iter().all(|w| w.object == "Service default/web"));
    }

    #[test]
    fn external_ip_colliding_with_another_services_lb_ip_warns() {
        let a = exposed_named(
            "a",
            "10.96.0.11",
            json!({"externalIPs": [LB_IP]}),
            Value::Null,
        );
        let b = exposed_named(
            "b",
            "10.96.0.12",
            json!({"type": "LoadBalancer",
                   "ports": [{"name": "http", "port": 80, "nodePort": 30081}]}),
            lb_status(&[LB_IP]),
        );
        let one = compute(&[b.clone(), a.clone()], &[], &node_a());
        assert_eq!(one, compute(&[a, b], &[], &node_a()));
        let (state, warnings) = one;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].object, "Service default/b");
        assert!(
            warnings[0].reason.contains("default/a:http"),
            "{}",
            warnings[0]
        );
        let st = &state.frontends[&fe(LB_IP, 80, Protocol::Tcp)];
        assert_eq!(
            (&*st.service, st.kind),
            ("default/a:http", FrontendKind::ExternalIp)
        );
        // b keeps its other frontends.
        assert!(
            state
                .frontends
                .contains_key(&fe(NODE_IP, 30081, Protocol::Tcp))
        );
    }

    #[test]
    fn external_ip_equal_to_own_lb_ip_is_one_lb_frontend() {
        let svc = exposed(
            json!({"type": "LoadBalancer", "externalIPs": [LB_IP],
                   "loadBalancerSourceRanges": ["10.0.0.0/8"]}),
            lb_status(&[LB_IP]),
        );
        let (state, warnings) = compute(&[svc], &[], &node_a());
        assert_eq!(warnings, []);
        let st = &state.frontends[&fe(LB_IP, 80, Protocol::Tcp)];
        assert_eq!(st.kind, FrontendKind::LoadBalancer);
        assert_eq!(st.external.as_ref().unwrap().source_ranges.len(), 1);
    }

    #[test]
    fn malformed_external_and_ingress_ips_warn_and_are_skipped() {
        let svc = exposed(
            json!({"type": "LoadBalancer", "externalIPs": ["300.1.1.1", EXT_IP]}),
            lb_status(&["not-an-ip", LB_IP]),
        );
        let (state, warnings) = compute(&[svc], &[], &node_a());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().all(|w| w.object == "Service default/web"));
        assert!(warnings.iter().any(|w| w.reason.contains("300.1.1.1")));
        assert!(warnings.iter().any(|w| w.reason.contains("not-an-ip")));
        assert!(state.frontends.contains_key(&fe(EXT_IP, 80, Protocol::Tcp)));
        assert!(state.frontends.contains_key(&fe(LB_IP, 80, Protocol::Tcp)));
        assert!(
            state
                .frontends
                .contains_key(&fe(NODE_IP, 30080, Protocol::Tcp))
        );
    }

    // What a Service alone asks for, and its warnings.

    #[test]
    fn session_affinity_client_ip_and_its_timeout() {
        let with = |affinity: serde_json::Value| {
            let mut svc = service("web", "10.96.0.10", &[("http", 80, "TCP")]);
            let spec = svc.spec.as_mut().unwrap();
            let patch: ServiceSpec = serde_json::from_value(affinity).unwrap();
            spec.session_affinity = patch.session_affinity;
            spec.session_affinity_config = patch.session_affinity_config;
            let (state, warnings) = compute(&[svc], &[], &NodeInfo::default());
            let timeout = state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)].affinity_timeout_s;
            (timeout, warnings.len())
        };
        assert_eq!(with(serde_json::json!({})), (None, 0));
        assert_eq!(
            with(serde_json::json!({"sessionAffinity": "None"})),
            (None, 0)
        );
        assert_eq!(
            with(serde_json::json!({"sessionAffinity": "ClientIP"})),
            (Some(DEFAULT_AFFINITY_TIMEOUT_S), 0)
        );
        assert_eq!(
            with(serde_json::json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 2}}})),
            (Some(2), 0)
        );
        // Invalid values: the Service is still served, without affinity.
        for bad in [0, 86_401, -5] {
            assert_eq!(
                with(serde_json::json!({"sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": bad}}})),
                (None, 1),
                "timeout {bad}"
            );
        }
        assert_eq!(
            with(serde_json::json!({"sessionAffinity": "Sticky"})),
            (None, 1)
        );
    }

    #[test]
    fn headless_and_external_name_ignored_silently() {
        let headless = service("db", "None", &[("pg", 5432, "TCP")]);
        let external: Service = from(json!({
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.com",
                     "ports": [{"port": 80}]},
        }));
        let (state, warnings) = compute(&[headless, external], &[], &NodeInfo::default());
        assert!(state.frontends.is_empty());
        assert_eq!(warnings, []);
    }

    #[test]
    fn service_proxy_name_ignored() {
        let svc: Service = from(json!({
            "metadata": {"name": "web", "namespace": "default",
                         "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }));
        let (state, warnings) = compute(&[svc], &[], &NodeInfo::default());
        assert!(state.frontends.is_empty());
        assert_eq!(warnings, []);
    }

    #[test]
    fn cluster_ips_preferred_and_both_families_served() {
        let svc: Service = from(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                     "ports": [{"name": "http", "port": 80}]},
        }));
        let (state, warnings) = compute(&[svc], &[], &NodeInfo::default());
        assert_eq!(warnings, []);
        assert_eq!(
            state.frontends.keys().copied().collect::<Vec<_>>(),
            [
                fe("10.96.0.10", 80, Protocol::Tcp),
                fe("fd00::10", 80, Protocol::Tcp)
            ]
        );
    }

    #[test]
    fn invalid_cluster_ip_warns_and_skips_service() {
        let bad = service("bad", "10.96.0.300", &[("http", 80, "TCP")]);
        assert_one_warning(&[bad], &[], "Service default/bad");
    }

    #[test]
    fn missing_cluster_ip_warns() {
        let bad: Service = from(json!({
            "metadata": {"name": "bad"},
            "spec": {"ports": [{"port": 80}]},
        }));
        assert_one_warning(&[bad], &[], "Service default/bad");
    }

    #[test]
    fn port_zero_warns_and_keeps_other_ports() {
        let bad = service(
            "bad",
            "10.96.0.11",
            &[("zero", 0, "TCP"), ("ok", 81, "TCP")],
        );
        let mut services = vec![bad.clone()];
        assert_one_warning(&services, &[], "Service default/bad");
        services.push(web());
        let (state, _) = compute(&services, &[], &NodeInfo::default());
        assert!(
            state
                .frontends
                .contains_key(&fe("10.96.0.11", 81, Protocol::Tcp))
        );
        assert_eq!(state.frontends.len(), 2);
    }

    #[test]
    fn port_70000_warns() {
        let bad = service("bad", "10.96.0.11", &[("big", 70000, "TCP")]);
        assert_one_warning(&[bad], &[], "Service default/bad");
    }

    #[test]
    fn unknown_protocol_warns() {
        let bad = service("bad", "10.96.0.11", &[("foo", 80, "FOO")]);
        assert_one_warning(&[bad], &[], "Service default/bad");
        let (_, warnings) = compute(
            &[service("bad", "10.96.0.11", &[("foo", 80, "FOO")])],
            &[],
            &NodeInfo::default(),
        );
        assert!(warnings[0].reason.contains("\"foo\""), "{}", warnings[0]);
        assert!(warnings[0].reason.contains("FOO"), "{}", warnings[0]);
    }
}
