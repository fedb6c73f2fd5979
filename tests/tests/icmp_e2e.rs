//! ICMP end to end: kube-proxy's REJECT answer reaches the client with a
//! finished, correct checksum whatever the pod veth's checksum offload, and
//! ICMP errors about translated flows are translated like their packets
//! (netfilter's RELATED): path MTU discovery through a ClusterIP, a UDP
//! endpoint's "port unreachable", a client's error about a reply.
//!
//! They need root and the agent binary (`KEP_AGENT_BIN` or
//! `target/debug/kube-ebpf-proxy`): without them they fail, they never skip.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use lab::addr::{DNS_PORT, EMPTY_VIP, HTTP_PORT, backend_ip};
use lab::loadgen::{self, ErrorKind};
use lab::{Lab, Netns, backend_name, yaml};

/// A Service `name` at `vip:port/proto` whose one endpoint is backend 0 at
/// `target`.
fn one_endpoint_service(name: &str, vip: Ipv4Addr, port: u16, proto: &str, target: u16) -> String {
    let svc = yaml::service(
        name,
        &vip.to_string(),
        &[("p", port, proto, &target.to_string())],
        name,
    );
    let slice = yaml::endpoint_slice(
        &format!("{name}-1"),
        name,
        &[("p", target, proto)],
        &[(backend_ip(0), backend_name(0), true)],
    );
    format!("{svc}---\n{slice}")
}

/// `Icmp: InCsumErrors` of `ns`: ICMP messages its stack threw away for a
/// bad checksum.
fn icmp_in_csum_errors(ns: &Netns) -> u64 {
    ns.net_counter("snmp", "Icmp", "InCsumErrors")
        .expect("read /proc/net/snmp")
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
            // REJECT answers to one client are rate-limited as the kernel's
            // ICMP errors (icmp_ratelimit: a burst of 6, then one a
            // second); each round asks for two, so after the burst the
            // rounds are spaced for their answers to be due.
            if offload == "on" || round >= 3 {
                std::thread::sleep(Duration::from_secs(2));
            }
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

const UPLOAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const UPLOAD_PORT: u16 = 9000;
const UPLOAD_BYTES: usize = 1 << 20;

/// A TCP sink in `ns` on `port`: for one connection, counts the bytes until
/// the client shuts its side, then answers the count. Returns the count it
/// answered, or the error.
fn start_sink(ns: &Netns, port: u16) -> std::thread::JoinHandle<std::io::Result<usize>> {
    let listener = ns
        .run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .expect("bind the sink");
    std::thread::spawn(move || {
        listener.set_nonblocking(false)?;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let (mut total, mut buf) = (0, vec![0u8; 65536]);
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                n => total += n,
            }
        }
        conn.write_all(format!("{total}\n").as_bytes())?;
        Ok(total)
    })
}

/// Uploads `bytes` to `target` from inside `ns` and returns what the sink
/// counted, failing after `timeout` without progress.
fn upload(
    ns: &Netns,
    target: SocketAddrV4,
    bytes: usize,
    timeout: Duration,
) -> std::io::Result<usize> {
    ns.run(move || {
        let mut conn = TcpStream::connect_timeout(&target.into(), timeout)?;
        conn.set_write_timeout(Some(timeout))?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(&vec![0x5a; bytes])?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        answer
            .trim()
            .parse()
            .map_err(|e| std::io::Error::other(format!("answer {answer:?}: {e}")))
    })
}

