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
    capacity,
    contents::{Footprint, MapAddr, SvcKey},
    datapath::{Datapath, DatapathConfig, DatapathError, Hook, Hooks, Upkeep},
    diff::MapOp,
    encode::{Encoder, LbAlgorithms},
    healthcheck::HealthServers,
    interfaces, metrics,
    metrics::SyncOutcome,
    model,
    model::{HealthCheck, IpCidr, Tracker},
    source::{Changes, Source},
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
    pub nodeport_addresses: Vec<IpCidr>,
    pub datapath: DatapathConfig,
    /// How new flows choose among a frontend's endpoints, per scope.
    pub lb_algorithms: LbAlgorithms,
    /// cgroup v2 directory to attach the socket hooks to (the node's cgroup
    /// root in production); `None` leaves host processes untranslated.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// How often the interface list is checked.
    pub poll_interval: Duration,
    /// How often expired conntrack entries are deleted.
    pub conntrack_gc_interval: Duration,
    /// Re-read of the maps and comparison with everything desired, so an
    /// entry changed behind the agent's back is put right.
    pub resync_interval: Duration,
    /// Where `/metrics` and `/proxyMode` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Where `/healthz`, `/livez` and `/readyz` are served; `None`: not
    /// served.
    pub healthz_addr: Option<SocketAddr>,
}

/// Owns the maps the control plane writes ([`Datapath`]), the tracker of
/// what the source said, and the encoder (ids, desired contents); turns
/// changes into map writes. The programs ([`Hooks`]) and the maps the
/// programs write ([`Upkeep`]) are [`run`]'s.
pub struct Syncer {
    datapath: Datapath,
    encoder: Encoder,
    tracker: Tracker,
    /// The source's own warnings (unreadable files...).
    source_warnings: Vec<String>,
    /// Warnings already logged, so a periodic resync does not repeat them.
    reported: BTreeSet<String>,
    /// The source's warnings differ from those last reported.
    warnings_changed: bool,
    /// The next sync compares the whole maps, not only what changed: the
    /// first one (what an earlier agent left may be stale) and resyncs.
    whole: bool,
    /// Keys of writes that failed or did not fit, tried again at the next
    /// sync (soon: see [`Syncer::needs_retry`]).
    retry: Footprint,
    /// Objects not programmed as desired, and why, as last logged.
    incomplete: BTreeMap<String, String>,
}

impl Syncer {
    pub fn new(datapath: Datapath, node_name: String, algorithms: LbAlgorithms) -> Self {
        let mut encoder = Encoder::with_algorithms(algorithms);
        // A restarted agent keeps the ids already in the pinned maps, so its
        // first sync rewrites nothing that is already right.
        encoder.seed_from(datapath.live());
        let node = model::NodeInfo {
            name: node_name,
            ..model::NodeInfo::default()
        };
        Self {
            datapath,
            encoder,
            tracker: Tracker::new(node),
            source_warnings: Vec::new(),
            reported: BTreeSet::new(),
            warnings_changed: false,
            whole: true,
            retry: Footprint::default(),
            incomplete: BTreeMap::new(),
        }
    }

    /// Sets the node addresses NodePorts answer on; whether they changed
    /// (a sync is then due).
    pub fn set_nodeport_addresses(&mut self, addresses: Vec<IpAddr>) -> bool {
        self.tracker.set_node_addresses(addresses)
    }

    /// The node addresses NodePorts answer on.
    pub fn nodeport_addresses(&self) -> &[IpAddr] {
        self.tracker.node_addresses()
    }

