//! The loaded eBPF object, its pinned maps, and the interfaces it is
//! attached to. This is the only module that talks to the kernel's BPF
//! objects; everything it writes comes from `diff::MapOp`s.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::{fd::AsFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink,
    },
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, Cidr, Config, CtKey, CtValue, LAYOUT_VERSION,
    MAX_SERVICE_CIDRS, ServiceKey, ServiceValue, SourceRange, Traffic, defaults, map_names,
    program_names, stat,
};
use thiserror::Error;

use crate::{
    diff::MapOp,
    encode::{MapContents, RangeEntry, addr_from_map, addr_to_map},
    maglev::TableSpec,
    tables::MaglevTables,
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time
/// so the agent image is a single binary.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KEP_BPF_OBJECT"));

/// The cgroup socket hooks, all loaded with the object.
const SOCK_PROGRAMS: [&str; 4] = [
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
];

/// `statfs(2)` magic of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// Directory under a bpffs mount where the maps are pinned.
    pub bpffs: PathBuf,
    pub services_max: u32,
    pub backends_max: u32,
    pub conntrack_max: u32,
    /// Frontends that can have a Maglev table.
    pub maglev_max: u32,
    /// Service CIDRs (address, prefix length): traffic to an address inside
    /// that is no cluster IP is dropped; at most `MAX_SERVICE_CIDRS`.
    pub service_cidrs: Vec<(Ipv4Addr, u8)>,
    /// Source address given to hairpin flows (a pod reaching itself through
    /// a Service); `None` leaves them untranslated, which breaks them.
    pub hairpin_addr: Option<Ipv4Addr>,
    pub timeouts: CtTimeouts,
    /// How the XDP fast path is attached to node interfaces.
    pub xdp: XdpSetting,
}

/// How `kep_xdp_node` is attached to a node interface (beside the TC
/// program, which serves everything XDP passes on, so every choice is
/// correct and only the speed differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpSetting {
    /// Native mode on interfaces with a device of their own (NICs, falling
    /// back to generic), none on virtual ones (veth & co.): see
    /// [`XdpSetting::modes`].
    Auto,
    /// Native mode, falling back to generic.
    Native,
    Generic,
    /// No XDP: the TC program alone.
    Off,
}

impl std::str::FromStr for XdpSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(XdpSetting::Auto),
            "native" => Ok(XdpSetting::Native),
            "generic" => Ok(XdpSetting::Generic),
            "off" => Ok(XdpSetting::Off),
            other => Err(format!(
                "unknown XDP mode {other:?} (auto, native, generic, off)"
            )),
        }
    }
}

impl XdpSetting {
    /// The modes to try on `iface`, in order, and why the first.
    fn modes(self, iface: &str) -> (&'static [(XdpMode, &'static str)], String) {
        const NATIVE: (XdpMode, &str) = (XdpMode::Driver, "native");
        const GENERIC: (XdpMode, &str) = (XdpMode::Skb, "generic");
        match self {
            XdpSetting::Off => (&[], "--xdp-mode off".into()),
            XdpSetting::Generic => (&[GENERIC], "--xdp-mode generic".into()),
            XdpSetting::Native => (&[NATIVE, GENERIC], "--xdp-mode native".into()),
            XdpSetting::Auto => match crate::interfaces::driver_info(iface) {
                // A veth takes what native XDP sends back out (XDP_TX) only
                // when its peer runs XDP too, which the agent can neither
                // know nor arrange. Generic mode works, but gains little
                // (the skb exists already) and, like native mode on a veth,
                // cannot see that a packet from a local sender carries a
                // partial checksum (CHECKSUM_PARTIAL), which an in-place
                // rewrite would then break. TC handles both.
                Ok((driver, bus)) if bus.is_empty() => {
                    (&[], format!("virtual interface, driver {driver}: TC alone"))
                }
                Ok((driver, bus)) => (&[NATIVE, GENERIC], format!("driver {driver} at {bus}")),
                Err(e) => (&[NATIVE, GENERIC], format!("driver unknown: {e}")),
            },
        }
    }
}

/// Idle timeouts of conntrack entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtTimeouts {
    /// kube-proxy's --conntrack-tcp-timeout-established default.
    pub tcp_established: Duration,
    /// After a FIN or RST in either direction.
    pub tcp_closing: Duration,
    /// The kernel's nf_conntrack_udp_timeout.
    pub udp: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
        }
    }
}

/// kubeadm's default service CIDR, also kube-apiserver's.
pub const DEFAULT_SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// Link-local, so no pod or node can own it; Cilium uses the same.
pub const DEFAULT_HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

