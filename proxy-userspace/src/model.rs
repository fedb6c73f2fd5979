//! Services + EndpointSlices -> the frontends the datapath must serve.
//!
//! This is the part of kube-proxy's service and endpoint-slice caches that
//! decides *what* to program, without anything about *how*: a pure function
//! from API objects to a sorted, deduplicated [`DesiredState`]. Everything
//! invalid in the input is reported as a [`Warning`] and skipped as narrowly
//! as possible (one port, one endpoint), so one bad object never takes down
//! the frontends of another.
//!
//! Kubernetes semantics kept here:
//! - only Services with a cluster IP are proxied (headless and ExternalName
//!   are someone else's business), and Services or EndpointSlices labelled
//!   `service.kubernetes.io/service-proxy-name` belong to another proxy;
//! - a Service port is matched to EndpointSlice ports by (name, protocol),
//!   never by `targetPort`: the EndpointSlice controller has already resolved
//!   named target ports per pod, so two slices may legitimately carry two
//!   different numbers for the same port name;
//! - an endpoint with `ready` unset is ready (the API documents nil as
//!   "unknown, interpret as ready"), and only its first address is used.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_common::proto;
use thiserror::Error;

/// Label linking an EndpointSlice to the Service it belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label handing a Service (and its slices) to another proxy implementation.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on slices of headless Services;
/// kube-proxy's informers exclude them.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Namespace of objects that do not name one, as the API server defaults it.
pub const DEFAULT_NAMESPACE: &str = "default";

/// L4 protocols a Service port may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol number, as the datapath sees it in the IPv4 header.
    pub const fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Sctp => proto::SCTP,
        }
    }

    /// Inverse of [`Protocol::number`], for reading live maps back.
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            proto::TCP => Some(Protocol::Tcp),
            proto::UDP => Some(Protocol::Udp),
            proto::SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Parses the API spelling. Unset and empty mean TCP because that is what
    /// API defaulting would have stored; the spelling is case-sensitive
    /// because API validation is.
    pub fn from_api(value: Option<&str>) -> Result<Self, UnsupportedProtocol> {
        match value.unwrap_or("") {
            "" | "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(UnsupportedProtocol(other.to_string())),
        }
    }

    /// The API spelling.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unsupported protocol {0:?} (expected TCP, UDP or SCTP)")]
pub struct UnsupportedProtocol(pub String);

/// One address the datapath answers on: a cluster IP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// One destination a frontend's traffic may be sent to. The protocol is the
/// frontend's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// What new flows get when a frontend has no usable endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EmptyAction {
    /// ICMP unreachable, so clients fail fast (kube-proxy's REJECT).
    Reject,
    /// Silent drop (kube-proxy's DROP, for policies that must not leak).
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// kube-proxy's service port name: `namespace/name:port`, or
    /// `namespace/name` for an unnamed port, so logs read the same as its.
    pub service: String,
    /// Sorted and deduplicated.
    pub endpoints: Vec<Endpoint>,
    pub empty_action: EmptyAction,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
}

/// Something in the input that was skipped, for the operator.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Warning {
    /// `Service namespace/name` or `EndpointSlice namespace/name`.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// Why part of an object was skipped; rendered into [`Warning::reason`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
enum Problem {
    #[error("no name")]
    NoName,
    #[error("defined more than once; using a single copy")]
    Duplicate,
    #[error("no clusterIP")]
    NoClusterIp,
    #[error("clusterIP {0:?} is not an IP address")]
    BadClusterIp(String),
    #[error("port {name:?}: port {port} is outside 1..=65535")]
    ServicePortRange { name: String, port: i32 },
    #[error("port {name:?}: {source}")]
    ServicePortProtocol {
        name: String,
        source: UnsupportedProtocol,
    },
    #[error("port {name:?}: frontend {frontend} already belongs to {owner}")]
    FrontendTaken {
        name: String,
        frontend: Frontend,
        owner: String,
    },
    #[error("port {name:?}: no port number")]
    SlicePortMissing { name: String },
    #[error("port {name:?}: port {port} is outside 1..=65535")]
    SlicePortRange { name: String, port: i32 },
    #[error("port {name:?}: {source}")]
    SlicePortProtocol {
        name: String,
        source: UnsupportedProtocol,
    },
    #[error("endpoint {index}: no address")]
    NoAddress { index: usize },
    #[error("endpoint {index}: address {addr:?} is not an IPv4 address")]
    BadAddress { index: usize, addr: String },
}

