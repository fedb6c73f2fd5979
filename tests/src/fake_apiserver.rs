//! A small fake Kubernetes API server speaking the real wire protocol over
//! plain HTTP/1.1, for Services, EndpointSlices (discovery.k8s.io/v1) and
//! Nodes: cluster-wide and namespaced list, get and watch, label and field
//! selectors, one global resourceVersion, watch history with 410 Gone, and
//! bookmarks. Tests drive it with [`FakeApiServer::apply`],
//! [`FakeApiServer::delete`], [`FakeApiServer::drop_watches`],
//! [`FakeApiServer::expire_history`], [`FakeApiServer::stop`] and
//! [`FakeApiServer::restart`], and read [`FakeApiServer::request_log`].
//!
//! The listener is made by a caller-supplied bind function, so it can live
//! in another network namespace ([`FakeApiServer::start_in_netns`]): a
//! socket keeps the namespace it was made in, so the threads serving it can
//! run anywhere.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The resources served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// URL path segment.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// `/api/v1` or `/apis/discovery.k8s.io/v1`.
    fn prefix(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "/api/v1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
    }
}

// ---------------------------------------------------------------------------
// Selectors

/// One requirement of a label or field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key`
    Exists(String),
    /// `!key`
    NotExists(String),
    /// `key=value` or `key==value`
    Equals(String, String),
    /// `key!=value` (also true when the key is absent)
    NotEquals(String, String),
}

impl Requirement {
    fn matches(&self, get: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::Equals(k, v) => get(k).as_deref() == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k).as_deref() != Some(v.as_str()),
        }
    }
}

/// Parses a comma-separated selector of `key`, `!key`, `key=value`,
/// `key==value` and `key!=value`. Set-based forms (`in`, `notin`) are not
/// supported. An empty string selects everything.
pub fn parse_selector(s: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let req = if let Some((k, v)) = part.split_once("!=") {
            Requirement::NotEquals(key(k)?, v.trim().to_string())
        } else if let Some((k, v)) = part.split_once("==") {
            Requirement::Equals(key(k)?, v.trim().to_string())
        } else if let Some((k, v)) = part.split_once('=') {
            Requirement::Equals(key(k)?, v.trim().to_string())
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::NotExists(key(k)?)
        } else {
            Requirement::Exists(key(part)?)
        };
        out.push(req);
    }
    return Ok(out);

    fn key(k: &str) -> Result<String, String> {
        let k = k.trim();
        if k.is_empty() || k.contains(['!', '=', ' ', '(', ')']) {
            return Err(format!("invalid selector key {k:?}"));
        }
        Ok(k.to_string())
    }
}

/// Whether `object`'s labels satisfy every requirement.
pub fn labels_match(reqs: &[Requirement], object: &Value) -> bool {
    let labels = object.pointer("/metadata/labels");
    let get = |k: &str| -> Option<String> {
        labels
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    reqs.iter().all(|r| r.matches(&get))
}

/// Whether `object` satisfies a field selector (`metadata.name`,
/// `metadata.namespace`).
pub fn fields_match(reqs: &[Requirement], object: &Value) -> bool {
    let get = |k: &str| -> Option<String> {
        let pointer = match k {
            "metadata.name" => "/metadata/name",
            "metadata.namespace" => "/metadata/namespace",
            _ => return None,
        };
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    reqs.iter().all(|r| r.matches(&get))
}

// ---------------------------------------------------------------------------
// Wire encoding

/// One watch event as the API server sends it: a JSON object and a newline.
pub fn encode_event(event_type: &str, object: &Value) -> String {
    let mut s = json!({ "type": event_type, "object": object }).to_string();
    s.push('\n');
    s
}

/// One HTTP/1.1 chunk (`<hex length>\r\n<data>\r\n`).
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The `Status` a watch sends when its resourceVersion is too old.
pub fn expired_status() -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": "Expired",
        "code": 410,
        "message": "too old resource version"
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": reason,
        "code": code,
        "message": message
    })
}

