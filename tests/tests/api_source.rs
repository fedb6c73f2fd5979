//! The API server as the agent's source: a fake API server (real wire
//! protocol) listening on 127.0.0.1 inside the lab's node namespace, the real
//! agent started with `--kubeconfig`, traffic from the lab client.
//!
//! They need root and the agent binary (`KEP_AGENT_BIN` or
//! `target/debug/kube-ebpf-proxy`): without them they fail, they never skip.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lab::addr::{DEMO_VIP, EMPTY_VIP, HTTP_PORT};
use lab::fake_apiserver::{FakeApiServer, Kind, describe_log};
use lab::loadgen::{self, ErrorKind, Report};
use lab::{Agent, Lab, yaml};
use serde_json::json;

const PER_REQUEST: Duration = Duration::from_secs(2);
const BATCH_DEADLINE: Duration = Duration::from_secs(60);
const PROGRAMMED: &str = "datapath programmed";
const AGENT_READY: Duration = Duration::from_secs(30);
/// The agent's health server, as the node's kubelet reaches it.
const HEALTH: SocketAddrV4 = SocketAddrV4::new(lab::addr::CLIENT_GW, 10256);
/// ClusterIP of the `extra` service the tests create.
const EXTRA_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn http() -> SocketAddrV4 {
    SocketAddrV4::new(DEMO_VIP, HTTP_PORT)
}

fn extra() -> SocketAddrV4 {
    SocketAddrV4::new(EXTRA_VIP, HTTP_PORT)
}

/// A fake API server in the lab's node namespace holding this node, `demo`
/// (the given backends) and `empty`, and a kubeconfig for it.
fn api_server(lab: &Lab, demo_backends: &[usize]) -> (FakeApiServer, PathBuf) {
    let server = FakeApiServer::start_in_netns(lab.node().path()).expect("start fake API server");
    server
        .apply(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": lab::LAB_NODE, "labels": {"topology.kubernetes.io/zone": "lab"}}
        }))
        .unwrap();
    server.apply_yaml(&yaml::demo(demo_backends)).unwrap();
    server.apply_yaml(&yaml::empty()).unwrap();
    let kubeconfig = server.kubeconfig(lab.dir()).unwrap();
    (server, kubeconfig)
}

fn start_agent<'l>(lab: &'l Lab, kubeconfig: &std::path::Path) -> Agent<'l> {
    lab.start_agent_args(&[
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--node-name".into(),
        lab::LAB_NODE.into(),
    ])
    .expect("start the agent")
}

/// Service `extra` (EXTRA_VIP:80 -> `http`) and its slice over `backends`.
fn extra_yaml(backends: &[usize]) -> String {
    let svc = yaml::service(
        "extra",
        &EXTRA_VIP.to_string(),
        &[("http", 80, "TCP", "http")],
        "extra",
    );
    let eps: Vec<_> = backends
        .iter()
        .map(|&i| (lab::addr::backend_ip(i), lab::backend_name(i), true))
        .collect();
    let slice = yaml::endpoint_slice("extra-lab", "extra", &[("http", 8080, "TCP")], &eps);
    format!("{svc}---\n{slice}")
}

fn tcp(lab: &Lab, target: SocketAddrV4, n: usize) -> Report {
    lab.client()
        .run(move || loadgen::tcp_requests(target, n, PER_REQUEST, BATCH_DEADLINE))
}

fn probe(lab: &Lab, target: SocketAddrV4, timeout: Duration) -> loadgen::Probe {
    lab.client()
        .run(move || loadgen::tcp_probe(target, timeout))
}

/// Polls `check` every 100 ms until it is true or `within` passed; returns
/// how long it took.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_clean(r: &Report, agent: &Agent<'_>) {
    assert_eq!(
        r.error_count(),
        0,
        "{r}\nagent output:\n{}",
        agent.log_tail(30)
    );
    assert_eq!(r.ok, r.requested, "{r}");
}

/// Demo traffic no longer reaches backend-2 (and still reaches 0 and 1).
fn demo_without_backend2(lab: &Lab) -> bool {
    let r = tcp(lab, http(), 30);
    r.error_count() == 0 && r.count("backend-2") == 0 && r.per_backend.len() == 2
}

/// `extra` answers.
fn extra_reachable(lab: &Lab) -> bool {
    probe(lab, extra(), Duration::from_millis(300))
        .result
        .is_ok()
}

/// Connections to `target` are not translated any more: no backend answers
/// and (unlike a service without endpoints) nothing rejects them.
fn untranslated(lab: &Lab, target: SocketAddrV4) -> bool {
    let p = probe(lab, target, Duration::from_millis(300));
    p.result.is_err() && p.error_kind() != Some(ErrorKind::Refused)
}

