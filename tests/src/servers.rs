//! Echo-name servers run in every backend namespace.
//!
//! TCP: each connection gets `<name>\n` for every line it sends (and for any
//! data without a newline once the client pauses for 100 ms), until EOF, so
//! long-lived connections keep working. UDP: every datagram is answered with
//! `<name>\n` to its sender. The request `whoami` (a TCP line, or a UDP
//! datagram, with or without `\n`) is answered `<name> <peer-ip>:<port>\n`
//! instead: the source address the server saw, so a test can tell SNAT from a
//! preserved client address per request (see [`parse_whoami`]). A request
//! `echo <text>` is answered `<text>` (Kubernetes' large-request checks
//! compare the echo). Every server listens on both families, 0.0.0.0 and
//! `::` (IPv6 only, so IPv4 clients keep plain IPv4 sockets), and reports
//! peers as the family they came in on. The sockets are created inside the backend's
//! namespace; the threads that serve them run in the root namespace, which
//! does not matter since a socket keeps the namespace it was made in.
//!
//! Every blocking call wakes up at least every 100 ms to look at the stop
//! flag, so [`Servers::stop`] returns promptly.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::addr::IpFamily;
use crate::netns::Netns;

const TICK: Duration = Duration::from_millis(100);

/// The request answered with the peer address (see the module docs).
pub const WHOAMI: &str = "whoami";

fn is_whoami(request: &[u8]) -> bool {
    let mut r = request;
    while let [rest @ .., b'\n' | b'\r' | b' '] = r {
        r = rest;
    }
    r == WHOAMI.as_bytes()
}

/// The text of an `echo <text>` request (trailing newline dropped).
fn echo_text(request: &[u8]) -> Option<&[u8]> {
    let text = request.strip_prefix(ECHO.as_bytes())?;
    Some(text.strip_suffix(b"\n").unwrap_or(text))
}

/// The prefix of a request answered with the rest of it.
pub const ECHO: &str = "echo ";

fn whoami_reply(name: &str, peer: SocketAddr) -> Vec<u8> {
    format!("{name} {peer}\n").into_bytes()
}

/// Splits a `whoami` reply line (`<name> <peer-ip>:<port>`, trailing newline
/// optional) into the server's name and the peer it saw.
pub fn parse_whoami(line: &str) -> Option<(String, SocketAddr)> {
    let (name, peer) = line.trim_end().rsplit_once(' ')?;
    Some((name.to_string(), peer.parse().ok()?))
}

/// What one backend's servers have seen so far.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub tcp_connections: AtomicU64,
    /// TCP replies written (one per request line).
    pub tcp_replies: AtomicU64,
    /// UDP datagrams answered.
    pub udp_datagrams: AtomicU64,
    /// Source addresses of TCP connections and UDP datagrams (so a test can
    /// check the client address is preserved, i.e. no SNAT).
    pub peers: Mutex<BTreeSet<IpAddr>>,
}

/// A plain copy of [`ServerStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub tcp_connections: u64,
    pub tcp_replies: u64,
    pub udp_datagrams: u64,
    pub peers: BTreeSet<IpAddr>,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            tcp_connections: self.tcp_connections.load(Ordering::Relaxed),
            tcp_replies: self.tcp_replies.load(Ordering::Relaxed),
            udp_datagrams: self.udp_datagrams.load(Ordering::Relaxed),
            peers: self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    fn saw(&self, peer: SocketAddr) {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer.ip());
    }
}

/// All servers of a lab. Stopped (threads joined) on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stats: Vec<Arc<ServerStats>>,
}

