//! Bounded load generators; run them inside the client namespace with
//! [`crate::Netns::run`]. Nothing here panics on network errors: every
//! failure is counted by kind in the [`Report`].
//!
//! Targets are `SocketAddr`s of either family (an IPv4 call site passes its
//! `SocketAddrV4` as before).
//!
//! Every request uses a new socket (so a new source port, so a new flow for
//! the datapath's conntrack): N requests spread over the backends — except
//! the `*_session_requests` generators, which reuse one flow.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// ECONNREFUSED: TCP RST or ICMP port unreachable.
    Refused,
    /// No answer in time.
    Timeout,
    /// ECONNRESET / broken pipe after connecting.
    Reset,
    /// EHOSTUNREACH / ENETUNREACH.
    Unreachable,
    /// The connection closed before a full reply line.
    Eof,
    /// Not started: the overall deadline had passed.
    Deadline,
    Other,
}

impl ErrorKind {
    pub fn of(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ErrorKind::Unreachable
            }
            io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
            _ => ErrorKind::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Eof => "eof",
            ErrorKind::Deadline => "deadline",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a batch of requests saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// e.g. `TCP 10.96.0.10:80`.
    pub label: String,
    /// Requests asked for.
    pub requested: u64,
    /// Requests answered with a backend name.
    pub ok: u64,
    /// Answers per backend name.
    pub per_backend: BTreeMap<String, u64>,
    /// Failures per kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// The first few error messages, for diagnostics.
    pub error_samples: Vec<String>,
    /// TCP: `peer_addr()` of each connected socket. UDP: source address of
    /// each reply. Through a ClusterIP both must be only `VIP:port`.
    pub peers: BTreeSet<SocketAddr>,
    /// Latency of each successful request (connect + request + reply).
    pub latencies: Vec<Duration>,
    /// Wall time of the whole batch.
    pub elapsed: Duration,
}

const MAX_SAMPLES: usize = 8;

impl Report {
    fn new(label: String, requested: u64) -> Report {
        Report {
            label,
            requested,
            ..Report::default()
        }
    }

    fn success(&mut self, name: String, peer: Option<SocketAddr>, latency: Duration) {
        self.ok += 1;
        *self.per_backend.entry(name).or_default() += 1;
        if let Some(p) = peer {
            self.peers.insert(p);
        }
        self.latencies.push(latency);
    }

    fn failure(&mut self, kind: ErrorKind, what: impl fmt::Display) {
        *self.errors.entry(kind).or_default() += 1;
        if self.error_samples.len() < MAX_SAMPLES {
            self.error_samples.push(format!("{kind}: {what}"));
        }
    }

    /// Total failures of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Failures of one kind.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors.get(&kind).copied().unwrap_or(0)
    }

    /// Answers from `backend`.
    pub fn count(&self, backend: &str) -> u64 {
        self.per_backend.get(backend).copied().unwrap_or(0)
    }

    /// Fraction (0..=1) of successful requests answered by `backend`.
    pub fn share(&self, backend: &str) -> f64 {
        if self.ok == 0 {
            0.0
        } else {
            self.count(backend) as f64 / self.ok as f64
        }
    }

    /// Latency at quantile `q` in 0..=1 (nearest rank); zero if none.
    pub fn percentile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut v = self.latencies.clone();
        v.sort_unstable();
        let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn p50(&self) -> Duration {
        self.percentile(0.50)
    }

    pub fn p90(&self) -> Duration {
        self.percentile(0.90)
    }

    pub fn p99(&self) -> Duration {
        self.percentile(0.99)
    }

    pub fn max(&self) -> Duration {
        self.latencies.iter().copied().max().unwrap_or_default()
    }

    /// Successful requests per second over the batch.
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.ok as f64 / s } else { 0.0 }
    }

    /// Per-backend distribution, latency percentiles, errors and peers.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} requested, {} ok, {} errors in {:.2?} ({:.0} req/s)",
            self.label,
            self.requested,
            self.ok,
            self.error_count(),
            self.elapsed,
            self.rate()
        );
        let _ = writeln!(s, "  {:<16} {:>8} {:>7}", "backend", "replies", "share");
        for (name, &n) in &self.per_backend {
            let share = self.share(name);
            let bar = "#".repeat((share * 40.0).round() as usize);
            let _ = writeln!(s, "  {:<16} {:>8} {:>6.1}% {bar}", name, n, share * 100.0);
        }
        let _ = writeln!(
            s,
            "  latency: p50 {} p90 {} p99 {} max {}",
            ms(self.p50()),
            ms(self.p90()),
            ms(self.p99()),
            ms(self.max())
        );
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors: none");
        } else {
            let list: Vec<_> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(s, "  errors: {}", list.join(", "));
            for e in &self.error_samples {
                let _ = writeln!(s, "    {e}");
            }
        }
        let peers: Vec<_> = self.peers.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(s, "  replies came from: {}", peers.join(", "));
        s
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table())
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}ms", d.as_secs_f64() * 1000.0)
}