/// Agent started against an API server that has everything; traffic spreads.
fn lab_with_agent(lab: &Lab) -> (FakeApiServer, Agent<'_>) {
    let (server, kubeconfig) = api_server(lab, &[0, 1, 2]);
    let agent = start_agent(lab, &kubeconfig);
    agent
        .wait_for_log(PROGRAMMED, AGENT_READY)
        .expect("agent programs the datapath from the API server");
    (server, agent)
}

#[test]
fn initial_sync_before_first_program() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let (server, kubeconfig) = api_server(&lab, &[0, 1, 2]);
    // The slices' list is slow: nothing may be programmed before it is in.
    server.set_list_delay(Kind::EndpointSlice, Duration::from_secs(2));
    let agent = start_agent(&lab, &kubeconfig);

    let deadline = Instant::now() + AGENT_READY;
    let programmed_at = loop {
        // Agent output first, then the request log: a line seen here was
        // printed before every entry read below was logged.
        let programmed = agent.log_contains(PROGRAMMED);
        let log = server.request_log();
        let listed = |k| log.iter().any(|r| r.is_list_of(k));
        if programmed {
            for k in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
                assert!(
                    listed(k),
                    "datapath programmed before the {k:?} list completed\nrequests:\n{}\nagent:\n{}",
                    describe_log(&log),
                    agent.log_tail(30)
                );
            }
            break Instant::now();
        }
        assert!(agent.is_running(), "{}", agent.log_tail(30));
        assert!(
            Instant::now() < deadline,
            "agent never programmed\nrequests:\n{}\nagent:\n{}",
            describe_log(&log),
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = server.request_log();
    println!("{}", describe_log(&log));
    let slice_list = log
        .iter()
        .find(|r| r.is_list_of(Kind::EndpointSlice))
        .unwrap();
    assert!(slice_list.at <= programmed_at);
    // kube-proxy's selectors were sent.
    assert_eq!(
        slice_list.param("labelSelector"),
        Some("!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name")
    );
    let svc_list = log.iter().find(|r| r.is_list_of(Kind::Service)).unwrap();
    assert_eq!(
        svc_list.param("labelSelector"),
        Some("!service.kubernetes.io/service-proxy-name")
    );
    let node_list = log.iter().find(|r| r.is_list_of(Kind::Node)).unwrap();
    assert_eq!(
        node_list.param("fieldSelector"),
        Some("metadata.name=lab-node")
    );
    // Exactly one programming so far, of the complete state.
    assert_eq!(agent.log_count(PROGRAMMED), 1, "{}", agent.logs());

    let r = tcp(&lab, http(), 300);
    println!("{r}");
    assert_clean(&r, &agent);
    assert_eq!(r.per_backend.len(), 3, "all 3 backends answer\n{r}");
    let e = probe(&lab, SocketAddrV4::new(EMPTY_VIP, HTTP_PORT), PER_REQUEST);
    assert_eq!(e.error_kind(), Some(ErrorKind::Refused), "{e:?}");
}

#[test]
fn create_update_delete_follow_quickly() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let (server, agent) = lab_with_agent(&lab);
    assert!(untranslated(&lab, extra()), "extra is not there yet");

    // Create.
    server.apply_yaml(&extra_yaml(&[0, 1])).unwrap();
    let took = eventually(Duration::from_secs(2), || extra_reachable(&lab));
    assert!(
        took.is_some(),
        "new service not reachable within 2 s\n{}",
        agent.log_tail(30)
    );
    println!("create: reachable after {took:?}");
    let r = tcp(&lab, extra(), 100);
    assert_clean(&r, &agent);
    assert_eq!(r.per_backend.len(), 2, "{r}");

    // Update: backend-2 leaves demo.
    let before = tcp(&lab, http(), 60);
    assert!(before.count("backend-2") > 0, "{before}");
    server.apply_yaml(&yaml::demo(&[0, 1])).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let r = tcp(&lab, http(), 300);
    println!("{r}");
    assert_clean(&r, &agent);
    assert_eq!(r.count("backend-2"), 0, "removed endpoint still used\n{r}");
    assert_eq!(r.per_backend.len(), 2, "{r}");

    // Delete the Service: its ClusterIP is no longer translated.
    assert!(server.delete(Kind::Service, "default", "extra"));
    let took = eventually(Duration::from_secs(2), || untranslated(&lab, extra()));
    assert!(
        took.is_some(),
        "deleted service still translated after 2 s\n{}",
        agent.log_tail(30)
    );
    println!("delete: untranslated after {took:?}");
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}

