//! Issue 17.4, kube-proxy's CVE-2020-8554: a Service may list another
//! Service's cluster IP among its `externalIPs`. kube-proxy (and this agent
//! before) let the Service whose namespace sorts first take the address;
//! here the cluster IP, allocated by the API server, always keeps it, the
//! other Service's claim is refused with one warning naming both, and
//! `kep_service_ips_refused` counts it.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::{Lab, backend_name, loadgen};

const PROGRAMMED: &str = "datapath programmed";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);

/// A ClusterIP Service on port 80 with backend `backend` as its endpoint,
/// in `namespace`, with `external_ips`.
fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    external_ips: &str,
    backend: usize,
) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {cluster_ip}
  externalIPs: [{external_ips}]
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: other, port: 81, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: other, port: 8080}}]
endpoints:
- addresses: [\"{}\"]
",
        lab::addr::backend_ip(backend)
    )
}

#[test]
fn a_cluster_ip_is_not_taken_by_another_services_external_ip() {
    let lab = Lab::new().unwrap();
    // The owner serves port 80 only; `aaa` (sorting before `kube-system`)
    // lists the owner's cluster IP as an external IP, on 80 and 81.
    let owner = service("kube-system", "owner", &CLUSTER_IP.to_string(), "", 0)
        .replace(", {name: other, port: 81, targetPort: 8080}", "");
    lab.write_manifest("owner.yaml", &owner).unwrap();
    lab.write_manifest(
        "thief.yaml",
        &service(
            "aaa",
            "thief",
            "10.96.0.41",
            &format!("\"{CLUSTER_IP}\""),
            1,
        ),
    )
    .unwrap();
    let agent = lab.start_agent(&lab.manifest_dir()).unwrap();
    agent
        .wait_for_log(PROGRAMMED, Duration::from_secs(30))
        .unwrap();

    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    let r = lab.client().run(move || {
        loadgen::tcp_requests(target, 30, Duration::from_secs(2), Duration::from_secs(60))
    });
    assert_eq!(
        (r.ok, r.count(&backend_name(0))),
        (30, 30),
        "every connection to the cluster IP reaches its own Service: {r}\n{}",
        agent.log_tail(20)
    );
    // Nor does the thief get a port the owner does not serve: the cluster
    // IP rejects it, as any port it lacks.
    let other = SocketAddrV4::new(CLUSTER_IP, 81);
    let probe = lab
        .client()
        .run(move || loadgen::tcp_probe(other, Duration::from_millis(700)));
    assert_eq!(
        probe.error_kind(),
        Some(loadgen::ErrorKind::Refused),
        "port 81 of the owner's cluster IP: {probe:?}"
    );
    // The thief keeps its own cluster IP.
    let own = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 41), 81);
    let r = lab.client().run(move || {
        loadgen::tcp_requests(own, 5, Duration::from_secs(2), Duration::from_secs(30))
    });
    assert_eq!(r.count(&backend_name(1)), 5, "{r}");

    let logs = agent.logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("is the cluster IP of"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{logs}"));
    assert!(
        warning.contains("Service aaa/thief") && warning.contains("Service kube-system/owner"),
        "{warning}"
    );
    assert_eq!(logs.matches("is the cluster IP of").count(), 1, "{logs}");
    let metrics = lab.node().run(|| {
        lab::hostile::probe(
            None,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
            "/metrics",
            Duration::from_secs(10),
        )
    });
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l == "kep_service_ips_refused 1"),
        "{}",
        metrics.body
    );
}
