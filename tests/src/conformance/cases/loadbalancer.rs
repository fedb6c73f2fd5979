//! test/e2e/network/loadbalancer.go: `[sig-network] LoadBalancers
//! [Feature:LoadBalancer] ...`. The "cloud" load balancer is the lab's
//! fabric: the external client routes the ingress IP to node 0, which is
//! what a cloud LB does with the packets (it does not NAT them).

use anyhow::Result;

use super::*;
use crate::conformance::check::{affinity, all_answer, fails};
use crate::conformance::env::{Client, Proto};

pub(super) fn cases() -> Vec<Case> {
    macro_rules! row {
        ($name:literal, $f:expr) => {
            Case::run(
                concat!("[sig-network] LoadBalancers [Feature:LoadBalancer] ", $name),
                $f,
            )
        };
    }
    vec![
        row!(
            "should only allow access from service loadbalancer source ranges [Slow]",
            source_ranges
        ),
        row!(
            "should be able to create LoadBalancer Service without NodePort and change it [Slow]",
            without_node_port
        ),
        row!(
            "should be able to preserve UDP traffic when server pod cycles for a LoadBalancer service on different nodes",
            |env| udp_lb_cycles(env, [(0, 0), (1, 0)])
        ),
        row!(
            "should be able to preserve UDP traffic when server pod cycles for a LoadBalancer service on the same nodes",
            |env| udp_lb_cycles(env, [(0, 0), (0, 1)])
        ),
        row!(
            "should have session affinity work for LoadBalancer service with Local traffic policy [Slow] [LinuxOnly]",
            |env| lb_affinity(env, true, false)
        ),
        row!(
            "should be able to switch session affinity for LoadBalancer service with Local traffic policy [Slow] [LinuxOnly]",
            |env| lb_affinity(env, true, true)
        ),
        row!(
            "should have session affinity work for LoadBalancer service with Cluster traffic policy [Slow] [LinuxOnly]",
            |env| lb_affinity(env, false, false)
        ),
        row!(
            "should be able to switch session affinity for LoadBalancer service with Cluster traffic policy [Slow] [LinuxOnly]",
            |env| lb_affinity(env, false, true)
        ),
    ]
}

fn load_balancer(env: &Env<'_>, name: &str, pods: &[(usize, usize)]) -> Result<(Svc, Vec<Slice>)> {
    env.cluster.route_external(&format!("{LB_IP}/32"), 0)?;
    let (svc, slices) = web(env, name, CIP, pods);
    let mut svc = Svc {
        ports: vec![tcp("http", 80, "8080").node_port(NODE_PORT)],
        ..svc
    }
    .of_type("LoadBalancer");
    svc.load_balancer_ips = vec![LB_IP];
    Ok((svc, slices))
}

/// acceptPod (node 0) and dropPod (node 1) and the outside world against
/// each range setting, in upstream's order.
fn source_ranges(env: &Env<'_>) -> Result<()> {
    let pods = [(0, 0), (1, 0)];
    let (mut svc, slices) = load_balancer(env, "lb-sourcerange", &pods)?;
    let want = names(env, &pods);
    let (accept, drop) = (Client::Pod(0), Client::Pod(1));
    let lb = at(LB_IP, 80);
    let expect = |svc: &Svc, outside: bool, accepted: bool, dropped: bool| -> Result<()> {
        publish(env, svc, &slices)?;
        for (client, reachable) in [
            (Client::External, outside),
            (accept, accepted),
            (drop, dropped),
        ] {
            if reachable {
                all_answer(env, client, Proto::Tcp, lb, &want)?;
            } else {
                fails(env, client, Proto::Tcp, lb)?;
            }
        }
        Ok(())
    };
    expect(&svc, true, true, true)?;
    let accept_pod = env.cluster.client(0).ip;
    svc.load_balancer_source_ranges =
        vec![format!("{accept_pod}/32"), format!("{}/32", env.node_ip(0))];
    expect(&svc, false, true, false)?;
    svc.load_balancer_source_ranges = vec!["0.0.0.0/1".into(), "128.0.0.0/1".into()];
    expect(&svc, true, true, true)?;
    svc.load_balancer_source_ranges = vec!["255.0.0.0/32".into()];
    expect(&svc, false, false, false)?;
    svc.load_balancer_source_ranges = vec![];
    expect(&svc, true, true, true)
}