/// Path MTU discovery through a ClusterIP: the node's route to the endpoint
/// has a smaller MTU than the client's link, so the node answers the
/// client's full-size segments with "fragmentation needed" about the DNAT-ed
/// packet. Translated (from the VIP, quoting client -> VIP), it teaches the
/// client's socket to the VIP the path's MTU and the upload completes; the
/// same upload straight to the pod is the control. The fast path is off:
/// it delivers into the endpoint's pod past the node's routes, so their
/// MTU (what this test is about) would not apply (see the README).
#[test]
fn path_mtu_discovery_works_through_a_cluster_ip() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest(
        "upload.yaml",
        &one_endpoint_service("upload", UPLOAD_VIP, UPLOAD_PORT, "TCP", UPLOAD_PORT),
    )
    .unwrap();
    let agent = lab
        .start_manifest_agent_with(&["--fast-path", "off"])
        .expect("agent programs");
    let subnet = format!("{}/24", Ipv4Addr::from(u32::from(backend_ip(0)) & !0xff));
    lab.node()
        .ip(&["route", "change", &subnet, "dev", "veth-b0", "mtu", "1400"])
        .expect("a 1,400-byte MTU route to backend 0");
    for target in [
        SocketAddrV4::new(backend_ip(0), UPLOAD_PORT),
        SocketAddrV4::new(UPLOAD_VIP, UPLOAD_PORT),
    ] {
        let sink = start_sink(lab.backend(0), UPLOAD_PORT);
        let sent = upload(lab.client(), target, UPLOAD_BYTES, Duration::from_secs(10));
        let counted = sink.join().expect("sink thread");
        assert_eq!(
            sent.as_ref().ok(),
            Some(&UPLOAD_BYTES),
            "upload to {target}: {sent:?} (sink: {counted:?})\n{}",
            agent.log_tail(20)
        );
    }
    assert!(
        agent.counter(proxy_common::stat::ICMP_ERRORS).unwrap() > 0,
        "the node's fragmentation-needed was translated"
    );
}

/// A UDP endpoint with nothing on the target port answers "port
/// unreachable" from its own address; translated (from the VIP), it
/// refuses the client's connected socket at once instead of leaving it to
/// time out.
#[test]
fn a_udp_endpoints_port_unreachable_refuses_the_client_at_once() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let vip = Ipv4Addr::new(10, 96, 0, 21);
    lab.write_manifest(
        "closed.yaml",
        &one_endpoint_service("closed", vip, 53, "UDP", 5999),
    )
    .unwrap();
    let agent = lab.start_manifest_agent().expect("agent programs");
    let target = SocketAddrV4::new(vip, 53);
    for round in 0..3 {
        let p = lab
            .client()
            .run(move || loadgen::udp_connected_request(target, Duration::from_secs(2)));
        assert_eq!(
            p.error_kind(),
            Some(ErrorKind::Refused),
            "round {round}: {p:?}\n{}",
            agent.log_tail(20)
        );
        assert!(
            p.elapsed < Duration::from_secs(1),
            "round {round}: took {:?}",
            p.elapsed
        );
        // The node's ICMP rate limit allows one a second per destination.
        std::thread::sleep(Duration::from_millis(1100));
    }
}

/// The other direction: a backend's datagram to a client whose socket is
/// gone, reverse-translated to come from the VIP, gets the client's "port
/// unreachable" about it (quoting VIP -> client); translated back (to the
/// backend, quoting backend -> client), it reaches the backend's connected
/// socket as ECONNREFUSED.
#[test]
fn a_clients_port_unreachable_about_a_reply_reaches_the_backend() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let (vip, port) = (Ipv4Addr::new(10, 96, 0, 22), 6000);
    lab.write_manifest(
        "talker.yaml",
        &one_endpoint_service("talker", vip, 53, "UDP", port),
    )
    .unwrap();
    let agent = lab.start_manifest_agent().expect("agent programs");
    let server = lab
        .backend(0)
        .run(move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
        .expect("bind the talker");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let talker = std::thread::spawn(move || -> std::io::Result<std::io::Error> {
        let mut buf = [0u8; 64];
        let (_, peer) = server.recv_from(&mut buf)?;
        server.connect(peer)?;
        server.send(b"first\n")?;
        // Until the client's socket is gone.
        std::thread::sleep(Duration::from_millis(300));
        server.send(b"second\n")?;
        server.set_read_timeout(Some(Duration::from_secs(2)))?;
        match server.recv(&mut buf) {
            Err(e) => Ok(e),
            Ok(n) => Err(std::io::Error::other(format!("got {n} bytes"))),
        }
    });
    let first = lab.client().run(move || -> std::io::Result<String> {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.connect((vip, 53))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send(b"hello\n")?;
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert_eq!(first.as_deref().ok(), Some("first\n"), "{first:?}");
    let started = Instant::now();
    let seen = talker.join().expect("talker thread");
    let error = seen.unwrap_or_else(|e| panic!("talker: {e}\n{}", agent.log_tail(20)));
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the backend's socket must learn the client is gone: {error} after {:?}",
        started.elapsed()
    );
}
