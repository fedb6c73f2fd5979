//! Restarting the agent does not disrupt traffic: a long-lived TCP
//! connection and a steady stream of new connections through a ClusterIP
//! keep working, with zero failures, while the agent is SIGKILLed and
//! restarted three times; each new agent adopts the pinned state and its
//! first sync writes nothing.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

    let stop = Arc::new(AtomicBool::new(false));
    let stop_stream = stop.clone();
    let stream = lab
        .client()
        .spawn("new-connections", move || {
            let (mut ok, mut failed, mut samples) = (0u64, 0u64, Vec::new());
            // Bounded: stops when told, or after 60 s whatever happens.
            let end = std::time::Instant::now() + Duration::from_secs(60);
            while !stop_stream.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                let r = loadgen::tcp_requests(
                    target,
                    20,
                    Duration::from_secs(2),
                    Duration::from_secs(10),
                );
                ok += r.ok;
                failed += r.error_count();
                samples.extend(r.error_samples.iter().take(3).cloned());
            }
            (ok, failed, samples)
        })
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
        let logs = agent.logs();
        let first = logs
            .lines()
            .find(|l| l.contains("datapath programmed"))
            .unwrap();
        assert!(
            first.contains(" ops=0 "),
            "round {round}: the adopting agent rewrote entries: {first}"
        );
        let got = lab.client().run(|| session.request());
        assert_eq!(
            got.as_deref().ok(),
            Some(backend.as_str()),
            "round {round}: {got:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, samples) = stream.join();
    assert!(ok > 100, "too few connections to mean anything: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} new connections failed: {samples:?}",
        ok + failed
    );
    drop(agent);
}
