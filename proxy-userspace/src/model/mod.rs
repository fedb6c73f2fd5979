//! Services + EndpointSlices -> the frontends the datapath must serve.
//!
//! - `api`: Services and EndpointSlices as decoded: only the fields read;
//! - `service`: one Service's ports, exposure and affinity, read once
//!   ([`ServiceFacts`]), and the frontends it claims;
//! - `slices`: EndpointSlices reduced to what is read of them
//!   ([`SliceFacts`]);
//! - `topology`: which endpoints each frontend uses (traffic policies,
//!   the terminating fallback, hints);
//! - `tracker`: the objects as they change, and which frontends a change
//!   touched; [`compute`] is the same from scratch.
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
//!   "unknown, interpret as ready"), and only its first address is used;
//!   `serving` unset means the same as `ready` (the API: "defer to the ready
//!   condition") and `terminating` unset means not terminating.
//!
//! Frontends per Service port, as kube-proxy's proxiers program them:
//! - each cluster IP on the port ([`FrontendKind::ClusterIp`]);
//! - for types NodePort and LoadBalancer, the port's `nodePort` (unset or 0,
//!   as `allocateLoadBalancerNodePorts: false` leaves it, means none) on each
//!   of [`NodeInfo::addresses`];
//! - each IPv4 `status.loadBalancer.ingress[].ip` whose `ipMode` is unset or
//!   `VIP`, and each IPv4 `spec.externalIPs` entry, on the port, whatever the
//!   type (as kube-proxy: the API server keeps those fields to the types
//!   they make sense for).
//!
//! Which endpoints a frontend uses is decided once per Service port, in
//! `categorize`, following kube-proxy's `CategorizeEndpoints`
//! (pkg/proxy/topology.go) and the proxiers' filter rules; every frontend
//! of the port then picks the cluster-wide or the local set:
//! - traffic from inside the cluster to a cluster IP follows
//!   `internalTrafficPolicy`; to any other kind it always uses the
//!   cluster-wide set (kube-proxy short-circuits pod and host traffic to
//!   external destinations to its Cluster chain);
//! - traffic from outside follows `externalTrafficPolicy` (meaningful on
//!   types NodePort and LoadBalancer only): Cluster uses the cluster-wide set
//!   and masquerades, Local the local set with the client IP kept, dropping
//!   new flows when this node has none but others do;
//!   `loadBalancerSourceRanges` apply to load-balancer IPs only;
//! - an eTP-Local LoadBalancer with a `healthCheckNodePort` gets a
//!   [`HealthCheck`] reporting this node's ready endpoints.
//!
//! The sets:
//! - the usable endpoints are the ready ones; only when none is ready are the
//!   serving *and* terminating ones used, so a Service whose pods are all
//!   shutting down keeps answering while they drain;
//! - `internalTrafficPolicy: Local` keeps only endpoints whose `nodeName` is
//!   this node: the ready local ones, else the serving-terminating local ones.
//!   With none left while the Service has usable endpoints elsewhere, new
//!   flows are dropped (kube-proxy's DROP "has no local endpoints"); with no
//!   usable endpoint anywhere they are rejected, whatever the policy;
//! - topology, only under the Cluster policy and only among ready endpoints
//!   (the terminating fallback ignores it, as kube-proxy's does): when the
//!   Service asks for `trafficDistribution: PreferSameNode`, every ready
//!   endpoint carries `hints.forNodes` and one names this node, only the
//!   endpoints hinted for this node are used; otherwise, when every ready
//!   endpoint carries `hints.forZones`, this node has a
//!   `topology.kubernetes.io/zone` label and one endpoint is hinted for that
//!   zone, only the endpoints hinted for it; otherwise all. Topology never
//!   filters down to nothing, and, like kube-proxy, only the hints count: the
//!   `service.kubernetes.io/topology-mode` annotation is the EndpointSlice
//!   controller's business, not the proxy's.

pub mod api;
#[cfg(test)]
mod dual_stack_tests;
mod intern;
mod service;
mod slices;
mod topology;
mod tracker;

