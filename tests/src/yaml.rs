//! Manifest text for lab tests, the same shape as `manifests/examples/demo.yaml`.
//!
//! Services may be IPv4 (as before: no family fields written), IPv6-only or
//! dual-stack ([`Svc::cluster_ip6`], [`Svc::dual_stack`]: `ipFamilies`,
//! `ipFamilyPolicy`, `clusterIPs` as the API server returns them); an
//! EndpointSlice's `addressType` is the family of its addresses.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::addr::IpFamily;
use crate::{addr, backend_name};

/// One service port: `(name, port, protocol, targetPort)`; `targetPort` is
/// written verbatim (a number or a port name).
pub type ServicePort<'a> = (&'a str, u16, &'a str, &'a str);

/// A `v1/Service` of type ClusterIP in namespace `default`.
pub fn service(
    name: &str,
    cluster_ip: &str,
    ports: &[ServicePort<'_>],
    selector_app: &str,
) -> String {
    let ports: Vec<_> = ports.iter().map(|&p| (p, None)).collect();
    service_of_type(name, "ClusterIP", cluster_ip, &ports, selector_app)
}

/// A `v1/Service` of type NodePort (externalTrafficPolicy Cluster, the
/// default) in namespace `default`: each port with its `nodePort`.
pub fn node_port_service(
    name: &str,
    cluster_ip: &str,
    ports: &[(ServicePort<'_>, u16)],
    selector_app: &str,
) -> String {
    let ports: Vec<_> = ports.iter().map(|&(p, np)| (p, Some(np))).collect();
    service_of_type(name, "NodePort", cluster_ip, &ports, selector_app)
}

fn service_of_type(
    name: &str,
    service_type: &str,
    cluster_ip: &str,
    ports: &[(ServicePort<'_>, Option<u16>)],
    selector_app: &str,
) -> String {
    let mut s = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: {service_type}
"
    );
    // An IPv6 cluster IP makes an IPv6-only Service, written as the API
    // server returns one (the family fields); an IPv4 one is written alone.
    match cluster_ip.parse::<Ipv6Addr>() {
        Ok(ip6) => Svc::cluster_ip6(name, ip6, Vec::new()).render_cluster_ips(&mut s),
        Err(_) => {
            let _ = writeln!(s, "  clusterIP: {cluster_ip}");
        }
    }
    let _ = write!(s, "  selector:\n    app: {selector_app}\n  ports:\n");
    for ((pname, port, proto, target), node_port) in ports {
        let _ = writeln!(
            s,
            "  - name: {pname}\n    port: {port}\n    protocol: {proto}\n    targetPort: {target}"
        );
        if let Some(np) = node_port {
            let _ = writeln!(s, "    nodePort: {np}");
        }
    }
    s
}

/// A `discovery.k8s.io/v1/EndpointSlice` for `service` in namespace
/// `default`. `ports` are `(name, port, protocol)`; `endpoints` are
/// `(address, pod name, ready)`, addresses of one family (either).
pub fn endpoint_slice<A: Into<IpAddr> + Copy>(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(A, String, bool)],
) -> String {
    let on_lab_node: Vec<NodeEndpoint> = endpoints
        .iter()
        .map(|(ip, pod, ready)| NodeEndpoint {
            ip: (*ip).into(),
            pod: pod.clone(),
            ready: *ready,
            node: crate::LAB_NODE.to_string(),
        })
        .collect();
    endpoint_slice_on_nodes(name, service, ports, &on_lab_node)
}

/// An endpoint on a named node (its `nodeName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEndpoint {
    pub ip: IpAddr,
    pub pod: String,
    pub ready: bool,
    pub node: String,
}

/// The `addressType` of a slice holding `ips`: the family of the first
/// (a slice holds one family; an empty one is written `IPv4`).
fn address_type(mut ips: impl Iterator<Item = IpAddr>) -> &'static str {
    ips.next().map_or(IpFamily::V4, IpFamily::of).k8s_name()
}

/// [`endpoint_slice`] whose endpoints each name their own node (for the
/// two-node [`crate::cluster::Cluster`]).
pub fn endpoint_slice_on_nodes(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[NodeEndpoint],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels:
    kubernetes.io/service-name: {service}
addressType: {}
ports:
",
        address_type(endpoints.iter().map(|e| e.ip))
    );
    for (pname, port, proto) in ports {
        let _ = writeln!(s, "- name: {pname}\n  port: {port}\n  protocol: {proto}");
    }
    if endpoints.is_empty() {
        s.push_str("endpoints: []\n");
    } else {
        s.push_str("endpoints:\n");
    }
    for NodeEndpoint {
        ip,
        pod,
        ready,
        node,
    } in endpoints
    {
        let _ = writeln!(
            s,
            "- addresses: [\"{ip}\"]
  conditions:
    ready: {ready}
  nodeName: {node}
  targetRef:
    kind: Pod
    namespace: default
    name: {pod}"
        );
    }
    s
}

