//! Hostile HTTP clients for the starvation tests of the agent's servers:
//! many connections held open, idle or sending a request head a byte line
//! at a time (slow loris), each reopened when the server closes it, as
//! tools like slowhttptest do. And the probe they must not starve: one GET
//! on a new connection with a deadline, as kubelet or a cloud load
//! balancer sends it.
//!
//! Everything is bounded: an attack ends at its `max_duration` or when
//! stopped (also on drop), and never opens more than `rate` connections a
//! second. Run it inside a lab namespace ([`Netns::spawn`]).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, NsThread};

/// What each hostile connection does once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sends nothing.
    Idle,
    /// Sends the start of a request head, then one more header line every
    /// `every`, never the blank line that ends it.
    SlowLoris { every: Duration },
}

/// An attack's shape.
#[derive(Debug, Clone)]
pub struct Attack {
    pub target: SocketAddrV4,
    /// Source addresses, used in turn (they must be on an interface of the
    /// namespace); empty: the kernel's choice.
    pub sources: Vec<Ipv4Addr>,
    /// Connections held open at once.
    pub connections: usize,
    pub kind: Kind,
    /// Most new connections a second (first ones and reopened ones).
    pub rate: u32,
    /// Hard end.
    pub max_duration: Duration,
}

/// What an attack did.
#[derive(Debug, Clone, Default)]
pub struct AttackReport {
    /// Connections established.
    pub connected: u64,
    /// Established connections the server closed (EOF or reset).
    pub closed_by_server: u64,
    /// Connect attempts that failed or did not complete.
    pub failed_connects: u64,
    /// Most connections established at once.
    pub peak_open: usize,
}

/// A running attack; stopped (and its sockets closed) on drop.
pub struct Running {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    thread: Option<NsThread<io::Result<AttackReport>>>,
}

/// What a running attack has done so far.
#[derive(Default)]
struct Progress {
    open: AtomicUsize,
    connected: AtomicUsize,
}

impl Attack {
    /// Starts the attack on a thread inside `netns`.
    pub fn start(self, netns: &Netns) -> Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let (s, p) = (stop.clone(), progress.clone());
        let thread = netns.spawn("hostile-clients", move || self.run(&s, &p))?;
        Ok(Running {
            stop,
            progress,
            thread: Some(thread),
        })
    }

    fn run(&self, stop: &AtomicBool, progress: &Progress) -> io::Result<AttackReport> {
        let started = Instant::now();
        let mut report = AttackReport::default();
        let mut slots: Vec<Slot> = (0..self.connections).map(|_| Slot::Empty).collect();
        let mut next_source = 0usize;
        // Token bucket for new connections, refilled every turn.
        let mut allowance = 0f64;
        let mut last_turn = Instant::now();
        // At most one second's worth at once.
        let burst = f64::from(self.rate.max(1));
        while !stop.load(Ordering::Relaxed) && started.elapsed() < self.max_duration {
            let now = Instant::now();
            allowance = (allowance
                + now.duration_since(last_turn).as_secs_f64() * f64::from(self.rate))
            .min(burst);
            last_turn = now;
            for slot in slots.iter_mut() {
                if matches!(slot, Slot::Empty) && allowance >= 1.0 {
                    allowance -= 1.0;
                    let source = (!self.sources.is_empty()).then(|| {
                        next_source += 1;
                        self.sources[next_source % self.sources.len()]
                    });
                    *slot = match connect_nonblocking(source, self.target) {
                        Ok(fd) => Slot::Connecting(fd, now),
                        Err(_) => {
                            report.failed_connects += 1;
                            Slot::Empty
                        }
                    };
                }
            }
            self.turn(&mut slots, &mut report)?;
            let open = slots
                .iter()
                .filter(|s| matches!(s, Slot::Open { .. }))
                .count();
            progress.open.store(open, Ordering::Relaxed);
            progress
                .connected
                .store(report.connected as usize, Ordering::Relaxed);
            report.peak_open = report.peak_open.max(open);
        }
        progress.open.store(0, Ordering::Relaxed);
        Ok(report)
    }

    /// Waits (at most 20 ms) for socket events and handles them.
    fn turn(&self, slots: &mut [Slot], report: &mut AttackReport) -> io::Result<()> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(slots.len());
        let mut index = Vec::with_capacity(slots.len());
        for (i, slot) in slots.iter().enumerate() {
            let (fd, events) = match slot {
                Slot::Empty => continue,
                Slot::Connecting(fd, _) => (fd.as_raw_fd(), libc::POLLOUT),
                Slot::Open { stream, .. } => (stream.as_raw_fd(), libc::POLLIN),
            };
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            index.push(i);
        }
        // SAFETY: a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        let now = Instant::now();
        for (p, &i) in fds.iter().zip(&index) {
            let slot = &mut slots[i];
            match std::mem::replace(slot, Slot::Empty) {
                Slot::Connecting(fd, since) => {
                    if p.revents == 0 {
                        // A SYN the server's backlog dropped is retried by
                        // the kernel; give up after a while.
                        *slot = if now.duration_since(since) < Duration::from_secs(3) {
                            Slot::Connecting(fd, since)
                        } else {
                            report.failed_connects += 1;
                            Slot::Empty
                        };
                        continue;
                    }
                    if socket_error(&fd) != 0 {
                        report.failed_connects += 1;
                        continue;
                    }
                    report.connected += 1;
                    let mut stream = TcpStream::from(fd);
                    if let Kind::SlowLoris { .. } = self.kind {
                        let head = format!(
                            "GET /healthz HTTP/1.1\r\nHost: {}\r\nUser-Agent: slow\r\n",
                            self.target
                        );
                        if stream.write_all(head.as_bytes()).is_err() {
                            report.closed_by_server += 1;
                            continue;
                        }
                    }
                    *slot = Slot::Open {
                        stream,
                        last_sent: now,
                    };
                }
                Slot::Open {
                    mut stream,
                    mut last_sent,
                } => {
                    if p.revents != 0 {
                        // The server answered, closed or reset: drain and
                        // see whether it is gone.
                        let mut buf = [0u8; 4096];
                        match stream.read(&mut buf) {
                            Ok(0) => {
                                report.closed_by_server += 1;
                                continue;
                            }
                            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                                report.closed_by_server += 1;
                                continue;
                            }
                            _ => {}
                        }
                    }
                    if let Kind::SlowLoris { every } = self.kind
                        && now.duration_since(last_sent) >= every
                    {
                        if stream.write_all(b"X-Slow: 1\r\n").is_err() {
                            report.closed_by_server += 1;
                            continue;
                        }
                        last_sent = now;
                    }
                    *slot = Slot::Open { stream, last_sent };
                }
                Slot::Empty => {}
            }
        }
        Ok(())
    }
}

