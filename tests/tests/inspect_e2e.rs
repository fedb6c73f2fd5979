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

/// Issue 15: a dual-stack Service's IPv6 half is written into the IPv6
/// maps (`kep_services6`, `kep_backends6`), beside its IPv4 half in the
/// IPv4 ones, and `status`, `dump` and bpftool show both.
#[test]
fn status_and_dump_show_both_halves_of_a_dual_stack_service() {
    use lab::addr::{DEMO_VIP6, backend_ip6};
    use lab::backend_name;
    use lab::yaml::{IpFamilyPolicy, Svc, SvcPort, endpoint_slice};

    let lab = Lab::new().unwrap();
    let svc = Svc::cluster_ip(
        "web",
        DEMO_VIP,
        vec![SvcPort::new("http", HTTP_PORT, "TCP", "http")],
    )
    .dual_stack(DEMO_VIP6.into(), IpFamilyPolicy::PreferDualStack);
    let ports = [("http", 8080, "TCP")];
    let v4 = endpoint_slice(
        "web-v4",
        "web",
        &ports,
        &[(backend_ip(0), backend_name(0), true)],
    );
    let v6 = endpoint_slice(
        "web-v6",
        "web",
        &ports,
        &[
            (backend_ip6(0), backend_name(0), true),
            (backend_ip6(1), backend_name(1), true),
        ],
    );
    lab.write_manifest("web.yaml", &format!("{}---\n{v4}---\n{v6}", svc.render()))
        .unwrap();
    let _agent = lab
        .start_manifest_agent()
        .expect("agent programs the datapath");

    let services = json(&lab, &["dump", "services"]);
    let backends_of = |f: &str| -> Vec<String> {
        let svc = services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["frontend"] == f)
            .unwrap_or_else(|| panic!("{f} missing from {services:#}"));
        let mut list: Vec<String> = svc["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        list.sort();
        list
    };
    assert_eq!(
        backends_of(&format!("[{DEMO_VIP6}]:80/TCP")),
        [
            format!("[{}]:8080", backend_ip6(0)),
            format!("[{}]:8080", backend_ip6(1))
        ]
    );
    assert_eq!(
        backends_of(&format!("{DEMO_VIP}:80/TCP")),
        [format!("{}:8080", backend_ip(0))]
    );
    let listed = json(&lab, &["dump", "backends"]);
    let endpoints: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints.len(), 3, "{listed:#}");

    let status = json(&lab, &["status"]);
    assert_eq!(status["frontends"], 2, "{status:#}");
    // Slot 0, two slots and the cluster IP's port-less entry; the IPv4
    // maps hold only the IPv4 half.
    assert_eq!(status["maps"]["kep_services6"]["entries"], 4, "{status:#}");
    assert_eq!(status["maps"]["kep_backends6"]["entries"], 2, "{status:#}");
    assert_eq!(status["maps"]["kep_services"]["entries"], 3, "{status:#}");
    assert_eq!(status["maps"]["kep_backends"]["entries"], 1, "{status:#}");

    // The node's own IPv6 addresses (the pod veths' gateways) and every
    // IPv6 endpoint are in their maps, for host endpoints and direct flows.
    let pinned = |name: &str| {
        let path = proxy_userspace::datapath::maps_dir(&lab.bpffs_dir()).join(name);
        aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let node_addrs: aya::maps::HashMap<_, proxy_common::Addr6, u8> =
        aya::maps::Map::HashMap(pinned("kep_node_addrs6"))
            .try_into()
            .unwrap();
    let node_addrs: Vec<std::net::Ipv6Addr> = node_addrs
        .keys()
        .map(|k| proxy_userspace::contents::addr6_from_map(k.unwrap()))
        .collect();
    assert!(
        node_addrs.contains(&lab::addr::backend_gw6(0))
            && node_addrs.contains(&lab::addr::CLIENT_GW6),
        "{node_addrs:?}"
    );
    let endpoints: aya::maps::HashMap<_, proxy_common::Backend6, u8> =
        aya::maps::Map::HashMap(pinned("kep_endpoints6"))
            .try_into()
            .unwrap();
    let mut endpoints: Vec<String> = endpoints
        .keys()
        .map(|k| {
            let b = k.unwrap();
            let addr = proxy_userspace::contents::addr6_from_map(b.addr);
            format!("[{addr}]:{}", u16::from_be(b.port))
        })
        .collect();
    endpoints.sort();
    assert_eq!(
        endpoints,
        [
            format!("[{}]:8080", backend_ip6(0)),
            format!("[{}]:8080", backend_ip6(1))
        ]
    );

    // bpftool prints the IPv6 maps' fields by name too.
    for (map, fields) in [
        ("kep_services6", &["\"addr\"", "\"slot\"", "\"svc_id\""][..]),
        ("kep_backends6", &["\"addr\"", "\"port\"", "\"proto\""][..]),
    ] {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(proxy_userspace::datapath::maps_dir(&lab.bpffs_dir()).join(map))
            .output()
            .expect("run bpftool");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        for field in fields {
            assert!(
                text.contains(field),
                "{map}: bpftool lacks {field}:\n{text}"
            );
        }
    }
}
