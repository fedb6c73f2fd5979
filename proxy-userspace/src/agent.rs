//! The agent's control loop: objects from a source -> pure model -> map
//! contents -> diff against the live maps -> apply.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use proxy_common::Backend;

use crate::{
    datapath::{Datapath, DatapathConfig, Hook},
    diff::{MapOp, diff},
    encode::{Encoder, LbAlgorithm},
    healthcheck::HealthServers,
    interfaces, manifests, metrics, model,
    model::{HealthCheck, Ipv4Cidr},
};

#[derive(Debug, Clone)]
pub struct RunConfig {
    /// This node's name as Kubernetes knows it (endpoints' `nodeName`).
    pub node_name: String,
    /// Pod-facing interface names or glob patterns (TC pod program).
    pub interfaces: Vec<String>,
    /// The node's own interfaces (TC node program: traffic from outside the
    /// node). Their IPv4 addresses are the node's addresses.
    pub node_interfaces: Vec<String>,
    /// NodePorts answer only on node addresses inside these; empty: on all
    /// of them (kube-proxy's `--nodeport-addresses`).
    pub nodeport_addresses: Vec<Ipv4Cidr>,
    pub datapath: DatapathConfig,
    /// How new flows choose among a frontend's endpoints.
    pub lb_algorithm: LbAlgorithm,
    /// cgroup v2 directory to attach the socket hooks to (the node's cgroup
    /// root in production); `None` leaves host processes untranslated.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// How often the interface list is checked.
    pub poll_interval: Duration,
    /// How often expired conntrack entries are deleted.
    pub conntrack_gc_interval: Duration,
    /// Full re-derivation from the source and re-read of the maps, so an
    /// entry changed behind the agent's back is put right.
    pub resync_interval: Duration,
    /// Where `/metrics` and `/proxyMode` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Where `/healthz`, `/livez` and `/readyz` are served; `None`: not
    /// served.
    pub healthz_addr: Option<SocketAddr>,
}

/// What one sync did, for the log line tests and operators read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub frontends: usize,
    pub backends: usize,
    pub ops: usize,
    pub failed: usize,
}

/// Owns the datapath and the id allocation; turns objects into map writes.
pub struct Syncer {
    datapath: Datapath,
    encoder: Encoder,
    /// This node's name, for `internalTrafficPolicy: Local` and topology.
    node_name: String,
    /// Where NodePorts answer.
    nodeport_addresses: Vec<Ipv4Addr>,
    /// healthCheckNodePorts of the last sync.
    health_checks: BTreeMap<u16, HealthCheck>,
    /// Warnings already logged, so a periodic resync does not repeat them.
    reported: BTreeSet<String>,
}

impl Syncer {
    pub fn new(datapath: Datapath, node_name: String, algorithm: LbAlgorithm) -> Self {
        let mut encoder = Encoder::with_algorithm(algorithm);
        // A restarted agent keeps the ids already in the pinned maps, so its
        // first sync rewrites nothing that is already right.
        encoder.seed_from(datapath.live());
        Self {
            datapath,
            encoder,
            node_name,
            nodeport_addresses: Vec::new(),
            health_checks: BTreeMap::new(),
            reported: BTreeSet::new(),
        }
    }

    /// Sets the node addresses NodePorts answer on; whether they changed
    /// (a sync is then due).
    pub fn set_nodeport_addresses(&mut self, addresses: Vec<Ipv4Addr>) -> bool {
        if self.nodeport_addresses == addresses {
            return false;
        }
        self.nodeport_addresses = addresses;
        true
    }

    /// The node addresses NodePorts answer on.
    pub fn nodeport_addresses(&self) -> &[Ipv4Addr] {
        &self.nodeport_addresses
    }

    /// The health-check servers the last sync asked for.
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// How many warnings (skipped objects) the last sync had.
    pub fn warning_count(&self) -> usize {
        self.reported.len()
    }

    /// Computes the desired maps from `objects` and applies the difference.
    /// Bad objects are skipped with one warning each; a failed map write is
    /// logged and the rest still applies.
    pub fn sync(
        &mut self,
        objects: &manifests::Objects,
        source_warnings: Vec<String>,
    ) -> SyncOutcome {
        let node = model::NodeInfo::from_objects(&self.node_name, &objects.nodes)
            .with_addresses(self.nodeport_addresses.iter().copied());
        let (desired, model_warnings) = model::compute(&objects.services, &objects.slices, &node);
        let warnings: BTreeSet<String> = source_warnings
            .into_iter()
            .chain(model_warnings.iter().map(ToString::to_string))
            .collect();
        for w in warnings.difference(&self.reported) {
            tracing::warn!("skipped: {w}");
        }
        self.reported = warnings;

        let contents = self.encoder.encode(&desired);
        let ops = diff(self.datapath.live(), &contents);
        let removed: Vec<Backend> = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::DeleteBackend(id) => self.datapath.live().backends.get(id).copied(),
                _ => None,
            })
            .collect();
        let failed = self.datapath.apply(&ops);
        for f in &failed {
            tracing::error!(op = ?f.op, error = %f.error, "map update failed");
        }
        if let Err(e) = self.datapath.prune_affinity() {
            tracing::error!(error = %e, "pruning session affinity");
        }
        match self.datapath.forget_udp_backends(&removed) {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "deleted UDP flows of removed endpoints"),
            Err(e) => tracing::error!(error = %e, "deleting UDP flows of removed endpoints"),
        }
        self.health_checks = desired.health_checks.clone();
        SyncOutcome {
            frontends: desired.frontends.len(),
            backends: contents.backends.len(),
            ops: ops.len(),
            failed: failed.len(),
        }
    }
}

