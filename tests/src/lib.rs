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
//!
//! Every link is dual-stack: each IPv4 address above has an IPv6 twin that
//! reads the same, `a.b.c.d/24` becoming `fd00:a:b:c::d/64` (the groups
//! written with the decimal digits, see [`addr::dec_group`]): the client is
//! fd00:10:244:1::2, backend i fd00:10:244:(10+i)::2, each with a default
//! route via its `::1`. IPv6 addresses are added `nodad` (nothing waits for
//! duplicate address detection) and the node forwards both families.

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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use agent::Agent;
pub use loadgen::Report;
pub use netns::Netns;
pub use servers::StatsSnapshot;

/// Fixed lab addresses, IPv4 and IPv6 (see the module docs).
pub mod addr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// An address family, as Kubernetes names them in `ipFamilies` and an
    /// EndpointSlice's `addressType`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum IpFamily {
        V4,
        V6,
    }

    impl IpFamily {
        pub const fn of(ip: IpAddr) -> IpFamily {
            match ip {
                IpAddr::V4(_) => IpFamily::V4,
                IpAddr::V6(_) => IpFamily::V6,
            }
        }

        /// `IPv4` or `IPv6`.
        pub const fn k8s_name(self) -> &'static str {
            match self {
                IpFamily::V4 => "IPv4",
                IpFamily::V6 => "IPv6",
            }
        }

        /// The unspecified address (`0.0.0.0`, `::`).
        pub const fn unspecified(self) -> IpAddr {
            match self {
                IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            }
        }
    }

    /// An address of one family, for code written once for both (e.g. the
    /// benchmark's rule renderers).
    pub trait FamilyAddr:
        Copy + Ord + std::fmt::Display + std::fmt::Debug + Into<IpAddr> + Send + Sync + 'static
    {
        const FAMILY: IpFamily;
    }

    impl FamilyAddr for Ipv4Addr {
        const FAMILY: IpFamily = IpFamily::V4;
    }

    impl FamilyAddr for Ipv6Addr {
        const FAMILY: IpFamily = IpFamily::V6;
    }

    /// The 16-bit group that reads as `n` (below 10,000) in decimal:
    /// `dec_group(244) == 0x244`. The IPv6 plan writes IPv4 octets this way
    /// so that an IPv6 address reads like its IPv4 twin.
    pub const fn dec_group(n: u16) -> u16 {
        assert!(n < 10_000, "four decimal digits at most");
        ((n / 1000) << 12) | ((n / 100 % 10) << 8) | ((n / 10 % 10) << 4) | (n % 10)
    }

    /// Prefix length of every pod link's IPv6 subnet.
    pub const POD_PREFIX_LEN6: u8 = 64;

    /// The IPv6 service CIDR: fd00:10:96::/108, as many addresses (20 bits)
    /// as the default IPv4 10.96.0.0/12 and the most kube-apiserver allows
    /// for IPv6.
    pub const SERVICE_CIDR6: (Ipv6Addr, u8) =
        (Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 108);

    /// Address `n` of [`SERVICE_CIDR6`] (fd00:10:96:: + n).
    pub const fn service_ip6(n: u32) -> Ipv6Addr {
        assert!(n < 1 << 20, "outside the IPv6 service CIDR");
        Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, (n >> 16) as u16, n as u16)
    }

    pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
    pub const CLIENT_GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1);
    /// IPv6 ClusterIP for a `demo`-like Service: fd00:10:96::10.
    pub const DEMO_VIP6: Ipv6Addr = service_ip6(0x10);
    /// IPv6 ClusterIP for an `empty`-like Service: fd00:10:96::11.
    pub const EMPTY_VIP6: Ipv6Addr = service_ip6(0x11);

    /// IPv6 pod address of backend `i`: fd00:10:244:(10+i)::2.
    pub const fn backend_ip6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, dec_group(10 + i as u16), 0, 0, 0, 2)
    }

    /// Node-side IPv6 address of backend `i`'s veth: fd00:10:244:(10+i)::1.
    pub const fn backend_gw6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, dec_group(10 + i as u16), 0, 0, 0, 1)
    }

    /// The inverse of [`dec_group`]: `None` for a group with a hex digit.
    pub const fn undec_group(g: u16) -> Option<u16> {
        let digits = [g >> 12, g >> 8 & 0xf, g >> 4 & 0xf, g & 0xf];
        let mut n = 0;
        let mut i = 0;
        while i < 4 {
            if digits[i] > 9 {
                return None;
            }
            n = n * 10 + digits[i];
            i += 1;
        }
        Some(n)
    }

    /// The backend whose pod address (either family) is `ip`.
    pub fn backend_index(ip: IpAddr) -> Option<usize> {
        let subnet = match ip {
            IpAddr::V4(v4) => u16::from(v4.octets()[2]),
            IpAddr::V6(v6) => undec_group(v6.segments()[3])?,
        };
        let i = usize::from(subnet.checked_sub(10)?);
        let same = i < crate::MAX_BACKENDS
            && match ip {
                IpAddr::V4(v4) => v4 == backend_ip(i),
                IpAddr::V6(v6) => v6 == backend_ip6(i),
            };
        same.then_some(i)
    }

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