impl DatapathConfig {
    pub fn new(bpffs: impl Into<PathBuf>) -> Self {
        Self {
            bpffs: bpffs.into(),
            services_max: defaults::SERVICES_MAX,
            backends_max: defaults::BACKENDS_MAX,
            conntrack_max: defaults::CONNTRACK_MAX,
            maglev_max: defaults::MAGLEV_MAX,
            service_cidrs: vec![DEFAULT_SERVICE_CIDR],
            hairpin_addr: Some(DEFAULT_HAIRPIN_ADDR),
            timeouts: CtTimeouts::default(),
            xdp: XdpSetting::Auto,
        }
    }

    /// The config map entry for these settings; the socket hooks will
    /// translate sockets of the network namespace `netns_cookie` names.
    pub fn to_map(&self, netns_cookie: u64) -> Result<Config, DatapathError> {
        if self.service_cidrs.len() > MAX_SERVICE_CIDRS {
            return Err(DatapathError::Settings(format!(
                "{} service CIDRs given, at most {MAX_SERVICE_CIDRS} are supported",
                self.service_cidrs.len()
            )));
        }
        let mut cfg = Config::default();
        for (slot, (addr, len)) in cfg.service_cidrs.iter_mut().zip(&self.service_cidrs) {
            if *len > 32 {
                return Err(DatapathError::Settings(format!(
                    "service CIDR {addr}/{len}: prefix longer than 32"
                )));
            }
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            let mask = Ipv4Addr::from(mask);
            let net = Ipv4Addr::from(u32::from(*addr) & u32::from(mask));
            *slot = Cidr {
                addr: addr_to_map(net),
                mask: addr_to_map(mask),
            };
        }
        cfg.service_cidr_count = self.service_cidrs.len() as u32;
        cfg.hairpin_addr = self.hairpin_addr.map(addr_to_map).unwrap_or(0);
        cfg.netns_cookie = netns_cookie;
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        cfg.ct_tcp_established_ns = ns(self.timeouts.tcp_established);
        cfg.ct_tcp_closing_ns = ns(self.timeouts.tcp_closing);
        cfg.ct_udp_ns = ns(self.timeouts.udp);
        Ok(cfg)
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("bpffs at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object (pinned maps under {path}): {source}")]
    Load {
        path: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("invalid setting: {0}")]
    Settings(String),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("attaching the socket hooks to cgroup {path}: {source}")]
    AttachCgroup {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("attaching to interface {iface}: {source}")]
    Attach {
        iface: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

/// A map update that failed; the op was not applied.
#[derive(Debug)]
pub struct FailedOp {
    pub op: MapOp,
    pub error: MapError,
}

/// Which TC program an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A pod's veth: traffic from pods.
    Pod,
    /// The node's own interface: traffic from outside the node.
    Node,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Pod => program_names::TC_POD_INGRESS,
            Hook::Node => program_names::TC_NODE_INGRESS,
        }
    }

    fn pin_name(self, iface: &str) -> String {
        match self {
            Hook::Pod => format!("tc-ingress-{iface}"),
            Hook::Node => format!("tc-node-{iface}"),
        }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    svc_traffic: PerCpuHashMap<MapData, u32, Traffic>,
    backend_traffic: PerCpuHashMap<MapData, u32, Traffic>,
    stats: PerCpuArray<MapData, u64>,
    tables: MaglevTables,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    /// The node's own addresses as the datapath has them.
    node_addrs: HashMap<MapData, u32, u8>,
    /// Every endpoint's (address, port, protocol): the backends' values.
    endpoints: HashMap<MapData, Backend, u8>,
    /// The settings written to the config map, for conntrack expiry.
    settings: Config,
    /// What the maps hold, as last read or written by this process.
    live: MapContents,
    /// Interfaces (name -> ifindex, hook) whose pinned TC link runs this
    /// process's program.
    attached: BTreeMap<String, (u32, Hook)>,
    config: Array<MapData, Config>,
    bpffs: PathBuf,
    xdp: XdpSetting,
}

fn xdp_pin_name(iface: &str) -> String {
    format!("xdp-{iface}")
}

/// The egress program's link on `iface` (pod and node interfaces alike).
fn egress_pin_name(iface: &str) -> String {
    format!("tc-egress-{iface}")
}

/// Where this layout's maps are pinned under the agent's bpffs directory.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("maps-v{LAYOUT_VERSION}"))
}

/// Where the agent pins its links, so the programs stay attached (and the
/// datapath keeps serving) while no agent runs.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

