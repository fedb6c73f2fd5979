//! test/e2e/network/service.go: `[sig-network] Services ...`.

use std::io::ErrorKind;
use std::time::Duration;

use anyhow::{Result, bail, ensure};

use super::*;
use crate::conformance::check::{self, affinity, all_answer, answers, fails, refused};
use crate::conformance::env::{Client, Proto, pod_conditions};

pub(super) fn cases() -> Vec<Case> {
    macro_rules! row {
        ($name:literal, $f:expr) => {
            Case::run(concat!("[sig-network] Services ", $name), $f)
        };
    }
    vec![
        row!(
            "should serve a basic endpoint from pods [Conformance]",
            basic_endpoint
        ),
        row!(
            "should serve multiport endpoints from pods [Conformance]",
            multiport
        ),
        row!(
            "should be updated after adding or deleting ports ",
            adding_deleting_ports
        ),
        row!(
            "should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]",
            preserve_source_ip
        ),
        row!(
            "should allow pods to hairpin back to themselves through services",
            hairpin
        ),
        row!("should be able to up and down services", up_and_down),
        row!(
            "should work after the service has been recreated",
            recreated
        ),
        row!(
            "should work after restarting kube-proxy [Disruptive]",
            restart_proxy
        ),
        row!(
            "should be able to create a functioning NodePort service [Conformance]",
            functioning_node_port
        ),
        row!(
            "should be possible to connect to a service via ExternalIP when the external IP is not assigned to a node",
            external_ip_not_on_node
        ),
        row!(
            "should be able to update service type to NodePort listening on same port number but different protocols",
            node_port_same_port_two_protocols
        ),
        row!(
            "should be able to change the type from ExternalName to ClusterIP [Conformance]",
            external_name_to_cluster_ip
        ),
        row!(
            "should be able to change the type from ExternalName to NodePort [Conformance]",
            external_name_to_node_port
        ),
        row!(
            "should be able to change the type from ClusterIP to ExternalName [Conformance]",
            cluster_ip_to_external_name
        ),
        row!(
            "should be able to change the type from NodePort to ExternalName [Conformance]",
            node_port_to_external_name
        ),
        row!("should release NodePorts on delete", release_node_ports),
        row!("should create endpoints for unready pods", unready_pods),
        row!(
            "should be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is true",
            terminating_unready_published
        ),
        row!(
            "should not be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is false",
            terminating_unready_not_published
        ),
        row!(
            "should have session affinity work for service with type clusterIP [LinuxOnly] [Conformance]",
            |env| affinity_works(env, false)
        ),
        row!(
            "should have session affinity timeout work for service with type clusterIP [LinuxOnly]",
            |env| affinity_timeout(env, false)
        ),
        row!(
            "should be able to switch session affinity for service with type clusterIP [LinuxOnly] [Conformance]",
            |env| affinity_switch(env, false)
        ),
        row!(
            "should have session affinity work for NodePort service [LinuxOnly] [Conformance]",
            |env| affinity_works(env, true)
        ),
        row!(
            "should have session affinity timeout work for NodePort service [LinuxOnly]",
            |env| affinity_timeout(env, true)
        ),
        row!(
            "should be able to switch session affinity for NodePort service [LinuxOnly] [Conformance]",
            |env| affinity_switch(env, true)
        ),
        row!(
            "should implement service.kubernetes.io/service-proxy-name",
            |env| { label_toggle(env, "service.kubernetes.io/service-proxy-name", "foo-bar") }
        ),
        row!("should implement service.kubernetes.io/headless", |env| {
            label_toggle(env, "service.kubernetes.io/headless", "")
        }),
        row!(
            "should be rejected when no endpoints exist",
            rejected_without_endpoints
        ),
        row!(
            "should be rejected for evicted pods (no endpoints exist)",
            rejected_evicted
        ),
        row!(
            "should respect internalTrafficPolicy=Local Pod to Pod",
            |env| { itp_local(env, [Client::Pod(0), Client::Pod(1)]) }
        ),
        row!(
            "should respect internalTrafficPolicy=Local Pod (hostNetwork: true) to Pod",
            |env| { itp_local(env, [Client::Host(0), Client::Host(1)]) }
        ),
        row!(
            "should respect internalTrafficPolicy=Local Pod and Node, to Pod (hostNetwork: true)",
            itp_local_to_host_network_pod
        ),
        row!(
            "should support externalTrafficPolicy=Local for type=NodePort",
            etp_local_node_port
        ),
        row!(
            "should fail health check node port if there are only terminating endpoints",
            health_check_only_terminating
        ),
        row!(
            "should fallback to terminating endpoints when there are no ready endpoints with internalTrafficPolicy=Cluster",
            |env| fallback_cluster_ip(env, false)
        ),
        row!(
            "should fallback to local terminating endpoints when there are no ready endpoints with internalTrafficPolicy=Local",
            |env| fallback_cluster_ip(env, true)
        ),
        row!(
            "should fallback to terminating endpoints when there are no ready endpoints with externallTrafficPolicy=Cluster",
            |env| fallback_node_port(env, false)
        ),
        row!(
            "should fallback to local terminating endpoints when there are no ready endpoints with externalTrafficPolicy=Local",
            |env| fallback_node_port(env, true)
        ),
        row!(
            "should implement NodePort and HealthCheckNodePort correctly when ExternalTrafficPolicy changes",
            etp_changes
        ),
        row!(
            "should connect to the named ports exposed by restartable init containers",
            restartable_init_container_port
        ),
        row!(
            "should support named targetPorts that resolve to different ports on different endpoints",
            named_target_ports_differ
        ),
        row!(
            "should serve endpoints on same port and different protocols [Conformance]",
            same_port_protocols
        ),
        row!(
            "should serve endpoints on same port and different protocol for internal traffic on Type LoadBalancer ",
            same_port_protocols_lb
        ),
    ]
}

