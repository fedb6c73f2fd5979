//! Restarting the agent does not disrupt traffic: a long-lived TCP
//! connection and a steady stream of new connections through a ClusterIP
//! keep working, with zero failures, while the agent is SIGKILLed and
//! restarted three times; each new agent adopts the pinned state and its
//! first sync writes nothing.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::SocketAddrV4;
use std::time::Duration;

use lab::addr::{DEMO_VIP, HTTP_PORT};
use lab::loadgen::{self, TcpSession};
use lab::{Lab, yaml};

#[test]
fn sigkill_and_restart_three_times_without_a_failure() {
    let lab = Lab::new().unwrap();
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let mut agent = lab
        .start_manifest_agent()
        .expect("agent programs the datapath");
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);

    let mut session = lab
        .client()
        .run(move || TcpSession::connect(target, Duration::from_secs(2)))
        .expect("long-lived connection");
    let backend = lab.client().run(|| session.request()).unwrap();

    let stream = loadgen::Prober::start(
        lab.client(),
        target,
        20,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .unwrap();

    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        agent.kill_keeping_pins();
        // No agent at all for a while: the pinned datapath serves alone.
        std::thread::sleep(Duration::from_millis(500));
        let got = lab.client().run(|| session.request());
        assert_eq!(
            got.as_deref().ok(),
            Some(backend.as_str()),
            "round {round}: {got:?}"
        );
        agent = lab
            .start_manifest_agent()
            .expect("agent programs the datapath");
        assert_eq!(
            agent.first_sync_ops(),
            Some(0),
            "round {round}: the adopting agent rewrote entries"
        );
        let got = lab.client().run(|| session.request());
        assert_eq!(
            got.as_deref().ok(),
            Some(backend.as_str()),
            "round {round}: {got:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, samples) = stream.stop();
    assert!(ok > 100, "too few connections to mean anything: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} new connections failed: {samples:?}",
        ok + failed
    );
    drop(agent);
}
