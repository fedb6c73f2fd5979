//! Manifest text for lab tests, the same shape as `manifests/examples/demo.yaml`.

use std::fmt::Write;
use std::net::Ipv4Addr;

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
  clusterIP: {cluster_ip}
  selector:
    app: {selector_app}
  ports:
"
    );
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
/// `(address, pod name, ready)`.
pub fn endpoint_slice(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(Ipv4Addr, String, bool)],
) -> String {
    let on_lab_node: Vec<NodeEndpoint> = endpoints
        .iter()
        .map(|(ip, pod, ready)| NodeEndpoint {
            ip: *ip,
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
    pub ip: Ipv4Addr,
    pub pod: String,
    pub ready: bool,
    pub node: String,
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
addressType: IPv4
ports:
"
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
pub fn node_endpoint_service(service: &Svc, node_ip: Ipv4Addr, node: &str) -> String {
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
            ip: node_ip,
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
    /// `None` for headless or ExternalName.
    pub cluster_ip: Option<Ipv4Addr>,
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
        match (&self.external_name, self.cluster_ip) {
            (Some(name), _) => {
                let _ = writeln!(s, "  externalName: {name}");
            }
            (None, Some(ip)) => {
                let _ = writeln!(s, "  clusterIP: {ip}");
            }
            (None, None) => s.push_str("  clusterIP: None\n"),
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
    pub ip: Ipv4Addr,
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
        s.push_str("addressType: IPv4\nports:\n");
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