/// Most backends a [`Lab`] can have (10.244.(10+i).0/24 up to .210).
pub const MAX_BACKENDS: usize = 200;

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
    pub ip6: Ipv6Addr,
    pub gateway6: Ipv6Addr,
    /// The node-side end of its veth, in the node namespace.
    pub node_if: String,
    pub netns: Netns,
}

impl Pod {
    /// The pod's address of `family`.
    pub fn ip_of(&self, family: addr::IpFamily) -> IpAddr {
        match family {
            addr::IpFamily::V4 => self.ip.into(),
            addr::IpFamily::V6 => self.ip6.into(),
        }
    }
}

/// A pod's addresses and its node-side gateways, per family.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PodAddrs {
    pub(crate) ip: Ipv4Addr,
    pub(crate) gateway: Ipv4Addr,
    pub(crate) ip6: Ipv6Addr,
    pub(crate) gateway6: Ipv6Addr,
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

/// A bpffs directory of a test's pins, unpinned on drop: also when a check
/// fails, and when loading failed half way (maps pinned, a program refused
/// by the verifier).
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = proxy_userspace::datapath::unpin_all(&self.0) {
            eprintln!("unpinning {}: {e}", self.0.display());
        }
    }
}

/// A datapath loaded (maps, upkeep, verified programs) and pinned under a
/// bpffs directory of its own, `/sys/fs/bpf/<prefix>-<pid>-<n>`, unpinned
/// on drop: the test_run tests' fixture. Fields drop in order, so the
/// datapath lets go of its pins before they are removed.
pub struct LoadedDatapath {
    pub dp: proxy_userspace::datapath::Datapath,
    pub upkeep: proxy_userspace::datapath::Upkeep,
    pub hooks: proxy_userspace::datapath::Hooks,
    pub pins: PinDir,
}

