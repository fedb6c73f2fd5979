//! The agent's small HTTP/1.1 servers (metrics, the proxy's health, the
//! services' health checks) share this: one request per connection, no
//! HTTP dependency, and serving that hostile clients cannot starve.
//!
//! A kubelet probe or a cloud load balancer's health check must be answered
//! within its timeout (1 s by default) whatever else is connected:
//!
//! - Every server runs on one thread of its own ([`spawn`]), so a long sync
//!   on the agent's loop never delays an answer.
//! - The accept loop never waits: a new connection is always taken. When
//!   its group is full, the oldest connection of the peer holding the most
//!   is closed instead (shed), and a peer may hold at most a quarter of a
//!   group. A flood from a few addresses thus sheds its own connections,
//!   and a probe, being new and sending its request at once, is answered
//!   before it could become the oldest.
//! - A connection has [`REQUEST_DEADLINE`] from accept to send its whole
//!   request head (trickling bytes does not extend it) and
//!   [`WRITE_DEADLINE`] to take the response.
//! - A group holds at most its `max` connections, so file descriptors stay
//!   bounded.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::task::{AbortHandle, JoinHandle};

/// From accept to the end of the request head. Probes send their request
/// with the connection; anything slower is not a probe.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// For the client to take the whole response.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Connections the kernel completes before they are accepted (capped by
/// `net.core.somaxconn`): room for a burst while the accept loop sheds.
const LISTEN_BACKLOG: u32 = 4096;
/// Wait after a failed accept with nothing of ours left to shed.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Runs `future` on the serving thread (started on first use).
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(future)
}

/// The serving thread's runtime: current-thread, so every server shares
/// one core at most, and never blocked by the agent's own loop.
fn runtime() -> &'static Handle {
    static RUNTIME: OnceLock<Handle> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("kep-http".into())
            .spawn(move || {
                // The agent's own runtime was built the same way a moment
                // ago: failing here means the process cannot run at all.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building the HTTP servers' runtime");
                let _ = tx.send(rt.handle().clone());
                rt.block_on(std::future::pending::<()>());
            })
            .expect("starting the HTTP servers' thread");
        rx.recv().expect("the HTTP servers' thread started")
    })
}

/// A listening socket on `addr`, served by the serving thread. Bound at
/// once (an error is the caller's to report); `SO_REUSEADDR` as std's, so a
/// port closed a moment ago can be bound again while its last connections
/// finish.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let _runtime = runtime().enter();
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The open connections of one group of listeners, which share a budget.
pub struct Connections {
    max: usize,
    per_peer: usize,
    /// Connections closed to make room.
    shed: Counter,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// By id, which is accept order: the first is the oldest.
    open: BTreeMap<u64, Open>,
    peers: HashMap<IpAddr, usize>,
}

struct Open {
    peer: IpAddr,
    task: AbortHandle,
}

impl Connections {
    /// A group of at most `max` connections, a quarter of them per peer;
    /// each one closed to make room counts in `shed`.
    pub fn new(max: usize, shed: Counter) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            per_peer: (max / 4).max(1),
            shed,
            table: Mutex::new(Table::default()),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reserve(&self) -> u64 {
        let mut t = self.lock();
        t.next_id += 1;
        t.next_id
    }

    /// Records connection `id` from `peer`, served by `task`, and returns
    /// the connection to close to make room for it, if any.
    fn admit(&self, id: u64, peer: IpAddr, task: AbortHandle) -> Option<AbortHandle> {
        let mut t = self.lock();
        let victim = if t.peers.get(&peer).copied().unwrap_or(0) >= self.per_peer {
            t.open
                .iter()
                .find(|(_, o)| o.peer == peer)
                .map(|(&id, _)| id)
        } else if t.open.len() >= self.max {
            let most = t.peers.values().copied().max().unwrap_or(0);
            let peers = &t.peers;
            t.open
                .iter()
                .find(|(_, o)| peers.get(&o.peer) == Some(&most))
                .map(|(&id, _)| id)
        } else {
            None
        };
        let victim = victim.and_then(|id| t.remove(id));
        // Served and gone already (only a multi-threaded runtime could).
        if !task.is_finished() {
            t.open.insert(id, Open { peer, task });
            *t.peers.entry(peer).or_default() += 1;
        }
        drop(t);
        victim.inspect(|_| {
            self.shed.inc();
        })
    }