/// From where the "exec pod" asks: both nodes' client pods.
const EXEC_PODS: [Client; 2] = [Client::Pod(0), Client::Pod(1)];

fn reach_from(
    env: &Env<'_>,
    clients: &[Client],
    proto: Proto,
    target: SocketAddrV4,
    want: &[String],
) -> Result<()> {
    for &c in clients {
        all_answer(env, c, proto, target, want)?;
    }
    Ok(())
}

/// Both exec pods reach every one of `pods` through port `port` of the
/// cluster IP.
fn pods_reach(env: &Env<'_>, port: u16, pods: &[(usize, usize)]) -> Result<()> {
    reach_from(
        env,
        &EXEC_PODS,
        Proto::Tcp,
        at(CIP, port),
        &names(env, pods),
    )
}

fn basic_endpoint(env: &Env<'_>) -> Result<()> {
    let (svc, _) = web(env, "endpoint-test2", CIP, &[]);
    let steps: [&[(usize, usize)]; 4] = [&[], &[(0, 0)], &[(0, 0), (1, 0)], &[(1, 0)]];
    for pods in steps {
        let (_, slices) = web(env, "endpoint-test2", CIP, pods);
        publish(env, &svc, &slices)?;
        if pods.is_empty() {
            refused(env, Client::Pod(0), at(CIP, 80))?;
        } else {
            pods_reach(env, 80, pods)?;
        }
    }
    let (_, slices) = web(env, "endpoint-test2", CIP, &[]);
    publish(env, &svc, &slices)?;
    refused(env, Client::Pod(0), at(CIP, 80))
}

/// Pod 1 serves container port 100 named svc1, pod 2 port 101 named svc2
/// (the controller makes one slice per port set).
fn multiport_slices(env: &Env<'_>, svc: &str, pod1: bool, pod2: bool) -> Vec<Slice> {
    let mut v = Vec::new();
    if pod1 {
        v.push(slice(
            svc,
            1,
            &[("portname1", 100, "TCP")],
            endpoints(env, &[(0, 0)]),
        ));
    }
    if pod2 {
        v.push(slice(
            svc,
            2,
            &[("portname2", 101, "TCP")],
            endpoints(env, &[(1, 0)]),
        ));
    }
    v
}

fn serve_multiport(env: &Env<'_>) -> Result<()> {
    env.serve(
        &env.cluster.backend(0, 0).netns,
        &env.pod_name(0, 0),
        100,
        100,
    )?;
    env.serve(
        &env.cluster.backend(1, 0).netns,
        &env.pod_name(1, 0),
        101,
        101,
    )
}

fn multiport(env: &Env<'_>) -> Result<()> {
    serve_multiport(env)?;
    let svc = Svc::cluster_ip(
        "multi-endpoint-test",
        CIP,
        vec![tcp("portname1", 80, "svc1"), tcp("portname2", 81, "svc2")],
    );
    let n = "multi-endpoint-test";
    publish(env, &svc, &multiport_slices(env, n, true, false))?;
    pods_reach(env, 80, &[(0, 0)])?;
    publish(env, &svc, &multiport_slices(env, n, true, true))?;
    pods_reach(env, 80, &[(0, 0)])?;
    pods_reach(env, 81, &[(1, 0)])?;
    publish(env, &svc, &multiport_slices(env, n, false, true))?;
    refused(env, Client::Pod(0), at(CIP, 80))?;
    pods_reach(env, 81, &[(1, 0)])?;
    publish(env, &svc, &[])?;
    refused(env, Client::Pod(0), at(CIP, 81))
}

fn adding_deleting_ports(env: &Env<'_>) -> Result<()> {
    serve_multiport(env)?;
    let n = "edit-port-test";
    let mut svc = Svc::cluster_ip(n, CIP, vec![tcp("portname1", 80, "svc1")]);
    publish(env, &svc, &multiport_slices(env, n, true, false))?;
    pods_reach(env, 80, &[(0, 0)])?;
    svc.ports.push(tcp("portname2", 81, "svc2"));
    publish(env, &svc, &multiport_slices(env, n, true, true))?;
    pods_reach(env, 80, &[(0, 0)])?;
    pods_reach(env, 81, &[(1, 0)])?;
    svc.ports.pop();
    publish(env, &svc, &multiport_slices(env, n, true, true))?;
    pods_reach(env, 80, &[(0, 0)])?;
    // A port the Service no longer has is kube-proxy's REJECT.
    refused(env, Client::Pod(0), at(CIP, 81))
}

fn preserve_source_ip(env: &Env<'_>) -> Result<()> {
    let (svc, slices) = web(env, "sourceip-test", CIP, &[(0, 0)]);
    let svc = Svc {
        ports: vec![tcp("http", 8080, "8080")],
        ..svc
    };
    publish(env, &svc, &slices)?;
    // One pause pod per node, as upstream's anti-affine deployment.
    for c in EXEC_PODS {
        let w = answers(env, c, Proto::Tcp, at(CIP, 8080), &env.pod_name(0, 0))?;
        check::source_preserved(&w)?;
    }
    Ok(())
}

