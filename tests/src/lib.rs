//! A network-namespace lab for kube-ebpf-proxy: a "node" namespace routing
//! between a client pod and backend pods (each its own namespace, joined to
//! the node by a veth pair), echo-name servers in the backends, the agent
//! run inside the node, and a load generator for the client.
//!
//! Everything lives in namespaces the lab creates: nothing is linked or
//! routed to the root namespace. Names embed the pid and a per-process
//! counter (`kep-<pid>-<n>-...`), so labs in concurrent processes and
//! threads never collide. Dropping a [`Lab`] stops its servers, deletes its
//! namespaces (the node last) and removes its temp dir, also on panic.
//!
//! Addresses (a fixed contract; `manifests/examples/` relies on them):
//!
//! | what | namespace | interface | address |
//! | --- | --- | --- | --- |
//! | node | `kep-<id>-node` | `veth-c0`, `veth-b<i>` | 10.244.1.1/24, 10.244.(10+i).1/24 |
//! | client | `kep-<id>-client` | `eth0` | 10.244.1.2/24, default via 10.244.1.1 |
//! | backend i | `kep-<id>-b<i>` | `eth0` | 10.244.(10+i).2/24, default via 10.244.(10+i).1 |

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod cluster;
pub mod conformance;
pub mod fake_apiserver;
pub mod fib_node;
pub mod hostile;
pub mod loadgen;
pub mod netns;
pub mod servers;
pub mod xdp_pass;
pub mod yaml;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use agent::Agent;
pub use loadgen::Report;
pub use netns::Netns;
pub use servers::StatsSnapshot;

/// Fixed lab addresses.
pub mod addr {
    use std::net::Ipv4Addr;

    pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    pub const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
    /// ClusterIP of the `demo` service (http 80/TCP, dns 53/UDP).
    pub const DEMO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    /// ClusterIP of the `empty` service (no endpoints: REJECT).
    pub const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
    pub const HTTP_PORT: u16 = 80;
    pub const DNS_PORT: u16 = 53;

    /// Pod address of backend `i`: 10.244.(10+i).2.
    pub const fn backend_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 10 + i as u8, 2)
    }

    /// Node-side address of backend `i`'s veth: 10.244.(10+i).1.
    pub const fn backend_gw(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 10 + i as u8, 1)
    }
}

/// The node name the lab's agent runs as (`NODE_NAME`), and the `nodeName`
/// of the lab's endpoints.
pub const LAB_NODE: &str = "lab-node";

/// Name of backend `i` (what its servers answer).
pub fn backend_name(i: usize) -> String {
    format!("backend-{i}")
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("target"),
    }
}

/// Lab shape.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of backend pods (at most 200).
    pub backends: usize,
    /// Port of the backends' TCP servers.
    pub tcp_port: u16,
    /// Port of the backends' UDP servers.
    pub udp_port: u16,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            backends: 3,
            tcp_port: 8080,
            udp_port: 5353,
        }
    }
}

/// A pod: its namespace and addresses.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// The node-side end of its veth, in the node namespace.
    pub node_if: String,
    pub netns: Netns,
}

/// A temp dir removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn create(path: PathBuf) -> Result<TempDir> {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("remove stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("lab: cannot remove {}: {e}", self.0.display());
        }
    }
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A lab. Fields drop in declaration order, which is the teardown order:
/// servers, pods, node, temp dir. (An [`Agent`] borrows the lab, so it is
/// always dropped before.)
pub struct Lab {
    servers: servers::Servers,
    client: Pod,
    backends: Vec<Pod>,
    node: Netns,
    dir: TempDir,
    id: String,
    config: LabConfig,
}

impl Lab {
    /// A lab with the default shape (3 backends, TCP 8080, UDP 5353).
    pub fn new() -> Result<Lab> {
        Lab::with_config(LabConfig::default())
    }