enum Slot {
    Empty,
    Connecting(OwnedFd, Instant),
    Open {
        stream: TcpStream,
        last_sent: Instant,
    },
}

impl Running {
    /// Connections established right now (the server may close them at
    /// any moment).
    pub fn open_now(&self) -> usize {
        self.progress.open.load(Ordering::Relaxed)
    }

    /// Connections established so far.
    pub fn connected(&self) -> usize {
        self.progress.connected.load(Ordering::Relaxed)
    }

    /// Waits until `n` connections have been established, counting those
    /// the server already closed: the attack is at full strength.
    pub fn wait_connected(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.connected() < n {
            if self.thread.as_ref().is_none_or(NsThread::is_finished) {
                bail!("the attack ended after {} connections", self.connected());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {} of {n} hostile connections made after {timeout:?} ({} open)",
                    self.connected(),
                    self.open_now()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the attack, closes its connections and reports what it did.
    pub fn stop(mut self) -> Result<AttackReport> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().context("attack already stopped")?;
        thread.join().context("hostile clients")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A non-blocking TCP socket connecting from `source` (any port) to
/// `target`.
fn connect_nonblocking(source: Option<Ipv4Addr>, target: SocketAddrV4) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // The port is picked at connect, per destination, not at bind:
        // thousands of connections from one address need that.
        // SAFETY: setsockopt with a c_int of the right size.
        unsafe {
            libc::setsockopt(
                raw,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        with_sockaddr(libc::bind, raw, SocketAddrV4::new(ip, 0))?;
    }
    match with_sockaddr(libc::connect, raw, target) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
        _ => Ok(fd),
    }
}

/// `bind(2)` or `connect(2)` (same signature) of socket `raw` to `addr`.
fn with_sockaddr(
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
    raw: libc::c_int,
    addr: SocketAddrV4,
) -> io::Result<()> {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of the given length.
    let rc = unsafe {
        call(
            raw,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_ERROR` of a socket whose non-blocking connect finished.
fn socket_error(fd: &OwnedFd) -> libc::c_int {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 { libc::EINVAL } else { err }
}

/// One probe's outcome.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// The HTTP status, or `None` when no complete answer came in time.
    pub status: Option<u16>,
    /// From the start of the connect to the end of the response (or the
    /// failure).
    pub took: Duration,
    /// The status line and headers.
    pub head: String,
    pub body: String,
    /// Why it failed, when it did.
    pub error: Option<(io::ErrorKind, String)>,
}

impl ProbeResult {
    /// Answered with `status` within `deadline`.
    pub fn answered(&self, status: u16, deadline: Duration) -> bool {
        self.status == Some(status) && self.took <= deadline
    }
}

/// One `GET path` on a new connection to `target` (from `source` when
/// given), as kubelet's probe: everything within `timeout`. Any test's
/// one-shot HTTP request to the agent.
pub fn probe(
    source: Option<Ipv4Addr>,
    target: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> ProbeResult {
    let started = Instant::now();
    let attempt = || -> io::Result<(u16, String, String)> {
        let fd = connect_nonblocking(source, target)?;
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let err = socket_error(&fd);
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        let mut stream = TcpStream::from(fd);
        stream.set_nonblocking(false)?;
        let left = timeout
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no time left"))?;
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{raw:?}")))?;
        Ok((status, head.to_string(), body.to_string()))
    };
    let result = attempt();
    let took = started.elapsed();
    match result {
        Ok((status, head, body)) => ProbeResult {
            status: Some(status),
            took,
            head,
            body,
            error: None,
        },
        Err(e) => ProbeResult {
            status: None,
            took,
            head: String::new(),
            body: String::new(),
            error: Some((e.kind(), e.to_string())),
        },
    }
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// `a.b.c.(first..first+n)`: `n` consecutive addresses.
pub fn addresses(first: Ipv4Addr, n: usize) -> Vec<Ipv4Addr> {
    (0..n as u32)
        .map(|i| Ipv4Addr::from(u32::from(first) + i))
        .collect()
}

/// Adds `addresses` (each `/prefix_len`) to `dev` in `netns`, e.g. to give
/// an attack many sources.
pub fn add_addresses(
    netns: &Netns,
    dev: &str,
    addresses: &[Ipv4Addr],
    prefix_len: u8,
) -> Result<()> {
    for a in addresses {
        netns.ip(&["addr", "add", &format!("{a}/{prefix_len}"), "dev", dev])?;
    }
    Ok(())
}