fn warn(warnings: &mut Vec<Warning>, object: &str, problem: Problem) {
    warnings.push(Warning {
        object: object.to_string(),
        reason: problem.to_string(),
    });
}

/// Computes the frontends to program and the warnings about what was skipped.
///
/// The result does not depend on the order of either input: objects are
/// processed in (namespace, name) order and warnings are returned sorted.
pub fn compute(services: &[Service], slices: &[EndpointSlice]) -> (DesiredState, Vec<Warning>) {
    let mut warnings = Vec::new();
    let slices = index_slices(slices, &mut warnings);
    let mut desired = DesiredState::default();

    let mut previous: Option<(&str, &str)> = None;
    for service in sorted_services(services) {
        let (namespace, name) = identity(service);
        let object = format!("Service {namespace}/{name}");
        if name.is_empty() {
            warn(&mut warnings, &object, Problem::NoName);
            continue;
        }
        if previous == Some((namespace, name)) {
            warn(&mut warnings, &object, Problem::Duplicate);
            continue;
        }
        previous = Some((namespace, name));
        if !is_ours(&service.metadata) {
            continue;
        }
        let Some(spec) = &service.spec else {
            warn(&mut warnings, &object, Problem::NoClusterIp);
            continue;
        };
        let addrs = match cluster_ips(spec, &object) {
            Ok(Some(addrs)) => addrs,
            Ok(None) => continue,
            Err(problem) => {
                warn(&mut warnings, &object, problem);
                continue;
            }
        };
        let service_slices = slices
            .get(&(namespace.to_string(), name.to_string()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            let port_name = port.name.as_deref().unwrap_or("");
            let (number, protocol) = match service_port(port) {
                Ok(parsed) => parsed,
                Err(problem) => {
                    warn(&mut warnings, &object, problem);
                    continue;
                }
            };
            let state = FrontendState {
                service: service_port_name(namespace, name, port_name),
                endpoints: endpoints_for(service_slices, port_name, protocol),
                empty_action: EmptyAction::Reject,
            };
            for addr in &addrs {
                let frontend = Frontend {
                    addr: *addr,
                    port: number,
                    proto: protocol,
                };
                if let Some(owner) = desired.frontends.get(&frontend) {
                    // Only reachable with invalid input (the API server
                    // rejects duplicate ports and cluster IPs) or a stale
                    // view of a reused cluster IP; the first owner in sorted
                    // order keeps it so the outcome does not depend on order.
                    let problem = Problem::FrontendTaken {
                        name: port_name.to_string(),
                        frontend,
                        owner: owner.service.clone(),
                    };
                    warn(&mut warnings, &object, problem);
                    continue;
                }
                desired.frontends.insert(frontend, state.clone());
            }
        }
    }

    warnings.sort();
    (desired, warnings)
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(namespace) => namespace,
    }
}

/// kube-proxy's `ServicePortName.String()`.
fn service_port_name(namespace: &str, name: &str, port: &str) -> String {
    if port.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port}")
    }
}

/// Services in (namespace, name) order. Two copies of one name can only come
/// from a broken static source; they are ordered by content so the copy that
/// wins does not depend on file or list order.
fn sorted_services(services: &[Service]) -> Vec<&Service> {
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| identity(a).cmp(&identity(b)).then_with(|| by_content(a, b)));
    sorted
}

fn identity(service: &Service) -> (&str, &str) {
    let name = service.metadata.name.as_deref().unwrap_or("");
    (namespace_of(&service.metadata), name)
}

fn by_content(a: &Service, b: &Service) -> Ordering {
    let text = |s: &Service| serde_json::to_string(s).unwrap_or_default();
    text(a).cmp(&text(b))
}

/// Whether this proxy should handle the object; objects carrying
/// `service-proxy-name` (whatever its value) are for another proxy.
fn is_ours(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_none_or(|labels| !labels.contains_key(LABEL_SERVICE_PROXY_NAME))
}

