//! The loaded eBPF object, its pinned maps, and the interfaces it is
//! attached to. This is the only module that talks to the kernel's BPF
//! objects; everything it writes comes from `diff::MapOp`s.

mod bpffs;
mod family6;
mod hooks;
mod pins;
mod resize;
mod served;
mod upkeep;

pub use bpffs::{BPFFS_MOUNT, DirError, DirLock, ensure_dir};
pub use hooks::{Hook, Hooks, PINS, Pin, Unverified};
pub use pins::{cleanup, links_dir, maps_dir, pinned_links, unpin_all};
pub use resize::capacity_flag;
pub use upkeep::{CtSweep, Upkeep, sum_traffic};

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::XdpMode,
};
use proxy_common::{
    Backend, CONFIG_FLAG_FAST_PATH, Cidr6, Config, Config6, MAX_SERVICE_CIDRS, ServiceKey,
    ServiceValue, SourceRange, Traffic, defaults, map_names, program_names,
};
use thiserror::Error;

use crate::{
    capacity::Capacity,
    contents::{
        MapAddr, MapContents, RangeEntry, addr_to_map, addr6_to_map, backend4, cidr_to_map,
        cidr6_to_map, svc_key4,
    },
    diff::MapOp,
    maglev::TableSpec,
    model::{IpCidr, Ipv4Cidr},
    tables::MaglevTables,
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time
/// so the agent image is a single binary.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KEP_BPF_OBJECT"));

/// The cgroup socket hooks, all loaded with the object.
pub(super) const SOCK_PROGRAMS: [&str; 8] = [
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
    program_names::SOCK_CONNECT6,
    program_names::SOCK_SENDMSG6,
    program_names::SOCK_RECVMSG6,
    program_names::SOCK_GETPEERNAME6,
];

#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// Directory under a bpffs mount where the maps are pinned.
    pub bpffs: PathBuf,
    pub services_max: u32,
    pub backends_max: u32,
    /// TCP conntrack entries (two per flow).
    pub conntrack_max: u32,
    /// Conntrack entries of every other protocol (two per flow).
    pub conntrack_other_max: u32,
    /// Frontends that can have a Maglev table.
    pub maglev_max: u32,
    /// loadBalancerSourceRanges entries.
    pub source_ranges_max: u32,
    /// Service CIDRs: traffic to an address inside that is no cluster IP
    /// is dropped; at most `MAX_SERVICE_CIDRS`.
    pub service_cidrs: Vec<Ipv4Cidr>,
    /// The IPv6 service CIDRs, likewise (IPv4 ones here are ignored).
    pub service_cidrs6: Vec<IpCidr>,
    /// Source address given to hairpin flows (a pod reaching itself through
    /// a Service); `None` leaves them untranslated, which breaks them.
    pub hairpin_addr: Option<Ipv4Addr>,
    pub timeouts: CtTimeouts,
    /// How the XDP fast path is attached to node interfaces.
    pub xdp: XdpSetting,
    /// Service flows between pods delivered past the host's routing and
    /// netfilter (see `proxy-ebpf/src/fast.rs`).
    pub fast_path: bool,
    /// REJECT answers to one client: at most one per interval on average,
    /// with a burst (the kernel's `icmp_ratelimit`); `None`: no limit.
    pub reject_limit: Option<RejectLimit>,
}

/// The rate of REJECT answers to one client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectLimit {
    pub interval: Duration,
    pub burst: u32,
}

impl RejectLimit {
    /// The kernel's: `net.ipv4.icmp_ratelimit` (1000 ms) between answers
    /// to one destination, a burst of 6 (`XRLIM_BURST_FACTOR`).
    pub const KERNEL_DEFAULT: RejectLimit = RejectLimit {
        interval: Duration::from_millis(1000),
        burst: 6,
    };

