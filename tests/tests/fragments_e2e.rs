//! IP fragments end to end: UDP datagrams bigger than the MTU through a
//! ClusterIP (Kubernetes' "Granular Checks: Services should function for
//! ... large requests: udp"; DNS with EDNS0, syslog, statsd, QUIC), both
//! ways (the endpoints echo them, so their answers come back fragmented
//! too), in order and in reverse order, and to a Service without
//! endpoints (refused).
//!
//! Needs root and the agent binary; fails loudly without them.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lab::addr::{CLIENT_IP, DNS_PORT, EMPTY_VIP, backend_ip};
use lab::loadgen::ErrorKind;
use lab::{Agent, Lab, Netns, backend_name, yaml};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const PORT: u16 = 7000;
const TIMEOUT: Duration = Duration::from_secs(2);

/// Service `echo` at [`VIP`]:[`PORT`]/UDP over the lab's three backends.
fn echo_service() -> String {
    let svc = yaml::service(
        "echo",
        &VIP.to_string(),
        &[("echo", PORT, "UDP", "7000")],
        "echo",
    );
    let endpoints: Vec<_> = (0..3)
        .map(|i| (backend_ip(i), backend_name(i), true))
        .collect();
    let slice = yaml::endpoint_slice("echo-1", "echo", &[("echo", PORT, "UDP")], &endpoints);
    format!("{svc}---\n{slice}")
}

/// UDP echo servers on [`PORT`] in every backend, answering each datagram
/// with itself; stopped (and joined) on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(lab: &Lab) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..3)
            .map(|i| {
                let sock = lab
                    .backend(i)
                    .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)))
                    .expect("bind the echo server");
                sock.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                            let _ = sock.send_to(&buf[..n], peer);
                        }
                    }
                })
            })
            .collect();
        Echo { stop, threads }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn start(lab: &Lab) -> Agent<'_> {
    lab.write_manifest("echo.yaml", &echo_service()).unwrap();
    lab.write_manifest("empty.yaml", &yaml::empty()).unwrap();
    lab.start_manifest_agent().expect("agent programs")
}

/// A datagram of `len` bytes whose content tells `round` apart.
fn datagram(len: usize, round: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + round * 7) as u8).collect()
}

/// Sends `len`-byte datagrams to `target` from a new connected socket each
/// round; each must come back whole, from `target`.
fn exchange(ns: &Netns, target: SocketAddrV4, len: usize, rounds: usize) -> Result<(), String> {
    ns.run(move || {
        let mut buf = vec![0u8; 65536];
        for round in 0..rounds {
            let sent = datagram(len, round);
            let result = (|| -> std::io::Result<usize> {
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                sock.connect(target)?;
                sock.set_read_timeout(Some(TIMEOUT))?;
                sock.send(&sent)?;
                sock.recv(&mut buf)
            })();
            match result {
                Ok(n) if buf[..n] == sent[..] => {}
                Ok(n) => return Err(format!("round {round}: {n} bytes back, not what was sent")),
                Err(e) => return Err(format!("round {round}: {len} bytes to {target}: {e}")),
            }
        }
        Ok(())
    })
}

/// 3,000- and 60,000-byte datagrams through the ClusterIP, and back: every
/// fragment goes to the endpoint the first one's flow chose, and the
/// fragmented answers come back from the VIP. Straight to a pod is the
/// control.
#[test]
fn large_udp_datagrams_through_a_cluster_ip() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = start(&lab);
    let _echo = Echo::start(&lab);
    for (len, rounds) in [(3000, 20), (60_000, 5)] {
        for target in [
            SocketAddrV4::new(backend_ip(1), PORT),
            SocketAddrV4::new(VIP, PORT),
        ] {
            exchange(lab.client(), target, len, rounds)
                .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(20)));
        }
    }
}

/// The fragments of a datagram sent in reverse order (the first one last),
/// straight from a raw socket: the early ones are held until the first
/// comes, then all go to its endpoint, and the answer comes back.
#[test]
fn fragments_in_reverse_order_are_not_lost() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = start(&lab);
    let _echo = Echo::start(&lab);
    let result = lab.client().run(move || -> std::io::Result<()> {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        let sport = sock.local_addr()?.port();
        let raw = RawSocket::open()?;
        let mut buf = vec![0u8; 65536];
        for round in 0..5 {
            let payload = datagram(3000, round);
            let udp = udp_datagram(CLIENT_IP, VIP, sport, PORT, &payload);
            let id = 0x7000 + round as u16;
            let mut pieces = ip_fragments(CLIENT_IP, VIP, id, &udp, 1480);
            pieces.reverse();
            for p in &pieces {
                raw.send(p, VIP)?;
            }
            let (n, from) = sock.recv_from(&mut buf)?;
            if from != std::net::SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
                || buf[..n] != payload[..]
            {
                return Err(std::io::Error::other(format!(
                    "round {round}: {n} bytes from {from}, not the datagram echoed by the VIP"
                )));
            }
        }
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(20)));
}