/// Service `demo` (10.96.0.10: http 80/TCP -> `http`, dns 53/UDP -> `dns`)
/// with EndpointSlice `demo-lab` listing the given backends (ready, pod
/// ports 8080/TCP and 5353/UDP).
pub fn demo(backends: &[usize]) -> String {
    demo_with_ports(backends, 8080, 5353)
}

/// [`demo`] with other backend ports.
pub fn demo_with_ports(backends: &[usize], tcp_port: u16, udp_port: u16) -> String {
    let vip = addr::DEMO_VIP.to_string();
    let svc = service(
        "demo",
        &vip,
        &[("http", 80, "TCP", "http"), ("dns", 53, "UDP", "dns")],
        "demo",
    );
    let eps: Vec<_> = backends
        .iter()
        .map(|&i| (addr::backend_ip(i), backend_name(i), true))
        .collect();
    let slice = endpoint_slice(
        "demo-lab",
        "demo",
        &[("http", tcp_port, "TCP"), ("dns", udp_port, "UDP")],
        &eps,
    );
    format!("{svc}---\n{slice}")
}

/// Service `empty` (10.96.0.11: 80/TCP -> 8080, 53/UDP -> 5353) with no
/// EndpointSlice: new connections are rejected.
pub fn empty() -> String {
    service(
        "empty",
        &addr::EMPTY_VIP.to_string(),
        &[("http", 80, "TCP", "8080"), ("dns", 53, "UDP", "5353")],
        "nothing",
    )
}

/// `service` (as rendered by [`Svc::render`]) and its one EndpointSlice,
/// whose one endpoint is the node itself: address `node_ip` on node `node`,
/// ready, no Pod behind it (as the API server's own Service, or a
/// hostNetwork pod's). The slice's ports are the Service's target ports.
pub fn node_endpoint_service(service: &Svc, node_ip: impl Into<IpAddr>, node: &str) -> String {
    let slice = Slice {
        name: service.name.clone(),
        service: service.name.clone(),
        ports: service
            .ports
            .iter()
            .map(|p| {
                let target = p
                    .target
                    .parse()
                    .expect("a node endpoint's targetPort is a number");
                (p.name.clone(), target, p.protocol.clone())
            })
            .collect(),
        endpoints: vec![SliceEndpoint {
            ip: node_ip.into(),
            node: node.into(),
            ready: true,
            serving: true,
            terminating: false,
        }],
        labels: Vec::new(),
    };
    format!("{}---\n{}", service.render(), slice.render())
}

/// One port of a [`Svc`]: `targetPort` is written verbatim (a number or a
/// port name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub target: String,
    pub node_port: Option<u16>,
}

impl SvcPort {
    pub fn new(name: &str, port: u16, protocol: &str, target: &str) -> SvcPort {
        SvcPort {
            name: name.into(),
            port,
            protocol: protocol.into(),
            target: target.into(),
            node_port: None,
        }
    }

    pub fn node_port(mut self, node_port: u16) -> SvcPort {
        self.node_port = Some(node_port);
        self
    }
}

/// A `v1/Service` in namespace `default` with every field the Service tests
/// change; [`Svc::render`] writes only the fields that are set.
#[derive(Debug, Clone, Default)]
pub struct Svc {
    pub name: String,
    /// `ClusterIP` when empty.
    pub service_type: String,
    /// `None` for headless or ExternalName (and for IPv6-only).
    pub cluster_ip: Option<Ipv4Addr>,
    /// The IPv6 cluster IP of an IPv6 or dual-stack Service.
    pub cluster_ip6: Option<Ipv6Addr>,
    /// `spec.ipFamilies`, primary first. Empty: an IPv4 Service written
    /// without the family fields (as every lab Service before IPv6).
    pub ip_families: Vec<IpFamily>,
    /// `spec.ipFamilyPolicy` (written with `ip_families`; `SingleStack`
    /// when `None`).
    pub ip_family_policy: Option<IpFamilyPolicy>,
    pub ports: Vec<SvcPort>,
    pub labels: Vec<(String, String)>,
    pub external_name: Option<String>,
    pub external_ips: Vec<Ipv4Addr>,
    pub external_traffic_local: bool,
    pub internal_traffic_local: bool,
    pub health_check_node_port: Option<u16>,
    /// `Some(timeout)`: `sessionAffinity: ClientIP` (`timeoutSeconds` when
    /// the timeout is set).
    pub client_ip_affinity: Option<Option<u32>>,
    pub publish_not_ready_addresses: bool,
    pub load_balancer_source_ranges: Vec<String>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<Ipv4Addr>,
}

