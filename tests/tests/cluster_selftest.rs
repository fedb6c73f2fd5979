//! The two-node cluster lab itself: fabric, node and pod routing, the
//! external client's reach, teardown, and one agent per node. Needs root;
//! fails (never skips) when it cannot run.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use lab::addr::IpFamily;
use lab::cluster::{
    Cluster, ClusterConfig, addr, backend_name, client_name, node_name, tcp_whoami, udp_whoami,
};
use lab::loadgen::{self, ErrorKind};
use lab::{Lab, netns, yaml};

const TIMEOUT: Duration = Duration::from_secs(3);

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn cluster_has_its_namespaces_and_nothing_in_the_root_namespace() {
    let c = Cluster::with_config(ClusterConfig {
        backends_per_node: [1, 2],
        client_pod: true,
        ..ClusterConfig::default()
    })
    .expect("cluster setup (needs root and iproute2)");
    let p = c.netns_prefix();
    let mut want: Vec<String> = [
        "ext", "fabric", "n0", "n0-p0", "n0-p15", "n1", "n1-p0", "n1-p1", "n1-p15",
    ]
    .iter()
    .map(|s| format!("{p}{s}"))
    .collect();
    want.sort();
    assert_eq!(netns::list_netns(&p).unwrap(), want);

    let root_links = netns::run_cmd("ip", &["-o", "link", "show"]).unwrap();
    for name in ["veth-n0", "veth-n1", "veth-x", "veth-p0", "veth-p15"] {
        assert!(
            !root_links.contains(name),
            "{name} leaked into the root namespace:\n{root_links}"
        );
    }
    // The interfaces are where the contract says.
    for k in 0..2 {
        let eth0 = c
            .node_ns(k)
            .ip(&["-4", "-o", "addr", "show", "eth0"])
            .unwrap();
        assert!(eth0.contains(&format!("{}/24", addr::node_ip(k))), "{eth0}");
        assert_eq!(c.node(k).name, node_name(k));
        assert_eq!(c.client(k).name, client_name(k));
        assert_eq!(c.client(k).ip, addr::client_ip(k));
        assert_eq!(c.client(k).node_if, "veth-p15");
    }
    assert_eq!(c.backend(1, 1).ip, Ipv4Addr::new(10, 244, 145, 2));
    assert_eq!(c.backend(1, 1).gateway, Ipv4Addr::new(10, 244, 145, 1));
    assert_eq!(c.backend(0, 0).ip, Ipv4Addr::new(10, 244, 128, 2));
    let ports = c
        .fabric()
        .ip(&["-o", "link", "show", "master", "br0"])
        .unwrap();
    for name in ["veth-n0", "veth-n1", "veth-x"] {
        assert!(ports.contains(name), "{name} not on br0:\n{ports}");
    }
    let ext_routes = c.ext().ip(&["-4", "route", "show"]).unwrap();
    assert_eq!(
        ext_routes.lines().count(),
        1,
        "the external client must reach only the fabric subnet:\n{ext_routes}"
    );
}