    /// The node's own setting (`/proc/sys/net/ipv4/icmp_ratelimit`, in
    /// milliseconds; 0 turns limiting off), or the kernel's default where
    /// it cannot be read.
    pub fn of_node() -> Option<RejectLimit> {
        let ms = std::fs::read_to_string("/proc/sys/net/ipv4/icmp_ratelimit")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        match ms {
            Some(0) => None,
            Some(ms) => Some(RejectLimit {
                interval: Duration::from_millis(ms),
                ..Self::KERNEL_DEFAULT
            }),
            None => Some(Self::KERNEL_DEFAULT),
        }
    }
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
    /// After an RST, or a FIN from both sides.
    pub tcp_closing: Duration,
    /// The kernel's nf_conntrack_udp_timeout.
    pub udp: Duration,
    /// A TCP (or SCTP) flow that has seen no reply: netfilter's
    /// nf_conntrack_tcp_timeout_syn_sent.
    pub tcp_syn_sent: Duration,
    /// A FIN from one side only (half-closed): kube-proxy's
    /// --conntrack-tcp-timeout-close-wait default.
    pub tcp_close_wait: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            tcp_syn_sent: Duration::from_secs(120),
            tcp_close_wait: Duration::from_secs(3600),
        }
    }
}

/// kubeadm's default service CIDR, also kube-apiserver's.
pub const DEFAULT_SERVICE_CIDR: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 96, 0, 0),
    prefix_len: 12,
};
/// Link-local, so no pod or node can own it; Cilium uses the same.
pub const DEFAULT_HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

