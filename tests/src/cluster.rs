//! A two-node network-namespace cluster for NodePort, LoadBalancer and
//! externalIP tests: two node namespaces and an external client joined by a
//! Linux bridge in a "fabric" namespace, pods behind each node, one agent
//! per node.
//!
//! As with [`crate::Lab`], nothing is linked or routed to the root namespace,
//! names embed the pid and a per-process counter (`kep-<pid>-c<n>-...`, the
//! `c` keeping them apart from [`crate::Lab`]'s), and dropping a [`Cluster`]
//! stops its servers and deletes its namespaces, pin directories and temp
//! dir, also on panic.
//!
//! Addresses (see [`addr`]):
//!
//! | what | namespace | interface | address |
//! | --- | --- | --- | --- |
//! | fabric | `kep-<id>-fabric` | bridge `br0`, ports `veth-n<k>`, `veth-x` | none |
//! | node k | `kep-<id>-n<k>` | `eth0` | 192.168.50.(10+k)/24 |
//! | node k | | `veth-p<j>` | 10.244.(128+16k+j).1/24 |
//! | pod j of node k | `kep-<id>-n<k>-p<j>` | `eth0` | 10.244.(128+16k+j).2/24, default via .1 |
//! | external client | `kep-<id>-ext` | `eth0` | 192.168.50.100/24, no other route |
//!
//! Every link also carries IPv6 (added `nodad`; the nodes forward both
//! families): the fabric is fd00:192:168:50::/64 (node k ::(10+k), the
//! external client ::100, written as the IPv4 addresses read), node k's
//! pods are in fd00:10:244:(k+1)00::/56, pod j on fd00:10:244:(k+1)0j::/64
//! (j in hex) at `::2` with a default route via `::1`, and node k routes
//! the other node's /56 via the other node's fabric address. The external
//! client again has only its fabric subnet.
//!
//! Backend pods are `j = 0..backends_per_node[k]`, named `n<k>-backend-<j>`;
//! the optional client pod of node k is `j = 15` ([`addr::CLIENT_POD`]),
//! named `n<k>-client`. Node k routes the other node's pod range
//! (10.244.(128+16(1-k)).0/20) via the other node's IP.

use std::ffi::OsString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::addr::IpFamily;
use crate::agent::{self, Agent};
use crate::netns::Netns;
use crate::servers::{self, Servers, StatsSnapshot};
use crate::xdp_pass;
use crate::yaml::NodeEndpoint;
use crate::{Pod, PodAddrs, TempDir, netns};

/// Fixed cluster addresses.
pub mod addr {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use crate::addr::dec_group;

