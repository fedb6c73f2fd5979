//! Prometheus metrics and health endpoints of the agent (kube-proxy's
//! `--metrics-bind-address` and `--healthz-bind-address`, served on one
//! address).
//!
//! The control loop records into [`Metrics`]; [`serve`] answers
//! `GET /metrics`, `/healthz` and `/readyz` from what was recorded, on the
//! agent's own (single-threaded) tokio runtime. The server only awaits
//! sockets and never touches the datapath, so it cannot hold up the loop;
//! datapath counters are copied into the registry by the loop once a second
//! ([`Metrics::observe_datapath`]).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

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
use tokio::net::TcpListener;

use std::collections::BTreeMap;

use crate::{contents::MapContents, datapath::DatapathConfig, http};

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
}

/// One label, e.g. `map="kep_services"`.
type Label = [(&'static str, &'static str); 1];

/// Connections served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 16;
/// Wait before binding again when the address is unavailable.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Everything the agent exports, plus what `/healthz` and `/readyz` need.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    programming_duration: Histogram,
    objects: Family<Label, Gauge>,
    objects_skipped: Gauge,
    map_entries: Family<Label, Gauge>,
    map_update_errors: Counter,
    map_full: Family<Label, Counter>,
    datapath_packets: Family<Label, Counter>,
    health: Mutex<Health>,
}

struct Health {
    started: Instant,
    /// 2 x the resync interval, as kube-proxy uses 2 x its sync period.
    timeout: Duration,
    /// The last sync that ran to completion (monotonic and wall clock).
    last_sync: Option<(Instant, SystemTime)>,
}

/// What a health endpoint answers: the status code and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Metrics {
    /// `resync_interval` sets the `/healthz` deadline; `datapath` gives the
    /// map capacities.
    pub fn new(datapath: &DatapathConfig, resync_interval: Duration) -> Self {
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
        let map_entries = Family::<Label, Gauge>::default();
        registry.register(
            "kep_map_entries",
            "Entries in a datapath map. kep_services and kep_backends are \
             updated at each sync; kep_conntrack at each conntrack garbage \
             collection",
            map_entries.clone(),
        );
        let map_capacity = Family::<Label, Gauge>::default();
        registry.register(
            "kep_map_capacity",
            "Maximum entries of a datapath map",
            map_capacity.clone(),
        );
        for (name, max) in [
            (map_names::SERVICES, datapath.services_max),
            (map_names::BACKENDS, datapath.backends_max),
            (map_names::CONNTRACK, datapath.conntrack_max),
        ] {
            map_capacity
                .get_or_create(&[("map", name)])
                .set(i64::from(max));
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
        Self {
            registry,
            sync_duration,
            programming_duration,
            objects,
            objects_skipped,
            map_entries,
            map_update_errors,
            map_full,
            datapath_packets,
            health: Mutex::new(Health {
                started: Instant::now(),
                timeout: resync_interval.saturating_mul(2),
                last_sync: None,
            }),
        }
    }

    /// Records a finished sync. `took` is its duration; `noticed` is when
    /// the source reported the change it was for (`None` for a resync);
    /// `skipped` the number of warnings it had.
    pub fn record_sync(
        &self,
        (services, slices, nodes): (usize, usize, usize),
        live: &MapContents,
        out: &SyncOutcome,
        skipped: usize,
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
            ("node", nodes),
        ] {
            self.objects.get_or_create(&[("kind", kind)]).set(gauge(n));
        }
        self.objects_skipped.set(gauge(skipped));
        self.set_map_entries(map_names::SERVICES, live.services.len());
        self.set_map_entries(map_names::BACKENDS, live.backends.len());
        self.map_update_errors.inc_by(out.failed as u64);
        for (map, n) in &out.full {
            self.map_full
                .get_or_create(&[("map", *map)])
                .inc_by(*n as u64);
        }
        self.lock_health().last_sync = Some((now, SystemTime::now()));
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

    /// The exposition in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// `/healthz`, with kube-proxy's semantics: healthy while the last
    /// completed sync is less than 2 x the resync interval old, or, before
    /// the first sync, while the agent is younger than that.
    pub fn healthz(&self) -> Answer {
        self.healthz_at(Instant::now(), SystemTime::now())
    }

    fn healthz_at(&self, now: Instant, wall: SystemTime) -> Answer {
        let h = self.lock_health();
        let (since, last_wall) = match h.last_sync {
            Some((at, wall)) => (at, Some(wall)),
            None => (h.started, None),
        };
        let healthy = now.saturating_duration_since(since) < h.timeout;
        let last = last_wall.map_or_else(|| "null".to_string(), |t| format!("\"{}\"", rfc3339(t)));
        Answer {
            status: if healthy { 200 } else { 503 },
            body: format!(
                "{{\"lastUpdated\": {last},\"currentTime\": \"{}\"}}",
                rfc3339(wall)
            ),
        }
    }

    /// `/readyz`: ready once the first sync wrote the datapath.
    pub fn readyz(&self) -> Answer {
        let ready = self.lock_health().last_sync.is_some();
        Answer {
            status: if ready { 200 } else { 503 },
            body: format!("{{\"ready\": {ready}}}"),
        }
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the runtime
/// stops. A failed bind is logged and retried, as kube-proxy does, so a
/// busy port never stops the datapath from being programmed.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) {
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "metrics server: bind failed; retrying");
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    http::serve(listener, "metrics server", MAX_CONNECTIONS, move |head| {
        respond(head, &metrics)
    })
    .await
}