impl Servers {
    pub fn new() -> Servers {
        Servers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            conns: Arc::new(Mutex::new(Vec::new())),
            stats: Vec::new(),
        }
    }

    /// Starts a TCP and a UDP server answering `name` inside `ns`, each on
    /// 0.0.0.0 and `::`. Returns the index of its stats.
    pub fn start(&mut self, ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<usize> {
        let (listeners, udp) = ns
            .try_run(move || -> Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
                let mut listeners = Vec::new();
                let mut udp = Vec::new();
                for family in [IpFamily::V4, IpFamily::V6] {
                    let tcp = SocketAddr::new(family.unspecified(), tcp_port);
                    listeners.push(listener(tcp).with_context(|| format!("bind TCP {tcp}"))?);
                    let u = SocketAddr::new(family.unspecified(), udp_port);
                    udp.push(udp_socket(u).with_context(|| format!("bind UDP {u}"))?);
                }
                Ok((listeners, udp))
            })?
            .with_context(|| format!("servers for {name} in {}", ns.name()))?;

        let stats = Arc::new(ServerStats::default());
        let who: Arc<str> = name.into();

        let (stop, conns, st, w) = (
            self.stop.clone(),
            self.conns.clone(),
            stats.clone(),
            who.clone(),
        );
        self.threads.push(
            std::thread::Builder::new()
                .name(format!("{name}-tcp"))
                .spawn(move || tcp_accept_loop(listeners, stop, conns, st, w))?,
        );
        let (stop, st) = (self.stop.clone(), stats.clone());
        self.threads.push(
            std::thread::Builder::new()
                .name(format!("{name}-udp"))
                .spawn(move || udp_loop(udp, stop, st, who))?,
        );
        self.stats.push(stats);
        Ok(self.stats.len() - 1)
    }

    pub fn stats(&self, index: usize) -> Option<&ServerStats> {
        self.stats.get(index).map(|s| &**s)
    }

    /// Stops every server and joins every thread. Idempotent.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("lab: a server thread panicked");
            }
        }
        let conns: Vec<_> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in conns {
            if t.join().is_err() {
                eprintln!("lab: a connection thread panicked");
            }
        }
    }
}

impl Default for Servers {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A non-blocking socket bound to `addr`; an IPv6 one takes IPv6 only, so
/// that it shares its port with the IPv4 one.
fn bound_socket(addr: SocketAddr, kind: socket2::Type) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = bound_socket(addr, socket2::Type::STREAM)?;
    // std's TcpListener::bind backlog.
    sock.listen(128)?;
    Ok(sock.into())
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    Ok(bound_socket(addr, socket2::Type::DGRAM)?.into())
}

/// Waits until one of `fds` is readable or `timeout` passes; returns the
/// readable ones.
fn wait_readable(fds: &[i32], timeout: Duration) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: valid pollfds; errors (EINTR) just mean we look again.
    unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        );
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

fn tcp_accept_loop(
    listeners: Vec<TcpListener>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stats: Arc<ServerStats>,
    name: Arc<str>,
) {
    let fds: Vec<i32> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let mut ready = vec![true; listeners.len()];
    while !stop.load(Ordering::SeqCst) {
        let mut accepted = false;
        for (listener, _) in listeners.iter().zip(&ready).filter(|(_, r)| **r) {
            accepted |= tcp_accept(listener, &stop, &conns, &stats, &name);
        }
        if !accepted {
            ready = wait_readable(&fds, TICK);
        }
    }
}

/// Accepts one connection from `listener` and starts serving it; false when
/// there was none.
fn tcp_accept(
    listener: &TcpListener,
    stop: &Arc<AtomicBool>,
    conns: &Mutex<Vec<JoinHandle<()>>>,
    stats: &Arc<ServerStats>,
    name: &Arc<str>,
) -> bool {
    match listener.accept() {
        Ok((stream, peer)) => {
            stats.tcp_connections.fetch_add(1, Ordering::Relaxed);
            stats.saw(peer);
            let (stop, stats, name) = (stop.clone(), stats.clone(), name.clone());
            let spawned = std::thread::Builder::new()
                .name("lab-conn".into())
                .spawn(move || serve_conn(stream, peer, stop, stats, &name));
            let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|h| !h.is_finished());
            match spawned {
                Ok(h) => list.push(h),
                Err(e) => eprintln!("lab: cannot spawn connection thread: {e}"),
            }
            true
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => false,
        Err(e) => {
            // ECONNABORTED and friends: the client is gone; go on.
            eprintln!("lab: accept: {e}");
            std::thread::sleep(Duration::from_millis(10));
            false
        }
    }
}