impl Datapath {
    /// Loads the embedded object, creating the maps under `cfg.bpffs` or
    /// adopting the ones already pinned there (a restarted agent keeps the
    /// previous contents, so it only rewrites what differs).
    pub fn load(cfg: &DatapathConfig) -> Result<Self, DatapathError> {
        let netns_cookie = current_netns_cookie().map_err(|source| {
            DatapathError::Settings(format!("reading this network namespace's cookie: {source}"))
        })?;
        let settings = cfg.to_map(netns_cookie)?;
        ensure_bpffs(&cfg.bpffs)?;
        let maps = maps_dir(&cfg.bpffs);
        for dir in [&maps, &links_dir(&cfg.bpffs)] {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::Bpffs {
                path: dir.clone(),
                source,
            })?;
        }
        let pins: Vec<(&'static str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, maps.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::SERVICES, cfg.services_max)
            .map_max_entries(map_names::BACKENDS, cfg.backends_max)
            .map_max_entries(map_names::CONNTRACK, cfg.conntrack_max)
            .map_max_entries(map_names::MAGLEV, cfg.maglev_max);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(BPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                path: cfg.bpffs.clone(),
                source: Box::new(source),
            })?;
        for name in [
            program_names::TC_POD_INGRESS,
            program_names::TC_NODE_INGRESS,
            program_names::TC_EGRESS,
        ] {
            load_program(&mut ebpf, name, SchedClassifier::load)?;
        }
        load_program(&mut ebpf, program_names::XDP_NODE, Xdp::load)?;
        for name in SOCK_PROGRAMS {
            load_program(&mut ebpf, name, CgroupSockAddr::load)?;
        }
        let services = take_map(&mut ebpf, map_names::SERVICES)?;
        let backends = take_map(&mut ebpf, map_names::BACKENDS)?;
        let conntrack = take_map(&mut ebpf, map_names::CONNTRACK)?;
        let affinity = take_map(&mut ebpf, map_names::AFFINITY)?;
        let svc_traffic = take_traffic(&mut ebpf, map_names::SVC_TRAFFIC)?;
        let backend_traffic = take_traffic(&mut ebpf, map_names::BACKEND_TRAFFIC)?;
        let tables = MaglevTables::new(
            ebpf.take_map(map_names::MAGLEV)
                .ok_or(DatapathError::MissingMap(map_names::MAGLEV))?
                .try_into()
                .map_err(map_err(map_names::MAGLEV))?,
        );
        let source_ranges = ebpf
            .take_map(map_names::SOURCE_RANGES)
            .ok_or(DatapathError::MissingMap(map_names::SOURCE_RANGES))?
            .try_into()
            .map_err(map_err(map_names::SOURCE_RANGES))?;
        let node_addrs = take_map(&mut ebpf, map_names::NODE_ADDRS)?;
        let endpoints = take_map(&mut ebpf, map_names::ENDPOINTS)?;
        let stats = ebpf
            .take_map(map_names::STATS)
            .ok_or(DatapathError::MissingMap(map_names::STATS))?
            .try_into()
            .map_err(map_err(map_names::STATS))?;
        let mut config: Array<MapData, Config> = ebpf
            .take_map(map_names::CONFIG)
            .ok_or(DatapathError::MissingMap(map_names::CONFIG))?
            .try_into()
            .map_err(map_err(map_names::CONFIG))?;
        config
            .set(0, settings, 0)
            .map_err(map_err(map_names::CONFIG))?;
        let mut dp = Self {
            settings,
            ebpf,
            services,
            backends,
            conntrack,
            affinity,
            svc_traffic,
            backend_traffic,
            stats,
            tables,
            source_ranges,
            node_addrs,
            endpoints,
            live: MapContents::default(),
            attached: BTreeMap::new(),
            config,
            bpffs: cfg.bpffs.clone(),
            xdp: cfg.xdp,
        };
        dp.live = dp.read_contents()?;
        dp.sync_endpoints();
        Ok(dp)
    }

    /// Makes the endpoints map the set of the backends' (address, port,
    /// protocol). A write that fails is logged: only the tracking of
    /// connections straight to that endpoint suffers.
    fn sync_endpoints(&mut self) {
        let want: std::collections::BTreeSet<Backend> = self
            .live
            .backends
            .values()
            .map(|b| Backend::new(b.addr, b.port, b.proto))
            .collect();
        let have: std::collections::BTreeSet<Backend> =
            self.endpoints.keys().filter_map(Result::ok).collect();
        for gone in have.difference(&want) {
            if let Err(e) = ignore_missing(self.endpoints.remove(gone)) {
                tracing::warn!(error = %e, endpoint = ?gone, "removing an endpoint from kep_endpoints");
            }
        }
        for new in want.difference(&have) {
            if let Err(e) = self.endpoints.insert(new, 1, 0) {
                tracing::warn!(error = %e, endpoint = ?new, "kep_endpoints: direct connections to this endpoint are not tracked");
            }
        }
    }

    /// The pod-side TC program, for attaching elsewhere or `test_run`.
    pub fn classifier(&mut self) -> &mut SchedClassifier {
        self.hook_program(Hook::Pod)
    }

    /// The TC program of `hook`.
    pub fn hook_program(&mut self, hook: Hook) -> &mut SchedClassifier {
        self.tc_program(hook.program())
    }

    /// The egress program (what the node itself sends), for `test_run`.
    pub fn egress_program(&mut self) -> &mut SchedClassifier {
        self.tc_program(program_names::TC_EGRESS)
    }

    fn tc_program(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("checked in load")
    }

    /// Sets the source address masqueraded external flows get (the node's
    /// primary address); `None` makes such flows fail (counted).
    pub fn set_node_addr(&mut self, addr: Option<Ipv4Addr>) -> Result<(), DatapathError> {
        let node_addr = addr.map(addr_to_map).unwrap_or(0);
        if self.settings.node_addr == node_addr {
            return Ok(());
        }
        let settings = Config {
            node_addr,
            ..self.settings
        };
        self.config
            .set(0, settings, 0)
            .map_err(map_err(map_names::CONFIG))?;
        self.settings = settings;
        Ok(())
    }

    /// Makes the datapath's set of the node's own addresses `addrs` (every
    /// interface's, loopback's aside): an endpoint at one of them is the
    /// node itself, whose NodePort traffic is delivered locally without
    /// masquerade. Returns how many entries changed.
    pub fn set_node_addresses(&mut self, addrs: &[Ipv4Addr]) -> Result<usize, DatapathError> {
        let want: std::collections::BTreeSet<u32> = addrs
            .iter()
            .filter(|a| !a.is_loopback())
            .map(|a| addr_to_map(*a))
            .collect();
        let have: std::collections::BTreeSet<u32> =
            self.node_addrs.keys().filter_map(Result::ok).collect();
        for gone in have.difference(&want) {
            ignore_missing(self.node_addrs.remove(gone)).map_err(map_err(map_names::NODE_ADDRS))?;
        }
        for new in want.difference(&have) {
            self.node_addrs
                .insert(new, 1, 0)
                .map_err(map_err(map_names::NODE_ADDRS))?;
        }
        Ok(have.symmetric_difference(&want).count())
    }

    /// Attaches the TC program of `hook` at ingress of `iface` (index
    /// `ifindex`), and the egress program at its egress, each through a
    /// pinned TCX link. A link pinned by an earlier agent is adopted: its
    /// program is swapped for this one atomically, so traffic never sees a
    /// gap. Attaching twice is a no-op.
    pub fn attach(&mut self, iface: &str, ifindex: u32, hook: Hook) -> Result<(), DatapathError> {
        if self.attached.get(iface) == Some(&(ifindex, hook)) {
            return Ok(());
        }
        let links = links_dir(&self.bpffs);
        for (program, pin, direction) in [
            (hook.program(), hook.pin_name(iface), TcAttachType::Ingress),
            (
                program_names::TC_EGRESS,
                egress_pin_name(iface),
                TcAttachType::Egress,
            ),
        ] {
            self.attach_tc(iface, program, &links.join(pin), direction)
                .map_err(|source| DatapathError::Attach {
                    iface: iface.to_string(),
                    source,
                })?;
        }
        if hook == Hook::Node {
            self.attach_xdp(iface);
        }
        self.attached.insert(iface.to_string(), (ifindex, hook));
        Ok(())
    }

    /// `program` at `direction` of `iface` through the TCX link pinned at
    /// `pin`: adopted when an earlier agent left one, else made and pinned.
    fn attach_tc(
        &mut self,
        iface: &str,
        program: &str,
        pin: &Path,
        direction: TcAttachType,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let prog = self.tc_program(program);
        if !adopt_link(pin, prog.fd()?.as_fd()) {
            let id = prog.attach(iface, direction)?;
            pin_link(prog.take_link(id)?, pin)?;
        }
        Ok(())
    }

    /// The XDP fast path on a node interface, in the first mode of
    /// [`XdpSetting::modes`] the kernel accepts; a fallback or a failure is
    /// a warning, never fatal: the TC program, attached first, serves the
    /// interface alone.
    fn attach_xdp(&mut self, iface: &str) {
        let pin = links_dir(&self.bpffs).join(xdp_pin_name(iface));
        let (modes, why) = self.xdp.modes(iface);
        if modes.is_empty() {
            // An earlier agent's fast path goes with the setting.
            if std::fs::remove_file(&pin).is_ok() {
                tracing::info!(iface, "XDP fast path detached ({why})");
            } else {
                tracing::info!(iface, "no XDP fast path ({why})");
            }
            return;
        }
        let prog = self.xdp_program();
        if let Ok(fd) = prog.fd()
            && adopt_link(&pin, fd.as_fd())
        {
            return;
        }
        let mut failures = Vec::new();
        for &(mode, name) in modes {
            let attached = prog
                .attach(iface, mode)
                .map_err(|e| e.to_string())
                .and_then(|id| prog.take_link(id).map_err(|e| e.to_string()))
                .and_then(|link| pin_link(link, &pin).map_err(|e| e.to_string()));
            match attached {
                Ok(()) if failures.is_empty() => {
                    tracing::info!(iface, mode = name, "XDP fast path attached ({why})");
                    return;
                }
                Ok(()) => {
                    tracing::warn!(iface, mode = name, refused = %failures.join("; "), "XDP fast path attached in a fallback mode");
                    return;
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        tracing::warn!(iface, errors = %failures.join("; "), "no XDP fast path: the TC program serves this interface alone");
    }

    /// The node interfaces' XDP program, for attaching elsewhere or
    /// `test_run`.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(program_names::XDP_NODE)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Datapath::load")
    }

    /// Attaches the socket hooks to the cgroup v2 directory `path`: every
    /// process below it, in this network namespace, reaches Services by
    /// socket-level translation.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<(), DatapathError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::AttachCgroup {
            path: path.to_path_buf(),
            source,
        };
        let cgroup = std::fs::File::open(path).map_err(|e| err(Box::new(e)))?;
        // One pin per program and cgroup: a different cgroup next time is
        // attached afresh, not confused with this one.
        let tag: String = path
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let links = links_dir(&self.bpffs);
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .expect("checked in load");
            let pin = links.join(format!("cgroup-{name}-{tag}"));
            if adopt_link(&pin, prog.fd().map_err(|e| err(Box::new(e)))?.as_fd()) {
                continue;
            }
            // aya attaches through a BPF link where the kernel has them; a
            // link takes no attach flags (EINVAL otherwise) and never evicts
            // other programs (a CNI's) from the cgroup.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| err(Box::new(e)))?;
            let link = prog.take_link(id).map_err(|e| err(Box::new(e)))?;
            pin_link(link, &pin).map_err(err)?;
        }
        Ok(())
    }

    /// Whether `iface` with index `ifindex` runs this process's program of
    /// `hook`.
    pub fn is_attached(&self, iface: &str, ifindex: u32, hook: Hook) -> bool {
        self.attached.get(iface) == Some(&(ifindex, hook))
    }

    /// Forgets interfaces whose pinned link was detached behind the agent's
    /// back (`bpftool link detach`, another tool), so the next scan attaches
    /// them again. Returns their names.
    pub fn forget_detached(&mut self) -> Vec<String> {
        let links = links_dir(&self.bpffs);
        let dead: Vec<(String, Hook)> = self
            .attached
            .iter()
            .filter(|(iface, (_, hook))| {
                let live = |pin: String| matches!(link_ifindex(&links.join(pin)), Ok(Some(_)));
                // A node interface's XDP link counts too, when there is one.
                let xdp = xdp_pin_name(iface);
                !live(hook.pin_name(iface))
                    || !live(egress_pin_name(iface))
                    || (*hook == Hook::Node && links.join(&xdp).exists() && !live(xdp))
            })
            .map(|(iface, (_, hook))| (iface.clone(), *hook))
            .collect();
        for (iface, hook) in &dead {
            self.attached.remove(iface);
            for pin in [
                hook.pin_name(iface),
                egress_pin_name(iface),
                xdp_pin_name(iface),
            ] {
                let _ = std::fs::remove_file(links.join(pin));
            }
        }
        dead.into_iter().map(|(iface, _)| iface).collect()
    }

    /// Forgets interfaces that no longer exist, or exist under a new index
    /// (a pod went away, maybe another came under the same name): their TCX
    /// links died with them, and their pins are removed, so the new
    /// interface is attached afresh.
    pub fn forget_missing(&mut self, present: &[(String, u32)]) -> Vec<String> {
        let gone: Vec<(String, Hook)> = self
            .attached
            .iter()
            .filter(|(name, (index, _))| !present.iter().any(|(n, i)| n == *name && i == index))
            .map(|(name, (_, hook))| (name.clone(), *hook))
            .collect();
        for (iface, hook) in &gone {
            self.attached.remove(iface);
            if *hook == Hook::Node {
                // Its XDP link died with the interface too.
                let _ = std::fs::remove_file(links_dir(&self.bpffs).join(xdp_pin_name(iface)));
            }
            for pin in [hook.pin_name(iface), egress_pin_name(iface)] {
                let pin = links_dir(&self.bpffs).join(pin);
                if let Err(e) = std::fs::remove_file(&pin)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(pin = %pin.display(), error = %e, "removing a dead link's pin");
                }
            }
        }
        gone.into_iter().map(|(iface, _)| iface).collect()
    }

    /// Removes the maps of older layout versions. Call once this agent's
    /// programs are attached everywhere: until then, old programs still
    /// read them.
    pub fn retire_old_layouts(&self) -> io::Result<Vec<PathBuf>> {
        let current = maps_dir(&self.bpffs);
        let mut retired = Vec::new();
        for entry in std::fs::read_dir(&self.bpffs)? {
            let path = entry?.path();
            let is_layout = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("maps-v"));
            if is_layout && path != current {
                remove_pins(&path)?;
                retired.push(path);
            }
        }
        Ok(retired)
    }

    /// `svc_id`'s Maglev table as the datapath has it (backend id by
    /// position), `None` without one.
    pub fn maglev_table(&self, svc_id: u32) -> Result<Option<Vec<u32>>, DatapathError> {
        self.tables
            .table(svc_id)
            .map_err(map_err(map_names::MAGLEV))
    }

    /// What the maps hold, as far as this process knows.
    pub fn live(&self) -> &MapContents {
        &self.live
    }

    /// Reads the service and backend maps back from the kernel.
    pub fn read_contents(&self) -> Result<MapContents, DatapathError> {
        let mut contents = MapContents::default();
        for item in self.services.iter() {
            let (k, v) = item.map_err(map_err(map_names::SERVICES))?;
            contents.services.insert(k, v);
        }
        for item in self.backends.iter() {
            let (k, v) = item.map_err(map_err(map_names::BACKENDS))?;
            contents.backends.insert(k, v);
        }
        contents.tables = self
            .tables
            .read_all(&self.live.tables)
            .map_err(map_err(map_names::MAGLEV))?;
        for key in self.source_ranges.keys() {
            let key = key.map_err(map_err(map_names::SOURCE_RANGES))?;
            let data = key.data();
            contents.source_ranges.insert(RangeEntry {
                svc_id: u32::from_be(data.svc_id_be),
                addr: addr_from_map(data.addr),
                prefix_len: key.prefix_len().saturating_sub(SourceRange::SVC_BITS) as u8,
            });
        }
        Ok(contents)
    }

    /// Re-reads the maps, so the next diff is against what the kernel
    /// really holds (someone may have edited a map by hand; a Maglev table
    /// this process wrote is only checked to still be there).
    pub fn refresh_live(&mut self) -> Result<(), DatapathError> {
        self.live = self.read_contents()?;
        Ok(())
    }

    /// Applies `ops` in order. An op that fails is reported and skipped; the
    /// rest still apply, so one bad entry (a full map) never blocks every
    /// other service. `live` follows exactly what succeeded.
    pub fn apply(&mut self, ops: &[MapOp]) -> Vec<FailedOp> {
        let mut failed = Vec::new();
        // Tables of a run of PutTable ops are built a chunk at a time on all
        // cores; a chunk bounds the memory they take (64 KiB each).
        const TABLE_CHUNK: usize = 64;
        let mut built: std::collections::VecDeque<Vec<u32>> = Default::default();
        for (i, op) in ops.iter().enumerate() {
            if matches!(op, MapOp::PutTable(..)) && built.is_empty() {
                let specs: Vec<&TableSpec> = ops[i..]
                    .iter()
                    .map_while(|op| match op {
                        MapOp::PutTable(_, spec) => Some(spec),
                        _ => None,
                    })
                    .take(TABLE_CHUNK)
                    .collect();
                built.extend(crate::maglev::build_all(&specs));
            }
            let result = match op {
                MapOp::PutBackend(id, b) => self.backends.insert(id, b, 0).map(|()| {
                    self.live.backends.insert(*id, *b);
                }),
                MapOp::PutService(k, v) => self.services.insert(k, v, 0).map(|()| {
                    self.live.services.insert(*k, *v);
                }),
                MapOp::DeleteService(k) => ignore_missing(self.services.remove(k)).map(|()| {
                    if let Some(gone) = self.live.services.remove(k)
                        && k.slot == 0
                        && gone.svc_id != 0
                    {
                        // Its id may be handed to another frontend: its
                        // counters must not carry over.
                        let _ = self.svc_traffic.remove(&gone.svc_id);
                    }
                }),
                MapOp::DeleteBackend(id) => ignore_missing(self.backends.remove(id)).map(|()| {
                    self.live.backends.remove(id);
                    let _ = self.backend_traffic.remove(id);
                }),
                MapOp::PutTable(svc_id, spec) => {
                    let table = built.pop_front().unwrap_or_else(|| spec.build());
                    self.tables.put(*svc_id, spec, &table).map(|()| {
                        self.live.tables.insert(*svc_id, spec.clone());
                    })
                }
                MapOp::DeleteTable(svc_id) => {
                    ignore_missing(self.tables.delete(*svc_id)).map(|()| {
                        self.live.tables.remove(svc_id);
                    })
                }
                MapOp::PutSourceRange(r) => {
                    self.source_ranges.insert(&range_key(r), 1, 0).map(|()| {
                        self.live.source_ranges.insert(*r);
                    })
                }
                MapOp::DeleteSourceRange(r) => {
                    ignore_missing(self.source_ranges.remove(&range_key(r))).map(|()| {
                        self.live.source_ranges.remove(r);
                    })
                }
            };
            if let Err(error) = result {
                failed.push(FailedOp {
                    op: op.clone(),
                    error,
                });
            }
        }
        if ops
            .iter()
            .any(|op| matches!(op, MapOp::PutBackend(..) | MapOp::DeleteBackend(_)))
        {
            self.sync_endpoints();
        }
        failed
    }

    /// Datapath counters summed over CPUs, indexed by `proxy_common::stat`.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], DatapathError> {
        sum_stats(&self.stats)
    }

    /// Packets and bytes per frontend (svc id) and per backend id, summed
    /// over CPUs.
    pub fn traffic(&self) -> (BTreeMap<u32, Traffic>, BTreeMap<u32, Traffic>) {
        (
            sum_traffic(&self.svc_traffic),
            sum_traffic(&self.backend_traffic),
        )
    }

    /// Every conntrack entry (for inspection and tests).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        self.conntrack
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::CONNTRACK))
    }

    /// Deletes conntrack entries idle past their timeout (the datapath
    /// already ignores them; this frees their space). Returns how many.
    pub fn collect_conntrack(&mut self) -> Result<usize, DatapathError> {
        let now = monotonic_ns();
        let settings = self.settings;
        self.delete_conntrack(|k, v| v.expired(k, &settings, now))
    }

    /// Deletes at once the UDP flows of backends that were removed, so a
    /// client's next datagram is balanced to a live endpoint (kube-proxy's
    /// UDP stale-flow cleanup; stale UDP state is what black-holes DNS).
    /// TCP flows are left to end or expire. Returns how many entries.
    pub fn forget_udp_backends(&mut self, gone: &[Backend]) -> Result<usize, DatapathError> {
        let gone: Vec<&Backend> = gone
            .iter()
            .filter(|b| b.proto == proxy_common::proto::UDP)
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.delete_conntrack(|k, v| {
            gone.iter().any(|b| {
                k.proto == b.proto
                    && if v.is_reply() {
                        k.saddr == b.addr && k.sport == b.port
                    } else {
                        v.nat_addr == b.addr && v.nat_port == b.port
                    }
            })
        })
    }

    /// Deletes session-affinity entries that no longer hold: the frontend
    /// is gone or lost its affinity, or the endpoint left it (the datapath
    /// only checks that the backend still exists somewhere). Returns how
    /// many.
    pub fn prune_affinity(&mut self) -> Result<usize, DatapathError> {
        let mut valid: std::collections::HashMap<u32, std::collections::HashSet<u32>> =
            std::collections::HashMap::new();
        for (key, value) in &self.live.services {
            if key.slot == 0 && value.affinity_timeout_s != 0 {
                let backends = (1..=value.count)
                    .filter_map(|slot| self.live.services.get(&key.with_slot(slot)))
                    .map(|v| v.backend_id)
                    .collect();
                valid.insert(value.svc_id, backends);
            }
        }
        Ok(delete_where(&mut self.affinity, |k, v| {
            !valid
                .get(&k.svc_id)
                .is_some_and(|b| b.contains(&v.backend_id))
        }))
    }

    /// Deletes every conntrack entry: established flows are chosen anew at
    /// their next packet (for tests and benchmarks that need a clean table).
    pub fn flush_conntrack(&mut self) -> Result<usize, DatapathError> {
        self.delete_conntrack(|_, _| true)
    }

    fn delete_conntrack(
        &mut self,
        doomed: impl Fn(&CtKey, &CtValue) -> bool,
    ) -> Result<usize, DatapathError> {
        Ok(delete_where(&mut self.conntrack, doomed))
    }
}

