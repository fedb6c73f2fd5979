//! The lab itself, without the agent: the client reaches every backend pod
//! directly through the node, and dropping the lab removes everything.
//! Needs root; fails (never skips) when it cannot run.

use std::net::SocketAddr;
use std::time::Duration;

use lab::addr::IpFamily;
use lab::loadgen::{self, ErrorKind};
use lab::{Lab, LabConfig, netns};

const TIMEOUT: Duration = Duration::from_secs(3);

/// The client reaches every backend directly over `family`: TCP and UDP
/// requests on new sockets and one long-lived connection, all answered by
/// that backend, which saw only the client's address of that family.
fn client_reaches_each_backend(lab: &Lab, family: IpFamily) {
    let client_ip = lab.client_pod().ip_of(family);
    for (i, pod) in lab.backends().iter().enumerate() {
        let name = lab::backend_name(i);
        let tcp = SocketAddr::new(pod.ip_of(family), lab.config().tcp_port);
        let udp = SocketAddr::new(pod.ip_of(family), lab.config().udp_port);
        let (t, u, session) = lab.client().run(move || {
            let t = loadgen::tcp_requests(tcp, 5, TIMEOUT, Duration::from_secs(10));
            let u = loadgen::udp_requests(udp, 5, TIMEOUT, Duration::from_secs(10));
            // One long-lived connection answering several requests.
            let mut s = loadgen::TcpSession::connect(tcp, TIMEOUT).expect("connect");
            let replies: Vec<String> = (0..3).map(|_| s.request().expect("request")).collect();
            (t, u, replies)
        });
        assert_eq!(t.error_count(), 0, "{t}");
        assert_eq!(t.count(&name), 5, "{t}");
        assert_eq!(t.peers.iter().collect::<Vec<_>>(), vec![&tcp], "{t}");
        assert_eq!(u.error_count(), 0, "{u}");
        assert_eq!(u.count(&name), 5, "{u}");
        assert_eq!(u.peers.iter().collect::<Vec<_>>(), vec![&udp], "{u}");
        assert_eq!(session, vec![name.clone(); 3]);
        let stats = lab.backend_stats(i);
        assert_eq!(stats.tcp_connections, 6, "{stats:?}");
        assert_eq!(stats.udp_datagrams, 5, "{stats:?}");
        assert_eq!(stats.peers.into_iter().collect::<Vec<_>>(), vec![client_ip]);
    }
}

/// Without an agent a ClusterIP goes nowhere: the node has no route for
/// `vip` (and no default route at all), so the client's connection fails.
fn goes_nowhere(lab: &Lab, vip: std::net::IpAddr) {
    assert!(lab.node().ip(&["route", "get", &vip.to_string()]).is_err());
    let target = SocketAddr::new(vip, 80);
    let probe = lab
        .client()
        .run(move || loadgen::tcp_probe(target, Duration::from_secs(1)));
    assert!(
        matches!(
            probe.error_kind(),
            Some(ErrorKind::Unreachable | ErrorKind::Timeout)
        ),
        "{probe:?}"
    );
}