/// `spec.ipFamilyPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

impl IpFamilyPolicy {
    pub fn name(self) -> &'static str {
        match self {
            IpFamilyPolicy::SingleStack => "SingleStack",
            IpFamilyPolicy::PreferDualStack => "PreferDualStack",
            IpFamilyPolicy::RequireDualStack => "RequireDualStack",
        }
    }
}

impl Svc {
    /// A ClusterIP Service `name` at `cluster_ip` with `ports`.
    pub fn cluster_ip(name: &str, cluster_ip: Ipv4Addr, ports: Vec<SvcPort>) -> Svc {
        Svc {
            name: name.into(),
            cluster_ip: Some(cluster_ip),
            ports,
            ..Svc::default()
        }
    }

    /// An IPv6-only (`SingleStack`) ClusterIP Service `name` at
    /// `cluster_ip6` with `ports`.
    pub fn cluster_ip6(name: &str, cluster_ip6: Ipv6Addr, ports: Vec<SvcPort>) -> Svc {
        Svc {
            name: name.into(),
            cluster_ip6: Some(cluster_ip6),
            ip_families: vec![IpFamily::V6],
            ip_family_policy: Some(IpFamilyPolicy::SingleStack),
            ports,
            ..Svc::default()
        }
    }

    /// The same Service dual-stack under `policy`, its other family's
    /// cluster IP `second` (an IPv6 one for an IPv4 Service, and the other
    /// way round) listed after its own.
    pub fn dual_stack(mut self, second: IpAddr, policy: IpFamilyPolicy) -> Svc {
        if self.ip_families.is_empty() {
            self.ip_families.push(IpFamily::V4);
        }
        match second {
            IpAddr::V4(ip) => self.cluster_ip = Some(ip),
            IpAddr::V6(ip) => self.cluster_ip6 = Some(ip),
        }
        self.ip_families.push(IpFamily::of(second));
        self.ip_family_policy = Some(policy);
        self
    }

