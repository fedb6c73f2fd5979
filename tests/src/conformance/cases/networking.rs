//! test/e2e/network/networking.go: `[sig-network] Networking ...`,
//! mostly `Granular Checks: Services`. Upstream's NetworkingTestConfig is
//! one netexec endpoint pod per node behind a NodePort Service (http and
//! udp), a test pod, a hostNetwork test pod, and a ClientIP Service; the
//! lab's is the same with one backend pod per node.

use std::net::SocketAddr;

use anyhow::{Result, bail, ensure};

use super::*;
use crate::conformance::check::{all_answer, fails};
use crate::conformance::env::{Client, Proto};
use crate::yaml::IpFamilyPolicy;

pub(super) fn cases() -> Vec<Case> {
    macro_rules! row {
        ($name:literal, $f:expr) => {
            Case::run(
                concat!("[sig-network] Networking Granular Checks: Services ", $name),
                $f,
            )
        };
    }
    vec![
        row!("should function for pod-Service: http", |env| function_for(
            env,
            Client::Pod(0),
            Proto::Tcp
        )),
        row!("should function for pod-Service: udp", |env| function_for(
            env,
            Client::Pod(0),
            Proto::Udp
        )),
        row!(
            "should function for node-Service: http",
            |env| function_for(env, Client::Host(0), Proto::Tcp)
        ),
        row!("should function for node-Service: udp", |env| function_for(
            env,
            Client::Host(0),
            Proto::Udp
        )),
        row!("should function for endpoint-Service: http", |env| {
            function_for(env, Client::Backend(0, 0), Proto::Tcp)
        }),
        row!("should function for endpoint-Service: udp", |env| {
            function_for(env, Client::Backend(0, 0), Proto::Udp)
        }),
        row!(
            "should function for multiple endpoint-Services with same selector",
            same_selector
        ),
        row!("should update endpoints: http", |env| update_endpoints(
            env,
            Proto::Tcp
        )),
        row!("should update endpoints: udp", |env| update_endpoints(
            env,
            Proto::Udp
        )),
        row!("should update nodePort: http [Slow]", |env| {
            update_node_port(env, Proto::Tcp)
        }),
        row!("should support basic nodePort: udp functionality", |env| {
            config(env, &endpoints(env, &ENDPOINT_PODS))?;
            let target = at(env.node_ip(0), NODE_PORT_UDP);
            all_answer(
                env,
                Client::Host(0),
                Proto::Udp,
                target,
                &names(env, &ENDPOINT_PODS),
            )
        }),
        row!(
            "should update nodePort: udp [Slow]",
            |env| update_node_port(env, Proto::Udp)
        ),
        row!(
            "should function for client IP based session affinity: http [LinuxOnly]",
            |env| { session_affinity(env, Proto::Tcp) }
        ),
        row!(
            "should function for client IP based session affinity: udp [LinuxOnly]",
            |env| { session_affinity(env, Proto::Udp) }
        ),
        row!("should be able to handle large requests: http", |env| {
            large_request(env, Proto::Tcp, false)
        }),
        row!("should be able to handle large requests: udp", |env| {
            large_request(env, Proto::Udp, false)
        }),
        row!(
            "should function for service endpoints using hostNetwork",
            host_network_endpoints
        ),
        Case::run(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for node-Service: http",
            |env| secondary_family_from_node(env, Proto::Tcp),
        ),
        Case::run(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for node-Service: udp",
            |env| secondary_family_from_node(env, Proto::Udp),
        ),
        Case::run(
            "[sig-network] Networking should recreate its iptables rules if they are deleted [Disruptive]",
            recreate_rules,
        ),
        Case::run(
            "[sig-network] Networking should check kube-proxy urls",
            kube_proxy_urls,
        ),
    ]
}

/// Upstream's ClusterHTTPPort / ClusterUDPPort and NodePorts.
const HTTP: u16 = 80;
const UDP: u16 = 90;

