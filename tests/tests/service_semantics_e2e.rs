//! kube-proxy's Service semantics for cluster traffic, end to end: real TCP
//! and UDP from lab pods through the real agent and datapath. Each case
//! mirrors a packet-flow case of kube-proxy's nftables proxier tests.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::addr::{DEMO_VIP, DNS_PORT, HTTP_PORT, backend_ip};
use lab::loadgen::{self, ErrorKind, Report};
use lab::servers::Servers;
use lab::{Agent, LAB_NODE, Lab, backend_name, yaml};

const PER_REQUEST: Duration = Duration::from_secs(2);
const BATCH_DEADLINE: Duration = Duration::from_secs(60);
const AGENT_READY: Duration = Duration::from_secs(30);
/// How long a dropped connection attempt is given before it counts as
/// "no answer": far above the lab's sub-millisecond round trip.
const SILENCE: Duration = Duration::from_millis(700);

fn start<'l>(lab: &'l Lab, manifests: &[(&str, String)]) -> Agent<'l> {
    for (name, text) in manifests {
        lab.write_manifest(name, text).unwrap();
    }
    let agent = lab.start_agent(&lab.manifest_dir()).expect("start agent");
    agent
        .wait_for_log("datapath programmed", AGENT_READY)
        .expect("agent programs the datapath");
    agent
}

fn assert_clean(r: &Report, agent: &Agent<'_>) {
    assert_eq!(r.error_count(), 0, "{r}\nagent:\n{}", agent.log_tail(30));
    assert_eq!(r.ok, r.requested, "{r}");
}

fn refused_tcp(lab: &Lab, target: SocketAddrV4) -> loadgen::Probe {
    lab.client()
        .run(move || loadgen::tcp_probe(target, SILENCE))
}

fn refused_udp(lab: &Lab, target: SocketAddrV4) -> loadgen::Probe {
    lab.client()
        .run(move || loadgen::udp_connected_request(target, SILENCE))
}

/// An EndpointSlice with explicit `nodeName`s and conditions:
/// `(backend index, node, ready, serving, terminating)`.
fn slice_with_nodes(
    name: &str,
    service: &str,
    port: (&str, u16, &str),
    endpoints: &[(usize, &str, bool, bool, bool)],
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
- name: {}
  port: {}
  protocol: {}
endpoints:
",
        port.0, port.1, port.2
    );
    for (i, node, ready, serving, terminating) in endpoints {
        s.push_str(&format!(
            "- addresses: [\"{}\"]
  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}
  nodeName: {node}
",
            backend_ip(*i)
        ));
    }
    s
}

#[test]
fn named_target_port_resolves_per_endpoint_slice() {
    let lab = Lab::new().unwrap();
    // backend-2 serves the "http" port on another number than the others,
    // as pods of two versions of a Deployment can.
    let mut alt = Servers::new();
    let alt_index = alt
        .start(lab.backend(2), "backend-2-alt", 9090, 9353)
        .unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    let agent = start(
        &lab,
        &[
            (
                "web.yaml",
                yaml::service(
                    "web",
                    &vip.to_string(),
                    &[("http", 80, "TCP", "http")],
                    "web",
                ),
            ),
            (
                "web-a.yaml",
                slice_with_nodes(
                    "web-a",
                    "web",
                    ("http", 8080, "TCP"),
                    &[
                        (0, LAB_NODE, true, true, false),
                        (1, LAB_NODE, true, true, false),
                    ],
                ),
            ),
            (
                "web-b.yaml",
                slice_with_nodes(
                    "web-b",
                    "web",
                    ("http", 9090, "TCP"),
                    &[(2, LAB_NODE, true, true, false)],
                ),
            ),
        ],
    );
    let target = SocketAddrV4::new(vip, 80);
    let r = lab
        .client()
        .run(move || loadgen::tcp_requests(target, 300, PER_REQUEST, BATCH_DEADLINE));
    assert_clean(&r, &agent);
    for name in ["backend-0", "backend-1", "backend-2-alt"] {
        assert!(r.share(name) > 0.15, "{name} got too little: {r}");
    }
    assert_eq!(r.count("backend-2"), 0, "backend-2 reached on 8080: {r}");
    assert!(alt.stats(alt_index).unwrap().snapshot().tcp_connections > 0);
    alt.stop();
}

