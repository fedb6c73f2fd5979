//! The real agent's servers in a lab, at kube-proxy's URLs and defaults:
//! metrics (`/metrics`, `/proxyMode`) on 127.0.0.1:10249, health
//! (`/healthz`, `/livez`, `/readyz`) on 0.0.0.0:10256. Scraped from inside
//! the node namespace, where the agent listens, as kubelet and the e2e test
//! "should check kube-proxy urls" do (from a host-network pod).
//!
//! Needs root and the agent binary (`KEP_AGENT_BIN` or
//! `target/debug/kube-ebpf-proxy`): without them it fails, it never skips.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use lab::addr::{CLIENT_GW, DEMO_VIP, HTTP_PORT};
use lab::{Agent, Lab, Netns, hostile, loadgen, yaml};

const PROGRAMMED: &str = "datapath programmed";
const AGENT_READY: Duration = Duration::from_secs(30);
const NEW_FLOWS: &str = "kep_datapath_packets_total{counter=\"new_flows\"}";

/// A status code and body.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// kube-proxy's defaults.
const METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249));
const HEALTHZ_PORT: u16 = 10256;

/// One HTTP/1.1 GET to the agent, from a thread in the lab's node namespace.
fn get(lab: &Lab, addr: SocketAddr, path: &str) -> Response {
    get_from(lab.node(), addr, path)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} in the node namespace: {e}"))
}

/// One HTTP/1.1 GET from a thread in `netns`: its headers lower-cased.
fn get_from(netns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let SocketAddr::V4(addr) = addr else {
        unreachable!("the lab is IPv4")
    };
    let path = path.to_string();
    let r = netns.run(move || hostile::probe(None, addr, &path, Duration::from_secs(10)));
    match (r.status, r.error) {
        (Some(status), _) => Ok(Response {
            status,
            head: r.head.to_ascii_lowercase(),
            body: r.body,
        }),
        (None, Some((kind, message))) => Err(std::io::Error::new(kind, message)),
        (None, None) => unreachable!("a probe without a status has an error"),
    }
}

/// The value of the sample whose name and labels are exactly `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no sample {series} in /metrics:\n{text}"))
}

fn scrape(lab: &Lab, addr: SocketAddr) -> String {
    let r = get(lab, addr, "/metrics");
    assert_eq!(r.status, 200, "/metrics: {r:?}");
    r.body
}