    /// The cluster IP of `family`, if the Service has one.
    pub fn cluster_ip_of(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.cluster_ip.map(IpAddr::from),
            IpFamily::V6 => self.cluster_ip6.map(IpAddr::from),
        }
    }

    /// `clusterIP` (the primary family's), and with the family fields
    /// `clusterIPs`, `ipFamilies` and `ipFamilyPolicy`.
    fn render_cluster_ips(&self, s: &mut String) {
        let ips: Vec<IpAddr> = self
            .ip_families
            .iter()
            .filter_map(|&f| self.cluster_ip_of(f))
            .collect();
        let primary = if self.ip_families.is_empty() {
            self.cluster_ip.map(IpAddr::from)
        } else {
            ips.first().copied()
        };
        match primary {
            Some(ip) => {
                let _ = writeln!(s, "  clusterIP: {ip}");
            }
            None => s.push_str("  clusterIP: None\n"),
        }
        if self.ip_families.is_empty() {
            return;
        }
        let list = |items: Vec<String>| format!("[{}]", items.join(", "));
        let cluster_ips = if ips.is_empty() {
            vec!["None".to_string()]
        } else {
            ips.iter().map(|ip| format!("\"{ip}\"")).collect()
        };
        let families = self.ip_families.iter().map(|f| f.k8s_name().to_string());
        let _ = writeln!(
            s,
            "  clusterIPs: {}\n  ipFamilies: {}\n  ipFamilyPolicy: {}",
            list(cluster_ips),
            list(families.collect()),
            self.ip_family_policy
                .unwrap_or(IpFamilyPolicy::SingleStack)
                .name()
        );
    }

    /// The same Service as type `service_type` (`NodePort`, `LoadBalancer`,
    /// `ExternalName`, ...).
    pub fn of_type(mut self, service_type: &str) -> Svc {
        self.service_type = service_type.into();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Svc {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default\n",
            self.name
        );
        if !self.labels.is_empty() {
            s.push_str("  labels:\n");
            for (k, v) in &self.labels {
                let _ = writeln!(s, "    {k}: \"{v}\"");
            }
        }
        let service_type = if self.service_type.is_empty() {
            "ClusterIP"
        } else {
            &self.service_type
        };
        let _ = writeln!(s, "spec:\n  type: {service_type}");
        match &self.external_name {
            Some(name) => {
                let _ = writeln!(s, "  externalName: {name}");
            }
            None => self.render_cluster_ips(&mut s),
        }
        let _ = writeln!(s, "  selector:\n    app: {}", self.name);
        if self.external_traffic_local {
            s.push_str("  externalTrafficPolicy: Local\n");
        }
        if self.internal_traffic_local {
            s.push_str("  internalTrafficPolicy: Local\n");
        }
        if let Some(port) = self.health_check_node_port {
            let _ = writeln!(s, "  healthCheckNodePort: {port}");
        }
        if let Some(timeout) = self.client_ip_affinity {
            s.push_str("  sessionAffinity: ClientIP\n");
            if let Some(t) = timeout {
                let _ = writeln!(
                    s,
                    "  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}"
                );
            }
        }
        if self.publish_not_ready_addresses {
            s.push_str("  publishNotReadyAddresses: true\n");
        }
        if let Some(allocate) = self.allocate_load_balancer_node_ports {
            let _ = writeln!(s, "  allocateLoadBalancerNodePorts: {allocate}");
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self
                .external_ips
                .iter()
                .map(|ip| format!("\"{ip}\""))
                .collect();
            let _ = writeln!(s, "  externalIPs: [{}]", ips.join(", "));
        }
        if !self.load_balancer_source_ranges.is_empty() {
            let r: Vec<String> = self
                .load_balancer_source_ranges
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect();
            let _ = writeln!(s, "  loadBalancerSourceRanges: [{}]", r.join(", "));
        }
        if !self.ports.is_empty() {
            s.push_str("  ports:\n");
        }
        for p in &self.ports {
            let _ = writeln!(
                s,
                "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}",
                p.name, p.port, p.protocol, p.target
            );
            if let Some(np) = p.node_port {
                let _ = writeln!(s, "    nodePort: {np}");
            }
        }
        if !self.load_balancer_ips.is_empty() {
            s.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for ip in &self.load_balancer_ips {
                let _ = writeln!(s, "    - ip: {ip}");
            }
        }
        s
    }
}

/// One endpoint of a [`Slice`] with all three conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A `discovery.k8s.io/v1/EndpointSlice` for `service` in namespace
/// `default`; `labels` are added to `kubernetes.io/service-name`.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    pub name: String,
    pub service: String,
    /// `(name, port, protocol)`.
    pub ports: Vec<(String, u16, String)>,
    pub endpoints: Vec<SliceEndpoint>,
    pub labels: Vec<(String, String)>,
}