fn hairpin(env: &Env<'_>) -> Result<()> {
    let (svc, slices) = web(env, "hairpin-test", CIP, &[(0, 0)]);
    publish(env, &svc, &slices)?;
    all_answer(
        env,
        Client::Backend(0, 0),
        Proto::Tcp,
        at(CIP, 80),
        &names(env, &[(0, 0)]),
    )
}

/// verifyServeHostnameServiceUp: from a hostNetwork pod and a pod.
fn up(env: &Env<'_>, ip: Ipv4Addr, pods: &[(usize, usize)]) -> Result<()> {
    reach_from(
        env,
        &[Client::Host(0), Client::Pod(0)],
        Proto::Tcp,
        at(ip, 80),
        &names(env, pods),
    )
}

/// verifyServeHostnameServiceDown: from a hostNetwork pod, no answer.
fn down(env: &Env<'_>, ip: Ipv4Addr) -> Result<()> {
    fails(env, Client::Host(0), Proto::Tcp, at(ip, 80)).map(|_| ())
}

fn up_and_down(env: &Env<'_>) -> Result<()> {
    const PODS: [[(usize, usize); 3]; 3] = [
        [(0, 0), (0, 1), (1, 0)],
        [(0, 2), (1, 1), (1, 2)],
        [(0, 1), (1, 0), (1, 2)],
    ];
    let svcs: Vec<(Svc, Vec<Slice>)> =
        [("up-down-1", CIP), ("up-down-2", CIP2), ("up-down-3", CIP3)]
            .iter()
            .zip(PODS)
            .map(|(&(n, ip), pods)| web(env, n, ip, &pods))
            .collect();
    for (svc, slices) in &svcs[..2] {
        publish(env, svc, slices)?;
    }
    up(env, CIP, &PODS[0])?;
    up(env, CIP2, &PODS[1])?;
    unpublish(env, "up-down-1")?;
    down(env, CIP)?;
    up(env, CIP2, &PODS[1])?;
    publish(env, &svcs[2].0, &svcs[2].1)?;
    up(env, CIP2, &PODS[1])?;
    up(env, CIP3, &PODS[2])
}

/// Upstream deletes the kube-proxy pod (so it restarts); here node 0's
/// agent is killed with SIGKILL and started again.
fn restart_proxy(env: &Env<'_>) -> Result<()> {
    const PODS: [[(usize, usize); 3]; 2] = [[(0, 0), (0, 1), (1, 0)], [(0, 2), (1, 1), (1, 2)]];
    for ((name, ip), pods) in [("restart-proxy-1", CIP), ("restart-proxy-2", CIP2)]
        .into_iter()
        .zip(PODS)
    {
        let (svc, slices) = web(env, name, ip, &pods);
        publish(env, &svc, &slices)?;
    }
    up(env, CIP, &PODS[0])?;
    up(env, CIP2, &PODS[1])?;
    env.restart_agent(0)?;
    up(env, CIP, &PODS[0])?;
    up(env, CIP2, &PODS[1])
}

fn recreated(env: &Env<'_>) -> Result<()> {
    let (svc, slices) = web(env, "service-deletion", CIP, &[(1, 0)]);
    publish(env, &svc, &slices)?;
    up(env, CIP, &[(1, 0)])?;
    unpublish(env, "service-deletion")?;
    down(env, CIP)?;
    publish(env, &svc, &slices)?;
    up(env, CIP, &[(1, 0)])
}

/// CheckServiceReachability for a NodePort Service: the cluster IP and
/// every node's NodePort, each port with its protocol.
fn node_port_reachable(env: &Env<'_>, from: Client, svc: &Svc, want: &[String]) -> Result<()> {
    for p in &svc.ports {
        let proto = if p.protocol == "UDP" {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        if let Some(ip) = svc.cluster_ip {
            all_answer(env, from, proto, at(ip, p.port), want)?;
        }
        if let Some(np) = p.node_port {
            for k in 0..2 {
                all_answer(env, from, proto, at(env.node_ip(k), np), want)?;
            }
        }
    }
    Ok(())
}

fn functioning_node_port(env: &Env<'_>) -> Result<()> {
    let pods = [(0, 0), (1, 0)];
    let (svc, slices) = web(env, "nodeport-test", CIP, &pods);
    let svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..svc
    }
    .of_type("NodePort");
    publish(env, &svc, &slices)?;
    node_port_reachable(env, Client::Pod(0), &svc, &names(env, &pods))
}

fn external_ip_not_on_node(env: &Env<'_>) -> Result<()> {
    let ext_ip = Ipv4Addr::new(203, 0, 113, 250);
    let pods = [(0, 0), (1, 0)];
    let (mut svc, slices) = web(env, "externalip-test", CIP, &pods);
    svc.external_ips = vec![ext_ip];
    publish(env, &svc, &slices)?;
    let want = names(env, &pods);
    all_answer(env, Client::Pod(0), Proto::Tcp, at(CIP, 80), &want)?;
    all_answer(env, Client::Pod(0), Proto::Tcp, at(ext_ip, 80), &want)
}

