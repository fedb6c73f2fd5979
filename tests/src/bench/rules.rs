//! The benchmark's services and the text each peer is programmed from: one
//! list of services ([`services`]) rendered as Kubernetes manifests (for
//! our agent), as a kube-proxy iptables-mode `iptables-restore` file, and as
//! a kube-proxy nftables-mode `nft -f` file.
//!
//! Service `i` is `svc-<i>` with ClusterIP [`vip`]`(i)`, port `http` 80/TCP
//! -> targetPort 8080, and the lab's backend pods as its endpoints. The
//! measured target is the last service, which is also last in rule order;
//! it alone also has `dns` 53/UDP -> 5353 (same endpoints, for the UDP
//! trials) and `iperf` 5201/TCP -> 5201 whose own EndpointSlice holds one
//! endpoint: iperf3 opens a control and a data connection, and with three
//! endpoints they would land on different servers.
//!
//! The NodePort measurement's services ([`node_port_services`]) are the
//! same ClusterIP services with `http` only; the last
//! `min(n, `[`MAX_NODE_PORTS`]`)` are of type NodePort, with node ports
//! 30000, 30001, ... in service order (so the target is again last in every
//! rule list). A cluster's default NodePort range holds no more than
//! [`MAX_NODE_PORTS`] TCP node ports, so above that N the rest stay
//! ClusterIP-only, as they would in a real cluster: their ClusterIP rules
//! still come first in kube-proxy's KUBE-SERVICES chain.
//!
//! The same services exist for IPv6 ([`services6`], VIPs [`vip6`], the lab
//! pods' IPv6 addresses as endpoints): kube-proxy runs one proxier per
//! family, so the renderers write the rules of the services' family, an
//! `ip6tables-restore` file or an `ip6` nftables table in the shapes
//! kube-proxy writes for IPv6 Services.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::addr::{FamilyAddr, IpFamily};
use crate::yaml::{self, NodeEndpoint};
use crate::{addr, backend_name};

/// Service port and the backends' port.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The target service's UDP port and the backends' UDP server port.
pub const UDP_SERVICE_PORT: u16 = 53;
pub const UDP_TARGET_PORT: u16 = 5353;
/// The target service's iperf3 port (service port = target port).
pub const IPERF_PORT: u16 = 5201;
/// The first node port (kube-apiserver's default range is 30000-32767).
pub const FIRST_NODE_PORT: u16 = 30_000;
/// Node ports in the default range, so most NodePort services with one TCP
/// port each.
pub const MAX_NODE_PORTS: usize = 32_767 - FIRST_NODE_PORT as usize + 1;

/// ClusterIP of service `i`: 10.96.0.0 + 256 × (1 + i / 250) + 1 + i % 250
/// (10.96.(1 + i / 250).(1 + i % 250) below 63,750 services, then on into
/// 10.97.x.y), inside the default service CIDR 10.96.0.0/12 and clear of the
/// lab's demo VIPs (10.96.0.x).
pub fn vip(i: usize) -> Ipv4Addr {
    let offset = 256 * (1 + i / 250) + 1 + i % 250;
    assert!(
        offset < 1 << 20,
        "service index {i} too large for 10.96.0.0/12"
    );
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + offset as u32)
}

/// ClusterIP of IPv6 service `i`: fd00:10:96::1:0 + i, in
/// [`addr::SERVICE_CIDR6`] and clear of the lab's IPv6 VIPs (below
/// fd00:10:96::1:0).
pub fn vip6(i: usize) -> Ipv6Addr {
    let offset = 0x1_0000 + i;
    assert!(
        offset < 1 << 20,
        "service index {i} too large for the IPv6 service CIDR"
    );
    addr::service_ip6(offset as u32)
}

/// One benchmark service, IPv4 unless `A` is `Ipv6Addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchService<A = Ipv4Addr> {
    pub name: String,
    pub vip: A,
    /// Endpoint addresses (port [`TARGET_PORT`], and [`UDP_TARGET_PORT`]
    /// when `udp`).
    pub endpoints: Vec<A>,
    /// Also serves `dns` [`UDP_SERVICE_PORT`]/UDP on `endpoints`.
    pub udp: bool,
    /// Also serves `iperf` [`IPERF_PORT`]/TCP on this one endpoint.
    pub iperf: Option<A>,
    /// Type NodePort (externalTrafficPolicy Cluster) with this node port on
    /// `http`.
    pub node_port: Option<u16>,
}

/// `n` services, each with endpoints `backends` (the lab's backend pods
/// 0..backends); the last also has the UDP port and the iperf3 port (on
/// backend 0).
pub fn services(n: usize, backends: usize) -> Vec<BenchService> {
    services_with(n, vip, (0..backends).map(addr::backend_ip).collect())
}

