//! A manifest built to exhaust memory (issue 17, item 9): a 1 MB file whose
//! one 1 MB string is named 2,000 times through a YAML alias took the agent
//! to 7 GB for 33 s and kept 6.2 GB after the file was removed. The real
//! agent must refuse it with one clear warning and a metric, stay small
//! while doing so (its peak RSS is measured), keep serving everything else,
//! and be as small as before once the file is gone.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::addr::{DEMO_VIP, HTTP_PORT};
use lab::{Lab, hostile, loadgen, yaml};

const MIB: u64 = 1 << 20;

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`: peak RSS).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib * 1024
}

/// The file: one 1 MB string expanded 2,000 times (2 GB of text).
fn alias_bomb() -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bomb\n  annotations:\n    a: &big \"{}\"\n",
        "x".repeat(1 << 20)
    );
    text.push_str("spec:\n  clusterIP: 10.96.0.99\n  ports: [");
    for i in 0..2000 {
        text.push_str(if i == 0 { "*big" } else { ", *big" });
    }
    text.push_str("]\n");
    text
}

fn objects_skipped(lab: &Lab) -> f64 {
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
    let r = lab
        .node()
        .run(|| hostile::probe(None, metrics, "/metrics", Duration::from_secs(5)));
    assert_eq!(r.status, Some(200), "{r:?}");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix("kep_objects_skipped "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no kep_objects_skipped in\n{}", r.body))
}

fn demo_answers(lab: &Lab) {
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let report = lab.client().run(move || {
        loadgen::tcp_requests(target, 20, Duration::from_secs(2), Duration::from_secs(30))
    });
    assert_eq!(report.ok, 20, "{report}");
}

#[test]
fn an_alias_bomb_is_refused_in_bounded_memory_and_the_rest_is_served() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let agent = lab.start_manifest_agent().expect("agent programs");
    agent
        .wait_for_log("serving /metrics", Duration::from_secs(10))
        .unwrap();
    demo_answers(&lab);
    let pid = agent.pid();
    let rss_before = status_bytes(pid, "VmRSS");

    let mark = agent.log_mark();
    let bomb = alias_bomb();
    assert!(bomb.len() < 2 * MIB as usize);
    lab.write_manifest("bomb.yaml", &bomb).unwrap();
    agent
        .wait_for_log_since(mark, "bomb.yaml", Duration::from_secs(60))
        .expect("the agent reports the file");
    let peak = status_bytes(pid, "VmHWM");
    let lines: Vec<String> = agent
        .logs()
        .lines()
        .skip(mark)
        .filter(|l| l.contains("bomb.yaml"))
        .map(String::from)
        .collect();
    println!(
        "RSS before {} MiB, peak {} MiB; {lines:?}",
        rss_before / MIB,
        peak / MIB
    );
    assert_eq!(lines.len(), 1, "one warning: {lines:?}");
    assert!(
        lines[0].contains("anchors and aliases") && lines[0].contains("refused"),
        "{}",
        lines[0]
    );
    assert!(
        peak < rss_before + 64 * MIB,
        "the agent grew from {} MiB to a peak of {} MiB on a {} KiB file",
        rss_before / MIB,
        peak / MIB,
        bomb.len() / 1024
    );
    assert_eq!(objects_skipped(&lab), 1.0, "the skip shows in the metrics");
    demo_answers(&lab);

    // Gone again: the next sync has nothing to skip, and the memory is back.
    let mark = agent.log_mark();
    lab.remove_manifest("bomb.yaml").unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(30))
        .unwrap();
    assert_eq!(objects_skipped(&lab), 0.0);
    let rss_after = status_bytes(pid, "VmRSS");
    println!("RSS after removal {} MiB", rss_after / MIB);
    assert!(
        rss_after < rss_before + 4 * MIB,
        "RSS {} MiB before the file, {} MiB after it was removed",
        rss_before / MIB,
        rss_after / MIB
    );
    demo_answers(&lab);
    assert!(agent.is_running(), "{}", agent.log_tail(30));
}
