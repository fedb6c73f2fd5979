//! kube-proxy's service health servers: for every LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` telling the cloud load balancer whether this node
//! has endpoints for it, so the load balancer only sends to nodes that do
//! (the others would drop the traffic).
//!
//! Any request on the port gets, as kube-proxy's:
//! `{"service": {"namespace": .., "name": ..}, "localEndpoints": n,
//! "serviceProxyHealthy": b}` with status 200 when `n > 0` and the proxy is
//! healthy, else 503, and the header `X-Load-Balancing-Endpoint-Weight: n`
//! for load balancers that weigh nodes by it.
//!
//! [`HealthServers::update`] takes the model's
//! [`DesiredState::health_checks`](crate::model::DesiredState) at each sync:
//! new ports are opened, gone ones closed, and the counts of the others
//! changed in place, so a load balancer probing mid-sync never sees a
//! closed port. HTTP is [`http`]'s, like the metrics server's: served on
//! its own thread, every port of the node sharing one bounded group of
//! connections, so load balancers' probes are answered however many
//! clients hold connections open.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::http;
use crate::model::HealthCheck;

/// Whether the proxy itself is healthy (kube-proxy's `/healthz` verdict),
/// asked at each request; an unhealthy proxy fails every health check so
/// load balancers move away from the node.
pub type ProxyHealth = Arc<dyn Fn() -> bool + Send + Sync>;

/// These servers' `server` label in `kep_http_connections_shed`.
pub const SERVER_LABEL: &str = "service-health-check";

/// Connections open at once over every health check port and address;
/// past that the oldest of the busiest peer is closed.
const MAX_CONNECTIONS: usize = 128;

/// A health check port that could not be opened. It is retried at the next
/// [`HealthServers::update`], as kube-proxy retries at its next sync.
#[derive(Debug, Error)]
#[error("health check of Service {service} on {addr}: cannot listen: {source}")]
pub struct BindError {
    pub port: u16,
    pub addr: SocketAddr,
    /// `namespace/name`.
    pub service: String,
    #[source]
    pub source: io::Error,
}

/// The health check servers of one node.
pub struct HealthServers {
    addresses: Vec<IpAddr>,
    proxy_healthy: ProxyHealth,
    connections: Arc<http::Connections>,
    servers: BTreeMap<u16, Server>,
}

/// One port: its answer, shared with the tasks serving it.
struct Server {
    shared: Arc<Shared>,
    /// One accept loop per address.
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    /// (namespace, name); a port may change hands between syncs.
    service: Mutex<(String, String)>,
    local_endpoints: AtomicUsize,
    proxy_healthy: ProxyHealth,
}

impl HealthServers {
    /// Servers listening on each of `addresses` (kube-proxy: `0.0.0.0`, or
    /// the node IPs `--nodeport-addresses` selects); connections closed to
    /// make room count in `shed`.
    pub fn new(addresses: Vec<IpAddr>, proxy_healthy: ProxyHealth, shed: Counter) -> Self {
        Self {
            addresses,
            proxy_healthy,
            connections: http::Connections::new(MAX_CONNECTIONS, shed),
            servers: BTreeMap::new(),
        }
    }

    /// Makes the servers match `desired` (keyed by port). Must run inside a
    /// tokio runtime, which serves the ports. Returns the ports that could
    /// not be opened (each also logged); the others serve regardless. When
    /// it returns, removed ports are closed.
    pub async fn update(&mut self, desired: &BTreeMap<u16, HealthCheck>) -> Vec<BindError> {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|port| !desired.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            if let Some(server) = self.servers.remove(&port) {
                tracing::info!(port, "closing service health check");
                server.close().await;
            }
        }
        let mut errors = Vec::new();
        for (&port, check) in desired {
            if let Some(server) = self.servers.get(&port) {
                server.shared.set(check);
                continue;
            }
            match self.open(port, check) {
                Ok(server) => {
                    tracing::info!(
                        port,
                        service = %format!("{}/{}", check.namespace, check.name),
                        "serving service health check"
                    );
                    self.servers.insert(port, server);
                }
                Err(error) => {
                    tracing::error!(%error, "service health check not served; retrying at the next sync");
                    errors.push(error);
                }
            }
        }
        errors
    }

    /// Moves every server to `addresses` at the next [`update`]: the
    /// current ones are closed now (a health check must not keep answering
    /// on an address NodePorts left).
    ///
    /// [`update`]: HealthServers::update
    pub async fn set_addresses(&mut self, addresses: Vec<IpAddr>) {
        if self.addresses == addresses {
            return;
        }
        self.addresses = addresses;
        for (_, server) in std::mem::take(&mut self.servers) {
            server.close().await;
        }
    }

    /// The ports being served.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Binds `port` on every address, or none: a half-open health check
    /// would answer on some node IPs only. The listeners are bound when
    /// this returns.
    fn open(&self, port: u16, check: &HealthCheck) -> Result<Server, BindError> {
        let shared = Arc::new(Shared {
            service: Mutex::new((String::new(), String::new())),
            local_endpoints: AtomicUsize::new(0),
            proxy_healthy: self.proxy_healthy.clone(),
        });
        shared.set(check);
        let mut listeners = Vec::with_capacity(self.addresses.len());
        for ip in &self.addresses {
            let addr = SocketAddr::new(*ip, port);
            match http::listen(addr) {
                Ok(listener) => listeners.push(listener),
                Err(source) => {
                    return Err(BindError {
                        port,
                        addr,
                        service: format!("{}/{}", check.namespace, check.name),
                        source,
                    });
                }
            }
        }
        let respond: Arc<http::Responder> = {
            let shared = shared.clone();
            Arc::new(move |head: &str| shared.response(head))
        };
        let tasks = listeners
            .into_iter()
            .map(|listener| {
                http::spawn(http::serve(
                    listener,
                    "service health check",
                    self.connections.clone(),
                    respond.clone(),
                ))
            })
            .collect();
        Ok(Server { shared, tasks })
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            for task in &server.tasks {
                task.abort();
            }
        }
    }
}