/// [`services`] over IPv6: VIPs [`vip6`], the backends' IPv6 addresses.
pub fn services6(n: usize, backends: usize) -> Vec<BenchService<Ipv6Addr>> {
    services_with(n, vip6, (0..backends).map(addr::backend_ip6).collect())
}

fn services_with<A: FamilyAddr>(
    n: usize,
    vip: fn(usize) -> A,
    endpoints: Vec<A>,
) -> Vec<BenchService<A>> {
    (0..n)
        .map(|i| BenchService {
            name: format!("svc-{i:05}"),
            vip: vip(i),
            endpoints: endpoints.clone(),
            udp: i + 1 == n,
            iperf: endpoints.first().copied().filter(|_| i + 1 == n),
            node_port: None,
        })
        .collect()
}

/// `n` services with `http` only, each with `endpoints`; the last
/// `min(n, MAX_NODE_PORTS)` are NodePort services with node ports 30000,
/// 30001, ... in order (see the module docs).
pub fn node_port_services(n: usize, endpoints: &[Ipv4Addr]) -> Vec<BenchService> {
    let first = n.saturating_sub(MAX_NODE_PORTS);
    (0..n)
        .map(|i| BenchService {
            name: format!("svc-{i:05}"),
            vip: vip(i),
            endpoints: endpoints.to_vec(),
            udp: false,
            iperf: None,
            node_port: (i >= first).then(|| FIRST_NODE_PORT + (i - first) as u16),
        })
        .collect()
}

/// One service port as the rule renderers see it.
struct PortSpec<'a, A> {
    name: &'static str,
    /// `tcp` or `udp`.
    proto: &'static str,
    port: u16,
    target: u16,
    endpoints: &'a [A],
    node_port: Option<u16>,
}

fn port_specs<A: FamilyAddr>(s: &BenchService<A>) -> Vec<PortSpec<'_, A>> {
    let mut out = vec![PortSpec {
        name: "http",
        proto: "tcp",
        port: SERVICE_PORT,
        target: TARGET_PORT,
        endpoints: &s.endpoints,
        node_port: s.node_port,
    }];
    if s.udp {
        out.push(PortSpec {
            name: "dns",
            proto: "udp",
            port: UDP_SERVICE_PORT,
            target: UDP_TARGET_PORT,
            endpoints: &s.endpoints,
            node_port: None,
        });
    }
    if let Some(ep) = &s.iperf {
        out.push(PortSpec {
            name: "iperf",
            proto: "tcp",
            port: IPERF_PORT,
            target: IPERF_PORT,
            endpoints: std::slice::from_ref(ep),
            node_port: None,
        });
    }
    out
}

/// A stable 16-character upper-case tag, as kube-proxy derives chain names
/// from a hash of the service port (FNV-1a, base32 alphabet).
fn hash_tag(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut x = h;
    for _ in 0..16 {
        out.push(ALPHABET[(x & 31) as usize] as char);
        x = x.rotate_right(5) ^ (h >> 7);
    }
    out
}

fn svc_port_name<A>(s: &BenchService<A>, port: &str) -> String {
    format!("default/{}:{port}", s.name)
}

/// The lab pod name of a backend address (10.244.(10+i).2 or its IPv6
/// twin).
fn pod_name<A: FamilyAddr>(ip: A) -> String {
    backend_name(addr::backend_index(ip.into()).expect("a lab backend address"))
}

/// All services as one multi-document manifest (Service + EndpointSlice
/// each), in service order, endpoints on the one-node lab's node.
pub fn manifest<A: FamilyAddr>(services: &[BenchService<A>]) -> String {
    manifest_on(services, crate::LAB_NODE, &pod_name)
}

/// [`manifest`] with every endpoint on node `node`, its pod named by
/// `pod_name`.
pub fn manifest_on<A: FamilyAddr>(
    services: &[BenchService<A>],
    node: &str,
    pod_name: &dyn Fn(A) -> String,
) -> String {
    let endpoint = |ip: A| NodeEndpoint {
        ip: ip.into(),
        pod: pod_name(ip),
        ready: true,
        node: node.to_string(),
    };
    let mut out = String::new();
    let udp_target = UDP_TARGET_PORT.to_string();
    let iperf_target = IPERF_PORT.to_string();
    for s in services {
        let mut ports = vec![("http", SERVICE_PORT, "TCP", "8080")];
        let mut slice_ports = vec![("http", TARGET_PORT, "TCP")];
        if s.udp {
            ports.push(("dns", UDP_SERVICE_PORT, "UDP", udp_target.as_str()));
            slice_ports.push(("dns", UDP_TARGET_PORT, "UDP"));
        }
        if s.iperf.is_some() {
            ports.push(("iperf", IPERF_PORT, "TCP", iperf_target.as_str()));
        }
        let svc = match s.node_port {
            // Only `http` has a node port (NodePort services have no UDP or
            // iperf port here).
            Some(np) => {
                assert_eq!(
                    ports.len(),
                    1,
                    "{}: a NodePort service has http only",
                    s.name
                );
                let with_node_ports: Vec<_> = ports.iter().map(|&p| (p, np)).collect();
                yaml::node_port_service(&s.name, &s.vip.to_string(), &with_node_ports, &s.name)
            }
            None => yaml::service(&s.name, &s.vip.to_string(), &ports, &s.name),
        };
        let eps: Vec<_> = s.endpoints.iter().map(|&ip| endpoint(ip)).collect();
        let slice =
            yaml::endpoint_slice_on_nodes(&format!("{}-x", s.name), &s.name, &slice_ports, &eps);
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&svc);
        out.push_str("---\n");
        out.push_str(&slice);
        if let Some(ep) = s.iperf {
            out.push_str("---\n");
            out.push_str(&yaml::endpoint_slice_on_nodes(
                &format!("{}-iperf", s.name),
                &s.name,
                &[("iperf", IPERF_PORT, "TCP")],
                &[endpoint(ep)],
            ));
        }
    }
    out
}

