//! The lab itself, without the agent: the client reaches every backend pod
//! directly through the node, and dropping the lab removes everything.
//! Needs root; fails (never skips) when it cannot run.

use std::time::Duration;

use lab::loadgen::{self, ErrorKind};
use lab::{Lab, LabConfig, netns};

const TIMEOUT: Duration = Duration::from_secs(3);

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

    for i in 0..3 {
        let name = lab::backend_name(i);
        let (tcp, udp) = (lab.backend_tcp(i), lab.backend_udp(i));
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
        assert_eq!(t.peers.iter().collect::<Vec<_>>(), vec![&tcp.into()], "{t}");
        assert_eq!(u.error_count(), 0, "{u}");
        assert_eq!(u.count(&name), 5, "{u}");
        assert_eq!(u.peers.iter().collect::<Vec<_>>(), vec![&udp.into()], "{u}");
        assert_eq!(session, vec![name.clone(); 3]);
        let stats = lab.backend_stats(i);
        assert_eq!(stats.tcp_connections, 6, "{stats:?}");
        assert_eq!(stats.udp_datagrams, 5, "{stats:?}");
        assert_eq!(
            stats.peers.into_iter().collect::<Vec<_>>(),
            vec![std::net::IpAddr::from(lab::addr::CLIENT_IP)]
        );
    }

    // Without an agent the ClusterIP goes nowhere: the node has no route for
    // it (and no default route at all).
    let vip = std::net::SocketAddrV4::new(lab::addr::DEMO_VIP, 80);
    let probe = lab
        .client()
        .run(move || loadgen::tcp_probe(vip, Duration::from_secs(1)));
    assert!(
        matches!(
            probe.error_kind(),
            Some(ErrorKind::Unreachable | ErrorKind::Timeout)
        ),
        "{probe:?}"
    );

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
