//! ICMP end to end: kube-proxy's REJECT answer reaches the client with a
//! finished, correct checksum whatever the pod veth's checksum offload.
//!
//! They need root and the agent binary (`KEP_AGENT_BIN` or
//! `target/debug/kube-ebpf-proxy`): without them they fail, they never skip.

use std::net::SocketAddrV4;
use std::time::Duration;

use lab::addr::{DNS_PORT, EMPTY_VIP, HTTP_PORT};
use lab::loadgen::{self, ErrorKind};
use lab::{Lab, Netns, yaml};

/// `Icmp: InCsumErrors` of `ns` (`/proc/net/snmp` read inside it): ICMP
/// messages its stack threw away for a bad checksum.
fn icmp_in_csum_errors(ns: &Netns) -> u64 {
    let snmp = ns.exec("cat", &["/proc/net/snmp"]).expect("read snmp");
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    let column = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .expect("InCsumErrors column");
    values
        .split_whitespace()
        .nth(column)
        .unwrap()
        .parse()
        .unwrap()
}

/// A client whose packets carry partial checksums (CHECKSUM_PARTIAL, as any
/// pod's) is refused at once by a Service without endpoints, over TCP and
/// UDP, both with the node side of its veth finishing checksums in
/// software (tx offload off: the answer's checksum is computed on the way
/// out) and with the default offload (the client trusts a partial one). Its
/// stack counts no ICMP checksum error.
#[test]
fn reject_is_refused_at_once_with_and_without_tx_checksum_offload() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("empty.yaml", &yaml::empty()).unwrap();
    let agent = lab.start_manifest_agent().expect("agent programs");
    let tcp_target = SocketAddrV4::new(EMPTY_VIP, HTTP_PORT);
    let udp_target = SocketAddrV4::new(EMPTY_VIP, DNS_PORT);
    for offload in ["off", "on"] {
        lab.node()
            .exec("ethtool", &["-K", "veth-c0", "tx", offload])
            .expect("ethtool");
        let before = icmp_in_csum_errors(lab.client());
        for round in 0..5 {
            let (t, u) = lab.client().run(move || {
                (
                    loadgen::tcp_probe(tcp_target, Duration::from_secs(3)),
                    loadgen::udp_connected_request(udp_target, Duration::from_secs(3)),
                )
            });
            for (what, p) in [("TCP", &t), ("UDP", &u)] {
                assert_eq!(
                    p.error_kind(),
                    Some(ErrorKind::Refused),
                    "tx {offload}, round {round}: {what} must be refused: {p:?}\n{}",
                    agent.log_tail(20)
                );
                assert!(
                    p.elapsed < Duration::from_secs(1),
                    "tx {offload}, round {round}: {what} refusal took {:?}",
                    p.elapsed
                );
            }
        }
        assert_eq!(
            icmp_in_csum_errors(lab.client()),
            before,
            "tx {offload}: the client dropped ICMP answers with a bad checksum"
        );
    }
}