fn node_port_same_port_two_protocols(env: &Env<'_>) -> Result<()> {
    let n = "nodeport-update-service";
    let pods = [(0, 0), (1, 0)];
    // Created as a TCP ClusterIP Service without pods, then made NodePort
    // and given pods, then given a UDP port 80 beside the TCP one.
    let (svc, _) = web(env, n, CIP, &[]);
    publish(env, &svc, &[])?;
    let tcp_only = Svc {
        ports: vec![tcp("tcp-port", 80, &POD_TCP.to_string()).node_port(NODE_PORT)],
        ..svc.clone()
    }
    .of_type("NodePort");
    let eps = endpoints(env, &pods);
    publish(
        env,
        &tcp_only,
        &[slice(n, 1, &[("tcp-port", POD_TCP, "TCP")], eps.clone())],
    )?;
    node_port_reachable(env, Client::Pod(0), &tcp_only, &names(env, &pods))?;
    let both = Svc {
        ports: vec![
            tcp("tcp-port", 80, &POD_TCP.to_string()).node_port(NODE_PORT),
            udp("udp-port", 80, &POD_UDP.to_string()).node_port(NODE_PORT_UDP),
        ],
        ..tcp_only
    };
    publish(
        env,
        &both,
        &[slice(
            n,
            1,
            &[("tcp-port", POD_TCP, "TCP"), ("udp-port", POD_UDP, "UDP")],
            eps,
        )],
    )?;
    node_port_reachable(env, Client::Pod(0), &both, &names(env, &pods))
}

fn external_name(name: &str) -> Svc {
    Svc {
        name: name.into(),
        service_type: "ExternalName".into(),
        external_name: Some("externalsvc.default.svc.cluster.local".into()),
        ..Svc::default()
    }
}

fn external_name_to(env: &Env<'_>, node_port: bool) -> Result<()> {
    let n = "externalname-service";
    let pods = [(0, 0), (1, 0)];
    publish(env, &external_name(n), &[])?;
    let (mut svc, slices) = web(env, n, CIP, &pods);
    if node_port {
        svc = Svc {
            ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
            ..svc
        }
        .of_type("NodePort");
    }
    publish(env, &svc, &slices)?;
    node_port_reachable(env, Client::Pod(0), &svc, &names(env, &pods))
}

fn external_name_to_cluster_ip(env: &Env<'_>) -> Result<()> {
    external_name_to(env, false)
}

fn external_name_to_node_port(env: &Env<'_>) -> Result<()> {
    external_name_to(env, true)
}

/// Upstream then checks the CNAME with DNS, which is not the proxy's; here
/// the proxy's part: the Service's cluster IP and NodePort stop answering,
/// and the Service the name points to keeps working.
fn to_external_name(env: &Env<'_>, node_port: bool) -> Result<()> {
    let n = if node_port {
        "nodeport-service"
    } else {
        "clusterip-service"
    };
    let pods = [(0, 0), (1, 0)];
    let (mut svc, slices) = web(env, n, CIP, &pods);
    if node_port {
        svc = Svc {
            ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
            ..svc
        }
        .of_type("NodePort");
    }
    publish(env, &svc, &slices)?;
    let (ext, ext_slices) = web(env, "externalsvc", CIP2, &[(0, 1), (1, 1)]);
    publish(env, &ext, &ext_slices)?;
    node_port_reachable(env, Client::Pod(0), &svc, &names(env, &pods))?;
    // The controller deletes the slices of a Service without a selector
    // target (ExternalName).
    publish(env, &external_name(n), &[])?;
    fails(env, Client::Pod(0), Proto::Tcp, at(CIP, 80))?;
    if node_port {
        let kind = fails(
            env,
            Client::Pod(0),
            Proto::Tcp,
            at(env.node_ip(1), NODE_PORT),
        )?;
        ensure!(
            kind == ErrorKind::ConnectionRefused,
            "the released NodePort should be a closed port (RST), got {kind:?}"
        );
    }
    all_answer(
        env,
        Client::Pod(0),
        Proto::Tcp,
        at(CIP2, 80),
        &names(env, &[(0, 1), (1, 1)]),
    )
}

fn cluster_ip_to_external_name(env: &Env<'_>) -> Result<()> {
    to_external_name(env, false)
}

fn node_port_to_external_name(env: &Env<'_>) -> Result<()> {
    to_external_name(env, true)
}

/// Upstream: after the delete, nothing LISTENs on the NodePort on the node
/// (`ss`), and the same NodePort can be given to a new Service.
fn release_node_ports(env: &Env<'_>) -> Result<()> {
    let pods = [(0, 0)];
    let (svc, slices) = web(env, "nodeport-reuse", CIP, &pods);
    let svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..svc
    }
    .of_type("NodePort");
    publish(env, &svc, &slices)?;
    all_answer(
        env,
        Client::External,
        Proto::Tcp,
        at(env.node_ip(0), NODE_PORT),
        &names(env, &pods),
    )?;
    unpublish(env, "nodeport-reuse")?;
    for k in 0..2 {
        let ss = env
            .cluster
            .node_ns(k)
            .exec("ss", &["-Hant46", &format!("sport = :{NODE_PORT}")])?;
        ensure!(
            !ss.contains("LISTEN"),
            "node-{k} listens on the released NodePort: {ss}"
        );
        let kind = fails(
            env,
            Client::External,
            Proto::Tcp,
            at(env.node_ip(k), NODE_PORT),
        )?;
        ensure!(
            kind == ErrorKind::ConnectionRefused,
            "node-{k}: released NodePort gave {kind:?}, not RST"
        );
    }
    publish(env, &svc, &slices)?;
    all_answer(
        env,
        Client::External,
        Proto::Tcp,
        at(env.node_ip(1), NODE_PORT),
        &names(env, &pods),
    )
}