#[test]
fn lab_routes_client_to_each_backend_and_cleans_up() {
    let lab = Lab::new().expect("lab setup (needs root and iproute2)");
    let prefix = lab.netns_prefix();
    let names = netns::list_netns(&prefix).unwrap();
    assert_eq!(
        names,
        vec![
            format!("{prefix}b0"),
            format!("{prefix}b1"),
            format!("{prefix}b2"),
            format!("{prefix}client"),
            format!("{prefix}node"),
        ]
    );
    // Nothing the lab made is in the root namespace.
    let root_links = netns::run_cmd("ip", &["-o", "link", "show"]).unwrap();
    assert!(
        !root_links.contains("veth-c0") && !root_links.contains("veth-b0"),
        "lab interfaces leaked into the root namespace:\n{root_links}"
    );

    client_reaches_each_backend(&lab, IpFamily::V4);

    // Without an agent the ClusterIP goes nowhere: the node has no route for
    // it (and no default route at all).
    goes_nowhere(&lab, lab::addr::DEMO_VIP.into());

    let dir = lab.dir().to_path_buf();
    lab.write_manifest("x.yaml", "a: 1\n").unwrap();
    assert!(lab.manifest_dir().join("x.yaml").is_file());
    drop(lab);
    assert_eq!(netns::list_netns(&prefix).unwrap(), Vec::<String>::new());
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[test]
fn lab_cleans_up_on_panic_and_labs_do_not_collide() {
    let (a, b) = (
        Lab::new().expect("lab a"),
        Lab::with_config(LabConfig {
            backends: 1,
            ..LabConfig::default()
        })
        .expect("lab b"),
    );
    let (pa, pb) = (a.netns_prefix(), b.netns_prefix());
    assert_ne!(pa, pb);
    assert_eq!(netns::list_netns(&pb).unwrap().len(), 3);
    drop(a);
    drop(b);

    let prefix = std::thread::spawn(|| {
        let lab = Lab::new().expect("lab");
        let prefix = lab.netns_prefix();
        assert_eq!(lab.node().name(), format!("{prefix}node"));
        // Panic with the lab alive: unwinding must still tear it down.
        std::panic::panic_any(prefix);
    })
    .join()
    .expect_err("thread panicked");
    let prefix = prefix.downcast::<String>().expect("prefix");
    assert_eq!(netns::list_netns(&prefix).unwrap(), Vec::<String>::new());
}

/// Writes an executable shell script standing in for the agent.
fn fake_agent(lab: &Lab, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = lab.dir().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn agent_runs_in_node_namespace_and_is_cleaned_up() {
    use std::os::unix::fs::MetadataExt;
    let lab = Lab::new().expect("lab");
    // $7 is the --bpffs directory.
    let bin = fake_agent(
        &lab,
        "fake-agent",
        r#"echo "args: $*" >&2
echo "netns: $(readlink /proc/self/ns/net)"
echo "RUST_LOG=$RUST_LOG" >&2
mkdir -p "$7/pinned"
printf '\033[32mINFO\033[0m datapath programmed generation=1 frontends=0 backends=0\n' >&2
exec sleep 60"#,
    );
    let agent = lab
        .start_agent_bin(&bin, &lab.manifest_dir())
        .expect("start fake agent");
    agent
        .wait_for_log(
            "INFO datapath programmed generation=1",
            Duration::from_secs(10),
        )
        .expect("log captured, colours stripped");
    let node_inode = std::fs::metadata(lab.node().path()).unwrap().ino();
    assert!(
        agent.log_contains(&format!("netns: net:[{node_inode}]")),
        "agent not in the node namespace:\n{}",
        agent.logs()
    );
    let bpffs = lab.bpffs_dir();
    assert!(agent.log_contains(&format!(
        "args: run --manifests {} --interfaces veth-* --bpffs {}",
        lab.manifest_dir().display(),
        bpffs.display()
    )));
    assert!(agent.log_contains("RUST_LOG=info"));
    assert!(bpffs.join("pinned").exists());
    let mark = agent.log_mark();
    let err = agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_millis(300))
        .expect_err("no new line after the mark");
    assert!(format!("{err:#}").contains("did not print"), "{err:#}");
    assert!(agent.is_running());
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(log.contains("datapath programmed"), "{log}");

    let pid = agent.pid();
    drop(agent);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "agent {pid} not reaped"
    );
    assert!(!bpffs.exists(), "{} not removed", bpffs.display());

    // An agent that exits early fails wait_for_log at once, with its output.
    let bin = fake_agent(
        &lab,
        "dying-agent",
        "echo 'fatal: cannot attach to veth-c0' >&2; exit 3",
    );
    let agent = lab.start_agent_bin(&bin, &lab.manifest_dir()).unwrap();
    let t = std::time::Instant::now();
    let err = agent
        .wait_for_log("datapath programmed", Duration::from_secs(20))
        .expect_err("agent exited");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let msg = format!("{err:#}");
    assert!(
        msg.contains("exit status: 3") && msg.contains("fatal: cannot attach to veth-c0"),
        "{msg}"
    );
}

#[test]
fn cleanup_stale_removes_only_dead_owners() {
    // No process can have this pid (above the kernel's pid_max limit).
    let stale = "kep-999999999-0-node";
    netns::run_cmd("ip", &["netns", "add", stale]).unwrap();
    let live = Lab::with_config(LabConfig {
        backends: 1,
        ..LabConfig::default()
    })
    .expect("lab");
    let removed = lab::cleanup_stale().unwrap();
    assert!(removed.contains(&stale.to_string()), "{removed:?}");
    assert!(netns::list_netns(stale).unwrap().is_empty());
    assert_eq!(netns::list_netns(&live.netns_prefix()).unwrap().len(), 3);
}

