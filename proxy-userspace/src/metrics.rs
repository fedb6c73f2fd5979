//! Prometheus metrics and health endpoints of the agent, at kube-proxy's
//! URLs: the metrics server (`--metrics-bind-address`, 127.0.0.1:10249)
//! answers `/metrics`, `/proxyMode` and a plain `/healthz`; the health
//! server (`--healthz-bind-address`, 0.0.0.0:10256) answers `/healthz`,
//! `/livez` and `/readyz`.
//!
//! The control loop records into [`Metrics`]; [`serve`] answers from what
//! was recorded, on the HTTP servers' own thread ([`http`]), so neither a
//! long sync nor hostile clients keep a probe from being answered. The
//! servers never touch the datapath; datapath counters are copied into the
//! registry by the loop once a second ([`Metrics::observe_datapath`]).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Node;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::{map_names, stat};

use std::collections::BTreeMap;

use crate::{contents::MapContents, http};

/// What one sync did: what [`Metrics::record_sync`] records and the
/// agent's `datapath programmed` line prints (its own type here, so the
/// agent uses the metrics and never the other way round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub frontends: usize,
    pub backends: usize,
    pub ops: usize,
    pub failed: usize,
    /// Failed writes because a map was full, by map name.
    pub full: BTreeMap<&'static str, usize>,
    /// Warnings standing after it (objects, ports or files skipped).
    pub skipped: usize,
    /// Objects it could not program as desired (a map full, a failed
    /// write): retried, and `/readyz` says so meanwhile.
    pub incomplete: usize,
    /// Load-balancer and external IPs refused as another Service's
    /// cluster IP.
    pub refused: usize,
}

/// One label, e.g. `map="kep_services"`.
type Label = [(&'static str, &'static str); 1];

/// Connections open at once on the metrics server, and on the health
/// server; past that the oldest of the busiest peer is closed
/// ([`http::Connections`]).
const METRICS_CONNECTIONS: usize = 32;
const HEALTH_CONNECTIONS: usize = 64;
/// Wait before binding again when the address is unavailable.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// What `/proxyMode` answers. kube-proxy answers its `--proxy-mode`
/// (`iptables`, `ipvs`, `nftables`); this proxy is none of those.
pub const PROXY_MODE: &str = "ebpf";
/// The taint the cluster autoscaler puts on a node it is about to delete
/// (kube-proxy's `ToBeDeletedTaint`): load balancers should drain it.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Everything the agent exports, plus what the health endpoints need.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    programming_duration: Histogram,
    objects: Family<Label, Gauge>,
    objects_skipped: Gauge,
    incomplete: Gauge,
    ips_refused: Gauge,
    source_available: Gauge,
    map_entries: Family<Label, Gauge>,
    map_update_errors: Counter,
    map_full: Family<Label, Counter>,
    conntrack_near_full: Family<Label, Counter>,
    datapath_packets: Family<Label, Counter>,
    connections_shed: Family<Label, Counter>,
    /// This node's name, to find its Node object.
    node_name: String,
    health: Mutex<Health>,
}

struct Health {
    started: Instant,
    /// 2 x the resync interval, as kube-proxy uses 2 x its sync period.
    timeout: Duration,
    /// The last sync that ran to completion (monotonic and wall clock).
    last_sync: Option<(Instant, SystemTime)>,
    /// Whether this node may take traffic: not being deleted, not tainted
    /// for deletion (true until its Node object says otherwise).
    node_eligible: bool,
    /// Why the datapath is not as the agent keeps it (its pins cannot be
    /// restored): unhealthy while set.
    datapath_fault: Option<String>,
    /// Objects the last sync could not program: not ready while any.
    incomplete: usize,
    /// Why the source cannot be read, during an outage.
    source_unavailable: Option<String>,
}