/// The pod `(k, j)` as the controller publishes it for a Service with
/// `publishNotReadyAddresses: pnra`.
fn pod_endpoint(
    env: &Env<'_>,
    pod: (usize, usize),
    ready: bool,
    terminating: bool,
    pnra: bool,
) -> SliceEndpoint {
    env.endpoint_with(pod.0, pod.1, pod_conditions(ready, terminating, pnra))
}

fn unready_pods(env: &Env<'_>) -> Result<()> {
    let n = "tolerate-unready";
    let pod = (1, 0);
    let (mut svc, _) = web(env, n, CIP, &[]);
    let publish_with = |svc: &Svc, terminating: bool| -> Result<()> {
        // The pod's readiness probe is /bin/false: never ready.
        let ep = pod_endpoint(
            env,
            pod,
            false,
            terminating,
            svc.publish_not_ready_addresses,
        );
        publish(
            env,
            svc,
            &[slice(n, 1, &[("http", POD_TCP, "TCP")], vec![ep])],
        )
    };
    svc.publish_not_ready_addresses = true;
    publish_with(&svc, false)?;
    answers(
        env,
        Client::Pod(0),
        Proto::Tcp,
        at(CIP, 80),
        &env.pod_name(1, 0),
    )?;
    // Scaled to zero: the pod terminates (a 100 s preStop keeps it), and the
    // Service stops tolerating unready endpoints.
    svc.publish_not_ready_addresses = false;
    publish_with(&svc, true)?;
    fails(env, Client::Pod(0), Proto::Tcp, at(CIP, 80))?;
    svc.publish_not_ready_addresses = true;
    publish_with(&svc, true)?;
    answers(
        env,
        Client::Pod(0),
        Proto::Tcp,
        at(CIP, 80),
        &env.pod_name(1, 0),
    )
    .map(|_| ())
}

/// A NodePort Service whose one webserver pod (node 0) was deleted and is
/// terminating, unready (its readiness fails during shutdown).
fn terminating_unready(env: &Env<'_>, pnra: bool) -> Result<Svc> {
    let n = if pnra {
        "svc-tolerate-unready"
    } else {
        "svc-not-tolerate-unready"
    };
    let mut svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..web(env, n, CIP, &[]).0
    }
    .of_type("NodePort");
    svc.publish_not_ready_addresses = pnra;
    let live = pod_endpoint(env, (0, 0), true, false, pnra);
    publish(
        env,
        &svc,
        &[slice(n, 1, &[("http", POD_TCP, "TCP")], vec![live])],
    )?;
    answers(
        env,
        Client::Pod(1),
        Proto::Tcp,
        at(CIP, 80),
        &env.pod_name(0, 0),
    )?;
    let dying = pod_endpoint(env, (0, 0), false, true, pnra);
    publish(
        env,
        &svc,
        &[slice(n, 1, &[("http", POD_TCP, "TCP")], vec![dying])],
    )?;
    Ok(svc)
}

/// Upstream sleeps 5 s between its five rounds; the lab's agents have
/// already programmed the change, so the rounds follow at once.
fn terminating_unready_published(env: &Env<'_>) -> Result<()> {
    terminating_unready(env, true)?;
    let targets = [
        at(CIP, 80),
        at(env.node_ip(0), NODE_PORT),
        at(env.node_ip(1), NODE_PORT),
    ];
    for _ in 0..5 {
        for t in targets {
            answers(env, Client::Pod(1), Proto::Tcp, t, &env.pod_name(0, 0))?;
        }
    }
    Ok(())
}

fn terminating_unready_not_published(env: &Env<'_>) -> Result<()> {
    terminating_unready(env, false)?;
    let targets = [
        at(CIP, 80),
        at(env.node_ip(0), NODE_PORT),
        at(env.node_ip(1), NODE_PORT),
    ];
    for _ in 0..5 {
        for t in targets {
            fails(env, Client::Pod(1), Proto::Tcp, t)?;
        }
    }
    Ok(())
}

/// Upstream's affinity Services: 3 serve-hostname pods, ClientIP; for
/// NodePort the target is the first node's NodePort.
fn affinity_service(
    env: &Env<'_>,
    node_port: bool,
    timeout: Option<u32>,
) -> Result<(Svc, Vec<Slice>, SocketAddrV4)> {
    let pods = [(0, 0), (0, 1), (1, 0)];
    let n = if node_port {
        "affinity-nodeport"
    } else {
        "affinity-clusterip"
    };
    let (mut svc, slices) = web(env, n, CIP, &pods);
    svc.client_ip_affinity = Some(timeout);
    let target = if node_port {
        svc.ports = vec![tcp("http", 80, "8080").node_port(NODE_PORT)];
        svc = svc.of_type("NodePort");
        at(env.node_ip(0), NODE_PORT)
    } else {
        at(CIP, 80)
    };
    publish(env, &svc, &slices)?;
    check::reachable(
        env,
        Client::Pod(1),
        Proto::Tcp,
        at(CIP, 80),
        &names(env, &pods),
    )?;
    check::reachable(env, Client::Pod(1), Proto::Tcp, target, &names(env, &pods))?;
    Ok((svc, slices, target))
}

fn affinity_works(env: &Env<'_>, node_port: bool) -> Result<()> {
    let (_, _, target) = affinity_service(env, node_port, None)?;
    affinity(env, Client::Pod(1), Proto::Tcp, target, true)
}