#[test]
fn ports_and_protocols_a_cluster_ip_does_not_serve_are_rejected() {
    let lab = Lab::new().unwrap();
    let other = Ipv4Addr::new(10, 96, 0, 30);
    let _agent = start(
        &lab,
        &[
            ("demo.yaml", yaml::demo(&[0, 1, 2])),
            (
                "other.yaml",
                yaml::service(
                    "other",
                    &other.to_string(),
                    &[("https", 8443, "TCP", "8080")],
                    "x",
                ) + "---\n"
                    + &yaml::endpoint_slice(
                        "other-lab",
                        "other",
                        &[("https", 8080, "TCP")],
                        &[(backend_ip(0), backend_name(0), true)],
                    ),
            ),
        ],
    );
    let probes = [
        // The TCP-only port does not match UDP, the UDP-only port not TCP.
        (
            "UDP to a TCP port",
            refused_udp(&lab, SocketAddrV4::new(DEMO_VIP, HTTP_PORT)),
        ),
        (
            "TCP to a UDP port",
            refused_tcp(&lab, SocketAddrV4::new(DEMO_VIP, DNS_PORT)),
        ),
        // A port of one Service does not match on another Service's IP.
        (
            "svc2's port on svc1",
            refused_tcp(&lab, SocketAddrV4::new(DEMO_VIP, 8443)),
        ),
        (
            "svc1's port on svc2",
            refused_tcp(&lab, SocketAddrV4::new(other, HTTP_PORT)),
        ),
    ];
    for (what, p) in &probes {
        assert_eq!(p.error_kind(), Some(ErrorKind::Refused), "{what}: {p:?}");
        assert!(
            p.elapsed < Duration::from_millis(200),
            "{what}: refused slowly: {p:?}"
        );
    }
    // And the ports that exist still work.
    let ok = lab
        .client()
        .run(move || loadgen::tcp_probe(SocketAddrV4::new(other, 8443), PER_REQUEST));
    assert_eq!(ok.result.as_deref().ok(), Some("backend-0"), "{ok:?}");
}

