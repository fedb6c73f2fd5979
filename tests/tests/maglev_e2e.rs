//! Maglev selection end to end: a flow (same 5-tuple) reaches the same
//! endpoint again after its conntrack state is gone, removing one of three
//! endpoints moves essentially only that endpoint's flows, and
//! `--cluster-lb-algorithm random` really is random (ClusterIP traffic is
//! what `--cluster-lb-algorithm` governs; `--lb-algorithm` is for traffic
//! from outside the cluster, see nodeport_e2e).
//!
//! Needs root and the agent binary; fails loudly without them.

use std::collections::BTreeMap;
use std::net::{SocketAddrV4, UdpSocket};
use std::time::Duration;

use lab::addr::{CLIENT_IP, DEMO_VIP, DNS_PORT};
use lab::{Agent, Lab, yaml};

/// Client source ports, one flow each.
const PORTS: std::ops::Range<u16> = 41_000..41_200;
/// The agent's UDP conntrack timeout: after it (plus margin) every flow is
/// chosen anew.
const UDP_TIMEOUT: &str = "1s";
const EXPIRE: Duration = Duration::from_millis(1_600);

/// One datagram from each source port in [`PORTS`] to the demo service's
/// DNS port; the backend that answered each.
fn backend_per_flow(lab: &Lab, agent: &Agent<'_>) -> BTreeMap<u16, String> {
    let target = SocketAddrV4::new(DEMO_VIP, DNS_PORT);
    let answers = lab.client().run(move || {
        PORTS
            .map(|port| {
                let sock = UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, port))?;
                sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                sock.send_to(b"q", target)?;
                let mut buf = [0u8; 128];
                let (n, _) = sock.recv_from(&mut buf)?;
                Ok((port, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
            })
            .collect::<std::io::Result<BTreeMap<u16, String>>>()
    });
    answers.unwrap_or_else(|e| panic!("UDP flow failed: {e}\n{}", agent.log_tail(20)))
}

fn moved(before: &BTreeMap<u16, String>, after: &BTreeMap<u16, String>) -> usize {
    before.iter().filter(|(p, b)| after[*p] != **b).count()
}

fn agent_args(lab: &Lab, algorithm: &str) -> Vec<std::ffi::OsString> {
    [
        "--manifests".into(),
        lab.manifest_dir().into(),
        "--cluster-lb-algorithm".into(),
        algorithm.into(),
        "--conntrack-udp-timeout".into(),
        UDP_TIMEOUT.into(),
    ]
    .into()
}

#[test]
fn maglev_keeps_flows_on_their_endpoint_across_state_loss_and_removal() {
    let lab = Lab::new().unwrap();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let agent = lab
        .start_agent_programmed(&agent_args(&lab, "maglev"))
        .expect("agent programs the datapath");

    let first = backend_per_flow(&lab, &agent);
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for b in first.values() {
        *per_backend.entry(b).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "flows spread: {per_backend:?}");
    assert!(per_backend.values().all(|n| *n >= 40), "{per_backend:?}");

    // Conntrack expired: every flow is chosen anew, and the table gives the
    // same answer.
    std::thread::sleep(EXPIRE);
    let again = backend_per_flow(&lab, &agent);
    assert_eq!(moved(&first, &again), 0, "flows moved without any change");

    // Remove backend-1: its flows must move, the others (nearly) all stay.
    let mark = agent.log_mark();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 2]))
        .unwrap();
    agent
        .wait_for_log_since(mark, "datapath programmed", Duration::from_secs(5))
        .unwrap();
    std::thread::sleep(EXPIRE);
    let after = backend_per_flow(&lab, &agent);
    let gone = "backend-1";
    assert!(
        after.values().all(|b| b != gone),
        "a flow still reached {gone}"
    );
    let survivors_moved = first
        .iter()
        .filter(|(p, b)| b.as_str() != gone && after[*p] != **b)
        .count();
    // Maglev's bound with 3 endpoints is ~1.08/N in total, i.e. a few flows
    // of the survivors; random selection would move about two thirds.
    assert!(
        survivors_moved <= PORTS.len() / 20,
        "{survivors_moved} flows of remaining endpoints moved"
    );
}

#[test]
fn random_algorithm_flag_chooses_afresh() {
    let lab = Lab::new().unwrap();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let agent = lab
        .start_agent_programmed(&agent_args(&lab, "random"))
        .expect("agent programs the datapath");
    let first = backend_per_flow(&lab, &agent);
    std::thread::sleep(EXPIRE);
    let again = backend_per_flow(&lab, &agent);
    // A fresh random choice keeps a flow's endpoint a third of the time.
    let n = moved(&first, &again);
    assert!(
        n > PORTS.len() / 3,
        "only {n} of {} flows changed endpoint",
        PORTS.len()
    );
}