/// What the rules of one family spell differently.
struct Syntax {
    /// An address's prefix length in iptables' `-d`/`-s` (`/32`, `/128`).
    host_len: u8,
    /// What kube-proxy adds to the KUBE-NODEPORTS jump: IPv6 node ports
    /// never answer on `::1`.
    iptables_no_localhost: &'static str,
    /// nftables table family and address match (`ip`, `ip6`).
    nft_family: &'static str,
    nft_addr_type: &'static str,
    nft_no_localhost: &'static str,
    nft_reject: &'static str,
}

fn syntax(family: IpFamily) -> Syntax {
    match family {
        IpFamily::V4 => Syntax {
            host_len: 32,
            iptables_no_localhost: "",
            nft_family: "ip",
            nft_addr_type: "ipv4_addr",
            nft_no_localhost: "ip daddr != 127.0.0.0/8",
            nft_reject: "reject with icmp type port-unreachable",
        },
        IpFamily::V6 => Syntax {
            host_len: 128,
            iptables_no_localhost: " ! -d ::1/128",
            nft_family: "ip6",
            nft_addr_type: "ipv6_addr",
            nft_no_localhost: "ip6 daddr != ::1",
            nft_reject: "reject with icmpv6 type port-unreachable",
        },
    }
}

/// `ip:port`, `[ip]:port` for IPv6, as kube-proxy writes endpoints.
fn host_port<A: FamilyAddr>(ip: A, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `iptables`, or `ip6tables` for IPv6.
pub fn iptables_program(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

/// The `iptables-restore` of `family` (`ip6tables-restore` for IPv6).
pub fn restore_program(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables-restore",
        IpFamily::V6 => "ip6tables-restore",
    }
}

/// The nftables family kube-proxy's table has for `family`.
pub fn nft_family(family: IpFamily) -> &'static str {
    syntax(family).nft_family
}

/// kube-proxy's iptables-mode nat table for `services` (the shape of
/// `pkg/proxy/iptables/proxier.go`): PREROUTING -> KUBE-SERVICES, one rule
/// per service port jumping to KUBE-SVC-*, which picks a KUBE-SEP-* with
/// `statistic --mode random`, which marks hairpin traffic for masquerade and
/// DNATs. With node ports, KUBE-SERVICES ends with the jump to
/// KUBE-NODEPORTS for local destinations, where one rule per node port
/// (`--dport`) jumps to KUBE-EXT-*, which marks for masquerade
/// (externalTrafficPolicy Cluster) and jumps to the service's KUBE-SVC-*.
/// For one `iptables-restore` (the whole nat table is replaced); for IPv6
/// services, for one `ip6tables-restore`.
pub fn iptables_restore<A: FamilyAddr>(services: &[BenchService<A>]) -> String {
    let syn = syntax(A::FAMILY);
    let len = syn.host_len;
    let mut chains = String::new();
    let mut rules = String::new();
    let mut node_port_rules = String::new();
    let mut ext_rules = String::new();
    for c in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE\n",
    );
    let mut svc_rules = String::new();
    let mut sep_rules = String::new();
    for s in services {
        for p in port_specs(s) {
            let port_name = svc_port_name(s, p.name);
            let proto = p.proto;
            let svc_chain = format!("KUBE-SVC-{}", hash_tag(&format!("{port_name}/{proto}")));
            let _ = writeln!(chains, ":{svc_chain} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -m comment --comment \"{port_name} cluster IP\" -d {}/{len} -p {proto} -m {proto} --dport {} -j {svc_chain}",
                s.vip, p.port
            );
            if let Some(np) = p.node_port {
                let ext_chain = format!("KUBE-EXT-{}", hash_tag(&format!("{port_name}/{proto}")));
                let _ = writeln!(chains, ":{ext_chain} - [0:0]");
                let _ = writeln!(
                    node_port_rules,
                    "-A KUBE-NODEPORTS -m comment --comment \"{port_name}\" -p {proto} -m {proto} --dport {np} -j {ext_chain}"
                );
                let _ = writeln!(
                    ext_rules,
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ\n\
                     -A {ext_chain} -j {svc_chain}"
                );
            }
            let n = p.endpoints.len();
            for (j, ep) in p.endpoints.iter().enumerate() {
                let sep_chain = format!(
                    "KUBE-SEP-{}",
                    hash_tag(&format!("{port_name}/{proto}/{ep}"))
                );
                let _ = writeln!(chains, ":{sep_chain} - [0:0]");
                let pick = if j + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.11}",
                        1.0 / (n - j) as f64
                    )
                } else {
                    String::new()
                };
                let dest = host_port(*ep, p.target);
                let _ = writeln!(
                    svc_rules,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {dest}\"{pick} -j {sep_chain}"
                );
                let _ = writeln!(
                    sep_rules,
                    "-A {sep_chain} -m comment --comment \"{port_name}\" -s {ep}/{len} -j KUBE-MARK-MASQ\n\
                     -A {sep_chain} -m comment --comment \"{port_name}\" -p {proto} -m {proto} -j DNAT --to-destination {dest}"
                );
            }
        }
    }
    if !node_port_rules.is_empty() {
        chains.push_str(":KUBE-NODEPORTS - [0:0]\n");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL{} -j KUBE-NODEPORTS",
            syn.iptables_no_localhost
        );
    }
    format!("*nat\n{chains}{rules}{node_port_rules}{ext_rules}{svc_rules}{sep_rules}COMMIT\n")
}