/// The trie key of one allowed prefix: the svc id matched whole, then the
/// prefix's own length of the address.
fn range_key(r: &RangeEntry) -> lpm_trie::Key<SourceRange> {
    lpm_trie::Key::new(
        SourceRange::SVC_BITS + u32::from(r.prefix_len),
        SourceRange {
            svc_id_be: r.svc_id.to_be(),
            addr: addr_to_map(r.addr),
        },
    )
}

/// Deletes the entries of `map` that `doomed` picks; returns how many went.
/// An entry already gone (LRU eviction, a concurrent delete) is fine.
fn delete_where<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    doomed: impl Fn(&K, &V) -> bool,
) -> usize {
    let keys: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| doomed(k, v))
        .map(|(k, _)| k)
        .collect();
    keys.iter()
        .filter(|key| ignore_missing(map.remove(key)).is_ok())
        .count()
}

/// A per-CPU traffic map's entries, summed over CPUs.
pub fn sum_traffic(map: &PerCpuHashMap<MapData, u32, Traffic>) -> BTreeMap<u32, Traffic> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(id, per_cpu)| {
            let total = per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets + t.packets,
                bytes: a.bytes + t.bytes,
            });
            (id, total)
        })
        .collect()
}

fn take_traffic(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuHashMap<MapData, u32, Traffic>, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::MissingMap(name))?
        .try_into()
        .map_err(map_err(name))
}