/// What a health endpoint answers: the status code and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Metrics {
    /// `resync_interval` sets the `/healthz` deadline; `capacity` gives the
    /// maps' real sizes (`max_entries` by name); `node_name` is this node's.
    pub fn new(
        capacity: impl Fn(&'static str) -> u32,
        resync_interval: Duration,
        node_name: &str,
    ) -> Self {
        // The encoder ends each help text with a period and adds `_total`
        // to counter names.
        let mut registry = Registry::default();
        // 1 ms .. ~16 s.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "kep_sync_duration_seconds",
            "Time one sync took: reading the source's snapshot, computing the \
             desired maps, diffing and writing them (kube-proxy's \
             sync_proxy_rules_duration_seconds). Resyncs included",
            sync_duration.clone(),
        );
        // 0.1 ms .. ~13 s: one change is programmed in well under a
        // millisecond, so the buckets start there.
        let programming_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "kep_network_programming_duration_seconds",
            "Time from the moment the agent noticed a change in its source (the \
             watch or manifest poll reported it) to the datapath maps being \
             updated. Unlike kube-proxy's network_programming_duration_seconds \
             it does not start at the object's last-change annotation, so the \
             API server's and the watch's delay, and up to one manifest poll \
             interval, are not included. Periodic resyncs are not counted",
            programming_duration.clone(),
        );
        let objects = Family::<Label, Gauge>::default();
        registry.register(
            "kep_objects",
            "Objects the source held at the last sync, by kind",
            objects.clone(),
        );
        let objects_skipped = Gauge::default();
        registry.register(
            "kep_objects_skipped",
            "Warnings of the last sync: objects, ports or files skipped because \
             they were invalid or unsupported",
            objects_skipped.clone(),
        );
        let incomplete = Gauge::default();
        registry.register(
            "kep_programming_incomplete",
            "Objects (Service ports, or backends and tables) the last sync could \
             not program as desired: a map was full or a write failed. They keep \
             what they had, are retried with backoff, and /readyz fails meanwhile",
            incomplete.clone(),
        );
        let ips_refused = Gauge::default();
        registry.register(
            "kep_service_ips_refused",
            "Load-balancer and external IPs not served because they are another \
             Service's cluster IP (the cluster IP keeps the address; kube-proxy \
             would let them take it, CVE-2020-8554), one per Service and address",
            ips_refused.clone(),
        );
        let source_available = Gauge::default();
        registry.register(
            "kep_source_available",
            "1 while the source (API server watches, manifest directory) can be \
             read; 0 during an outage, while the maps keep what they had and \
             /readyz answers 503",
            source_available.clone(),
        );
        source_available.set(1);
        let map_entries = Family::<Label, Gauge>::default();
        registry.register(
            "kep_map_entries",
            "Entries in a datapath map. kep_services and kep_backends are \
             updated at each sync; kep_ct_tcp and kep_ct_other at each \
             conntrack garbage collection",
            map_entries.clone(),
        );
        let map_capacity = Family::<Label, Gauge>::default();
        registry.register(
            "kep_map_capacity",
            "Maximum entries of a datapath map",
            map_capacity.clone(),
        );
        for name in [
            map_names::SERVICES,
            map_names::BACKENDS,
            map_names::CONNTRACK_TCP,
            map_names::CONNTRACK_OTHER,
            map_names::MAGLEV,
            map_names::SOURCE_RANGES,
        ] {
            map_capacity
                .get_or_create(&[("map", name)])
                .set(i64::from(capacity(name)));
        }
        let map_update_errors = Counter::default();
        registry.register(
            "kep_map_update_errors",
            "Datapath map writes or deletes that failed (the rest of the sync \
             still applied)",
            map_update_errors.clone(),
        );
        let map_full = Family::<Label, Counter>::default();
        registry.register(
            "kep_map_full_errors",
            "Map writes refused because the map was full, by map: raise its \
             capacity flag (--services-max, --backends-max, --maglev-max, \
             --source-ranges-max); the entries that fit stay programmed",
            map_full.clone(),
        );
        let conntrack_near_full = Family::<Label, Counter>::default();
        registry.register(
            "kep_conntrack_near_full",
            "Conntrack garbage collections that found a conntrack map at least \
             90 % full (the LRU map then evicts idle flows of its kind to make \
             room), by map: raise --conntrack-max (kep_ct_tcp) or \
             --conntrack-other-max (kep_ct_other)",
            conntrack_near_full.clone(),
        );
        for name in map_names::CONNTRACK {
            // Present at 0 from the start, so an alert can tell "never" from
            // "no agent".
            let _ = conntrack_near_full.get_or_create(&[("map", name)]);
        }
        let datapath_packets = Family::<Label, Counter>::default();
        registry.register(
            "kep_datapath_packets",
            "Datapath counters (packets, or sockets for sock_translated) summed \
             over CPUs, copied from the kep_stats map once a second",
            datapath_packets.clone(),
        );
        for name in stat::NAMES {
            let _ = datapath_packets.get_or_create(&[("counter", name)]);
        }
        let connections_shed = Family::<Label, Counter>::default();
        registry.register(
            "kep_http_connections_shed",
            "Connections to the agent's HTTP servers closed before their \
             request was answered, to make room for new ones (too many open \
             at once: a client holding connections idle or sending slowly)",
            connections_shed.clone(),
        );
        for server in [SERVER_METRICS, SERVER_HEALTH] {
            let _ = connections_shed.get_or_create(&[("server", server)]);
        }
        Self {
            registry,
            sync_duration,
            programming_duration,
            objects,
            objects_skipped,
            incomplete,
            ips_refused,
            source_available,
            map_entries,
            map_update_errors,
            map_full,
            conntrack_near_full,
            datapath_packets,
            connections_shed,
            node_name: node_name.to_string(),
            health: Mutex::new(Health {
                started: Instant::now(),
                timeout: resync_interval.saturating_mul(2),
                last_sync: None,
                node_eligible: true,
                datapath_fault: None,
                incomplete: 0,
                source_unavailable: None,
            }),
        }
    }

    /// Records a finished sync. `took` is its duration; `noticed` is when
    /// the source reported the change it was for (`None` for a resync);
    /// `out.skipped` the number of warnings standing.
    pub fn record_sync<'a>(
        &self,
        (services, slices, node_count): (usize, usize, usize),
        nodes: impl IntoIterator<Item = &'a Node>,
        live: &MapContents,
        out: &SyncOutcome,
        took: Duration,
        noticed: Option<Instant>,
    ) {
        let now = Instant::now();
        self.sync_duration.observe(took.as_secs_f64());
        if let Some(noticed) = noticed {
            self.programming_duration
                .observe(now.saturating_duration_since(noticed).as_secs_f64());
        }
        for (kind, n) in [
            ("service", services),
            ("endpointslice", slices),
            ("node", node_count),
        ] {
            self.objects.get_or_create(&[("kind", kind)]).set(gauge(n));
        }
        self.objects_skipped.set(gauge(out.skipped));
        self.incomplete.set(gauge(out.incomplete));
        self.ips_refused.set(gauge(out.refused));
        let v6 = |addr: &crate::contents::MapAddr| matches!(addr, crate::contents::MapAddr::V6(_));
        let services6 = live.services.keys().filter(|k| v6(&k.addr)).count();
        let backends6 = live.backends.values().filter(|b| v6(&b.addr)).count();
        self.set_map_entries(map_names::SERVICES, live.services.len() - services6);
        self.set_map_entries(map_names::BACKENDS, live.backends.len() - backends6);
        self.set_map_entries(map_names::SERVICES6, services6);
        self.set_map_entries(map_names::BACKENDS6, backends6);
        self.map_update_errors.inc_by(out.failed as u64);
        for (map, n) in &out.full {
            self.map_full
                .get_or_create(&[("map", *map)])
                .inc_by(*n as u64);
        }
        let eligible = node_eligible(nodes, &self.node_name);
        let mut health = self.lock_health();
        health.last_sync = Some((now, SystemTime::now()));
        health.node_eligible = eligible;
        health.incomplete = out.incomplete;
    }

    /// A conntrack garbage collection found conntrack map `name` nearly
    /// full.
    pub fn record_conntrack_near_full(&self, name: &'static str) {
        self.conntrack_near_full
            .get_or_create(&[("map", name)])
            .inc();
    }

    /// Sets the entry count of map `name` (e.g. after counting conntrack).
    pub fn set_map_entries(&self, name: &'static str, entries: usize) {
        self.map_entries
            .get_or_create(&[("map", name)])
            .set(gauge(entries));
    }

    /// Copies the datapath counters (`Datapath::stats()`, indexed by
    /// `proxy_common::stat`).
    pub fn observe_datapath(&self, stats: &[u64; stat::COUNT as usize]) {
        for (name, value) in stat::NAMES.iter().zip(stats) {
            self.datapath_packets
                .get_or_create(&[("counter", name)])
                .inner()
                .store(*value, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The counter of connections shed by HTTP server `server` (a label
    /// value, e.g. `service-health-check`).
    pub fn connections_shed(&self, server: &'static str) -> Counter {
        self.connections_shed
            .get_or_create(&[("server", server)])
            .clone()
    }

    /// The exposition in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// `/healthz` of the health server, as kube-proxy's: the proxy is
    /// healthy (see [`Metrics::livez`]) and this node is eligible (not
    /// being deleted nor tainted `ToBeDeletedByClusterAutoscaler`), so load
    /// balancers of `externalTrafficPolicy: Cluster` Services drain a node
    /// on its way out.
    pub fn healthz(&self) -> Answer {
        self.healthz_at(Instant::now(), SystemTime::now())
    }

    /// `/livez`: the proxy alone, whatever the node (a liveness probe must
    /// not restart the agent of a node being drained). Healthy while the
    /// last completed sync is less than 2 x the resync interval old, or,
    /// before the first sync, while the agent is younger than that.
    pub fn livez(&self) -> Answer {
        self.livez_at(Instant::now(), SystemTime::now())
    }

    /// The proxy's own health ([`Metrics::livez`]), as the service health
    /// checks report it in `serviceProxyHealthy` (kube-proxy's
    /// `IsHealthy`).
    pub fn proxy_healthy(&self) -> bool {
        self.lock_health().healthy_at(Instant::now())
    }

    fn healthz_at(&self, now: Instant, wall: SystemTime) -> Answer {
        let h = self.lock_health();
        let healthy = h.healthy_at(now) && h.node_eligible;
        Answer {
            status: if healthy { 200 } else { 503 },
            body: format!(
                "{{\"lastUpdated\": {},\"currentTime\": \"{}\", \"nodeEligible\": {}}}",
                h.last_updated(),
                rfc3339(wall),
                h.node_eligible
            ),
        }
    }

    fn livez_at(&self, now: Instant, wall: SystemTime) -> Answer {
        let h = self.lock_health();
        Answer {
            status: if h.healthy_at(now) { 200 } else { 503 },
            body: format!(
                "{{\"lastUpdated\": {},\"currentTime\": \"{}\"}}",
                h.last_updated(),
                rfc3339(wall)
            ),
        }
    }

    /// Records whether the source can be read (`None`) or why not.
    pub fn set_source_unavailable(&self, why: Option<String>) {
        self.source_available.set(i64::from(why.is_none()));
        self.lock_health().source_unavailable = why;
    }

    /// `/readyz`: ready once the first sync wrote the datapath, while the
    /// last one programmed everything, and while the source can be read
    /// (during an outage the maps keep what they had, which may be stale).
    pub fn readyz(&self) -> Answer {
        let h = self.lock_health();
        let synced = h.last_sync.is_some();
        let reason = if !synced {
            Some("not synced yet".to_string())
        } else if h.incomplete > 0 {
            Some(format!(
                "programming incomplete: {} objects not programmed",
                h.incomplete
            ))
        } else {
            h.source_unavailable
                .as_ref()
                .map(|_| "source unavailable".to_string())
        };
        let source = h
            .source_unavailable
            .as_ref()
            .map(|why| {
                format!(
                    ", \"sourceUnavailable\": {}",
                    serde_json::Value::from(why.as_str())
                )
            })
            .unwrap_or_default();
        match reason {
            None => Answer {
                status: 200,
                body: "{\"ready\": true}".into(),
            },
            Some(reason) => Answer {
                status: 503,
                body: format!(
                    "{{\"ready\": false, \"reason\": {}{source}}}",
                    serde_json::Value::from(reason)
                ),
            },
        }
    }

    /// Sets why the datapath is broken (`None`: it is not); returns the
    /// new state when it changed.
    pub fn set_datapath_fault(&self, fault: Option<String>) -> Option<Option<String>> {
        let mut h = self.lock_health();
        if h.datapath_fault == fault {
            return None;
        }
        h.datapath_fault = fault.clone();
        Some(fault)
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Health {
    fn healthy_at(&self, now: Instant) -> bool {
        let since = self.last_sync.map_or(self.started, |(at, _)| at);
        now.saturating_duration_since(since) < self.timeout && self.datapath_fault.is_none()
    }

    /// The last completed sync as a JSON string, `null` before the first.
    fn last_updated(&self) -> String {
        self.last_sync.map_or_else(
            || "null".to_string(),
            |(_, wall)| format!("\"{}\"", rfc3339(wall)),
        )
    }
}

/// Whether node `name` may take traffic: its Node object (if the source has
/// it) is neither being deleted nor tainted for deletion.
fn node_eligible<'a>(nodes: impl IntoIterator<Item = &'a Node>, name: &str) -> bool {
    let Some(node) = nodes
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
    else {
        return true;
    };
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `server` label values of `kep_http_connections_shed`.
const SERVER_METRICS: &str = "metrics";
const SERVER_HEALTH: &str = "healthz";

/// Starts the metrics server on `metrics_addr` and the health server on
/// `healthz_addr` (`None`: not served), on the HTTP servers' thread. A
/// failed bind is logged and retried, as kube-proxy does, so a busy port
/// never stops the datapath from being programmed.
pub fn serve(
    metrics_addr: Option<SocketAddr>,
    healthz_addr: Option<SocketAddr>,
    metrics: &Arc<Metrics>,
) {
    if let Some(addr) = metrics_addr {
        let m = metrics.clone();
        let connections = http::Connections::new(
            METRICS_CONNECTIONS,
            metrics.connections_shed(SERVER_METRICS),
        );
        http::spawn(listen_and_serve(
            addr,
            "metrics server",
            "/metrics and /proxyMode",
            connections,
            Arc::new(move |head: &str| metrics_response(head, &m)),
        ));
    }
    if let Some(addr) = healthz_addr {
        let m = metrics.clone();
        let connections =
            http::Connections::new(HEALTH_CONNECTIONS, metrics.connections_shed(SERVER_HEALTH));
        http::spawn(listen_and_serve(
            addr,
            "health server",
            "/healthz, /livez and /readyz",
            connections,
            Arc::new(move |head: &str| health_response(head, &m)),
        ));
    }
}

async fn listen_and_serve(
    addr: SocketAddr,
    what: &'static str,
    paths: &'static str,
    connections: Arc<http::Connections>,
    respond: Arc<http::Responder>,
) {
    let listener = loop {
        match http::listen(addr) {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "{what}: bind failed; retrying");
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    tracing::info!(%addr, "serving {paths}");
    http::serve(listener, what, connections, respond).await
}

/// The metrics server's response to a request head.
fn metrics_response(head: &str, metrics: &Metrics) -> Vec<u8> {
    let (method, path) = http::request_line(head);
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return response(405, "text/plain", "method not allowed\n", with_body);
    }
    match path {
        "/metrics" => response(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &metrics.render(),
            with_body,
        ),
        "/proxyMode" => response(200, "text/plain; charset=utf-8", PROXY_MODE, with_body),
        // kube-proxy's metrics port has the generic liveness ping here; the
        // proxy's health is the health server's /healthz.
        "/healthz" => response(200, "text/plain; charset=utf-8", "ok", with_body),
        _ => response(404, "text/plain", "not found\n", with_body),
    }
}

/// The health server's response to a request head.
fn health_response(head: &str, metrics: &Metrics) -> Vec<u8> {
    let (method, path) = http::request_line(head);
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return response(405, "text/plain", "method not allowed\n", with_body);
    }
    let a = match path {
        "/healthz" => metrics.healthz(),
        "/livez" => metrics.livez(),
        "/readyz" => metrics.readyz(),
        _ => return response(404, "text/plain", "not found\n", with_body),
    };
    response(a.status, "application/json", &a.body, with_body)
}

/// With `X-Content-Type-Options: nosniff`, as kube-proxy's answers.
fn response(status: u16, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let nosniff = [("X-Content-Type-Options", "nosniff".to_string())];
    http::response(status, content_type, &nosniff, body, with_body)
}

/// `2006-01-02T15:04:05.000000000Z` (UTC), as Go's `time.Time` marshals.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut s = String::new();
    let _ = write!(
        s,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use crate::datapath::DatapathConfig;
    use crate::source::Objects;

    fn metrics(resync: Duration) -> Metrics {
        let cfg = DatapathConfig::new("/sys/fs/bpf/test");
        Metrics::new(
            move |name| match name {
                map_names::SERVICES => cfg.services_max,
                _ => 1,
            },
            resync,
            "node-a",
        )
    }

    fn sync(m: &Metrics, objects: &Objects) {
        m.record_sync(
            (
                objects.services.len(),
                objects.slices.len(),
                objects.nodes.len(),
            ),
            &objects.nodes,
            &MapContents::default(),
            &outcome(0),
            Duration::ZERO,
            None,
        );
    }

    fn node(name: &str, taint: Option<&str>, deleting: bool) -> Node {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"taints": taint.map(|key| vec![
                serde_json::json!({"key": key, "effect": "NoSchedule"})
            ])},
        }))
        .unwrap();
        if deleting {
            node.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        node
    }

    fn outcome(failed: usize) -> SyncOutcome {
        SyncOutcome {
            frontends: 1,
            backends: 2,
            ops: 3,
            failed,
            full: [(map_names::SERVICES, failed)].into_iter().collect(),
            skipped: 0,
            incomplete: 0,
            refused: failed,
        }
    }

    /// The value of the sample line starting with `prefix` (name and labels).
    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    #[test]
    fn rfc3339_formats_utc() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn renders_every_family() {
        let m = metrics(Duration::from_secs(60));
        let objects = (0, 0, 0);
        let mut live = MapContents::default();
        live.backends
            .insert(1, crate::contents::AnyBackend::default());
        m.record_sync(
            objects,
            [],
            &live,
            &outcome(2),
            Duration::from_millis(3),
            Some(Instant::now()),
        );
        m.record_sync(objects, [], &live, &outcome(1), Duration::ZERO, None);
        let mut stats = [0u64; stat::COUNT as usize];
        stats[stat::NEW_FLOWS as usize] = 42;
        m.observe_datapath(&stats);
        m.set_map_entries(map_names::CONNTRACK_OTHER, 7);
        let text = m.render();
        let expect = [
            ("kep_sync_duration_seconds_count", 2.0),
            ("kep_network_programming_duration_seconds_count", 1.0),
            ("kep_objects{kind=\"service\"}", 0.0),
            ("kep_objects_skipped", 0.0),
            ("kep_service_ips_refused", 1.0),
            ("kep_source_available", 1.0),
            ("kep_map_entries{map=\"kep_backends\"}", 1.0),
            ("kep_map_entries{map=\"kep_ct_other\"}", 7.0),
            (
                "kep_map_capacity{map=\"kep_services\"}",
                f64::from(proxy_common::defaults::SERVICES_MAX),
            ),
            ("kep_map_update_errors_total", 3.0),
            ("kep_map_full_errors_total{map=\"kep_services\"}", 3.0),
            ("kep_datapath_packets_total{counter=\"new_flows\"}", 42.0),
            ("kep_datapath_packets_total{counter=\"drops\"}", 0.0),
        ];
        for (prefix, value) in expect {
            assert_eq!(sample(&text, prefix), Some(value), "{prefix} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn health_follows_syncs() {
        let m = metrics(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(m.readyz().status, 503);
        // Within the first sync window: healthy, never synced.
        let a = m.healthz_at(t0, SystemTime::now());
        assert_eq!(a.status, 200);
        assert!(a.body.contains("\"lastUpdated\": null"), "{}", a.body);
        // Past it without a sync: unhealthy.
        assert_eq!(
            m.healthz_at(t0 + Duration::from_secs(21), SystemTime::now())
                .status,
            503
        );
        sync(&m, &Objects::default());
        assert_eq!(m.readyz().status, 200);
        // A source outage: not ready (the maps are kept), then ready again.
        m.set_source_unavailable(Some("cannot list \"/x\"".into()));
        let a = m.readyz();
        assert_eq!(a.status, 503);
        let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(body["sourceUnavailable"], "cannot list \"/x\"");
        assert!(m.render().contains("kep_source_available 0"));
        m.set_source_unavailable(None);
        assert_eq!(m.readyz().status, 200);
        assert!(m.render().contains("kep_source_available 1"));
        let now = Instant::now();
        let a = m.healthz_at(now + Duration::from_secs(19), SystemTime::now());
        assert_eq!(a.status, 200);
        assert!(a.body.contains("\"lastUpdated\": \""), "{}", a.body);
        assert!(a.body.contains("\"currentTime\": \""), "{}", a.body);
        assert_eq!(
            m.healthz_at(now + Duration::from_secs(21), SystemTime::now())
                .status,
            503
        );
        assert_eq!(
            m.livez_at(now + Duration::from_secs(21), SystemTime::now())
                .status,
            503
        );
    }

    /// A datapath whose pins cannot be restored fails /healthz and /livez
    /// until it is restored; objects left unprogrammed fail /readyz with
    /// the reason.
    #[test]
    fn datapath_faults_and_incomplete_programming_are_reported() {
        let m = metrics(Duration::from_secs(60));
        sync(&m, &Objects::default());
        let now = Instant::now();
        assert_eq!(m.set_datapath_fault(None), None, "no change");
        assert_eq!(
            m.set_datapath_fault(Some("gone".into())),
            Some(Some("gone".into()))
        );
        assert_eq!(m.set_datapath_fault(Some("gone".into())), None);
        assert_eq!(m.healthz_at(now, SystemTime::now()).status, 503);
        assert_eq!(m.livez_at(now, SystemTime::now()).status, 503);
        assert!(!m.proxy_healthy());
        assert_eq!(m.set_datapath_fault(None), Some(None));
        assert_eq!(m.livez_at(now, SystemTime::now()).status, 200);

        assert_eq!(m.readyz().status, 200);
        let mut out = outcome(0);
        out.incomplete = 2;
        m.record_sync(
            (0, 0, 0),
            [],
            &MapContents::default(),
            &out,
            Duration::ZERO,
            None,
        );
        let a = m.readyz();
        assert_eq!(a.status, 503);
        assert!(
            a.body.contains("programming incomplete: 2 objects"),
            "{}",
            a.body
        );
        assert_eq!(sample(&m.render(), "kep_programming_incomplete"), Some(2.0));
        m.record_sync(
            (0, 0, 0),
            [],
            &MapContents::default(),
            &outcome(0),
            Duration::ZERO,
            None,
        );
        assert_eq!(m.readyz().status, 200);
    }

    /// kube-proxy's node eligibility: a node being deleted, or tainted by
    /// the cluster autoscaler for deletion, fails /healthz (load balancers
    /// drain it) but not /livez (no restart) nor the service health checks.
    #[test]
    fn node_on_its_way_out_fails_healthz_only() {
        let m = metrics(Duration::from_secs(60));
        let now = Instant::now();
        let eligible = |m: &Metrics| {
            let a = m.healthz_at(now, SystemTime::now());
            let live = m.livez_at(now, SystemTime::now());
            assert_eq!(live.status, 200, "{}", live.body);
            assert!(!live.body.contains("nodeEligible"), "{}", live.body);
            assert!(m.proxy_healthy());
            let flag = a.body.contains("\"nodeEligible\": true");
            assert_eq!(a.status == 200, flag, "{}", a.body);
            flag
        };
        let with = |nodes: Vec<Node>| Objects {
            nodes,
            ..Default::default()
        };
        assert!(eligible(&m), "no Node object: eligible");
        sync(
            &m,
            &with(vec![node("node-a", Some("example.com/other"), false)]),
        );
        assert!(eligible(&m));
        sync(
            &m,
            &with(vec![node("node-a", Some(TO_BE_DELETED_TAINT), false)]),
        );
        assert!(!eligible(&m), "tainted for deletion");
        // Another node's taint is not ours.
        sync(
            &m,
            &with(vec![node("node-b", Some(TO_BE_DELETED_TAINT), false)]),
        );
        assert!(eligible(&m));
        sync(&m, &with(vec![node("node-a", None, true)]));
        assert!(!eligible(&m), "being deleted");
        sync(&m, &with(vec![node("node-a", None, false)]));
        assert!(eligible(&m));
    }

    /// kube-proxy's URLs: metrics, proxyMode and a plain healthz on the
    /// metrics server; healthz, livez (and our readyz) on the health server.
    #[test]
    fn routes_requests() {
        let m = metrics(Duration::from_secs(60));
        let on_metrics = |head: &str| String::from_utf8(metrics_response(head, &m)).unwrap();
        let on_health = |head: &str| String::from_utf8(health_response(head, &m)).unwrap();
        let r = on_metrics("GET /metrics HTTP/1.1\r\nHost: x");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("kep_map_capacity"), "{r}");
        let r = on_metrics("GET /proxyMode HTTP/1.1");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("Content-Type: text/plain; charset=utf-8\r\n")
                && r.contains("X-Content-Type-Options: nosniff\r\n")
                && r.ends_with("\r\n\r\nebpf"),
            "{r}"
        );
        assert!(on_metrics("GET /healthz HTTP/1.1").ends_with("\r\n\r\nok"));
        assert!(on_metrics("GET /livez HTTP/1.1").starts_with("HTTP/1.1 404 "));
        assert!(on_metrics("GET /nope HTTP/1.1").starts_with("HTTP/1.1 404 "));
        assert!(on_metrics("POST /metrics HTTP/1.1").starts_with("HTTP/1.1 405 "));
        let head = on_metrics("HEAD /metrics HTTP/1.1");
        assert!(head.ends_with("\r\n\r\n"), "{head}");

        assert!(on_health("GET /readyz HTTP/1.1").starts_with("HTTP/1.1 503 "));
        for path in ["/healthz?verbose", "/livez"] {
            let r = on_health(&format!("GET {path} HTTP/1.1"));
            assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
            assert!(r.contains("Content-Type: application/json\r\n"), "{r}");
            assert!(r.contains("X-Content-Type-Options: nosniff\r\n"), "{r}");
        }
        assert!(on_health("GET /metrics HTTP/1.1").starts_with("HTTP/1.1 404 "));
        assert!(on_health("GET /proxyMode HTTP/1.1").starts_with("HTTP/1.1 404 "));
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let m = Arc::new(metrics(Duration::from_secs(60)));
        let respond = {
            let m = m.clone();
            Arc::new(move |head: &str| metrics_response(head, &m))
        };
        let connections = http::Connections::new(4, m.connections_shed(SERVER_METRICS));
        let server = http::spawn(listen_and_serve(
            addr,
            "test",
            "/metrics",
            connections,
            respond,
        ));
        let mut body = String::new();
        for _ in 0..100 {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                    .await
                    .unwrap();
                s.read_to_string(&mut body).await.unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.abort();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("kep_datapath_packets_total"), "{body}");
    }
}
