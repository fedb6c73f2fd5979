//! End-to-end ClusterIP tests: a lab with 3 backends, manifests written in
//! the test, the real agent in the node namespace, traffic from the client.
//!
//! They need root and the agent binary (`KEP_AGENT_BIN` or
//! `target/debug/kube-ebpf-proxy`): without them they fail, they never skip.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use lab::addr::{DEMO_VIP, DNS_PORT, EMPTY_VIP, HTTP_PORT};
use lab::loadgen::{self, ErrorKind, Report};
use lab::{Agent, Lab, yaml};

const PER_REQUEST: Duration = Duration::from_secs(2);
const BATCH_DEADLINE: Duration = Duration::from_secs(60);
const PROGRAMMED: &str = "datapath programmed";
const AGENT_READY: Duration = Duration::from_secs(30);

fn http() -> SocketAddrV4 {
    SocketAddrV4::new(DEMO_VIP, HTTP_PORT)
}

fn dns() -> SocketAddrV4 {
    SocketAddrV4::new(DEMO_VIP, DNS_PORT)
}

/// A lab with `demo.yaml` (all 3 backends) and `empty.yaml`, and the agent
/// started and programmed.
fn lab_with_agent(lab: &Lab) -> Agent<'_> {
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    lab.write_manifest("empty.yaml", &yaml::empty()).unwrap();
    let agent = lab
        .start_agent(&lab.manifest_dir())
        .expect("start the agent");
    agent
        .wait_for_log(PROGRAMMED, AGENT_READY)
        .expect("agent programs the datapath");
    agent
}

fn tcp(n: usize) -> impl FnOnce() -> Report + Send {
    move || loadgen::tcp_requests(http(), n, PER_REQUEST, BATCH_DEADLINE)
}

fn udp(n: usize) -> impl FnOnce() -> Report + Send {
    move || loadgen::udp_requests(dns(), n, PER_REQUEST, BATCH_DEADLINE)
}

/// Zero errors, and every reply came from `vip`.
fn assert_clean(r: &Report, vip: SocketAddrV4, agent: &Agent<'_>) {
    assert_eq!(
        r.error_count(),
        0,
        "{r}\nagent output:\n{}",
        agent.log_tail(30)
    );
    assert_eq!(r.ok, r.requested, "{r}");
    assert_eq!(
        r.peers.iter().copied().collect::<Vec<_>>(),
        vec![SocketAddr::V4(vip)],
        "replies must come from the VIP\n{r}"
    );
}

#[test]
fn clusterip_tcp_udp_spread() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = lab_with_agent(&lab);

    let (t, u) = lab.client().run(|| (tcp(1000)(), udp(1000)()));
    println!("{t}\n{u}");
    for (r, vip) in [(&t, http()), (&u, dns())] {
        assert_clean(r, vip, &agent);
        assert_eq!(r.per_backend.len(), 3, "all 3 backends answer\n{r}");
        for i in 0..3 {
            let name = lab::backend_name(i);
            assert!(
                r.share(&name) >= 0.20,
                "{name} got {:.1}% (< 20%)\n{r}",
                r.share(&name) * 100.0
            );
        }
    }
    // The backends saw the real client address (no SNAT).
    for i in 0..3 {
        let stats = lab.backend_stats(i);
        assert_eq!(
            stats.peers.into_iter().collect::<Vec<_>>(),
            vec![std::net::IpAddr::from(lab::addr::CLIENT_IP)]
        );
    }
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}

#[test]
fn endpoint_removed_stops_new_connections() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = lab_with_agent(&lab);

    // Before: backend-2 is in use.
    let before = lab.client().run(tcp(60));
    assert_clean(&before, http(), &agent);
    assert!(before.count("backend-2") > 0, "{before}");

    let mark = agent.log_mark();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1]))
        .unwrap();
    agent
        .wait_for_log_since(mark, PROGRAMMED, AGENT_READY)
        .expect("agent re-programs after the EndpointSlice change");
    std::thread::sleep(Duration::from_secs(1));

    let (t, u) = lab.client().run(|| (tcp(300)(), udp(300)()));
    println!("{t}\n{u}");
    for (r, vip) in [(&t, http()), (&u, dns())] {
        assert_clean(r, vip, &agent);
        assert_eq!(r.count("backend-2"), 0, "removed endpoint still used\n{r}");
        assert!(r.count("backend-0") > 0 && r.count("backend-1") > 0, "{r}");
    }
}

#[test]
fn no_endpoints_refused_quickly() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = lab_with_agent(&lab);

    let tcp_target = SocketAddrV4::new(EMPTY_VIP, HTTP_PORT);
    let udp_target = SocketAddrV4::new(EMPTY_VIP, DNS_PORT);
    let (t, u) = lab.client().run(move || {
        (
            loadgen::tcp_probe(tcp_target, Duration::from_secs(3)),
            loadgen::udp_connected_request(udp_target, Duration::from_secs(3)),
        )
    });
    println!("TCP {tcp_target}: {t:?}\nUDP {udp_target}: {u:?}");
    assert_eq!(
        t.error_kind(),
        Some(ErrorKind::Refused),
        "TCP to a service without endpoints must be refused: {t:?}\nagent:\n{}",
        agent.log_tail(30)
    );
    assert!(
        t.elapsed < Duration::from_secs(1),
        "refusal took {:?}",
        t.elapsed
    );
    assert_eq!(
        u.error_kind(),
        Some(ErrorKind::Refused),
        "connected UDP to a service without endpoints must get ECONNREFUSED: {u:?}"
    );
    assert!(
        u.elapsed < Duration::from_secs(1),
        "refusal took {:?}",
        u.elapsed
    );
}

#[test]
fn bad_manifest_does_not_break_others() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = lab_with_agent(&lab);

    let mark = agent.log_mark();
    lab.write_manifest(
        "broken-syntax.yaml",
        "kind: Service\nmetadata: [unclosed\n  : {\n",
    )
    .unwrap();
    lab.write_manifest(
        "bad-cluster-ip.yaml",
        &yaml::service(
            "bad-cluster-ip",
            "not-an-ip",
            &[("http", 80, "TCP", "8080")],
            "demo",
        ),
    )
    .unwrap();
    lab.write_manifest(
        "bad-protocol.yaml",
        &yaml::service(
            "bad-protocol",
            "10.96.0.12",
            &[("http", 80, "FOO", "8080")],
            "demo",
        ),
    )
    .unwrap();

    // Each bad file/object is named (both stems are also the object names).
    for needle in ["broken-syntax", "bad-cluster-ip", "bad-protocol"] {
        agent
            .wait_for_log_since(mark, needle, AGENT_READY)
            .unwrap_or_else(|e| panic!("agent output never names {needle}: {e:#}"));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        agent.is_running(),
        "agent died on bad manifests:\n{}",
        agent.log_tail(40)
    );

    let t = lab.client().run(tcp(100));
    println!("{t}");
    assert_clean(&t, http(), &agent);
    assert_eq!(t.per_backend.len(), 3, "{t}");
    assert!(agent.is_running(), "{}", agent.log_tail(40));
}
