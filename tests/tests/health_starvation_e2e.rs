//! The agent's health endpoints under hostile load (issue 17, item 2): the
//! exact loads that starved them — 500 slow-loris connections, 2,000 idle
//! ones, 100 slow clients from outside on a healthCheckNodePort — held open
//! and reopened as fast as the server closes them, while a probe like
//! kubelet's (a new connection, 1 s timeout) must be answered every time.
//! The agent's open file descriptors must stay bounded meanwhile.
//!
//! Hostile clients come from many addresses of their own namespace (a pod,
//! or the external client of the two-node lab); probes from the node itself,
//! as kubelet's, or from the external client's own address, as a cloud load
//! balancer's. All traffic stays in the lab's namespaces.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::addr::CLIENT_GW;
use lab::cluster::web;
use lab::cluster::{Cluster, addr};
use lab::hostile::{self, Attack, Kind, ProbeResult, Running};
use lab::{Agent, Lab, Netns, yaml};

/// kubelet's default probe timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The agent's default ports (kube-proxy's).
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;
const HEALTH_CHECK_NODE_PORT: u16 = 32000;
/// New hostile connections a second, per attack: enough to reopen every
/// connection the server closes within a second or two.
const ATTACK_RATE: u32 = 1000;
/// Far longer than a test needs: only a bound.
const ATTACK_MAX: Duration = Duration::from_secs(120);
/// Connections the agent's servers hold at once (64 health, 32 metrics,
/// 128 service health checks, in proxy-userspace); the bound checked on its
/// descriptors, with room for the probes in flight.
const FD_SLACK: usize = 8;

