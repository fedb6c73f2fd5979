//! One Service's frontends and health check on this node: its cluster IPs,
//! ports, node ports, load-balancer and external IPs (what it exposes),
//! session affinity, and the claims it makes before conflicts with other
//! Services are settled by the tracker.

use super::*;

/// What one Service asks for, before conflicts with other Services are
/// settled: every frontend it claims and its health check.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Derived {
    /// (frontend, the Service port's name, its state), in claim order.
    pub claims: Vec<(Frontend, String, FrontendState)>,
    pub health_check: Option<(u16, HealthCheck)>,
    pub warnings: Vec<Warning>,
}

/// One Service's frontends and health check on `node`, from the Service and
/// its slices (see the module documentation for the rules).
pub(crate) fn derive_service(
    service: &Service,
    service_slices: &[&SliceEndpoints],
    node: &NodeInfo,
) -> Derived {
    let mut out = Derived::default();
    let (namespace, name) = identity(service);
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
    let addrs = match cluster_ips(spec, &object) {
        Ok(Some(addrs)) => addrs,
        Ok(None) => return out,
        Err(problem) => {
            warn(warnings, &object, problem);
            return out;
        }
    };
    let policy = TrafficPolicy::of(spec);
    let affinity_timeout_s = match session_affinity(spec) {
        Ok(timeout) => timeout,
        Err(problem) => {
            // Without affinity the Service still works; only stickiness
            // is lost, which is better than dropping the Service.
            warn(warnings, &object, problem);
            None
        }
    };
    let exposure = Exposure::of(service, spec, &mut |problem| {
        warn(warnings, &object, problem)
    })
    .allowing_node(&node.addresses);
    let node_addresses: BTreeSet<Ipv4Addr> = node.addresses.iter().copied().collect();
    // Frontends this Service claimed, by the port that claimed them.
    let mut own: BTreeMap<Frontend, String> = BTreeMap::new();
    let mut any_port = false;
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.as_deref().unwrap_or("");
        let (number, protocol) = match service_port(port) {
            Ok(parsed) => parsed,
            Err(problem) => {
                warn(warnings, &object, problem);
                continue;
            }
        };
        any_port = true;
        let node_port = if exposure.node_ports {
            match node_port(port) {
                Ok(node_port) => node_port,
                Err(problem) => {
                    warn(warnings, &object, problem);
                    None
                }
            }
        } else {
            None
        };
        let candidates = candidates_for(service_slices, port_name, protocol);
        let sets = categorize(&candidates, policy, node);
        let service = service_port_name(namespace, name, port_name);
        let state = |kind: FrontendKind| sets.state(&service, kind, &exposure, affinity_timeout_s);
        let mut claims: Vec<(Frontend, FrontendKind)> = Vec::new();
        let on = |addr: Ipv4Addr, port: u16| Frontend {
            addr,
            port,
            proto: protocol,
        };
        claims.extend(
            addrs
                .iter()
                .map(|a| (on(*a, number), FrontendKind::ClusterIp)),
        );
        if let Some(node_port) = node_port {
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
                .map(|a| (on(*a, number), FrontendKind::LoadBalancer)),
        );
        claims.extend(
            exposure
                .external_ips
                .iter()
                .map(|a| (on(*a, number), FrontendKind::ExternalIp)),
        );
        for (frontend, kind) in claims {
            if let Some(owner) = own.get(&frontend) {
                if *owner == port_name {
                    // One Service naming one address twice (an external
                    // IP that is also its load-balancer IP): the first
                    // kind in ClusterIp, NodePort, LoadBalancer,
                    // ExternalIp order keeps it, so an LB IP keeps its
                    // source ranges, as kube-proxy's firewall applies
                    // them to any traffic to the LB IP.
                    tracing::debug!("{object}: {frontend} is claimed twice ({kind:?})");
                    continue;
                }
                // Two ports of one Service on one frontend: only invalid
                // input gets here (the API server rejects duplicate ports).
                let problem = Problem::FrontendTaken {
                    name: port_name.to_string(),
                    frontend,
                    owner: service_port_name(namespace, name, owner),
                };
                warn(warnings, &object, problem);
                continue;
            }
            own.insert(frontend, port_name.to_string());
            out.claims
                .push((frontend, port_name.to_string(), state(kind)));
        }
    }
    // kube-proxy keeps health checks per service port, so a Service
    // without a usable port has none.
    if let Some(port) = exposure.health_check_port.filter(|_| any_port) {
        let check = HealthCheck {
            namespace: namespace.to_string(),
            name: name.to_string(),
            local_endpoints: local_ready_addresses(service_slices, node),
        };
        out.health_check = Some((port, check));
    }
    out
}

