//! test/e2e/network/conntrack.go: `[sig-network] Conntrack ...`. The client
//! sends `hostname`-style UDP requests from one fixed source port (12345),
//! so every request belongs to the same flow, while the backends change
//! under it; the next backend must answer within a minute.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::*;
use crate::conformance::env::{Client, Proto};

pub(super) fn cases() -> Vec<Case> {
    macro_rules! row {
        ($name:literal, $f:expr) => {
            Case::run(concat!("[sig-network] Conntrack ", $name), $f)
        };
    }
    vec![
        row!(
            "should be able to preserve UDP traffic when server pod cycles for a NodePort service",
            |env| server_cycles(env, Client::Pod(0), true)
        ),
        row!(
            "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service",
            |env| server_cycles(env, Client::Pod(0), false)
        ),
        row!(
            "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service with InternalTrafficPolicy set to Local",
            itp_local_cycles
        ),
        row!(
            "should be able to preserve UDP traffic when server pod cycles for a ClusterIP service and client is hostNetwork",
            |env| server_cycles(env, Client::Host(0), false)
        ),
        row!(
            "should be able to preserve UDP traffic when initial unready endpoints get ready",
            unready_get_ready
        ),
        row!(
            "should drop INVALID conntrack entries [Privileged]",
            crate::conformance::invalid::drop_invalid
        ),
    ]
}

const SRC_PORT: u16 = 12345;
const SVC: &str = "svc-udp";

fn udp_service(
    env: &Env<'_>,
    node_port: bool,
    itp_local: bool,
    eps: Vec<SliceEndpoint>,
) -> Result<()> {
    let mut port = udp("udp", 80, &POD_UDP.to_string());
    let mut svc = Svc::cluster_ip(SVC, CIP, vec![]);
    if node_port {
        port = port.node_port(NODE_PORT_UDP);
        svc = svc.of_type("NodePort");
    }
    svc.ports = vec![port];
    svc.internal_traffic_local = itp_local;
    publish(env, &svc, &[slice(SVC, 1, &[("udp", POD_UDP, "UDP")], eps)])
}

/// Sends from the fixed port (upstream: `nc -u -w 5 -p 12345` in a loop)
/// until `pod` answers; fails after a minute (upstream's poll).
fn until_answered_by(env: &Env<'_>, from: Client, target: SocketAddrV4, pod: &str) -> Result<()> {
    until_answered_from_port(env, from, SRC_PORT, target, pod)
}

/// [`until_answered_by`] from local port `src_port`.
pub(super) fn until_answered_from_port(
    env: &Env<'_>,
    from: Client,
    src_port: u16,
    target: SocketAddrV4,
    pod: &str,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        match env.requests(from, Proto::Udp, target, 1, src_port).pop() {
            Some(Ok(w)) if w.backend == pod => return Ok(()),
            Some(Ok(w)) => last.push(w.backend),
            Some(Err(e)) => last.push(e.to_string()),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let tail = &last[last.len().saturating_sub(5)..];
    bail!(
        "{from:?} -> UDP {target} from port {SRC_PORT}: {pod} never answered in 60 s; last: {tail:?}"
    )
}

/// Keeps the client's flow busy for a moment (upstream's client never
/// stops sending), so a stale conntrack entry would be in use.
fn keep_sending(env: &Env<'_>, from: Client, target: SocketAddrV4) {
    for _ in 0..3 {
        let _ = env.requests(from, Proto::Udp, target, 1, SRC_PORT);
    }
}

/// Backend 1 on node 1 answers; backend 2 (node 1) is added and backend 1
/// deleted; backend 2 must take over the same flow.
fn server_cycles(env: &Env<'_>, from: Client, node_port: bool) -> Result<()> {
    let target = if node_port {
        at(env.node_ip(1), NODE_PORT_UDP)
    } else {
        at(CIP, 80)
    };
    udp_service(env, node_port, false, vec![])?;
    keep_sending(env, from, target);
    udp_service(env, node_port, false, endpoints(env, &[(1, 0)]))?;
    until_answered_by(env, from, target, &env.pod_name(1, 0))?;
    udp_service(env, node_port, false, endpoints(env, &[(1, 0), (1, 1)]))?;
    env.kill_pod(1, 0)?;
    udp_service(env, node_port, false, endpoints(env, &[(1, 1)]))?;
    until_answered_by(env, from, target, &env.pod_name(1, 1))
}

/// Regression test for kubernetes#126934: the local backend goes, the
/// client's flow black-holes while only a remote one exists, then a new
/// local backend must answer.
fn itp_local_cycles(env: &Env<'_>) -> Result<()> {
    let from = Client::Pod(0);
    let target = at(CIP, 80);
    udp_service(env, false, true, vec![])?;
    udp_service(env, false, true, endpoints(env, &[(0, 0)]))?;
    until_answered_by(env, from, target, &env.pod_name(0, 0))?;
    udp_service(env, false, true, endpoints(env, &[(0, 0), (1, 0)]))?;
    env.kill_pod(0, 0)?;
    udp_service(env, false, true, endpoints(env, &[(1, 0)]))?;
    // Upstream waits 5 s here so the client creates the black-hole entry.
    keep_sending(env, from, target);
    udp_service(env, false, true, endpoints(env, &[(0, 1), (1, 0)]))?;
    until_answered_by(env, from, target, &env.pod_name(0, 1))
}

/// Regression test for kubernetes#105657: the endpoint is published
/// unready first (an init container holds the pod), then ready.
fn unready_get_ready(env: &Env<'_>) -> Result<()> {
    let from = Client::Pod(0);
    let target = at(CIP, 80);
    udp_service(env, false, false, vec![])?;
    keep_sending(env, from, target);
    udp_service(
        env,
        false,
        false,
        vec![env.endpoint_with(1, 0, (false, false, false))],
    )?;
    keep_sending(env, from, target);
    udp_service(env, false, false, endpoints(env, &[(1, 0)]))?;
    until_answered_by(env, from, target, &env.pod_name(1, 0))
}