/// Decodes `%XX` and `+` in a query component.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits `a=1&b=2` into decoded pairs.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// What a request path names: a resource, maybe a namespace, maybe a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Parses `/api/v1/services`, `/api/v1/namespaces/NS/services[/NAME]`,
/// `/apis/discovery.k8s.io/v1/[namespaces/NS/]endpointslices[/NAME]` and
/// `/api/v1/nodes[/NAME]`.
pub fn parse_path(path: &str) -> Option<Target> {
    for kind in Kind::ALL {
        let Some(rest) = path.strip_prefix(kind.prefix()) else {
            continue;
        };
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let (namespace, segs) = match segs.as_slice() {
            ["namespaces", ns, rest @ ..] if kind.namespaced() && !rest.is_empty() => {
                (Some(ns.to_string()), rest.to_vec())
            }
            _ => (None, segs),
        };
        match segs.as_slice() {
            [p] if *p == kind.plural() => {
                return Some(Target {
                    kind,
                    namespace,
                    name: None,
                });
            }
            [p, name] if *p == kind.plural() => {
                return Some(Target {
                    kind,
                    namespace,
                    name: Some(name.to_string()),
                });
            }
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------
// State

/// A request the server answered.
#[derive(Debug, Clone)]
pub struct Request {
    /// When the request was handled: for a list or get, after its response
    /// was written; for a watch, when streaming started.
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub kind: Option<Kind>,
    pub watch: bool,
    /// HTTP status sent.
    pub status: u16,
}

impl Request {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A cluster-wide or namespaced list (not a watch, not a get).
    pub fn is_list_of(&self, kind: Kind) -> bool {
        self.kind == Some(kind) && !self.watch && self.status == 200 && !self.is_get()
    }

    fn is_get(&self) -> bool {
        parse_path(&self.path).is_some_and(|t| t.name.is_some())
    }
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    event_type: &'static str,
    /// The object before (MODIFIED), for selector transitions.
    old: Option<Value>,
    object: Value,
}

type Key = (Kind, String, String);

struct State {
    rv: u64,
    /// A watch from resourceVersion R is served iff R >= floor.
    floor: u64,
    objects: BTreeMap<Key, Value>,
    /// Each object's JSON, encoded once as it is stored (as the API
    /// server's watch cache keeps them), so a list of 30,000 objects costs
    /// the server copies, not 30,000 encodings.
    encoded: HashMap<Key, String>,
    events: Vec<Event>,
    history_limit: Option<usize>,
    bookmark_interval: Duration,
    list_delay: HashMap<Kind, Duration>,
    /// Bumped to end every open watch abruptly.
    watch_epoch: u64,
}

struct Conn {
    stream: TcpStream,
    watching: Arc<AtomicBool>,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    log: Mutex<Vec<Request>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type BindFn = dyn Fn(u16) -> io::Result<TcpListener> + Send + Sync;

struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The fake API server. Stops on drop.
pub struct FakeApiServer {
    inner: Arc<Inner>,
    port: u16,
    bind: Arc<BindFn>,
    acceptor: Mutex<Option<Acceptor>>,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 (an ephemeral port) of the calling thread's
    /// network namespace.
    pub fn start() -> Result<FakeApiServer> {
        FakeApiServer::start_with(Arc::new(|port| TcpListener::bind(("127.0.0.1", port))))
    }

    /// Listens on 127.0.0.1 inside the network namespace at `netns` (e.g.
    /// `lab.node().path()`), also after [`FakeApiServer::restart`].
    pub fn start_in_netns(netns: &Path) -> Result<FakeApiServer> {
        let netns = netns.to_path_buf();
        FakeApiServer::start_with(Arc::new(move |port| {
            let netns = netns.clone();
            std::thread::spawn(move || {
                crate::netns::enter_netns(&netns).map_err(io::Error::other)?;
                TcpListener::bind(("127.0.0.1", port))
            })
            .join()
            .map_err(|_| io::Error::other("bind thread panicked"))?
        }))
    }

    /// Listens on whatever `bind(port)` returns; port 0 the first time, the
    /// same port on restart.
    pub fn start_with(bind: Arc<BindFn>) -> Result<FakeApiServer> {
        let listener = bind(0).context("fake API server: bind")?;
        let port = listener.local_addr()?.port();
        let server = FakeApiServer {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    rv: 100,
                    floor: 0,
                    objects: BTreeMap::new(),
                    encoded: HashMap::new(),
                    events: Vec::new(),
                    history_limit: None,
                    bookmark_interval: Duration::from_secs(1),
                    list_delay: HashMap::new(),
                    watch_epoch: 0,
                }),
                changed: Condvar::new(),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
                log: Mutex::new(Vec::new()),
            }),
            port,
            bind,
            acceptor: Mutex::new(None),
        };
        server.serve(listener)?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes `dir/kubeconfig` pointing at [`FakeApiServer::url`], no auth.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
current-context: fake
users:
- name: fake
  user: {{}}
",
            self.url()
        );
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.state).rv
    }

    /// Creates or replaces an object (by kind, namespace, name); emits ADDED
    /// or MODIFIED. Returns its new resourceVersion.
    pub fn apply(&self, object: Value) -> Result<u64> {
        let Some(kind) = object
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::from_kind)
        else {
            bail!("apply: unsupported kind in {object}");
        };
        let mut object = object;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .context("apply: metadata.name missing")?
            .to_string();
        let namespace = if kind.namespaced() {
            let ns = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        object["apiVersion"] = json!(kind.api_version());

        let mut st = lock(&self.inner.state);
        st.rv += 1;
        let rv = st.rv;
        let key = (kind, namespace.clone(), name.clone());
        let old = st.objects.get(&key).cloned();
        let uid = old
            .as_ref()
            .and_then(|o| o.pointer("/metadata/uid").cloned())
            .unwrap_or_else(|| json!(format!("uid-{}-{namespace}-{name}-{rv}", kind.plural())));
        object["metadata"]["uid"] = uid;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.encoded.insert(key.clone(), object.to_string());
        st.objects.insert(key, object.clone());
        let event_type = if old.is_some() { "MODIFIED" } else { "ADDED" };
        push_event(
            &mut st,
            Event {
                rv,
                kind,
                event_type,
                old,
                object,
            },
        );
        drop(st);
        self.inner.changed.notify_all();
        Ok(rv)
    }

    /// [`FakeApiServer::apply`] for every document of a (multi-document)
    /// YAML text.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        use serde::Deserialize as _;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_json::Value::deserialize(doc).context("apply_yaml: parse")?;
            if value.is_null() {
                continue;
            }
            self.apply(value)?;
        }
        Ok(())
    }

    /// Deletes an object (namespace is ignored for Nodes); emits DELETED.
    /// Returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let ns = if kind.namespaced() { namespace } else { "" };
        let mut st = lock(&self.inner.state);
        let key = (kind, ns.to_string(), name.to_string());
        let Some(mut object) = st.objects.remove(&key) else {
            return false;
        };
        st.encoded.remove(&key);
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        push_event(
            &mut st,
            Event {
                rv,
                kind,
                event_type: "DELETED",
                old: None,
                object,
            },
        );
        drop(st);
        self.inner.changed.notify_all();
        true
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() { namespace } else { "" };
        lock(&self.inner.state)
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Closes every open watch connection mid-stream (no final chunk).
    pub fn drop_watches(&self) {
        lock(&self.inner.state).watch_epoch += 1;
        self.inner.changed.notify_all();
        for conn in lock(&self.inner.conns).values() {
            if conn.watching.load(Ordering::SeqCst) {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Forgets all history: a watch from any resourceVersion handed out so
    /// far answers 410 Expired (lists return a newer one).
    pub fn expire_history(&self) {
        let mut st = lock(&self.inner.state);
        st.rv += 1;
        st.floor = st.rv;
        st.events.clear();
    }

    /// Keep at most `limit` events of history (None: unlimited). A watch
    /// from before the oldest kept event answers 410.
    pub fn set_history_limit(&self, limit: Option<usize>) {
        let mut st = lock(&self.inner.state);
        st.history_limit = limit;
        trim_history(&mut st);
    }

    /// Period of BOOKMARK events on watches that allow them (default 1 s).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        lock(&self.inner.state).bookmark_interval = interval;
        self.inner.changed.notify_all();
    }

    /// Delays every list (not watch) of `kind` by `delay` before answering.
    pub fn set_list_delay(&self, kind: Kind, delay: Duration) {
        lock(&self.inner.state).list_delay.insert(kind, delay);
    }

    /// Every request answered so far, in order.
    pub fn request_log(&self) -> Vec<Request> {
        lock(&self.inner.log).clone()
    }

    pub fn clear_request_log(&self) {
        lock(&self.inner.log).clear();
    }

    /// Whether the listener is up.
    pub fn is_running(&self) -> bool {
        lock(&self.acceptor).is_some()
    }

    /// Closes the listener and every connection: until
    /// [`FakeApiServer::restart`], connecting is refused. Objects and
    /// history are kept (like an API server restart over the same etcd).
    pub fn stop(&self) {
        let acceptor = lock(&self.acceptor).take();
        if let Some(a) = acceptor {
            a.stop.store(true, Ordering::SeqCst);
            let _ = a.thread.join();
        }
        lock(&self.inner.state).watch_epoch += 1;
        self.inner.changed.notify_all();
        for conn in lock(&self.inner.conns).values() {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port (and namespace). Retries for up to
    /// 5 s if the port is not free yet.
    pub fn restart(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match (self.bind)(self.port) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("fake API server: rebind port {}: {e}; retrying", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).context(format!("rebind port {}", self.port)),
            }
        };
        self.serve(listener)
    }

    fn serve(&self, listener: TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let inner = self.inner.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || accept_loop(listener, inner, stop2))?;
        *lock(&self.acceptor) = Some(Acceptor { stop, thread });
        Ok(())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn push_event(st: &mut State, event: Event) {
    st.events.push(event);
    trim_history(st);
}

fn trim_history(st: &mut State) {
    if let Some(limit) = st.history_limit
        && st.events.len() > limit
    {
        let drop_n = st.events.len() - limit;
        let last_dropped = st.events[drop_n - 1].rv;
        st.events.drain(..drop_n);
        st.floor = st.floor.max(last_dropped);
    }
}

// ---------------------------------------------------------------------------
// Serving

fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                let id = inner.next_conn.fetch_add(1, Ordering::SeqCst);
                let watching = Arc::new(AtomicBool::new(false));
                lock(&inner.conns).insert(
                    id,
                    Conn {
                        stream: clone,
                        watching: watching.clone(),
                    },
                );
                let inner = inner.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("fake-apiserver-{id}"))
                    .spawn(move || {
                        let _ = serve_conn(&inner, stream, &watching);
                        lock(&inner.conns).remove(&id);
                    });
                if spawned.is_err() {
                    eprintln!("fake API server: cannot spawn a connection thread");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                eprintln!("fake API server: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

struct Parsed {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    /// The client sent `Connection: close`.
    close: bool,
}

/// Reads one request head (and discards a body). None at EOF.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Parsed>> {
    let mut line = String::new();
    // Skip stray empty lines between requests.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let mut content_length = 0usize;
    let mut close = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
    }
    if content_length > 0 {
        io::copy(
            &mut reader.by_ref().take(content_length as u64),
            &mut io::sink(),
        )?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Ok(Some(Parsed {
        method,
        path: path.to_string(),
        query: parse_query(query),
        close,
    }))
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> io::Result<()> {
    respond_text(stream, code, &body.to_string())
}

fn respond_text(stream: &mut TcpStream, code: u16, body: &str) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out)?;
    stream.flush()
}

fn serve_conn(inner: &Inner, stream: TcpStream, watching: &AtomicBool) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut closing = false;
    while !closing {
        let Some(req) = read_request(&mut reader)? else {
            break;
        };
        closing = req.close;
        let param = |k: &str| {
            req.query
                .iter()
                .find(|(q, _)| q == k)
                .map(|(_, v)| v.clone())
        };
        let target = parse_path(&req.path);
        let watch = matches!(param("watch").as_deref(), Some("true" | "1"));
        let mut entry = Request {
            at: Instant::now(),
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            kind: target.as_ref().map(|t| t.kind),
            watch,
            status: 200,
        };
        let log = |mut entry: Request, status: u16| {
            entry.at = Instant::now();
            entry.status = status;
            lock(&inner.log).push(entry);
        };
        let Some(target) = target else {
            respond(
                &mut writer,
                404,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )?;
            log(entry, 404);
            continue;
        };
        if req.method != "GET" {
            respond(
                &mut writer,
                405,
                &status(405, "MethodNotAllowed", "only GET is served"),
            )?;
            log(entry, 405);
            continue;
        }
        let labels = match parse_selector(&param("labelSelector").unwrap_or_default()) {
            Ok(s) => s,
            Err(e) => {
                respond(&mut writer, 400, &status(400, "BadRequest", &e))?;
                log(entry, 400);
                continue;
            }
        };
        let mut fields = match parse_selector(&param("fieldSelector").unwrap_or_default()) {
            Ok(s) => s,
            Err(e) => {
                respond(&mut writer, 400, &status(400, "BadRequest", &e))?;
                log(entry, 400);
                continue;
            }
        };
        if let Some(ns) = &target.namespace {
            fields.push(Requirement::Equals("metadata.namespace".into(), ns.clone()));
        }
        if let Some(name) = &target.name {
            if !watch {
                let ns = target.namespace.clone().unwrap_or_default();
                let found = lock(&inner.state)
                    .objects
                    .get(&(target.kind, ns, name.clone()))
                    .cloned();
                match found {
                    Some(o) => {
                        respond(&mut writer, 200, &o)?;
                        log(entry, 200);
                    }
                    None => {
                        let msg = format!("{} \"{name}\" not found", target.kind.plural());
                        respond(&mut writer, 404, &status(404, "NotFound", &msg))?;
                        log(entry, 404);
                    }
                }
                continue;
            }
            fields.push(Requirement::Equals("metadata.name".into(), name.clone()));
        }
        let selects = |o: &Value| labels_match(&labels, o) && fields_match(&fields, o);
        if watch {
            entry.at = Instant::now();
            lock(&inner.log).push(entry);
            watching.store(true, Ordering::SeqCst);
            let timeout = param("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .map(Duration::from_secs);
            let bookmarks = matches!(param("allowWatchBookmarks").as_deref(), Some("true" | "1"));
            watch_stream(
                inner,
                &mut writer,
                target.kind,
                &selects,
                param("resourceVersion").unwrap_or_default(),
                timeout,
                bookmarks,
            )?;
            // The watch ended gracefully (timeout or 410): close, as the
            // response said.
            let _ = writer.shutdown(Shutdown::Both);
            return Ok(());
        }
        // List.
        let delay = lock(&inner.state).list_delay.get(&target.kind).copied();
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        // Pages as the API server serves them (`limit`, `continue`), so a
        // client's memory follows a page, not the whole list. The continue
        // token is "<list resourceVersion>/<namespace>/<name>" of the last
        // item sent; the next page starts after it. Objects changed between
        // pages are not a snapshot, which no test relies on.
        let limit = param("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let resume = param("continue").and_then(|c| {
            let mut parts = c.splitn(3, '/');
            let rv = parts.next()?.parse::<u64>().ok()?;
            Some((rv, parts.next()?.to_string(), parts.next()?.to_string()))
        });
        let (rv, items, last, more) = {
            let st = lock(&inner.state);
            let st = &*st;
            let start = match &resume {
                Some((_, ns, name)) => {
                    std::ops::Bound::Excluded((target.kind, ns.clone(), name.clone()))
                }
                None => std::ops::Bound::Included((target.kind, String::new(), String::new())),
            };
            let mut matching = st
                .objects
                .range((start, std::ops::Bound::Unbounded))
                .take_while(|((k, _, _), _)| *k == target.kind)
                .filter(|(_, o)| selects(o));
            let page: Vec<(&Key, &Value)> = matching
                .by_ref()
                .take(limit.unwrap_or(usize::MAX))
                .collect();
            let more = matching.next().is_some();
            let last = page
                .last()
                .map(|((_, ns, name), _)| (ns.clone(), name.clone()));
            let mut items = String::from("[");
            for (i, (key, _)) in page.into_iter().enumerate() {
                if i > 0 {
                    items.push(',');
                }
                items.push_str(&st.encoded[key]);
            }
            items.push(']');
            (
                resume.as_ref().map_or(st.rv, |(rv, _, _)| *rv),
                items,
                last,
                more,
            )
        };
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if let (true, Some((ns, name))) = (more, last) {
            metadata["continue"] = json!(format!("{rv}/{ns}/{name}"));
        }
        let body = format!(
            r#"{{"kind":"{}List","apiVersion":"{}","metadata":{metadata},"items":{items}}}"#,
            target.kind.kind(),
            target.kind.api_version(),
        );
        respond_text(&mut writer, 200, &body)?;
        log(entry, 200);
    }
    Ok(())
}

