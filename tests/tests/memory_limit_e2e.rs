//! The shipped DaemonSet's memory limit holds a node with 10,000 Services:
//! the agent runs in a memory cgroup limited to exactly what
//! `manifests/deploy/daemonset.yaml` asks for (BPF map memory is charged to
//! the cgroup of the process that creates the maps), programs every
//! Service and serves the last one, without an OOM kill or a refused map
//! write.
//!
//! Needs root, the cgroup v1 memory controller and the agent binary; fails
//! loudly without them.

use std::net::SocketAddrV4;
use std::time::Duration;

use lab::bench::rules;
use lab::cgroup::TestCgroup;
use lab::{Lab, loadgen};

const SERVICES: usize = 10_000;

/// The agent container's `resources.limits.memory`, in bytes.
fn shipped_limit() -> u64 {
    let path = lab::workspace_root().join("manifests/deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let limit = ds["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        .as_str()
        .unwrap_or_else(|| panic!("no memory limit in {}", path.display()))
        .to_string();
    let (number, unit) = limit.split_at(limit.find(|c: char| !c.is_ascii_digit()).unwrap());
    let number: u64 = number.parse().unwrap();
    number
        * match unit {
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            other => panic!("unexpected unit {other:?} in {limit}"),
        }
}

#[test]
fn agent_serves_10k_services_within_the_shipped_memory_limit() {
    let limit = shipped_limit();
    let cgroup = TestCgroup::memory_v1(limit).expect("a memory cgroup of our own");
    let lab = Lab::new().unwrap();
    let services = rules::services(SERVICES, 3);
    lab.write_manifest("many.yaml", &rules::manifest(&services))
        .unwrap();
    let agent = lab
        .start_agent_in_cgroup(
            &["--manifests".into(), lab.manifest_dir().into()],
            &cgroup.procs(),
        )
        .unwrap();
    agent
        .wait_for_log("datapath programmed", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e:#}\nOOM kills in the cgroup: {}", cgroup.oom_kills()));
    let last = SocketAddrV4::new(services.last().unwrap().vip, rules::SERVICE_PORT);
    let r = lab.client().run(move || {
        loadgen::tcp_requests(last, 20, Duration::from_secs(2), Duration::from_secs(20))
    });
    assert_eq!(r.error_count(), 0, "the last Service answers: {r}");
    assert!(agent.is_running(), "{}", agent.log_tail(20));
    assert_eq!(cgroup.oom_kills(), 0, "no OOM kill in the cgroup");
    let logs = agent.logs();
    assert!(
        logs.lines()
            .filter(|l| l.contains("datapath programmed"))
            .all(|l| l.contains(" failed=0 ")),
        "a map write failed:\n{}",
        agent.log_tail(20)
    );
    assert!(!logs.contains("is full"), "{}", agent.log_tail(20));
    let peak = cgroup.read_u64("memory.max_usage_in_bytes").unwrap();
    println!(
        "peak cgroup usage {:.1} MiB of the {:.0} MiB limit",
        peak as f64 / 1048576.0,
        limit as f64 / 1048576.0
    );
}
