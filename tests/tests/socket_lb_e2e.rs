//! Socket-level load balancing for the node's own processes: a process in
//! the lab's node namespace, inside a cgroup this test created (the only
//! place the hooks attach), reaches ClusterIPs over TCP, UDP sendto() and
//! UDP connect()+send(), and sees the VIP as its peer and reply source.
//!
//! Needs root, cgroup v2 and the agent binary; fails loudly without them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use lab::addr::{DEMO_VIP, DNS_PORT, EMPTY_VIP, HTTP_PORT};
use lab::cgroup::TestCgroup;
use lab::{Agent, Lab, yaml};

/// What the host process saw for each request.
struct Outcome {
    per_backend: BTreeMap<String, usize>,
    addrs: BTreeMap<String, usize>,
    errors: Vec<String>,
    elapsed: Duration,
}

/// Runs `lab-sockclient MODE TARGET COUNT` in the node namespace and, when
/// `cgroup` is given, inside it.
fn host_process(
    lab: &Lab,
    cgroup: Option<&TestCgroup>,
    mode: &str,
    target: &str,
    count: usize,
) -> Outcome {
    host_process_in(lab.node(), cgroup, mode, target, count)
}

/// [`host_process`] in the network namespace `ns`.
fn host_process_in(
    ns: &lab::Netns,
    cgroup: Option<&TestCgroup>,
    mode: &str,
    target: &str,
    count: usize,
) -> Outcome {
    let netns = std::fs::File::open(ns.path()).unwrap();
    let procs = cgroup.map(|c| OpenOptions::new().write(true).open(c.procs()).unwrap());
    let (netns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_ref().map(|f| f.as_raw_fd()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lab-sockclient"));
    cmd.args([mode, target, &count.to_string()]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" moves the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let out = cmd.output().expect("run lab-sockclient");
    let elapsed = started.elapsed();
    assert!(out.status.success(), "lab-sockclient: {out:?}");
    let mut o = Outcome {
        per_backend: BTreeMap::new(),
        addrs: BTreeMap::new(),
        errors: Vec::new(),
        elapsed,
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.splitn(3, ' ');
        match (f.next(), f.next(), f.next()) {
            (Some("ok"), Some(name), Some(addr)) => {
                *o.per_backend.entry(name.to_string()).or_default() += 1;
                *o.addrs.entry(addr.to_string()).or_default() += 1;
            }
            _ => o.errors.push(line.to_string()),
        }
    }
    o
}

fn start<'l>(lab: &'l Lab, cgroup: &TestCgroup) -> Agent<'l> {
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    lab.write_manifest("empty.yaml", &yaml::empty()).unwrap();
    start_with_socket_lb(lab, cgroup)
}

/// The agent on the lab's manifests as they are, with the socket hooks on
/// `cgroup`.
fn start_with_socket_lb<'l>(lab: &'l Lab, cgroup: &TestCgroup) -> Agent<'l> {
    let args: Vec<OsString> = vec![
        "--manifests".into(),
        lab.manifest_dir().into(),
        "--socket-lb-cgroup".into(),
        cgroup.path().into(),
    ];
    let agent = lab
        .start_agent_programmed(&args)
        .expect("agent programs the datapath");
    agent
        .wait_for_log("attached socket hooks", Duration::from_secs(5))
        .expect("socket hooks attached");
    agent
}

fn assert_spread(o: &Outcome, count: usize, vip: &str, agent: &Agent<'_>) {
    assert!(
        o.errors.is_empty(),
        "errors: {:?}\nagent:\n{}",
        &o.errors[..o.errors.len().min(5)],
        agent.log_tail(20)
    );
    assert_eq!(o.per_backend.values().sum::<usize>(), count);
    for i in 0..3 {
        let n = o
            .per_backend
            .get(&format!("backend-{i}"))
            .copied()
            .unwrap_or(0);
        assert!(
            n * 100 >= count * 15,
            "backend-{i} got {n}/{count}: {:?}",
            o.per_backend
        );
    }
    assert_eq!(
        o.addrs.keys().collect::<Vec<_>>(),
        vec![vip],
        "the application must see the VIP: {:?}",
        o.addrs
    );
}

