//! The rows, one module per upstream file, and what they share.

mod conntrack;
mod endpointslice;
mod kube_proxy;
mod loadbalancer;
mod networking;
mod service;
mod unsupported;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use anyhow::Result;

use super::Case;
use super::env::Env;
use crate::yaml::{Slice, SliceEndpoint, Svc, SvcPort};

pub(super) fn all() -> Vec<Case> {
    [
        service::cases(),
        networking::cases(),
        conntrack::cases(),
        loadbalancer::cases(),
        endpointslice::cases(),
        kube_proxy::cases(),
        unsupported::cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Cluster IPs of the rows' Services (inside the agents' default
/// `--service-cidr`).
const CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);
const CIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 101);
const CIP3: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 102);
/// The second (IPv6) cluster IP of the dual-stack rows' Service.
const CIP6: Ipv6Addr = crate::addr::service_ip6(100);
/// NodePorts and the health-check port rows allocate.
const NODE_PORT: u16 = 30080;
const NODE_PORT_UDP: u16 = 30081;
const HEALTH_PORT: u16 = 32000;
/// The "cloud" load balancer's ingress IP; the external client routes it
/// to node 0.
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
/// Where the lab's backend pods serve (see [`crate::cluster::ClusterConfig`]).
const POD_TCP: u16 = 8080;
const POD_UDP: u16 = 5353;

fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn tcp(name: &str, port: u16, target: &str) -> SvcPort {
    SvcPort::new(name, port, "TCP", target)
}

fn udp(name: &str, port: u16, target: &str) -> SvcPort {
    SvcPort::new(name, port, "UDP", target)
}

/// A slice `<service>-<n>` with `ports` (`(name, port, protocol)`).
fn slice(
    service: &str,
    n: usize,
    ports: &[(&str, u16, &str)],
    endpoints: Vec<SliceEndpoint>,
) -> Slice {
    Slice {
        name: format!("{service}-{n}"),
        service: service.into(),
        ports: ports
            .iter()
            .map(|&(name, port, proto)| (name.into(), port, proto.into()))
            .collect(),
        endpoints,
        labels: Vec::new(),
    }
}

/// Writes the Service and its slices as one manifest, `<name>.yaml`, and
/// waits until both agents programmed it. The slices get the Service's
/// labels, as the EndpointSlice controller copies them.
fn publish(env: &Env<'_>, svc: &Svc, slices: &[Slice]) -> Result<()> {
    let mut docs = vec![svc.render()];
    for s in slices {
        let mut s = s.clone();
        s.labels.extend(svc.labels.iter().cloned());
        docs.push(s.render());
    }
    env.apply(&format!("{}.yaml", svc.name), &docs.join("---\n"))
}

/// Deletes the Service (and its slices) `name`.
fn unpublish(env: &Env<'_>, name: &str) -> Result<()> {
    env.remove(&format!("{name}.yaml"))
}

/// The names backend pods `pods` (`(node, j)`) answer with.
fn names(env: &Env<'_>, pods: &[(usize, usize)]) -> Vec<String> {
    pods.iter().map(|&(k, j)| env.pod_name(k, j)).collect()
}

/// Ready endpoints for `pods`.
fn endpoints(env: &Env<'_>, pods: &[(usize, usize)]) -> Vec<SliceEndpoint> {
    pods.iter().map(|&(k, j)| env.endpoint(k, j)).collect()
}

/// The usual web Service: `name` at `ip`, TCP 80 -> the pods' TCP port,
/// with one slice of `pods`.
fn web(env: &Env<'_>, name: &str, ip: Ipv4Addr, pods: &[(usize, usize)]) -> (Svc, Vec<Slice>) {
    let svc = Svc::cluster_ip(name, ip, vec![tcp("http", 80, &POD_TCP.to_string())]);
    let slices = vec![slice(
        name,
        1,
        &[("http", POD_TCP, "TCP")],
        endpoints(env, pods),
    )];
    (svc, slices)
}