/// The test config's Services: `node-port-service` (NodePort, http and udp)
/// and `session-affinity-service` (ClientIP), both on one endpoint pod per
/// node, or on `endpoints` when given.
fn config(env: &Env<'_>, endpoints: &[SliceEndpoint]) -> Result<()> {
    let ports = vec![
        tcp("http", HTTP, &POD_TCP.to_string()).node_port(NODE_PORT),
        udp("udp", UDP, &POD_UDP.to_string()).node_port(NODE_PORT_UDP),
    ];
    let slice_ports = [("http", POD_TCP, "TCP"), ("udp", POD_UDP, "UDP")];
    let np = Svc::cluster_ip("node-port-service", CIP, ports.clone()).of_type("NodePort");
    publish(
        env,
        &np,
        &[slice(&np.name, 1, &slice_ports, endpoints.to_vec())],
    )?;
    let mut sa = Svc::cluster_ip(
        "session-affinity-service",
        CIP2,
        ports
            .into_iter()
            .map(|p| SvcPort {
                node_port: None,
                ..p
            })
            .collect(),
    );
    sa.client_ip_affinity = Some(None);
    publish(
        env,
        &sa,
        &[slice(&sa.name, 1, &slice_ports, endpoints.to_vec())],
    )
}

const ENDPOINT_PODS: [(usize, usize); 2] = [(0, 0), (1, 0)];

/// Upstream's dual-stack test config (`EnableDualStack`): the NodePort
/// Service with a cluster IP of each family (IPv4 primary) and a slice of
/// each family on the same pods.
fn config_dual_stack(env: &Env<'_>, pods: &[(usize, usize)]) -> Result<()> {
    let ports = vec![
        tcp("http", HTTP, &POD_TCP.to_string()).node_port(NODE_PORT),
        udp("udp", UDP, &POD_UDP.to_string()).node_port(NODE_PORT_UDP),
    ];
    let slice_ports = [("http", POD_TCP, "TCP"), ("udp", POD_UDP, "UDP")];
    let np = Svc::cluster_ip("node-port-service", CIP, ports)
        .dual_stack(CIP6.into(), IpFamilyPolicy::RequireDualStack)
        .of_type("NodePort");
    let v6: Vec<SliceEndpoint> = pods.iter().map(|&(k, j)| env.endpoint6(k, j)).collect();
    publish(
        env,
        &np,
        &[
            slice(&np.name, 1, &slice_ports, endpoints(env, pods)),
            slice(&np.name, 2, &slice_ports, v6),
        ],
    )
}

/// The Secondary IP Family's node-Service rows: a hostNetwork client
/// dials the IPv6 cluster IP and the NodePort on the node's IPv6 address
/// (served by the agent's IPv6 socket hooks); every endpoint answers.
fn secondary_family_from_node(env: &Env<'_>, proto: Proto) -> Result<()> {
    config_dual_stack(env, &ENDPOINT_PODS)?;
    let (port, node_port) = port_of(proto);
    let want = names(env, &ENDPOINT_PODS);
    let from = Client::Host(0);
    all_answer(env, from, proto, SocketAddr::new(CIP6.into(), port), &want)?;
    let node = SocketAddr::new(env.node_ip6(0).into(), node_port);
    all_answer(env, from, proto, node, &want)
}

fn port_of(proto: Proto) -> (u16, u16) {
    match proto {
        Proto::Tcp => (HTTP, NODE_PORT),
        Proto::Udp => (UDP, NODE_PORT_UDP),
    }
}

/// Dial the cluster IP and a node's NodePort; every endpoint answers.
fn function_for(env: &Env<'_>, from: Client, proto: Proto) -> Result<()> {
    config(env, &endpoints(env, &ENDPOINT_PODS))?;
    let (port, node_port) = port_of(proto);
    let want = names(env, &ENDPOINT_PODS);
    all_answer(env, from, proto, at(CIP, port), &want)?;
    all_answer(env, from, proto, at(env.node_ip(0), node_port), &want)
}

