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

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::{addr, backend_name, yaml};

/// Service port and the backends' port.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The target service's UDP port and the backends' UDP server port.
pub const UDP_SERVICE_PORT: u16 = 53;
pub const UDP_TARGET_PORT: u16 = 5353;
/// The target service's iperf3 port (service port = target port).
pub const IPERF_PORT: u16 = 5201;

/// ClusterIP of service `i`: 10.96.(1 + i / 250).(1 + i % 250), inside the
/// default service CIDR and clear of the lab's demo VIPs (10.96.0.x).
pub fn vip(i: usize) -> Ipv4Addr {
    assert!(i < 250 * 200, "service index {i} too large");
    Ipv4Addr::new(10, 96, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// One benchmark service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchService {
    pub name: String,
    pub vip: Ipv4Addr,
    /// Endpoint addresses (port [`TARGET_PORT`], and [`UDP_TARGET_PORT`]
    /// when `udp`).
    pub endpoints: Vec<Ipv4Addr>,
    /// Also serves `dns` [`UDP_SERVICE_PORT`]/UDP on `endpoints`.
    pub udp: bool,
    /// Also serves `iperf` [`IPERF_PORT`]/TCP on this one endpoint.
    pub iperf: Option<Ipv4Addr>,
}

/// `n` services, each with endpoints `backends` (the lab's backend pods
/// 0..backends); the last also has the UDP port and the iperf3 port (on
/// backend 0).
pub fn services(n: usize, backends: usize) -> Vec<BenchService> {
    (0..n)
        .map(|i| BenchService {
            name: format!("svc-{i:05}"),
            vip: vip(i),
            endpoints: (0..backends).map(addr::backend_ip).collect(),
            udp: i + 1 == n,
            iperf: (i + 1 == n).then(|| addr::backend_ip(0)),
        })
        .collect()
}

/// One service port as the rule renderers see it.
struct PortSpec<'a> {
    name: &'static str,
    /// `tcp` or `udp`.
    proto: &'static str,
    port: u16,
    target: u16,
    endpoints: &'a [Ipv4Addr],
}

fn port_specs(s: &BenchService) -> Vec<PortSpec<'_>> {
    let mut out = vec![PortSpec {
        name: "http",
        proto: "tcp",
        port: SERVICE_PORT,
        target: TARGET_PORT,
        endpoints: &s.endpoints,
    }];
    if s.udp {
        out.push(PortSpec {
            name: "dns",
            proto: "udp",
            port: UDP_SERVICE_PORT,
            target: UDP_TARGET_PORT,
            endpoints: &s.endpoints,
        });
    }
    if let Some(ep) = &s.iperf {
        out.push(PortSpec {
            name: "iperf",
            proto: "tcp",
            port: IPERF_PORT,
            target: IPERF_PORT,
            endpoints: std::slice::from_ref(ep),
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

fn svc_port_name(s: &BenchService, port: &str) -> String {
    format!("default/{}:{port}", s.name)
}

/// The lab pod name of a backend address 10.244.(10+i).2.
fn pod_name(ip: Ipv4Addr) -> String {
    backend_name(usize::from(ip.octets()[2]).saturating_sub(10))
}

/// All services as one multi-document manifest (Service + EndpointSlice
/// each), in service order.
pub fn manifest(services: &[BenchService]) -> String {
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
        let svc = yaml::service(&s.name, &s.vip.to_string(), &ports, &s.name);
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .map(|ip| (*ip, pod_name(*ip), true))
            .collect();
        let slice = yaml::endpoint_slice(&format!("{}-x", s.name), &s.name, &slice_ports, &eps);
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&svc);
        out.push_str("---\n");
        out.push_str(&slice);
        if let Some(ep) = s.iperf {
            out.push_str("---\n");
            out.push_str(&yaml::endpoint_slice(
                &format!("{}-iperf", s.name),
                &s.name,
                &[("iperf", IPERF_PORT, "TCP")],
                &[(ep, pod_name(ep), true)],
            ));
        }
    }
    out
}

/// kube-proxy's iptables-mode nat table for `services` (the shape of
/// `pkg/proxy/iptables/proxier.go`): PREROUTING -> KUBE-SERVICES, one rule
/// per service port jumping to KUBE-SVC-*, which picks a KUBE-SEP-* with
/// `statistic --mode random`, which marks hairpin traffic for masquerade and
/// DNATs. For one `iptables-restore` (the whole nat table is replaced).
pub fn iptables_restore(services: &[BenchService]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
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
                "-A KUBE-SERVICES -m comment --comment \"{port_name} cluster IP\" -d {}/32 -p {proto} -m {proto} --dport {} -j {svc_chain}",
                s.vip, p.port
            );
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
                let _ = writeln!(
                    svc_rules,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {ep}:{}\"{pick} -j {sep_chain}",
                    p.target
                );
                let _ = writeln!(
                    sep_rules,
                    "-A {sep_chain} -m comment --comment \"{port_name}\" -s {ep}/32 -j KUBE-MARK-MASQ\n\
                     -A {sep_chain} -m comment --comment \"{port_name}\" -p {proto} -m {proto} -j DNAT --to-destination {ep}:{}",
                    p.target
                );
            }
        }
    }
    format!("*nat\n{chains}{rules}{svc_rules}{sep_rules}COMMIT\n")
}

/// Name of the nftables table (kube-proxy's).
pub const NFT_TABLE: &str = "kube-proxy";

/// kube-proxy's nftables-mode table for `services` (the shape of
/// `pkg/proxy/nftables/proxier.go`): a `service-ips` verdict map keyed by
/// `daddr . l4proto . dport`, one chain per service choosing an endpoint
/// chain with `numgen random`, one chain per endpoint doing the DNAT. One
/// `nft -f` transaction; it deletes any previous copy of the table first,
/// which makes it the full resync too.
pub fn nft_script(services: &[BenchService]) -> String {
    let mut elements = Vec::with_capacity(services.len());
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
                    "  chain {ep_chain} {{\n    ip saddr {ep} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {ep}:{}\n  }}",
                    p.target
                );
            }
            if arms.is_empty() {
                let _ = writeln!(
                    chains,
                    "  chain {svc_chain} {{\n    reject with icmp type port-unreachable\n  }}"
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
    format!(
        "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n\
table ip {NFT_TABLE} {{
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict{map_elements}
  }}
  chain nat-prerouting {{
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
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
{chains}}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Every goto target is a defined chain.
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
    fn manifest_for_two_services() {
        let text = manifest(&services(2, 3));
        assert_eq!(text.matches("kind: Service\n").count(), 2);
        assert!(text.contains("clusterIP: 10.96.1.2"));
        assert_eq!(text.matches("10.244.12.2").count(), 2);
        assert_eq!(text.matches("kind: EndpointSlice").count(), 2 + 1);
        assert_eq!(text.matches("protocol: UDP").count(), 2);
        assert!(text.contains("name: svc-00001-iperf"));
    }
}