impl LoadedDatapath {
    /// Loads with `DatapathConfig::new(dir)` changed by `change`; panics
    /// (the test fails loudly) when BPF cannot be loaded.
    pub fn load(
        prefix: &str,
        change: impl FnOnce(&mut proxy_userspace::datapath::DatapathConfig),
    ) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let pins = PinDir(dir);
        Self::load_in(pins, change)
    }

    /// Loads again into `pins`' directory (an agent's restart adopting
    /// what its predecessor pinned).
    pub fn load_in(
        pins: PinDir,
        change: impl FnOnce(&mut proxy_userspace::datapath::DatapathConfig),
    ) -> Self {
        let mut cfg = proxy_userspace::datapath::DatapathConfig::new(&pins.0);
        change(&mut cfg);
        let (dp, upkeep, hooks) =
            proxy_userspace::datapath::Datapath::load(&cfg).unwrap_or_else(|e| {
                panic!("cannot load the eBPF datapath (this test needs root and bpffs): {e:#}")
            });
        Self {
            dp,
            upkeep,
            hooks,
            pins,
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.0
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
        if config.backends > MAX_BACKENDS {
            bail!("at most {MAX_BACKENDS} backends (10.244.(10+i).0/24)");
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
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;

        let client = make_pod(
            &node,
            &format!("kep-{id}-client"),
            "client",
            "veth-c0",
            PodAddrs {
                ip: addr::CLIENT_IP,
                gateway: addr::CLIENT_GW,
                ip6: addr::CLIENT_IP6,
                gateway6: addr::CLIENT_GW6,
            },
        )?;
        let mut backends = Vec::with_capacity(config.backends);
        for i in 0..config.backends {
            backends.push(make_pod(
                &node,
                &format!("kep-{id}-b{i}"),
                &backend_name(i),
                &format!("veth-b{i}"),
                PodAddrs {
                    ip: addr::backend_ip(i),
                    gateway: addr::backend_gw(i),
                    ip6: addr::backend_ip6(i),
                    gateway6: addr::backend_gw6(i),
                },
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

    /// Backend `i`'s TCP server address over IPv6.
    pub fn backend_tcp6(&self, i: usize) -> SocketAddrV6 {
        SocketAddrV6::new(self.backends[i].ip6, self.config.tcp_port, 0, 0)
    }

    /// Backend `i`'s UDP server address over IPv6.
    pub fn backend_udp6(&self, i: usize) -> SocketAddrV6 {
        SocketAddrV6::new(self.backends[i].ip6, self.config.udp_port, 0, 0)
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
        self.start_manifest_agent_with(&[])
    }

    /// [`Lab::start_manifest_agent`] with `extra` arguments after
    /// `--manifests DIR` (capacities, timeouts, modes).
    pub fn start_manifest_agent_with(&self, extra: &[&str]) -> Result<Agent<'_>> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["--manifests".into(), self.manifest_dir().into()];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        self.start_agent_programmed(&args)
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

    /// [`Lab::start_agent_args`] on `bpffs` instead of the lab's own
    /// directory; the test removes what it made there.
    pub fn start_agent_on(&self, bpffs: &Path, args: &[std::ffi::OsString]) -> Result<Agent<'_>> {
        let mut agent = Agent::spawn(
            self,
            &agent::agent_bin()?,
            args,
            bpffs,
            &self.dir.0.join("agent.log"),
        )?;
        agent.leave_directory();
        Ok(agent)
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
/// the node with the gateways (`/24`, `/64`), `eth0` in the pod with its
/// addresses and a default route of each family via its gateway.
pub(crate) fn make_pod(
    node: &Netns,
    ns_name: &str,
    pod_name: &str,
    node_if: &str,
    a: PodAddrs,
) -> Result<Pod> {
    let netns = Netns::create(ns_name)?;
    wire_pod(node, &netns, node_if, a.ip, a.gateway)?;
    // The IPv6 half of the dual-stack lab, beside the CNI-style IPv4 wiring.
    netns::add_addr6(node, node_if, a.gateway6, addr::POD_PREFIX_LEN6)?;
    netns::add_addr6(&netns, "eth0", a.ip6, addr::POD_PREFIX_LEN6)?;
    netns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &a.gateway6.to_string(),
    ])?;
    Ok(Pod {
        name: pod_name.to_string(),
        ip: a.ip,
        gateway: a.gateway,
        ip6: a.ip6,
        gateway6: a.gateway6,
        node_if: node_if.to_string(),
        netns,
    })
}

/// Joins `pod` to `node` as a CNI does: a veth pair, `node_if` in the node
/// with `gw/24`, `eth0` in the pod with `ip/24` and a default route via
/// `gw`. Made in the node namespace with the peer put straight into the
/// pod's: neither end ever exists in the root namespace.
pub fn wire_pod(
    node: &Netns,
    pod: &Netns,
    node_if: &str,
    ip: Ipv4Addr,
    gw: Ipv4Addr,
) -> Result<()> {
    node.ip(&[
        "link",
        "add",
        node_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ])?;
    node.ip(&["addr", "add", &format!("{gw}/24"), "dev", node_if])?;
    node.sysctl(&format!("net.ipv4.conf.{node_if}.rp_filter"), "0")?;
    node.ip(&["link", "set", node_if, "up"])?;
    pod.ip(&["link", "set", "lo", "up"])?;
    pod.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", "default", "via", &gw.to_string()])?;
    Ok(())
}

/// Lines of the root namespace's `ip -6 addr` and `ip -6 route` (all
/// tables) naming an address of the labs' IPv6 plans (pods
/// fd00:10:244::/48, services fd00:10:96::/108, the cluster fabric
/// fd00:192:168:50::/64): the self-tests' check that nothing of a lab is
/// reachable from the host.
pub fn root_ipv6_leaks() -> Result<Vec<String>> {
    let addrs = netns::run_cmd("ip", &["-6", "-o", "addr", "show"])?;
    let routes = netns::run_cmd("ip", &["-6", "route", "show", "table", "all"])?;
    Ok(addrs
        .lines()
        .chain(routes.lines())
        .filter(|l| {
            ["fd00:10:244:", "fd00:10:96:", "fd00:192:168:50:"]
                .iter()
                .any(|p| l.contains(p))
        })
        .map(str::to_string)
        .collect())
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

#[cfg(test)]
mod tests {
    use super::addr::*;
    use super::cluster::addr as c;
    use std::net::{IpAddr, Ipv6Addr};

    /// Whether `ip` is in `net/len`.
    fn in_prefix(ip: Ipv6Addr, (net, len): (Ipv6Addr, u8)) -> bool {
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        u128::from(ip) & mask == u128::from(net)
    }

    #[test]
    fn ipv6_addresses_read_like_their_ipv4_twins() {
        assert_eq!(dec_group(244), 0x244);
        assert_eq!(dec_group(9), 9);
        assert_eq!(undec_group(0x210), Some(210));
        assert_eq!(undec_group(0x10f), None);
        assert_eq!(CLIENT_IP6.to_string(), "fd00:10:244:1::2");
        assert_eq!(backend_ip6(0).to_string(), "fd00:10:244:10::2");
        assert_eq!(backend_gw6(199).to_string(), "fd00:10:244:209::1");
        assert_eq!(DEMO_VIP6.to_string(), "fd00:10:96::10");
        assert_eq!(c::node_ip6(1).to_string(), "fd00:192:168:50::11");
        assert_eq!(c::EXT_IP6.to_string(), "fd00:192:168:50::100");
    }

    #[test]
    fn backend_index_inverts_both_families() {
        for i in [0, 1, 99, crate::MAX_BACKENDS - 1] {
            assert_eq!(backend_index(backend_ip(i).into()), Some(i));
            assert_eq!(backend_index(backend_ip6(i).into()), Some(i));
        }
        for ip in [
            IpAddr::from(CLIENT_IP),
            CLIENT_IP6.into(),
            backend_gw6(3).into(),
            "fd00:10:244:a::2".parse().unwrap(),
            "fd00:10:244:9999::2".parse().unwrap(),
        ] {
            assert_eq!(backend_index(ip), None, "{ip}");
        }
    }

    #[test]
    fn cluster_pods_lie_in_their_nodes_ranges_only() {
        for k in 0..c::NODES {
            for j in 0..=c::CLIENT_POD {
                assert!(in_prefix(c::pod_ip6(k, j), c::pod_cidr6(k)));
                assert!(!in_prefix(c::pod_ip6(k, j), c::pod_cidr6(1 - k)));
                assert_eq!(
                    u128::from(c::pod_gw6(k, j)) + 1,
                    u128::from(c::pod_ip6(k, j))
                );
            }
        }
        assert_eq!(c::pod_ip6(1, 15).to_string(), "fd00:10:244:20f::2");
        assert_eq!(c::pod_cidr6(0).0.to_string(), "fd00:10:244:100::");
    }

    #[test]
    fn service_ips6_fill_the_service_cidr() {
        assert!(in_prefix(service_ip6(0), SERVICE_CIDR6));
        assert!(in_prefix(service_ip6((1 << 20) - 1), SERVICE_CIDR6));
        assert!(!in_prefix(
            Ipv6Addr::from(u128::from(service_ip6((1 << 20) - 1)) + 1),
            SERVICE_CIDR6
        ));
        assert_eq!(service_ip6(0x1_0000).to_string(), "fd00:10:96::1:0");
    }
}