/// Reads one line (without the newline) from `stream`.
fn read_line(reader: &mut BufReader<&TcpStream>) -> io::Result<String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    if n == 0 || !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed after {line:?}"),
        ));
    }
    line.pop();
    Ok(line)
}

/// One TCP request: connect, send `hello\n`, read a reply line. Returns the
/// name and `peer_addr()`.
fn tcp_once(target: SocketAddr, timeout: Duration) -> io::Result<(String, SocketAddr)> {
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    let peer = stream.peer_addr()?;
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    stream.set_nodelay(true)?;
    (&stream).write_all(b"hello\n")?;
    let name = read_line(&mut BufReader::new(&stream))?;
    Ok((name, peer))
}

/// `count` sequential TCP requests to `target`, each on a new connection
/// (connect with `per_conn_timeout`, send `hello\n`, read the reply line,
/// close). Stops starting new ones after `overall_deadline`; those count as
/// [`ErrorKind::Deadline`].
pub fn tcp_requests(
    target: impl Into<SocketAddr>,
    count: usize,
    per_conn_timeout: Duration,
    overall_deadline: Duration,
) -> Report {
    let target: SocketAddr = target.into();
    let mut r = Report::new(format!("TCP {target}"), count as u64);
    let start = Instant::now();
    for i in 0..count {
        if start.elapsed() >= overall_deadline {
            let left = (count - i) as u64;
            *r.errors.entry(ErrorKind::Deadline).or_default() += left;
            r.error_samples.push(format!(
                "deadline: {left} requests not started after {overall_deadline:?}"
            ));
            break;
        }
        let t = Instant::now();
        match tcp_once(target, per_conn_timeout) {
            Ok((name, peer)) => r.success(name, Some(peer), t.elapsed()),
            Err(e) => r.failure(ErrorKind::of(&e), e),
        }
    }
    r.elapsed = start.elapsed();
    r
}

/// `count` UDP requests to `target`, each from a new unconnected socket
/// (`send_to`, then `recv_from` with `timeout`). The reply's source address
/// is recorded in [`Report::peers`] (through a ClusterIP it must be the VIP).
/// An unconnected socket does not see ICMP errors: a rejected request is a
/// timeout here (see [`udp_connected_request`]).
pub fn udp_requests(
    target: impl Into<SocketAddr>,
    count: usize,
    timeout: Duration,
    overall_deadline: Duration,
) -> Report {
    let target: SocketAddr = target.into();
    let mut r = Report::new(format!("UDP {target}"), count as u64);
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    for i in 0..count {
        if start.elapsed() >= overall_deadline {
            let left = (count - i) as u64;
            *r.errors.entry(ErrorKind::Deadline).or_default() += left;
            r.error_samples.push(format!(
                "deadline: {left} requests not started after {overall_deadline:?}"
            ));
            break;
        }
        let t = Instant::now();
        let result = (|| -> io::Result<(String, SocketAddr)> {
            let sock = unbound_udp(target)?;
            sock.set_read_timeout(Some(timeout))?;
            sock.send_to(b"hello\n", target)?;
            let (n, from) = sock.recv_from(&mut buf)?;
            Ok((parse_name(&buf[..n]), from))
        })();
        match result {
            Ok((name, from)) => r.success(name, Some(from), t.elapsed()),
            Err(e) => r.failure(ErrorKind::of(&e), e),
        }
    }
    r.elapsed = start.elapsed();
    r
}

/// A UDP socket on an ephemeral port of the unspecified address of
/// `target`'s family (0.0.0.0 or ::), so the route picks the source.
pub fn unbound_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let any = crate::addr::IpFamily::of(target.ip()).unspecified();
    UdpSocket::bind(SocketAddr::new(any, 0))
}

fn parse_name(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_string()
}

/// The outcome of a single probe and how long it took.
#[derive(Debug)]
pub struct Probe {
    pub result: io::Result<String>,
    pub elapsed: Duration,
}