/// The IPv4 cluster IPs, `None` for Services kube-proxy does not proxy.
fn cluster_ips(spec: &ServiceSpec, object: &str) -> Result<Option<BTreeSet<Ipv4Addr>>, Problem> {
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

fn service_port(port: &ServicePort) -> Result<(u16, Protocol), Problem> {
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

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

/// What one EndpointSlice contributes, validated once however many Service
/// ports read it.
struct SliceEndpoints {
    /// (name, protocol, number)
    ports: Vec<(String, Protocol, u16)>,
    /// Ready endpoints' first address.
    ready: Vec<Ipv4Addr>,
}

type SliceIndex = BTreeMap<(String, String), Vec<SliceEndpoints>>;

/// Valid IPv4 slices keyed by (namespace, service name).
fn index_slices(slices: &[EndpointSlice], warnings: &mut Vec<Warning>) -> SliceIndex {
    let mut index = SliceIndex::new();
    for slice in slices {
        let namespace = namespace_of(&slice.metadata);
        let name = slice.metadata.name.as_deref().unwrap_or("");
        let object = format!("EndpointSlice {namespace}/{name}");
        if slice.address_type != "IPv4" {
            tracing::debug!("{object}: ignoring addressType {:?}", slice.address_type);
            continue;
        }
        let labels = slice.metadata.labels.as_ref();
        let Some(service) = labels.and_then(|labels| labels.get(LABEL_SERVICE_NAME)) else {
            // Slices not managed for a Service are legal (custom controllers)
            // and simply unused.
            tracing::debug!("{object}: no {LABEL_SERVICE_NAME} label, ignoring");
            continue;
        };
        if !is_ours(&slice.metadata) || labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            continue;
        }
        let parsed = SliceEndpoints {
            ports: slice_ports(
                slice.ports.as_deref().unwrap_or_default(),
                &object,
                warnings,
            ),
            ready: ready_addresses(slice, &object, warnings),
        };
        index
            .entry((namespace.to_string(), service.clone()))
            .or_default()
            .push(parsed);
    }
    index
}

fn slice_ports(
    ports: &[EndpointPort],
    object: &str,
    warnings: &mut Vec<Warning>,
) -> Vec<(String, Protocol, u16)> {
    let mut valid = Vec::new();
    for port in ports {
        let name = port.name.clone().unwrap_or_default();
        let protocol = match Protocol::from_api(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(source) => {
                warn(
                    warnings,
                    object,
                    Problem::SlicePortProtocol { name, source },
                );
                continue;
            }
        };
        let number = match port.port {
            None => Err(Problem::SlicePortMissing { name: name.clone() }),
            Some(port) => port_number(port).ok_or(Problem::SlicePortRange {
                name: name.clone(),
                port,
            }),
        };
        match number {
            Ok(number) => valid.push((name, protocol, number)),
            Err(problem) => warn(warnings, object, problem),
        }
    }
    valid
}

fn ready_addresses(
    slice: &EndpointSlice,
    object: &str,
    warnings: &mut Vec<Warning>,
) -> Vec<Ipv4Addr> {
    let mut ready = Vec::new();
    for (index, endpoint) in slice.endpoints.iter().enumerate() {
        let Some(first) = endpoint.addresses.first() else {
            warn(warnings, object, Problem::NoAddress { index });
            continue;
        };
        let Ok(addr) = first.parse::<Ipv4Addr>() else {
            let problem = Problem::BadAddress {
                index,
                addr: first.clone(),
            };
            warn(warnings, object, problem);
            continue;
        };
        let is_ready = endpoint
            .conditions
            .as_ref()
            .and_then(|conditions| conditions.ready)
            .unwrap_or(true);
        if is_ready {
            ready.push(addr);
        }
    }
    ready
}

/// The endpoints of one Service port: every ready address of every slice,
/// with the number that slice gives the port's (name, protocol).
fn endpoints_for(slices: &[SliceEndpoints], name: &str, protocol: Protocol) -> Vec<Endpoint> {
    let mut endpoints = BTreeSet::new();
    for slice in slices {
        let numbers = slice
            .ports
            .iter()
            .filter(|(n, p, _)| n == name && *p == protocol)
            .map(|(_, _, number)| *number);
        for port in numbers {
            endpoints.extend(
                slice
                    .ready
                    .iter()
                    .map(|addr| Endpoint { addr: *addr, port }),
            );
        }
    }
    endpoints.into_iter().collect()
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Builders for API objects, going through JSON so the objects are the
    //! ones a real API server or manifest would produce.

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::{Value, json};

    /// A ClusterIP Service in `default`; `ports` is a list of
    /// (name, port, protocol).
    pub fn service(name: &str, cluster_ip: &str, ports: &[(&str, i32, &str)]) -> Service {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
            .collect();
        from(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": ports},
        }))
    }

    /// An IPv4 slice of Service `service` in `default`; `ports` is a list of
    /// (name, port, protocol) and `endpoints` of (address, ready).
    pub fn slice(
        name: &str,
        service: &str,
        ports: &[(&str, i32, &str)],
        endpoints: &[(&str, Option<bool>)],
    ) -> EndpointSlice {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
            .collect();
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(addr, ready)| match ready {
                Some(ready) => json!({"addresses": [addr], "conditions": {"ready": ready}}),
                None => json!({"addresses": [addr]}),
            })
            .collect();
        from(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
    }

    pub fn from<T: serde::de::DeserializeOwned>(value: Value) -> T {
        serde_json::from_value(value).expect("fixture is a valid object")
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{from, service, slice};
    use super::*;
    use serde_json::json;

    fn fe(addr: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    fn ep(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
        }
    }

    fn endpoints_of(state: &DesiredState, frontend: Frontend) -> Vec<Endpoint> {
        state.frontends[&frontend].endpoints.clone()
    }

    fn web() -> Service {
        service("web", "10.96.0.10", &[("http", 80, "TCP")])
    }

    #[test]
    fn named_target_port_resolved_per_slice() {
        // Pods behind one Service may name the same container port with
        // different numbers; each slice carries its own resolution.
        let slices = [
            slice(
                "web-a",
                "web",
                &[("http", 8080, "TCP")],
                &[("10.0.0.1", None)],
            ),
            slice(
                "web-b",
                "web",
                &[("http", 9090, "TCP")],
                &[("10.0.0.2", None)],
            ),
        ];
        let (state, warnings) = compute(&[web()], &slices);
        assert_eq!(warnings, []);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080), ep("10.0.0.2", 9090)]
        );
        assert_eq!(
            state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)].service,
            "default/web:http"
        );
    }

    #[test]
    fn two_ports_on_one_service() {
        let svc = service(
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP"), ("https", 443, "TCP")],
        );
        let slices = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP"), ("https", 8443, "TCP")],
            &[("10.0.0.1", Some(true))],
        )];
        let (state, warnings) = compute(&[svc], &slices);
        assert_eq!(warnings, []);
        assert_eq!(state.frontends.len(), 2);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080)]
        );
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 443, Protocol::Tcp)),
            [ep("10.0.0.1", 8443)]
        );
    }

    #[test]
    fn tcp_and_udp_on_the_same_port_are_two_frontends() {
        let svc = service(
            "dns",
            "10.96.0.53",
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        );
        let slices = [slice(
            "dns-a",
            "dns",
            &[("dns", 1053, "UDP"), ("dns-tcp", 2053, "TCP")],
            &[("10.0.0.5", None)],
        )];
        let (state, warnings) = compute(&[svc], &slices);
        assert_eq!(warnings, []);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.53", 53, Protocol::Udp)),
            [ep("10.0.0.5", 1053)]
        );
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.53", 53, Protocol::Tcp)),
            [ep("10.0.0.5", 2053)]
        );
    }

    #[test]
    fn slice_port_protocol_must_match() {
        let slices = [slice(
            "web-a",
            "web",
            &[("http", 8080, "UDP")],
            &[("10.0.0.1", None)],
        )];
        let (state, _) = compute(&[web()], &slices);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            []
        );
    }

    #[test]
    fn unnamed_port_matches_unnamed_slice_port() {
        let svc: Service = from(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }));
        let slc: EndpointSlice = from(json!({
            "metadata": {"name": "web-a", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }));
        let (state, warnings) = compute(&[svc], &[slc]);
        assert_eq!(warnings, []);
        let frontend = fe("10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(endpoints_of(&state, frontend), [ep("10.0.0.1", 8080)]);
        assert_eq!(state.frontends[&frontend].service, "default/web");
    }

    #[test]
    fn unready_endpoint_excluded_and_unset_ready_counts() {
        let slices = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[
                ("10.0.0.1", Some(false)),
                ("10.0.0.2", None),
                ("10.0.0.3", Some(true)),
            ],
        )];
        let (state, warnings) = compute(&[web()], &slices);
        assert_eq!(warnings, []);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.2", 8080), ep("10.0.0.3", 8080)]
        );
    }

    #[test]
    fn endpoint_removed() {
        let before = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.1", None), ("10.0.0.2", None)],
        )];
        let after = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.2", None)],
        )];
        let frontend = fe("10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(
            endpoints_of(&compute(&[web()], &before).0, frontend).len(),
            2
        );
        let (state, _) = compute(&[web()], &after);
        assert_eq!(endpoints_of(&state, frontend), [ep("10.0.0.2", 8080)]);
        assert_eq!(state.frontends[&frontend].empty_action, EmptyAction::Reject);
    }

    #[test]
    fn service_without_endpoints_rejects() {
        let (state, warnings) = compute(&[web()], &[]);
        assert_eq!(warnings, []);
        let st = &state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(st.endpoints, []);
        assert_eq!(st.empty_action, EmptyAction::Reject);
    }

    #[test]
    fn service_removed_leaves_no_frontend() {
        let slices = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.1", None)],
        )];
        let (state, warnings) = compute(&[], &slices);
        assert_eq!(warnings, []);
        assert!(state.frontends.is_empty());
    }

    #[test]
    fn slices_of_other_services_or_namespaces_not_used() {
        let other_ns: EndpointSlice = from(json!({
            "metadata": {"name": "web-x", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.9"]}],
        }));
        let other_svc = slice(
            "api-a",
            "api",
            &[("http", 8080, "TCP")],
            &[("10.0.0.8", None)],
        );
        let (state, _) = compute(&[web()], &[other_ns, other_svc]);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            []
        );
    }

    #[test]
    fn non_ipv4_slices_ignored() {
        let v6: EndpointSlice = from(json!({
            "metadata": {"name": "web-6", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"]}],
        }));
        let (state, warnings) = compute(&[web()], &[v6]);
        assert_eq!(warnings, []);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            []
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
        let (state, warnings) = compute(&[headless, external], &[]);
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
        let (state, warnings) = compute(&[svc], &[]);
        assert!(state.frontends.is_empty());
        assert_eq!(warnings, []);
    }

    #[test]
    fn cluster_ips_preferred_and_ipv6_ignored() {
        let svc: Service = from(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                     "ports": [{"name": "http", "port": 80}]},
        }));
        let (state, warnings) = compute(&[svc], &[]);
        assert_eq!(warnings, []);
        assert_eq!(
            state.frontends.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.10", 80, Protocol::Tcp)]
        );
    }

    #[test]
    fn duplicate_endpoint_across_slices_counted_once() {
        let slices = [
            slice(
                "web-a",
                "web",
                &[("http", 8080, "TCP")],
                &[("10.0.0.1", None)],
            ),
            slice(
                "web-b",
                "web",
                &[("http", 8080, "TCP")],
                &[("10.0.0.1", Some(true)), ("10.0.0.2", None)],
            ),
        ];
        let (state, _) = compute(&[web()], &slices);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]
        );
    }

    /// Each bad input yields exactly one warning and leaves `web` intact.
    fn assert_one_warning(bad_services: &[Service], bad_slices: &[EndpointSlice], object: &str) {
        let mut services = bad_services.to_vec();
        services.push(web());
        let mut slices = bad_slices.to_vec();
        slices.push(slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.1", None)],
        ));
        let (state, warnings) = compute(&services, &slices);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].object, object);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080)]
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
        let (state, _) = compute(&services, &[]);
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
        let (_, warnings) = compute(&[service("bad", "10.96.0.11", &[("foo", 80, "FOO")])], &[]);
        assert!(warnings[0].reason.contains("\"foo\""), "{}", warnings[0]);
        assert!(warnings[0].reason.contains("FOO"), "{}", warnings[0]);
    }

    #[test]
    fn bad_endpoint_address_warns_and_skips_endpoint() {
        let bad = slice(
            "bad-a",
            "bad",
            &[("http", 8080, "TCP")],
            &[("10.0.0.999", None), ("10.0.0.7", None)],
        );
        let bad_svc = service(
            "bad",
            "10.96.0.11",
            &[("http", 80, "TCP"), ("alt", 81, "TCP")],
        );
        assert_one_warning(
            std::slice::from_ref(&bad_svc),
            std::slice::from_ref(&bad),
            "EndpointSlice default/bad-a",
        );
        let (state, _) = compute(&[bad_svc], &[bad]);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.11", 80, Protocol::Tcp)),
            [ep("10.0.0.7", 8080)]
        );
    }

    #[test]
    fn bad_slice_port_warns() {
        let missing: EndpointSlice = from(json!({
            "metadata": {"name": "bad-a", "labels": {"kubernetes.io/service-name": "bad"}},
            "addressType": "IPv4",
            "ports": [{"name": "http"}],
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }));
        assert_one_warning(&[], &[missing], "EndpointSlice default/bad-a");
        let zero = slice("bad-a", "bad", &[("http", 0, "TCP")], &[("10.0.0.1", None)]);
        assert_one_warning(&[], &[zero], "EndpointSlice default/bad-a");
    }

    #[test]
    fn conflicting_frontends_keep_first_in_name_order() {
        let a = service("a", "10.96.0.10", &[("http", 80, "TCP")]);
        let b = service("b", "10.96.0.10", &[("http", 80, "TCP")]);
        let (state, warnings) = compute(&[b.clone(), a.clone()], &[]);
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].object, "Service default/b");
        assert_eq!(
            state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)].service,
            "default/a:http"
        );
    }

    #[test]
    fn duplicate_service_uses_one_copy_whatever_the_order() {
        let a = service("web", "10.96.0.10", &[("http", 80, "TCP")]);
        let b = service("web", "10.96.0.20", &[("http", 80, "TCP")]);
        let one = compute(&[a.clone(), b.clone()], &[]);
        let two = compute(&[b, a], &[]);
        assert_eq!(one, two);
        assert_eq!(one.0.frontends.len(), 1);
        assert_eq!(one.1.len(), 1);
    }

    #[test]
    fn output_independent_of_input_order() {
        let services = vec![
            web(),
            service(
                "api",
                "10.96.0.11",
                &[("grpc", 9000, "TCP"), ("dns", 53, "UDP")],
            ),
            service("bad", "nope", &[("x", 1, "TCP")]),
        ];
        let slices = vec![
            slice(
                "web-a",
                "web",
                &[("http", 8080, "TCP")],
                &[("10.0.0.3", None), ("10.0.0.1", None)],
            ),
            slice(
                "web-b",
                "web",
                &[("http", 8081, "TCP")],
                &[("10.0.0.2", None), ("x", None)],
            ),
            slice(
                "api-a",
                "api",
                &[("grpc", 9000, "TCP"), ("dns", 5353, "UDP")],
                &[("10.0.1.1", None)],
            ),
        ];
        let forward = compute(&services, &slices);
        let mut rs = services.clone();
        rs.reverse();
        let mut rl = slices.clone();
        rl.reverse();
        assert_eq!(compute(&rs, &rl), forward);
        assert_eq!(forward.1.len(), 2);
        let web_eps = endpoints_of(&forward.0, fe("10.96.0.10", 80, Protocol::Tcp));
        let mut sorted = web_eps.clone();
        sorted.sort();
        assert_eq!(web_eps, sorted);
    }

    #[test]
    fn protocol_numbers() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(Protocol::from_number(p.number()), Some(p));
            assert_eq!(Protocol::from_api(Some(p.as_str())), Ok(p));
        }
        assert_eq!(Protocol::Sctp.number(), 132);
        assert_eq!(Protocol::from_api(None), Ok(Protocol::Tcp));
        assert!(Protocol::from_api(Some("tcp")).is_err());
    }
}

