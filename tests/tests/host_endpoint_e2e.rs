//! Services whose endpoint is a node itself (a hostNetwork pod, the
//! kube-apiserver behind `default/kubernetes`, a node-local DNS cache, a
//! hostNetwork ingress controller), end to end: pods on the same node and
//! on another node, and external clients through a NodePort with
//! externalTrafficPolicy Cluster and Local; TCP and UDP. (A host process
//! reaching its own node's endpoint through socket-level load balancing is
//! in `socket_lb_e2e`.)
//!
//! Needs root and the agent binary; fails loudly without them.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use lab::addr::CLIENT_GW;
use lab::cluster::{Cluster, ClusterConfig, Whoami, tcp_whoami, udp_whoami};
use lab::servers::Servers;
use lab::yaml::{Svc, SvcPort};
use lab::{Agent, LAB_NODE, Lab, Netns, yaml};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const TCP_PORT: u16 = 443;
const UDP_PORT: u16 = 53;
/// Where the node's own servers listen (0.0.0.0).
const HOST_TCP: u16 = 9090;
const HOST_UDP: u16 = 9053;
const NODE_PORT_TCP: u16 = 30090;
const NODE_PORT_UDP: u16 = 30053;
const TIMEOUT: Duration = Duration::from_secs(2);
const ROUNDS: usize = 20;

/// Service `kubernetes` at [`VIP`] (TCP 443 -> 9090, UDP 53 -> 9053), as
/// `kind` (with externalTrafficPolicy Local when `local`), whose one
/// endpoint is `node_ip` on node `node`.
fn host_service(kind: &str, local: bool, node_ip: Ipv4Addr, node: &str) -> String {
    let node_port = |p: SvcPort, n| {
        if kind == "ClusterIP" {
            p
        } else {
            p.node_port(n)
        }
    };
    let mut svc = Svc::cluster_ip(
        "kubernetes",
        VIP,
        vec![
            node_port(
                SvcPort::new("https", TCP_PORT, "TCP", &HOST_TCP.to_string()),
                NODE_PORT_TCP,
            ),
            node_port(
                SvcPort::new("dns", UDP_PORT, "UDP", &HOST_UDP.to_string()),
                NODE_PORT_UDP,
            ),
        ],
    )
    .of_type(kind);
    svc.external_traffic_local = local;
    yaml::node_endpoint_service(&svc, node_ip, node)
}

/// `ROUNDS` TCP and `ROUNDS` UDP whoami requests from `from` to `ip`
/// (`tcp_port`, `udp_port`), each answered by `server` from the address
/// asked; returns what the server saw as the client's address.
fn exchange(
    from: &Netns,
    ip: Ipv4Addr,
    (tcp_port, udp_port): (u16, u16),
    server: &str,
    log: &dyn Fn() -> String,
) -> Vec<SocketAddr> {
    let mut seen = Vec::new();
    for round in 0..ROUNDS {
        for (what, target, result) in [
            ("TCP", SocketAddrV4::new(ip, tcp_port), {
                tcp_whoami(from, SocketAddrV4::new(ip, tcp_port), TIMEOUT)
            }),
            ("UDP", SocketAddrV4::new(ip, udp_port), {
                udp_whoami(from, SocketAddrV4::new(ip, udp_port), TIMEOUT)
            }),
        ] {
            let w: Whoami = result
                .unwrap_or_else(|e| panic!("round {round}: {what} to {target}: {e}\n{}", log()));
            assert_eq!(w.backend, server, "{what} to {target}");
            assert_eq!(
                w.reply_from,
                SocketAddr::V4(target),
                "{what}: the reply comes from what the client asked"
            );
            seen.push(w.seen_from);
        }
    }
    seen
}

/// A pod reaches a Service whose endpoint is its own node's address on the
/// pod's link; the node's answers, which leave by the pod veth's egress,
/// come back from the VIP.
#[test]
fn pods_reach_a_host_endpoint_on_their_own_node() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest(
        "kubernetes.yaml",
        &host_service("ClusterIP", false, CLIENT_GW, LAB_NODE),
    )
    .unwrap();
    let agent = lab.start_manifest_agent().expect("agent programs");
    let mut servers = Servers::new();
    servers
        .start(lab.node(), "node", HOST_TCP, HOST_UDP)
        .expect("servers on the node");
    let log = || agent.log_tail(20);
    let seen = exchange(lab.client(), VIP, (TCP_PORT, UDP_PORT), "node", &log);
    assert!(
        seen.iter().all(|a| a.ip() == lab::addr::CLIENT_IP),
        "the node sees the pod's own address: {seen:?}"
    );
    servers.stop();
}

