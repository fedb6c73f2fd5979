//! Issue 17.7: the manifest directory disappearing is an outage of the
//! source, not every Service being deleted. The agent keeps what the maps
//! hold (traffic keeps flowing), `/readyz` answers 503 naming why and
//! `kep_source_available` is 0 until the directory is back; then it is
//! read again and the agent is ready. (Before, the agent programmed 0
//! frontends while healthy and ready.)
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::addr::{CLIENT_GW, DEMO_VIP, HTTP_PORT};
use lab::{Agent, Lab, backend_name, loadgen, yaml};

const PROGRAMMED: &str = "datapath programmed";
const AGENT_READY: Duration = Duration::from_secs(30);
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
const HEALTH: SocketAddrV4 = SocketAddrV4::new(CLIENT_GW, 10256);

fn get(lab: &Lab, addr: SocketAddrV4, path: &str) -> (u16, String) {
    lab.agent_get(addr, path).unwrap()
}

/// Every one of 30 connections to the demo Service reaches backend 0.
fn served_by_backend_0(lab: &Lab, agent: &Agent<'_>, when: &str) {
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let r = lab.client().run(move || {
        loadgen::tcp_requests(target, 30, Duration::from_secs(2), Duration::from_secs(60))
    });
    assert_eq!(
        (r.ok, r.count(&backend_name(0))),
        (30, 30),
        "{when}: {r}\n{}",
        agent.log_tail(20)
    );
}

fn source_available(lab: &Lab) -> String {
    let (_, body) = get(lab, METRICS, "/metrics");
    body.lines()
        .find(|l| l.starts_with("kep_source_available "))
        .unwrap_or_else(|| panic!("no kep_source_available:\n{body}"))
        .to_string()
}

#[test]
fn a_vanished_manifest_directory_keeps_the_maps_and_is_not_ready() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0])).unwrap();
    let agent = lab.start_agent(&lab.manifest_dir()).unwrap();
    agent.wait_for_log(PROGRAMMED, AGENT_READY).unwrap();
    agent.wait_for_log("serving /healthz", AGENT_READY).unwrap();
    agent.wait_for_log("serving /metrics", AGENT_READY).unwrap();
    assert_eq!(get(&lab, HEALTH, "/readyz").0, 200);
    served_by_backend_0(&lab, &agent, "before the outage");

    // The directory goes (renamed away, so it can come back whole, as a
    // ConfigMap volume's may during a remount).
    let away = lab.dir().join("manifests.away");
    std::fs::rename(lab.manifest_dir(), &away).unwrap();
    agent
        .wait_for_log("cannot list directory", AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(20)));
    // What the maps held is still served.
    served_by_backend_0(&lab, &agent, "during the outage");
    agent
        .wait_for_log("source unavailable", AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(20)));
    let (status, body) = get(&lab, HEALTH, "/readyz");
    assert_eq!(status, 503, "/readyz during the outage: {body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let why = body["sourceUnavailable"].as_str().unwrap_or_default();
    assert!(why.contains("manifests"), "names the directory: {body}");
    assert_eq!(source_available(&lab), "kep_source_available 0");
    // The liveness probe is not failed by an outage: restarting the agent
    // would not bring the directory back.
    assert_eq!(get(&lab, HEALTH, "/healthz").0, 200);

    let mark = agent.log_mark();
    std::fs::rename(&away, lab.manifest_dir()).unwrap();
    agent
        .wait_for_log_since(mark, "source available again", AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(20)));
    assert_eq!(get(&lab, HEALTH, "/readyz").0, 200);
    assert_eq!(source_available(&lab), "kep_source_available 1");
    served_by_backend_0(&lab, &agent, "after the outage");
    // Each edge logged once, not once per look for the directory.
    assert_eq!(agent.log_count("source unavailable"), 1, "{}", agent.logs());
    assert_eq!(agent.log_count("source available again"), 1);
}