/// Name of the nftables table (kube-proxy's).
pub const NFT_TABLE: &str = "kube-proxy";

/// kube-proxy's nftables-mode table for `services` (the shape of
/// `pkg/proxy/nftables/proxier.go`): a `service-ips` verdict map keyed by
/// `daddr . l4proto . dport`, one chain per service choosing an endpoint
/// chain with `numgen random`, one chain per endpoint doing the DNAT. With
/// node ports, a `service-nodeports` verdict map keyed by
/// `l4proto . dport`, consulted for local destinations (`fib daddr type
/// local`), goes to one `external-*` chain per node port, which marks for
/// masquerade (externalTrafficPolicy Cluster) and goes to the service's
/// chain. One `nft -f` transaction; it deletes any previous copy of the
/// table first, which makes it the full resync too. IPv6 services get
/// kube-proxy's `ip6` table (its IPv6 proxier's), same names.
pub fn nft_script<A: FamilyAddr>(services: &[BenchService<A>]) -> String {
    let syn = syntax(A::FAMILY);
    let family = syn.nft_family;
    let mut elements = Vec::with_capacity(services.len());
    let mut node_port_elements = Vec::new();
    let mut chains = String::new();
    for s in services {
        for p in port_specs(s) {
            let port_name = svc_port_name(s, p.name);
            let proto = p.proto;
            let tag = hash_tag(&format!("{port_name}/{proto}"));
            let svc_chain = format!("service-{tag}-default-{}-{proto}-{}", s.name, p.name);
            elements.push(format!(
                "{} . {proto} . {} : goto {svc_chain}",
                s.vip, p.port
            ));
            if let Some(np) = p.node_port {
                let ext_chain = format!("external-{tag}-default-{}-{proto}-{}", s.name, p.name);
                node_port_elements.push(format!("{proto} . {np} : goto {ext_chain}"));
                let _ = writeln!(
                    chains,
                    "  chain {ext_chain} {{\n    jump mark-for-masquerade\n    goto {svc_chain}\n  }}"
                );
            }
            let mut arms = Vec::new();
            for (j, ep) in p.endpoints.iter().enumerate() {
                let ep_tag = hash_tag(&format!("{port_name}/{proto}/{ep}"));
                let ep_chain = format!(
                    "endpoint-{ep_tag}-default-{}-{proto}-{}-{j}",
                    s.name, p.name
                );
                arms.push(format!("{j} : goto {ep_chain}"));
                let _ = writeln!(
                    chains,
                    "  chain {ep_chain} {{\n    {family} saddr {ep} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {}\n  }}",
                    host_port(*ep, p.target)
                );
            }
            if arms.is_empty() {
                let _ = writeln!(
                    chains,
                    "  chain {svc_chain} {{\n    {}\n  }}",
                    syn.nft_reject
                );
            } else {
                let _ = writeln!(
                    chains,
                    "  chain {svc_chain} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
                    arms.len(),
                    arms.join(", ")
                );
            }
        }
    }
    let map_elements = if elements.is_empty() {
        String::new()
    } else {
        format!("\n    elements = {{ {} }}", elements.join(",\n      "))
    };
    let (node_port_map, node_port_rule) = if node_port_elements.is_empty() {
        (String::new(), String::new())
    } else {
        (
            format!(
                "  map service-nodeports {{\n    type inet_proto . inet_service : verdict\n    \
                 elements = {{ {} }}\n  }}\n",
                node_port_elements.join(",\n      ")
            ),
            format!(
                "\n    fib daddr type local {} meta l4proto . th dport vmap @service-nodeports",
                syn.nft_no_localhost
            ),
        )
    };
    format!(
        "table {family} {NFT_TABLE} {{}}\ndelete table {family} {NFT_TABLE}\n\
table {family} {NFT_TABLE} {{
  map service-ips {{
    type {} . inet_proto . inet_service : verdict{map_elements}
  }}
{node_port_map}  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }}
  chain mark-for-masquerade {{
    mark set mark or 0x4000
  }}
  chain masquerading {{
    mark and 0x4000 == 0 return
    mark set mark xor 0x4000
    masquerade fully-random
  }}
  chain services {{
    {family} daddr . meta l4proto . th dport vmap @service-ips{node_port_rule}
  }}
{chains}}}
",
        syn.nft_addr_type
    )
}