#[cfg(test)]
mod properties {
    //! No input shape may panic, and the output must not depend on order.
    //! Generators favour well-typed values from small pools, so most objects
    //! deserialise and services, slices and ports actually meet; a minority
    //! of odd values exercises the warning paths.

    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// Rarely, a value of the wrong JSON type, which deserialisation rejects.
    fn wrong_type() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(json!([])),
        ]
    }

    fn ip_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            30 => (0u8..8).prop_map(|d| json!(format!("10.0.0.{d}"))),
            1 => Just(json!("None")),
            1 => Just(json!("")),
            1 => Just(json!("fd00::1")),
            1 => "[0-9a-f.:]{0,16}".prop_map(Value::from),
            1 => any::<String>().prop_map(Value::from),
            1 => wrong_type(),
        ]
    }

    fn port_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            30 => prop::sample::select(vec![53i64, 80, 8080]).prop_map(Value::from),
            2 => prop::sample::select(vec![0i64, -1, 65535, 65536, 70000]).prop_map(Value::from),
            1 => any::<i32>().prop_map(Value::from),
            1 => "[0-9a-z]{0,5}".prop_map(Value::from),
        ]
    }

    fn protocol_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            40 => Just(json!("TCP")),
            4 => Just(json!("UDP")),
            1 => prop::sample::select(vec!["SCTP", "", "tcp", "FOO"]).prop_map(Value::from),
            1 => Just(Value::Null),
            1 => "[A-Za-z]{0,4}".prop_map(Value::from),
        ]
    }

    fn name_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            20 => Just(json!("")),
            4 => Just(json!("a")),
            1 => Just(Value::Null),
            1 => any::<String>().prop_map(Value::from),
        ]
    }

    fn object_name_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            12 => prop::sample::select(vec!["a", "b", "c"]).prop_map(Value::from),
            1 => Just(json!("")),
            1 => Just(Value::Null),
        ]
    }

    fn namespace_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            10 => Just(json!("default")),
            1 => Just(json!("kube-system")),
            1 => Just(Value::Null),
        ]
    }

    fn port_entry() -> impl Strategy<Value = Value> {
        (name_like(), port_like(), protocol_like()).prop_map(
            |(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}),
        )
    }

    fn service_json() -> impl Strategy<Value = Value> {
        (
            object_name_like(),
            namespace_like(),
            ip_like(),
            prop::collection::vec(ip_like(), 0..2),
            prop_oneof![
                8 => Just("ClusterIP"),
                1 => Just("NodePort"),
                1 => Just("ExternalName"),
                1 => Just(""),
            ],
            prop::collection::vec(port_entry(), 0..4),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(name, ns, ip, ips, ty, ports, proxy_name)| {
                let labels = if proxy_name {
                    json!({"service.kubernetes.io/service-proxy-name": "x"})
                } else {
                    Value::Null
                };
                json!({
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "spec": {"clusterIP": ip, "clusterIPs": ips, "type": ty, "ports": ports},
                })
            })
    }

    fn labels_like() -> impl Strategy<Value = Value> {
        let service = prop::sample::select(vec!["a", "b", "c", "a", "b", "c", ""]);
        prop_oneof![
            16 => service.clone().prop_map(|s| json!({"kubernetes.io/service-name": s})),
            1 => service.prop_map(|s| json!({"kubernetes.io/service-name": s,
                                              "service.kubernetes.io/service-proxy-name": "x"})),
            1 => Just(Value::Null),
        ]
    }

    fn endpoint_entry() -> impl Strategy<Value = Value> {
        (
            prop::collection::vec(ip_like(), 1..3),
            prop_oneof![
                2 => Just(Value::Null),
                2 => Just(json!(true)),
                1 => Just(json!(false)),
            ],
        )
            .prop_map(|(addresses, ready)| json!({"addresses": addresses, "conditions": {"ready": ready}}))
    }

    fn slice_json() -> impl Strategy<Value = Value> {
        (
            name_like(),
            namespace_like(),
            labels_like(),
            prop_oneof![8 => Just("IPv4"), 1 => Just("IPv6"), 1 => Just("FQDN")],
            prop::collection::vec(port_entry(), 1..3),
            prop::collection::vec(endpoint_entry(), 0..5),
        )
            .prop_map(|(name, ns, labels, address_type, ports, endpoints)| {
                json!({
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "addressType": address_type,
                    "ports": ports,
                    "endpoints": endpoints,
                })
            })
    }

    fn decoded<T: serde::de::DeserializeOwned>(values: Vec<Value>) -> Vec<T> {
        values
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 400,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn compute_never_panics_and_ignores_order(
            services in prop::collection::vec(service_json(), 0..8),
            slices in prop::collection::vec(slice_json(), 0..8),
        ) {
            let services: Vec<Service> = decoded(services);
            let slices: Vec<EndpointSlice> = decoded(slices);
            let (state, warnings) = compute(&services, &slices);
            for (frontend, st) in &state.frontends {
                prop_assert!(frontend.port != 0);
                prop_assert!(st.endpoints.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(st.endpoints.iter().all(|e| e.port != 0));
            }
            let mut rs = services.clone();
            rs.reverse();
            let mut rl = slices.clone();
            rl.reverse();
            prop_assert_eq!(compute(&rs, &rl), (state, warnings));
        }
    }
}