impl Server {
    /// Stops accepting and waits until the listeners are dropped, so the
    /// port is free when this returns.
    async fn close(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            // Cancelled is the expected outcome; a panic has been logged.
            let _ = task.await;
        }
    }
}

impl Shared {
    fn set(&self, check: &HealthCheck) {
        let mut service = self.service.lock().unwrap_or_else(|e| e.into_inner());
        if service.0 != check.namespace || service.1 != check.name {
            *service = (check.namespace.clone(), check.name.clone());
        }
        self.local_endpoints
            .store(check.local_endpoints, Ordering::Relaxed);
    }

    /// Status and JSON body, in kube-proxy's layout.
    fn answer(&self) -> (u16, usize, String) {
        let (namespace, name) = self
            .service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let count = self.local_endpoints.load(Ordering::Relaxed);
        let healthy = (self.proxy_healthy)();
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
        let body = format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
             \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
            quote(&namespace),
            quote(&name)
        );
        let status = if count > 0 && healthy { 200 } else { 503 };
        (status, count, body)
    }

    /// The response to any request (`head`: its request head).
    fn response(&self, head: &str) -> Vec<u8> {
        let (status, count, body) = self.answer();
        let headers = [
            ("X-Content-Type-Options", "nosniff".to_string()),
            ("X-Load-Balancing-Endpoint-Weight", count.to_string()),
        ];
        let (method, _) = http::request_line(head);
        http::response(
            status,
            "application/json",
            &headers,
            &body,
            method != "HEAD",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn servers() -> HealthServers {
        HealthServers::new(vec![LOOPBACK], Arc::new(|| true), Counter::default())
    }

    /// A port nothing listens on right now.
    fn free_port() -> u16 {
        let probe = std::net::TcpListener::bind((LOOPBACK, 0)).unwrap();
        probe.local_addr().unwrap().port()
    }

    fn check(name: &str, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: name.into(),
            local_endpoints,
        }
    }

    async fn send(stream: &mut TcpStream, request: &str) -> String {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }

    async fn get(port: u16) -> String {
        let mut stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
        send(&mut stream, "GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n").await
    }

    fn body(response: &str) -> serde_json::Value {
        let (_, body) = response.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[tokio::test]
    async fn answers_200_with_local_endpoints_and_503_without() {
        let (up, down) = (free_port(), free_port());
        let mut hs = servers();
        let desired = BTreeMap::from([(up, check("web", 2)), (down, check("api", 0))]);
        assert!(hs.update(&desired).await.is_empty());

        let r = get(up).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        for header in [
            "Content-Type: application/json\r\n",
            "X-Content-Type-Options: nosniff\r\n",
            "X-Load-Balancing-Endpoint-Weight: 2\r\n",
        ] {
            assert!(r.contains(header), "{header} in {r}");
        }
        assert_eq!(
            body(&r),
            serde_json::json!({"service": {"namespace": "default", "name": "web"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        // kube-proxy's exact layout.
        assert!(
            r.ends_with(
                "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
            ),
            "{r}"
        );

        let r = get(down).await;
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("X-Load-Balancing-Endpoint-Weight: 0\r\n"), "{r}");
        assert_eq!(body(&r)["localEndpoints"], 0);
        assert_eq!(body(&r)["service"]["name"], "api");

        // Any path and method; HEAD without a body.
        let mut s = TcpStream::connect((LOOPBACK, up)).await.unwrap();
        let r = send(&mut s, "HEAD / HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
    }

    #[tokio::test]
    async fn unhealthy_proxy_fails_the_check() {
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        let mut hs = HealthServers::new(
            vec![LOOPBACK],
            Arc::new(move || flag.load(Ordering::Relaxed)),
            Counter::default(),
        );
        let port = free_port();
        assert!(
            hs.update(&BTreeMap::from([(port, check("web", 3))]))
                .await
                .is_empty()
        );
        assert!(get(port).await.starts_with("HTTP/1.1 200 "));
        healthy.store(false, Ordering::Relaxed);
        let r = get(port).await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert_eq!(body(&r)["serviceProxyHealthy"], false);
        assert_eq!(body(&r)["localEndpoints"], 3);
    }

    #[tokio::test]
    async fn count_changes_in_place_without_rebinding() {
        let port = free_port();
        let mut hs = servers();
        assert!(
            hs.update(&BTreeMap::from([(port, check("web", 1))]))
                .await
                .is_empty()
        );
        let task = hs.servers[&port].tasks[0].id();
        // A connection accepted before the update is answered after it with
        // the new count: same listener, same shared state.
        let mut early = TcpStream::connect((LOOPBACK, port)).await.unwrap();
        assert!(
            hs.update(&BTreeMap::from([(port, check("web", 0))]))
                .await
                .is_empty()
        );
        assert_eq!(hs.servers[&port].tasks[0].id(), task);
        let r = send(&mut early, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(
            hs.update(&BTreeMap::from([(port, check("web", 4))]))
                .await
                .is_empty()
        );
        assert_eq!(hs.servers[&port].tasks[0].id(), task);
        assert_eq!(body(&get(port).await)["localEndpoints"], 4);
    }

    #[tokio::test]
    async fn new_addresses_move_every_server() {
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let port = free_port();
        let mut hs = servers();
        let desired = BTreeMap::from([(port, check("web", 1))]);
        assert!(hs.update(&desired).await.is_empty());
        assert!(get(port).await.starts_with("HTTP/1.1 200 "));
        hs.set_addresses(vec![other]).await;
        assert!(hs.update(&desired).await.is_empty());
        let old = TcpStream::connect((LOOPBACK, port)).await;
        assert_eq!(
            old.map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused,
            "no longer on the address NodePorts left"
        );
        let mut stream = TcpStream::connect((other, port)).await.unwrap();
        let r = send(&mut stream, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    }

    #[tokio::test]
    async fn removal_closes_the_port() {
        let (kept, removed) = (free_port(), free_port());
        let mut hs = servers();
        let both = BTreeMap::from([(kept, check("web", 1)), (removed, check("api", 1))]);
        assert!(hs.update(&both).await.is_empty());
        assert!(get(removed).await.starts_with("HTTP/1.1 200 "));
        assert!(
            hs.update(&BTreeMap::from([(kept, check("web", 1))]))
                .await
                .is_empty()
        );
        assert_eq!(hs.ports(), [kept]);
        let refused = TcpStream::connect((LOOPBACK, removed)).await;
        assert_eq!(
            refused.map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        // Free again: someone else (or a later Service) can take it.
        drop(std::net::TcpListener::bind((LOOPBACK, removed)).unwrap());
        assert!(get(kept).await.starts_with("HTTP/1.1 200 "));
    }

    #[tokio::test]
    async fn busy_port_is_reported_and_retried_while_others_serve() {
        let (busy, free) = (free_port(), free_port());
        let squatter = std::net::TcpListener::bind((LOOPBACK, busy)).unwrap();
        let mut hs = servers();
        let desired = BTreeMap::from([(busy, check("web", 1)), (free, check("api", 1))]);
        let errors = hs.update(&desired).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].port, busy);
        assert_eq!(errors[0].source.kind(), io::ErrorKind::AddrInUse);
        let text = errors[0].to_string();
        assert!(
            text.contains("default/web") && text.contains(&busy.to_string()),
            "{text}"
        );
        assert_eq!(hs.ports(), [free]);
        assert_eq!(body(&get(free).await)["service"]["name"], "api");
        // Once the port is free, the next update opens it.
        drop(squatter);
        assert!(hs.update(&desired).await.is_empty());
        assert_eq!(body(&get(busy).await)["service"]["name"], "web");
    }

    #[tokio::test]
    async fn port_changing_hands_answers_for_the_new_service() {
        let port = free_port();
        let mut hs = servers();
        assert!(
            hs.update(&BTreeMap::from([(port, check("web", 1))]))
                .await
                .is_empty()
        );
        assert!(
            hs.update(&BTreeMap::from([(port, check("api", 2))]))
                .await
                .is_empty()
        );
        let r = body(&get(port).await);
        assert_eq!(
            (r["service"]["name"].as_str(), r["localEndpoints"].as_u64()),
            (Some("api"), Some(2))
        );
    }
}
