//! One row's world: a fresh two-node [`Cluster`] (three backend pods and a
//! client pod per node, the external client on the fabric), a cgroup per
//! node for its hostNetwork processes, and both agents running with the
//! node interfaces, native XDP and socket-level load balancing on that
//! cgroup. Rows change Services and EndpointSlices by writing manifests
//! (the agents read them as they would the API server) and judge only by
//! traffic: who answered, what source it saw, and how a failure looked.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::Agent;
use crate::cgroup::TestCgroup;
use crate::cluster::{self, Cluster, ClusterConfig, Whoami, tcp_whoami, udp_whoami};
use crate::netns::Netns;
use crate::servers::Servers;
use crate::yaml::SliceEndpoint;

/// How long one request may take before it counts as unanswered: far above
/// the lab's sub-millisecond round trip.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an agent may take to program a manifest change (upstream
/// allows KubeProxyLagTimeout, 5 min; the lab's agents take milliseconds).
const PROGRAMMING_TIMEOUT: Duration = Duration::from_secs(10);

/// What the suite needs from the test binary.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `lab-sockclient` binary (hostNetwork clients are processes, so
    /// that they can live in a cgroup).
    pub sockclient: PathBuf,
}

/// Who sends a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Node k's client pod.
    Pod(usize),
    /// Backend pod j of node k (an endpoint calling its own Service).
    Backend(usize, usize),
    /// A hostNetwork process on node k (its namespace, its cgroup).
    Host(usize),
    /// The client outside the cluster, on the fabric.
    External,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// The EndpointSlice controller's conditions for a pod
/// (`pkg/controller/endpointslice` utils): `ready` is the pod's readiness
/// or `publishNotReadyAddresses`, but never true for a terminating pod
/// unless `publishNotReadyAddresses` is set; `serving` is the pod's own
/// readiness. The lab has no controller, so rows write what it would.
pub fn pod_conditions(
    pod_ready: bool,
    terminating: bool,
    publish_not_ready: bool,
) -> (bool, bool, bool) {
    let mut ready = publish_not_ready || pod_ready;
    if terminating && !publish_not_ready {
        ready = false;
    }
    (ready, pod_ready, terminating)
}

pub struct Env<'c> {
    pub cluster: &'c Cluster,
    cgroups: &'c [TestCgroup; 2],
    /// Node k's agent at index k (replaced by [`Env::restart_agent`]).
    agents: Mutex<Vec<Agent<'c>>>,
    args: [Vec<OsString>; 2],
    opts: Options,
    /// Servers a row starts itself (hostNetwork endpoints, extra ports).
    extra: Mutex<Servers>,
}

impl<'c> Env<'c> {
    /// The cluster shape every row uses.
    pub fn cluster_config() -> ClusterConfig {
        ClusterConfig {
            backends_per_node: [3, 3],
            ..ClusterConfig::default()
        }
    }