/// Upstream uses a 125 s timeout and sleeps timeout + 5 s between tries;
/// here the timeout is 3 s and the sleep 5 s.
fn affinity_timeout(env: &Env<'_>, node_port: bool) -> Result<()> {
    const TIMEOUT_S: u32 = 3;
    let (_, _, target) = affinity_service(env, node_port, Some(TIMEOUT_S))?;
    affinity(env, Client::Pod(1), Proto::Tcp, target, true)?;
    let mut hosts = std::collections::BTreeSet::new();
    for _ in 0..10 {
        if let Ok(w) = env.whoami(Client::Pod(1), Proto::Tcp, target) {
            hosts.insert(w.backend);
            if hosts.len() > 1 {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_secs(u64::from(TIMEOUT_S) + 2));
    }
    bail!("Session is sticky after reaching the timeout: {hosts:?}")
}

fn affinity_switch(env: &Env<'_>, node_port: bool) -> Result<()> {
    let (mut svc, slices, target) = affinity_service(env, node_port, None)?;
    svc.client_ip_affinity = None;
    publish(env, &svc, &slices)?;
    affinity(env, Client::Pod(1), Proto::Tcp, target, false)?;
    svc.client_ip_affinity = Some(None);
    publish(env, &svc, &slices)?;
    affinity(env, Client::Pod(1), Proto::Tcp, target, true)
}

/// service-proxy-name and headless: a Service created with the label is
/// never served; another one stops and starts with its label.
fn label_toggle(env: &Env<'_>, key: &str, value: &str) -> Result<()> {
    let off_pods = [(0, 0), (0, 1), (1, 0)];
    let on_pods = [(0, 2), (1, 1), (1, 2)];
    let (off, off_slices) = web(env, "service-disabled", CIP, &off_pods);
    let off = off.label(key, value);
    publish(env, &off, &off_slices)?;
    let (toggled, slices) = web(env, "service-toggled", CIP2, &on_pods);
    publish(env, &toggled, &slices)?;
    up(env, CIP2, &on_pods)?;
    down(env, CIP)?;
    publish(env, &toggled.clone().label(key, value), &slices)?;
    down(env, CIP2)?;
    publish(env, &toggled, &slices)?;
    up(env, CIP2, &on_pods)?;
    down(env, CIP)
}

fn rejected_without_endpoints(env: &Env<'_>) -> Result<()> {
    let (svc, _) = web(env, "no-pods", CIP, &[]);
    publish(env, &svc, &[])?;
    refused(env, Client::Pod(0), at(CIP, 80))
}

/// The evicted pod is terminal: the controller publishes one slice with no
/// endpoints (publishNotReadyAddresses does not bring it back).
fn rejected_evicted(env: &Env<'_>) -> Result<()> {
    let (mut svc, slices) = web(env, "evicted-pods", CIP, &[]);
    svc.publish_not_ready_addresses = true;
    publish(env, &svc, &slices)?;
    refused(env, Client::Pod(0), at(CIP, 80))
}

/// One webserver on node 0; `clients[0]` is on node 0 and answered by it,
/// `clients[1]` on node 1 must fail, five times.
fn itp_local(env: &Env<'_>, clients: [Client; 2]) -> Result<()> {
    let port = if matches!(clients[0], Client::Host(_)) {
        8000
    } else {
        80
    };
    let (mut svc, slices) = web(env, "svc-itp", CIP, &[(0, 0)]);
    svc.ports = vec![tcp("http", port, "8080")];
    svc.internal_traffic_local = true;
    publish(env, &svc, &slices)?;
    for _ in 0..5 {
        answers(
            env,
            clients[0],
            Proto::Tcp,
            at(CIP, port),
            &env.pod_name(0, 0),
        )?;
        fails(env, clients[1], Proto::Tcp, at(CIP, port))?;
    }
    Ok(())
}

fn itp_local_to_host_network_pod(env: &Env<'_>) -> Result<()> {
    const ENDPOINT_PORT: u16 = 10180;
    // The hostNetwork webserver answers with its node's name.
    env.serve(
        env.cluster.node_ns(0),
        &env.node_name(0),
        ENDPOINT_PORT,
        ENDPOINT_PORT,
    )?;
    let mut svc = Svc::cluster_ip(
        "svc-itp",
        CIP,
        vec![tcp("http", 80, &ENDPOINT_PORT.to_string())],
    );
    svc.internal_traffic_local = true;
    let slices = [slice(
        "svc-itp",
        1,
        &[("http", ENDPOINT_PORT, "TCP")],
        vec![env.host_endpoint(0)],
    )];
    publish(env, &svc, &slices)?;
    for pair in [
        [Client::Pod(0), Client::Pod(1)],
        [Client::Host(0), Client::Host(1)],
    ] {
        for _ in 0..5 {
            answers(env, pair[0], Proto::Tcp, at(CIP, 80), &env.node_name(0))?;
            fails(env, pair[1], Proto::Tcp, at(CIP, 80))?;
        }
    }
    Ok(())
}

/// The endpoint is on node 0; a hostNetwork client on node 1 and the
/// outside client reach node 0's NodePort and the endpoint sees their own
/// addresses; node 1's NodePort has no local endpoint for outside traffic.
fn etp_local_node_port(env: &Env<'_>) -> Result<()> {
    let pod = (0, 0);
    let mut svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..web(env, "external-local-nodeport", CIP, &[]).0
    }
    .of_type("NodePort");
    svc.external_traffic_local = true;
    let slices = [slice(
        &svc.name,
        1,
        &[("http", POD_TCP, "TCP")],
        endpoints(env, &[pod]),
    )];
    publish(env, &svc, &slices)?;
    let me = env.pod_name(pod.0, pod.1);
    let np0 = at(env.node_ip(0), NODE_PORT);
    let w = answers(env, Client::Host(1), Proto::Tcp, np0, &me)?;
    ensure!(
        w.seen_from.ip() == std::net::IpAddr::V4(env.node_ip(1)),
        "Source IP was NOT preserved: the endpoint saw {} for node-1's process",
        w.seen_from.ip()
    );
    let w = answers(env, Client::External, Proto::Tcp, np0, &me)?;
    check::source_preserved(&w)?;
    fails(
        env,
        Client::External,
        Proto::Tcp,
        at(env.node_ip(1), NODE_PORT),
    )
    .map(|_| ())
}