    pub fn with_config(config: LabConfig) -> Result<Lab> {
        // SAFETY: trivial syscall.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, veth, bpffs): run as root");
        }
        if config.backends > 200 {
            bail!("at most 200 backends (10.244.(10+i).0/24)");
        }
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::SeqCst)
        );
        let dir = TempDir::create(std::env::temp_dir().join(format!("kep-lab-{id}")))?;
        std::fs::create_dir(dir.0.join("manifests"))?;

        // Every guard below is owned by a local until the Lab is built, so
        // an error half way deletes what was made so far.
        let node = Netns::create(&format!("kep-{id}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;

        let client = make_pod(
            &node,
            &format!("kep-{id}-client"),
            "client",
            "veth-c0",
            addr::CLIENT_IP,
            addr::CLIENT_GW,
        )?;
        let mut backends = Vec::with_capacity(config.backends);
        for i in 0..config.backends {
            backends.push(make_pod(
                &node,
                &format!("kep-{id}-b{i}"),
                &backend_name(i),
                &format!("veth-b{i}"),
                addr::backend_ip(i),
                addr::backend_gw(i),
            )?);
        }

        let mut servers = servers::Servers::new();
        for pod in &backends {
            servers.start(&pod.netns, &pod.name, config.tcp_port, config.udp_port)?;
        }

        Ok(Lab {
            servers,
            client,
            backends,
            node,
            dir,
            id,
            config,
        })
    }

    /// `<pid>-<n>`, unique per lab in this machine at any one time.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The node namespace (where the agent runs).
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The client pod's namespace.
    pub fn client(&self) -> &Netns {
        &self.client.netns
    }

    pub fn client_pod(&self) -> &Pod {
        &self.client
    }

    pub fn backends(&self) -> &[Pod] {
        &self.backends
    }

    /// Backend `i`'s namespace.
    pub fn backend(&self, i: usize) -> &Netns {
        &self.backends[i].netns
    }

    /// Backend `i`'s TCP server address (pod IP, configured TCP port).
    pub fn backend_tcp(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.backends[i].ip, self.config.tcp_port)
    }

    /// Backend `i`'s UDP server address.
    pub fn backend_udp(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.backends[i].ip, self.config.udp_port)
    }

    /// What backend `i`'s servers have seen.
    pub fn backend_stats(&self, i: usize) -> StatsSnapshot {
        self.servers
            .stats(i)
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    /// (status, body) of one GET to the agent's `addr` (its metrics or
    /// health server) from the node namespace, where the agent listens.
    pub fn agent_get(&self, addr: SocketAddrV4, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        let r = self
            .node
            .run(move || hostile::probe(None, addr, &path, std::time::Duration::from_secs(10)));
        match r.status {
            Some(status) => Ok((status, r.body)),
            None => bail!("GET http://{addr}: {:?}", r.error),
        }
    }

    /// The lab's temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The directory the agent reads manifests from.
    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.0.join("manifests")
    }

    /// Writes `manifests/<name>` atomically (staged in the temp dir, then
    /// renamed), so the agent never reads a half-written file.
    pub fn write_manifest(&self, name: &str, yaml: &str) -> Result<PathBuf> {
        let dest = self.manifest_dir().join(name);
        let staging = self.dir.0.join(format!(".staging-{name}"));
        std::fs::write(&staging, yaml).with_context(|| format!("write {}", staging.display()))?;
        std::fs::rename(&staging, &dest)
            .with_context(|| format!("rename {} to {}", staging.display(), dest.display()))?;
        Ok(dest)
    }

    /// Removes `manifests/<name>`.
    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        let path = self.manifest_dir().join(name);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))
    }

    /// The agent's pinning directory: `/sys/fs/bpf/kep-lab-<id>`.
    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(agent::BPFFS_ROOT).join(format!("kep-lab-{}", self.id))
    }

    /// Starts the agent (see [`agent::agent_bin`]) in the node namespace:
    /// `run --manifests DIR --interfaces veth-* --bpffs /sys/fs/bpf/kep-lab-<id>`
    /// with `RUST_LOG=info`. Its output is captured and also written to
    /// `agent.log` in the lab's temp dir.
    pub fn start_agent(&self, manifests_dir: &Path) -> Result<Agent<'_>> {
        self.start_agent_args(&["--manifests".into(), manifests_dir.into()])
    }

    /// Starts the agent with `args` choosing its source (`--manifests DIR`,
    /// `--kubeconfig PATH`) plus any flags a test needs; the interfaces,
    /// bpffs directory and node name are the lab's, as for
    /// [`Lab::start_agent`].
    pub fn start_agent_args(&self, args: &[std::ffi::OsString]) -> Result<Agent<'_>> {
        let bin = agent::agent_bin()?;
        self.start_agent_bin_args(&bin, args)
    }

    /// [`Lab::start_agent_args`], returning once the agent has programmed
    /// the datapath for the first time (it prints `datapath programmed`),
    /// or failing with its output if it does not within 30 s.
    pub fn start_agent_programmed(&self, args: &[std::ffi::OsString]) -> Result<Agent<'_>> {
        let agent = self.start_agent_args(args)?;
        agent.wait_for_log("datapath programmed", std::time::Duration::from_secs(30))?;
        Ok(agent)
    }

    /// [`Lab::start_agent_programmed`] with the lab's manifest directory.
    pub fn start_manifest_agent(&self) -> Result<Agent<'_>> {
        self.start_agent_programmed(&["--manifests".into(), self.manifest_dir().into()])
    }

    /// [`Lab::start_agent`] with an explicit binary.
    pub fn start_agent_bin(&self, bin: &Path, manifests_dir: &Path) -> Result<Agent<'_>> {
        self.start_agent_bin_args(bin, &["--manifests".into(), manifests_dir.into()])
    }

    fn start_agent_bin_args(&self, bin: &Path, args: &[std::ffi::OsString]) -> Result<Agent<'_>> {
        Agent::spawn(
            self,
            bin,
            args,
            &self.bpffs_dir(),
            &self.dir.0.join("agent.log"),
        )
    }

    /// [`Lab::start_agent_args`] with the agent in the cgroup whose
    /// `cgroup.procs` is `procs` from its first instruction on.
    pub fn start_agent_in_cgroup(
        &self,
        args: &[std::ffi::OsString],
        procs: &Path,
    ) -> Result<Agent<'_>> {
        Agent::spawn_in(
            self.node(),
            LAB_NODE,
            &agent::agent_bin()?,
            args,
            &self.bpffs_dir(),
            &self.dir.0.join("agent.log"),
            Some(procs),
        )
    }

    /// Prefix of every namespace this lab made: `kep-<id>-`.
    pub fn netns_prefix(&self) -> String {
        format!("kep-{}-", self.id)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stop the servers explicitly first (their sockets hold references
        // to the backend namespaces); the fields then drop in order.
        self.servers.stop();
        // An agent killed on purpose leaves its pinned datapath behind.
        match std::fs::remove_dir_all(self.bpffs_dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("lab: cannot remove {}: {e}", self.bpffs_dir().display()),
        }
    }
}

