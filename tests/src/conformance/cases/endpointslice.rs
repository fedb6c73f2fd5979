//! test/e2e/network/endpointslice.go: `[sig-network] EndpointSlice ...`.
//! Selector-less Services whose EndpointSlices the test writes itself.

use anyhow::Result;

use super::*;
use crate::conformance::check::all_answer;
use crate::conformance::env::{Client, Proto};

pub(super) fn cases() -> Vec<Case> {
    vec![
        Case::run(
            "[sig-network] EndpointSlice should support a Service with multiple ports specified in multiple EndpointSlices [Conformance]",
            multiple_ports,
        ),
        Case::run(
            "[sig-network] EndpointSlice should support a Service with multiple endpoint IPs specified in multiple EndpointSlices [Conformance]",
            multiple_ips,
        ),
    ]
}

/// One pod serving two ports; each port in its own slice with the same
/// address. Both Service ports must reach it.
fn multiple_ports(env: &Env<'_>) -> Result<()> {
    let pod = (1, 0);
    let me = names(env, &[pod]);
    env.serve(&env.cluster.backend(1, 0).netns, &me[0], 8090, 8090)?;
    let svc = Svc::cluster_ip(
        "example-custom-endpoints",
        CIP,
        vec![
            tcp("example", 80, "8090"),
            tcp("example2", 81, &POD_TCP.to_string()),
        ],
    );
    let slices = [
        slice(
            &svc.name,
            1,
            &[("example", 8090, "TCP")],
            endpoints(env, &[pod]),
        ),
        slice(
            &svc.name,
            2,
            &[("example2", POD_TCP, "TCP")],
            endpoints(env, &[pod]),
        ),
    ];
    publish(env, &svc, &slices)?;
    all_answer(env, Client::Pod(0), Proto::Tcp, at(CIP, 80), &me)?;
    all_answer(env, Client::Pod(0), Proto::Tcp, at(CIP, 81), &me)
}

/// Two pods, each in its own slice of the same port: both answer.
fn multiple_ips(env: &Env<'_>) -> Result<()> {
    let svc = Svc::cluster_ip(
        "example-custom-endpoints",
        CIP,
        vec![tcp("example", 80, &POD_TCP.to_string())],
    );
    let slices = [
        slice(
            &svc.name,
            1,
            &[("example", POD_TCP, "TCP")],
            endpoints(env, &[(0, 0)]),
        ),
        slice(
            &svc.name,
            2,
            &[("example", POD_TCP, "TCP")],
            endpoints(env, &[(1, 0)]),
        ),
    ];
    publish(env, &svc, &slices)?;
    all_answer(
        env,
        Client::Pod(0),
        Proto::Tcp,
        at(CIP, 80),
        &names(env, &[(0, 0), (1, 0)]),
    )
}