fn write_chunk(w: &mut TcpStream, data: &str) -> io::Result<()> {
    w.write_all(&chunk(data.as_bytes()))?;
    w.flush()
}

fn bookmark(kind: Kind, rv: u64) -> Value {
    json!({
        "kind": kind.kind(),
        "apiVersion": kind.api_version(),
        "metadata": { "resourceVersion": rv.to_string() }
    })
}

fn watch_stream(
    inner: &Inner,
    w: &mut TcpStream,
    kind: Kind,
    selects: &dyn Fn(&Value) -> bool,
    resource_version: String,
    timeout: Option<Duration>,
    bookmarks: bool,
) -> io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )?;
    w.flush()?;
    let started = Instant::now();
    let (epoch, mut cursor, initial) = {
        let st = lock(&inner.state);
        let epoch = st.watch_epoch;
        match resource_version.as_str() {
            // "Any": the current state as ADDED events, then changes.
            "" | "0" => {
                let initial: Vec<String> = st
                    .objects
                    .iter()
                    .filter(|((k, _, _), o)| *k == kind && selects(o))
                    .map(|(_, o)| encode_event("ADDED", o))
                    .collect();
                (epoch, st.rv, initial)
            }
            rv => match rv.parse::<u64>() {
                Ok(rv) if rv >= st.floor => (epoch, rv, Vec::new()),
                _ => {
                    drop(st);
                    write_chunk(w, &encode_event("ERROR", &expired_status()))?;
                    return w.write_all(b"0\r\n\r\n");
                }
            },
        }
    };
    for e in initial {
        write_chunk(w, &e)?;
    }
    let mut last_bookmark = Instant::now();
    loop {
        let mut out = Vec::new();
        {
            let mut st = lock(&inner.state);
            loop {
                if st.watch_epoch != epoch {
                    // Dropped: end abruptly, no final chunk.
                    let _ = w.shutdown(Shutdown::Both);
                    return Ok(());
                }
                // Events are in resourceVersion order: start past the cursor.
                let first = st.events.partition_point(|e| e.rv <= cursor);
                for e in st.events[first..].iter().filter(|e| e.kind == kind) {
                    let now = selects(&e.object);
                    let before = e.old.as_ref().is_some_and(selects);
                    let t = match (e.event_type, before, now) {
                        ("DELETED", _, true) => "DELETED",
                        (_, true, true) => e.event_type,
                        (_, false, true) => "ADDED",
                        ("MODIFIED", true, false) => "DELETED",
                        _ => continue,
                    };
                    out.push(encode_event(t, &e.object));
                }
                cursor = cursor.max(st.rv);
                if !out.is_empty() {
                    break;
                }
                let now = Instant::now();
                if timeout.is_some_and(|t| now >= started + t) {
                    drop(st);
                    return w.write_all(b"0\r\n\r\n");
                }
                if bookmarks && now >= last_bookmark + st.bookmark_interval {
                    out.push(encode_event("BOOKMARK", &bookmark(kind, cursor)));
                    last_bookmark = now;
                    break;
                }
                st = inner
                    .changed
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let mut buf = Vec::new();
        for e in &out {
            buf.extend_from_slice(&chunk(e.as_bytes()));
        }
        w.write_all(&buf)?;
        w.flush()?;
    }
}

/// A short description of the log, for assertion messages.
pub fn describe_log(log: &[Request]) -> String {
    let mut s = String::new();
    let t0 = log.first().map(|r| r.at);
    for r in log {
        let ms = t0.map_or(0, |t| r.at.duration_since(t).as_millis());
        let q: Vec<String> = r.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "+{ms}ms {} {}?{} -> {}",
            r.method,
            r.path,
            q.join("&"),
            r.status
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert_eq!(parse_selector("").unwrap(), vec![]);
        assert_eq!(
            parse_selector("a, !b,c=d,e==f,g!=h").unwrap(),
            vec![
                Requirement::Exists("a".into()),
                Requirement::NotExists("b".into()),
                Requirement::Equals("c".into(), "d".into()),
                Requirement::Equals("e".into(), "f".into()),
                Requirement::NotEquals("g".into(), "h".into()),
            ]
        );
        assert!(parse_selector("=x").is_err());
        assert!(parse_selector("!").is_err());
    }

    #[test]
    fn selectors_match() {
        let o = json!({"metadata": {"name": "n", "namespace": "ns",
            "labels": {"app": "demo", "service.kubernetes.io/headless": ""}}});
        let m = |s: &str| labels_match(&parse_selector(s).unwrap(), &o);
        assert!(m("app"));
        assert!(m("app=demo,!other"));
        assert!(!m("!service.kubernetes.io/headless"));
        assert!(m("app!=x,missing!=y"));
        assert!(!m("app!=demo"));
        assert!(!m("missing"));
        let f = |s: &str| fields_match(&parse_selector(s).unwrap(), &o);
        assert!(f("metadata.name=n,metadata.namespace=ns"));
        assert!(!f("metadata.name=other"));
        assert!(f("metadata.name!=other"));
    }

    #[test]
    fn query_and_path() {
        assert_eq!(
            parse_query("labelSelector=%21a%2Cb%3Dc&watch=true&x"),
            vec![
                ("labelSelector".into(), "!a,b=c".into()),
                ("watch".into(), "true".into()),
                ("x".into(), "".into()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(
            parse_path("/api/v1/services"),
            Some(Target {
                kind: Kind::Service,
                namespace: None,
                name: None
            })
        );
        assert_eq!(
            parse_path("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/x"),
            Some(Target {
                kind: Kind::EndpointSlice,
                namespace: Some("default".into()),
                name: Some("x".into())
            })
        );
        assert_eq!(
            parse_path("/api/v1/nodes/lab-node").map(|t| t.name),
            Some(Some("lab-node".into()))
        );
        assert_eq!(parse_path("/api/v1/pods"), None);
        assert_eq!(parse_path("/api/v1/namespaces/x/nodes"), None);
    }

    #[test]
    fn event_encoding() {
        let e = encode_event("ADDED", &json!({"kind": "Service"}));
        assert_eq!(
            e,
            "{\"object\":{\"kind\":\"Service\"},\"type\":\"ADDED\"}\n"
        );
        assert_eq!(chunk(b"hello"), b"5\r\nhello\r\n");
        assert_eq!(chunk(&[b'x'; 26])[..4], *b"1a\r\n");
        let v: Value = serde_json::from_str(&encode_event("ERROR", &expired_status())).unwrap();
        assert_eq!(v["object"]["code"], 410);
        assert_eq!(v["object"]["reason"], "Expired");
    }

    /// A plain HTTP client for the wire tests.
    fn get(port: u16, target: &str) -> (String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.to_string(), body.to_string())
    }

    fn svc(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"clusterIP": "10.96.0.20"}})
    }

    #[test]
    fn lists_come_in_pages_with_limit_and_continue() {
        let server = FakeApiServer::start().unwrap();
        for i in 0..5 {
            server.apply(svc(&format!("s{i}"), json!({}))).unwrap();
        }
        let mut names = Vec::new();
        let mut target = "/api/v1/services?limit=2".to_string();
        let mut pages = 0;
        loop {
            let (_, body) = get(server.port(), &target);
            let list: Value = serde_json::from_str(&body).unwrap();
            pages += 1;
            let items = list["items"].as_array().unwrap();
            assert!(items.len() <= 2, "{list}");
            names.extend(
                items
                    .iter()
                    .map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
            );
            match list["metadata"]["continue"].as_str() {
                Some(token) => target = format!("/api/v1/services?limit=2&continue={token}"),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);
    }

    #[test]
    fn list_watch_and_expiry_over_the_wire() {
        let server = FakeApiServer::start().unwrap();
        server.set_bookmark_interval(Duration::from_millis(100));
        server.apply(svc("a", json!({}))).unwrap();
        server
            .apply(svc(
                "b",
                json!({"service.kubernetes.io/service-proxy-name": "x"}),
            ))
            .unwrap();
        let (head, body) = get(
            server.port(),
            "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name",
        );
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(list["items"][0]["metadata"]["name"], "a");
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();

        // A watch from rv sees a later change, then times out gracefully.
        let port = server.port();
        let watcher = std::thread::spawn(move || {
            get(
                port,
                &format!(
                    "/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1&allowWatchBookmarks=true"
                ),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        server.apply(svc("c", json!({}))).unwrap();
        let (head, body) = watcher.join().unwrap();
        assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
        assert!(body.contains("\"type\":\"ADDED\""), "{body}");
        assert!(body.contains("\"name\":\"c\""), "{body}");
        assert!(body.contains("\"type\":\"BOOKMARK\""), "{body}");
        assert!(body.ends_with("0\r\n\r\n"), "{body:?}");

        // After expiry, an old resourceVersion gets 410.
        server.expire_history();
        let (_, body) = get(port, "/api/v1/services?watch=true&resourceVersion=101");
        assert!(body.contains("\"code\":410"), "{body}");

        // Stopped: refused; restarted: same port, same objects.
        server.stop();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        server.restart().unwrap();
        let (_, body) = get(port, "/api/v1/namespaces/default/services/c");
        assert!(body.contains("\"name\":\"c\""), "{body}");
        assert!(server.request_log().len() >= 4);
    }
}