    /// The health-check servers the tracker asks for.
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        self.tracker.health_checks()
    }

    /// The maps, for the node's addresses, pins and layouts.
    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// How many warnings (skipped objects) the last sync had.
    pub fn warning_count(&self) -> usize {
        self.reported.len()
    }

    /// Services, EndpointSlices and Nodes held.
    pub fn object_counts(&self) -> (usize, usize, usize) {
        self.tracker.object_counts()
    }

    /// The Node objects the source gave (trimmed).
    pub fn nodes(&self) -> impl Iterator<Item = &k8s_openapi::api::core::v1::Node> {
        self.tracker.nodes()
    }

    /// What the maps hold, as far as this process knows.
    pub fn live(&self) -> &crate::contents::MapContents {
        self.datapath.live()
    }

    /// Takes in what the source reported; [`Syncer::sync`] writes it.
    pub fn take(&mut self, changes: Changes) {
        for delta in changes.deltas {
            delta.apply_to(&mut self.tracker);
        }
        if let Some(warnings) = changes.warnings
            && warnings != self.source_warnings
        {
            self.source_warnings = warnings;
            self.warnings_changed = true;
        }
    }

    /// The next sync compares the whole maps, re-read from the kernel
    /// (someone may have edited one by hand), with everything desired. No
    /// object is derived again: the tracker already holds the result.
    pub fn prepare_resync(&mut self) {
        if let Err(e) = self.datapath.refresh_live() {
            tracing::error!(error = %e, "re-reading maps");
        }
        self.whole = true;
    }

    /// Derives what changed since the last sync and applies the difference.
    /// Bad objects are skipped with one warning each; a failed map write is
    /// logged and the rest still applies.
    pub fn sync(&mut self) -> (SyncOutcome, AfterSync) {
        let touched = self.tracker.settle();
        let tracker_warnings = self.tracker.warnings_changed();
        if tracker_warnings || self.whole || std::mem::take(&mut self.warnings_changed) {
            self.report_warnings();
        }
        let mut footprint = self.encoder.update(
            touched
                .iter()
                .map(|frontend| (*frontend, self.tracker.frontend(frontend))),
        );
        let retry = std::mem::take(&mut self.retry);
        footprint.services.extend(retry.services);
        footprint.backends.extend(retry.backends);
        footprint.svc_ids.extend(retry.svc_ids);
        let whole = std::mem::take(&mut self.whole);
        let room = self.datapath.capacity().room(self.datapath.live());
        let plan = capacity::plan(
            self.datapath.live(),
            self.encoder.desired(),
            (!whole).then_some(&footprint),
            room,
        );
        let ops = plan.ops;
        let live = self.datapath.live();
        // Conntrack is IPv4's only (the IPv6 datapath keeps none yet).
        let removed: Vec<Backend> = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::DeleteBackend(id) => live.backends.get(id).copied(),
                _ => None,
            })
            .filter_map(|b| match b.addr {
                MapAddr::V4(a) => Some(b.with_addr(a)),
                MapAddr::V6(_) => None,
            })
            .collect();
        let desired = self.encoder.desired();
        let sticky = |key: &SvcKey| {
            [live, desired].iter().any(|c| {
                c.services
                    .get(&key.with_slot(0))
                    .is_some_and(|v| v.affinity_timeout_s != 0)
            })
        };
        let affinity_touched = whole
            || ops.iter().any(|op| match op {
                MapOp::PutService(key, _) | MapOp::DeleteService(key) => sticky(key),
                _ => false,
            });
        let failed = self.datapath.apply(&ops);
        let mut full: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut incomplete: BTreeMap<String, String> = BTreeMap::new();
        for h in &plan.held {
            *full.entry(h.map).or_default() += 1;
            incomplete
                .entry(self.object_of(&h.frontend))
                .or_insert(format!(
                    "map {} is full: raise {} (it needs {} new entries)",
                    h.map, h.flag, h.needed
                ));
        }
        for op in &plan.pending {
            self.retry.add(op);
        }
        for f in &failed {
            let why = match f.full_map() {
                Some((map, flag)) => {
                    *full.entry(map).or_default() += 1;
                    format!("map {map} is full: raise {flag}")
                }
                None => format!("map update failed: {}", f.error),
            };
            incomplete.entry(self.op_object(&f.op)).or_insert(why);
            self.retry.add(&f.op);
        }
        self.report_incomplete(incomplete);
        let outcome = SyncOutcome {
            frontends: self.tracker.frontend_count(),
            backends: self.encoder.desired().backends.len(),
            ops: ops.len(),
            failed: failed.len(),
            full,
            skipped: self.reported.len(),
            incomplete: self.incomplete.len(),
            refused: self.tracker.refused(),
        };
        let after = AfterSync {
            removed,
            affinity_touched,
        };
        (outcome, after)
    }

    /// Whether some writes failed or did not fit and wait to be retried.
    pub fn needs_retry(&self) -> bool {
        !self.retry.is_empty()
    }

    /// The object a services-map entry belongs to, for a log line: its
    /// Service port (`namespace/name:port`) and frontend.
    fn object_of(&self, key: &SvcKey) -> String {
        let addr = crate::contents::ip_from_map(key.addr);
        let port = crate::contents::port_from_map(key.port);
        let Some(proto) = model::Protocol::from_number(key.proto) else {
            return format!("cluster IP {addr}");
        };
        let frontend = model::Frontend { addr, port, proto };
        let at = frontend.to_string();
        match self.tracker.frontend(&frontend) {
            Some(state) => format!("Service {} ({at})", state.service),
            None => format!("frontend {at}"),
        }
    }

    /// The object a failed op belongs to.
    fn op_object(&self, op: &MapOp) -> String {
        match op {
            MapOp::PutService(k, _) | MapOp::DeleteService(k) => self.object_of(k),
            MapOp::PutBackend(id, _) | MapOp::DeleteBackend(id) => format!("backend {id}"),
            MapOp::PutTable(id, _) | MapOp::DeleteTable(id) => format!("Maglev table {id}"),
            MapOp::PutSourceRange(r) | MapOp::DeleteSourceRange(r) => {
                format!("source ranges of {}", r.svc_id)
            }
        }
    }

    /// One warning per object that is not programmed (again only when its
    /// reason changes), and one line when it is programmed at last.
    fn report_incomplete(&mut self, now: BTreeMap<String, String>) {
        for (object, why) in &now {
            if self.incomplete.get(object) != Some(why) {
                tracing::warn!(
                    "not programmed, retrying: {object}: {why}; everything else is programmed"
                );
            }
        }
        for object in self.incomplete.keys() {
            if !now.contains_key(object) {
                tracing::info!("programmed now: {object}");
            }
        }
        self.incomplete = now;
    }

    /// Logs the warnings not logged before.
    fn report_warnings(&mut self) {
        let warnings: BTreeSet<String> = self
            .source_warnings
            .iter()
            .cloned()
            .chain(self.tracker.warnings().iter().map(ToString::to_string))
            .collect();
        for w in warnings.difference(&self.reported) {
            tracing::warn!("skipped: {w}");
        }
        self.reported = warnings;
    }
}