/// The warning of a Service that lost `frontend` (claimed by its port
/// `port_name`) to `owner`, a Service earlier in (namespace, name) order.
pub(crate) fn frontend_taken(
    service: &str,
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
pub(crate) fn health_check_taken(service: &str, port: u16, owner: &HealthCheck) -> Warning {
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
pub(crate) fn duplicate(service: &str) -> Warning {
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

pub(crate) fn identity(service: &Service) -> (&str, &str) {
    let name = service.metadata.name.as_deref().unwrap_or("");
    (namespace_of(&service.metadata), name)
}

/// Two copies of one Service name can only come from a broken static
/// source; the smaller by content wins, so the outcome does not depend on
/// file or list order.
pub(crate) fn by_content(a: &Service, b: &Service) -> Ordering {
    let text = |s: &Service| serde_json::to_string(s).unwrap_or_default();
    text(a).cmp(&text(b))
}

/// `sessionAffinity: ClientIP` and its timeout (default 10800 s), as
/// kube-proxy reads them; `None` (the default) is no affinity.
pub(super) fn session_affinity(spec: &ServiceSpec) -> Result<Option<u32>, Problem> {
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

/// The IPv4 cluster IPs, `None` for Services kube-proxy does not proxy.
pub(super) fn cluster_ips(
    spec: &ServiceSpec,
    object: &str,
) -> Result<Option<BTreeSet<Ipv4Addr>>, Problem> {
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
    let mut addrs = BTreeSet::new();
    for ip in listed {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(addr)) => {
                addrs.insert(addr);
            }
            // This proxy programs IPv4 only; the IPv6 family of a dual-stack
            // Service is expected, not an error.
            Ok(IpAddr::V6(addr)) => tracing::debug!("{object}: ignoring IPv6 clusterIP {addr}"),
            Err(_) => return Err(Problem::BadClusterIp(ip.to_string())),
        }
    }
    Ok(Some(addrs))
}

pub(super) fn service_port(port: &ServicePort) -> Result<(u16, Protocol), Problem> {
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
pub(super) fn node_port(port: &ServicePort) -> Result<Option<u16>, Problem> {
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
pub(super) struct Exposure {
    /// Type NodePort or LoadBalancer: its ports' `nodePort`s are served. (The
    /// API server only allows them on those types; kube-proxy itself does
    /// not look at the type, which only matters for static manifests.)
    pub(super) node_ports: bool,
    /// `externalTrafficPolicy: Local`, which only means something on the
    /// NodePort and LoadBalancer types (kube-proxy's `ExternalPolicyLocal`):
    /// the external IPs of a ClusterIP Service always use Cluster.
    pub(super) external_local: bool,
    /// VIP-mode IPv4 ingress IPs, whatever the type, as kube-proxy.
    pub(super) load_balancer_ips: BTreeSet<Ipv4Addr>,
    pub(super) external_ips: BTreeSet<Ipv4Addr>,
    pub(super) source_ranges: Vec<Ipv4Cidr>,
    /// See [`ExternalTraffic::allow_node`].
    pub(super) allow_node: bool,
    pub(super) health_check_port: Option<u16>,
}

impl Exposure {
    /// kube-proxy's "allow from node": source ranges that contain a node
    /// address also let in the Service's LB IPs and the node itself.
    pub(super) fn allowing_node(mut self, node_addresses: &[Ipv4Addr]) -> Self {
        self.allow_node = self
            .source_ranges
            .iter()
            .any(|range| node_addresses.iter().any(|a| range.contains(*a)));
        if self.allow_node {
            let mut ranges: BTreeSet<Ipv4Cidr> = self.source_ranges.drain(..).collect();
            ranges.extend(
                self.load_balancer_ips
                    .iter()
                    .filter_map(|ip| Ipv4Cidr::new(*ip, 32)),
            );
            self.source_ranges = ranges.into_iter().collect();
        }
        self
    }

    pub(super) fn of(service: &Service, spec: &ServiceSpec, warn: &mut dyn FnMut(Problem)) -> Self {
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
        let external_local = node_ports && spec.external_traffic_policy.as_deref() == Some("Local");

        let mut external_ips = BTreeSet::new();
        for ip in spec.external_ips.iter().flatten() {
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(addr)) => {
                    external_ips.insert(addr);
                }
                // The other family of a dual-stack Service.
                Ok(IpAddr::V6(_)) => {}
                Err(_) => warn(Problem::BadExternalIp(ip.clone())),
            }
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
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(addr)) => {
                    load_balancer_ips.insert(addr);
                }
                Ok(IpAddr::V6(_)) => {}
                Err(_) => warn(Problem::BadIngressIp(ip.to_string())),
            }
        }

        let mut source_ranges = BTreeSet::new();
        for range in spec.load_balancer_source_ranges.iter().flatten() {
            // API validation lets whitespace padding through; kube-proxy
            // trims it.
            let range = range.trim();
            match range.parse::<Ipv4Cidr>() {
                Ok(cidr) => {
                    source_ranges.insert(cidr);
                }
                Err(_) if is_ipv6_cidr(range) => {}
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
            load_balancer_ips,
            external_ips,
            source_ranges: source_ranges.into_iter().collect(),
            allow_node: false,
            health_check_port,
        }
    }
}

pub(super) fn is_ipv6_cidr(text: &str) -> bool {
    text.split_once('/').is_some_and(|(addr, len)| {
        addr.parse::<std::net::Ipv6Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 128)
    })
}
