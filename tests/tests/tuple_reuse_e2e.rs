//! A client's connections straight to an endpoint and its Service flows to
//! that endpoint share the tuple the endpoint answers to whenever the
//! client's kernel reuses a local port for a different destination. Both
//! must keep working, as under netfilter: a direct connection is never
//! translated, a closed Service flow's state is taken over, and a clash
//! with a live flow moves the later one to another source port.
//!
//! These tests leave conntrack and the client's port range as a user has
//! them: the clash only happens because ports are reused.
//!
//! Needs root and the agent binary; fails loudly without them.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::FromRawFd;
use std::time::Duration;

use lab::addr::backend_ip;
use lab::{Agent, Lab, Netns, backend_name, yaml};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const TIMEOUT: Duration = Duration::from_secs(2);

/// Service `one` at [`VIP`] (80/TCP -> 8080, 53/UDP -> 5353) whose one
/// endpoint is backend 0.
fn one_endpoint() -> String {
    let svc = yaml::service(
        "one",
        &VIP.to_string(),
        &[("http", 80, "TCP", "8080"), ("dns", 53, "UDP", "5353")],
        "one",
    );
    let slice = yaml::endpoint_slice(
        "one-1",
        "one",
        &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        &[(backend_ip(0), backend_name(0), true)],
    );
    format!("{svc}---\n{slice}")
}

fn start(lab: &Lab) -> Agent<'_> {
    lab.write_manifest("one.yaml", &one_endpoint()).unwrap();
    lab.start_manifest_agent().expect("agent programs")
}

/// `TcpExt: TCPSynRetrans` of `ns`: SYNs its stack had to send again.
fn syn_retransmits(ns: &Netns) -> u64 {
    ns.net_counter("netstat", "TcpExt", "TCPSynRetrans")
        .expect("read /proc/net/netstat")
}

/// Fails with the first few of `failed` (out of `of` tries) and the
/// agent's last lines, unless nothing failed.
fn assert_none_failed(failed: &[String], of: usize, agent: &Agent<'_>) {
    assert!(
        failed.is_empty(),
        "{} of {of} failed: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        agent.log_tail(10)
    );
}

/// A TCP connection to `target` from local port `port` (0: the kernel's
/// choice), bound with SO_REUSEADDR so a port another connection uses (or
/// left in TIME_WAIT) can be used towards another destination.
fn connect_from(port: u16, target: SocketAddrV4) -> std::io::Result<TcpStream> {
    // SAFETY: plain socket calls on a descriptor owned by the TcpStream
    // built from it (closed with it on every path).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        for (opt, val, len) in [
            (
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>(),
            ),
            // connect() waits at most this long.
            (
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>(),
            ),
        ] {
            if libc::setsockopt(fd, libc::SOL_SOCKET, opt, val, len as libc::socklen_t) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if port != 0 {
            let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
            if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let remote = sockaddr(target);
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_read_timeout(Some(TIMEOUT))?;
        Ok(stream)
    }
}

/// One request (`whoami`) on `conn`: the backend's name and the client
/// address it saw.
fn whoami(conn: &mut TcpStream) -> std::io::Result<(String, SocketAddr)> {
    conn.write_all(b"whoami\n")?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    lab::servers::parse_whoami(&line)
        .ok_or_else(|| std::io::Error::other(format!("not a whoami reply: {line:?}")))
}

/// `count` sequential connections to `target`, each from `ports[i]` (or
/// the kernel's choice when `ports` is empty), one request each. Returns
/// the local ports used and the failures.
fn connections(
    ns: &Netns,
    target: SocketAddrV4,
    count: usize,
    ports: &[u16],
) -> (Vec<u16>, Vec<String>) {
    let ports = ports.to_vec();
    ns.run(move || {
        let (mut used, mut failed) = (Vec::new(), Vec::new());
        for i in 0..count {
            let result =
                connect_from(ports.get(i).copied().unwrap_or(0), target).and_then(|mut c| {
                    let port = c.local_addr()?.port();
                    let (name, _) = whoami(&mut c)?;
                    if c.peer_addr()? != SocketAddr::V4(target) || name != backend_name(0) {
                        return Err(std::io::Error::other(format!(
                            "answered by {name} from {:?}",
                            c.peer_addr()
                        )));
                    }
                    Ok(port)
                });
            match result {
                Ok(port) => used.push(port),
                Err(e) => failed.push(format!("connection {i} to {target}: {e}")),
            }
        }
        (used, failed)
    })
}