/// Scrapes until `ok` holds for the metrics text, or panics after `timeout`
/// with the last scrape and the agent's output.
fn scrape_until(
    lab: &Lab,
    agent: &Agent<'_>,
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = scrape(lab, addr);
        if ok(&text) {
            return text;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: not within {timeout:?}; last /metrics:\n{text}\nagent output:\n{}",
                agent.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_health_and_readiness() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    lab.write_manifest("empty.yaml", &yaml::empty()).unwrap();
    // demo and empty.
    let services_written = 2.0;
    // The old flag name still works.
    let addr = METRICS;
    let args: Vec<OsString> = vec![
        "--manifests".into(),
        lab.manifest_dir().into(),
        "--metrics-addr".into(),
        addr.to_string().into(),
    ];
    let agent = lab.start_agent_args(&args).expect("start the agent");
    agent
        .wait_for_log(PROGRAMMED, AGENT_READY)
        .expect("agent programs the datapath");
    // The servers may bind a moment after the first sync was logged.
    for what in ["serving /metrics", "serving /healthz"] {
        agent.wait_for_log(what, AGENT_READY).expect(what);
    }
    let health_addr = SocketAddr::from((CLIENT_GW, HEALTHZ_PORT));
    let ready = get(&lab, health_addr, "/readyz");
    assert_eq!(ready.status, 200, "/readyz after the first sync: {ready:?}");
    let health = get(&lab, health_addr, "/healthz");
    assert_eq!(health.status, 200, "/healthz: {health:?}");
    assert_eq!(get(&lab, addr, "/nope").status, 404);

    let before = scrape(&lab, addr);
    println!("{before}");
    assert!(
        must(&before, "kep_map_entries{map=\"kep_services\"}") > 0.0,
        "{before}"
    );
    assert!(must(&before, "kep_map_entries{map=\"kep_backends\"}") >= 3.0);
    assert!(must(&before, "kep_map_capacity{map=\"kep_services\"}") > 0.0);
    assert_eq!(
        must(&before, "kep_objects{kind=\"service\"}"),
        services_written
    );
    assert_eq!(must(&before, "kep_map_update_errors_total"), 0.0);
    assert!(must(&before, "kep_sync_duration_seconds_count") >= 1.0);
    // The first sync comes from the source's first change.
    assert!(must(&before, "kep_network_programming_duration_seconds_count") >= 1.0);
    let flows_before = must(&before, NEW_FLOWS);

    // 50 connections through the ClusterIP: 50 new flows. The counters are
    // copied once a second.
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let report = lab.client().run(move || {
        loadgen::tcp_requests(target, 50, Duration::from_secs(2), Duration::from_secs(60))
    });
    println!("{report}");
    assert_eq!(report.ok, 50, "{report}\nagent:\n{}", agent.log_tail(30));
    let after_traffic = scrape_until(
        &lab,
        &agent,
        addr,
        "new_flows up by 50",
        Duration::from_secs(10),
        |t| value(t, NEW_FLOWS).is_some_and(|v| v >= flows_before + 50.0),
    );
    println!(
        "new_flows {flows_before} -> {}",
        must(&after_traffic, NEW_FLOWS)
    );

    // An EndpointSlice change (backend-2 removed): a sync and a network
    // programming sample more.
    let syncs = must(&after_traffic, "kep_sync_duration_seconds_count");
    let programmed = must(
        &after_traffic,
        "kep_network_programming_duration_seconds_count",
    );
    let backends = must(&after_traffic, "kep_map_entries{map=\"kep_backends\"}");
    let mark = agent.log_mark();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1]))
        .unwrap();
    agent
        .wait_for_log_since(mark, PROGRAMMED, AGENT_READY)
        .expect("agent re-programs after the EndpointSlice change");
    let after_edit = scrape_until(
        &lab,
        &agent,
        addr,
        "sync and programming counts up after the edit",
        Duration::from_secs(10),
        |t| {
            value(t, "kep_sync_duration_seconds_count").is_some_and(|v| v > syncs)
                && value(t, "kep_network_programming_duration_seconds_count")
                    .is_some_and(|v| v > programmed)
        },
    );
    println!("{after_edit}");
    assert_eq!(
        must(&after_edit, "kep_objects{kind=\"service\"}"),
        services_written
    );
    assert!(
        must(&after_edit, "kep_map_entries{map=\"kep_backends\"}") < backends,
        "a removed endpoint leaves the backends map\n{after_edit}"
    );
    assert_eq!(must(&after_edit, "kep_objects_skipped"), 0.0);
    assert_eq!(get(&lab, health_addr, "/healthz").status, 200);
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}