/// DeleteNetProxyPod: one endpoint pod goes away; the rest answer, only.
fn update_endpoints(env: &Env<'_>, proto: Proto) -> Result<()> {
    config(env, &endpoints(env, &ENDPOINT_PODS))?;
    let (port, _) = port_of(proto);
    all_answer(
        env,
        Client::Pod(0),
        proto,
        at(CIP, port),
        &names(env, &ENDPOINT_PODS),
    )?;
    env.kill_pod(0, 0)?;
    config(env, &endpoints(env, &[(1, 0)]))?;
    all_answer(
        env,
        Client::Pod(0),
        proto,
        at(CIP, port),
        &names(env, &[(1, 0)]),
    )
}

/// A second NodePort Service on the same pods keeps working when the first
/// is deleted.
fn same_selector(env: &Env<'_>) -> Result<()> {
    const SECOND_NODE_PORT: u16 = 30082;
    let eps = endpoints(env, &ENDPOINT_PODS);
    config(env, &eps)?;
    let second = Svc::cluster_ip(
        "node-port-service-2",
        CIP3,
        vec![tcp("http", HTTP, &POD_TCP.to_string()).node_port(SECOND_NODE_PORT)],
    )
    .of_type("NodePort");
    publish(
        env,
        &second,
        &[slice(&second.name, 1, &[("http", POD_TCP, "TCP")], eps)],
    )?;
    let want = names(env, &ENDPOINT_PODS);
    let from = Client::Backend(0, 0);
    let node = env.node_ip(0);
    for target in [
        at(CIP, HTTP),
        at(node, NODE_PORT),
        at(CIP3, HTTP),
        at(node, SECOND_NODE_PORT),
    ] {
        all_answer(env, from, Proto::Tcp, target, &want)?;
    }
    unpublish(env, "node-port-service")?;
    for target in [at(CIP3, HTTP), at(node, SECOND_NODE_PORT)] {
        all_answer(env, from, Proto::Tcp, target, &want)?;
    }
    Ok(())
}

/// DeleteNodePortService: the node's NodePort stops answering (upstream
/// expects 10 tries out of 10 to fail).
fn update_node_port(env: &Env<'_>, proto: Proto) -> Result<()> {
    config(env, &endpoints(env, &ENDPOINT_PODS))?;
    let (_, node_port) = port_of(proto);
    let target = at(env.node_ip(0), node_port);
    all_answer(
        env,
        Client::Host(0),
        proto,
        target,
        &names(env, &ENDPOINT_PODS),
    )?;
    unpublish(env, "node-port-service")?;
    for _ in 0..10 {
        fails(env, Client::Host(0), proto, target)?;
    }
    Ok(())
}

/// GetEndpointsFromTestContainer with SessionAffinityChecks (10): exactly
/// one endpoint answers.
fn session_affinity(env: &Env<'_>, proto: Proto) -> Result<()> {
    config(env, &endpoints(env, &ENDPOINT_PODS))?;
    let (port, _) = port_of(proto);
    let mut seen = std::collections::BTreeSet::new();
    for r in env.requests(Client::Pod(0), proto, at(CIP2, port), 10, 0) {
        seen.insert(r?.backend);
    }
    ensure!(
        seen.len() == 1,
        "Unexpected endpoints return: {seen:?}, expect 1 endpoints"
    );
    Ok(())
}

/// DialEchoFromTestContainer: the endpoint echoes a 2,000-byte message
/// ("42" x 1000 over http; "n" + 1,999 "o" over udp, more than one
/// Ethernet frame, so the datagram travels as IP fragments).
fn large_request(env: &Env<'_>, proto: Proto, host_network: bool) -> Result<()> {
    if !host_network {
        config(env, &endpoints(env, &ENDPOINT_PODS))?;
    }
    let message = match proto {
        Proto::Tcp => "42".repeat(1000),
        Proto::Udp => format!("n{}", "o".repeat(1999)),
    };
    let (port, _) = port_of(proto);
    let target = at(CIP, port);
    let ns = &env.cluster.client(0).netns;
    let m = message.clone();
    let reply = ns.try_run(move || echo(proto, target, &m))?.map_err(|e| {
        anyhow::anyhow!(
            "{} echo of {} bytes to {target}: {e}",
            proto.name(),
            message.len()
        )
    })?;
    ensure!(
        reply == message,
        "echo of {} bytes came back as {} bytes",
        message.len(),
        reply.len()
    );
    Ok(())
}