/// The sequence, with the kernel choosing the ports: 3,000
/// connections through the ClusterIP, then 3,000 straight to its one
/// endpoint from the same pod. Some direct connections reuse a port a
/// Service connection used (checked), and every one of them must work at
/// once: before, the endpoint's SYN-ACK matched the closed Service flow's
/// state and came back from the VIP, the client answered with a reset and
/// retried a second later.
#[test]
fn direct_connections_after_service_connections_from_the_same_pod() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = start(&lab);
    let retransmits = syn_retransmits(lab.client());
    let via_vip = SocketAddrV4::new(VIP, 80);
    let direct = SocketAddrV4::new(backend_ip(0), 8080);
    let (service_ports, failed) = connections(lab.client(), via_vip, 3000, &[]);
    assert_none_failed(&failed, 3000, &agent);
    let (direct_ports, failed) = connections(lab.client(), direct, 3000, &[]);
    let reused = direct_ports
        .iter()
        .collect::<BTreeSet<_>>()
        .intersection(&service_ports.iter().collect())
        .count();
    println!("{reused} direct connections reused a Service connection's port");
    assert_none_failed(&failed, 3000, &agent);
    assert!(
        reused > 0,
        "the kernel reused no port: the sequence proved nothing"
    );
    assert_eq!(
        syn_retransmits(lab.client()) - retransmits,
        0,
        "no connection had to send its SYN again"
    );
}

/// The same with the clash forced: each direct connection uses the very
/// port a Service connection just closed.
#[test]
fn direct_connections_reusing_closed_service_connections_ports() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = start(&lab);
    let ports: Vec<u16> = (41000..41200).collect();
    let retransmits = syn_retransmits(lab.client());
    for target in [
        SocketAddrV4::new(VIP, 80),
        SocketAddrV4::new(backend_ip(0), 8080),
    ] {
        let (_, failed) = connections(lab.client(), target, ports.len(), &ports);
        assert_none_failed(&failed, ports.len(), &agent);
    }
    assert_eq!(syn_retransmits(lab.client()) - retransmits, 0);
}

/// Both orders with both connections open at once: a live direct
/// connection and a Service connection from the same port, then the other
/// way round. Both work; the endpoint sees the later one from another
/// source port.
#[test]
fn live_direct_and_service_connections_on_the_same_port_both_work() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = start(&lab);
    let via_vip = SocketAddrV4::new(VIP, 80);
    let direct = SocketAddrV4::new(backend_ip(0), 8080);
    for (port, first, second) in [(42000, direct, via_vip), (42001, via_vip, direct)] {
        let seen = lab
            .client()
            .run(move || -> std::io::Result<Vec<SocketAddr>> {
                let mut a = connect_from(port, first)?;
                let (_, seen_a) = whoami(&mut a)?;
                let mut b = connect_from(port, second)?;
                let (_, seen_b) = whoami(&mut b)?;
                // The first still answers with the second open.
                let (_, again) = whoami(&mut a)?;
                Ok(vec![seen_a, seen_b, again])
            });
        let seen = seen.unwrap_or_else(|e| {
            panic!(
                "port {port}, {first} then {second}: {e}\n{}",
                agent.log_tail(10)
            )
        });
        assert_eq!(seen[0].port(), port, "the first keeps its port");
        assert_ne!(seen[1].port(), port, "the later one is remapped");
        assert_eq!(seen[2], seen[0]);
    }
}

/// UDP: a datagram through the ClusterIP, then one straight to the
/// endpoint from the same port while the first flow is live. The direct
/// one's answer comes from the endpoint itself (before, it came from the
/// VIP: the live Service flow's state took it).
#[test]
fn udp_straight_to_the_endpoint_from_a_port_with_a_live_service_flow() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = start(&lab);
    let via_vip = SocketAddrV4::new(VIP, 53);
    let direct = SocketAddrV4::new(backend_ip(0), 5353);
    let answers = lab
        .client()
        .run(move || -> std::io::Result<Vec<SocketAddr>> {
            let mut from = Vec::new();
            for (i, target) in [via_vip, direct, via_vip, direct].into_iter().enumerate() {
                // A new socket each time, on the same port.
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 43000))?;
                sock.set_read_timeout(Some(TIMEOUT))?;
                sock.send_to(b"hello\n", target)?;
                let mut buf = [0u8; 64];
                let (_, peer) = sock
                    .recv_from(&mut buf)
                    .map_err(|e| std::io::Error::other(format!("datagram {i} to {target}: {e}")))?;
                from.push(peer);
            }
            Ok(from)
        });
    let answers = answers.unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(10)));
    let expected: Vec<SocketAddr> = [via_vip, direct, via_vip, direct]
        .into_iter()
        .map(SocketAddr::V4)
        .collect();
    assert_eq!(answers, expected, "each answer from what was asked");
}
