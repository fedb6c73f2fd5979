//! The fast path (`--fast-path`, on by default): a Service flow between two
//! pods of one node is delivered into each pod with `bpf_redirect_peer`
//! once its first reply has shown where the endpoint is, so the node's
//! routing and netfilter see only the flow's first packets; with
//! `--fast-path off` they see every packet, as with kube-proxy.
//!
//! Needs root and the agent binary; fails without them, never skips.

use std::time::Duration;

use lab::addr::{CLIENT_IP, DEMO_VIP, HTTP_PORT, backend_ip};
use lab::{Lab, loadgen, yaml};
use proxy_common::stat;

const EXCHANGES: usize = 200;

/// Packets the node's netfilter forwarded to `addr` (an ACCEPT rule in
/// FORWARD counting them; the lab node's own namespace).
fn forwarded_to(lab: &Lab, addr: std::net::Ipv4Addr) -> u64 {
    let rules = lab
        .node()
        .exec("iptables", &["-w", "-L", "FORWARD", "-v", "-x", "-n"])
        .expect("list FORWARD");
    rules
        .lines()
        .find(|l| l.split_whitespace().nth(8) == Some(&addr.to_string()))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rule for {addr}:\n{rules}"))
}

#[test]
fn pod_to_service_to_pod_skips_the_node_stack_unless_turned_off() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0])).unwrap();
    let (backend, client) = (backend_ip(0), CLIENT_IP);
    for addr in [backend, client] {
        lab.node()
            .exec(
                "iptables",
                &[
                    "-w",
                    "-A",
                    "FORWARD",
                    "-d",
                    &addr.to_string(),
                    "-j",
                    "ACCEPT",
                ],
            )
            .expect("counting rule");
    }
    let mut seen = Vec::new();
    for fast in ["on", "off"] {
        let agent = lab
            .start_manifest_agent_with(&["--fast-path", fast])
            .expect("agent programs");
        let before = (forwarded_to(&lab, backend), forwarded_to(&lab, client));
        let target = std::net::SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
        let report = lab.client().run(move || {
            loadgen::tcp_session_requests(
                target,
                EXCHANGES,
                Duration::from_secs(2),
                Duration::from_secs(60),
            )
        });
        assert_eq!(
            report.ok,
            EXCHANGES as u64,
            "fast path {fast}: {report:?}\n{}",
            agent.log_tail(20)
        );
        let requests = forwarded_to(&lab, backend) - before.0;
        let replies = forwarded_to(&lab, client) - before.1;
        let peer = agent.counter(stat::FAST_PATH_PEER).unwrap();
        println!(
            "fast path {fast}: forwarded by the node {requests} requests, {replies} replies; {peer} delivered past it"
        );
        seen.push((requests, replies, peer));
        drop(agent);
    }
    let (on, off) = (seen[0], seen[1]);
    // On: the SYN takes the stack (nothing is known yet); its answer already
    // goes into the client past it, and everything after both ways.
    assert!(on.0 <= 2 && on.1 <= 1, "fast path on: {on:?}");
    assert!(on.2 >= 2 * EXCHANGES as u64, "fast path on: {on:?}");
    // Off: every packet through the node's stack.
    assert!(
        off.0 >= EXCHANGES as u64 && off.1 >= EXCHANGES as u64,
        "fast path off: {off:?}"
    );
    assert_eq!(off.2, 0, "fast path off: {off:?}");
}