pub use intern::intern;
pub use service::ServiceFacts;
use service::*;
pub use slices::SliceFacts;
use slices::*;
use topology::*;

pub use tracker::{Origin, Tracker};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use api::{EndpointSlice, Service};
use k8s_openapi::api::core::v1::Node;
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
/// Node label naming the node's zone, matched against `hints.forZones`.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

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
/// Either family: an IPv6 frontend only ever gets IPv6 endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `[2001:db8::1]:80/TCP`, as a socket address is written.
        write!(
            f,
            "{}/{}",
            std::net::SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

/// One destination a frontend's traffic may be sent to. The protocol is the
/// frontend's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

/// An IP family, as Services (`ipFamilies`) and EndpointSlices
/// (`addressType`) name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The API spelling (`IPv4`, `IPv6`).
    pub const fn as_str(&self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn from_api(value: &str) -> Option<Self> {
        match value {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses an address of either family, refusing IPv4-mapped IPv6
/// addresses (`::ffff:10.0.0.1`): on the wire such a destination is IPv4,
/// so a rule for it would never match, and the API server refuses them in
/// new objects (older ones may still hold them).
pub(crate) fn parse_ip(text: &str) -> Result<IpAddr, IpError> {
    let addr: IpAddr = text.parse().map_err(|_| IpError::NotAnAddress)?;
    match addr {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Err(IpError::Ipv4Mapped),
        addr => Ok(addr),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub(crate) enum IpError {
    #[error("not an IP address")]
    NotAnAddress,
    #[error("an IPv4-mapped IPv6 address, which no packet carries as its destination")]
    Ipv4Mapped,
}

/// What new flows get when a frontend has no usable endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EmptyAction {
    /// ICMP unreachable, so clients fail fast (kube-proxy's REJECT).
    Reject,
    /// Silent drop (kube-proxy's DROP, for policies that must not leak).
    Drop,
}

/// Which Service field a frontend comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)` on the service port.
    ClusterIp,
    /// `spec.ports[].nodePort` on one of [`NodeInfo::addresses`].
    NodePort,
    /// `status.loadBalancer.ingress[].ip` (VIP mode) on the service port.
    LoadBalancer,
    /// `spec.externalIPs[]` on the service port.
    ExternalIp,
}

/// One frontend's traffic and what it gets.
///
/// The backends the datapath must hold for a frontend are
/// `endpoints` ∪ `external.endpoints` ∪ `lingering`: `lingering` is disjoint
/// from both, and an endpoint only external traffic may use (a local
/// terminating one under `externalTrafficPolicy: Local`, say) is in
/// `external.endpoints` only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// kube-proxy's service port name: `namespace/name:port`, or
    /// `namespace/name` for an unnamed port, so logs read the same as its
    /// (one string shared by the port's frontends).
    pub service: Arc<str>,
    pub kind: FrontendKind,
    /// What traffic from inside the cluster (pods, the host) gets: the
    /// internalTrafficPolicy-filtered endpoints on a cluster IP; on the
    /// other kinds the cluster-wide endpoints whatever either policy says,
    /// as kube-proxy short-circuits in-cluster traffic to external
    /// destinations to its "Cluster" chain. Sorted and deduplicated.
    pub endpoints: Vec<Endpoint>,
    pub empty_action: EmptyAction,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without
    /// affinity. Applies to internal and external traffic alike.
    pub affinity_timeout_s: Option<u32>,
    /// Endpoints still in the EndpointSlices but not chosen for new flows
    /// (not ready, terminating, filtered out by policy or topology): their
    /// backends stay in the datapath so connections they already serve
    /// continue until they end, as kube-proxy's conntrack keeps them.
    /// Sorted, deduplicated, disjoint from `endpoints` and from
    /// `external.endpoints`.
    pub lingering: Vec<Endpoint>,
    /// `None` for cluster IPs; what traffic from outside the cluster gets on
    /// the other kinds.
    pub external: Option<ExternalTraffic>,
}

/// What traffic from outside the cluster (arriving on a node interface)
/// gets on a NodePort, load-balancer IP or external IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalTraffic {
    /// `externalTrafficPolicy: Cluster`: the cluster-wide endpoints (ready,
    /// topology applied; else serving-terminating). `Local`: this node's
    /// ready endpoints, else its serving-terminating ones. Sorted and
    /// deduplicated.
    pub endpoints: Vec<Endpoint>,
    /// `Reject` when the Service has no usable endpoint anywhere; `Drop`
    /// when only the Local policy left this node without one.
    pub empty_action: EmptyAction,
    /// `externalTrafficPolicy: Cluster`: SNAT to the node IP, since the
    /// endpoint may be on another node. `Local`: the client IP is kept.
    pub masquerade: bool,
    /// `loadBalancerSourceRanges` of the frontend's family, on load-balancer
    /// frontends only: NodePorts and external IPs bypass them, as kube-proxy's. They
    /// guard every client of the frontend, pods included. When one contains
    /// a node address, the Service's LB IPs are added (a node reaching its
    /// own LB IP may come back with that as source), as kube-proxy does.
    /// Empty allows everyone. Sorted and deduplicated.
    pub source_ranges: Vec<IpCidr>,
    /// A range contains a node address: the node's own sockets (socket-level
    /// translation, which knows no source address yet) may use the frontend.
    pub allow_node: bool,
}

/// An IPv4 prefix. The address is stored with its host bits cleared, so
/// `10.1.2.3/8` reads back as `10.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CidrError {
    #[error("{0:?}: expected ADDRESS/PREFIX")]
    NoPrefix(String),
    #[error("{0:?}: not an IP address")]
    Address(String),
    #[error("{0:?}: prefix length is not a number in 0..=32 (IPv4) or 0..=128 (IPv6)")]
    PrefixLen(String),
}

impl Ipv4Cidr {
    /// `addr/prefix_len`, host bits cleared; `None` if `prefix_len > 32`.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Self> {
        (prefix_len <= 32).then(|| Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix_len)),
            prefix_len,
        })
    }

    fn mask(prefix_len: u8) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0)
    }

    /// The prefix as a mask, e.g. `255.240.0.0` for `/12`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask(self.prefix_len))
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.prefix_len) == u32::from(self.addr)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| CidrError::NoPrefix(text.to_string()))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| CidrError::Address(text.to_string()))?;
        let len = prefix_len(len, text)?;
        Self::new(addr, len).ok_or_else(|| CidrError::PrefixLen(text.to_string()))
    }
}