#[test]
fn unallocated_service_cidr_address_is_dropped_not_rejected() {
    let lab = Lab::new().unwrap();
    let _agent = start(&lab, &[("demo.yaml", yaml::demo(&[0, 1, 2]))]);
    let nowhere = Ipv4Addr::new(10, 96, 9, 9);
    let p = refused_tcp(&lab, SocketAddrV4::new(nowhere, HTTP_PORT));
    assert_eq!(p.error_kind(), Some(ErrorKind::Timeout), "TCP: {p:?}");
    let p = refused_udp(&lab, SocketAddrV4::new(nowhere, DNS_PORT));
    assert_eq!(p.error_kind(), Some(ErrorKind::Timeout), "UDP: {p:?}");
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() {
    let lab = Lab::new().unwrap();
    let agent = start(&lab, &[("demo.yaml", yaml::demo(&[0, 1, 2]))]);
    let http = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let dns = SocketAddrV4::new(DEMO_VIP, DNS_PORT);
    let tcp = lab
        .backend(0)
        .run(move || loadgen::tcp_requests(http, 300, PER_REQUEST, BATCH_DEADLINE));
    assert_clean(&tcp, &agent);
    assert!(tcp.share("backend-0") > 0.15, "never reached itself: {tcp}");
    assert_eq!(tcp.peers.len(), 1, "{tcp}");
    let udp = lab
        .backend(0)
        .run(move || loadgen::udp_requests(dns, 300, PER_REQUEST, BATCH_DEADLINE));
    assert_clean(&udp, &agent);
    assert!(udp.share("backend-0") > 0.15, "never reached itself: {udp}");
    // Only the hairpin connections were source-translated: backend-0's
    // server saw the hairpin address, the others saw backend-0's own.
    assert!(
        lab.backend_stats(0)
            .peers
            .contains(&"169.254.42.1".parse::<std::net::IpAddr>().unwrap()),
        "{:?}",
        lab.backend_stats(0)
    );
    assert!(
        lab.backend_stats(1)
            .peers
            .contains(&std::net::IpAddr::V4(backend_ip(0)))
    );
}

#[test]
fn internal_traffic_policy_local_uses_local_endpoints_or_drops() {
    let lab = Lab::new().unwrap();
    let local_vip = Ipv4Addr::new(10, 96, 0, 40);
    let none_vip = Ipv4Addr::new(10, 96, 0, 41);
    let svc = |name: &str, vip: Ipv4Addr| {
        yaml::service(name, &vip.to_string(), &[("http", 80, "TCP", "http")], name)
            .replace("spec:\n", "spec:\n  internalTrafficPolicy: Local\n")
    };
    let agent = start(
        &lab,
        &[
            ("local.yaml", svc("local", local_vip)),
            (
                "local-eps.yaml",
                slice_with_nodes(
                    "local-eps",
                    "local",
                    ("http", 8080, "TCP"),
                    &[
                        (0, LAB_NODE, true, true, false),
                        (1, "other-node", true, true, false),
                        (2, "other-node", true, true, false),
                    ],
                ),
            ),
            ("none.yaml", svc("none", none_vip)),
            (
                "none-eps.yaml",
                slice_with_nodes(
                    "none-eps",
                    "none",
                    ("http", 8080, "TCP"),
                    &[(1, "other-node", true, true, false)],
                ),
            ),
        ],
    );
    let target = SocketAddrV4::new(local_vip, 80);
    let r = lab
        .client()
        .run(move || loadgen::tcp_requests(target, 100, PER_REQUEST, BATCH_DEADLINE));
    assert_clean(&r, &agent);
    assert_eq!(r.count("backend-0"), 100, "only the local endpoint: {r}");
    // No local endpoint: dropped, not rejected.
    let p = refused_tcp(&lab, SocketAddrV4::new(none_vip, 80));
    assert_eq!(p.error_kind(), Some(ErrorKind::Timeout), "{p:?}");
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let lab = Lab::new().unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 50);
    let svc = yaml::service(
        "term",
        &vip.to_string(),
        &[("http", 80, "TCP", "http")],
        "term",
    );
    // backend-0 ready, backend-1 terminating but serving: only backend-0.
    let agent = start(
        &lab,
        &[
            ("term.yaml", svc.clone()),
            (
                "term-eps.yaml",
                slice_with_nodes(
                    "term-eps",
                    "term",
                    ("http", 8080, "TCP"),
                    &[
                        (0, LAB_NODE, true, true, false),
                        (1, LAB_NODE, false, true, true),
                        (2, LAB_NODE, false, false, true),
                    ],
                ),
            ),
        ],
    );
    let target = SocketAddrV4::new(vip, 80);
    let r = lab
        .client()
        .run(move || loadgen::tcp_requests(target, 100, PER_REQUEST, BATCH_DEADLINE));
    assert_clean(&r, &agent);
    assert_eq!(r.count("backend-0"), 100, "{r}");

    // backend-0 goes away: the serving terminating endpoint takes over
    // (kube-proxy's terminating fallback), the non-serving one never does.
    let mark = agent.log_mark();
    lab.write_manifest(
        "term-eps.yaml",
        &slice_with_nodes(
            "term-eps",
            "term",
            ("http", 8080, "TCP"),
            &[
                (1, LAB_NODE, false, true, true),
                (2, LAB_NODE, false, false, true),
            ],
        ),
    )
    .unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(5))
        .unwrap();
    let r = lab
        .client()
        .run(move || loadgen::tcp_requests(target, 100, PER_REQUEST, BATCH_DEADLINE));
    assert_clean(&r, &agent);
    assert_eq!(r.count("backend-1"), 100, "{r}");

    // Nothing serving at all: REJECT.
    let mark = agent.log_mark();
    lab.write_manifest(
        "term-eps.yaml",
        &slice_with_nodes(
            "term-eps",
            "term",
            ("http", 8080, "TCP"),
            &[(2, LAB_NODE, false, false, true)],
        ),
    )
    .unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(5))
        .unwrap();
    let p = refused_tcp(&lab, target);
    assert_eq!(p.error_kind(), Some(ErrorKind::Refused), "{p:?}");
}
