//! Endpoint changes must not break connections that should live: 20
//! long-lived TCP connections keep exchanging data, with zero errors, while
//! the Service is scaled 3 -> 6 -> 2 (scale-up must not move them; scale-down
//! turns the endpoint some of them use into a terminating one, which gets no
//! new flows but keeps its existing ones).
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::addr::backend_ip;
use lab::loadgen::{self, TcpSession};
use lab::{Agent, LAB_NODE, Lab, LabConfig};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);

/// `ready` endpoints, plus `terminating` ones (ready false, serving true).
fn manifests(ready: &[usize], terminating: &[usize]) -> String {
    let mut s = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: http}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-lab
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
"
    );
    for i in ready {
        s.push_str(&format!(
            "- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: {LAB_NODE}}}\n",
            backend_ip(*i)
        ));
    }
    for i in terminating {
        s.push_str(&format!(
            "- {{addresses: [\"{}\"], conditions: {{ready: false, serving: true, terminating: true}}, nodeName: {LAB_NODE}}}\n",
            backend_ip(*i)
        ));
    }
    s
}

fn apply(lab: &Lab, agent: &Agent<'_>, ready: &[usize], terminating: &[usize]) {
    let mark = agent.log_mark();
    lab.write_manifest("web.yaml", &manifests(ready, terminating))
        .unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(5))
        .unwrap();
}

/// One request on every session; each must answer with its own backend.
fn exchange(lab: &Lab, sessions: &mut Vec<(TcpSession, String)>, phase: &str) {
    let taken = std::mem::take(sessions);
    *sessions = lab.client().run(move || {
        taken
            .into_iter()
            .map(|(mut s, name)| {
                let got = s.request().unwrap_or_else(|e| {
                    panic!("{phase}: long-lived connection to {name} failed: {e}")
                });
                assert_eq!(got, name, "{phase}: connection moved to another backend");
                (s, name)
            })
            .collect()
    });
}

#[test]
fn long_lived_connections_survive_scale_up_and_down() {
    let lab = Lab::with_config(LabConfig {
        backends: 6,
        ..LabConfig::default()
    })
    .unwrap();
    lab.write_manifest("web.yaml", &manifests(&[0, 1, 2], &[]))
        .unwrap();
    let agent = lab
        .start_manifest_agent()
        .expect("agent programs the datapath");
    let target = SocketAddrV4::new(VIP, 80);
    let mut sessions: Vec<(TcpSession, String)> = lab.client().run(move || {
        (0..20)
            .map(|_| {
                let mut s = TcpSession::connect(target, Duration::from_secs(2)).unwrap();
                let name = s.request().unwrap();
                (s, name)
            })
            .collect()
    });
    let used: std::collections::BTreeSet<String> =
        sessions.iter().map(|(_, n)| n.clone()).collect();
    exchange(&lab, &mut sessions, "start");

    // Scale up to 6: every connection stays where it is.
    apply(&lab, &agent, &[0, 1, 2, 3, 4, 5], &[]);
    for round in 0..5 {
        exchange(
            &lab,
            &mut sessions,
            &format!("after scale-up, round {round}"),
        );
    }
    // Scale down to 2: backend-2 terminates (no new flows, existing ones
    // continue), 3..5 go away (no connection uses them).
    apply(&lab, &agent, &[0, 1], &[2]);
    for round in 0..5 {
        exchange(
            &lab,
            &mut sessions,
            &format!("after scale-down, round {round}"),
        );
    }
    // New connections reach only the two ready endpoints.
    let r = lab.client().run(move || {
        loadgen::tcp_requests(target, 100, Duration::from_secs(2), Duration::from_secs(20))
    });
    assert_eq!(r.error_count(), 0, "{r}");
    assert_eq!(r.count("backend-0") + r.count("backend-1"), 100, "{r}");
    assert!(
        used.len() > 1,
        "all 20 connections on one backend: {used:?}"
    );
}