/// The prefix length after the `/` of `text`.
fn prefix_len(len: &str, text: &str) -> Result<u8, CidrError> {
    // Digits only: `u8::from_str` would take a leading `+`.
    Some(len)
        .filter(|len| !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|len| len.parse::<u8>().ok())
        .ok_or_else(|| CidrError::PrefixLen(text.to_string()))
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A prefix of either family (`loadBalancerSourceRanges`,
/// `--nodeport-addresses`), host bits cleared as [`Ipv4Cidr`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpCidr {
    /// `addr/prefix_len`, host bits cleared; `None` past the family's
    /// length.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Cidr::new(v4, prefix_len)?.addr),
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128u32.checked_sub(u32::from(prefix_len))?)
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Some(Self { addr, prefix_len })
    }

    /// The whole address, as a prefix.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self {
            addr,
            prefix_len: len,
        }
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// Whether `addr` (of either family) is inside; never across families.
    pub fn contains(&self, addr: IpAddr) -> bool {
        Family::of(addr) == self.family()
            && Self::new(addr, self.prefix_len).is_some_and(|net| net.addr == self.addr)
    }

    /// The IPv4 prefix, for the IPv4 datapath's settings.
    pub fn v4(&self) -> Option<Ipv4Cidr> {
        match self.addr {
            IpAddr::V4(v4) => Ipv4Cidr::new(v4, self.prefix_len),
            IpAddr::V6(_) => None,
        }
    }
}

impl From<Ipv4Cidr> for IpCidr {
    fn from(cidr: Ipv4Cidr) -> Self {
        Self {
            addr: IpAddr::V4(cidr.addr),
            prefix_len: cidr.prefix_len,
        }
    }
}