/// What a sync leaves to the upkeep: the flows and affinities it made
/// stale.
pub struct AfterSync {
    /// Backends deleted: their UDP flows go at once.
    removed: Vec<Backend>,
    /// A frontend with session affinity changed (or every one may have).
    affinity_touched: bool,
}

impl AfterSync {
    /// Deletes the UDP flows of removed endpoints and the session
    /// affinities that no longer hold (`live`: the services map now).
    fn tidy(self, upkeep: &mut Upkeep, live: &crate::contents::MapContents) {
        if self.affinity_touched
            && let Err(e) = upkeep.prune_affinity(live)
        {
            tracing::error!(error = %e, "pruning session affinity");
        }
        match upkeep.forget_udp_backends(&self.removed) {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "deleted UDP flows of removed endpoints"),
            Err(e) => tracing::error!(error = %e, "deleting UDP flows of removed endpoints"),
        }
    }
}

/// Puts back pins removed behind the agent's back and re-attaches socket
/// hooks someone detached; a datapath that cannot be restored makes the
/// agent unhealthy (logged once, when it starts and when it ends).
fn keep_pins(datapath: &mut Datapath, hooks: Option<&mut Hooks>, metrics: &metrics::Metrics) {
    let restored = datapath.restore_pins().and_then(|restored| {
        let hooks = match hooks {
            Some(hooks) => hooks.check_cgroup()?,
            None => Vec::new(),
        };
        Ok((restored, hooks))
    });
    let fault = match restored {
        Ok((restored, hooks)) => {
            if !restored.is_empty() {
                tracing::warn!(
                    ?restored,
                    "pins were removed behind the agent's back; pinned again"
                );
            }
            if !hooks.is_empty() {
                tracing::warn!(
                    ?hooks,
                    "socket hooks were detached by someone else; re-attached"
                );
            }
            None
        }
        Err(e) => Some(e.to_string()),
    };
    if let Some(change) = metrics.set_datapath_fault(fault) {
        match change {
            Some(fault) => {
                tracing::error!(error = %fault, "the datapath's pins cannot be restored: unhealthy until they are")
            }
            None => tracing::info!("the datapath's pins are restored: healthy again"),
        }
    }
}

