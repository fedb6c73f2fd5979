//! Conntrack hygiene end to end: closed connections' state goes, open ones'
//! stays, and a UDP client whose endpoint is removed is answered by another
//! endpoint at once (the stale-UDP-flow black hole kube-proxy users know
//! from CoreDNS restarts).
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use lab::addr::{DEMO_VIP, DNS_PORT, HTTP_PORT};
use lab::loadgen::{self, TcpSession};
use lab::{Agent, Lab, yaml};
use proxy_common::proto;
use proxy_userspace::inspect::Pinned;

fn start<'l>(lab: &'l Lab, extra: &[&str]) -> Agent<'l> {
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    lab.start_manifest_agent_with(extra)
        .expect("agent programs the datapath")
}

fn tcp_entries(lab: &Lab) -> usize {
    Pinned::read(&lab.bpffs_dir())
        .unwrap()
        .conntrack
        .iter()
        .filter(|(k, _)| k.proto == proto::TCP)
        .count()
}

#[test]
fn closed_connections_leave_conntrack_and_open_ones_stay() {
    let lab = Lab::new().unwrap();
    let _agent = start(
        &lab,
        &[
            "--conntrack-tcp-timeout-closing",
            "2s",
            "--conntrack-gc-interval",
            "1s",
        ],
    );
    let http = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    // One connection stays open (and idle) for the whole test.
    let session = lab
        .client()
        .run(move || TcpSession::connect(http, Duration::from_secs(2)))
        .expect("long-lived connection");
    let r = lab.client().run(move || {
        loadgen::tcp_requests(http, 20, Duration::from_secs(2), Duration::from_secs(20))
    });
    assert_eq!(r.error_count(), 0, "{r}");
    assert_eq!(tcp_entries(&lab), 2 * 21, "two entries per connection");

    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_entries(&lab) > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        tcp_entries(&lab),
        2,
        "closed connections' entries must go; the open one's must stay"
    );
    // And the open connection still works.
    let mut session = session;
    let name = lab
        .client()
        .run(move || session.request())
        .expect("request on the open connection");
    assert!(name.starts_with("backend-"), "{name}");
}

#[test]
fn udp_client_is_answered_by_another_endpoint_within_a_second_of_removal() {
    let lab = Lab::new().unwrap();
    let agent = start(&lab, &[]);
    let dns = SocketAddrV4::new(DEMO_VIP, DNS_PORT);
    // One socket (one 5-tuple, one conntrack flow) sending every 10 ms.
    let sender = lab
        .client()
        .spawn("udp-client", move || -> Vec<(Instant, String)> {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            let mut seen = Vec::new();
            let end = Instant::now() + Duration::from_secs(4);
            let mut buf = [0u8; 64];
            while Instant::now() < end {
                let _ = s.send_to(b"q\n", dns);
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    seen.push((
                        Instant::now(),
                        String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        })
        .unwrap();
    // Let the flow settle on an endpoint, then remove exactly that one.
    std::thread::sleep(Duration::from_millis(800));
    let first = {
        // The servers count datagrams; the flow's backend is the busy one.
        (0..3)
            .max_by_key(|i| lab.backend_stats(*i).udp_datagrams)
            .unwrap()
    };
    let keep: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let mark = agent.log_mark();
    let removed_at = Instant::now();
    lab.write_manifest("demo.yaml", &yaml::demo(&keep)).unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(5))
        .unwrap();
    let seen = sender.join();
    let gone = format!("backend-{first}");
    assert!(
        seen.iter().any(|(t, n)| *t < removed_at && *n == gone),
        "the flow was not on backend-{first} before: {:?}",
        seen.iter().map(|(_, n)| n).collect::<Vec<_>>()
    );
    let moved = seen
        .iter()
        .find(|(t, n)| *t > removed_at && *n != gone)
        .map(|(t, _)| t.duration_since(removed_at))
        .expect("never answered by another endpoint");
    assert!(
        moved < Duration::from_secs(1),
        "answered by another endpoint only after {moved:?}"
    );
    let late = seen
        .iter()
        .filter(|(t, n)| t.duration_since(removed_at) > Duration::from_secs(1) && *n == gone)
        .count();
    assert_eq!(late, 0, "still answered by the removed endpoint after 1 s");
}