impl Probe {
    /// The failure kind, if it failed.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        self.result.as_ref().err().map(ErrorKind::of)
    }
}

/// One TCP request (connect, `hello\n`, reply line) with its time; for
/// checking e.g. that a connect is refused, and how fast.
pub fn tcp_probe(target: impl Into<SocketAddr>, timeout: Duration) -> Probe {
    let target: SocketAddr = target.into();
    let t = Instant::now();
    let result = tcp_once(target, timeout).map(|(name, _)| name);
    Probe {
        result,
        elapsed: t.elapsed(),
    }
}

/// One UDP request on a connected socket, so that an ICMP port unreachable
/// surfaces as `ECONNREFUSED` (`io::ErrorKind::ConnectionRefused`) on recv.
pub fn udp_connected_request(target: impl Into<SocketAddr>, timeout: Duration) -> Probe {
    let target: SocketAddr = target.into();
    let t = Instant::now();
    let result = (|| -> io::Result<String> {
        let sock = unbound_udp(target)?;
        sock.connect(target)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send(b"hello\n")?;
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf)?;
        Ok(parse_name(&buf[..n]))
    })();
    Probe {
        result,
        elapsed: t.elapsed(),
    }
}

/// A long-lived TCP connection answering one line per request.
pub struct TcpSession {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpSession {
    /// Connects to `target`; `timeout` bounds the connect and every request.
    pub fn connect(target: impl Into<SocketAddr>, timeout: Duration) -> io::Result<TcpSession> {
        let stream = TcpStream::connect_timeout(&target.into(), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(TcpSession { stream, reader })
    }

    /// Sends `hello\n` and returns the reply line (the backend's name).
    pub fn request(&mut self) -> io::Result<String> {
        self.stream.write_all(b"hello\n")?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {line:?}"),
            ));
        }
        line.pop();
        Ok(line)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }
}

/// Counts the exchanges the deadline left unstarted.
fn deadline_passed(r: &mut Report, count: usize, i: usize, deadline: Duration) {
    let left = (count - i) as u64;
    *r.errors.entry(ErrorKind::Deadline).or_default() += left;
    r.error_samples.push(format!(
        "deadline: {left} requests not started after {deadline:?}"
    ));
}

/// `count` request/response exchanges (`hello\n` -> reply line) on one
/// persistent TCP connection to `target`; the connect is not timed. A
/// failed exchange is counted and the next one reconnects. Stops starting
/// exchanges after `overall_deadline` ([`ErrorKind::Deadline`]).
pub fn tcp_session_requests(
    target: impl Into<SocketAddr>,
    count: usize,
    timeout: Duration,
    overall_deadline: Duration,
) -> Report {
    let target: SocketAddr = target.into();
    let mut r = Report::new(format!("TCP session {target}"), count as u64);
    let start = Instant::now();
    let mut session: Option<TcpSession> = None;
    for i in 0..count {
        if start.elapsed() >= overall_deadline {
            deadline_passed(&mut r, count, i, overall_deadline);
            break;
        }
        let mut s = match session.take() {
            Some(s) => s,
            None => match TcpSession::connect(target, timeout) {
                Ok(s) => s,
                Err(e) => {
                    r.failure(ErrorKind::of(&e), format!("connect: {e}"));
                    continue;
                }
            },
        };
        let t = Instant::now();
        match s.request() {
            Ok(name) => {
                let peer = s.peer_addr().ok();
                r.success(name, peer, t.elapsed());
                session = Some(s);
            }
            Err(e) => r.failure(ErrorKind::of(&e), e),
        }
    }
    r.elapsed = start.elapsed();
    r
}

