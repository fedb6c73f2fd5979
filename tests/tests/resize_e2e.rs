//! Restarting the agent with other `--*-max` values (issue 17, item 11):
//! the pinned maps used to be adopted at their old sizes while the metrics
//! reported the new ones. Now each map of another size is migrated into a
//! new map of the size asked for, contents and conntrack included: a
//! long-lived connection keeps its endpoint, the first sync rewrites
//! nothing, and `status` and the metrics show the real sizes.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use lab::addr::{DEMO_VIP, HTTP_PORT};
use lab::agent::agent_bin;
use lab::loadgen::{self, TcpSession};
use lab::{Agent, Lab, hostile, yaml};

fn start<'l>(lab: &'l Lab, services: u32, backends: u32, conntrack: u32) -> Agent<'l> {
    let args: Vec<OsString> = vec![
        "--manifests".into(),
        lab.manifest_dir().into(),
        "--services-max".into(),
        services.to_string().into(),
        "--backends-max".into(),
        backends.to_string().into(),
        "--conntrack-max".into(),
        conntrack.to_string().into(),
        "--conntrack-other-max".into(),
        conntrack.to_string().into(),
    ];
    lab.start_agent_programmed(&args)
        .expect("agent programs the datapath")
}

fn status(lab: &Lab) -> serde_json::Value {
    let out = Command::new(agent_bin().unwrap())
        .args(["status", "--json", "--bpffs"])
        .arg(lab.bpffs_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn capacity_metric(lab: &Lab, map: &str) -> Option<f64> {
    let r = lab.node().run(|| {
        hostile::probe(
            None,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
            "/metrics",
            Duration::from_secs(5),
        )
    });
    let series = format!("kep_map_capacity{{map=\"{map}\"}} ");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn new_map_sizes_are_migrated_into_keeping_flows() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let agent = start(&lab, 64, 32, 1024);
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let mut session = lab
        .client()
        .run(move || TcpSession::connect(target, Duration::from_secs(2)))
        .expect("long-lived connection");
    let backend = lab.client().run(|| session.request()).unwrap();

    agent.kill_keeping_pins();
    for (round, (services, backends, conntrack)) in
        [(128, 64, 4096), (32, 16, 512)].into_iter().enumerate()
    {
        let agent = start(&lab, services, backends, conntrack);
        for (map, want) in [
            ("kep_services", services),
            ("kep_backends", backends),
            ("kep_ct_tcp", conntrack),
            ("kep_ct_other", conntrack),
        ] {
            assert!(
                agent.log_contains(&format!("map=\"{map}\"")),
                "round {round}: {map} migrated:\n{}",
                agent.log_tail(30)
            );
            let got = status(&lab)["maps"][map]["capacity"].as_u64();
            assert_eq!(got, Some(u64::from(want)), "round {round}: {map}");
            assert_eq!(
                capacity_metric(&lab, map),
                Some(f64::from(want)),
                "round {round}: {map} metric"
            );
        }
        assert_eq!(
            agent.first_sync_ops(),
            Some(0),
            "round {round}: the copied maps were rewritten:\n{}",
            agent.log_tail(20)
        );
        let got = lab.client().run(|| session.request());
        assert_eq!(
            got.as_deref().ok(),
            Some(backend.as_str()),
            "round {round}: the connection kept its endpoint"
        );
        let r = lab.client().run(move || {
            loadgen::tcp_requests(target, 30, Duration::from_secs(2), Duration::from_secs(20))
        });
        assert_eq!(r.error_count(), 0, "round {round}: {r}");
        agent.kill_keeping_pins();
    }
}