/// The objects of `services` as a real API server stores them (what
/// `kubectl apply` and the EndpointSlice controller leave): the
/// [`manifest`]'s Services and EndpointSlices with a uid, a creation time,
/// the `kubectl.kubernetes.io/last-applied-configuration` annotation,
/// `managedFields`, the slices' owner reference to their Service and their
/// endpoints' `targetRef`s and zone. A proxy reads none of these; a proxy
/// that keeps them pays for them.
pub fn api_objects(services: &[BenchService]) -> Vec<serde_json::Value> {
    use serde::Deserialize as _;
    use serde_json::{Value, json};
    let mut out = Vec::with_capacity(services.len() * 2);
    for (i, s) in services.iter().enumerate() {
        let text = manifest(std::slice::from_ref(s));
        let mut service_uid = String::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let Ok(mut object) = Value::deserialize(doc) else {
                continue;
            };
            if object.is_null() {
                continue;
            }
            let kind = object["kind"].as_str().unwrap_or_default().to_string();
            let uid = format!(
                "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
                i,
                out.len() % 0xffff,
                i % 0xfff,
                i * 7 + out.len()
            );
            let applied = object.to_string();
            let manager = if kind == "EndpointSlice" {
                "endpointslice-controller.k8s.io"
            } else {
                "kubectl-client-side-apply"
            };
            let managed = json!([{
                "manager": manager,
                "operation": "Update",
                "apiVersion": object["apiVersion"],
                "time": "2026-01-01T00:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(&object),
            }]);
            let meta = &mut object["metadata"];
            meta["uid"] = json!(uid);
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            meta["generation"] = json!(1);
            meta["managedFields"] = managed;
            if kind == "Service" {
                service_uid = uid;
                meta["annotations"] = json!({
                    "kubectl.kubernetes.io/last-applied-configuration": applied,
                });
            } else {
                meta["labels"]["endpointslice.kubernetes.io/managed-by"] =
                    json!("endpointslice-controller.k8s.io");
                meta["ownerReferences"] = json!([{
                    "apiVersion": "v1", "kind": "Service", "name": s.name,
                    "uid": service_uid, "controller": true, "blockOwnerDeletion": true,
                }]);
                if let Some(endpoints) = object["endpoints"].as_array_mut() {
                    for (j, endpoint) in endpoints.iter_mut().enumerate() {
                        endpoint["zone"] = json!("zone-a");
                        endpoint["targetRef"] = json!({
                            "kind": "Pod", "namespace": "default",
                            "name": format!("{}-pod-{j}", s.name),
                            "uid": format!("{:08x}-0000-4000-8000-{:012x}", i, j),
                        });
                    }
                }
            }
            out.push(object);
        }
    }
    out
}