impl std::str::FromStr for IpCidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(v4) = text.parse::<Ipv4Cidr>() {
            return Ok(v4.into());
        }
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| CidrError::NoPrefix(text.to_string()))?;
        let addr: Ipv6Addr = match addr.parse() {
            Ok(addr) => addr,
            // An IPv4 address with a bad length: say so, as before.
            Err(_) if addr.parse::<Ipv4Addr>().is_ok() => {
                return Err(CidrError::PrefixLen(text.to_string()));
            }
            Err(_) => return Err(CidrError::Address(text.to_string())),
        };
        let len = prefix_len(len, text)?;
        Self::new(IpAddr::V6(addr), len).ok_or_else(|| CidrError::PrefixLen(text.to_string()))
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The `healthCheckNodePort` server of one Service: a LoadBalancer with
/// `externalTrafficPolicy: Local`, whose load balancer asks each node
/// whether it has endpoints to send to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Distinct addresses of this node's ready endpoints over all the
    /// Service's ports (terminating ones do not count, so the load balancer
    /// stops sending while they drain), as kube-proxy reports it.
    pub local_endpoints: usize,
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// API validation's upper bound for it.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// By `healthCheckNodePort`.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// The node the state is computed for: endpoints' `nodeName` and
/// `hints.forNodes` are matched against its name, `hints.forZones` against
/// its zone label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The node IPs NodePorts answer on, already filtered by
    /// `--nodeport-addresses`. Order and duplicates do not matter.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// The node called `name`, with the labels of the Node object of that
    /// name in `nodes` (none if there is no such object: no topology then).
    pub fn from_objects(name: &str, nodes: &[Node]) -> Self {
        // Two copies of one Node can only come from a broken static source;
        // the smallest label set wins so the outcome does not depend on order.
        let labels = nodes
            .iter()
            .filter(|node| !name.is_empty() && node.metadata.name.as_deref() == Some(name))
            .map(|node| node.metadata.labels.clone().unwrap_or_default())
            .min()
            .unwrap_or_default();
        Self {
            name: name.to_string(),
            labels,
            addresses: Vec::new(),
        }
    }

    /// The same node, with NodePorts answering on `addresses`.
    pub fn with_addresses<A: Into<IpAddr>>(
        mut self,
        addresses: impl IntoIterator<Item = A>,
    ) -> Self {
        self.addresses = addresses.into_iter().map(Into::into).collect();
        self
    }

    /// The zone label, if set and not empty.
    fn zone(&self) -> Option<&str> {
        self.labels
            .get(LABEL_TOPOLOGY_ZONE)
            .map(String::as_str)
            .filter(|zone| !zone.is_empty())
    }
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
pub(super) enum Problem {
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
    #[error(
        "{field}: {addr} is the cluster IP of Service {owner}; refused (a cluster IP belongs to the Service it was allocated to)"
    )]
    ClusterIpTaken {
        field: &'static str,
        addr: IpAddr,
        owner: String,
    },
    #[error("port {name:?}: frontend {frontend} already belongs to {owner}")]
    FrontendTaken {
        name: String,
        frontend: Frontend,
        owner: String,
    },
    #[error("port {name:?}: nodePort {port} is outside 1..=65535; no NodePort for it")]
    NodePortRange { name: String, port: i32 },
    #[error("externalIPs: {0:?} is not an IP address")]
    BadExternalIp(String),
    #[error("status.loadBalancer.ingress: ip {0:?} is not an IP address")]
    BadIngressIp(String),
    #[error("loadBalancerSourceRanges: {0}; range ignored")]
    BadSourceRange(CidrError),
    #[error(
        "externalTrafficPolicy Local LoadBalancer without a healthCheckNodePort; no health check served"
    )]
    NoHealthCheckPort,
    #[error("healthCheckNodePort {0} is outside 1..=65535; no health check served")]
    HealthCheckPortRange(i32),
    #[error("healthCheckNodePort {port} already belongs to {owner}; no health check served")]
    HealthCheckPortTaken { port: u16, owner: String },
    #[error("port {name:?}: no port number")]
    SlicePortMissing { name: String },
    #[error("port {name:?}: port {port} is outside 1..=65535")]
    SlicePortRange { name: String, port: i32 },
    #[error("port {name:?}: {source}")]
    SlicePortProtocol {
        name: String,
        source: UnsupportedProtocol,
    },
    #[error("sessionAffinity {0:?} is not None or ClientIP; served without affinity")]
    AffinityKind(String),
    #[error(
        "sessionAffinityConfig.clientIP.timeoutSeconds {0} is outside 1..=86400; served without affinity"
    )]
    AffinityTimeout(i32),
    #[error("endpoint {index}: no address")]
    NoAddress { index: usize },
    #[error("endpoint {index}: address {addr:?} is not an {family} address; endpoint skipped")]
    BadAddress {
        index: usize,
        addr: String,
        family: Family,
    },
    #[error("endpoint {index}: address {addr:?} is {source}; endpoint skipped")]
    MappedAddress {
        index: usize,
        addr: String,
        source: IpError,
    },
    #[error("addressType {0:?} is not IPv4 or IPv6; slice ignored")]
    AddressType(String),
    #[error("{field}: {addr:?} is {source}; ignored")]
    BadFamilyAddress {
        field: &'static str,
        addr: String,
        source: IpError,
    },
    #[error(
        "{field}: {addr} is {family} but the Service has no {family} cluster IP (ipFamilies {families}); ignored"
    )]
    FamilyNotServed {
        field: &'static str,
        addr: String,
        family: Family,
        families: String,
    },
    #[error("clusterIPs: a second {family} address {addr}; only the first of a family is served")]
    SecondClusterIp { family: Family, addr: IpAddr },
}