/// A large datagram to a Service without endpoints is refused at once: the
/// first fragment gets REJECT's answer, the rest are dropped.
#[test]
fn a_large_datagram_to_a_service_without_endpoints_is_refused() {
    let lab = Lab::new().expect("lab setup (needs root)");
    let agent = start(&lab);
    let target = SocketAddrV4::new(EMPTY_VIP, DNS_PORT);
    let outcome = lab.client().run(move || {
        let started = std::time::Instant::now();
        let result = (|| -> std::io::Result<usize> {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.connect(target)?;
            sock.set_read_timeout(Some(TIMEOUT))?;
            sock.send(&datagram(3000, 0))?;
            sock.recv(&mut [0u8; 64])
        })();
        (result.map_err(|e| ErrorKind::of(&e)), started.elapsed())
    });
    assert_eq!(
        outcome.0,
        Err(ErrorKind::Refused),
        "{outcome:?}\n{}",
        agent.log_tail(20)
    );
    assert!(outcome.1 < Duration::from_secs(1), "{outcome:?}");
}

/// A UDP header and `payload`, checksum over the pseudo-header included.
fn udp_datagram(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&sport.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&(len as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut sum: u32 = 0;
    for chunk in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    sum += 17 + len as u32;
    for chunk in d.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    d[6..8].copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
    d
}

/// IPv4 packets (headers without checksum: the kernel fills it in) carrying
/// `datagram` in fragments of at most `mtu` bytes.
fn ip_fragments(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    datagram: &[u8],
    mtu: usize,
) -> Vec<Vec<u8>> {
    let size = (mtu - 20) / 8 * 8;
    let count = datagram.len().div_ceil(size);
    datagram
        .chunks(size)
        .enumerate()
        .map(|(i, piece)| {
            let mut p = vec![0x45, 0];
            p.extend_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            let more: u16 = if i + 1 < count { 0x2000 } else { 0 };
            p.extend_from_slice(&(more | (i * size / 8) as u16).to_be_bytes());
            p.extend_from_slice(&[64, 17, 0, 0]);
            p.extend_from_slice(&src.octets());
            p.extend_from_slice(&dst.octets());
            p.extend_from_slice(piece);
            p
        })
        .collect()
}

/// `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`: sends IPv4 packets as given.
struct RawSocket(std::os::fd::OwnedFd);

impl RawSocket {
    fn open() -> std::io::Result<RawSocket> {
        // SAFETY: a new descriptor, owned by the returned value.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawSocket(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd)
        }))
    }

    fn send(&self, packet: &[u8], to: Ipv4Addr) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(to).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address for the call's duration.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Through a NodePort on a node without endpoints (masqueraded to the
/// other node, native XDP in front of TC): every fragment of a 3,000-byte
/// datagram follows its first out of the node, and the endpoint answers.
#[test]
fn large_udp_datagrams_through_a_nodeport() {
    use lab::cluster::web::{self, NODE_PORT_UDP};
    let cluster = lab::cluster::Cluster::new().expect("cluster lab (needs root)");
    cluster
        .write_manifest(
            "web.yaml",
            &web::manifest(&cluster, &[(0, 0), (0, 1)], "", ""),
        )
        .unwrap();
    let args: Vec<std::ffi::OsString> = ["--node-interfaces", "eth0", "--xdp-mode", "native"]
        .into_iter()
        .map(Into::into)
        .collect();
    let agents = cluster.start_agents([&args, &args]).expect("agents");
    let target = SocketAddrV4::new(cluster.node_ip(1), NODE_PORT_UDP);
    let answers = cluster.ext().run(move || -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        let mut buf = [0u8; 256];
        for round in 0..10 {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.set_read_timeout(Some(TIMEOUT))?;
            sock.send_to(&datagram(3000, round), target)?;
            let (n, from) = sock.recv_from(&mut buf)?;
            if from != std::net::SocketAddr::V4(target) {
                return Err(std::io::Error::other(format!("answer from {from}")));
            }
            names.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
        }
        Ok(names)
    });
    let names = answers.unwrap_or_else(|e| panic!("{e}\nnode 1:\n{}", agents[1].log_tail(20)));
    assert!(
        names.iter().all(|n| n.starts_with("n0-backend-")),
        "{names:?}"
    );
}