/// Creates a pod namespace joined to the node by a veth pair: `node_if` in
/// the node with `gw/24`, `eth0` in the pod with `ip/24` and a default route
/// via `gw`.
fn make_pod(
    node: &Netns,
    ns_name: &str,
    pod_name: &str,
    node_if: &str,
    ip: Ipv4Addr,
    gw: Ipv4Addr,
) -> Result<Pod> {
    let netns = Netns::create(ns_name)?;
    // Made in the node namespace with the peer put straight into the pod's:
    // neither end ever exists in the root namespace.
    node.ip(&[
        "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", ns_name,
    ])?;
    node.ip(&["addr", "add", &format!("{gw}/24"), "dev", node_if])?;
    node.sysctl(&format!("net.ipv4.conf.{node_if}.rp_filter"), "0")?;
    node.ip(&["link", "set", node_if, "up"])?;
    netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    netns.ip(&["link", "set", "eth0", "up"])?;
    netns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
    Ok(Pod {
        name: pod_name.to_string(),
        ip,
        gateway: gw,
        node_if: node_if.to_string(),
        netns,
    })
}

/// Deletes namespaces (`kep-<pid>-*`) and bpffs dirs
/// (`/sys/fs/bpf/kep-lab-<pid>-*`) left by lab processes that no longer
/// run (e.g. killed by SIGKILL). Returns what it removed.
pub fn cleanup_stale() -> Result<Vec<String>> {
    fn dead_owner(rest: &str) -> bool {
        let pid = rest.split('-').next().unwrap_or("");
        match pid.parse::<u32>() {
            Ok(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => false,
        }
    }
    let mut removed = Vec::new();
    for name in netns::list_netns("kep-")? {
        if dead_owner(&name["kep-".len()..]) {
            netns::run_cmd("ip", &["netns", "del", &name])?;
            removed.push(name);
        }
    }
    if let Ok(dir) = std::fs::read_dir(agent::BPFFS_ROOT) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("kep-lab-")
                && dead_owner(rest)
            {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("remove {}", entry.path().display()))?;
                removed.push(entry.path().display().to_string());
            }
        }
    }
    Ok(removed)
}