pub(super) fn warn(warnings: &mut Vec<Warning>, object: &str, problem: Problem) {
    warnings.push(Warning {
        object: object.to_string(),
        reason: problem.to_string(),
    });
}

/// Computes the frontends to program on `node` and the warnings about what
/// was skipped, from scratch: every object goes through a fresh
/// [`Tracker`], the very code the agent runs one change at a time.
///
/// The result does not depend on the order of either input: objects are
/// processed in (namespace, name) order and warnings are returned sorted.
pub fn compute(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
) -> (DesiredState, Vec<Warning>) {
    let mut tracker = Tracker::new(node.clone());
    for (origin, service) in services.iter().enumerate() {
        tracker.put_service(origin as u64, service.clone());
    }
    for (origin, slice) in slices.iter().enumerate() {
        tracker.put_slice(origin as u64, slice.clone());
    }
    tracker.settle();
    let desired = DesiredState {
        frontends: tracker
            .frontends()
            .map(|(frontend, state)| (*frontend, state.clone()))
            .collect(),
        health_checks: tracker.health_checks().clone(),
    };
    (desired, tracker.warnings())
}

/// A Service's namespace and name: cheap to clone (both strings shared),
/// ordered by namespace, then name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceName {
    /// `namespace/name`; an empty namespace is the default one.
    pub fn new(namespace: &str, name: &str) -> Self {
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        Self {
            namespace: intern(namespace),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub(crate) fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(namespace) => namespace,
    }
}

/// An object's namespace (defaulted) and name (empty when it has none).
pub(crate) fn identity(meta: &ObjectMeta) -> (&str, &str) {
    (namespace_of(meta), meta.name.as_deref().unwrap_or(""))
}