    /// Number of nodes.
    pub const NODES: usize = 2;
    /// Pod index `j` of the client pods (the last /24 of a node's /20).
    pub const CLIENT_POD: usize = 15;
    /// Most backend pods per node (`j = 0..15`).
    pub const MAX_BACKENDS: usize = CLIENT_POD;
    /// The fabric subnet's prefix length.
    pub const FABRIC_PREFIX_LEN: u8 = 24;
    /// The external client's address on the fabric.
    pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);

    /// Node k's `eth0` address: 192.168.50.(10+k).
    pub const fn node_ip(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 50, 10 + k as u8)
    }

    /// Node k's pod range: 10.244.(128+16k).0/20.
    pub const fn pod_cidr(k: usize) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 244, 128 + 16 * k as u8, 0), 20)
    }

    /// Pod j of node k: 10.244.(128+16k+j).2.
    pub const fn pod_ip(k: usize, j: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 128 + 16 * k as u8 + j as u8, 2)
    }

    /// Node-side address of pod j's veth on node k: 10.244.(128+16k+j).1.
    pub const fn pod_gw(k: usize, j: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 128 + 16 * k as u8 + j as u8, 1)
    }

    /// Node k's client pod.
    pub const fn client_ip(k: usize) -> Ipv4Addr {
        pod_ip(k, CLIENT_POD)
    }

    /// The fabric's IPv6 prefix length.
    pub const FABRIC_PREFIX_LEN6: u8 = 64;
    /// The external client's IPv6 address on the fabric.
    pub const EXT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x50, 0, 0, 0, 0x100);

    /// Node k's `eth0` IPv6 address: fd00:192:168:50::(10+k).
    pub const fn node_ip6(k: usize) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x192,
            0x168,
            0x50,
            0,
            0,
            0,
            dec_group(10 + k as u16),
        )
    }

    /// The fourth group of pod j of node k's /64: (k+1)0j (hex).
    const fn pod_group6(k: usize, j: usize) -> u16 {
        ((k as u16 + 1) << 8) | j as u16
    }

    /// Node k's IPv6 pod range: fd00:10:244:(k+1)00::/56.
    pub const fn pod_cidr6(k: usize) -> (Ipv6Addr, u8) {
        (
            Ipv6Addr::new(0xfd00, 0x10, 0x244, pod_group6(k, 0), 0, 0, 0, 0),
            56,
        )
    }

    /// Pod j of node k over IPv6: fd00:10:244:(k+1)0j::2.
    pub const fn pod_ip6(k: usize, j: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, pod_group6(k, j), 0, 0, 0, 2)
    }

    /// Node-side IPv6 address of pod j's veth on node k:
    /// fd00:10:244:(k+1)0j::1.
    pub const fn pod_gw6(k: usize, j: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, pod_group6(k, j), 0, 0, 0, 1)
    }

    /// Node k's client pod over IPv6.
    pub const fn client_ip6(k: usize) -> Ipv6Addr {
        pod_ip6(k, CLIENT_POD)
    }
}

/// `node-<k>`: node k's `NODE_NAME` and the `nodeName` of its endpoints.
pub fn node_name(k: usize) -> String {
    format!("node-{k}")
}

/// `n<k>-backend-<j>`: what backend j of node k answers.
pub fn backend_name(k: usize, j: usize) -> String {
    format!("n{k}-backend-{j}")
}

/// `n<k>-client`.
pub fn client_name(k: usize) -> String {
    format!("n{k}-client")
}

/// Cluster shape.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Backend pods on node 0 and node 1 (each at most
    /// [`addr::MAX_BACKENDS`]).
    pub backends_per_node: [usize; 2],
    /// Whether each node gets a client pod ([`addr::client_ip`]).
    pub client_pod: bool,
    /// Port of the backends' TCP servers.
    pub tcp_port: u16,
    /// Port of the backends' UDP servers.
    pub udp_port: u16,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            backends_per_node: [2, 2],
            client_pod: true,
            tcp_port: 8080,
            udp_port: 5353,
        }
    }
}

/// What a server answered to `whoami`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whoami {
    /// The answering server's name (e.g. `n1-backend-0`).
    pub backend: String,
    /// The source address the server saw: the client's own address when it
    /// is preserved, a node address when SNATed.
    pub seen_from: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
    /// Where the reply came from (for a Service: the address the client
    /// asked for, once the datapath has reversed its translation).
    pub reply_from: SocketAddr,
}

impl Whoami {
    /// Whether the server saw the client's own address (no SNAT).
    pub fn client_ip_preserved(&self) -> bool {
        self.seen_from.ip() == self.local.ip()
    }
}

fn parse_reply(line: &str) -> io::Result<(String, SocketAddr)> {
    servers::parse_whoami(line).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a whoami reply: {line:?}"),
        )
    })
}

/// One TCP `whoami` request to `target` (either family) from inside `from`
/// (a new connection; `timeout` bounds the connect and the reply).
pub fn tcp_whoami(
    from: &Netns,
    target: impl Into<SocketAddr>,
    timeout: Duration,
) -> io::Result<Whoami> {
    let target: SocketAddr = target.into();
    from.try_run(move || -> io::Result<Whoami> {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(format!("{}\n", servers::WHOAMI).as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut line)?;
        if !line.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {line:?}"),
            ));
        }
        let (backend, seen_from) = parse_reply(&line)?;
        Ok(Whoami {
            backend,
            seen_from,
            local: stream.local_addr()?,
            reply_from: stream.peer_addr()?,
        })
    })
    .map_err(|e| io::Error::other(format!("{e:#}")))?
}