/// Server `name`'s stats once `done` holds of them, or after 2 s.
fn settled_stats(
    c: &Cluster,
    name: &str,
    done: impl Fn(&lab::StatsSnapshot) -> bool,
) -> lab::StatsSnapshot {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let stats = c.server_stats(name).expect("server exists");
        if done(&stats) || std::time::Instant::now() >= deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn external_client_reaches_both_nodes_and_routed_prefixes() {
    let mut c = Cluster::with_config(ClusterConfig {
        backends_per_node: [0, 0],
        client_pod: false,
        ..ClusterConfig::default()
    })
    .expect("cluster setup");
    for k in 0..2 {
        c.serve_on_node(k, &format!("{}-srv", node_name(k)), 9000, 9001)
            .expect("servers in the node namespace");
    }
    assert!(c.serve_on_node(0, "node-0-srv", 9100, 9101).is_err());

    for k in 0..2 {
        let name = format!("{}-srv", node_name(k));
        let t = tcp_whoami(c.ext(), v4(c.node_ip(k), 9000), TIMEOUT).expect("TCP to node");
        assert_eq!(t.backend, name);
        assert_eq!(t.seen_from.ip(), IpAddr::from(addr::EXT_IP), "{t:?}");
        assert!(t.client_ip_preserved(), "{t:?}");
        assert_eq!(t.reply_from, SocketAddr::from(v4(c.node_ip(k), 9000)));
        let u = udp_whoami(c.ext(), v4(c.node_ip(k), 9001), TIMEOUT).expect("UDP to node");
        assert_eq!(u.backend, name);
        assert_eq!(u.seen_from, u.local, "{u:?}");
        assert_eq!(u.local.ip(), IpAddr::from(addr::EXT_IP));
        assert_eq!(u.reply_from, SocketAddr::from(v4(c.node_ip(k), 9001)));
        // The server counts a datagram once its reply is sent, which may be
        // just after the client has it.
        let stats = settled_stats(&c, &name, |s| s.udp_datagrams == 1);
        assert_eq!(stats.tcp_connections, 1, "{stats:?}");
        assert_eq!(stats.udp_datagrams, 1, "{stats:?}");
        assert_eq!(
            stats.peers,
            BTreeSet::from([IpAddr::from(addr::EXT_IP)]),
            "{stats:?}"
        );
    }
    assert!(c.server_stats("nobody").is_none());

    // A secondary node address on the fabric subnet (--nodeport-addresses).
    c.add_node_address(1, "192.168.50.21/24").unwrap();
    let t = tcp_whoami(c.ext(), v4(Ipv4Addr::new(192, 168, 50, 21), 9000), TIMEOUT)
        .expect("TCP to node 1's secondary address");
    assert_eq!(t.backend, "node-1-srv");

    // An address outside the fabric (as an LB IP would be) is reachable
    // only once the external client routes it via a node.
    reachable_only_once_routed(&c, "203.0.113.10/32", "203.0.113.0/24");
}

/// `lb` (an address outside the fabric, as an LB IP would be, put on node
/// 0's `lo`) is reachable from the external client only while it routes
/// `prefix` via node 0 (of either family), and then with the client's own
/// address.
fn reachable_only_once_routed(c: &Cluster, lb: &str, prefix: &str) {
    c.node_ns(0).ip(&["addr", "add", lb, "dev", "lo"]).unwrap();
    let ip: IpAddr = lb.split('/').next().unwrap().parse().unwrap();
    let target = SocketAddr::new(ip, 9000);
    let unreachable = || {
        let probe = c
            .ext()
            .run(move || loadgen::tcp_probe(target, Duration::from_secs(1)));
        assert_eq!(
            probe.error_kind(),
            Some(ErrorKind::Unreachable),
            "{probe:?}"
        );
    };
    unreachable();
    c.route_external(prefix, 0).unwrap();
    let t = tcp_whoami(c.ext(), target, TIMEOUT).expect("TCP to a routed prefix");
    assert_eq!(t.backend, "node-0-srv");
    assert!(t.client_ip_preserved(), "{t:?}");
    c.unroute_external(prefix).unwrap();
    unreachable();
}

/// Each node's client pod reaches both backends of the other node over
/// `family`, TCP and UDP, and the backends see the pod's own address.
fn client_pods_reach_the_other_nodes_backends(c: &Cluster, family: IpFamily) {
    for (from, to) in [(0, 1), (1, 0)] {
        let client = c.client(from);
        for j in 0..2 {
            let name = backend_name(to, j);
            let ip = c.backend(to, j).ip_of(family);
            let (tcp, udp) = (
                SocketAddr::new(ip, c.config().tcp_port),
                SocketAddr::new(ip, c.config().udp_port),
            );
            let t = tcp_whoami(&client.netns, tcp, TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP {} -> {name}: {e}", client.name));
            assert_eq!(t.backend, name);
            assert_eq!(t.seen_from.ip(), client.ip_of(family), "{t:?}");
            assert!(t.client_ip_preserved(), "{t:?}");
            assert_eq!(t.reply_from, tcp);
            let u = udp_whoami(&client.netns, udp, TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP {} -> {name}: {e}", client.name));
            assert_eq!(u.backend, name);
            assert_eq!(u.seen_from, u.local, "{u:?}");
            assert_eq!(u.local.ip(), client.ip_of(family));
            assert_eq!(u.reply_from, udp);
        }
    }
}

#[test]
fn pods_reach_pods_on_the_other_node_with_their_own_address() {
    let c = Cluster::new().expect("cluster setup");
    client_pods_reach_the_other_nodes_backends(&c, IpFamily::V4);
    // Backend to backend across nodes, and plain requests (not `whoami`)
    // still get the bare name.
    let (tcp, udp) = (c.backend_tcp(1, 1), c.backend_udp(1, 1));
    let (t, u) = c.backend(0, 1).netns.run(move || {
        (
            loadgen::tcp_requests(tcp, 3, TIMEOUT, Duration::from_secs(10)),
            loadgen::udp_requests(udp, 3, TIMEOUT, Duration::from_secs(10)),
        )
    });
    assert_eq!(t.count("n1-backend-1"), 3, "{t}");
    assert_eq!(u.count("n1-backend-1"), 3, "{u}");
    let mut s = c
        .backend(0, 1)
        .netns
        .run(move || loadgen::TcpSession::connect(tcp, TIMEOUT))
        .expect("connect");
    assert_eq!(s.request().unwrap(), "n1-backend-1");

    for (k, j) in [(0, 0), (0, 1), (1, 0)] {
        let peers = c.server_stats(&backend_name(k, j)).unwrap().peers;
        assert_eq!(
            peers,
            BTreeSet::from([IpAddr::from(addr::client_ip(1 - k))]),
            "{}",
            backend_name(k, j)
        );
    }
    let peers = c.server_stats("n1-backend-1").unwrap().peers;
    assert_eq!(
        peers,
        BTreeSet::from([
            IpAddr::from(addr::client_ip(0)),
            IpAddr::from(c.backend(0, 1).ip)
        ])
    );
}

#[test]
fn external_client_has_no_route_to_pods() {
    let c = Cluster::new().expect("cluster setup");
    for (k, j) in [(0, 0), (1, 1)] {
        let pod = c.backend(k, j).ip;
        let route = c.ext().ip(&["route", "get", &pod.to_string()]);
        assert!(
            route.is_err(),
            "external client has a route to {pod}: {route:?}"
        );
        let t = tcp_whoami(c.ext(), c.backend_tcp(k, j), TIMEOUT).expect_err("TCP to a pod");
        assert_eq!(ErrorKind::of(&t), ErrorKind::Unreachable, "{t}");
        let u = udp_whoami(c.ext(), c.backend_udp(k, j), TIMEOUT).expect_err("UDP to a pod");
        assert_eq!(ErrorKind::of(&u), ErrorKind::Unreachable, "{u}");
        assert_eq!(
            c.server_stats(&backend_name(k, j)).unwrap(),
            Default::default()
        );
    }
    // Client pods neither.
    let client = c.client(0).ip;
    let route = c.ext().ip(&["route", "get", &client.to_string()]);
    assert!(route.is_err(), "{route:?}");
}

#[test]
fn cluster_is_removed_on_drop_and_on_panic_and_does_not_collide() {
    let a = Cluster::new().expect("cluster a");
    let b = Cluster::with_config(ClusterConfig {
        backends_per_node: [1, 0],
        client_pod: false,
        ..ClusterConfig::default()
    })
    .expect("cluster b");
    let single = Lab::with_config(lab::LabConfig {
        backends: 1,
        ..lab::LabConfig::default()
    })
    .expect("a single-node lab alongside");
    let (pa, pb) = (a.netns_prefix(), b.netns_prefix());
    assert_ne!(pa, pb);
    assert!(!single.netns_prefix().starts_with(&pa) && !pa.starts_with(&single.netns_prefix()));
    assert_eq!(
        netns::list_netns(&pb).unwrap().len(),
        5,
        "ext, fabric, n0, n0-p0, n1"
    );
    // Both clusters use the same addresses, each in its own fabric. A node
    // reaches the other node's pods with its own address.
    let t = tcp_whoami(b.node_ns(1), b.backend_tcp(0, 0), TIMEOUT).expect("b's own backend");
    assert_eq!(t.backend, "n0-backend-0");
    assert_eq!(t.seen_from.ip(), IpAddr::from(addr::node_ip(1)));
    a.write_manifest("x.yaml", "a: 1\n").unwrap();
    for k in 0..2 {
        assert_eq!(
            std::fs::read_to_string(a.manifest_dir(k).join("x.yaml")).unwrap(),
            "a: 1\n"
        );
    }
    a.remove_manifest("x.yaml").unwrap();
    assert!(!a.manifest_dir(1).join("x.yaml").exists());

    let dir = a.dir().to_path_buf();
    drop(a);
    assert_eq!(netns::list_netns(&pa).unwrap(), Vec::<String>::new());
    assert!(!dir.exists(), "{} not removed", dir.display());
    drop(b);
    assert_eq!(netns::list_netns(&pb).unwrap(), Vec::<String>::new());
    drop(single);

    let prefix = std::thread::spawn(|| {
        let c = Cluster::new().expect("cluster");
        let prefix = c.netns_prefix();
        assert_eq!(c.node_ns(1).name(), format!("{prefix}n1"));
        // Panic with the cluster alive: unwinding must still tear it down.
        std::panic::panic_any(prefix);
    })
    .join()
    .expect_err("thread panicked");
    let prefix = prefix.downcast::<String>().expect("prefix");
    assert_eq!(netns::list_netns(&prefix).unwrap(), Vec::<String>::new());
}

/// Inode of a namespace file, to compare with `/proc/<pid>/ns/net`.
fn netns_inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn agents_run_per_node_with_own_pins_and_serve_a_same_node_clusterip() {
    let c = Cluster::new().expect("cluster setup");
    let vip = lab::addr::DEMO_VIP;
    let svc = yaml::service(
        "demo",
        &vip.to_string(),
        &[("http", 80, "TCP", "http"), ("dns", 53, "UDP", "dns")],
        "demo",
    );
    let eps = c.endpoints(&[(0, 0), (0, 1)]);
    assert_eq!(eps[1].node, "node-0");
    let slice = yaml::endpoint_slice_on_nodes(
        "demo-a",
        "demo",
        &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        &eps,
    );
    assert!(slice.contains("nodeName: node-0"), "{slice}");
    c.write_manifest("demo.yaml", &format!("{svc}---\n{slice}"))
        .unwrap();

    let agents = c
        .start_agents([&[], &[]])
        .expect("both agents program their datapaths");
    for (k, a) in agents.iter().enumerate() {
        assert!(a.is_running(), "agent {k}:\n{}", a.logs());
        assert_eq!(a.bpffs_dir(), c.bpffs_dir(k));
        let pins: Vec<_> = std::fs::read_dir(c.bpffs_dir(k))
            .unwrap_or_else(|e| panic!("{}: {e}", c.bpffs_dir(k).display()))
            .collect();
        assert!(!pins.is_empty(), "agent {k} pinned nothing");
        let ns = std::fs::read_link(format!("/proc/{}/ns/net", a.pid())).unwrap();
        assert_eq!(
            ns.to_string_lossy(),
            format!("net:[{}]", netns_inode(c.node_ns(k).path())),
            "agent {k} is not in its node's namespace"
        );
        let env = std::fs::read(format!("/proc/{}/environ", a.pid())).unwrap();
        let env: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        let want = format!("NODE_NAME={}", node_name(k));
        assert!(env.contains(&want.as_bytes()), "agent {k} lacks {want}");
    }
    assert_ne!(c.bpffs_dir(0), c.bpffs_dir(1));

    let client = &c.client(0).netns;
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let t = tcp_whoami(client, v4(vip, 80), TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP to the ClusterIP: {e}\n{}", agents[0].log_tail(20)));
        assert_eq!(t.seen_from.ip(), IpAddr::from(addr::client_ip(0)), "{t:?}");
        assert_eq!(t.reply_from, SocketAddr::from(v4(vip, 80)));
        seen.insert(t.backend);
    }
    assert_eq!(
        seen,
        BTreeSet::from([backend_name(0, 0), backend_name(0, 1)]),
        "20 connections should reach both node-0 backends"
    );
    let u = udp_whoami(client, v4(vip, 53), TIMEOUT).expect("UDP to the ClusterIP");
    assert!(u.backend.starts_with("n0-backend-"), "{u:?}");
    assert_eq!(u.reply_from, SocketAddr::from(v4(vip, 53)), "{u:?}");
    assert_eq!(u.seen_from, u.local, "{u:?}");

    let pins = [c.bpffs_dir(0), c.bpffs_dir(1)];
    drop(agents);
    for p in &pins {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    let prefix = c.netns_prefix();
    drop(c);
    assert_eq!(netns::list_netns(&prefix).unwrap(), Vec::<String>::new());
    for p in &pins {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

fn v6(ip: std::net::Ipv6Addr, port: u16) -> std::net::SocketAddrV6 {
    std::net::SocketAddrV6::new(ip, port, 0, 0)
}

#[test]
fn every_link_is_dual_stack_and_nothing_reaches_the_root_namespace() {
    let c = Cluster::new().expect("cluster setup");
    assert_eq!(lab::root_ipv6_leaks().unwrap(), Vec::<String>::new());
    for k in 0..2 {
        let eth0 = c
            .node_ns(k)
            .ip(&["-6", "-o", "addr", "show", "eth0"])
            .unwrap();
        assert!(
            eth0.contains(&format!("{}/64", addr::node_ip6(k))),
            "{eth0}"
        );
        assert!(!eth0.contains("tentative"), "{eth0}");
        assert_eq!(c.node_ip6(k), addr::node_ip6(k));
        let forwarding = c
            .node_ns(k)
            .exec("cat", &["/proc/sys/net/ipv6/conf/all/forwarding"])
            .unwrap();
        assert_eq!(forwarding.trim(), "1");
        for pod in [c.backend(k, 0), c.backend(k, 1), c.client(k)] {
            let a = pod.netns.ip(&["-6", "-o", "addr", "show", "eth0"]).unwrap();
            assert!(a.contains(&format!("{}/64", pod.ip6)), "{a}");
            let default = pod.netns.ip(&["-6", "route", "show", "default"]).unwrap();
            assert!(
                default.contains(&format!("via {}", pod.gateway6)),
                "{default}"
            );
        }
    }
    assert_eq!(c.client(1).ip6, addr::client_ip6(1));
    assert_eq!(c.backend(0, 1).ip6.to_string(), "fd00:10:244:101::2");
    // The external client has its fabric subnet and link-local routes only:
    // no default route, no route to any pod.
    let ext_routes = c.ext().ip(&["-6", "route", "show"]).unwrap();
    let mut nets: Vec<&str> = ext_routes
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    nets.sort();
    assert_eq!(nets, ["fd00:192:168:50::/64", "fe80::/64"], "{ext_routes}");
}

#[test]
fn pods_reach_pods_on_the_other_node_over_ipv6_with_their_own_address() {
    let c = Cluster::new().expect("cluster setup");
    client_pods_reach_the_other_nodes_backends(&c, IpFamily::V6);
    // Plain requests from a backend of the other node, both families to
    // the same servers.
    let (tcp6, udp6, tcp4) = (
        c.backend_tcp6(1, 1),
        c.backend_udp6(1, 1),
        c.backend_tcp(1, 1),
    );
    let (t6, u6, t4) = c.backend(0, 0).netns.run(move || {
        (
            loadgen::tcp_requests(tcp6, 3, TIMEOUT, Duration::from_secs(10)),
            loadgen::udp_requests(udp6, 3, TIMEOUT, Duration::from_secs(10)),
            loadgen::tcp_requests(tcp4, 3, TIMEOUT, Duration::from_secs(10)),
        )
    });
    assert_eq!(t6.count("n1-backend-1"), 3, "{t6}");
    assert_eq!(u6.count("n1-backend-1"), 3, "{u6}");
    assert_eq!(t4.count("n1-backend-1"), 3, "{t4}");
    let peers = c.server_stats("n1-backend-1").unwrap().peers;
    assert_eq!(
        peers,
        BTreeSet::from([
            IpAddr::from(addr::client_ip6(0)),
            IpAddr::from(c.backend(0, 0).ip),
            IpAddr::from(c.backend(0, 0).ip6),
        ])
    );
}

#[test]
fn nodes_and_external_client_over_ipv6_and_no_route_from_outside_to_pods() {
    let mut c = Cluster::with_config(ClusterConfig {
        backends_per_node: [1, 1],
        client_pod: true,
        ..ClusterConfig::default()
    })
    .expect("cluster setup");
    for k in 0..2 {
        c.serve_on_node(k, &format!("{}-srv", node_name(k)), 9000, 9001)
            .expect("servers in the node namespace");
    }
    for k in 0..2 {
        let name = format!("{}-srv", node_name(k));
        let t = tcp_whoami(c.ext(), v6(c.node_ip6(k), 9000), TIMEOUT).expect("TCP to node");
        assert_eq!(t.backend, name);
        assert_eq!(t.seen_from.ip(), IpAddr::from(addr::EXT_IP6), "{t:?}");
        let u = udp_whoami(c.ext(), v6(c.node_ip6(k), 9001), TIMEOUT).expect("UDP to node");
        assert_eq!(u.backend, name);
        assert_eq!(u.local.ip(), IpAddr::from(addr::EXT_IP6), "{u:?}");
        assert_eq!(u.reply_from, SocketAddr::from(v6(c.node_ip6(k), 9001)));
        // A pod reaches its own node and the other one.
        for from in 0..2 {
            let pod = c.client(from);
            let t = tcp_whoami(&pod.netns, v6(c.node_ip6(k), 9000), TIMEOUT)
                .unwrap_or_else(|e| panic!("{} -> {name}: {e}", pod.name));
            assert_eq!(t.backend, name);
            assert_eq!(t.seen_from.ip(), IpAddr::from(pod.ip6), "{t:?}");
        }
    }

    // A pod's datagram reaches the external client with the pod's address;
    // the external client has no route back (nothing translates without
    // an agent), as over IPv4.
    let ext_sock = c
        .ext()
        .run(|| std::net::UdpSocket::bind(v6(addr::EXT_IP6, 9100)))
        .expect("socket on the external client");
    ext_sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.client(1)
        .netns
        .run(|| {
            let s = std::net::UdpSocket::bind("[::]:0")?;
            s.send_to(b"hi", v6(addr::EXT_IP6, 9100))
        })
        .expect("send from a pod");
    let mut buf = [0u8; 16];
    let (_, from) = ext_sock
        .recv_from(&mut buf)
        .expect("the pod's datagram arrives");
    assert_eq!(from.ip(), IpAddr::from(c.client(1).ip6));
    for (k, j) in [(0, 0), (1, 0)] {
        let pod = c.backend(k, j).ip6;
        let route = c.ext().ip(&["-6", "route", "get", &pod.to_string()]);
        assert!(
            route.is_err(),
            "external client has a route to {pod}: {route:?}"
        );
        let t = tcp_whoami(c.ext(), c.backend_tcp6(k, j), TIMEOUT).expect_err("TCP to a pod");
        assert_eq!(ErrorKind::of(&t), ErrorKind::Unreachable, "{t}");
    }

    // A secondary IPv6 node address, and an IPv6 prefix outside the fabric
    // reachable only once routed via a node.
    c.add_node_address(1, "fd00:192:168:50::21/64").unwrap();
    let t = tcp_whoami(
        c.ext(),
        v6("fd00:192:168:50::21".parse().unwrap(), 9000),
        TIMEOUT,
    )
    .expect("TCP to node 1's secondary IPv6 address");
    assert_eq!(t.backend, "node-1-srv");
    reachable_only_once_routed(&c, "fd00:203:0:113::10/128", "fd00:203:0:113::/64");

    let prefix = c.netns_prefix();
    drop(c);
    assert_eq!(netns::list_netns(&prefix).unwrap(), Vec::<String>::new());
    assert_eq!(lab::root_ipv6_leaks().unwrap(), Vec::<String>::new());
}