fn health_check_only_terminating(env: &Env<'_>) -> Result<()> {
    let n = "svc-proxy-terminating";
    let mut svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..web(env, n, CIP, &[]).0
    }
    .of_type("LoadBalancer");
    svc.external_traffic_local = true;
    svc.health_check_node_port = Some(HEALTH_PORT);
    let with = |c| {
        vec![slice(
            n,
            1,
            &[("http", POD_TCP, "TCP")],
            vec![env.endpoint_with(0, 0, c)],
        )]
    };
    publish(env, &svc, &with((true, true, false)))?;
    let hc = at(env.node_ip(0), HEALTH_PORT);
    let status = |want: u16| -> Result<()> {
        let (code, body) = env.http_get(Client::Pod(0), hc, "/healthz")?;
        ensure!(
            code == want,
            "health check {hc}: {code} (expected {want}): {body}"
        );
        Ok(())
    };
    status(200)?;
    // Deleted: terminating, still serving during its 100 s grace.
    publish(env, &svc, &with((false, true, true)))?;
    status(503)?;
    answers(
        env,
        Client::Pod(0),
        Proto::Tcp,
        at(env.node_ip(0), NODE_PORT),
        &env.pod_name(0, 0),
    )
    .map(|_| ())
}

/// One webserver on node 0 that was deleted: terminating, still serving.
fn terminating_webserver(env: &Env<'_>, svc: &Svc) -> Result<()> {
    let with = |c| {
        vec![slice(
            &svc.name,
            1,
            &[("http", POD_TCP, "TCP")],
            vec![env.endpoint_with(0, 0, c)],
        )]
    };
    publish(env, svc, &with((true, true, false)))?;
    publish(env, svc, &with((false, true, true)))
}

fn fallback_cluster_ip(env: &Env<'_>, local: bool) -> Result<()> {
    let (mut svc, _) = web(env, "svc-proxy-terminating", CIP, &[]);
    svc.internal_traffic_local = local;
    terminating_webserver(env, &svc)?;
    let me = env.pod_name(0, 0);
    for _ in 0..5 {
        answers(env, Client::Pod(0), Proto::Tcp, at(CIP, 80), &me)?;
        if local {
            fails(env, Client::Pod(1), Proto::Tcp, at(CIP, 80))?;
        } else {
            answers(env, Client::Pod(1), Proto::Tcp, at(CIP, 80), &me)?;
        }
    }
    Ok(())
}

fn fallback_node_port(env: &Env<'_>, local: bool) -> Result<()> {
    let mut svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..web(env, "svc-proxy-terminating", CIP, &[]).0
    }
    .of_type("NodePort");
    svc.external_traffic_local = local;
    terminating_webserver(env, &svc)?;
    let me = env.pod_name(0, 0);
    let (np0, np1) = (at(env.node_ip(0), NODE_PORT), at(env.node_ip(1), NODE_PORT));
    for _ in 0..5 {
        if local {
            // pod on node 0 -> node 1's NodePort is external traffic to a
            // node without local endpoints.
            fails(env, Client::Pod(0), Proto::Tcp, np1)?;
        }
        answers(env, Client::Pod(0), Proto::Tcp, np0, &me)?;
        answers(env, Client::Pod(1), Proto::Tcp, np0, &me)?;
    }
    Ok(())
}

/// Upstream runs this with hostNetwork clients on a third node; the lab's
/// outside client plays them. Local: node 0 (the endpoint's) answers with
/// the client's address kept and its health check says 200, node 1 drops
/// and says 503. Cluster: both nodes answer, masqueraded, and the health
/// check port closes. Local again, on a new health-check port.
fn etp_changes(env: &Env<'_>) -> Result<()> {
    let n = "external-local-update";
    let pod = (0, 0);
    let mut svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..web(env, n, CIP, &[]).0
    }
    .of_type("LoadBalancer");
    let slices = [slice(
        n,
        1,
        &[("http", POD_TCP, "TCP")],
        endpoints(env, &[pod]),
    )];
    let me = env.pod_name(pod.0, pod.1);
    let local = |svc: &mut Svc, hc: u16| -> Result<()> {
        svc.external_traffic_local = true;
        svc.health_check_node_port = Some(hc);
        publish(env, svc, &slices)?;
        for (k, want) in [(0, 200), (1, 503)] {
            let (code, body) =
                env.http_get(Client::External, at(env.node_ip(k), hc), "/healthz")?;
            ensure!(
                code == want,
                "node-{k} health check :{hc}: {code}, expected {want}: {body}"
            );
        }
        let w = answers(
            env,
            Client::External,
            Proto::Tcp,
            at(env.node_ip(0), NODE_PORT),
            &me,
        )?;
        check::source_preserved(&w)?;
        fails(
            env,
            Client::External,
            Proto::Tcp,
            at(env.node_ip(1), NODE_PORT),
        )?;
        Ok(())
    };
    local(&mut svc, HEALTH_PORT)?;
    svc.external_traffic_local = false;
    svc.health_check_node_port = None;
    publish(env, &svc, &slices)?;
    for k in 0..2 {
        let w = answers(
            env,
            Client::External,
            Proto::Tcp,
            at(env.node_ip(k), NODE_PORT),
            &me,
        )?;
        ensure!(
            !w.client_ip_preserved(),
            "Cluster policy must masquerade: {w:?}"
        );
        if let Ok((code, _)) = env.http_get(
            Client::External,
            at(env.node_ip(k), HEALTH_PORT),
            "/healthz",
        ) {
            bail!(
                "node-{k} still serves the health check port after the switch to Cluster ({code})"
            );
        }
    }
    local(&mut svc, HEALTH_PORT + 1)?;
    if env
        .http_get(
            Client::External,
            at(env.node_ip(0), HEALTH_PORT),
            "/healthz",
        )
        .is_ok()
    {
        bail!("the old health check port still answers");
    }
    Ok(())
}