    /// Closes the oldest connection, if any (to free a file descriptor).
    fn shed_oldest(&self) -> bool {
        let mut t = self.lock();
        let oldest = t.open.keys().next().copied();
        let Some(task) = oldest.and_then(|id| t.remove(id)) else {
            return false;
        };
        drop(t);
        task.abort();
        self.shed.inc();
        true
    }
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<AbortHandle> {
        let open = self.open.remove(&id)?;
        if let Some(n) = self.peers.get_mut(&open.peer) {
            *n -= 1;
            if *n == 0 {
                self.peers.remove(&open.peer);
            }
        }
        Some(open.task)
    }
}

/// Leaves the table when its connection's task ends, however it ends.
struct Slot {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.lock().remove(self.id);
    }
}

/// The answer to a request head: the whole response.
pub type Responder = dyn Fn(&str) -> Vec<u8> + Send + Sync;

/// Serves `listener` until the task is dropped: each connection's request
/// head goes to `answer`. Must run on the serving thread ([`spawn`]);
/// `what` names the server in logs.
pub async fn serve(
    listener: TcpListener,
    what: &'static str,
    connections: Arc<Connections>,
    answer: Arc<Responder>,
) {
    let mut failing = false;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                failing = false;
                accepted
            }
            Err(e) => {
                // EMFILE and the like: free a descriptor of ours, or back
                // off rather than spin. Logged once per streak.
                if !failing {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    failing = true;
                }
                if connections.shed_oldest() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
                continue;
            }
        };
        let id = connections.reserve();
        let slot = Slot {
            connections: connections.clone(),
            id,
        };
        let answer = answer.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = handle(stream, answer.as_ref()).await {
                tracing::debug!(error = %e, "{what}: connection");
            }
        });
        if let Some(victim) = connections.admit(id, peer.ip(), task.abort_handle()) {
            tracing::debug!(%peer, "{what}: full; closed the oldest connection of the busiest peer");
            victim.abort();
        }
        // Let the new connection read its request (usually there already)
        // and closed ones go before the next accept: a probe is answered
        // before later connections could make it the oldest.
        tokio::task::yield_now().await;
    }
}

async fn handle(mut stream: TcpStream, answer: &Responder) -> io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_DEADLINE, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match head {
        Some(head) => answer(&head),
        None => response(400, "text/plain", &[], "bad request\n", true),
    };
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_DEADLINE, write)
        .await
        .unwrap_or(Ok(()))
}

/// The request head (up to the blank line), or `None` if it is too long
/// or the client stopped early.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

/// Method and path (without the query) of a request head.
pub fn request_line(head: &str) -> (&str, &str) {
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    (method, target.split('?').next().unwrap_or(""))
}