/// One UDP `whoami` datagram to `target` (either family) from inside
/// `from`, on an unconnected socket (so a reply from an unexpected source is
/// still received, and shows in [`Whoami::reply_from`]).
pub fn udp_whoami(
    from: &Netns,
    target: impl Into<SocketAddr>,
    timeout: Duration,
) -> io::Result<Whoami> {
    let target: SocketAddr = target.into();
    from.try_run(move || -> io::Result<Whoami> {
        let sock = crate::loadgen::unbound_udp(target)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send_to(servers::WHOAMI.as_bytes(), target)?;
        let mut buf = [0u8; 1500];
        let (n, reply_from) = sock.recv_from(&mut buf)?;
        let (backend, seen_from) = parse_reply(&String::from_utf8_lossy(&buf[..n]))?;
        // An unconnected socket bound to 0.0.0.0 (or ::) has no local address
        // of its own; the route towards the target says which one was used.
        let local_ip = source_ip_towards(target.ip())?;
        Ok(Whoami {
            backend,
            seen_from,
            local: SocketAddr::new(local_ip, sock.local_addr()?.port()),
            reply_from,
        })
    })
    .map_err(|e| io::Error::other(format!("{e:#}")))?
}

/// The source address this namespace uses towards `dst` (a connected UDP
/// socket sends nothing).
fn source_ip_towards(dst: IpAddr) -> io::Result<IpAddr> {
    let target = SocketAddr::new(dst, 9);
    let probe = crate::loadgen::unbound_udp(target)?;
    probe.connect(target)?;
    Ok(probe.local_addr()?.ip())
}

/// One node: its namespace and pods. Fields drop in declaration order, so
/// the pods go before the node's namespace.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub backends: Vec<Pod>,
    pub client: Option<Pod>,
    pub netns: Netns,
}

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// A two-node cluster. Fields drop in declaration order, which is the
/// teardown order: servers, nodes (pods first, see [`Node`]), external
/// client, fabric, temp dir. (Agents borrow the cluster, so they are always
/// dropped before.)
pub struct Cluster {
    servers: Servers,
    /// Server name → index into `servers`' stats.
    server_index: Vec<(String, usize)>,
    nodes: Vec<Node>,
    /// Declared before the namespaces: detached before they go.
    _fabric_xdp: Vec<xdp_pass::XdpPass>,
    ext: Netns,
    fabric: Netns,
    dir: TempDir,
    id: String,
    config: ClusterConfig,
}

impl Cluster {
    /// A cluster with the default shape (2 backends per node, client pods,
    /// TCP 8080, UDP 5353).
    pub fn new() -> Result<Cluster> {
        Cluster::with_config(ClusterConfig::default())
    }

