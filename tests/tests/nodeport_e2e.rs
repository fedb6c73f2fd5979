//! NodePort, LoadBalancer and external IPs end to end on the two-node
//! cluster lab (kube-proxy's TestNodePorts, TestLoadBalancer,
//! TestExternalTrafficPolicyLocal/Cluster, TestInternalExternalMasquerade):
//! an external client reaches the nodes only through the fabric, every node
//! runs its own agent with its own pins.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use lab::cluster::web::{self, CLUSTER_IP, NODE_PORT, NODE_PORT_UDP};
use lab::cluster::{Cluster, ClusterConfig, Whoami, addr, tcp_whoami, udp_whoami};
use lab::{Agent, Netns};

const HEALTH_PORT: u16 = 32000;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 61, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

/// Native XDP in front of TC, as on a node with a NIC: every case below
/// runs through both hooks (the lab's fabric takes native XDP_TX frames).
fn node_args() -> Vec<OsString> {
    vec![
        "--node-interfaces".into(),
        "eth0".into(),
        "--xdp-mode".into(),
        "native".into(),
    ]
}

fn lb_status(ip: Ipv4Addr) -> String {
    format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n")
}

fn start<'c>(cluster: &'c Cluster, manifest: &str) -> [Agent<'c>; 2] {
    cluster.write_manifest("web.yaml", manifest).unwrap();
    let args = node_args();
    cluster
        .start_agents([&args, &args])
        .expect("both agents program their datapath")
}

fn rewrite(cluster: &Cluster, agents: &[Agent<'_>; 2], manifest: &str) {
    let marks = [agents[0].log_mark(), agents[1].log_mark()];
    cluster.write_manifest("web.yaml", manifest).unwrap();
    for (agent, mark) in agents.iter().zip(marks) {
        agent
            .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(5))
            .unwrap();
    }
}

