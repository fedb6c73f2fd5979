//! The inspection commands against a lab agent with known services: what
//! `kube-ebpf-proxy status|dump` and `bpftool map dump pinned` print.
//!
//! Needs root, bpftool and the agent binary; fails loudly without them.

use std::net::SocketAddrV4;
use std::process::Command;
use std::time::Duration;

use lab::addr::{DEMO_VIP, HTTP_PORT, backend_ip};
use lab::agent::agent_bin;
use lab::loadgen;
use lab::{Lab, yaml};
use serde_json::Value;

fn cli(lab: &Lab, args: &[&str]) -> String {
    let out = Command::new(agent_bin().unwrap())
        .args(args)
        .arg("--bpffs")
        .arg(lab.bpffs_dir())
        .output()
        .expect("run kube-ebpf-proxy");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn json(lab: &Lab, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&cli(lab, &args)).expect("valid JSON")
}

#[test]
fn status_and_dump_show_the_known_services() {
    let lab = Lab::new().unwrap();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    lab.write_manifest("empty.yaml", &yaml::empty()).unwrap();
    let _agent = lab
        .start_manifest_agent()
        .expect("agent programs the datapath");
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let r = lab.client().run(move || {
        loadgen::tcp_requests(target, 30, Duration::from_secs(2), Duration::from_secs(20))
    });
    assert_eq!(r.error_count(), 0, "{r}");

    let services = json(&lab, &["dump", "services"]);
    let find = |f: &str| {
        services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["frontend"] == f)
            .unwrap_or_else(|| panic!("{f} missing from {services:#}"))
            .clone()
    };
    let demo = find("10.96.0.10:80/TCP");
    // 30 connections, each several packets in each direction.
    assert!(demo["packets"].as_u64().unwrap() >= 30 * 4, "{demo:#}");
    assert!(demo["bytes"].as_u64().unwrap() > demo["packets"].as_u64().unwrap() * 40);
    let per_backend = json(&lab, &["dump", "backends"]);
    let counted: u64 = per_backend
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(
        counted,
        demo["packets"].as_u64().unwrap(),
        "every packet counted once per side"
    );
    let mut backends: Vec<String> = demo["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    backends.sort();
    let expected: Vec<String> = (0..3).map(|i| format!("{}:8080", backend_ip(i))).collect();
    assert_eq!(backends, expected);
    assert_eq!(
        find("10.96.0.10:53/UDP")["backends"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(find("10.96.0.11:80/TCP")["empty"], "reject");

    let status = json(&lab, &["status"]);
    assert!(
        status["counters"]["new_flows"].as_u64().unwrap() >= 30,
        "{status:#}"
    );
    assert!(status["maps"]["kep_services"]["capacity"].as_u64().unwrap() > 0);
    assert_eq!(status["frontends"], 4);

    let flows = json(&lab, &["dump", "conntrack"]);
    let flows = flows.as_array().unwrap();
    assert!(flows.iter().any(|f| {
        f["direction"] == "forward"
            && f["tuple"]
                .as_str()
                .unwrap()
                .contains("-> 10.96.0.10:80/TCP")
    }));
    assert!(
        flows
            .iter()
            .any(|f| f["direction"] == "reply" && f["nat"] == "10.96.0.10:80")
    );

    // The tables read the same.
    let table = cli(&lab, &["dump", "services"]);
    assert!(
        table.lines().next().unwrap().starts_with("frontend"),
        "{table}"
    );
    assert!(
        table.contains("10.96.0.11:80/TCP") && table.contains("reject"),
        "{table}"
    );
    assert!(cli(&lab, &["status"]).contains("new_flows"));

    // bpftool prints the maps' fields by name (BTF).
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(proxy_userspace::datapath::maps_dir(&lab.bpffs_dir()).join("kep_services"))
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for field in [
        "\"addr\"",
        "\"port\"",
        "\"slot\"",
        "\"svc_id\"",
        "\"backend_id\"",
    ] {
        assert!(
            text.contains(field),
            "bpftool output lacks {field}:\n{text}"
        );
    }
}