fn sum_stats(
    stats: &PerCpuArray<MapData, u64>,
) -> Result<[u64; stat::COUNT as usize], DatapathError> {
    let mut out = [0u64; stat::COUNT as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let per_cpu = stats
            .get(&(i as u32), 0)
            .map_err(map_err(map_names::STATS))?;
        *slot = per_cpu.iter().sum();
    }
    Ok(out)
}

/// Loads program `name` of type `P` into the kernel (aya gives the types'
/// `load` no common trait, hence the function argument).
fn load_program<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    load: fn(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> Result<(), DatapathError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut P = ebpf
        .program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: Box::new(aya::programs::ProgramError::NotLoaded),
        })?
        .try_into()
        .map_err(|e| program_err(name, e))?;
    load(prog).map_err(|e| program_err(name, e))
}

fn program_err(name: &'static str, source: aya::programs::ProgramError) -> DatapathError {
    DatapathError::Program {
        name,
        source: Box::new(source),
    }
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::MissingMap(name))?
        .try_into()
        .map_err(map_err(name))
}

/// Deleting what is already gone is success: the goal state is reached.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Makes sure `dir` exists on a bpffs mount, mounting bpffs on its parent
/// when that parent is not one yet (a fresh node, or a container without the
/// host's /sys/fs/bpf).
pub fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Bpffs {
        path: dir.to_path_buf(),
        source,
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent).map_err(err)? {
        std::fs::create_dir_all(parent).map_err(err)?;
        mount_bpffs(parent).map_err(err)?;
        tracing::info!(path = %parent.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(err)
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    let fstype = c"bpf";
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes everything the agent pinned under `dir` (links first, so the
/// programs detach, then every layout's maps), and `dir` itself once empty.
/// Only names the agent creates are touched, so a `--bpffs` pointing at a
/// shared directory loses nothing else. Idempotent.
pub fn unpin_all(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut layouts = Vec::new();
    for entry in entries {
        let path = entry?.path();
        match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.starts_with("maps-v") => layouts.push(path),
            _ => {}
        }
    }
    remove_pins(&links_dir(dir))?;
    for layout in layouts {
        remove_pins(&layout)?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Unpins the agent's objects in one of its directories (links, or one
/// layout's maps), then removes the directory.
fn remove_pins(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            ["tc-ingress-", "tc-node-", "tc-egress-", "xdp-", "cgroup-"]
                .iter()
                .any(|prefix| n.starts_with(prefix))
                || map_names::ALL.contains(&n)
        });
        if ours {
            std::fs::remove_file(&path)?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Pins a link just made (a TCX or cgroup link) at `pin`, so it outlives this
/// process and the next agent can adopt it.
fn pin_link<L>(link: L, pin: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let link = FdLink::try_from(link)?;
    link.pin(pin)?;
    Ok(())
}

/// Adopts the link pinned at `pin` by pointing it at `prog` (the kernel's
/// BPF_LINK_UPDATE swaps the program atomically, so packets never see a
/// moment without one). `false` when there is nothing to adopt: no pin, or a
/// pin whose link is defunct (its interface is gone), which is removed so a
/// fresh attach can take its place.
fn adopt_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> bool {
    if !pin.exists() {
        return false;
    }
    match update_pinned_link(pin, prog) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "pinned link not adoptable; attaching afresh");
            let _ = std::fs::remove_file(pin);
            false
        }
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The link pinned at `pin`, opened.
fn open_pinned_link(pin: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // The leading fields of `union bpf_attr` for BPF_OBJ_GET; the kernel
    // zero-fills the rest.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf_syscall(BPF_OBJ_GET, &get)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The agent's pinned links (TC and XDP hooks) by pin name, with the
/// interface each runs on (`None`: detached, its interface gone).
pub fn pinned_links(bpffs: &Path) -> io::Result<BTreeMap<String, Option<u32>>> {
    let mut links = BTreeMap::new();
    for entry in std::fs::read_dir(links_dir(bpffs))? {
        let entry = entry?;
        let ifindex = link_ifindex(&entry.path()).unwrap_or(None);
        links.insert(entry.file_name().to_string_lossy().into_owned(), ifindex);
    }
    Ok(links)
}

/// The interface a pinned TCX or XDP link is attached to; `None` once it
/// has been detached (the kernel reports ifindex 0 for a defunct link).
fn link_ifindex(pin: &Path) -> io::Result<Option<u32>> {
    use std::os::fd::AsRawFd;
    let link = open_pinned_link(pin)?;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the
    // per-type union, whose tcx and xdp members start with the ifindex.
    let mut info = [0u64; 16];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    let ifindex = (info[2] & 0xffff_ffff) as u32;
    Ok((ifindex != 0).then_some(ifindex))
}

fn update_pinned_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = open_pinned_link(pin)?;
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf_syscall(BPF_LINK_UPDATE, &update).map(|_| ())
}

/// `bpf(cmd, attr, sizeof attr)`; `attr` is the leading part of the
/// command's `union bpf_attr` (the kernel zero-fills the rest).
pub(crate) fn bpf_syscall<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie `bpf_get_netns_cookie` returns
/// for sockets of the caller's network namespace.
fn current_netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let result = if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    };
    unsafe { libc::close(fd) };
    result
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