fn echo(proto: Proto, target: SocketAddrV4, message: &str) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let timeout = crate::conformance::env::REQUEST_TIMEOUT;
    let request = format!("{}{message}\n", crate::servers::ECHO);
    match proto {
        Proto::Tcp => {
            let mut s = std::net::TcpStream::connect_timeout(&target.into(), timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(request.as_bytes())?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim_end().to_string())
        }
        Proto::Udp => {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(timeout))?;
            s.connect(target)?;
            s.send(request.trim_end().as_bytes())?;
            let mut buf = vec![0u8; 65536];
            let n = s.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
    }
}

/// Upstream's endpoints are hostNetwork pods (the node's address, answering
/// with the node's name): pod-Service, node-Service and large requests.
fn host_network_endpoints(env: &Env<'_>) -> Result<()> {
    for k in 0..2 {
        env.serve(env.cluster.node_ns(k), &env.node_name(k), POD_TCP, POD_UDP)?;
    }
    config(env, &[env.host_endpoint(0), env.host_endpoint(1)])?;
    let want = [env.node_name(0), env.node_name(1)];
    for from in [Client::Pod(0), Client::Host(0)] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let (port, node_port) = port_of(proto);
            all_answer(env, from, proto, at(CIP, port), &want)?;
            all_answer(env, from, proto, at(env.node_ip(0), node_port), &want)?;
        }
    }
    large_request(env, Proto::Tcp, true)?;
    large_request(env, Proto::Udp, true)
}

/// Upstream deletes every KUBE-* iptables chain on a node and waits for
/// kube-proxy to bring the Service back. The agent's equivalent of its
/// rules are the links it pinned: all of node 0's are detached, and the
/// Service must answer again from a hostNetwork pod and a pod on node 0
/// (upstream allows KubeProxyLagTimeout, 5 min; here 10 s).
fn recreate_rules(env: &Env<'_>) -> Result<()> {
    let pods = [(0, 0), (0, 1), (1, 0)];
    let (svc, slices) = web(env, "iptables-flush-test", CIP, &pods);
    publish(env, &svc, &slices)?;
    let want = names(env, &pods);
    let up = || -> Result<()> {
        for from in [Client::Host(0), Client::Pod(0)] {
            all_answer(env, from, Proto::Tcp, at(CIP, 80), &want)?;
        }
        Ok(())
    };
    up()?;
    let detached = env.detach_agent_links(0)?;
    ensure!(detached > 0, "node-0's agent pinned no links");
    // Nothing translates on node 0 until the agent notices.
    crate::conformance::env::eventually(std::time::Duration::from_secs(10), up)
}

/// From a hostNetwork pod: kube-proxy's healthz port (10256) answers
/// `/healthz` with 200 and a `lastUpdated` field, its status port (10249)
/// `/proxyMode` with 200.
fn kube_proxy_urls(env: &Env<'_>) -> Result<()> {
    let node = Client::Host(0);
    let (code, body) = env.http_get(node, at(env.node_ip(0), 10256), "/healthz")?;
    ensure!(code == 200, "GET :10256/healthz: {code}: {body}");
    ensure!(
        body.contains("lastUpdated"),
        "GET :10256/healthz has no lastUpdated: {body}"
    );
    let (code, body) = env.http_get(node, at(Ipv4Addr::LOCALHOST, 10249), "/proxyMode")?;
    if code != 200 {
        bail!("GET 127.0.0.1:10249/proxyMode: {code}: {body}");
    }
    Ok(())
}