/// Where objects come from: a manifests directory, or the API server.
///
/// Both futures must be cancel-safe: the agent drops them whenever another
/// event (a signal, the resync timer) wins.
pub trait Source {
    /// Resolves when the source may hold something new since the last
    /// snapshot. The first call resolves only once the source has its
    /// complete initial state, so nothing is written before that.
    fn changed(&mut self) -> impl Future<Output = ()>;
    /// Everything the source holds now, and what it had to skip.
    fn snapshot(&mut self) -> (manifests::Objects, Vec<String>);
}

/// A directory of YAML files, polled.
pub struct ManifestSource {
    dir: PathBuf,
    watcher: manifests::DirWatcher,
    cache: manifests::DocCache,
    poll_interval: Duration,
}

impl ManifestSource {
    pub fn new(dir: PathBuf, poll_interval: Duration) -> Self {
        Self {
            watcher: manifests::DirWatcher::new(&dir),
            cache: manifests::DocCache::default(),
            dir,
            poll_interval,
        }
    }
}

impl Source for ManifestSource {
    async fn changed(&mut self) {
        while !self.watcher.changed() {
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    fn snapshot(&mut self) -> (manifests::Objects, Vec<String>) {
        let (objects, warnings) = manifests::load_dir_cached(&self.dir, &mut self.cache);
        tracing::debug!(parsed = self.cache.parsed(), "manifests read");
        (objects, warnings.iter().map(ToString::to_string).collect())
    }
}

/// Attaches to every present interface matching `pods` (pod program) or
/// `nodes` (node program; it wins where both match) that is not attached
/// yet. Failures are logged and retried on the next scan.
fn attach_matching(datapath: &mut Datapath, pods: &[String], nodes: &[String]) {
    let names = match interfaces::list() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "listing interfaces");
            return;
        }
    };
    for gone in datapath.forget_missing(&names) {
        tracing::info!(iface = %gone, "interface gone or replaced");
    }
    for detached in datapath.forget_detached() {
        tracing::warn!(iface = %detached, "TC program was detached by someone else; re-attaching");
    }
    for (name, index) in names {
        let hook = if interfaces::matches_any(nodes, &name) {
            Hook::Node
        } else if interfaces::matches_any(pods, &name) {
            Hook::Pod
        } else {
            continue;
        };
        if datapath.is_attached(&name, index, hook) {
            continue;
        }
        match datapath.attach(&name, index, hook) {
            Ok(()) => tracing::info!(iface = %name, ?hook, "attached TC ingress"),
            Err(e) => tracing::error!(iface = %name, error = %e, "attach failed"),
        }
    }
}

/// Reads the node interfaces' addresses: the first is the masquerade source
/// of external flows, those inside `cfg.nodeport_addresses` carry NodePorts.
/// Whether the NodePort addresses changed.
fn refresh_node_addresses(syncer: &mut Syncer, cfg: &RunConfig) -> bool {
    let every = match interfaces::ipv4_addresses() {
        Ok(list) => list,
        Err(e) => {
            tracing::error!(error = %e, "listing node addresses");
            return false;
        }
    };
    // Every address of the node, for endpoints that are the node itself.
    let own: Vec<Ipv4Addr> = every.iter().map(|(_, addr)| *addr).collect();
    match syncer.datapath_mut().set_node_addresses(&own) {
        Ok(0) => {}
        Ok(_) => tracing::info!(addresses = ?own, "node's own addresses"),
        Err(e) => tracing::error!(error = %e, "writing the node's own addresses"),
    }
    let all: Vec<Ipv4Addr> = every
        .into_iter()
        .filter(|(name, _)| interfaces::matches_any(&cfg.node_interfaces, name))
        .map(|(_, addr)| addr)
        .collect();
    if let Err(e) = syncer.datapath_mut().set_node_addr(all.first().copied()) {
        tracing::error!(error = %e, "setting the masquerade address");
    }
    let mut nodeports: Vec<Ipv4Addr> = all
        .into_iter()
        .filter(|a| {
            cfg.nodeport_addresses.is_empty()
                || cfg.nodeport_addresses.iter().any(|c| c.contains(*a))
        })
        .collect();
    nodeports.sort();
    nodeports.dedup();
    let changed = syncer.set_nodeport_addresses(nodeports.clone());
    if changed {
        tracing::info!(addresses = ?nodeports, "NodePort addresses");
    }
    changed
}