impl DatapathConfig {
    pub fn new(bpffs: impl Into<PathBuf>) -> Self {
        Self {
            bpffs: bpffs.into(),
            services_max: defaults::SERVICES_MAX,
            backends_max: defaults::BACKENDS_MAX,
            conntrack_max: defaults::CONNTRACK_MAX,
            conntrack_other_max: defaults::CONNTRACK_OTHER_MAX,
            maglev_max: defaults::MAGLEV_MAX,
            source_ranges_max: defaults::SOURCE_RANGES_MAX,
            service_cidrs: vec![DEFAULT_SERVICE_CIDR],
            service_cidrs6: Vec::new(),
            hairpin_addr: Some(DEFAULT_HAIRPIN_ADDR),
            timeouts: CtTimeouts::default(),
            xdp: XdpSetting::Auto,
            fast_path: true,
            reject_limit: Some(RejectLimit::KERNEL_DEFAULT),
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
        for (slot, cidr) in cfg.service_cidrs.iter_mut().zip(&self.service_cidrs) {
            *slot = cidr_to_map(*cidr);
        }
        cfg.service_cidr_count = self.service_cidrs.len() as u32;
        cfg.hairpin_addr = self.hairpin_addr.map(addr_to_map).unwrap_or(0);
        cfg.netns_cookie = netns_cookie;
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        cfg.ct_tcp_established_ns = ns(self.timeouts.tcp_established);
        cfg.ct_tcp_closing_ns = ns(self.timeouts.tcp_closing);
        cfg.ct_udp_ns = ns(self.timeouts.udp);
        cfg.ct_tcp_syn_sent_ns = ns(self.timeouts.tcp_syn_sent);
        cfg.ct_tcp_close_wait_ns = ns(self.timeouts.tcp_close_wait);
        if self.fast_path {
            cfg.flags |= CONFIG_FLAG_FAST_PATH;
        }
        if let Some(limit) = self.reject_limit {
            // Bounded so that interval x burst never overflows in the
            // datapath.
            cfg.reject_interval_ns = ns(limit.interval).clamp(1, 3_600_000_000_000);
            cfg.reject_burst = limit.burst.clamp(1, 1_000);
        }
        Ok(cfg)
    }

    /// The IPv6 config map entry for these settings.
    pub fn to_map6(&self) -> Result<Config6, DatapathError> {
        let cidrs: Vec<Cidr6> = self
            .service_cidrs6
            .iter()
            .filter_map(cidr6_to_map)
            .collect();
        if cidrs.len() > MAX_SERVICE_CIDRS {
            return Err(DatapathError::Settings(format!(
                "{} IPv6 service CIDRs given, at most {MAX_SERVICE_CIDRS} are supported",
                cidrs.len()
            )));
        }
        let mut cfg = Config6::default();
        for (slot, cidr) in cfg.service_cidrs.iter_mut().zip(&cidrs) {
            *slot = *cidr;
        }
        cfg.service_cidr_count = cidrs.len() as u32;
        Ok(cfg)
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("--bpffs {path}: {source}")]
    Bpffs { path: PathBuf, source: DirError },
    #[error(
        "an agent{} is running on {path}: stop it first, or pass --force to remove its \
         datapath from under it (it will pin everything again)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { path: PathBuf, holder: Option<u32> },
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

pub(super) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

/// A map update that was not applied.
#[derive(Debug)]
pub struct FailedOp {
    pub op: MapOp,
    pub error: OpError,
}

#[derive(Debug, Error)]
pub enum OpError {
    #[error(transparent)]
    Map(#[from] MapError),
    /// Skipped: an op it depends on failed, so applying it would point the
    /// datapath at something missing (or delete what is still used).
    #[error("skipped: {0}")]
    Dependency(&'static str),
}

impl FailedOp {
    /// The map and the flag that sizes it, when the write failed because
    /// the map is full (a hash map answers E2BIG, an LPM trie ENOSPC).
    pub fn full_map(&self) -> Option<(&'static str, &'static str)> {
        let OpError::Map(MapError::SyscallError(e)) = &self.error else {
            return None;
        };
        let errno = e.io_error.raw_os_error()?;
        if errno != libc::E2BIG && errno != libc::ENOSPC {
            return None;
        }
        match self.op {
            MapOp::PutService(..) => Some((map_names::SERVICES, "--services-max")),
            MapOp::PutBackend(..) => Some((map_names::BACKENDS, "--backends-max")),
            MapOp::PutTable(..) => Some((map_names::MAGLEV, "--maglev-max")),
            MapOp::PutSourceRange(..) => Some((map_names::SOURCE_RANGES, "--source-ranges-max")),
            _ => None,
        }
    }
}

/// The maps the control plane writes, and what this process knows they
/// hold; with the pins and the directory's lock. The programs that read
/// them are [`Hooks`]; the maps the programs write are [`Upkeep`]'s.
pub struct Datapath {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    /// Per-id counters, cleared when an id is freed (it may be handed to
    /// another frontend or endpoint).
    svc_traffic: PerCpuArray<MapData, Traffic>,
    backend_traffic: PerCpuArray<MapData, Traffic>,
    tables: MaglevTables,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    /// The node's own addresses as the datapath has them.
    node_addrs: HashMap<MapData, u32, u8>,
    /// Every endpoint's (address, port, protocol): the backends' values.
    endpoints: HashMap<MapData, Backend, u8>,
    /// The IPv6 twins of the frontend maps.
    v6: family6::Maps6,
    /// The served filter's map, and its bits' counts.
    served_map: Array<MapData, proxy_common::served::Chunk>,
    served: served::ServedFilter,
    /// The settings written to the config map, for conntrack expiry.
    settings: Config,
    /// What the maps hold, as last read or written by this process.
    live: MapContents,
    /// Every pinned map by name, to pin again if its pin is removed.
    pinned: Vec<(&'static str, MapData)>,
    /// Every map's real `max_entries`, by name (an adopted map keeps the
    /// size it was made with).
    max_entries: BTreeMap<&'static str, u32>,
    config: Array<MapData, Config>,
    bpffs: PathBuf,
    /// This agent's hold on `bpffs`.
    lock: DirLock,
}

impl Datapath {
    /// Loads the embedded object: its maps ([`Datapath::load_maps`]) and
    /// its programs, verified.
    pub fn load(cfg: &DatapathConfig) -> Result<(Self, Upkeep, Hooks), DatapathError> {
        let (datapath, upkeep, programs) = Self::load_maps(cfg)?;
        Ok((datapath, upkeep, programs.verify()?))
    }

    /// Loads the embedded object, creating the maps under `cfg.bpffs` or
    /// adopting the ones already pinned there (a restarted agent keeps the
    /// previous contents, so it only rewrites what differs). The programs
    /// are not verified yet ([`Unverified::verify`]): the verifier is most
    /// of the agent's start, and nothing but attaching needs it done, so
    /// the agent runs it while it reads its source and writes the maps.
    pub fn load_maps(cfg: &DatapathConfig) -> Result<(Self, Upkeep, Unverified), DatapathError> {
        if BPF_OBJECT.is_empty() {
            return Err(DatapathError::Settings(
                "this agent was built without its eBPF object (run `cargo xtask build-ebpf`, \
                 then build the agent again)"
                    .into(),
            ));
        }
        let netns_cookie = current_netns_cookie().map_err(|source| {
            DatapathError::Settings(format!("reading this network namespace's cookie: {source}"))
        })?;
        let settings = cfg.to_map(netns_cookie)?;
        let settings6 = cfg.to_map6()?;
        ensure_dir(&cfg.bpffs)?;
        // Before anything is pinned or attached: a second agent here
        // would undo this one's writes at every sync.
        let lock = DirLock::acquire(&cfg.bpffs)?;
        let maps = maps_dir(&cfg.bpffs);
        for dir in [&maps, &links_dir(&cfg.bpffs)] {
            bpffs::ensure_subdir(dir)?;
        }
        // Maps pinned with other sizes get new ones, filled below.
        let resized = resize::find(&maps, cfg)?;
        let pins: Vec<(&'static str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| match resized.iter().any(|r| r.name == *name) {
                true => (*name, resize::staging_pin(&maps, name)),
                false => (*name, maps.join(name)),
            })
            .collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::SERVICES, cfg.services_max)
            .map_max_entries(map_names::BACKENDS, cfg.backends_max)
            .map_max_entries(map_names::CONNTRACK_TCP, cfg.conntrack_max)
            .map_max_entries(map_names::CONNTRACK_OTHER, cfg.conntrack_other_max)
            .map_max_entries(map_names::MAGLEV, cfg.maglev_max)
            .map_max_entries(map_names::SOURCE_RANGES, cfg.source_ranges_max);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(BPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                path: cfg.bpffs.clone(),
                source: Box::new(source),
            })?;
        let services = take_map(&mut ebpf, map_names::SERVICES)?;
        let backends = take_map(&mut ebpf, map_names::BACKENDS)?;
        let conntrack_tcp = take_map(&mut ebpf, map_names::CONNTRACK_TCP)?;
        let conntrack_other = take_map(&mut ebpf, map_names::CONNTRACK_OTHER)?;
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
        let v6 = family6::Maps6::take(&mut ebpf)?;
        let served_map = ebpf
            .take_map(map_names::SERVED)
            .ok_or(DatapathError::MissingMap(map_names::SERVED))?
            .try_into()
            .map_err(map_err(map_names::SERVED))?;
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
        // Left in the object (the programs' loads need its fd open).
        let mut config6: Array<&mut MapData, Config6> = ebpf
            .map_mut(map_names::CONFIG6)
            .ok_or(DatapathError::MissingMap(map_names::CONFIG6))?
            .try_into()
            .map_err(map_err(map_names::CONFIG6))?;
        config6
            .set(0, settings6, 0)
            .map_err(map_err(map_names::CONFIG6))?;
        let pinned: Vec<(&'static str, MapData)> = pins
            .iter()
            .map(|(name, path)| Ok((*name, MapData::from_pin(path).map_err(map_err(name))?)))
            .collect::<Result<_, DatapathError>>()?;
        let max_entries: BTreeMap<&'static str, u32> = pinned
            .iter()
            .map(|(name, map)| Ok((*name, map.info().map_err(map_err(name))?.max_entries())))
            .collect::<Result<_, DatapathError>>()?;
        let capacity = |name| max_entries.get(name).copied().unwrap_or(0);
        let mut upkeep = Upkeep {
            conntrack: [
                (
                    map_names::CONNTRACK_TCP,
                    conntrack_tcp,
                    capacity(map_names::CONNTRACK_TCP),
                ),
                (
                    map_names::CONNTRACK_OTHER,
                    conntrack_other,
                    capacity(map_names::CONNTRACK_OTHER),
                ),
            ],
            old_conntrack: Vec::new(),
            affinity,
            stats,
            settings,
        };
        let mut dp = Self {
            settings,
            services,
            backends,
            svc_traffic,
            backend_traffic,
            tables,
            source_ranges,
            node_addrs,
            endpoints,
            v6,
            served: served::ServedFilter::adopt(&served_map),
            served_map,
            live: MapContents::default(),
            pinned,
            max_entries,
            config,
            bpffs: cfg.bpffs.clone(),
            lock,
        };
        dp.live = dp.read_contents()?;
        if !resized.is_empty() {
            dp.migrate(resized, &mut upkeep)?;
            dp.live = dp.read_contents()?;
        }
        dp.sync_endpoints();
        dp.rebuild_served();
        Ok((dp, upkeep, Unverified::new(ebpf, cfg)))
    }

    /// The served filter made from `live` again, and written whole (after
    /// `live` was read from the maps rather than kept op by op).
    fn rebuild_served(&mut self) {
        self.served = served::ServedFilter::of(&self.live, &self.served_map);
        self.served.flush(&mut self.served_map);
    }

    /// Makes the endpoints map the set of the backends' (address, port,
    /// protocol). A write that fails is logged: only the tracking of
    /// connections straight to that endpoint suffers.
    fn sync_endpoints(&mut self) {
        let mut want4 = std::collections::BTreeSet::new();
        let mut want6 = std::collections::BTreeSet::new();
        for b in self.live.backends.values() {
            match b.addr {
                MapAddr::V4(a) => want4.insert(Backend::new(a, b.port, b.proto)),
                MapAddr::V6(a) => want6.insert(proxy_common::Backend6::new(a, b.port, b.proto)),
            };
        }
        if let Err(e) = family6::sync_set(&mut self.endpoints, &want4) {
            tracing::warn!(error = %e, "kep_endpoints: direct connections to some endpoints are not tracked");
        }
        if let Err(e) = family6::sync_set(&mut self.v6.endpoints, &want6) {
            tracing::warn!(error = %e, "kep_endpoints6: direct connections to some endpoints are not tracked");
        }
    }

    /// Makes the datapath's set of the node's own addresses `addrs` (every
    /// interface's, loopback's aside): an endpoint at one of them is the
    /// node itself, whose NodePort traffic is delivered locally without
    /// masquerade. Returns how many entries changed.
    pub fn set_node_addresses(&mut self, addrs: &[IpAddr]) -> Result<usize, DatapathError> {
        let mut want4 = std::collections::BTreeSet::new();
        let mut want6 = std::collections::BTreeSet::new();
        for addr in addrs.iter().filter(|a| !a.is_loopback()) {
            match addr {
                IpAddr::V4(a) => want4.insert(addr_to_map(*a)),
                IpAddr::V6(a) => want6.insert(addr6_to_map(*a)),
            };
        }
        let changed = family6::sync_set(&mut self.node_addrs, &want4)
            .map_err(map_err(map_names::NODE_ADDRS))?;
        let changed6 = family6::sync_set(&mut self.v6.node_addrs, &want6)
            .map_err(map_err(map_names::NODE_ADDRS6))?;
        Ok(changed + changed6)
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

    /// `svc_id`'s Maglev table as the datapath has it (backend id by
    /// position), `None` without one.
    pub fn maglev_table(&self, svc_id: u32) -> Result<Option<Vec<u32>>, DatapathError> {
        self.tables
            .table(svc_id)
            .map_err(map_err(map_names::MAGLEV))
    }

    /// `max_entries` of map `name` as the kernel has it.
    pub fn max_entries(&self, name: &str) -> u32 {
        self.max_entries.get(name).copied().unwrap_or(0)
    }

    /// The real capacity of the maps the agent writes.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            services: self.max_entries(map_names::SERVICES),
            backends: self.max_entries(map_names::BACKENDS),
            tables: self.max_entries(map_names::MAGLEV),
            source_ranges: self.max_entries(map_names::SOURCE_RANGES),
        }
    }

    /// What the maps hold, as far as this process knows.
    pub fn live(&self) -> &MapContents {
        &self.live
    }

    /// Reads the service and backend maps back from the kernel.
    pub fn read_contents(&self) -> Result<MapContents, DatapathError> {
        let (services6, backends6) = self.v6.read()?;
        let mut contents = MapContents {
            services: read_hash(&self.services)
                .map_err(map_err(map_names::SERVICES))?
                .into_iter()
                .map(|(k, v)| (svc_key4(k), v))
                .chain(services6)
                .collect(),
            backends: read_hash(&self.backends)
                .map_err(map_err(map_names::BACKENDS))?
                .into_iter()
                .map(|(id, b)| (id, backend4(b)))
                .chain(backends6)
                .collect(),
            ..MapContents::default()
        };
        contents.tables = self
            .tables
            .read_all(&self.live.tables)
            .map_err(map_err(map_names::MAGLEV))?;
        contents.source_ranges = read_ranges(&self.source_ranges, MapAddr::V4)
            .map_err(map_err(map_names::SOURCE_RANGES))?;
        contents.source_ranges.extend(self.v6.read_ranges()?);
        Ok(contents)
    }

    /// Re-reads the maps, so the next diff is against what the kernel
    /// really holds (someone may have edited a map by hand; a Maglev table
    /// this process wrote is only checked to still be there).
    pub fn refresh_live(&mut self) -> Result<(), DatapathError> {
        self.live = self.read_contents()?;
        self.rebuild_served();
        Ok(())
    }

    /// Applies `ops` in order. An op that fails is reported and skipped, and
    /// so is every later op that depends on it ([`Guard`]); the rest still
    /// apply, so one bad entry (a full map) never blocks every other
    /// service, and the datapath never sees a slot without its backend.
    /// `live` follows exactly what succeeded.
    pub fn apply(&mut self, ops: &[MapOp]) -> Vec<FailedOp> {
        let mut failed = Vec::new();
        let mut guard = Guard::default();
        // Tables of a run of PutTable ops are built a chunk at a time on all
        // cores; a chunk bounds the memory they take (64 KiB each).
        const TABLE_CHUNK: usize = 64;
        let mut built: std::collections::VecDeque<Vec<u32>> = Default::default();
        self.served.preset(&mut self.served_map, ops);
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
            if let Err(why) = guard.check(op, &self.live) {
                guard.fail(op, &self.live);
                failed.push(FailedOp {
                    op: op.clone(),
                    error: OpError::Dependency(why),
                });
                continue;
            }
            let result = match op {
                MapOp::PutBackend(id, b) => match b.addr {
                    MapAddr::V4(a) => self.backends.insert(id, b.with_addr(a), 0),
                    MapAddr::V6(a) => self.v6.backends.insert(id, b.with_addr(a), 0),
                }
                .map(|()| {
                    let old = self.live.backends.insert(*id, *b);
                    self.served.backend_put(old.as_ref(), b);
                }),
                MapOp::PutService(k, v) => match k.addr {
                    MapAddr::V4(a) => self.services.insert(k.with_addr(a), v, 0),
                    MapAddr::V6(a) => self.v6.services.insert(k.with_addr(a), v, 0),
                }
                .map(|()| {
                    if self.live.services.insert(*k, *v).is_none() {
                        self.served.service_added(k);
                    }
                }),
                MapOp::DeleteService(k) => ignore_missing(match k.addr {
                    MapAddr::V4(a) => self.services.remove(&k.with_addr(a)),
                    MapAddr::V6(a) => self.v6.services.remove(&k.with_addr(a)),
                })
                .map(|()| {
                    let Some(gone) = self.live.services.remove(k) else {
                        return;
                    };
                    self.served.service_removed(k);
                    if k.slot == 0 && gone.svc_id != 0 {
                        // Its id may be handed to another frontend: its
                        // counters must not carry over.
                        upkeep::clear_traffic(&mut self.svc_traffic, gone.svc_id);
                    }
                }),
                MapOp::DeleteBackend(id) => {
                    ignore_missing(match self.live.backends.get(id).map(|b| b.addr) {
                        Some(MapAddr::V6(_)) => self.v6.backends.remove(id),
                        _ => self.backends.remove(id),
                    })
                    .map(|()| {
                        if let Some(gone) = self.live.backends.remove(id) {
                            self.served.backend_removed(&gone);
                        }
                        upkeep::clear_traffic(&mut self.backend_traffic, *id);
                    })
                }
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
                MapOp::PutSourceRange(r) => match family6::range_addr(r) {
                    MapAddr::V4(a) => self.source_ranges.insert(&range_key(r, a), 1, 0),
                    MapAddr::V6(a) => self.v6.put_range(r, a),
                }
                .map(|()| {
                    self.live.source_ranges.insert(*r);
                }),
                MapOp::DeleteSourceRange(r) => match family6::range_addr(r) {
                    MapAddr::V4(a) => ignore_missing(self.source_ranges.remove(&range_key(r, a))),
                    MapAddr::V6(a) => self.v6.delete_range(r, a),
                }
                .map(|()| {
                    self.live.source_ranges.remove(r);
                }),
            };
            if let Err(error) = result {
                guard.fail(op, &self.live);
                failed.push(FailedOp {
                    op: op.clone(),
                    error: error.into(),
                });
            }
        }
        if ops
            .iter()
            .any(|op| matches!(op, MapOp::PutBackend(..) | MapOp::DeleteBackend(_)))
        {
            self.sync_endpoints();
        }
        // Last: a bit goes only once nothing it stands for is left.
        self.served.flush(&mut self.served_map);
        failed
    }
}

/// What a failed op leaves that later ops must not build on: ops are
/// planned as if every one succeeds, so after a failure the frontend it
/// belongs to keeps its old entries, and nothing of it is changed further
/// (its old backends, tables and ranges are kept), and nothing is pointed
/// at a backend or table that was not written. Empty, and free, while
/// nothing fails.
#[derive(Default)]
struct Guard {
    /// Frontends (slot-0 keys) left as they are.
    frontends: std::collections::BTreeSet<crate::contents::SvcKey>,
    /// Their svc ids, and those of failed table or range writes.
    svc_ids: std::collections::BTreeSet<u32>,
    /// Backends something may still point at.
    kept: std::collections::BTreeSet<u32>,
}

impl Guard {
    fn check(&self, op: &MapOp, live: &MapContents) -> Result<(), &'static str> {
        if self.frontends.is_empty() && self.svc_ids.is_empty() && self.kept.is_empty() {
            // Nothing failed: the plan holds as it is.
            return Ok(());
        }
        match op {
            MapOp::PutService(k, _) | MapOp::DeleteService(k)
                if self.frontends.contains(&k.with_slot(0)) =>
            {
                Err("an earlier write of this frontend failed")
            }
            MapOp::PutService(k, v)
                if k.slot != 0 && !live.backends.contains_key(&v.backend_id) =>
            {
                Err("its backend was not written")
            }
            MapOp::PutService(k, v)
                if k.slot == 0
                    && (self.svc_ids.contains(&v.svc_id)
                        || (1..=v.count).any(|s| !live.services.contains_key(&k.with_slot(s)))
                        || (v.uses_maglev() && !live.tables.contains_key(&v.svc_id))) =>
            {
                Err("its slots, table or ranges were not written")
            }
            MapOp::PutTable(_, spec)
                if spec
                    .backends()
                    .iter()
                    .any(|b| !live.backends.contains_key(&b.id)) =>
            {
                Err("its backends were not written")
            }
            MapOp::DeleteTable(id) | MapOp::DeleteSourceRange(RangeEntry { svc_id: id, .. })
                if self.svc_ids.contains(id) =>
            {
                Err("its frontend was left as it is")
            }
            MapOp::DeleteBackend(id) if self.kept.contains(id) => {
                Err("a slot or table left as it is still points at it")
            }
            _ => Ok(()),
        }
    }