/// Attaches to every present interface matching `pods` (pod program) or
/// `nodes` (node program; it wins where both match) that is not attached
/// yet, and forgets interfaces that went. A failure is logged once (again
/// only when it changes) and retried on the next scan.
fn attach_matching(
    hooks: &mut Hooks,
    pods: &[String],
    nodes: &[String],
    failing: &mut BTreeMap<String, String>,
) {
    let names = match interfaces::list() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "listing interfaces");
            return;
        }
    };
    for gone in hooks.forget_missing(&names) {
        tracing::info!(iface = %gone, "interface gone or replaced");
    }
    failing.retain(|name, _| names.iter().any(|(n, _)| n == name));
    for (name, index) in names {
        let hook = if interfaces::matches_any(nodes, &name) {
            Hook::Node
        } else if interfaces::matches_any(pods, &name) {
            Hook::Pod
        } else {
            continue;
        };
        if hooks.is_attached(&name, index, hook) {
            continue;
        }
        match hooks.attach(&name, index, hook) {
            Ok(()) => {
                failing.remove(&name);
                tracing::info!(iface = %name, ?hook, "attached TC ingress");
            }
            Err(e) => {
                let e = e.to_string();
                if failing.get(&name) != Some(&e) {
                    tracing::error!(iface = %name, error = %e, "attach failed; retrying at each scan");
                    failing.insert(name, e);
                }
            }
        }
    }
}

/// Forgets interfaces whose links were detached behind the agent's back;
/// whether there were any (a scan then attaches them again). No netlink
/// event says a link was detached, so this runs at the poll interval.
fn check_links(hooks: &mut Hooks) -> bool {
    let detached = hooks.forget_detached();
    for iface in &detached {
        tracing::warn!(iface = %iface, "TC program was detached by someone else; re-attaching");
    }
    !detached.is_empty()
}

/// Attaches to new interfaces, forgets gone ones (once the programs are
/// verified: then every interface is scanned) and reads the node's
/// addresses again; whether the NodePort addresses changed.
fn rescan_interfaces(
    syncer: &mut Syncer,
    hooks: Option<&mut Hooks>,
    cfg: &RunConfig,
    failing: &mut BTreeMap<String, String>,
) -> bool {
    if let Some(hooks) = hooks {
        attach_matching(hooks, &cfg.interfaces, &cfg.node_interfaces, failing);
    }
    refresh_node_addresses(syncer, cfg)
}

/// The programs as the verifier left them, from its thread.
type Verified = Result<Result<Hooks, DatapathError>, tokio::task::JoinError>;