#[test]
fn host_process_reaches_cluster_ip_over_tcp_and_udp() {
    let lab = Lab::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let agent = start(&lab, &cgroup);
    let http = format!("{DEMO_VIP}:{HTTP_PORT}");
    let dns = format!("{DEMO_VIP}:{DNS_PORT}");

    let o = host_process(&lab, Some(&cgroup), "tcp", &http, 300);
    assert_spread(&o, 300, &http, &agent);
    let o = host_process(&lab, Some(&cgroup), "udp-sendto", &dns, 300);
    assert_spread(&o, 300, &dns, &agent);
    let o = host_process(&lab, Some(&cgroup), "udp-connect", &dns, 300);
    assert_spread(&o, 300, &dns, &agent);
    drop(agent);
}

#[test]
fn sockets_of_other_network_namespaces_are_left_to_the_packet_path() {
    let lab = Lab::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let _agent = start(&lab, &cgroup);
    let translated = || {
        proxy_userspace::inspect::Pinned::read(&lab.bpffs_dir())
            .unwrap()
            .stats[proxy_common::stat::SOCK_TRANSLATED as usize]
    };
    let http = format!("{DEMO_VIP}:{HTTP_PORT}");
    let before = translated();
    host_process(&lab, Some(&cgroup), "tcp", &http, 10);
    assert_eq!(translated(), before + 10, "node sockets are translated");
    // The same cgroup, but the client pod's namespace: the hooks run and
    // must leave the socket alone; the pod-facing TC program serves it.
    let o = host_process_in(lab.client(), Some(&cgroup), "tcp", &http, 10);
    assert_eq!(o.per_backend.values().sum::<usize>(), 10, "{:?}", o.errors);
    assert_eq!(translated(), before + 10, "a pod's socket was translated");
}

#[test]
fn host_process_to_service_without_endpoints_is_refused_at_once() {
    let lab = Lab::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let _agent = start(&lab, &cgroup);
    for (mode, port) in [("tcp", HTTP_PORT), ("udp-connect", DNS_PORT)] {
        let o = host_process(
            &lab,
            Some(&cgroup),
            mode,
            &format!("{EMPTY_VIP}:{port}"),
            20,
        );
        assert_eq!(o.errors.len(), 20, "{mode}: {:?}", o.per_backend);
        assert!(
            o.errors.iter().all(|e| e.starts_with("err refused")),
            "{mode}: {:?}",
            o.errors
        );
        // 20 refusals, including process start, well under one timeout.
        assert!(
            o.elapsed < Duration::from_secs(1),
            "{mode}: {:?}",
            o.elapsed
        );
    }
}

#[test]
fn processes_outside_the_cgroup_are_not_translated() {
    let lab = Lab::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let _agent = start(&lab, &cgroup);
    // The node namespace has no route to the service CIDR: untranslated,
    // the connection cannot even leave.
    let o = host_process(&lab, None, "tcp", &format!("{DEMO_VIP}:{HTTP_PORT}"), 5);
    assert!(
        o.per_backend.is_empty(),
        "translated outside the cgroup: {:?}",
        o.per_backend
    );
    assert_eq!(o.errors.len(), 5);
}

/// A host process reaches a Service whose endpoint is its own node (the API
/// server behind `default/kubernetes` on a control-plane node): its socket
/// is sent to the node's own address, over TCP and UDP, and the
/// application sees the VIP.
#[test]
fn host_process_reaches_its_own_node_as_an_endpoint() {
    let lab = Lab::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 1);
    lab.write_manifest(
        "kubernetes.yaml",
        &yaml::node_endpoint_service(
            &yaml::Svc::cluster_ip(
                "kubernetes",
                vip,
                vec![
                    yaml::SvcPort::new("https", 443, "TCP", "9090"),
                    yaml::SvcPort::new("dns", 53, "UDP", "9053"),
                ],
            ),
            lab::addr::CLIENT_GW,
            lab::LAB_NODE,
        ),
    )
    .unwrap();
    let agent = start_with_socket_lb(&lab, &cgroup);
    let mut servers = lab::servers::Servers::new();
    servers.start(lab.node(), "node", 9090, 9053).unwrap();
    for (mode, target) in [
        ("tcp", format!("{vip}:443")),
        ("udp-sendto", format!("{vip}:53")),
        ("udp-connect", format!("{vip}:53")),
    ] {
        let o = host_process(&lab, Some(&cgroup), mode, &target, 20);
        assert!(
            o.errors.is_empty(),
            "{mode}: {:?}\n{}",
            o.errors,
            agent.log_tail(20)
        );
        assert_eq!(o.per_backend.get("node"), Some(&20), "{mode}");
        assert_eq!(o.addrs.get(&target), Some(&20), "{mode}: {:?}", o.addrs);
    }
    servers.stop();
}