/// A complete `Connection: close` response; `headers` come after the
/// content type. `with_body` false (a HEAD request) keeps the length but
/// drops the body.
pub fn response(
    status: u16,
    content_type: &str,
    headers: &[(&str, String)],
    body: &str,
    with_body: bool,
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    if with_body {
        out.push_str(body);
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Ipv4Addr;
    use std::time::Instant;

    fn ok(_: &str) -> Vec<u8> {
        response(200, "text/plain", &[], "ok", true)
    }

    /// A server on a loopback port with `max` connections.
    fn server(max: usize) -> (SocketAddr, Arc<Connections>, Counter, JoinHandle<()>) {
        let listener = listen((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let shed = Counter::default();
        let connections = Connections::new(max, shed.clone());
        let task = spawn(serve(listener, "test", connections.clone(), Arc::new(ok)));
        (addr, connections, shed, task)
    }

    fn wait_until(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn a_full_group_sheds_the_oldest_connection_of_the_busiest_peer() {
        let shed = Counter::default();
        // 8 connections, 2 per peer.
        let c = Connections::new(8, shed.clone());
        type Tasks = Vec<(&'static str, JoinHandle<()>)>;
        let mut tasks: Tasks = Vec::new();
        let admit = |tasks: &mut Tasks, name: &'static str| {
            let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, name.as_bytes()[0]));
            let task = tokio::spawn(std::future::pending::<()>());
            let victim = c.admit(c.reserve(), peer, task.abort_handle());
            tasks.push((name, task));
            if let Some(v) = victim {
                v.abort();
            }
        };
        let closed = |tasks: &Tasks| -> Vec<&'static str> {
            tasks
                .iter()
                .filter(|(_, t)| t.is_finished())
                .map(|(n, _)| *n)
                .collect()
        };
        admit(&mut tasks, "A1");
        admit(&mut tasks, "A2");
        // A third from one peer: its own oldest goes.
        admit(&mut tasks, "A3");
        for name in ["B1", "C1", "D1", "D2", "E1", "F1"] {
            admit(&mut tasks, name);
        }
        tokio::task::yield_now().await;
        assert_eq!(closed(&tasks), ["A1"]);
        assert_eq!(c.open(), 8);
        // Full: the oldest of the peers holding the most (A and D, two each).
        admit(&mut tasks, "G1");
        tokio::task::yield_now().await;
        assert_eq!(closed(&tasks), ["A1", "A2"]);
        admit(&mut tasks, "H1");
        tokio::task::yield_now().await;
        assert_eq!(closed(&tasks), ["A1", "A2", "D1"]);
        assert_eq!((c.open(), shed.get()), (8, 3));
    }

    #[tokio::test]
    async fn a_finished_connection_leaves_the_group() {
        let c = Connections::new(4, Counter::default());
        let id = c.reserve();
        let slot = Slot {
            connections: c.clone(),
            id,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _slot = slot;
            let _ = rx.await;
        });
        assert!(
            c.admit(id, Ipv4Addr::LOCALHOST.into(), task.abort_handle())
                .is_none()
        );
        assert_eq!(c.open(), 1);
        tx.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(c.open(), 0);
    }

    /// 40 idle connections to a server with room for 4: it takes them all,
    /// keeps the newest, and a probe after them is answered at once.
    #[test]
    fn idle_connections_cannot_keep_a_probe_out() {
        let (addr, connections, shed, task) = server(4);
        let mut idle: Vec<std::net::TcpStream> = (0..40)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        wait_until("36 shed", || shed.get() >= 36);
        assert!(connections.open() <= 4, "{}", connections.open());
        let started = Instant::now();
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        probe.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The oldest were closed without an answer.
        let mut buf = [0u8; 16];
        idle[0]
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(idle[0].read(&mut buf).unwrap(), 0);
        task.abort();
    }

    /// A slow loris keeps sending header lines; the deadline counts from
    /// accept, so it is cut off all the same.
    #[test]
    fn a_trickled_request_is_cut_at_the_deadline() {
        let (addr, _, _, task) = server(4);
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        let closed_after = loop {
            assert!(started.elapsed() < Duration::from_secs(10), "never closed");
            match slow.read(&mut buf) {
                Ok(0) => break started.elapsed(),
                Ok(n) => panic!("answered a request it never finished: {:?}", &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if slow.write_all(b"X-Slow: 1\r\n").is_err() {
                        break started.elapsed();
                    }
                }
                Err(_) => break started.elapsed(),
            }
        };
        assert!(
            closed_after >= REQUEST_DEADLINE && closed_after < REQUEST_DEADLINE * 2,
            "closed after {closed_after:?}"
        );
        task.abort();
    }
}
