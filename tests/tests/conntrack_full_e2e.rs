//! Issue 17.10, the conntrack table under a flood: with `--conntrack-max
//! 1024`, 100 idle established TCP connections through a ClusterIP, then a
//! UDP flood of new flows (each a new socket, as a resolver makes) many times
//! the table's size, then an endpoint added to the Service. Every idle
//! connection must still reach its own endpoint afterwards (before the fix, 27
//! of 100 broke: the LRU evicted one entry of a flow and kept the other, or
//! both, and the next packet picked an endpoint anew). The near-full counter
//! must say what happened.
//!
//! TCP and the other protocols now have a conntrack map each; the UDP one
//! is given the same 1024 entries (`--conntrack-other-max`), so the flood
//! still overflows the table it lands in, as in the issue.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use lab::addr::{DEMO_VIP, DNS_PORT, HTTP_PORT};
use lab::loadgen::TcpSession;
use lab::{Lab, LabConfig, hostile, yaml};

/// How long the near-full counter is waited for: the garbage collection
/// that counts it runs every second here (`--conntrack-gc-interval 1s`).
const COUNTED_WITHIN: Duration = Duration::from_secs(15);

const IDLE: usize = 100;
const FLOOD: usize = 3_000;

#[test]
fn idle_established_connections_survive_a_udp_flood_past_conntrack_max() {
    let lab = Lab::with_config(LabConfig {
        backends: 4,
        ..LabConfig::default()
    })
    .unwrap();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let agent = lab
        .start_manifest_agent_with(&[
            "--conntrack-max",
            "1024",
            "--conntrack-other-max",
            "1024",
            "--conntrack-gc-interval",
            "1s",
        ])
        .expect("agent programs the datapath");
    let http = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let (mut sessions, before) = lab
        .client()
        .run(move || {
            let mut sessions = Vec::new();
            let mut names = Vec::new();
            for _ in 0..IDLE {
                let mut s = TcpSession::connect(http, Duration::from_secs(2))?;
                names.push(s.request()?);
                sessions.push(s);
            }
            std::io::Result::Ok((sessions, names))
        })
        .expect("idle connections opened");

    // The flood: a new flow per datagram, every one answered or not.
    let dns = SocketAddrV4::new(DEMO_VIP, DNS_PORT);
    let answered = lab
        .client()
        .run(move || {
            let mut answered = 0usize;
            let mut buf = [0u8; 64];
            for _ in 0..FLOOD {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s.send_to(b"q\n", dns)?;
                if s.recv_from(&mut buf).is_ok() {
                    answered += 1;
                }
            }
            std::io::Result::Ok(answered)
        })
        .expect("flood sent");
    eprintln!("flood: {answered} of {FLOOD} new UDP flows answered");

    // An endpoint added: a flow that lost its state picks anew, and now
    // may pick the new endpoint (or another old one) mid-connection.
    let mark = agent.log_mark();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2, 3]))
        .unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(10))
        .unwrap();

    let after = lab.client().run(move || {
        sessions
            .iter_mut()
            .map(|s| s.request().map_err(|e| e.to_string()))
            .collect::<Vec<_>>()
    });
    let broken: Vec<String> = before
        .iter()
        .zip(&after)
        .enumerate()
        .filter(|(_, (b, a))| a.as_deref() != Ok(b.as_str()))
        .map(|(i, (b, a))| format!("#{i}: {b} -> {a:?}"))
        .collect();
    // The counter is read once a garbage collection has run after the
    // flood (bounded): it is only checked there.
    let deadline = std::time::Instant::now() + COUNTED_WITHIN;
    let near_full = loop {
        let metrics = lab.node().run(|| {
            let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
            hostile::probe(None, at, "/metrics", Duration::from_secs(10)).body
        });
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("kep_conntrack_near_full") && l.contains("map=\"kep_ct_other\"")
            })
            .unwrap_or("kep_conntrack_near_full{map=\"kep_ct_other\"} missing")
            .to_string();
        if !line.ends_with(" 0") || std::time::Instant::now() >= deadline {
            break line;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("{near_full}");
    assert!(
        broken.is_empty(),
        "{} of {IDLE} idle connections broken by the flood: {broken:?}",
        broken.len()
    );
    assert!(
        !near_full.ends_with(" 0") && !near_full.contains("missing"),
        "a flood past --conntrack-max was not counted: {near_full}"
    );
}