#[test]
fn api_server_restart_with_changes_converges() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let (server, agent) = lab_with_agent(&lab);
    assert!(
        probe(&lab, SocketAddrV4::new(EMPTY_VIP, HTTP_PORT), PER_REQUEST).error_kind()
            == Some(ErrorKind::Refused)
    );

    server.stop();
    // While it is down: an endpoint goes, a service comes, one is deleted.
    server.apply_yaml(&yaml::demo(&[0, 1])).unwrap();
    server.apply_yaml(&extra_yaml(&[2])).unwrap();
    assert!(server.delete(Kind::Service, "default", "empty"));
    std::thread::sleep(Duration::from_secs(1));
    // Nothing changed in the datapath meanwhile.
    let r = tcp(&lab, http(), 60);
    assert_clean(&r, &agent);
    assert!(!extra_reachable(&lab));

    server.restart().expect("restart on the same port");
    let took = eventually(Duration::from_secs(5), || {
        extra_reachable(&lab)
            && demo_without_backend2(&lab)
            && untranslated(&lab, SocketAddrV4::new(EMPTY_VIP, HTTP_PORT))
    });
    println!("{}", describe_log(&server.request_log()));
    assert!(
        took.is_some(),
        "not converged 5 s after the API server came back\n{}",
        agent.log_tail(40)
    );
    println!("converged {took:?} after restart");
    let r = tcp(&lab, http(), 300);
    assert_clean(&r, &agent);
    assert_eq!(r.count("backend-2"), 0, "stale endpoint\n{r}");
    let r = tcp(&lab, extra(), 100);
    assert_clean(&r, &agent);
    assert_eq!(
        r.per_backend.keys().collect::<Vec<_>>(),
        vec!["backend-2"],
        "{r}"
    );
}

#[test]
fn gone_410_relists_and_converges() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let (server, agent) = lab_with_agent(&lab);
    let lists_before = server
        .request_log()
        .iter()
        .filter(|r| r.is_list_of(Kind::EndpointSlice))
        .count();

    server.expire_history();
    server.drop_watches();
    server.apply_yaml(&yaml::demo(&[0, 1])).unwrap();
    server.apply_yaml(&extra_yaml(&[1])).unwrap();

    let took = eventually(Duration::from_secs(5), || {
        demo_without_backend2(&lab) && extra_reachable(&lab)
    });
    let log = server.request_log();
    assert!(
        took.is_some(),
        "not converged within 5 s after 410\nrequests:\n{}\nagent:\n{}",
        describe_log(&log),
        agent.log_tail(40)
    );
    println!("converged after {took:?}");
    let lists_after = log
        .iter()
        .filter(|r| r.is_list_of(Kind::EndpointSlice))
        .count();
    assert!(
        lists_after > lists_before,
        "the client did not relist after 410\n{}",
        describe_log(&log)
    );
    let r = tcp(&lab, http(), 300);
    assert_clean(&r, &agent);
    assert_eq!(r.count("backend-2"), 0, "{r}");
}

#[test]
fn api_server_unreachable_keeps_serving() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let (server, agent) = lab_with_agent(&lab);

    server.stop();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        agent.is_running(),
        "agent died without its API server:\n{}",
        agent.log_tail(40)
    );
    let r = tcp(&lab, http(), 200);
    println!("{r}");
    assert_clean(&r, &agent);
    assert_eq!(r.per_backend.len(), 3, "{r}");
    assert!(
        agent.log_contains("retrying"),
        "the outage is logged\n{}",
        agent.log_tail(40)
    );
    // Serving what the maps hold, but not ready: they may be stale.
    let (status, body) = lab.agent_get(HEALTH, "/readyz").unwrap();
    assert_eq!(status, 503, "/readyz during the outage: {body}");
    assert!(body.contains("watch failing"), "{body}");

    // And it catches up once the server is back.
    server.restart().unwrap();
    server.apply_yaml(&extra_yaml(&[0])).unwrap();
    let took = eventually(Duration::from_secs(15), || extra_reachable(&lab));
    assert!(
        took.is_some(),
        "no recovery after the outage\n{}",
        agent.log_tail(40)
    );
    let ready = eventually(Duration::from_secs(15), || {
        lab.agent_get(HEALTH, "/readyz")
            .is_ok_and(|(status, _)| status == 200)
    });
    assert!(ready.is_some(), "not ready again\n{}", agent.log_tail(40));
    assert!(agent.is_running());
}
