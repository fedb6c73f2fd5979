//! Maps near capacity (issue 17, item 8): replacing a Service's endpoints
//! with `--backends-max 8` used to fail the new backends' writes, point the
//! slots at nothing and delete the old ones (a 52 s TCP outage, until the
//! next resync); one Service with 100 endpoints filled `--services-max 64`
//! and no later Service was programmed, while `/readyz` stayed 200 and one
//! error line was logged per op per sync.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lab::addr::{DEMO_VIP, HTTP_PORT};
use lab::{Agent, Lab, LabConfig, hostile, loadgen, yaml};

const PROGRAMMED: &str = "datapath programmed";

fn get(lab: &Lab, port: u16, path: &str) -> (u16, String) {
    let path = path.to_string();
    let r = lab.node().run(move || {
        hostile::probe(
            None,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            &path,
            Duration::from_secs(5),
        )
    });
    (r.status.unwrap_or(0), r.body)
}

/// Polls `/readyz` until its status is `want`.
fn readyz_becomes(lab: &Lab, agent: &Agent<'_>, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(lab, 10256, "/readyz");
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} ({body}), want {want}:\n{}",
            agent.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn answers(lab: &Lab, vip: Ipv4Addr) -> loadgen::Report {
    let target = SocketAddrV4::new(vip, HTTP_PORT);
    lab.client().run(move || {
        loadgen::tcp_requests(target, 20, Duration::from_secs(2), Duration::from_secs(20))
    })
}

#[test]
fn endpoints_are_replaced_without_an_outage_in_a_nearly_full_backends_map() {
    let lab = Lab::with_config(LabConfig {
        backends: 6,
        ..LabConfig::default()
    })
    .expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    // demo: three endpoints on two ports, 6 backends of 8.
    let agent = lab
        .start_manifest_agent_with(&["--backends-max", "8"])
        .expect("agent programs the datapath");

    let prober = loadgen::Prober::start(
        lab.client(),
        SocketAddrV4::new(DEMO_VIP, HTTP_PORT),
        10,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mark = agent.log_mark();
    lab.write_manifest("demo.yaml", &yaml::demo(&[3, 4, 5]))
        .unwrap();
    agent
        .wait_for_log_since(mark, PROGRAMMED, Duration::from_secs(10))
        .expect("the change is programmed");
    // Whatever retries there are come within 2 s.
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed, samples) = prober.stop();
    assert!(ok > 50, "too few requests to mean anything: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the change: {samples:?}\n{}",
        ok + failed,
        agent.log_tail(20)
    );
    let r = answers(&lab, DEMO_VIP);
    assert_eq!(r.error_count(), 0, "{r}");
    let new: u64 = (3..6).map(|i| r.count(&lab::backend_name(i))).sum();
    assert_eq!(new, r.ok, "only the new endpoints answer: {r}");
    readyz_becomes(&lab, &agent, 200);
    assert!(
        !agent.log_contains("not programmed"),
        "{}",
        agent.log_tail(20)
    );
}

#[test]
fn a_service_too_big_for_the_map_is_held_and_reported_once() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    // 100 endpoints (no traffic goes to them): 102 services-map entries.
    let big_eps: Vec<(Ipv4Addr, String, bool)> = (0..100u8)
        .map(|i| (Ipv4Addr::new(10, 244, 250, i + 1), format!("big-{i}"), true))
        .collect();
    let big = format!(
        "{}---\n{}",
        yaml::service("big", "10.96.7.1", &[("http", 80, "TCP", "8080")], "big"),
        yaml::endpoint_slice("big-1", "big", &[("http", 8080, "TCP")], &big_eps)
    );
    lab.write_manifest("big.yaml", &big).unwrap();
    let agent = lab
        .start_manifest_agent_with(&["--services-max", "64"])
        .expect("agent programs the datapath");
    let r = answers(&lab, DEMO_VIP);
    assert_eq!(r.error_count(), 0, "demo is programmed: {r}");

    // A Service added later is programmed too.
    let later = Ipv4Addr::new(10, 96, 0, 12);
    let mark = agent.log_mark();
    lab.write_manifest(
        "later.yaml",
        &yaml::service(
            "later",
            &later.to_string(),
            &[("http", 80, "TCP", "http")],
            "demo",
        )
        .replace("name: later", "name: demo-later"),
    )
    .unwrap();
    lab.write_manifest(
        "later-slice.yaml",
        &yaml::endpoint_slice(
            "demo-later-1",
            "demo-later",
            &[("http", 8080, "TCP")],
            &[(lab::addr::backend_ip(0), lab::backend_name(0), true)],
        ),
    )
    .unwrap();
    agent
        .wait_for_log_since(mark, PROGRAMMED, Duration::from_secs(10))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut r = answers(&lab, later);
    while r.error_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        r = answers(&lab, later);
    }
    assert_eq!(
        r.error_count(),
        0,
        "the later Service: {r}\n{}",
        agent.log_tail(20)
    );

    // Not ready, with the reason, and counted.
    let body = readyz_becomes(&lab, &agent, 503);
    assert!(body.contains("programming incomplete"), "{body}");
    let (status, metrics) = get(&lab, 10249, "/metrics");
    assert_eq!(status, 200);
    let incomplete = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kep_programming_incomplete "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(incomplete, Some(1.0), "{metrics}");
    // Retried a few times by now (200 ms, then doubling), one warning.
    std::thread::sleep(Duration::from_secs(2));
    let warned = agent.log_count("not programmed, retrying: Service default/big");
    assert_eq!(warned, 1, "{}", agent.log_tail(20));
    assert!(
        agent.log_contains("map kep_services is full: raise --services-max"),
        "{}",
        agent.log_tail(20)
    );
    let longest = agent.logs().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");

    // The operator removes it: ready again.
    lab.remove_manifest("big.yaml").unwrap();
    readyz_becomes(&lab, &agent, 200);
    let r = answers(&lab, DEMO_VIP);
    assert_eq!(r.error_count(), 0, "{r}");
}