/// The full HTTP/1.1 response to a request head.
fn respond(head: &str, metrics: &Metrics) -> Vec<u8> {
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return response(405, "text/plain", "method not allowed\n", with_body);
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => response(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &metrics.render(),
            with_body,
        ),
        "/healthz" | "/livez" => {
            let a = metrics.healthz();
            response(a.status, "application/json", &a.body, with_body)
        }
        "/readyz" => {
            let a = metrics.readyz();
            response(a.status, "application/json", &a.body, with_body)
        }
        _ => response(404, "text/plain", "not found\n", with_body),
    }
}

fn response(status: u16, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    http::response(status, content_type, &[], body, with_body)
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

    fn metrics(resync: Duration) -> Metrics {
        Metrics::new(&DatapathConfig::new("/sys/fs/bpf/test"), resync)
    }

    fn outcome(failed: usize) -> SyncOutcome {
        SyncOutcome {
            frontends: 1,
            backends: 2,
            ops: 3,
            failed,
            full: [(map_names::SERVICES, failed)].into_iter().collect(),
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
        live.backends.insert(1, proxy_common::Backend::default());
        m.record_sync(
            objects,
            &live,
            &outcome(2),
            4,
            Duration::from_millis(3),
            Some(Instant::now()),
        );
        m.record_sync(objects, &live, &outcome(1), 0, Duration::ZERO, None);
        let mut stats = [0u64; stat::COUNT as usize];
        stats[stat::NEW_FLOWS as usize] = 42;
        m.observe_datapath(&stats);
        m.set_map_entries(map_names::CONNTRACK, 7);
        let text = m.render();
        let expect = [
            ("kep_sync_duration_seconds_count", 2.0),
            ("kep_network_programming_duration_seconds_count", 1.0),
            ("kep_objects{kind=\"service\"}", 0.0),
            ("kep_objects_skipped", 0.0),
            ("kep_map_entries{map=\"kep_backends\"}", 1.0),
            ("kep_map_entries{map=\"kep_conntrack\"}", 7.0),
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
        m.record_sync(
            (0, 0, 0),
            &MapContents::default(),
            &outcome(0),
            0,
            Duration::ZERO,
            None,
        );
        assert_eq!(m.readyz().status, 200);
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
    }

    #[test]
    fn routes_requests() {
        let m = metrics(Duration::from_secs(60));
        let text = |head: &str| String::from_utf8(respond(head, &m)).unwrap();
        let r = text("GET /metrics HTTP/1.1\r\nHost: x");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("kep_map_capacity"), "{r}");
        assert!(text("GET /readyz HTTP/1.1").starts_with("HTTP/1.1 503 "));
        assert!(text("GET /healthz?verbose HTTP/1.1").starts_with("HTTP/1.1 200 "));
        assert!(text("GET /nope HTTP/1.1").starts_with("HTTP/1.1 404 "));
        assert!(text("POST /metrics HTTP/1.1").starts_with("HTTP/1.1 405 "));
        let head = text("HEAD /metrics HTTP/1.1");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let m = Arc::new(metrics(Duration::from_secs(60)));
        let server = tokio::spawn(serve(addr, m));
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
