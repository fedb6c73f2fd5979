//! The XDP fast path on node interfaces, end to end on the two-node
//! cluster lab: an external client reaches a NodePort on the node without
//! endpoints, so every packet of its flows goes in and back out of that
//! node's `eth0` (requests to the other node, replies to the client) — the
//! traffic `kep_xdp_node` sends with `XDP_TX`. Native mode (the fabric runs
//! a pass program on its side of each node link, as a switch port would
//! take anything), generic mode, and `auto`, which leaves a veth to TC.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::ffi::OsString;
use std::net::SocketAddrV4;
use std::time::Duration;

use lab::Agent;
use lab::cluster::web::{self, NODE_PORT, NODE_PORT_UDP};
use lab::cluster::{Cluster, addr, backend_name, tcp_whoami, udp_whoami};
use proxy_common::stat;
use proxy_userspace::inspect::Pinned;

const REQUESTS: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(2);

fn start<'c>(cluster: &'c Cluster, xdp_mode: &str) -> [Agent<'c>; 2] {
    // Endpoints on node 0 only; externalTrafficPolicy Cluster.
    cluster
        .write_manifest(
            "web.yaml",
            &web::manifest(cluster, &[(0, 0), (0, 1)], "", ""),
        )
        .unwrap();
    let args: Vec<OsString> = vec![
        "--node-interfaces".into(),
        "eth0".into(),
        "--xdp-mode".into(),
        xdp_mode.into(),
    ];
    cluster
        .start_agents([&args, &args])
        .expect("both agents program their datapath")
}

fn counter(agent: &Agent<'_>, index: u32) -> u64 {
    Pinned::read(agent.bpffs_dir())
        .expect("reading the agent's pinned maps")
        .stats[index as usize]
}

/// `REQUESTS` TCP connections and UDP requests from the external client to
/// node 1's NodePorts: every one answered by a node-0 backend that saw node
/// 1's address (masquerade), every reply from node 1's NodePort.
fn drive(cluster: &Cluster, agents: &[Agent<'_>; 2]) {
    let node1 = addr::node_ip(1);
    for i in 0..REQUESTS {
        for (kind, result) in [
            (
                "TCP",
                tcp_whoami(cluster.ext(), SocketAddrV4::new(node1, NODE_PORT), TIMEOUT),
            ),
            (
                "UDP",
                udp_whoami(
                    cluster.ext(),
                    SocketAddrV4::new(node1, NODE_PORT_UDP),
                    TIMEOUT,
                ),
            ),
        ] {
            let who = result.unwrap_or_else(|e| {
                panic!(
                    "{kind} request {i} to {node1} failed: {e}\nnode-1 agent:\n{}",
                    agents[1].log_tail(20)
                )
            });
            assert!(
                [backend_name(0, 0), backend_name(0, 1)].contains(&who.backend),
                "{kind}: answered by {who:?}, not a node-0 endpoint"
            );
            assert_eq!(
                who.seen_from.ip(),
                node1,
                "{kind}: the endpoint sees node 1's address (masquerade)"
            );
            assert_eq!(
                who.reply_from.ip(),
                node1,
                "{kind}: reply from the NodePort"
            );
        }
    }
}

#[test]
fn native_xdp_sends_nodeport_traffic_back_out_of_the_node() {
    let cluster = Cluster::new().unwrap();
    let agents = start(&cluster, "native");
    assert!(
        agents[1].log_contains("XDP fast path attached") && agents[1].log_contains("native"),
        "native XDP attached on node 1's eth0:\n{}",
        agents[1].log_tail(20)
    );
    // `status` shows the hooks: TC and XDP on eth0, TC on the pod veths.
    let out = std::process::Command::new(lab::agent::agent_bin().unwrap())
        .args(["status", "--json", "--bpffs"])
        .arg(agents[1].bpffs_dir())
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for pin in ["xdp-eth0", "tc-node-eth0", "tc-ingress-veth-p0"] {
        assert!(
            status["links"][pin].is_u64(),
            "{pin} attached according to status: {status}"
        );
    }
    drive(&cluster, &agents);
    // Every TCP connection has at least SYN, ACK and a request one way and
    // SYN-ACK and an answer the other; every UDP request one packet each
    // way. FIN/RST are left to TC.
    let tx = counter(&agents[1], stat::XDP_TX);
    assert!(
        tx >= (REQUESTS * (5 + 2)) as u64,
        "only {tx} packets went out by XDP_TX for {REQUESTS} TCP + {REQUESTS} UDP exchanges"
    );
}

#[test]
fn generic_mode_works_and_auto_leaves_veth_to_tc() {
    let cluster = Cluster::new().unwrap();
    {
        let agents = start(&cluster, "generic");
        assert!(
            agents[1].log_contains("XDP fast path attached") && agents[1].log_contains("generic"),
            "generic XDP attached:\n{}",
            agents[1].log_tail(20)
        );
        drive(&cluster, &agents);
        let tx = counter(&agents[1], stat::XDP_TX);
        assert!(tx >= (REQUESTS * 7) as u64, "generic XDP sent only {tx}");
        // As a DaemonSet pod replaced by one with another setting: the
        // pinned links outlive it.
        for a in agents {
            a.kill_keeping_pins();
        }
    }
    // `auto` on a veth means TC alone: the fast path the agent before it
    // left is removed.
    let agents = start(&cluster, "auto");
    assert!(
        agents[1].log_contains("XDP fast path detached (virtual interface, driver veth"),
        "auto detaches XDP from a veth:\n{}",
        agents[1].log_tail(20)
    );
    let before = counter(&agents[1], stat::XDP_TX);
    drive(&cluster, &agents);
    assert_eq!(
        counter(&agents[1], stat::XDP_TX),
        before,
        "no XDP_TX once detached"
    );
}

/// `cleanup` after agents that served node interfaces removes everything
/// they pinned, the TC node and XDP links included (their programs detach
/// with the last reference), and exits 0.
#[test]
fn cleanup_removes_node_interface_hooks() {
    let cluster = Cluster::new().unwrap();
    {
        let agents = start(&cluster, "native");
        for a in agents {
            // As after the DaemonSet is deleted: the pinned links outlive it.
            a.kill_keeping_pins();
        }
    }
    let dir = cluster.bpffs_dir(1);
    let links = dir.join("links");
    for pin in ["xdp-eth0", "tc-node-eth0"] {
        assert!(links.join(pin).exists(), "{pin} pinned by the agent");
    }
    let out = std::process::Command::new(lab::agent::agent_bin().unwrap())
        .args(["cleanup", "--bpffs"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.exists(), "{} is gone", dir.display());
    let node = cluster.node_ns(1);
    let link = node
        .exec("ip", &["-d", "link", "show", "dev", "eth0"])
        .unwrap();
    assert!(!link.contains("prog/xdp"), "XDP still attached:\n{link}");
    let net = node
        .exec("bpftool", &["net", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        !net.contains("kep_tc_node"),
        "TC node program still attached:\n{net}"
    );
}