/// The agents' view of their maps (status and dumps), printed when a request fails.
fn debug_dump(agents: &[Agent<'_>; 2]) -> String {
    let bin = lab::agent::agent_bin().unwrap();
    let mut out = String::new();
    for a in agents {
        for what in [
            &["status"][..],
            &["dump", "services"],
            &["dump", "conntrack"],
        ] {
            let o = std::process::Command::new(&bin)
                .args(what)
                .arg("--bpffs")
                .arg(a.bpffs_dir())
                .output()
                .unwrap();
            out.push_str(&String::from_utf8_lossy(&o.stdout));
            out.push_str(&String::from_utf8_lossy(&o.stderr));
        }
    }
    out
}

fn tcp(from: &Netns, ip: Ipv4Addr, port: u16, agents: &[Agent<'_>; 2]) -> Whoami {
    tcp_whoami(from, SocketAddrV4::new(ip, port), TIMEOUT).unwrap_or_else(|e| {
        eprintln!("{}", debug_dump(agents));
        panic!(
            "TCP to {ip}:{port} failed: {e}\nnode-0:\n{}\nnode-1:\n{}",
            agents[0].log_tail(15),
            agents[1].log_tail(15)
        )
    })
}

/// The connection attempt must fail, and how.
fn tcp_fails(from: &Netns, ip: Ipv4Addr, port: u16) -> ErrorKind {
    match tcp_whoami(from, SocketAddrV4::new(ip, port), Duration::from_secs(1)) {
        Ok(w) => panic!("{ip}:{port} answered: {w:?}"),
        Err(e) => e.kind(),
    }
}

fn is_timeout(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

#[test]
fn node_port_with_cluster_policy_reaches_endpoints_from_any_node_masqueraded() {
    let cluster = Cluster::new().unwrap();
    // Both endpoints on node 0; node 1 has none.
    let agents = start(
        &cluster,
        &web::manifest(&cluster, &[(0, 0), (0, 1)], "", ""),
    );
    for k in 0..2 {
        let node = addr::node_ip(k);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let w = tcp(cluster.ext(), node, NODE_PORT, &agents);
            assert!(w.backend.starts_with("n0-backend-"), "{w:?}");
            // kube-proxy masquerades Cluster-policy external traffic to the
            // node's address, so the endpoint answers through that node.
            assert_eq!(w.seen_from.ip(), std::net::IpAddr::V4(node), "{w:?}");
            assert_eq!(
                w.reply_from,
                SocketAddrV4::new(node, NODE_PORT).into(),
                "reply must come from the NodePort"
            );
            seen.insert(w.backend);
        }
        assert_eq!(seen.len(), 2, "node {k}: both endpoints used: {seen:?}");
        let w = udp_whoami(
            cluster.ext(),
            SocketAddrV4::new(node, NODE_PORT_UDP),
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("UDP via node {k}: {e}\n{}", agents[k].log_tail(10)));
        assert!(w.backend.starts_with("n0-backend-"), "{w:?}");
        assert_eq!(w.reply_from, SocketAddrV4::new(node, NODE_PORT_UDP).into());
    }
    // A pod reaches the NodePort of the other node, and a cluster IP whose
    // endpoints are on the other node (its replies are translated back by
    // the node program of the client's node).
    let pod = &cluster.client(1).netns;
    let w = tcp(pod, addr::node_ip(0), NODE_PORT, &agents);
    assert!(w.backend.starts_with("n0-backend-"), "{w:?}");
    let w = tcp(pod, CLUSTER_IP, 80, &agents);
    assert!(w.backend.starts_with("n0-backend-"), "{w:?}");
    assert!(
        w.client_ip_preserved(),
        "cluster IP traffic keeps the pod IP: {w:?}"
    );
    assert_eq!(w.reply_from, SocketAddrV4::new(CLUSTER_IP, 80).into());
}

#[test]
fn local_policy_keeps_the_client_ip_drops_without_local_endpoint_and_serves_health() {
    let cluster = Cluster::new().unwrap();
    let extra = format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n");
    let agents = start(
        &cluster,
        &web::manifest(&cluster, &[(0, 0), (0, 1)], &extra, &lb_status(LB_IP)),
    );
    let w = tcp(cluster.ext(), addr::node_ip(0), NODE_PORT, &agents);
    assert!(w.backend.starts_with("n0-backend-"), "{w:?}");
    assert_eq!(
        w.seen_from.ip(),
        std::net::IpAddr::V4(addr::EXT_IP),
        "Local policy preserves the client address: {w:?}"
    );
    // Node 1 has no local endpoint: dropped, not rejected.
    let kind = tcp_fails(cluster.ext(), addr::node_ip(1), NODE_PORT);
    assert!(is_timeout(kind), "expected a silent drop, got {kind:?}");
    // Pods still reach every endpoint through node 1's NodePort.
    let w = tcp(
        &cluster.client(1).netns,
        addr::node_ip(1),
        NODE_PORT,
        &agents,
    );
    assert!(w.backend.starts_with("n0-backend-"), "{w:?}");

    // kube-proxy's health check: 200 with the local count, 503 without.
    let (status, body) = http_get(cluster.ext(), addr::node_ip(0), HEALTH_PORT);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 2"), "{body}");
    assert!(body.contains("\"name\": \"web\""), "{body}");
    let (status, body) = http_get(cluster.ext(), addr::node_ip(1), HEALTH_PORT);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");
}

#[test]
fn load_balancer_ip_source_ranges_and_external_ips() {
    let cluster = Cluster::new().unwrap();
    cluster.route_external(&format!("{LB_IP}/32"), 1).unwrap();
    cluster
        .route_external(&format!("{EXTERNAL_IP}/32"), 0)
        .unwrap();
    let allow_ext = format!(
        "  loadBalancerSourceRanges: [\"{}/32\"]\n  externalIPs: [\"{EXTERNAL_IP}\"]\n",
        addr::EXT_IP
    );
    let agents = start(
        &cluster,
        &web::manifest(&cluster, &[(0, 0), (1, 0)], &allow_ext, &lb_status(LB_IP)),
    );
    let w = tcp(cluster.ext(), LB_IP, 80, &agents);
    assert_eq!(w.reply_from, SocketAddrV4::new(LB_IP, 80).into());
    let w = tcp(cluster.ext(), EXTERNAL_IP, 80, &agents);
    assert_eq!(w.reply_from, SocketAddrV4::new(EXTERNAL_IP, 80).into());
    let w = udp_whoami(cluster.ext(), SocketAddrV4::new(LB_IP, 53), TIMEOUT).unwrap();
    assert_eq!(w.reply_from, SocketAddrV4::new(LB_IP, 53).into());

    // Ranges that exclude the client: the LB IP drops it; the NodePort and
    // the external IP ignore the ranges, as kube-proxy's. Pods outside the
    // ranges are dropped too (kube-proxy: "pod to LB blocked by
    // LoadBalancerSourceRanges").
    let deny_all = format!(
        "  loadBalancerSourceRanges: [\"10.1.0.0/16\"]\n  externalIPs: [\"{EXTERNAL_IP}\"]\n"
    );
    rewrite(
        &cluster,
        &agents,
        &web::manifest(&cluster, &[(0, 0), (1, 0)], &deny_all, &lb_status(LB_IP)),
    );
    let kind = tcp_fails(cluster.ext(), LB_IP, 80);
    assert!(is_timeout(kind), "expected a drop, got {kind:?}");
    tcp(cluster.ext(), addr::node_ip(1), NODE_PORT, &agents);
    tcp(cluster.ext(), EXTERNAL_IP, 80, &agents);
    let kind = tcp_fails(&cluster.client(0).netns, LB_IP, 80);
    assert!(
        is_timeout(kind),
        "a pod outside the ranges: drop, got {kind:?}"
    );
    // Ranges holding the pods let them in, still not the external client.
    let pods_only = format!(
        "  loadBalancerSourceRanges: [\"10.244.0.0/16\"]\n  externalIPs: [\"{EXTERNAL_IP}\"]\n"
    );
    rewrite(
        &cluster,
        &agents,
        &web::manifest(&cluster, &[(0, 0), (1, 0)], &pods_only, &lb_status(LB_IP)),
    );
    tcp(&cluster.client(0).netns, LB_IP, 80, &agents);
    let kind = tcp_fails(cluster.ext(), LB_IP, 80);
    assert!(is_timeout(kind), "expected a drop, got {kind:?}");
}

#[test]
fn no_endpoints_reject_and_nodeport_addresses_limit_where_nodeports_answer() {
    let cluster = Cluster::with_config(ClusterConfig {
        backends_per_node: [1, 1],
        ..ClusterConfig::default()
    })
    .unwrap();
    cluster.add_node_address(0, "192.168.50.20/24").unwrap();
    cluster
        .write_manifest("web.yaml", &web::manifest(&cluster, &[(1, 0)], "", ""))
        .unwrap();
    let mut args0 = node_args();
    args0.extend(["--nodeport-addresses".into(), "192.168.50.10/32".into()]);
    let args1 = node_args();
    let agents = cluster.start_agents([&args0, &args1]).unwrap();
    // Node 0's NodePort answers on its allowed address only.
    tcp(cluster.ext(), addr::node_ip(0), NODE_PORT, &agents);
    let kind = tcp_fails(cluster.ext(), Ipv4Addr::new(192, 168, 50, 20), NODE_PORT);
    assert_eq!(
        kind,
        ErrorKind::ConnectionRefused,
        "no NodePort there: the node's own RST"
    );

    // No endpoints: REJECT, fast.
    rewrite(&cluster, &agents, &web::manifest(&cluster, &[], "", ""));
    let started = Instant::now();
    let kind = tcp_fails(cluster.ext(), addr::node_ip(1), NODE_PORT);
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(started.elapsed() < Duration::from_millis(500));
}

/// One HTTP GET from `from`: status and body.
fn http_get(from: &Netns, ip: Ipv4Addr, port: u16) -> (u16, String) {
    let text = from
        .run(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&SocketAddrV4::new(ip, port).into(), TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .unwrap_or_else(|e| panic!("GET {ip}:{port}: {e}"));
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `PORTS.len()` UDP flows from fixed source ports of the external client
/// to `LB_IP:53`; the backend that answered each.
fn backend_per_flow(cluster: &Cluster) -> Vec<String> {
    const PORTS: std::ops::Range<u16> = 42_000..42_060;
    cluster
        .ext()
        .run(|| {
            PORTS
                .map(|port| {
                    let sock = std::net::UdpSocket::bind((addr::EXT_IP, port))?;
                    sock.set_read_timeout(Some(TIMEOUT))?;
                    sock.send_to(lab::servers::WHOAMI.as_bytes(), (LB_IP, 53))?;
                    let mut buf = [0u8; 1500];
                    let (n, _) = sock.recv_from(&mut buf)?;
                    lab::servers::parse_whoami(&String::from_utf8_lossy(&buf[..n]))
                        .map(|(backend, _)| backend)
                        .ok_or_else(|| std::io::Error::other("not a whoami reply"))
                })
                .collect::<std::io::Result<Vec<String>>>()
        })
        .expect("every flow answered")
}

/// Traffic from outside may reach any node (an ECMP router, a load
/// balancer failing over): with the default `--lb-algorithm maglev` both
/// nodes build the same table for the LB IP, so a flow that arrives at the
/// other node, with no conntrack state there, still reaches its endpoint.
#[test]
fn external_flows_pick_the_same_endpoint_on_every_node() {
    let cluster = Cluster::new().unwrap();
    cluster.route_external(&format!("{LB_IP}/32"), 0).unwrap();
    let agents = start(
        &cluster,
        &web::manifest(
            &cluster,
            &[(0, 0), (0, 1), (1, 0), (1, 1)],
            "",
            &lb_status(LB_IP),
        ),
    );
    let via_node0 = backend_per_flow(&cluster);
    let distinct: std::collections::BTreeSet<&String> = via_node0.iter().collect();
    assert!(distinct.len() >= 3, "flows spread: {distinct:?}");
    cluster.unroute_external(&format!("{LB_IP}/32")).unwrap();
    cluster.route_external(&format!("{LB_IP}/32"), 1).unwrap();
    let via_node1 = backend_per_flow(&cluster);
    let moved = via_node0
        .iter()
        .zip(&via_node1)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        moved,
        0,
        "flows changed endpoint with the node\n{}",
        debug_dump(&agents)
    );
}