fn serve_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    name: &str,
) {
    let reply = format!("{name}\n").into_bytes();
    let whoami = whoami_reply(name, peer);
    let answer = |request: &[u8]| -> Vec<u8> {
        if is_whoami(request) {
            whoami.clone()
        } else if let Some(text) = echo_text(request) {
            [text, b"\n"].concat()
        } else {
            reply.clone()
        }
    };
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(TICK)).is_err()
        || stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                let mut start = 0;
                while let Some(len) = pending[start..].iter().position(|&b| b == b'\n') {
                    // Counted before the answer leaves, as for UDP.
                    stats.tcp_replies.fetch_add(1, Ordering::Relaxed);
                    if stream
                        .write_all(&answer(&pending[start..start + len]))
                        .is_err()
                    {
                        stats.tcp_replies.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    start += len + 1;
                }
                pending.drain(..start);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // The client paused with a partial request: answer it.
                if !pending.is_empty() {
                    stats.tcp_replies.fetch_add(1, Ordering::Relaxed);
                    let failed = stream.write_all(&answer(&pending)).is_err();
                    pending.clear();
                    if failed {
                        stats.tcp_replies.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn udp_loop(socks: Vec<UdpSocket>, stop: Arc<AtomicBool>, stats: Arc<ServerStats>, name: Arc<str>) {
    let reply = format!("{name}\n").into_bytes();
    let mut buf = [0u8; 4096];
    let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    while !stop.load(Ordering::SeqCst) {
        let ready = wait_readable(&fds, TICK);
        for (sock, _) in socks.iter().zip(ready).filter(|(_, r)| *r) {
            match sock.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    stats.saw(peer);
                    // Counted before the answer leaves: a client that has its
                    // reply must find it counted (a test reads the counters as
                    // soon as its last reply arrives).
                    stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                    let sent = if is_whoami(&buf[..n]) {
                        sock.send_to(&whoami_reply(&name, peer), peer)
                    } else if let Some(text) = echo_text(&buf[..n]) {
                        sock.send_to(text, peer)
                    } else {
                        sock.send_to(&reply, peer)
                    };
                    if sent.is_err() {
                        stats.udp_datagrams.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                // ICMP errors from earlier sends surface here (e.g.
                // ECONNREFUSED); they concern a past peer, not this socket.
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whoami_requests_are_recognised() {
        for r in ["whoami", "whoami\n", "whoami\r\n", "whoami \n"] {
            assert!(is_whoami(r.as_bytes()), "{r:?}");
        }
        for r in ["", "hello", "hello\n", "whoami?", "xwhoami", "who ami"] {
            assert!(!is_whoami(r.as_bytes()), "{r:?}");
        }
    }

    #[test]
    fn whoami_replies_round_trip() {
        let peer: SocketAddr = "10.244.128.2:40000".parse().unwrap();
        let reply = String::from_utf8(whoami_reply("n0-backend-0", peer)).unwrap();
        assert_eq!(reply, "n0-backend-0 10.244.128.2:40000\n");
        assert_eq!(
            parse_whoami(&reply),
            Some(("n0-backend-0".to_string(), peer))
        );
        let peer6: SocketAddr = "[fd00:10:244:100::2]:40000".parse().unwrap();
        let reply = String::from_utf8(whoami_reply("n0-backend-0", peer6)).unwrap();
        assert_eq!(reply, "n0-backend-0 [fd00:10:244:100::2]:40000\n");
        assert_eq!(
            parse_whoami(&reply),
            Some(("n0-backend-0".to_string(), peer6))
        );
        assert_eq!(parse_whoami("n0-backend-0"), None);
        assert_eq!(parse_whoami("n0-backend-0 nonsense"), None);
    }
}