/// Attaches the verified programs everywhere (socket hooks, every matching
/// interface, adopting an earlier agent's pinned links), then retires what
/// only the programs they replaced read.
fn start_hooks(
    verified: Verified,
    syncer: &mut Syncer,
    upkeep: &mut Upkeep,
    cfg: &RunConfig,
    failing: &mut BTreeMap<String, String>,
) -> anyhow::Result<Hooks> {
    let mut hooks = verified
        .context("verifying the programs")?
        .context("loading the datapath")?;
    tracing::info!("programs verified");
    if let Some(cgroup) = &cfg.socket_lb_cgroup {
        hooks
            .attach_cgroup(cgroup)
            .context("socket-level load balancing")?;
        tracing::info!(cgroup = %cgroup.display(), "attached socket hooks");
    }
    attach_matching(&mut hooks, &cfg.interfaces, &cfg.node_interfaces, failing);
    // Every attached program now runs on this agent's maps: conntrack
    // entries the old programs made in a resized map's place meanwhile are
    // carried over.
    match upkeep.finish_resize() {
        0 => {}
        n => tracing::info!(
            entries = n,
            "copied the last conntrack entries into the resized map"
        ),
    }
    // Every attached program now reads this layout's maps; older layouts
    // (an agent of an earlier version) can go.
    match syncer.datapath_mut().retire_old_layouts() {
        Ok(retired) if !retired.is_empty() => {
            tracing::info!(?retired, "removed maps of older layouts");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "removing maps of older layouts"),
    }
    Ok(hooks)
}

/// Waits for the next interface or address change, forever without a
/// subscription.
async fn link_event(events: &Option<interfaces::LinkEvents>) -> std::io::Result<()> {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
    }
}

