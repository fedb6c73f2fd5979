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
    start_with_args(lab, cgroup, &[])
}

/// [`start_with_socket_lb`] with `extra` arguments.
fn start_with_args<'l>(lab: &'l Lab, cgroup: &TestCgroup, extra: &[&str]) -> Agent<'l> {
    let mut args: Vec<OsString> = vec![
        "--manifests".into(),
        lab.manifest_dir().into(),
        "--socket-lb-cgroup".into(),
        cgroup.path().into(),
    ];
    args.extend(extra.iter().map(OsString::from));
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

/// The socket hooks are kept attached as the TC and XDP ones are: detached
/// behind the agent's back (`bpftool link detach`, as the conformance row
/// "should recreate its iptables rules if they are deleted" does), they are
/// attached again within 2 s, so host processes reach ClusterIPs again
/// (they got ENETUNREACH until the agent restarted).
#[test]
fn detached_socket_hooks_are_attached_again() {
    let lab = Lab::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let agent = start(&lab, &cgroup);
    let links = proxy_userspace::datapath::links_dir(&lab.bpffs_dir());
    let pins: Vec<std::path::PathBuf> = std::fs::read_dir(&links)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("cgroup-")
        })
        .collect();
    // connect, sendmsg, recvmsg and getpeername, of each family.
    assert_eq!(pins.len(), 8, "{pins:?}");
    // Every id first: the agent may re-pin under the same name at once.
    let ids: Vec<String> = pins
        .iter()
        .map(|pin| {
            let out = Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(pin)
                .output()
                .expect("run bpftool");
            assert!(out.status.success(), "{out:?}");
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            info["id"].as_u64().expect("link id").to_string()
        })
        .collect();
    let mark = agent.log_mark();
    for id in &ids {
        let status = Command::new("bpftool")
            .args(["link", "detach", "id", id])
            .status()
            .unwrap();
        assert!(status.success());
    }
    agent
        .wait_for_log_since(mark, "socket hooks were detached", Duration::from_secs(2))
        .expect("re-attached within 2 s");
    let http = format!("{DEMO_VIP}:{HTTP_PORT}");
    let o = host_process(&lab, Some(&cgroup), "tcp", &http, 30);
    assert_spread(&o, 30, &http, &agent);
}

/// The lab's demo Service as an IPv6-only one (its endpoints' IPv6
/// addresses, the same servers), and `empty6` without endpoints.
fn write_ipv6_services(lab: &Lab) {
    use lab::addr::{DEMO_VIP6, EMPTY_VIP6, backend_ip6};
    use lab::yaml::{Svc, SvcPort, endpoint_slice};
    let ports = || {
        vec![
            SvcPort::new("http", HTTP_PORT, "TCP", "http"),
            SvcPort::new("dns", DNS_PORT, "UDP", "dns"),
        ]
    };
    let eps: Vec<_> = (0..3)
        .map(|i| (backend_ip6(i), lab::backend_name(i), true))
        .collect();
    let slice = endpoint_slice(
        "demo6-lab",
        "demo6",
        &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        &eps,
    );
    let demo6 = Svc::cluster_ip6("demo6", DEMO_VIP6, ports()).render();
    let empty6 = Svc::cluster_ip6("empty6", EMPTY_VIP6, ports()).render();
    lab.write_manifest("demo6.yaml", &format!("{demo6}---\n{slice}"))
        .unwrap();
    lab.write_manifest("empty6.yaml", &empty6).unwrap();
}

/// IPv6 sockets of host processes: an IPv6 cluster IP is spread over its
/// IPv6 endpoints over TCP and UDP (both send styles), the application
/// sees the cluster IP as its peer and reply source; a Service without
/// endpoints refuses at once; an unallocated address inside the IPv6
/// service CIDR is dropped (the socket learns it at once); and an IPv6
/// socket addressing an IPv4 cluster IP by its IPv4-mapped address (how
/// dual-stack applications reach IPv4 Services) is sent to the IPv4
/// endpoints and sees the mapped cluster IP.
#[test]
fn host_process_reaches_ipv6_cluster_ips_and_ipv4_ones_through_mapped_addresses() {
    let lab = Lab::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    write_ipv6_services(&lab);
    let (cidr6, len6) = lab::addr::SERVICE_CIDR6;
    let cidrs = format!("10.96.0.0/16,{cidr6}/{len6}");
    let agent = start_with_args(&lab, &cgroup, &["--service-cidr", &cidrs]);

    let vip6 = lab::addr::DEMO_VIP6;
    let http = format!("[{vip6}]:{HTTP_PORT}");
    let dns = format!("[{vip6}]:{DNS_PORT}");
    let o = host_process(&lab, Some(&cgroup), "tcp", &http, 150);
    assert_spread(&o, 150, &http, &agent);
    let o = host_process(&lab, Some(&cgroup), "udp-sendto", &dns, 150);
    assert_spread(&o, 150, &dns, &agent);
    let o = host_process(&lab, Some(&cgroup), "udp-connect", &dns, 150);
    assert_spread(&o, 150, &dns, &agent);

    let empty = lab::addr::EMPTY_VIP6;
    for (mode, port) in [("tcp", HTTP_PORT), ("udp-connect", DNS_PORT)] {
        let o = host_process(&lab, Some(&cgroup), mode, &format!("[{empty}]:{port}"), 10);
        assert_eq!(o.errors.len(), 10, "{mode}: {:?}", o.per_backend);
        assert!(
            o.errors.iter().all(|e| e.starts_with("err refused")),
            "{mode}: {:?}",
            o.errors
        );
    }
    let unallocated = lab::addr::service_ip6(0x7777);
    let o = host_process(
        &lab,
        Some(&cgroup),
        "tcp",
        &format!("[{unallocated}]:{HTTP_PORT}"),
        5,
    );
    assert_eq!(o.errors.len(), 5, "{:?}", o.per_backend);
    assert!(
        o.errors.iter().all(|e| e.starts_with("err timeout")),
        "{:?}",
        o.errors
    );
    assert!(o.elapsed < Duration::from_secs(1), "{:?}", o.elapsed);

    let mapped = format!("[::ffff:{DEMO_VIP}]:{HTTP_PORT}");
    let o = host_process(&lab, Some(&cgroup), "tcp", &mapped, 150);
    assert_spread(&o, 150, &mapped, &agent);
    let mapped_dns = format!("[::ffff:{DEMO_VIP}]:{DNS_PORT}");
    let o = host_process(&lab, Some(&cgroup), "udp-sendto", &mapped_dns, 150);
    assert_spread(&o, 150, &mapped_dns, &agent);
}