#[test]
fn lab_routes_ipv6_between_client_node_and_backends_and_nothing_leaks() {
    use lab::addr;
    use lab::cluster::tcp_whoami;
    use std::net::{IpAddr, SocketAddrV6};

    let lab = Lab::new().expect("lab setup (needs root and iproute2)");
    assert_eq!(lab::root_ipv6_leaks().unwrap(), Vec::<String>::new());
    let forwarding = lab
        .node()
        .exec("cat", &["/proc/sys/net/ipv6/conf/all/forwarding"])
        .unwrap();
    assert_eq!(forwarding.trim(), "1");
    // Every address is usable at once (no duplicate address detection),
    // link-local ones included: none is tentative.
    for ns in [lab.node(), lab.client(), lab.backend(0)] {
        let addrs = ns.ip(&["-6", "-o", "addr", "show"]).unwrap();
        assert!(addrs.contains("fd00:10:244:"), "{}:\n{addrs}", ns.name());
        assert!(!addrs.contains("tentative"), "{}:\n{addrs}", ns.name());
    }
    assert_eq!(lab.client_pod().ip6, addr::CLIENT_IP6);
    assert_eq!(lab.backends()[2].ip6, addr::backend_ip6(2));

    client_reaches_each_backend(&lab, IpFamily::V6);

    // The servers answer both families, each seeing the client's address
    // of that family.
    let w6 = tcp_whoami(lab.client(), lab.backend_tcp6(1), TIMEOUT).expect("whoami over IPv6");
    assert_eq!(w6.seen_from.ip(), IpAddr::from(addr::CLIENT_IP6), "{w6:?}");
    assert!(w6.client_ip_preserved(), "{w6:?}");
    let w4 = tcp_whoami(lab.client(), lab.backend_tcp(1), TIMEOUT).expect("whoami over IPv4");
    assert_eq!(w4.seen_from.ip(), IpAddr::from(addr::CLIENT_IP), "{w4:?}");
    // The node reaches a pod from its own address on the pod's link.
    let w = tcp_whoami(lab.node(), lab.backend_tcp6(2), TIMEOUT).expect("node to pod");
    assert_eq!(
        w.seen_from.ip(),
        IpAddr::from(addr::backend_gw6(2)),
        "{w:?}"
    );

    // The client reaches the node itself.
    let gw = SocketAddrV6::new(addr::CLIENT_GW6, 9000, 0, 0);
    let listener = lab
        .node()
        .run(move || std::net::TcpListener::bind(gw))
        .expect("listen on the node");
    lab.client()
        .run(move || std::net::TcpStream::connect_timeout(&gw.into(), TIMEOUT))
        .expect("client to node over IPv6");
    let (_, from) = listener.accept().unwrap();
    assert_eq!(from.ip(), IpAddr::from(addr::CLIENT_IP6));

    // Without an agent the IPv6 ClusterIP goes nowhere: the node has no
    // route for it (and no default route at all).
    goes_nowhere(&lab, addr::DEMO_VIP6.into());

    let prefix = lab.netns_prefix();
    drop(lab);
    assert_eq!(netns::list_netns(&prefix).unwrap(), Vec::<String>::new());
    assert_eq!(lab::root_ipv6_leaks().unwrap(), Vec::<String>::new());
}

#[test]
fn sockclient_targets_either_family() {
    let lab = Lab::with_config(LabConfig {
        backends: 1,
        ..LabConfig::default()
    })
    .expect("lab");
    let bin = env!("CARGO_BIN_EXE_lab-sockclient");
    let cases = [
        (
            "tcp-whoami",
            lab.backend_tcp(0).to_string(),
            lab::addr::CLIENT_IP.to_string(),
            None,
        ),
        (
            "udp-whoami",
            lab.backend_udp(0).to_string(),
            lab::addr::CLIENT_IP.to_string(),
            None,
        ),
        (
            "tcp-whoami",
            lab.backend_tcp6(0).to_string(),
            lab::addr::CLIENT_IP6.to_string(),
            None,
        ),
        (
            "udp-whoami",
            lab.backend_udp6(0).to_string(),
            lab::addr::CLIENT_IP6.to_string(),
            None,
        ),
        // A fixed source port (bind before connect) over IPv6.
        (
            "tcp-whoami",
            lab.backend_tcp6(0).to_string(),
            lab::addr::CLIENT_IP6.to_string(),
            Some("41000"),
        ),
        (
            "udp-whoami",
            lab.backend_udp6(0).to_string(),
            lab::addr::CLIENT_IP6.to_string(),
            Some("41001"),
        ),
    ];
    for (mode, target, client, port) in cases {
        let mut args = vec![mode, target.as_str(), "2"];
        args.extend(port);
        let out = lab.client().exec(bin, &args).expect("lab-sockclient runs");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{mode} {target}: {out}");
        for line in lines {
            // `ok <backend> <source the server saw> <peer>`
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.first(), Some(&"ok"), "{mode} {target}: {line}");
            assert_eq!(f[1], "backend-0", "{line}");
            let seen: SocketAddr = f[2].parse().expect("source address");
            assert_eq!(seen.ip().to_string(), client, "{line}");
            if let Some(p) = port {
                assert_eq!(seen.port().to_string(), p, "{line}");
            }
            assert_eq!(f[3], target, "{line}");
        }
    }
}