    pub fn with_config(config: ClusterConfig) -> Result<Cluster> {
        // SAFETY: trivial syscall.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the cluster lab needs root (network namespaces, veth, bpffs): run as root");
        }
        if let Some(n) = config
            .backends_per_node
            .iter()
            .find(|&&n| n > addr::MAX_BACKENDS)
        {
            bail!(
                "{n} backends on a node: at most {} (j = 15 is the client pod)",
                addr::MAX_BACKENDS
            );
        }
        let id = format!(
            "{}-c{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = TempDir::create(std::env::temp_dir().join(format!("kep-cluster-{id}")))?;
        for k in 0..addr::NODES {
            std::fs::create_dir_all(dir.0.join(node_name(k)).join("manifests"))?;
        }

        // Every guard below is owned by a local until the Cluster is built,
        // so an error half way deletes what was made so far.
        let fabric = Netns::create(&format!("kep-{id}-fabric"))?;
        // No multicast snooping: neighbour discovery's solicited-node
        // multicast must reach every port, including ports whose MLD
        // report the bridge missed while they were still down (a real
        // switch without an MLD querier floods too).
        fabric.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        fabric.ip(&["link", "set", "br0", "up"])?;

        let ext = Netns::create(&format!("kep-{id}-ext"))?;
        attach_to_fabric(&fabric, "veth-x", &ext, addr::EXT_IP, addr::EXT_IP6)?;

        let mut nodes = Vec::with_capacity(addr::NODES);
        let mut fabric_xdp = Vec::with_capacity(addr::NODES);
        for k in 0..addr::NODES {
            nodes.push(make_node(&fabric, &id, k, &config)?);
            fabric_xdp.push(xdp_pass::attach(&fabric, &format!("veth-n{k}"))?);
        }

        let mut servers = Servers::new();
        let mut server_index = Vec::new();
        for node in &nodes {
            for pod in &node.backends {
                let i = servers.start(&pod.netns, &pod.name, config.tcp_port, config.udp_port)?;
                server_index.push((pod.name.clone(), i));
            }
        }

        Ok(Cluster {
            servers,
            server_index,
            nodes,
            _fabric_xdp: fabric_xdp,
            ext,
            fabric,
            dir,
            id,
            config,
        })
    }

    /// `<pid>-c<n>`, unique per cluster on this machine at any one time.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Prefix of every namespace this cluster made: `kep-<id>-`.
    pub fn netns_prefix(&self) -> String {
        format!("kep-{}-", self.id)
    }

    /// The fabric namespace (bridge `br0`).
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    /// The external client's namespace.
    pub fn ext(&self) -> &Netns {
        &self.ext
    }

    /// Node k (0 or 1).
    pub fn node(&self, k: usize) -> &Node {
        &self.nodes[k]
    }

    /// Node k's namespace (where its agent runs).
    pub fn node_ns(&self, k: usize) -> &Netns {
        &self.nodes[k].netns
    }

    /// Node k's `eth0` address.
    pub fn node_ip(&self, k: usize) -> Ipv4Addr {
        self.nodes[k].ip
    }

    /// Node k's `eth0` IPv6 address.
    pub fn node_ip6(&self, k: usize) -> Ipv6Addr {
        self.nodes[k].ip6
    }

    /// Backend pod j of node k.
    pub fn backend(&self, k: usize, j: usize) -> &Pod {
        &self.nodes[k].backends[j]
    }