/// `count` UDP request/response exchanges on one connected socket (one
/// flow), each waiting up to `timeout` for its reply. A lost datagram is a
/// timeout error (a reply arriving later would be taken for the next
/// request's, but the trial is already incomplete then).
pub fn udp_session_requests(
    target: impl Into<SocketAddr>,
    count: usize,
    timeout: Duration,
    overall_deadline: Duration,
) -> Report {
    let target: SocketAddr = target.into();
    let mut r = Report::new(format!("UDP session {target}"), count as u64);
    let start = Instant::now();
    let sock = match unbound_udp(target)
        .and_then(|s| s.connect(target).map(|_| s))
        .and_then(|s| s.set_read_timeout(Some(timeout)).map(|_| s))
    {
        Ok(s) => s,
        Err(e) => {
            r.failure(ErrorKind::of(&e), format!("socket: {e}"));
            r.elapsed = start.elapsed();
            return r;
        }
    };
    let peer = sock.peer_addr().ok();
    let mut buf = [0u8; 1500];
    for i in 0..count {
        if start.elapsed() >= overall_deadline {
            deadline_passed(&mut r, count, i, overall_deadline);
            break;
        }
        let t = Instant::now();
        let result = sock.send(b"hello\n").and_then(|_| sock.recv(&mut buf));
        match result {
            Ok(n) => r.success(parse_name(&buf[..n]), peer, t.elapsed()),
            Err(e) => r.failure(ErrorKind::of(&e), e),
        }
    }
    r.elapsed = start.elapsed();
    r
}

/// What a [`switch_prober`] run saw.
#[derive(Debug, Clone, Default)]
pub struct SwitchProbes {
    /// Probes started.
    pub sent: u64,
    /// Answered by any backend.
    pub answered: u64,
    /// Failed (refused, timeout, reset, ...).
    pub failed: u64,
    /// Answers per backend name.
    pub per_backend: BTreeMap<String, u64>,
    /// When the first answer from a wanted backend arrived.
    pub first_wanted: Option<Instant>,
    /// Answers from other backends after `first_wanted` (a switch that is
    /// not clean shows here).
    pub unwanted_after_first: u64,
    /// When the first answer of the final run of wanted answers arrived
    /// (no other backend answered from then on).
    pub settled: Option<Instant>,
    pub error_samples: Vec<String>,
}

/// Probes `target` with one TCP request (new connection) every `interval`
/// (sequentially: a slow probe delays the next) until `confirm`
/// consecutive answers came from backends for which `wanted(name)` holds,
/// or `max` has passed. For measuring how soon a changed endpoint set
/// serves new connections.
pub fn switch_prober(
    target: impl Into<SocketAddr>,
    interval: Duration,
    per_probe_timeout: Duration,
    max: Duration,
    confirm: u64,
    wanted: impl Fn(&str) -> bool,
) -> SwitchProbes {
    let target: SocketAddr = target.into();
    let mut p = SwitchProbes::default();
    let start = Instant::now();
    let mut in_a_row = 0;
    let mut next = start;
    while in_a_row < confirm && start.elapsed() < max {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        p.sent += 1;
        match tcp_once(target, per_probe_timeout) {
            Ok((name, _)) => {
                let at = Instant::now();
                p.answered += 1;
                if wanted(&name) {
                    in_a_row += 1;
                    p.first_wanted.get_or_insert(at);
                    p.settled.get_or_insert(at);
                } else {
                    in_a_row = 0;
                    p.settled = None;
                    if p.first_wanted.is_some() {
                        p.unwanted_after_first += 1;
                    }
                }
                *p.per_backend.entry(name).or_default() += 1;
            }
            Err(e) => {
                p.failed += 1;
                in_a_row = 0;
                p.settled = None;
                if p.error_samples.len() < MAX_SAMPLES {
                    p.error_samples.push(format!("{}: {e}", ErrorKind::of(&e)));
                }
            }
        }
    }
    p
}

/// New TCP connections to `target`, batch after batch, from a thread in a
/// namespace, while something changes (a restart, an endpoint switch), to
/// count what fails meanwhile. Bounded: it stops when told, or after
/// `limit` whatever happens.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: crate::netns::NsThread<(u64, u64, Vec<String>)>,
}

impl Prober {
    /// Batches of `batch` connections, each given `per_conn` to answer.
    pub fn start(
        netns: &crate::Netns,
        target: impl Into<SocketAddr>,
        batch: usize,
        per_conn: Duration,
        limit: Duration,
    ) -> anyhow::Result<Prober> {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let target = target.into();
        let thread = netns.spawn("prober", move || {
            let (mut ok, mut failed, mut samples) = (0u64, 0u64, Vec::new());
            let end = Instant::now() + limit;
            while !stopped.load(Ordering::Relaxed) && Instant::now() < end {
                let r = tcp_requests(target, batch, per_conn, per_conn * 5);
                ok += r.ok;
                failed += r.error_count();
                samples.extend(r.error_samples.iter().take(3).cloned());
            }
            (ok, failed, samples)
        })?;
        Ok(Prober { stop, thread })
    }

    /// Stops it: (answered, failed, a few failures' messages).
    pub fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join()
    }
}