/// The `fieldsV1` of a managed-fields entry owning every field of `value`
/// (`f:<name>` per key, `{}` at the leaves), as the API server records it.
fn fields_v1(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Map, Value};
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind"))
                .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(items) => Value::Object(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("i:{i}"), fields_v1(v)))
                .collect(),
        ),
        _ => Value::Object(Map::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every goto target is a defined chain, and the braces balance.
    fn assert_well_formed(text: &str) {
        for target in text.split("goto ").skip(1) {
            let name: String = target
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            assert!(text.contains(&format!("chain {name} {{")), "{name}");
        }
        let braces = text.matches('{').count() as i64 - text.matches('}').count() as i64;
        assert_eq!(braces, 0);
    }

    #[test]
    fn vips_are_distinct_and_in_the_service_cidr() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 1, 1));
        assert_eq!(vip(249), Ipv4Addr::new(10, 96, 1, 250));
        assert_eq!(vip(250), Ipv4Addr::new(10, 96, 2, 1));
        assert_eq!(vip(9_999), Ipv4Addr::new(10, 96, 40, 250));
        let all: std::collections::BTreeSet<_> = (0..10_000).map(vip).collect();
        assert_eq!(all.len(), 10_000);
    }

    #[test]
    fn iptables_text_for_two_services() {
        let text = iptables_restore(&services(2, 3));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        // 3 fixed chains; http: 2 KUBE-SVC + 6 KUBE-SEP; the target's dns:
        // 1 + 3, its iperf: 1 + 1.
        assert_eq!(lines.iter().filter(|l| l.starts_with(':')).count(), 17);
        let all_portals = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .count();
        assert_eq!(all_portals, 4);
        assert!(text.contains("-d 10.96.1.2/32 -p udp -m udp --dport 53 -j KUBE-SVC-"));
        assert!(text.contains("-p udp -m udp -j DNAT --to-destination 10.244.11.2:5353"));
        assert!(text.contains("-d 10.96.1.2/32 -p tcp -m tcp --dport 5201 -j KUBE-SVC-"));
        assert_eq!(text.matches("--to-destination 10.244.10.2:5201").count(), 1);
        let portal: Vec<_> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("--dport 80 "))
            .collect();
        assert_eq!(portal.len(), 2);
        assert!(portal[0].contains("-d 10.96.1.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-"));
        assert!(portal[1].contains("-d 10.96.1.2/32"), "target service last");
        let svc_chain = portal[1].rsplit(' ').next().unwrap();
        let picks: Vec<_> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {svc_chain} ")))
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(picks[0].contains("--probability 0.33333333333 -j KUBE-SEP-"));
        assert!(picks[1].contains("--probability 0.50000000000 -j KUBE-SEP-"));
        assert!(!picks[2].contains("statistic"));
        let dnat = lines
            .iter()
            .filter(|l| l.contains("-j DNAT --to-destination 10.244.12.2:8080"))
            .count();
        assert_eq!(dnat, 2);
        let masq = lines
            .iter()
            .filter(|l| l.contains("-s 10.244.10.2/32 -j KUBE-MARK-MASQ"))
            .count();
        assert_eq!(masq, 4, "http twice, dns, iperf");
        assert!(text.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        // Every jump target is declared.
        for l in &lines {
            if let Some(target) = l.split(" -j ").nth(1) {
                let target = target.split(' ').next().unwrap();
                if target.starts_with("KUBE-") {
                    assert!(text.contains(&format!(":{target} - [0:0]")), "{target}");
                }
            }
        }
    }

    #[test]
    fn nft_text_for_two_services() {
        let text = nft_script(&services(2, 3));
        assert!(text.starts_with("table ip kube-proxy {}\ndelete table ip kube-proxy\n"));
        assert!(text.contains("type ipv4_addr . inet_proto . inet_service : verdict"));
        assert!(text.contains("type nat hook prerouting priority dstnat; policy accept;"));
        assert!(text.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
        let elements: Vec<_> = text
            .lines()
            .filter(|l| l.contains(" . tcp . 80 : goto service-"))
            .collect();
        assert_eq!(elements.len(), 2);
        assert!(elements[0].contains("10.96.1.1 . tcp . 80"));
        assert!(elements[1].contains("10.96.1.2 . tcp . 80"));
        assert!(text.contains("10.96.1.2 . udp . 53 : goto service-"));
        assert!(text.contains("10.96.1.2 . tcp . 5201 : goto service-"));
        assert!(text.contains("meta l4proto udp dnat to 10.244.12.2:5353"));
        assert_eq!(text.matches("dnat to 10.244.10.2:5201").count(), 1);
        let numgen: Vec<_> = text
            .lines()
            .filter(|l| l.contains("numgen random mod 3 vmap"))
            .collect();
        assert_eq!(numgen.len(), 3, "2 http + 1 dns");
        assert!(
            numgen[0].contains("0 : goto endpoint-") && numgen[0].contains("2 : goto endpoint-")
        );
        assert_eq!(
            text.matches("meta l4proto tcp dnat to 10.244.11.2:8080")
                .count(),
            2
        );
        assert_eq!(
            text.matches("ip saddr 10.244.10.2 jump mark-for-masquerade")
                .count(),
            4,
            "http twice, dns, iperf"
        );
        assert_well_formed(&text);
    }

    #[test]
    fn manifest_for_two_services() {
        let text = manifest(&services(2, 3));
        assert_eq!(text.matches("kind: Service\n").count(), 2);
        assert!(text.contains("clusterIP: 10.96.1.2"));
        assert_eq!(text.matches("10.244.12.2").count(), 2);
        assert_eq!(text.matches("kind: EndpointSlice").count(), 2 + 1);
        assert_eq!(text.matches("protocol: UDP").count(), 2);
        assert!(text.contains("name: svc-00001-iperf"));
    }

    fn np_endpoints() -> Vec<Ipv4Addr> {
        vec![
            Ipv4Addr::new(10, 244, 128, 2),
            Ipv4Addr::new(10, 244, 129, 2),
        ]
    }

    #[test]
    fn node_ports_stay_in_the_default_range() {
        let few = node_port_services(3, &np_endpoints());
        let ports: Vec<_> = few.iter().map(|s| s.node_port).collect();
        assert_eq!(ports, [Some(30_000), Some(30_001), Some(30_002)]);
        assert!(few.iter().all(|s| !s.udp && s.iperf.is_none()));
        let many = node_port_services(MAX_NODE_PORTS + 2, &np_endpoints());
        assert_eq!(many[0].node_port, None);
        assert_eq!(many[1].node_port, None);
        assert_eq!(many[2].node_port, Some(30_000));
        assert_eq!(many.last().unwrap().node_port, Some(32_767));
    }

    #[test]
    fn iptables_text_with_node_ports() {
        let text = iptables_restore(&node_port_services(2, &np_endpoints()));
        let lines: Vec<&str> = text.lines().collect();
        assert!(text.contains(":KUBE-NODEPORTS - [0:0]\n"));
        let portals: Vec<_> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert_eq!(portals.len(), 3);
        assert!(
            portals[2].ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"),
            "the node-port jump is KUBE-SERVICES' last rule: {}",
            portals[2]
        );
        let node_ports: Vec<_> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS "))
            .collect();
        assert_eq!(node_ports.len(), 2);
        assert!(node_ports[1].contains("-p tcp -m tcp --dport 30001 -j KUBE-EXT-"));
        let ext = node_ports[1].rsplit(' ').next().unwrap();
        let ext_rules: Vec<_> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {ext} ")))
            .collect();
        assert_eq!(ext_rules.len(), 2);
        assert!(ext_rules[0].ends_with("-j KUBE-MARK-MASQ"));
        // The external chain goes to the same service chain as the
        // ClusterIP rule of that service.
        let svc = ext_rules[1].rsplit(' ').next().unwrap();
        assert!(portals[1].ends_with(&format!("-j {svc}")), "{}", portals[1]);
        assert_eq!(
            text.matches("-j DNAT --to-destination 10.244.129.2:8080")
                .count(),
            2
        );
        for l in &lines {
            if let Some(target) = l.split(" -j ").nth(1) {
                let target = target.split(' ').next().unwrap();
                if target.starts_with("KUBE-") {
                    assert!(text.contains(&format!(":{target} - [0:0]")), "{target}");
                }
            }
        }
        // Without node ports there is no KUBE-NODEPORTS at all.
        assert!(!iptables_restore(&services(2, 3)).contains("KUBE-NODEPORTS"));
    }

    #[test]
    fn nft_text_with_node_ports() {
        let text = nft_script(&node_port_services(2, &np_endpoints()));
        assert!(
            text.contains("map service-nodeports {\n    type inet_proto . inet_service : verdict")
        );
        assert!(text.contains(
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
        ));
        let element = text
            .lines()
            .find(|l| l.contains("tcp . 30001 : goto external-"))
            .expect("the target's node port element");
        let ext: String = element
            .split("goto ")
            .nth(1)
            .unwrap()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let body = text
            .split(&format!("chain {ext} {{"))
            .nth(1)
            .expect("external chain defined");
        let body = body.split('}').next().unwrap();
        assert!(body.contains("jump mark-for-masquerade"), "{body}");
        assert!(body.contains("goto service-"), "{body}");
        assert_well_formed(&text);
        assert!(!nft_script(&services(2, 3)).contains("service-nodeports"));
    }

    #[test]
    fn manifest_with_node_ports_on_a_cluster_node() {
        let text = manifest_on(&node_port_services(2, &np_endpoints()), "node-0", &|ip| {
            format!("pod-{}", ip.octets()[2])
        });
        assert_eq!(text.matches("type: NodePort\n").count(), 2);
        assert!(text.contains("    targetPort: 8080\n    nodePort: 30001\n"));
        assert_eq!(text.matches("nodeName: node-0").count(), 4);
        assert!(text.contains("name: pod-129"));
        assert!(!text.contains("protocol: UDP"));
    }

    #[test]
    fn vips6_are_distinct_and_in_the_service_cidr() {
        assert_eq!(vip6(0).to_string(), "fd00:10:96::1:0");
        assert_eq!(vip6(99_999).to_string(), "fd00:10:96::2:869f");
        let all: std::collections::BTreeSet<_> = (0..100_000).map(vip6).collect();
        assert_eq!(all.len(), 100_000);
        assert!(!all.contains(&addr::DEMO_VIP6));
    }

    #[test]
    fn ip6tables_text_for_two_services() {
        let text = iptables_restore(&services6(2, 3));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert_eq!(lines.iter().filter(|l| l.starts_with(':')).count(), 17);
        assert!(
            text.contains("-d fd00:10:96::1:1/128 -p udp -m udp --dport 53 -j KUBE-SVC-"),
            "{text}"
        );
        assert!(text.contains("-d fd00:10:96::1:0/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-"));
        assert!(text.contains("-p udp -m udp -j DNAT --to-destination [fd00:10:244:11::2]:5353"));
        assert!(text.contains("default/svc-00001:http -> [fd00:10:244:12::2]:8080\""));
        assert_eq!(
            text.matches("-s fd00:10:244:10::2/128 -j KUBE-MARK-MASQ")
                .count(),
            4,
            "http twice, dns, iperf"
        );
        assert!(!text.contains("/32"), "{text}");
        // Node ports: never on ::1, as kube-proxy's IPv6 proxier.
        let mut np = services6(2, 3);
        np[1].node_port = Some(30_001);
        let text = iptables_restore(&np);
        assert!(text.contains("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS\n"));
        assert!(text.contains("-p tcp -m tcp --dport 30001 -j KUBE-EXT-"));
    }

    #[test]
    fn nft_ip6_text_for_two_services() {
        let text = nft_script(&services6(2, 3));
        assert!(text.starts_with("table ip6 kube-proxy {}\ndelete table ip6 kube-proxy\n"));
        assert!(text.contains("type ipv6_addr . inet_proto . inet_service : verdict"));
        assert!(text.contains("ip6 daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(text.contains("fd00:10:96::1:0 . tcp . 80 : goto service-"));
        assert!(text.contains("fd00:10:96::1:1 . udp . 53 : goto service-"));
        assert!(text.contains("meta l4proto udp dnat to [fd00:10:244:12::2]:5353"));
        assert_eq!(
            text.matches("ip6 saddr fd00:10:244:10::2 jump mark-for-masquerade")
                .count(),
            4
        );
        assert!(!text.contains("ip saddr") && !text.contains("ip daddr"));
        assert_well_formed(&text);
        let mut np = services6(2, 3);
        np[1].node_port = Some(30_001);
        np[0].endpoints.clear();
        let text = nft_script(&np);
        assert!(text.contains(
            "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports"
        ));
        assert!(text.contains("reject with icmpv6 type port-unreachable"));
        assert_well_formed(&text);
    }

    #[test]
    fn manifest6_lists_ipv6_services_and_slices() {
        let text = manifest(&services6(2, 3));
        assert_eq!(text.matches("ipFamilies: [IPv6]").count(), 2);
        assert!(text.contains("clusterIP: fd00:10:96::1:1\n"));
        assert_eq!(text.matches("addressType: IPv6").count(), 3);
        assert_eq!(text.matches("\"fd00:10:244:12::2\"").count(), 2);
        assert!(text.contains("name: backend-2"));
    }

    /// Loads `services`' rules of both peers into a namespace of their own,
    /// as the benchmark does, lists them back, and removes them: the kernel
    /// and the tools accept every line of them.
    fn loads_and_unloads<A: FamilyAddr>(services: &[BenchService<A>]) {
        use crate::bench::peers::{Peer, StagedRules, remove_family_rules};
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-rules{n}", std::process::id());
        let ns = crate::Netns::create(&format!("kep-{id}")).expect("namespace (needs root)");
        let dir = crate::TempDir::create(std::env::temp_dir().join(format!("kep-{id}"))).unwrap();
        let family = nft_family(A::FAMILY);
        for peer in [Peer::Iptables, Peer::Nftables] {
            StagedRules::write(&dir.0, peer, services)
                .and_then(|r| r.apply(&ns))
                .unwrap_or_else(|e| panic!("{peer} rules for {:?}: {e:#}", A::FAMILY));
            let listed = ns.exec("nft", &["list", "ruleset", family]).unwrap();
            let last = services.last().unwrap();
            assert!(listed.contains(&last.vip.to_string()), "{peer}:\n{listed}");
            // As the kernel has it (IPv6 in brackets), not as we wrote it.
            let dnat = SocketAddr::new(last.endpoints[0].into(), TARGET_PORT);
            assert!(
                listed.contains(&format!("dnat to {dnat}")),
                "{peer}:\n{listed}"
            );
            remove_family_rules(&ns, peer, A::FAMILY).unwrap();
            let left = ns.exec("nft", &["list", "ruleset"]).unwrap();
            assert!(!left.contains("dnat"), "{peer} left rules:\n{left}");
        }
    }

    #[test]
    fn both_families_rules_load_in_a_kernel() {
        loads_and_unloads(&services(3, 3));
        loads_and_unloads(&services6(3, 3));
        let mut np = services6(2, 2);
        np[1].node_port = Some(30_001);
        loads_and_unloads(&np);
    }
}