/// The same with the endpoint at another of the node's addresses (its end
/// of a backend pod's link): the node's UDP server, bound to 0.0.0.0,
/// answers from the address its route to the client prefers (its end of
/// the client's link), not the one it was reached at, yet the client hears
/// the VIP (netfilter, hence kube-proxy, would lose that answer). TCP
/// answers always come from the address connected to.
#[test]
fn a_host_endpoint_answering_udp_from_another_node_address_is_translated() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let endpoint = lab::addr::backend_gw(0);
    assert_ne!(
        endpoint, CLIENT_GW,
        "the answer must leave from another address"
    );
    lab.write_manifest(
        "kubernetes.yaml",
        &host_service("ClusterIP", false, endpoint, LAB_NODE),
    )
    .unwrap();
    let agent = lab.start_manifest_agent().expect("agent programs");
    let mut servers = Servers::new();
    servers
        .start(lab.node(), "node", HOST_TCP, HOST_UDP)
        .expect("servers on the node");
    let log = || agent.log_tail(20);
    exchange(lab.client(), VIP, (TCP_PORT, UDP_PORT), "node", &log);
    servers.stop();
}

fn node_args() -> Vec<OsString> {
    vec!["--node-interfaces".into(), "eth0".into()]
}

fn cluster_with_host_servers() -> Cluster {
    let mut cluster = Cluster::with_config(ClusterConfig {
        backends_per_node: [0, 0],
        ..ClusterConfig::default()
    })
    .expect("cluster lab (needs root)");
    for k in 0..2 {
        cluster
            .serve_on_node(k, &format!("node-{k}"), HOST_TCP, HOST_UDP)
            .expect("servers on the node");
    }
    cluster
}

fn both_logs(agents: &[Agent<'_>; 2]) -> String {
    format!(
        "node 0:\n{}\nnode 1:\n{}",
        agents[0].log_tail(15),
        agents[1].log_tail(15)
    )
}

/// A pod reaches a Service whose endpoint is another node: the request
/// crosses the fabric, that node answers from its own address, and the
/// answer is reversed where it comes back in.
#[test]
fn pods_reach_a_host_endpoint_on_another_node() {
    let cluster = cluster_with_host_servers();
    cluster
        .write_manifest(
            "kubernetes.yaml",
            &host_service("ClusterIP", false, cluster.node_ip(1), "node-1"),
        )
        .unwrap();
    let args = node_args();
    let agents = cluster.start_agents([&args, &args]).expect("agents");
    let log = || both_logs(&agents);
    let seen = exchange(
        &cluster.client(0).netns,
        VIP,
        (TCP_PORT, UDP_PORT),
        "node-1",
        &log,
    );
    assert!(
        seen.iter().all(|a| a.ip() == cluster.client(0).ip),
        "no SNAT for cluster traffic: {seen:?}"
    );
}

/// An external client reaches a NodePort whose endpoint is the node it
/// asked. With externalTrafficPolicy Cluster as with Local the request is
/// delivered to the node's own socket with the client's address kept
/// (masquerading it to the node's own address could not be answered, and
/// kube-proxy's masquerade in POSTROUTING never sees locally delivered
/// packets either); the answer, sent by the node, is reversed at its
/// interface's egress. Both with the XDP fast path and TC alone.
#[test]
fn a_nodeport_reaches_a_host_endpoint_on_the_node_asked() {
    let cluster = cluster_with_host_servers();
    let node0 = cluster.node_ip(0);
    for xdp in ["native", "off"] {
        for policy in ["Cluster", "Local"] {
            cluster
                .write_manifest(
                    "kubernetes.yaml",
                    &host_service("NodePort", policy == "Local", node0, "node-0"),
                )
                .unwrap();
            let mut args = node_args();
            args.extend(["--xdp-mode".into(), xdp.into()]);
            let agents = cluster.start_agents([&args, &args]).expect("agents");
            let log = || format!("XDP {xdp}, policy {policy}:\n{}", both_logs(&agents));
            let seen = exchange(
                cluster.ext(),
                node0,
                (NODE_PORT_TCP, NODE_PORT_UDP),
                "node-0",
                &log,
            );
            assert!(
                seen.iter().all(|a| a.ip() == lab::cluster::addr::EXT_IP),
                "XDP {xdp}, policy {policy}: the node sees the client: {seen:?}"
            );
            // Through the other node (policy Cluster only: Local drops
            // where there is no local endpoint).
            if policy == "Cluster" {
                let seen = exchange(
                    cluster.ext(),
                    cluster.node_ip(1),
                    (NODE_PORT_TCP, NODE_PORT_UDP),
                    "node-0",
                    &log,
                );
                assert!(
                    seen.iter().all(|a| a.ip() == cluster.node_ip(1)),
                    "masqueraded to node 1: {seen:?}"
                );
            }
        }
    }
}