/// Reads the node interfaces' addresses: the first is the masquerade source
/// of external flows, those inside `cfg.nodeport_addresses` carry NodePorts.
/// Whether the NodePort addresses changed.
fn refresh_node_addresses(syncer: &mut Syncer, cfg: &RunConfig) -> bool {
    let every = match interfaces::ip_addresses() {
        Ok(list) => list,
        Err(e) => {
            tracing::error!(error = %e, "listing node addresses");
            return false;
        }
    };
    // Every address of the node, for endpoints that are the node itself.
    let own: Vec<IpAddr> = every.iter().map(|(_, addr)| *addr).collect();
    match syncer.datapath_mut().set_node_addresses(&own) {
        Ok(0) => {}
        Ok(_) => tracing::info!(addresses = ?own, "node's own addresses"),
        Err(e) => tracing::error!(error = %e, "writing the node's own addresses"),
    }
    // IPv6 link-local addresses (fe80::/10) need an interface to mean
    // anything: no NodePort on them (kube-proxy's NodePort addresses are
    // the node's routable ones).
    let all: Vec<IpAddr> = every
        .into_iter()
        .filter(|(name, _)| interfaces::matches_any(&cfg.node_interfaces, name))
        .map(|(_, addr)| addr)
        .filter(|addr| !matches!(addr, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    let masquerade = all.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    if let Err(e) = syncer.datapath_mut().set_node_addr(masquerade) {
        tracing::error!(error = %e, "setting the masquerade address");
    }
    let mut nodeports: Vec<IpAddr> = all
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
    syncer.nodeport_addresses().to_vec()
}

/// Interfaces and addresses are listed again this often even without a
/// netlink event.
const SAFETY_RESCAN: Duration = Duration::from_secs(30);

/// First and longest wait before failed writes are tried again.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A deadline no timer reaches (for a disabled `select!` branch, whose
/// future is still built).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// Logs a source outage as it starts and ends, and tells `/readyz`.
fn source_outage(metrics: &metrics::Metrics, current: &mut Option<String>, now: Option<String>) {
    if *current == now {
        return;
    }
    match &now {
        Some(why) => tracing::warn!(
            "source unavailable: {why}; keeping what the maps hold, not ready until it is back"
        ),
        None => tracing::info!("source available again"),
    }
    metrics.set_source_unavailable(now.clone());
    *current = now;
}

/// A sync this large (the first one, a relist) leaves megabytes of freed
/// transient memory (decoded objects, ops) that glibc keeps mapped.
const LARGE_SYNC_OPS: usize = 10_000;

/// Runs the agent on `source` until SIGTERM or SIGINT.
pub async fn run(cfg: RunConfig, mut source: impl Source) -> anyhow::Result<()> {
    let (datapath, mut upkeep, programs) =
        Datapath::load_maps(&cfg.datapath).context("loading the datapath")?;
    tracing::info!(
        bpffs = %cfg.datapath.bpffs.display(),
        adopted_entries = datapath.live().services.len(),
        "maps loaded; verifying the programs meanwhile"
    );
    // The verifier is most of agent start (about a second per TC ingress
    // program) and only attaching needs it done: the source is read and
    // the maps written meanwhile. Until the programs are attached, an
    // earlier agent's keep running from their pinned links (same layout:
    // on the maps written here; an older one: on its own maps, which stay
    // until the new programs replace them).
    let mut verifying = Some(tokio::task::spawn_blocking(move || programs.verify()));
    let mut hooks: Option<Hooks> = None;
    let mut syncer = Syncer::new(datapath, cfg.node_name.clone(), cfg.lb_algorithms);
    // Subscribed before the first scan, so nothing that changes after it
    // is missed.
    let mut link_events = match interfaces::LinkEvents::subscribe() {
        Ok(events) => Some(events),
        Err(e) => {
            tracing::warn!(error = %e, "no netlink interface events: interfaces are listed at every poll interval");
            None
        }
    };
    let mut attach_failing = BTreeMap::new();
    refresh_node_addresses(&mut syncer, &cfg);

    let metrics = {
        let datapath = syncer.datapath_mut();
        Arc::new(metrics::Metrics::new(
            |name| datapath.max_entries(name),
            cfg.resync_interval,
            &cfg.node_name,
        ))
    };
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
    let mut link_check = tokio::time::interval(cfg.poll_interval);
    // Events can be lost (a full socket buffer says so, but a bug might
    // not): everything is listed again now and then regardless.
    let mut rescan = tokio::time::interval(SAFETY_RESCAN);
    rescan.tick().await;
    let mut conntrack_gc = tokio::time::interval(cfg.conntrack_gc_interval);
    let mut resync = tokio::time::interval(cfg.resync_interval);
    // The first tick of an interval is immediate; the initial sync is the
    // source's first change instead.
    resync.tick().await;
    let mut generation: u64 = 0;
    let mut synced = false;
    // Writes that failed or did not fit are tried again soon, backing off
    // while they keep failing (a full map frees up when the operator acts or
    // Services go).
    let mut retry_delay = RETRY_FIRST;
    let mut retry_at: Option<tokio::time::Instant> = None;
    // Why the source cannot be read, during an outage.
    let mut unavailable: Option<String> = None;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        let full = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            // Before any sync when the source is slow or down: the hooks
            // go on as soon as they can, as they always did.
            verified = async { verifying.as_mut().expect("guarded").await }, if verifying.is_some() => {
                verifying = None;
                hooks = Some(start_hooks(verified, &mut syncer, &mut upkeep, &cfg, &mut attach_failing)?);
                continue;
            }
            _ = source.changed() => {
                let changes = source.take_changes();
                noticed = Some(changes.since.unwrap_or_else(Instant::now));
                source_outage(&metrics, &mut unavailable, changes.unavailable.clone());
                syncer.take(changes);
                false
            }
            _ = resync.tick(), if synced => true,
            // A sync follows, which sets the next retry if one is due.
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(far_future)), if retry_at.is_some() => false,
            _ = link_check.tick() => {
                keep_pins(syncer.datapath_mut(), hooks.as_mut(), &metrics);
                if !hooks.as_mut().is_some_and(check_links) && link_events.is_some() {
                    continue;
                }
                // New node addresses change the NodePort frontends; before
                // the first sync they are simply used by it.
                if !(rescan_interfaces(&mut syncer, hooks.as_mut(), &cfg, &mut attach_failing) && synced) {
                    continue;
                }
                false
            }
            changed = link_event(&link_events) => {
                if let Err(e) = changed {
                    tracing::warn!(error = %e, "netlink interface events failed: interfaces are listed at every poll interval");
                    link_events = None;
                }
                // New node addresses change the NodePort frontends; before
                // the first sync they are simply used by it.
                if !(rescan_interfaces(&mut syncer, hooks.as_mut(), &cfg, &mut attach_failing) && synced) {
                    continue;
                }
                false
            }
            _ = rescan.tick() => {
                // New node addresses change the NodePort frontends; before
                // the first sync they are simply used by it.
                if !(rescan_interfaces(&mut syncer, hooks.as_mut(), &cfg, &mut attach_failing) && synced) {
                    continue;
                }
                false
            }
            _ = conntrack_gc.tick() => {
                for sweep in upkeep.collect_conntrack() {
                    tracing::debug!(map = sweep.map, deleted = sweep.deleted, "conntrack garbage collected");
                    metrics.set_map_entries(sweep.map, sweep.remaining);
                    if sweep.near_full() {
                        metrics.record_conntrack_near_full(sweep.map);
                        tracing::warn!(
                            map = sweep.map,
                            entries = sweep.remaining,
                            capacity = sweep.capacity,
                            "conntrack map nearly full: new flows evict idle ones of its kind; raise {}",
                            crate::datapath::capacity_flag(sweep.map).unwrap_or("its capacity")
                        );
                    }
                }
                continue;
            }
            _ = metrics_tick.tick() => {
                match upkeep.stats() {
                    Ok(stats) => metrics.observe_datapath(&stats),
                    Err(e) => tracing::debug!(error = %e, "reading datapath counters"),
                }
                continue;
            }
        };
        let started = Instant::now();
        if full {
            // Someone may have edited a map by hand: diff against what the
            // kernel really holds, not against memory.
            syncer.prepare_resync();
        }
        let (out, after) = syncer.sync();
        after.tidy(&mut upkeep, syncer.live());
        let written = Instant::now();
        if out.ops >= LARGE_SYNC_OPS {
            crate::yaml_limits::release_freed_memory();
        }
        // Programmed means served: a sync that beat the verifier waits for
        // the programs and attaches them before it says so.
        if let Some(pending) = verifying.take() {
            hooks = Some(start_hooks(
                pending.await,
                &mut syncer,
                &mut upkeep,
                &cfg,
                &mut attach_failing,
            )?);
        }
        let noticed = noticed.take().filter(|_| !full);
        metrics.record_sync(
            syncer.object_counts(),
            syncer.nodes(),
            syncer.live(),
            &out,
            started.elapsed(),
            noticed,
        );
        // Failures are logged by the servers and retried at the next sync.
        health.set_addresses(health_addresses(&cfg, &syncer)).await;
        health.update(syncer.health_checks()).await;
        synced = true;
        generation += 1;
        if syncer.needs_retry() {
            retry_at = Some(tokio::time::Instant::now() + retry_delay);
            retry_delay = (retry_delay * 2).min(RETRY_MAX);
        } else {
            retry_at = None;
            retry_delay = RETRY_FIRST;
        }
        // since_event_us: from the source's first event of this batch to
        // the last map write (what kep_network_programming_duration_seconds
        // observes); took_us: the sync itself.
        tracing::info!(
            "datapath programmed generation={generation} frontends={} backends={} ops={} failed={} took_us={} since_event_us={}",
            out.frontends,
            out.backends,
            out.ops,
            out.failed,
            written.duration_since(started).as_micros(),
            noticed.map_or(0, |n| written.saturating_duration_since(n).as_micros()),
        );
    }
    tracing::info!(
        "stopping; pinned maps stay under {}",
        cfg.datapath.bpffs.display()
    );
    Ok(())
}