    /// Backend pod j of node k's TCP server address.
    pub fn backend_tcp(&self, k: usize, j: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.backend(k, j).ip, self.config.tcp_port)
    }

    /// Backend pod j of node k's UDP server address.
    pub fn backend_udp(&self, k: usize, j: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.backend(k, j).ip, self.config.udp_port)
    }

    /// Backend pod j of node k's TCP server address over IPv6.
    pub fn backend_tcp6(&self, k: usize, j: usize) -> SocketAddrV6 {
        SocketAddrV6::new(self.backend(k, j).ip6, self.config.tcp_port, 0, 0)
    }

    /// Backend pod j of node k's UDP server address over IPv6.
    pub fn backend_udp6(&self, k: usize, j: usize) -> SocketAddrV6 {
        SocketAddrV6::new(self.backend(k, j).ip6, self.config.udp_port, 0, 0)
    }

    /// Node k's client pod; panics if the cluster was made without them.
    pub fn client(&self, k: usize) -> &Pod {
        self.nodes[k]
            .client
            .as_ref()
            .expect("cluster made with client_pod: false")
    }

    /// What server `name` (a backend pod's, or one from
    /// [`Cluster::serve_on_node`]) has seen; `None` if there is no such
    /// server.
    pub fn server_stats(&self, name: &str) -> Option<StatsSnapshot> {
        let &(_, i) = self.server_index.iter().find(|(n, _)| n == name)?;
        Some(
            self.servers
                .stats(i)
                .map(|s| s.snapshot())
                .unwrap_or_default(),
        )
    }

    /// Starts echo servers named `name` on 0.0.0.0 and :: in node k's namespace
    /// (e.g. to reach the node itself, or a port a NodePort must not hide).
    pub fn serve_on_node(
        &mut self,
        k: usize,
        name: &str,
        tcp_port: u16,
        udp_port: u16,
    ) -> Result<()> {
        if self.server_index.iter().any(|(n, _)| n == name) {
            bail!("a server named {name} already runs");
        }
        let i = self
            .servers
            .start(&self.nodes[k].netns, name, tcp_port, udp_port)?;
        self.server_index.push((name.to_string(), i));
        Ok(())
    }

    /// Adds a route on the external client for `prefix` (e.g.
    /// `203.0.113.10/32`, an LB or externalIP range; or an IPv6 one) via
    /// node k's address of the prefix's family.
    pub fn route_external(&self, prefix: &str, k: usize) -> Result<()> {
        let via = match prefix_family(prefix) {
            IpFamily::V4 => IpAddr::from(self.node_ip(k)),
            IpFamily::V6 => IpAddr::from(self.node_ip6(k)),
        };
        self.ext
            .ip(&["route", "add", prefix, "via", &via.to_string()])
            .map(|_| ())
    }

    /// Removes a route added by [`Cluster::route_external`].
    pub fn unroute_external(&self, prefix: &str) -> Result<()> {
        self.ext.ip(&["route", "del", prefix]).map(|_| ())
    }

    /// Adds `cidr` (e.g. `192.168.50.20/24`, or an IPv6 one, added
    /// `nodad`) as a secondary address on node k's `eth0`.
    pub fn add_node_address(&self, k: usize, cidr: &str) -> Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", "eth0"];
        if prefix_family(cidr) == IpFamily::V6 {
            args.push("nodad");
        }
        self.node_ns(k).ip(&args).map(|_| ())
    }

    /// Endpoints for backend pods `pods` (`(node, j)`), ready, each with
    /// the `nodeName` of its node.
    pub fn endpoints(&self, pods: &[(usize, usize)]) -> Vec<NodeEndpoint> {
        self.endpoints_of(IpFamily::V4, pods)
    }

    /// [`Cluster::endpoints`] with the pods' addresses of `family`.
    pub fn endpoints_of(&self, family: IpFamily, pods: &[(usize, usize)]) -> Vec<NodeEndpoint> {
        pods.iter()
            .map(|&(k, j)| NodeEndpoint {
                ip: self.backend(k, j).ip_of(family),
                pod: backend_name(k, j),
                ready: true,
                node: node_name(k),
            })
            .collect()
    }

    /// The cluster's temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The directory node k's agent reads manifests from.
    pub fn manifest_dir(&self, k: usize) -> PathBuf {
        self.dir.0.join(node_name(k)).join("manifests")
    }

    /// Writes `manifests/<name>` for both nodes, each atomically (staged,
    /// then renamed), so no agent reads a half-written file.
    pub fn write_manifest(&self, name: &str, yaml: &str) -> Result<()> {
        for k in 0..addr::NODES {
            let dest = self.manifest_dir(k).join(name);
            let staging = self
                .dir
                .0
                .join(node_name(k))
                .join(format!(".staging-{name}"));
            std::fs::write(&staging, yaml)
                .with_context(|| format!("write {}", staging.display()))?;
            std::fs::rename(&staging, &dest)
                .with_context(|| format!("rename {} to {}", staging.display(), dest.display()))?;
        }
        Ok(())
    }

    /// Removes `manifests/<name>` from both nodes.
    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        for k in 0..addr::NODES {
            let path = self.manifest_dir(k).join(name);
            std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Node k's agent pinning directory: `/sys/fs/bpf/kep-lab-<id>-n<k>`
    /// (the `kep-lab-<pid>-` prefix lets [`crate::cleanup_stale`] find it).
    pub fn bpffs_dir(&self, k: usize) -> PathBuf {
        Path::new(agent::BPFFS_ROOT).join(format!("kep-lab-{}-n{k}", self.id))
    }

    /// Starts node k's agent (see [`agent::agent_bin`]) in its namespace:
    /// `run --manifests <manifest_dir(k)> EXTRA... --interfaces veth-*
    /// --bpffs <bpffs_dir(k)>` with `NODE_NAME=node-<k>`; its output also
    /// goes to `node-<k>/agent.log` in the temp dir. Does not wait.
    pub fn start_agent(&self, k: usize, extra: &[OsString]) -> Result<Agent<'_>> {
        let bin = agent::agent_bin()?;
        let mut args: Vec<OsString> = vec!["--manifests".into(), self.manifest_dir(k).into()];
        args.extend_from_slice(extra);
        Agent::spawn_in(
            &self.nodes[k].netns,
            &node_name(k),
            &bin,
            &args,
            &self.bpffs_dir(k),
            &self.dir.0.join(node_name(k)).join("agent.log"),
            None,
        )
    }

    /// [`Cluster::start_agent`], returning once the agent has programmed its
    /// datapath (printed `datapath programmed`), or failing with its output
    /// if it does not within 30 s.
    pub fn start_agent_programmed(&self, k: usize, extra: &[OsString]) -> Result<Agent<'_>> {
        let agent = self.start_agent(k, extra)?;
        agent
            .wait_for_log("datapath programmed", Duration::from_secs(30))
            .with_context(|| format!("agent of {}", node_name(k)))?;
        Ok(agent)
    }

    /// Starts both agents (`extra[k]` for node k) and returns once each has
    /// programmed its datapath (printed `datapath programmed`), or fails
    /// with the output of the one that did not within 30 s.
    pub fn start_agents(&self, extra: [&[OsString]; 2]) -> Result<[Agent<'_>; 2]> {
        let a0 = self.start_agent(0, extra[0])?;
        let a1 = self.start_agent(1, extra[1])?;
        for (k, a) in [&a0, &a1].into_iter().enumerate() {
            a.wait_for_log("datapath programmed", Duration::from_secs(30))
                .with_context(|| format!("agent of {}", node_name(k)))?;
        }
        Ok([a0, a1])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop the servers explicitly first (their sockets hold references
        // to the pod namespaces); the fields then drop in order.
        self.servers.stop();
        // An agent killed on purpose leaves its pinned datapath behind.
        for k in 0..addr::NODES {
            let dir = self.bpffs_dir(k);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("cluster: cannot remove {}: {e}", dir.display()),
            }
        }
    }
}

