//! sessionAffinity: ClientIP end to end, the cases Kubernetes' conformance
//! tests check (and other eBPF proxies have failed): one client stays on one
//! endpoint, clients are independent, the choice is free again after the
//! timeout passes idle, and a removed endpoint releases its clients.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::addr::backend_ip;
use lab::loadgen::{self, Report};
use lab::{Agent, LAB_NODE, Lab, Netns, yaml};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const TIMEOUT_S: u32 = 2;

fn manifests(backends: &[usize]) -> String {
    let svc = yaml::service("sticky", &VIP.to_string(), &[("http", 80, "TCP", "http")], "sticky")
        .replace(
            "spec:\n",
            &format!(
                "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {TIMEOUT_S}\n"
            ),
        );
    let mut slice = String::from(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-lab
  namespace: default
  labels:
    kubernetes.io/service-name: sticky
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
",
    );
    for i in backends {
        slice.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {LAB_NODE}\n",
            backend_ip(*i)
        ));
    }
    format!("{svc}---\n{slice}")
}

fn connections(ns: &Netns, n: usize) -> Report {
    let target = SocketAddrV4::new(VIP, 80);
    ns.run(move || {
        loadgen::tcp_requests(target, n, Duration::from_secs(2), Duration::from_secs(30))
    })
}

/// The one backend every connection of `r` reached.
fn only_backend(r: &Report, agent: &Agent<'_>) -> String {
    assert_eq!(r.error_count(), 0, "{r}\n{}", agent.log_tail(20));
    let used: BTreeMap<_, _> = r.per_backend.iter().filter(|(_, n)| **n > 0).collect();
    assert_eq!(used.len(), 1, "affinity broken: {r}");
    used.keys().next().unwrap().to_string()
}

#[test]
fn client_ip_affinity_end_to_end() {
    let lab = Lab::new().unwrap();
    lab.write_manifest("sticky.yaml", &manifests(&[0, 1, 2]))
        .unwrap();
    let agent = lab
        .start_manifest_agent()
        .expect("agent programs the datapath");

    // 200 connections from one client: one endpoint.
    let kept = only_backend(&connections(lab.client(), 200), &agent);
    // Another client (another address) has its own, equally sticky, choice.
    only_backend(&connections(lab.backend(2), 100), &agent);

    // Idle past the timeout: the next choice is free again. A fresh random
    // choice equals the old one a third of the time, so try a few periods.
    let mut current = kept;
    let mut moved = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(u64::from(TIMEOUT_S) * 1000 + 1000));
        let next = only_backend(&connections(lab.client(), 20), &agent);
        moved = next != current;
        current = next;
        if moved {
            break;
        }
    }
    assert!(moved, "the choice never changed after idle periods");

    // Removing the client's endpoint moves it, at once, to one other.
    let gone: usize = current.trim_start_matches("backend-").parse().unwrap();
    let keep: Vec<usize> = (0..3).filter(|i| *i != gone).collect();
    let mark = agent.log_mark();
    lab.write_manifest("sticky.yaml", &manifests(&keep))
        .unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(5))
        .unwrap();
    let after = only_backend(&connections(lab.client(), 50), &agent);
    assert_ne!(after, current, "still on the removed endpoint");
}