    /// Records that `op` was not applied.
    fn fail(&mut self, op: &MapOp, live: &MapContents) {
        let frontend = match op {
            MapOp::PutService(k, _) | MapOp::DeleteService(k) => Some(k.with_slot(0)),
            MapOp::PutTable(id, _) | MapOp::PutSourceRange(RangeEntry { svc_id: id, .. }) => {
                self.svc_ids.insert(*id);
                None
            }
            _ => None,
        };
        let Some(frontend) = frontend else { return };
        if !self.frontends.insert(frontend) {
            return;
        }
        if let Some(v) = live.services.get(&frontend) {
            self.svc_ids.insert(v.svc_id);
            if let Some(table) = live.tables.get(&v.svc_id) {
                self.kept.extend(table.backends().iter().map(|b| b.id));
            }
        }
        // Every slot it has, covered or not (a failed shrink keeps them);
        // keys order by slot before protocol and scope, hence the filter.
        let first = frontend.with_slot(1);
        let last = frontend.with_slot(u16::MAX);
        self.kept.extend(
            live.services
                .range(first..=last)
                .filter(|(k, _)| k.with_slot(0) == frontend)
                .map(|(_, v)| v.backend_id),
        );
    }
}

/// Every entry of a hash map (LRU too), read `BATCH` at a time with
/// `BPF_MAP_LOOKUP_BATCH` (one syscall per batch instead of two per entry:
/// what makes re-reading 150,000 services-map entries at every resync
/// cheap), or entry by entry where the kernel has no batch lookup.
pub(crate) fn read_hash<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, MapError> {
    match lookup_batch(map) {
        Ok(entries) => Ok(entries),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
            ) =>
        {
            map.iter().collect()
        }
        Err(e) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: e,
        })),
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's internal "not supported", which BPF commands let through.
const ENOTSUPP: i32 = 524;
/// Entries asked for per batch; a hash bucket never holds more.
const BATCH: usize = 4096;

fn lookup_batch<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &HashMap<MapData, K, V>,
) -> io::Result<Vec<(K, V)>> {
    use aya::maps::IterableMap as _;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // The leading fields of `union bpf_attr` for the batch commands.
    #[repr(C)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let fd = map.map().fd().as_fd().as_raw_fd() as u32;
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // A hash map's cursor is a bucket index.
    let mut cursor: [u64; 1] = [0];
    let mut next: [u64; 1] = [0];
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = Batch {
            in_batch: if first { 0 } else { cursor.as_mut_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd,
            elem_flags: 0,
            flags: 0,
        };
        let result = pins::bpf_syscall_mut(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match result {
            Ok(_) => {}
            // The end of the map (with the last entries already counted).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        cursor = next;
        first = false;
    }
}

use family6::range_key;
pub(crate) use family6::read_ranges;

fn take_traffic(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, Traffic>, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::MissingMap(name))?
        .try_into()
        .map_err(map_err(name))
}

pub(super) fn program_err(
    name: &'static str,
    source: aya::programs::ProgramError,
) -> DatapathError {
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
pub(super) fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
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