/// The sidecar (a restartable init container) exposes container port 9090
/// named `sidecar-http`; the Service targets the name.
fn restartable_init_container_port(env: &Env<'_>) -> Result<()> {
    env.serve(
        &env.cluster.backend(0, 0).netns,
        &env.pod_name(0, 0),
        9090,
        9090,
    )?;
    let svc = Svc::cluster_ip(
        "restartable-init-container",
        CIP,
        vec![tcp("http", 80, "sidecar-http")],
    );
    let slices = [slice(
        &svc.name,
        1,
        &[("http", 9090, "TCP")],
        endpoints(env, &[(0, 0)]),
    )];
    publish(env, &svc, &slices)?;
    pods_reach(env, 80, &[(0, 0)])
}

/// Two pods whose port named `http` has different numbers (two versions of
/// a Deployment): one slice per port number.
fn named_target_ports_differ(env: &Env<'_>) -> Result<()> {
    env.serve(
        &env.cluster.backend(1, 0).netns,
        &env.pod_name(1, 0),
        9090,
        9090,
    )?;
    let svc = Svc::cluster_ip("named-ports", CIP, vec![tcp("http", 80, "http")]);
    let slices = [
        slice(
            &svc.name,
            1,
            &[("http", POD_TCP, "TCP")],
            endpoints(env, &[(0, 0)]),
        ),
        slice(
            &svc.name,
            2,
            &[("http", 9090, "TCP")],
            endpoints(env, &[(1, 0)]),
        ),
    ];
    publish(env, &svc, &slices)?;
    pods_reach(env, 80, &[(0, 0), (1, 0)])
}

/// A pod serving TCP and UDP on container port 80.
fn same_port_protocols(env: &Env<'_>) -> Result<()> {
    let pod = (1, 0);
    env.serve(
        &env.cluster.backend(pod.0, pod.1).netns,
        &env.pod_name(pod.0, pod.1),
        80,
        80,
    )?;
    let n = "multiprotocol-test";
    let (t, u) = (tcp("tcp-port", 80, "80"), udp("udp-port", 80, "80"));
    let eps = endpoints(env, &[pod]);
    let with = |ports: Vec<SvcPort>| -> Result<()> {
        let sp: Vec<(&str, u16, &str)> = ports
            .iter()
            .map(|p| (p.name.as_str(), 80, p.protocol.as_str()))
            .collect();
        publish(
            env,
            &Svc::cluster_ip(n, CIP, ports.clone()),
            &[slice(n, 1, &sp, eps.clone())],
        )
    };
    let me = [env.pod_name(pod.0, pod.1)];
    with(vec![t.clone(), u.clone()])?;
    all_answer(env, Client::Pod(0), Proto::Tcp, at(CIP, 80), &me)?;
    all_answer(env, Client::Pod(0), Proto::Udp, at(CIP, 80), &me)?;
    with(vec![t])?;
    all_answer(env, Client::Pod(0), Proto::Tcp, at(CIP, 80), &me)?;
    fails(env, Client::Pod(0), Proto::Udp, at(CIP, 80))?;
    with(vec![u])?;
    all_answer(env, Client::Pod(0), Proto::Udp, at(CIP, 80), &me)?;
    fails(env, Client::Pod(0), Proto::Tcp, at(CIP, 80)).map(|_| ())
}

fn same_port_protocols_lb(env: &Env<'_>) -> Result<()> {
    let pod = (0, 1);
    env.serve(
        &env.cluster.backend(pod.0, pod.1).netns,
        &env.pod_name(pod.0, pod.1),
        100,
        100,
    )?;
    let n = "multiprotocol-lb-test";
    let svc = Svc {
        ports: vec![
            tcp("portname1", 80, "svc1").node_port(NODE_PORT),
            udp("portname2", 80, "svc2").node_port(NODE_PORT_UDP),
        ],
        ..Svc::cluster_ip(n, CIP, vec![])
    }
    .of_type("LoadBalancer");
    let slices = [slice(
        n,
        1,
        &[("portname1", 100, "TCP"), ("portname2", 100, "UDP")],
        endpoints(env, &[pod]),
    )];
    publish(env, &svc, &slices)?;
    node_port_reachable(env, Client::Pod(1), &svc, &names(env, &[pod]))
}