/// Probes `targets` in turn from `from` (source `source`, or the kernel's
/// choice), `n` of them `every` apart, while sampling the agent's open
/// descriptors; returns the probes and the most descriptors seen.
fn probe_while_sampling(
    from: &Netns,
    source: Option<Ipv4Addr>,
    targets: &[(SocketAddrV4, &'static str)],
    n: usize,
    every: Duration,
    agent: &Agent<'_>,
) -> (Vec<(String, ProbeResult)>, usize) {
    let targets = targets.to_vec();
    let prober = from
        .spawn("prober", move || {
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let (target, path) = targets[i % targets.len()];
                let r = hostile::probe(source, target, path, PROBE_TIMEOUT);
                out.push((format!("{target}{path}"), r));
                std::thread::sleep(every);
            }
            out
        })
        .expect("start the prober");
    let mut most_fds = 0;
    while !prober.is_finished() {
        if let Ok(n) = hostile::open_fds(agent.pid()) {
            most_fds = most_fds.max(n);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    (prober.join(), most_fds)
}

/// Asserts every probe was answered with `status` within the probe
/// timeout; prints them all either way.
fn assert_all_answered(what: &str, probes: &[(String, ProbeResult)], status: u16) {
    let table: Vec<String> = probes
        .iter()
        .map(|(target, r)| {
            format!(
                "  {target}: {:?} in {:?}{}",
                r.status,
                r.took,
                r.error
                    .as_ref()
                    .map(|(_, e)| format!(" ({e})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    println!("{what}:\n{}", table.join("\n"));
    let answered = probes
        .iter()
        .filter(|(_, r)| r.answered(status, PROBE_TIMEOUT))
        .count();
    assert_eq!(
        answered,
        probes.len(),
        "{what}: {answered} of {} probes answered {status} within {PROBE_TIMEOUT:?}:\n{}",
        probes.len(),
        table.join("\n")
    );
}

/// The sample `series` (name and labels) of a /metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `kep_http_connections_shed_total{server=...}` from the agent's metrics
/// server, scraped from inside `node`.
fn shed(node: &Netns, metrics: SocketAddrV4, server: &str) -> f64 {
    let r = node.run(|| hostile::probe(None, metrics, "/metrics", Duration::from_secs(5)));
    assert_eq!(r.status, Some(200), "/metrics: {r:?}");
    let series = format!("kep_http_connections_shed_total{{server=\"{server}\"}}");
    sample(&r.body, &series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{}", r.body))
}

/// `connections` hostile clients of `kind` from `sources`, in `netns`,
/// against `target`, reopening what is closed at up to [`ATTACK_RATE`] a
/// second; once each connection has been made.
fn attack(
    netns: &Netns,
    target: SocketAddrV4,
    sources: &[Ipv4Addr],
    connections: usize,
    kind: Kind,
) -> Running {
    let running = Attack {
        target,
        sources: sources.to_vec(),
        connections,
        kind,
        rate: ATTACK_RATE,
        max_duration: ATTACK_MAX,
    }
    .start(netns)
    .expect("start the hostile clients");
    running
        .wait_connected(connections, Duration::from_secs(20))
        .expect("hostile clients connected");
    running
}

/// A lab with the demo Services and `sources` added to the client pod for
/// the attack.
fn lab_with(sources: &[Ipv4Addr]) -> Lab {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    hostile::add_addresses(lab.client(), "eth0", sources, 24).unwrap();
    lab
}

fn start_agent<'l>(lab: &'l Lab, extra: &[&str]) -> Agent<'l> {
    let mut args: Vec<OsString> = vec!["--manifests".into(), lab.manifest_dir().into()];
    args.extend(extra.iter().map(OsString::from));
    let agent = lab.start_agent_programmed(&args).expect("agent starts");
    agent
        .wait_for_log("serving /healthz", Duration::from_secs(10))
        .expect("health server up");
    agent
}

#[test]
fn healthz_answers_probes_under_500_slow_loris_connections() {
    let sources = hostile::addresses(Ipv4Addr::new(10, 244, 1, 100), 50);
    let lab = lab_with(&sources);
    let agent = start_agent(&lab, &[]);
    let healthz = SocketAddrV4::new(CLIENT_GW, HEALTHZ_PORT);
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS_PORT);
    let fds_before = hostile::open_fds(agent.pid()).unwrap();

    let slow = Kind::SlowLoris {
        every: Duration::from_secs(1),
    };
    let attack = attack(lab.client(), healthz, &sources, 500, slow);

    let (probes, most_fds) = probe_while_sampling(
        lab.node(),
        None,
        &[(healthz, "/healthz")],
        20,
        Duration::from_millis(200),
        &agent,
    );
    let shed_count = shed(lab.node(), metrics, "healthz");
    let report = attack.stop().unwrap();
    println!("attack: {report:?}; shed: {shed_count}; fds {fds_before} -> {most_fds}");
    assert_all_answered("/healthz under 500 slow-loris connections", &probes, 200);
    assert!(
        report.connected >= 1500,
        "the load was not there: {report:?}"
    );
    assert!(shed_count > 0.0, "the agent never had to shed: no load?");
    assert!(
        most_fds <= fds_before + 64 + FD_SLACK,
        "agent descriptors {fds_before} -> {most_fds}: not bounded by its 64 health connections"
    );
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}

#[test]
fn healthz_and_metrics_answer_probes_under_2000_idle_connections() {
    let sources = hostile::addresses(Ipv4Addr::new(10, 244, 1, 100), 50);
    let lab = lab_with(&sources);
    // Metrics on every address, as with the old default, so that it can be
    // attacked too.
    let agent = start_agent(&lab, &["--metrics-bind-address", "0.0.0.0:10249"]);
    let healthz = SocketAddrV4::new(CLIENT_GW, HEALTHZ_PORT);
    let metrics = SocketAddrV4::new(CLIENT_GW, METRICS_PORT);
    let fds_before = hostile::open_fds(agent.pid()).unwrap();

    let attacks: Vec<_> = [healthz, metrics]
        .into_iter()
        .map(|target| attack(lab.client(), target, &sources, 2000, Kind::Idle))
        .collect();

    let (probes, most_fds) = probe_while_sampling(
        lab.node(),
        None,
        &[(healthz, "/healthz"), (metrics, "/metrics")],
        16,
        Duration::from_millis(200),
        &agent,
    );
    let reports: Vec<_> = attacks.into_iter().map(|a| a.stop().unwrap()).collect();
    println!("attacks: {reports:?}; fds {fds_before} -> {most_fds}");
    assert_all_answered(
        "/healthz and /metrics under 2,000 idle connections each",
        &probes,
        200,
    );
    let shed_health = shed(lab.node(), metrics, "healthz");
    let shed_metrics = shed(lab.node(), metrics, "metrics");
    println!("shed: healthz {shed_health}, metrics {shed_metrics}");
    for r in &reports {
        assert!(r.connected >= 5000, "the load was not there: {r:?}");
    }
    assert!(
        shed_health >= 1900.0 && shed_metrics >= 1900.0,
        "2,000 connections each and room for fewer than 100: most must have been shed"
    );
    assert!(
        most_fds <= fds_before + 64 + 32 + FD_SLACK,
        "agent descriptors {fds_before} -> {most_fds}: not bounded by its 64 + 32 connections"
    );
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}

#[test]
fn health_check_node_port_answers_under_100_slow_clients_from_outside() {
    let cluster = Cluster::new().unwrap();
    let extra = format!(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_CHECK_NODE_PORT}\n"
    );
    let status = "status:\n  loadBalancer:\n    ingress:\n    - ip: 192.168.60.10\n";
    cluster
        .write_manifest(
            "web.yaml",
            &web::manifest(&cluster, &[(0, 0)], &extra, status),
        )
        .unwrap();
    let args: Vec<OsString> = vec!["--node-interfaces".into(), "eth0".into()];
    let agent = cluster.start_agent_programmed(0, &args).unwrap();
    agent
        .wait_for_log("serving service health check", Duration::from_secs(10))
        .expect("health check port open");
    // 100 clients from 50 addresses of the external network.
    let sources = hostile::addresses(Ipv4Addr::new(192, 168, 50, 150), 50);
    hostile::add_addresses(cluster.ext(), "eth0", &sources, 24).unwrap();
    let check = SocketAddrV4::new(addr::node_ip(0), HEALTH_CHECK_NODE_PORT);
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS_PORT);
    let fds_before = hostile::open_fds(agent.pid()).unwrap();

    let slow = Kind::SlowLoris {
        every: Duration::from_secs(1),
    };
    let attack = attack(cluster.ext(), check, &sources, 100, slow);

    // The load balancer probes from the external client's own address.
    let (probes, most_fds) = probe_while_sampling(
        cluster.ext(),
        Some(addr::EXT_IP),
        &[(check, "/")],
        13,
        Duration::from_millis(300),
        &agent,
    );
    let report = attack.stop().unwrap();
    let shed_count = shed(cluster.node_ns(0), metrics, "service-health-check");
    println!("attack: {report:?}; shed: {shed_count}; fds {fds_before} -> {most_fds}");
    assert_all_answered(
        "healthCheckNodePort under 100 slow clients from outside",
        &probes,
        200,
    );
    for (_, r) in &probes {
        assert!(r.body.contains("\"localEndpoints\": 1"), "{}", r.body);
    }
    assert!(
        report.connected >= 100,
        "the load was not there: {report:?}"
    );
    assert!(
        most_fds <= fds_before + 128 + FD_SLACK,
        "agent descriptors {fds_before} -> {most_fds}: not bounded"
    );
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}