/// kube-proxy's URLs with the agent's defaults, as Kubernetes' e2e test
/// "should check kube-proxy urls" checks them (`/healthz` on 10256 answers
/// 200 with `lastUpdated`, `/proxyMode` on 10249 answers 200), plus the
/// rest of the layout: metrics only on loopback, health on every address.
#[test]
fn kube_proxy_urls_and_defaults() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0])).unwrap();
    let agent = lab.start_manifest_agent().expect("agent programs");
    for what in ["serving /metrics", "serving /healthz"] {
        agent.wait_for_log(what, AGENT_READY).expect(what);
    }
    let localhost_healthz = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));

    let healthz = get(&lab, localhost_healthz, "/healthz");
    assert_eq!(healthz.status, 200, "{healthz:?}");
    assert!(
        healthz.head.contains("content-type: application/json"),
        "{healthz:?}"
    );
    assert!(
        healthz.head.contains("x-content-type-options: nosniff"),
        "{healthz:?}"
    );
    let body: serde_json::Value = serde_json::from_str(&healthz.body).expect("JSON");
    assert!(body["lastUpdated"].is_string(), "{body}");
    assert!(body["currentTime"].is_string(), "{body}");
    assert_eq!(body["nodeEligible"], true, "{body}");
    let livez = get(&lab, localhost_healthz, "/livez");
    assert_eq!(livez.status, 200, "{livez:?}");
    assert!(livez.body.contains("\"lastUpdated\""), "{livez:?}");
    assert_eq!(get(&lab, localhost_healthz, "/readyz").status, 200);

    let mode = get(&lab, METRICS, "/proxyMode");
    assert_eq!((mode.status, mode.body.as_str()), (200, "ebpf"), "{mode:?}");
    assert!(
        mode.head
            .contains("content-type: text/plain; charset=utf-8"),
        "{mode:?}"
    );
    assert_eq!(get(&lab, METRICS, "/metrics").status, 200);
    let ping = get(&lab, METRICS, "/healthz");
    assert_eq!((ping.status, ping.body.as_str()), (200, "ok"), "{ping:?}");

    // From a pod: the health server answers on the node's addresses (cloud
    // load balancers check it); the metrics server is loopback only.
    let from_pod =
        |port: u16, path: &str| get_from(lab.client(), SocketAddr::from((CLIENT_GW, port)), path);
    let r = from_pod(HEALTHZ_PORT, "/healthz").expect("health server from a pod");
    assert_eq!(r.status, 200, "{r:?}");
    let refused = from_pod(10249, "/metrics").map(|r| r.status);
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "metrics must not be served beyond loopback by default"
    );
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}

/// A services map too small for what is added: one error line names the
/// map and its capacity flag, `kep_map_full_errors_total` counts the
/// refused writes, and the Services already programmed keep answering.
#[test]
fn full_services_map_is_named_counted_and_spares_the_rest() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let addr = METRICS;
    // demo: two ports of three endpoints each and its cluster IP's entry,
    // 9 entries; 16 leave room for one more such Service, not ten.
    let args: Vec<OsString> = vec![
        "--manifests".into(),
        lab.manifest_dir().into(),
        "--metrics-bind-address".into(),
        addr.to_string().into(),
        "--services-max".into(),
        "16".into(),
    ];
    let agent = lab.start_agent_args(&args).expect("start the agent");
    agent
        .wait_for_log(PROGRAMMED, AGENT_READY)
        .expect("agent programs the datapath");
    agent
        .wait_for_log("serving /metrics", AGENT_READY)
        .expect("agent serves metrics");
    let more: Vec<String> = (0..10)
        .map(|i| {
            yaml::service(
                &format!("more-{i}"),
                &format!("10.96.5.{}", i + 1),
                &[("http", 80, "TCP", "8080")],
                "demo",
            )
        })
        .collect();
    let mark = agent.log_mark();
    lab.write_manifest("more.yaml", &more.join("---\n"))
        .unwrap();
    agent
        .wait_for_log_since(
            mark,
            "map kep_services is full: raise --services-max",
            AGENT_READY,
        )
        .expect("the full map is named with its flag");
    let series = "kep_map_full_errors_total{map=\"kep_services\"}";
    scrape_until(
        &lab,
        &agent,
        addr,
        "full-map errors counted",
        AGENT_READY,
        |t| value(t, series).is_some_and(|v| v > 0.0),
    );
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let r = lab.client().run(move || {
        loadgen::tcp_requests(target, 20, Duration::from_secs(2), Duration::from_secs(20))
    });
    assert_eq!(r.error_count(), 0, "demo still answers: {r}");
    assert!(agent.is_running(), "{}", agent.log_tail(20));
}