/// Where healthCheckNodePorts listen: every address, or, with
/// `--nodeport-addresses`, the node addresses NodePorts answer on (as
/// kube-proxy's health servers).
fn health_addresses(cfg: &RunConfig, syncer: &Syncer) -> Vec<IpAddr> {
    if cfg.nodeport_addresses.is_empty() {
        return vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
    }
    syncer
        .nodeport_addresses()
        .iter()
        .map(|a| IpAddr::V4(*a))
        .collect()
}

/// Runs the agent on `source` until SIGTERM or SIGINT.
pub async fn run(cfg: RunConfig, mut source: impl Source) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(&cfg.datapath).context("loading the datapath")?;
    tracing::info!(
        bpffs = %cfg.datapath.bpffs.display(),
        adopted_entries = datapath.live().services.len(),
        "datapath loaded"
    );
    if let Some(cgroup) = &cfg.socket_lb_cgroup {
        datapath
            .attach_cgroup(cgroup)
            .context("socket-level load balancing")?;
        tracing::info!(cgroup = %cgroup.display(), "attached socket hooks");
    }
    let mut syncer = Syncer::new(datapath, cfg.node_name.clone(), cfg.lb_algorithm);
    attach_matching(syncer.datapath_mut(), &cfg.interfaces, &cfg.node_interfaces);
    refresh_node_addresses(&mut syncer, &cfg);
    // Every attached program now reads this layout's maps; older layouts
    // (an agent of an earlier version) can go.
    match syncer.datapath_mut().retire_old_layouts() {
        Ok(retired) if !retired.is_empty() => {
            tracing::info!(?retired, "removed maps of older layouts");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "removing maps of older layouts"),
    }

    let metrics = Arc::new(metrics::Metrics::new(
        &cfg.datapath,
        cfg.resync_interval,
        &cfg.node_name,
    ));
    metrics::serve(cfg.metrics_addr, cfg.healthz_addr, &metrics);
    let mut metrics_tick = tokio::time::interval(Duration::from_secs(1));
    let proxy_healthy = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.proxy_healthy())
    };
    let shed = metrics.connections_shed(crate::healthcheck::SERVER_LABEL);
    let mut health = HealthServers::new(health_addresses(&cfg, &syncer), proxy_healthy, shed);
    // When the source reported the change the next sync is for.
    let mut noticed = None;
    let mut iface_scan = tokio::time::interval(cfg.poll_interval);
    let mut conntrack_gc = tokio::time::interval(cfg.conntrack_gc_interval);
    let mut resync = tokio::time::interval(cfg.resync_interval);
    // The first tick of an interval is immediate; the initial sync is the
    // source's first change instead.
    resync.tick().await;
    let mut generation: u64 = 0;
    let mut synced = false;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        let full = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = source.changed() => {
                noticed = Some(Instant::now());
                false
            }
            _ = resync.tick(), if synced => true,
            _ = iface_scan.tick() => {
                attach_matching(syncer.datapath_mut(), &cfg.interfaces, &cfg.node_interfaces);
                // New node addresses change the NodePort frontends; before
                // the first sync they are simply used by it.
                if !(refresh_node_addresses(&mut syncer, &cfg) && synced) {
                    continue;
                }
                false
            }
            _ = conntrack_gc.tick() => {
                match syncer.datapath_mut().collect_conntrack() {
                    Ok(n) => tracing::debug!(entries = n, "conntrack garbage collected"),
                    Err(e) => tracing::error!(error = %e, "conntrack garbage collection"),
                }
                if let Ok(entries) = syncer.datapath_mut().conntrack() {
                    metrics.set_map_entries(proxy_common::map_names::CONNTRACK, entries.len());
                }
                continue;
            }
            _ = metrics_tick.tick() => {
                match syncer.datapath_mut().stats() {
                    Ok(stats) => metrics.observe_datapath(&stats),
                    Err(e) => tracing::debug!(error = %e, "reading datapath counters"),
                }
                continue;
            }
        };
        if full {
            // Someone may have edited a map by hand: diff against what the
            // kernel really holds, not against memory.
            if let Err(e) = syncer.datapath_mut().refresh_live() {
                tracing::error!(error = %e, "re-reading maps");
            }
        }
        let started = Instant::now();
        let (objects, warnings) = source.snapshot();
        let out = syncer.sync(&objects, warnings);
        // Failures are logged by the servers and retried at the next sync.
        health.set_addresses(health_addresses(&cfg, &syncer)).await;
        health.update(syncer.health_checks()).await;
        let skipped = syncer.warning_count();
        metrics.record_sync(
            &objects,
            syncer.datapath_mut().live(),
            &out,
            skipped,
            started.elapsed(),
            noticed.take().filter(|_| !full),
        );
        synced = true;
        generation += 1;
        tracing::info!(
            "datapath programmed generation={generation} frontends={} backends={} ops={} failed={} took_us={}",
            out.frontends,
            out.backends,
            out.ops,
            out.failed,
            started.elapsed().as_micros()
        );
    }
    tracing::info!(
        "stopping; pinned maps stay under {}",
        cfg.datapath.bpffs.display()
    );
    Ok(())
}
