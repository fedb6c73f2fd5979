//! Echo-name servers run in every backend namespace.
//!
//! TCP: each connection gets `<name>\n` for every line it sends (and for any
//! data without a newline once the client pauses for 100 ms), until EOF, so
//! long-lived connections keep working. UDP: every datagram is answered with
//! `<name>\n` to its sender. The request `whoami` (a TCP line, or a UDP
//! datagram, with or without `\n`) is answered `<name> <peer-ip>:<port>\n`
//! instead: the source address the server saw, so a test can tell SNAT from a
//! preserved client address per request (see [`parse_whoami`]). The sockets are created inside the backend's
//! namespace; the threads that serve them run in the root namespace, which
//! does not matter since a socket keeps the namespace it was made in.
//!
//! Every blocking call wakes up at least every 100 ms to look at the stop
//! flag, so [`Servers::stop`] returns promptly.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

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

    /// Starts a TCP and a UDP server answering `name` inside `ns`, both on
    /// 0.0.0.0. Returns the index of its stats.
    pub fn start(&mut self, ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<usize> {
        let any = Ipv4Addr::UNSPECIFIED;
        let (listener, udp) = ns
            .try_run(move || -> Result<(TcpListener, UdpSocket)> {
                let l = TcpListener::bind((any, tcp_port))
                    .with_context(|| format!("bind TCP {any}:{tcp_port}"))?;
                let u = UdpSocket::bind((any, udp_port))
                    .with_context(|| format!("bind UDP {any}:{udp_port}"))?;
                Ok((l, u))
            })?
            .with_context(|| format!("servers for {name} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        udp.set_read_timeout(Some(TICK))?;

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
                .spawn(move || tcp_accept_loop(listener, stop, conns, st, w))?,
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

fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; errors (EINTR) just mean we look again.
    unsafe {
        libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int);
    }
}

fn tcp_accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stats: Arc<ServerStats>,
    name: Arc<str>,
) {
    while !stop.load(Ordering::SeqCst) {
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
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                wait_readable(listener.as_raw_fd(), TICK);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // ECONNABORTED and friends: the client is gone; go on.
                eprintln!("lab: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
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
    let answer = |request: &[u8]| {
        if is_whoami(request) { &whoami } else { &reply }
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
                        .write_all(answer(&pending[start..start + len]))
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
                    let failed = stream.write_all(answer(&pending)).is_err();
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

fn udp_loop(sock: UdpSocket, stop: Arc<AtomicBool>, stats: Arc<ServerStats>, name: Arc<str>) {
    let reply = format!("{name}\n").into_bytes();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                stats.saw(peer);
                // Counted before the answer leaves: a client that has its
                // reply must find it counted (a test reads the counters as
                // soon as its last reply arrives).
                stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                let sent = if is_whoami(&buf[..n]) {
                    sock.send_to(&whoami_reply(&name, peer), peer)
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
            // ICMP errors from earlier sends surface here (e.g. ECONNREFUSED);
            // they concern a past peer, not this socket.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
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
        assert_eq!(parse_whoami("n0-backend-0"), None);
        assert_eq!(parse_whoami("n0-backend-0 nonsense"), None);
    }
}