/// A ClusterIP Service made a LoadBalancer with
/// `allocateLoadBalancerNodePorts: false` (no NodePort): the LB answers.
/// Then a NodePort is allocated: the LB still answers, and so does the
/// NodePort.
fn without_node_port(env: &Env<'_>) -> Result<()> {
    let pod = [(1, 0)];
    let want = names(env, &pod);
    let (plain, slices) = web(env, "reallocate-nodeport-test", CIP, &pod);
    publish(env, &plain, &slices)?;
    all_answer(env, Client::Pod(0), Proto::Tcp, at(CIP, 80), &want)?;
    let (mut svc, _) = load_balancer(env, "reallocate-nodeport-test", &pod)?;
    svc.ports = plain.ports.clone();
    svc.allocate_load_balancer_node_ports = Some(false);
    publish(env, &svc, &slices)?;
    all_answer(env, Client::External, Proto::Tcp, at(LB_IP, 80), &want)?;
    svc.allocate_load_balancer_node_ports = Some(true);
    svc.ports = vec![tcp("http", 80, "8080").node_port(NODE_PORT)];
    publish(env, &svc, &slices)?;
    all_answer(env, Client::External, Proto::Tcp, at(LB_IP, 80), &want)?;
    all_answer(
        env,
        Client::External,
        Proto::Tcp,
        at(env.node_ip(0), NODE_PORT),
        &want,
    )
}

/// The outside client sends from port 54321 to a UDP LoadBalancer; the
/// first backend pod answers, a second one is created and the first
/// deleted; the second must take over the flow (upstream: both hostnames
/// seen by the client).
fn udp_lb_cycles(env: &Env<'_>, pods: [(usize, usize); 2]) -> Result<()> {
    const CLIENT_PORT: u16 = 54321;
    env.cluster.route_external(&format!("{LB_IP}/32"), 0)?;
    let n = "svc-udp";
    let mut svc = Svc::cluster_ip(
        n,
        CIP,
        vec![udp("udp", 80, &POD_UDP.to_string()).node_port(NODE_PORT_UDP)],
    )
    .of_type("LoadBalancer");
    svc.load_balancer_ips = vec![LB_IP];
    let with = |eps: &[(usize, usize)]| -> Result<()> {
        publish(
            env,
            &svc,
            &[slice(n, 1, &[("udp", POD_UDP, "UDP")], endpoints(env, eps))],
        )
    };
    let lb = at(LB_IP, 80);
    let [first, second] = pods;
    with(&[first])?;
    super::conntrack::until_answered_from_port(
        env,
        Client::External,
        CLIENT_PORT,
        lb,
        &env.pod_name(first.0, first.1),
    )?;
    with(&[first, second])?;
    env.kill_pod(first.0, first.1)?;
    with(&[second])?;
    super::conntrack::until_answered_from_port(
        env,
        Client::External,
        CLIENT_PORT,
        lb,
        &env.pod_name(second.0, second.1),
    )
}

/// execAffinityTestForLBService(WithTransition), from the test (outside):
/// with Local policy the pods are on node 0, where the LB sends.
fn lb_affinity(env: &Env<'_>, local: bool, transition: bool) -> Result<()> {
    let pods: [(usize, usize); 3] = if local {
        [(0, 0), (0, 1), (0, 2)]
    } else {
        [(0, 0), (1, 0), (1, 1)]
    };
    let (mut svc, slices) = load_balancer(env, "affinity-lb", &pods)?;
    svc.external_traffic_local = local;
    if local {
        svc.health_check_node_port = Some(HEALTH_PORT);
    }
    svc.client_ip_affinity = Some(None);
    publish(env, &svc, &slices)?;
    let lb = at(LB_IP, 80);
    if !transition {
        return affinity(env, Client::External, Proto::Tcp, lb, true);
    }
    svc.client_ip_affinity = None;
    publish(env, &svc, &slices)?;
    affinity(env, Client::External, Proto::Tcp, lb, false)?;
    svc.client_ip_affinity = Some(None);
    publish(env, &svc, &slices)?;
    affinity(env, Client::External, Proto::Tcp, lb, true)
}