    /// Starts both agents on `cluster`, node k's with socket LB on
    /// `cgroups[k]`.
    pub fn start(
        cluster: &'c Cluster,
        cgroups: &'c [TestCgroup; 2],
        opts: Options,
    ) -> Result<Env<'c>> {
        let args = |k: usize| -> Vec<OsString> {
            vec![
                "--node-interfaces".into(),
                "eth0".into(),
                "--xdp-mode".into(),
                "native".into(),
                "--socket-lb-cgroup".into(),
                cgroups[k].path().into(),
            ]
        };
        let args = [args(0), args(1)];
        let agents = cluster.start_agents([&args[0], &args[1]])?;
        for a in &agents {
            a.wait_for_log("attached socket hooks", Duration::from_secs(5))?;
        }
        Ok(Env {
            cluster,
            cgroups,
            agents: Mutex::new(agents.into()),
            args,
            opts,
            extra: Mutex::new(Servers::new()),
        })
    }

    /// Writes manifest `file` for both nodes and waits until both agents
    /// have programmed it.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        let marks = self.marks();
        self.cluster.write_manifest(file, yaml)?;
        self.wait_programmed(marks)
            .with_context(|| format!("programming {file}"))
    }

    /// Removes manifest `file` and waits until both agents have programmed
    /// the removal.
    pub fn remove(&self, file: &str) -> Result<()> {
        let marks = self.marks();
        self.cluster.remove_manifest(file)?;
        self.wait_programmed(marks)
            .with_context(|| format!("programming the removal of {file}"))
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, Vec<Agent<'c>>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn marks(&self) -> Vec<usize> {
        self.agents().iter().map(Agent::log_mark).collect()
    }

    fn wait_programmed(&self, marks: Vec<usize>) -> Result<()> {
        for (agent, mark) in self.agents().iter().zip(marks) {
            agent.wait_for_log_since(mark, "datapath programmed", PROGRAMMING_TIMEOUT)?;
        }
        Ok(())
    }

    /// Kills node k's agent with SIGKILL (its pinned datapath stays, as
    /// when kube-proxy's pod is deleted) and starts it again; returns once
    /// the new one has programmed the datapath.
    pub fn restart_agent(&self, k: usize) -> Result<()> {
        let mut agents = self.agents();
        ensure!(agents.len() == 2, "an earlier restart failed");
        agents.remove(k).kill_keeping_pins();
        let agent = self.cluster.start_agent_programmed(k, &self.args[k])?;
        agent.wait_for_log("attached socket hooks", Duration::from_secs(5))?;
        agents.insert(k, agent);
        Ok(())
    }

    /// Detaches every link node k's agent pinned (TC and XDP on its
    /// interfaces, the cgroup socket hooks), as an operator or another tool
    /// could with `bpftool link detach`. Returns how many.
    pub fn detach_agent_links(&self, k: usize) -> Result<usize> {
        let dir = self.cluster.bpffs_dir(k).join("links");
        // Every id first: the agent re-pins what it finds detached within
        // a rescan (200 ms), so pins read after the first detach may be
        // gone or new.
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let pin = entry?.path();
            let shown = crate::netns::run_cmd(
                "bpftool",
                &["-j", "link", "show", "pinned", &pin.to_string_lossy()],
            )?;
            let info: serde_json::Value = serde_json::from_str(&shown)?;
            let id = info["id"]
                .as_u64()
                .with_context(|| format!("no link id for {}: {shown}", pin.display()))?;
            ids.push(id);
        }
        for id in &ids {
            crate::netns::run_cmd("bpftool", &["link", "detach", "id", &id.to_string()])?;
        }
        Ok(ids.len())
    }

    /// The agents' last lines, for a failure's context.
    pub fn agent_tails(&self) -> String {
        self.agents()
            .iter()
            .enumerate()
            .map(|(k, a)| format!("node-{k} agent:\n{}", a.log_tail(8)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn node_ip(&self, k: usize) -> Ipv4Addr {
        self.cluster.node_ip(k)
    }

    pub fn node_ip6(&self, k: usize) -> Ipv6Addr {
        self.cluster.node_ip6(k)
    }

    pub fn node_name(&self, k: usize) -> String {
        cluster::node_name(k)
    }

    /// The name backend pod j of node k answers with (its "hostname").
    pub fn pod_name(&self, k: usize, j: usize) -> String {
        cluster::backend_name(k, j)
    }

    pub fn pod_ip(&self, k: usize, j: usize) -> Ipv4Addr {
        self.cluster.backend(k, j).ip
    }

    /// A ready endpoint for backend pod j of node k.
    pub fn endpoint(&self, k: usize, j: usize) -> SliceEndpoint {
        self.endpoint_with(k, j, (true, true, false))
    }

    /// An endpoint for backend pod j of node k with `(ready, serving,
    /// terminating)` (see [`pod_conditions`]).
    pub fn endpoint_with(&self, k: usize, j: usize, c: (bool, bool, bool)) -> SliceEndpoint {
        SliceEndpoint {
            ip: self.pod_ip(k, j).into(),
            node: self.node_name(k),
            ready: c.0,
            serving: c.1,
            terminating: c.2,
        }
    }

    /// A ready endpoint for backend pod j of node k's IPv6 address (a
    /// dual-stack pod's second family).
    pub fn endpoint6(&self, k: usize, j: usize) -> SliceEndpoint {
        SliceEndpoint {
            ip: self.cluster.backend(k, j).ip6.into(),
            ..self.endpoint(k, j)
        }
    }

    /// A ready endpoint at node k's own address (a hostNetwork pod).
    pub fn host_endpoint(&self, k: usize) -> SliceEndpoint {
        SliceEndpoint {
            ip: self.node_ip(k).into(),
            node: self.node_name(k),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// Starts servers answering `name` on `tcp`/`udp` in `ns` (another
    /// container port of a pod, or a hostNetwork pod in a node namespace).
    pub fn serve(&self, ns: &Netns, name: &str, tcp: u16, udp: u16) -> Result<()> {
        self.extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .start(ns, name, tcp, udp)
            .map(|_| ())
    }

    /// Takes backend pod j of node k off the network, as deleting the pod
    /// does: whatever is still sent to its address is lost.
    pub fn kill_pod(&self, k: usize, j: usize) -> Result<()> {
        let pod = self.cluster.backend(k, j);
        pod.netns.ip(&["link", "set", "eth0", "down"])?;
        self.cluster
            .node_ns(k)
            .ip(&["link", "set", &pod.node_if, "down"])?;
        Ok(())
    }

    fn netns_of(&self, from: Client) -> &Netns {
        match from {
            Client::Pod(k) => &self.cluster.client(k).netns,
            Client::Backend(k, j) => &self.cluster.backend(k, j).netns,
            Client::Host(k) => self.cluster.node_ns(k),
            Client::External => self.cluster.ext(),
        }
    }

    /// One `whoami` request over a new connection (TCP) or a new socket
    /// (UDP).
    pub fn whoami(
        &self,
        from: Client,
        proto: Proto,
        target: impl Into<SocketAddr>,
    ) -> io::Result<Whoami> {
        self.requests(from, proto, target, 1, 0)
            .pop()
            .unwrap_or_else(|| Err(io::Error::other("no request made")))
    }

    /// `count` `whoami` requests, each on a new connection or socket, bound
    /// to `src_port` when it is not 0.
    pub fn requests(
        &self,
        from: Client,
        proto: Proto,
        target: impl Into<SocketAddr>,
        count: usize,
        src_port: u16,
    ) -> Vec<io::Result<Whoami>> {
        let target: SocketAddr = target.into();
        match from {
            Client::Host(k) => self.host_requests(k, proto, target, count, src_port),
            _ if src_port != 0 => {
                let ns = self.netns_of(from);
                (0..count)
                    .map(|_| udp_whoami_from_port(ns, target, src_port))
                    .collect()
            }
            _ => {
                let ns = self.netns_of(from);
                (0..count)
                    .map(|_| match proto {
                        Proto::Tcp => tcp_whoami(ns, target, REQUEST_TIMEOUT),
                        Proto::Udp => udp_whoami(ns, target, REQUEST_TIMEOUT),
                    })
                    .collect()
            }
        }
    }

    /// Runs `lab-sockclient` as a hostNetwork process of node k: in the
    /// node's namespace and in its cgroup (where the agent's socket hooks
    /// are).
    fn host_requests(
        &self,
        k: usize,
        proto: Proto,
        target: SocketAddr,
        count: usize,
        src_port: u16,
    ) -> Vec<io::Result<Whoami>> {
        let run = || -> Result<String> {
            let netns = std::fs::File::open(self.cluster.node_ns(k).path())?;
            let procs = OpenOptions::new()
                .write(true)
                .open(self.cgroups[k].procs())?;
            let (netns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
            let mode = match proto {
                Proto::Tcp => "tcp-whoami",
                Proto::Udp => "udp-whoami",
            };
            let mut cmd = Command::new(&self.opts.sockclient);
            cmd.args([
                mode,
                &target.to_string(),
                &count.to_string(),
                &src_port.to_string(),
            ]);
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // "0" moves the writing process itself.
                    if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let out = cmd.output().context("run lab-sockclient")?;
            if !out.status.success() {
                bail!("lab-sockclient: {out:?}");
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let stdout = match run() {
            Ok(s) => s,
            Err(e) => return vec![Err(io::Error::other(format!("{e:#}")))],
        };
        let local = match target {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(self.node_ip(k)), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(self.node_ip6(k)), 0),
        };
        stdout.lines().map(|l| parse_sockclient(l, local)).collect()
    }

    /// One HTTP GET of `path` from `from` (not a hostNetwork process: the
    /// node's own sockets are fine for the node's own ports): status and
    /// body.
    pub fn http_get(
        &self,
        from: Client,
        target: SocketAddrV4,
        path: &str,
    ) -> io::Result<(u16, String)> {
        let path = path.to_string();
        self.netns_of(from)
            .try_run(move || http_get(target, &path))
            .map_err(|e| io::Error::other(format!("{e:#}")))?
    }
}

/// `ok <name> <seen ip:port> <peer>` or `err <kind> <message>`.
fn parse_sockclient(line: &str, local: SocketAddr) -> io::Result<Whoami> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["ok", name, seen, peer] => Ok(Whoami {
            backend: name.to_string(),
            seen_from: seen.parse().map_err(io::Error::other)?,
            local,
            reply_from: peer.parse().map_err(io::Error::other)?,
        }),
        ["err", "refused", ..] => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            line.to_string(),
        )),
        ["err", "timeout", ..] => Err(io::Error::new(io::ErrorKind::TimedOut, line.to_string())),
        _ => Err(io::Error::other(line.to_string())),
    }
}

/// A UDP `whoami` from a fixed local port (Kubernetes' conntrack tests send
/// from port 12345 every time, so every datagram is one conntrack flow).
fn udp_whoami_from_port(ns: &Netns, target: SocketAddr, port: u16) -> io::Result<Whoami> {
    ns.try_run(move || -> io::Result<Whoami> {
        let any: IpAddr = match target {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let sock = std::net::UdpSocket::bind((any, port))?;
        sock.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        sock.connect(target)?;
        sock.send(crate::servers::WHOAMI.as_bytes())?;
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf)?;
        let (backend, seen_from) =
            crate::servers::parse_whoami(&String::from_utf8_lossy(&buf[..n]))
                .ok_or_else(|| io::Error::other("not a whoami reply"))?;
        Ok(Whoami {
            backend,
            seen_from,
            local: sock.local_addr()?,
            reply_from: sock.peer_addr()?,
        })
    })
    .map_err(|e| io::Error::other(format!("{e:#}")))?
}

fn http_get(target: SocketAddrV4, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&target.into(), REQUEST_TIMEOUT)?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// Names that answered, with counts (for failure messages).
pub fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// Polls `f` every 200 ms until it returns `Ok` or `within` passes; the
/// last error otherwise.
pub fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