impl Slice {
    pub fn render(&self) -> String {
        let mut s = format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {}
  namespace: default
  labels:
    kubernetes.io/service-name: {}
",
            self.name, self.service
        );
        for (k, v) in &self.labels {
            let _ = writeln!(s, "    {k}: \"{v}\"");
        }
        let _ = writeln!(
            s,
            "addressType: {}\nports:",
            address_type(self.endpoints.iter().map(|e| e.ip))
        );
        for (name, port, proto) in &self.ports {
            let _ = writeln!(s, "- name: {name}\n  port: {port}\n  protocol: {proto}");
        }
        if self.endpoints.is_empty() {
            s.push_str("endpoints: []\n");
        } else {
            s.push_str("endpoints:\n");
        }
        for e in &self.endpoints {
            let _ = writeln!(
                s,
                "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  nodeName: {}",
                e.ip, e.ready, e.serving, e.terminating, e.node
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;

    fn docs(text: &str) -> Vec<serde_yaml::Value> {
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect()
    }

    /// The text as the API types read it (field names included: a misspelt
    /// field would be dropped and missed below).
    fn parse_service(text: &str) -> Service {
        serde_yaml::from_value(docs(text).remove(0)).unwrap()
    }

    fn strings(v: Option<Vec<String>>) -> Vec<String> {
        v.unwrap_or_default()
    }

    #[test]
    fn ipv4_services_are_written_as_before() {
        let svc = Svc::cluster_ip(
            "a",
            addr::DEMO_VIP,
            vec![SvcPort::new("http", 80, "TCP", "8080")],
        );
        let text = svc.render();
        assert!(text.contains("  clusterIP: 10.96.0.10\n"), "{text}");
        assert!(
            !text.contains("ipFamilies") && !text.contains("clusterIPs"),
            "{text}"
        );
        let old = service("a", "10.96.0.10", &[("http", 80, "TCP", "8080")], "a");
        assert!(!old.contains("ipFamilies"), "{old}");
    }

    #[test]
    fn dual_stack_and_ipv6_only_services_carry_the_family_fields() {
        let ports = vec![SvcPort::new("http", 80, "TCP", "8080")];
        let dual = Svc::cluster_ip("d", addr::DEMO_VIP, ports.clone())
            .dual_stack(addr::DEMO_VIP6.into(), IpFamilyPolicy::RequireDualStack);
        let spec = parse_service(&dual.render()).spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(strings(spec.cluster_ips), ["10.96.0.10", "fd00:10:96::10"]);
        assert_eq!(strings(spec.ip_families), ["IPv4", "IPv6"]);
        assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));

        let v6_first = Svc::cluster_ip6("e", addr::DEMO_VIP6, ports.clone())
            .dual_stack(addr::DEMO_VIP.into(), IpFamilyPolicy::PreferDualStack);
        let spec = parse_service(&v6_first.render()).spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:10:96::10"));
        assert_eq!(strings(spec.cluster_ips), ["fd00:10:96::10", "10.96.0.10"]);
        assert_eq!(strings(spec.ip_families), ["IPv6", "IPv4"]);

        let v6 = Svc::cluster_ip6("f", addr::EMPTY_VIP6, ports);
        let spec = parse_service(&v6.render()).spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:10:96::11"));
        assert_eq!(strings(spec.cluster_ips), ["fd00:10:96::11"]);
        assert_eq!(strings(spec.ip_families), ["IPv6"]);
        assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));

        let headless = Svc {
            cluster_ip6: None,
            ..Svc::cluster_ip6("h", addr::EMPTY_VIP6, Vec::new())
        };
        let spec = parse_service(&headless.render()).spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(strings(spec.cluster_ips), ["None"]);

        // The function-style builder writes an IPv6 cluster IP as an
        // IPv6-only Service too.
        let text = service("g", "fd00:10:96::12", &[("http", 80, "TCP", "8080")], "g");
        let spec = service_spec(&text);
        assert_eq!(strings(spec.ip_families), ["IPv6"]);
        assert_eq!(strings(spec.cluster_ips), ["fd00:10:96::12"]);
    }

    fn service_spec(text: &str) -> k8s_openapi::api::core::v1::ServiceSpec {
        parse_service(text).spec.unwrap()
    }

    #[test]
    fn slices_take_the_family_of_their_addresses() {
        let slice =
            |text: &str| -> EndpointSlice { serde_yaml::from_value(docs(text).remove(0)).unwrap() };
        let eps6 = [(addr::backend_ip6(0), "backend-0".to_string(), true)];
        let s = slice(&endpoint_slice("x", "x", &[("http", 8080, "TCP")], &eps6));
        assert_eq!(s.address_type, "IPv6");
        assert_eq!(s.endpoints[0].addresses, ["fd00:10:244:10::2"]);
        let eps4 = [(addr::backend_ip(0), "backend-0".to_string(), true)];
        let s = slice(&endpoint_slice("x", "x", &[("http", 8080, "TCP")], &eps4));
        assert_eq!(s.address_type, "IPv4");

        let mut rendered = Slice {
            name: "y".into(),
            service: "y".into(),
            ports: vec![("http".into(), 8080, "TCP".into())],
            endpoints: vec![SliceEndpoint {
                ip: addr::backend_ip6(1).into(),
                node: crate::LAB_NODE.into(),
                ready: true,
                serving: true,
                terminating: false,
            }],
            labels: Vec::new(),
        };
        let s = slice(&rendered.render());
        assert_eq!(s.address_type, "IPv6");
        assert_eq!(s.endpoints[0].addresses, ["fd00:10:244:11::2"]);
        rendered.endpoints.clear();
        assert_eq!(slice(&rendered.render()).address_type, "IPv4");
    }
}