/// Whether this proxy should handle the object; objects carrying
/// `service-proxy-name` (whatever its value) are for another proxy.
pub(crate) fn is_ours(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_none_or(|labels| !labels.contains_key(LABEL_SERVICE_PROXY_NAME))
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Builders for API objects, going through JSON so the objects are the
    //! ones a real API server or manifest would produce.

    use super::api::{EndpointSlice, Service};
    use super::{
        DesiredState, Endpoint, Frontend, LABEL_TOPOLOGY_ZONE, NodeInfo, Protocol, compute,
    };
    use serde_json::{Value, json};
    use std::net::Ipv4Addr;

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

    /// `web` in `default`: 10.96.0.10, port `http` 80/TCP.
    pub fn web() -> Service {
        service("web", "10.96.0.10", &[("http", 80, "TCP")])
    }

    pub fn fe(addr: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    pub fn ep(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
        }
    }

    pub fn endpoints_of(state: &DesiredState, frontend: Frontend) -> Vec<Endpoint> {
        state.frontends[&frontend].endpoints.clone()
    }

    /// Each bad input yields exactly one warning and leaves `web` intact.
    pub fn assert_one_warning(
        bad_services: &[Service],
        bad_slices: &[EndpointSlice],
        object: &str,
    ) {
        let mut services = bad_services.to_vec();
        services.push(web());
        let mut slices = bad_slices.to_vec();
        slices.push(slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.1", None)],
        ));
        let (state, warnings) = compute(&services, &slices, &NodeInfo::default());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].object, object);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080)]
        );
    }

    /// (ready, serving, terminating)
    pub type Conditions = (bool, bool, bool);
    pub const READY: Conditions = (true, true, false);
    pub const TERMINATING: Conditions = (false, true, true);
    pub const GONE: Conditions = (false, false, true);

    /// An endpoint on `node` with explicit conditions.
    pub fn on(addr: &str, node: &str, (ready, serving, terminating): Conditions) -> Value {
        json!({"addresses": [addr], "nodeName": node,
               "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    /// A ready endpoint with `hints.forZones` and `hints.forNodes` (an empty
    /// list leaves that hint out).
    pub fn with_hints(addr: &str, zones: &[&str], nodes: &[&str]) -> Value {
        let names =
            |names: &[&str]| -> Value { names.iter().map(|name| json!({"name": name})).collect() };
        let mut hints = json!({});
        if !zones.is_empty() {
            hints["forZones"] = names(zones);
        }
        if !nodes.is_empty() {
            hints["forNodes"] = names(nodes);
        }
        json!({"addresses": [addr], "conditions": {"ready": true}, "hints": hints})
    }

    /// A slice of `web` (http -> 8080) with raw endpoint objects.
    pub fn web_slice(name: &str, endpoints: &[Value]) -> EndpointSlice {
        from(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
    }

    pub fn node(name: &str, zone: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            labels: zone
                .map(|zone| (LABEL_TOPOLOGY_ZONE.to_string(), zone.to_string()))
                .into_iter()
                .collect(),
            addresses: Vec::new(),
        }
    }

    pub const NODE_IP: &str = "192.168.0.1";

    pub fn ip(addr: &str) -> Ipv4Addr {
        addr.parse().unwrap()
    }
}

#[cfg(test)]
mod tests {
    //! Whole derivations (ports, conflicts between Services, order) and
    //! the module's own types; each part's rules are tested beside it
    //! (`service.rs`, `slices.rs`, `topology.rs`, `tracker.rs`).

    use super::fixtures::{NODE_IP, endpoints_of, ep, fe, ip, service, slice, web};
    use super::*;

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
        let (state, warnings) = compute(&[svc], &slices, &NodeInfo::default());
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
    fn unchosen_endpoints_linger_for_their_existing_flows() {
        let svc = service("web", "10.96.0.10", &[("http", 80, "TCP")]);
        let slices = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.1", Some(true)), ("10.0.0.2", Some(false))],
        )];
        let (state, warnings) = compute(&[svc], &slices, &NodeInfo::default());
        assert_eq!(warnings, []);
        let st = &state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(
            st.endpoints,
            [ep("10.0.0.1", 8080)],
            "new flows: ready only"
        );
        assert_eq!(st.lingering, [ep("10.0.0.2", 8080)], "still present: kept");
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
        let (state, warnings) = compute(&[svc], &slices, &NodeInfo::default());
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
    fn service_without_endpoints_rejects() {
        let (state, warnings) = compute(&[web()], &[], &NodeInfo::default());
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
        let (state, warnings) = compute(&[], &slices, &NodeInfo::default());
        assert_eq!(warnings, []);
        assert!(state.frontends.is_empty());
    }

    #[test]
    fn conflicting_frontends_keep_first_in_name_order() {
        let a = service("a", "10.96.0.10", &[("http", 80, "TCP")]);
        let b = service("b", "10.96.0.10", &[("http", 80, "TCP")]);
        let (state, warnings) = compute(&[b.clone(), a.clone()], &[], &NodeInfo::default());
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].object, "Service default/b");
        assert_eq!(
            &*state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)].service,
            "default/a:http"
        );
    }

    #[test]
    fn duplicate_service_uses_one_copy_whatever_the_order() {
        let a = service("web", "10.96.0.10", &[("http", 80, "TCP")]);
        let b = service("web", "10.96.0.20", &[("http", 80, "TCP")]);
        let one = compute(&[a.clone(), b.clone()], &[], &NodeInfo::default());
        let two = compute(&[b, a], &[], &NodeInfo::default());
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
        let forward = compute(&services, &slices, &NodeInfo::default());
        let mut rs = services.clone();
        rs.reverse();
        let mut rl = slices.clone();
        rl.reverse();
        assert_eq!(compute(&rs, &rl, &NodeInfo::default()), forward);
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

    #[test]
    fn ipv4_cidr_parse_and_contains() {
        let c: Ipv4Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(
            c,
            Ipv4Cidr {
                addr: ip("10.0.0.0"),
                prefix_len: 8
            }
        );
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("255.255.255.255")));
        let host: Ipv4Cidr = "192.168.0.1/32".parse().unwrap();
        assert!(host.contains(ip(NODE_IP)) && !host.contains(ip("192.168.0.2")));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "x/8",
            "fd00::/8",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn node_info_with_addresses() {
        let n = NodeInfo::from_objects("node-a", &[]).with_addresses([ip(NODE_IP)]);
        assert_eq!(n.addresses, [ip(NODE_IP)]);
        assert_eq!(n.name, "node-a");
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
        (
            name_like(),
            port_like(),
            protocol_like(),
            prop_oneof![3 => Just(Value::Null), 1 => port_like()],
        )
            .prop_map(|(name, port, protocol, node_port)| {
                json!({"name": name, "port": port, "protocol": protocol, "nodePort": node_port})
            })
    }

    fn cidr_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => (0u8..8, 0u8..=33).prop_map(|(d, len)| json!(format!("10.0.0.{d}/{len}"))),
            1 => Just(json!(" 192.168.0.0/16 ")),
            1 => Just(json!("fd00::/8")),
            1 => "[0-9./]{0,12}".prop_map(Value::from),
        ]
    }

    /// Everything beyond cluster IPs: (externalIPs, eTP, health check port,
    /// source ranges, status).
    fn exposure_json() -> impl Strategy<Value = (Value, Value, Value, Value, Value)> {
        let ingress = (
            ip_like(),
            prop::sample::select(vec![Value::Null, json!("VIP"), json!("Proxy")]),
        )
            .prop_map(|(ip, mode)| json!({"ip": ip, "ipMode": mode}));
        (
            prop::collection::vec(ip_like(), 0..3),
            prop::sample::select(vec![Value::Null, json!("Cluster"), json!("Local")]),
            prop_oneof![Just(Value::Null), port_like()],
            prop::collection::vec(cidr_like(), 0..3),
            prop::collection::vec(ingress, 0..3),
        )
            .prop_map(|(ext, etp, hc, ranges, ingress)| {
                (
                    Value::from(ext),
                    etp,
                    hc,
                    Value::from(ranges),
                    json!({"loadBalancer": {"ingress": ingress}}),
                )
            })
    }

    fn service_json() -> impl Strategy<Value = Value> {
        (
            object_name_like(),
            namespace_like(),
            ip_like(),
            prop::collection::vec(ip_like(), 0..2),
            prop_oneof![
                6 => Just("ClusterIP"),
                2 => Just("NodePort"),
                2 => Just("LoadBalancer"),
                1 => Just("ExternalName"),
                1 => Just(""),
            ],
            prop::collection::vec(port_entry(), 0..4),
            prop::bool::weighted(0.1),
            prop::sample::select(vec![Value::Null, json!("Cluster"), json!("Local")]),
            prop::sample::select(vec![
                Value::Null,
                json!("PreferClose"),
                json!("PreferSameNode"),
            ]),
            exposure_json(),
        )
            .prop_map(
                |(
                    name,
                    ns,
                    ip,
                    ips,
                    ty,
                    ports,
                    proxy_name,
                    policy,
                    distribution,
                    (external_ips, etp, hc, ranges, status),
                )| {
                    let labels = if proxy_name {
                        json!({"service.kubernetes.io/service-proxy-name": "x"})
                    } else {
                        Value::Null
                    };
                    json!({
                        "metadata": {"name": name, "namespace": ns, "labels": labels},
                        "spec": {"clusterIP": ip, "clusterIPs": ips, "type": ty, "ports": ports,
                                 "internalTrafficPolicy": policy,
                                 "trafficDistribution": distribution,
                                 "externalIPs": external_ips,
                                 "externalTrafficPolicy": etp,
                                 "healthCheckNodePort": hc,
                                 "loadBalancerSourceRanges": ranges},
                        "status": status,
                    })
                },
            )
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

    fn condition() -> impl Strategy<Value = Value> {
        prop_oneof![
            2 => Just(Value::Null),
            2 => Just(json!(true)),
            1 => Just(json!(false)),
        ]
    }

    /// Absent, or a list of names from a pool that meets the node's.
    fn hint_names(pool: &'static [&'static str]) -> impl Strategy<Value = Value> {
        prop_oneof![
            2 => Just(Value::Null),
            3 => prop::sample::subsequence(pool.to_vec(), 1..=pool.len()).prop_map(
                |names| names.iter().map(|name| json!({"name": name})).collect()
            ),
        ]
    }

    fn endpoint_entry() -> impl Strategy<Value = Value> {
        (
            prop::collection::vec(ip_like(), 1..3),
            (condition(), condition(), condition()),
            prop::sample::select(vec![Value::Null, json!("node-a"), json!("node-b")]),
            hint_names(&["zone-a", "zone-b"]),
            hint_names(&["node-a", "node-b"]),
        )
            .prop_map(
                |(addresses, (ready, serving, terminating), node, zones, nodes)| {
                    json!({
                        "addresses": addresses,
                        "conditions": {"ready": ready, "serving": serving,
                                       "terminating": terminating},
                        "nodeName": node,
                        "hints": {"forZones": zones, "forNodes": nodes},
                    })
                },
            )
    }

    fn node_info() -> impl Strategy<Value = NodeInfo> {
        (
            prop::sample::select(vec!["", "node-a", "node-b"]),
            prop::sample::select(vec![None, Some("zone-a"), Some("zone-b")]),
        )
            .prop_map(|(name, zone)| NodeInfo {
                name: name.to_string(),
                labels: zone
                    .map(|zone| (LABEL_TOPOLOGY_ZONE.to_string(), zone.to_string()))
                    .into_iter()
                    .collect(),
                addresses: vec![Ipv4Addr::new(192, 168, 0, 1).into()],
            })
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
            node in node_info(),
        ) {
            let services: Vec<Service> = decoded(services);
            let slices: Vec<EndpointSlice> = decoded(slices);
            let (state, warnings) = compute(&services, &slices, &node);
            for (frontend, st) in &state.frontends {
                prop_assert!(frontend.port != 0);
                prop_assert!(st.endpoints.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(st.endpoints.iter().all(|e| e.port != 0));
                let external = st.external.as_ref().map(|x| x.endpoints.as_slice()).unwrap_or_default();
                prop_assert!(external.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(st.lingering.iter().all(|e| !st.endpoints.contains(e) && !external.contains(e)));
                prop_assert_eq!(st.external.is_none(), st.kind == FrontendKind::ClusterIp);
            }
            let mut rs = services.clone();
            rs.reverse();
            let mut rl = slices.clone();
            rl.reverse();
            prop_assert_eq!(compute(&rs, &rl, &node), (state, warnings));
        }
    }
}