/// The family of an address or prefix written as text.
fn prefix_family(prefix: &str) -> IpFamily {
    if prefix.contains(':') {
        IpFamily::V6
    } else {
        IpFamily::V4
    }
}

/// Links `ns` to the fabric bridge: `fabric_if` in the fabric (a bridge
/// port), `eth0` in `ns` with `ip/24` and `ip6/64`.
fn attach_to_fabric(
    fabric: &Netns,
    fabric_if: &str,
    ns: &Netns,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
) -> Result<()> {
    // Made in the fabric with the peer put straight into `ns`: neither end
    // ever exists in the root namespace.
    fabric.ip(&[
        "link",
        "add",
        fabric_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    fabric.ip(&["link", "set", fabric_if, "master", "br0"])?;
    fabric.ip(&["link", "set", fabric_if, "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{ip}/{}", addr::FABRIC_PREFIX_LEN),
        "dev",
        "eth0",
    ])?;
    netns::add_addr6(ns, "eth0", ip6, addr::FABRIC_PREFIX_LEN6)?;
    // A wire carries finished checksums. Without this, veth hands partial
    // ones (CHECKSUM_PARTIAL skbs) across the fabric, which native XDP on
    // the receiving node cannot see nor keep.
    ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

fn make_node(fabric: &Netns, id: &str, k: usize, config: &ClusterConfig) -> Result<Node> {
    let ns_name = format!("kep-{id}-n{k}");
    let netns = Netns::create(&ns_name)?;
    netns.sysctl("net.ipv4.ip_forward", "1")?;
    netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    // Before any interface exists, so every one inherits 0: traffic between
    // pods of different nodes can come in on an interface other than the
    // one its reply leaves by once the datapath redirects it.
    netns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    netns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    let (ip, ip6) = (addr::node_ip(k), addr::node_ip6(k));
    attach_to_fabric(fabric, &format!("veth-n{k}"), &netns, ip, ip6)?;
    netns.sysctl("net.ipv4.conf.eth0.rp_filter", "0")?;
    let other = 1 - k;
    let (net, len) = addr::pod_cidr(other);
    netns.ip(&[
        "route",
        "add",
        &format!("{net}/{len}"),
        "via",
        &addr::node_ip(other).to_string(),
    ])?;
    let (net6, len6) = addr::pod_cidr6(other);
    netns.ip(&[
        "-6",
        "route",
        "add",
        &format!("{net6}/{len6}"),
        "via",
        &addr::node_ip6(other).to_string(),
    ])?;

    let mut node = Node {
        name: node_name(k),
        ip,
        ip6,
        backends: Vec::with_capacity(config.backends_per_node[k]),
        client: None,
        netns,
    };
    for j in 0..config.backends_per_node[k] {
        node.backends.push(make_pod(
            &node.netns,
            &format!("{ns_name}-p{j}"),
            &backend_name(k, j),
            k,
            j,
        )?);
    }
    if config.client_pod {
        let j = addr::CLIENT_POD;
        node.client = Some(make_pod(
            &node.netns,
            &format!("{ns_name}-p{j}"),
            &client_name(k),
            k,
            j,
        )?);
    }
    Ok(node)
}

/// Pod j of node k: `veth-p<j>` in the node with the pod's gateways, `eth0`
/// in the pod with its addresses and default routes via the gateways.
fn make_pod(node: &Netns, ns_name: &str, pod_name: &str, k: usize, j: usize) -> Result<Pod> {
    crate::make_pod(
        node,
        ns_name,
        pod_name,
        &format!("veth-p{j}"),
        PodAddrs {
            ip: addr::pod_ip(k, j),
            gateway: addr::pod_gw(k, j),
            ip6: addr::pod_ip6(k, j),
            gateway6: addr::pod_gw6(k, j),
        },
    )
}

/// `web`, the cluster tests' exposed Service: type LoadBalancer, TCP 80 ->
/// 8080 (nodePort [`NODE_PORT`]) and UDP 53 -> 5353 (nodePort
/// [`NODE_PORT_UDP`]), cluster IP [`CLUSTER_IP`].
pub mod web {
    use std::net::Ipv4Addr;

    use super::Cluster;
    use crate::yaml;

    pub const NODE_PORT: u16 = 30080;
    pub const NODE_PORT_UDP: u16 = 30053;
    pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);

    /// The Service and its EndpointSlice, endpoints the backends `pods`
    /// (node, index); `extra` goes into the spec as is, `status` after it.
    pub fn manifest(
        cluster: &Cluster,
        pods: &[(usize, usize)],
        extra: &str,
        status: &str,
    ) -> String {
        let svc = format!(
            "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: LoadBalancer
  clusterIP: {CLUSTER_IP}
  selector:
    app: web
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: {NODE_PORT}
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 5353
    nodePort: {NODE_PORT_UDP}
{extra}{status}"
        );
        let slice = yaml::endpoint_slice_on_nodes(
            "web-1",
            "web",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            &cluster.endpoints(pods),
        );
        format!("{svc}---\n{slice}")
    }
}
