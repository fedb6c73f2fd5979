//! The API-server source: Services, EndpointSlices and this node's Node
//! object, watched with kube-runtime's watcher.
//!
//! One watcher per resource, each with the default backoff, so a refused or
//! dropped connection is retried forever and the agent keeps serving what
//! the maps hold meanwhile. Services and EndpointSlices are decoded
//! straight into [`crate::model::api`]'s types, which skip what the model
//! does not read (managedFields, annotations, owner references, targetRefs)
//! without allocating it, and every event becomes a [`Delta`] at once; the
//! agent's tracker is the only store: no reflector keeps a second copy of
//! every object. A relist (after a 410
//! Gone, a restart of the API server) re-sends every object; the names it
//! did not mention are then removed, so an object deleted while the watch
//! was down cannot linger. While a watch fails the source reports itself
//! unavailable (the agent is then not ready) and the maps keep what they
//! have.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Changes, Delta, Source};
use crate::model::api::{EndpointSlice, Service};
use crate::model::{ServiceFacts, SliceFacts};

/// Label selector for Services, as kube-proxy's: services handled by another
/// proxy are not ours.
pub const SERVICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";
/// Label selector for EndpointSlices, as kube-proxy's: neither headless
/// services' slices nor another proxy's.
pub const SLICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// What the watch tasks hand over.
#[derive(Default)]
struct Shared {
    deltas: Vec<Delta>,
    /// When the oldest of `deltas` arrived.
    since: Option<std::time::Instant>,
    /// Watches whose initial list completed.
    ready: usize,
    /// The failing watches and their last error, by kind.
    failing: std::collections::BTreeMap<String, String>,
    /// `failing` changed since the agent last took the changes.
    outage_changed: bool,
}

const WATCHES: usize = 3;

/// How often a failing watch's server is asked whether it answers again.
const OUTAGE_PROBE: std::time::Duration = std::time::Duration::from_secs(2);

/// Objects from the Kubernetes API server.
pub struct KubeSource {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    /// Whether the initial lists have all completed (and been reported).
    ready: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the watches on the current tokio runtime. Never fails:
    /// connection errors are logged and retried with backoff.
    pub fn new(client: Client, node_name: &str) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let wake = Arc::new(Notify::new());
        let to = Handoff {
            shared: shared.clone(),
            wake: wake.clone(),
        };
        let tasks = vec![
            spawn_watch(
                Api::<Service>::all(client.clone()),
                watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
                to.clone(),
                |service: Service| Delta::Service(0, Box::new(ServiceFacts::of(&service))),
                |namespace, name| Delta::ServiceGone {
                    origin: 0,
                    namespace,
                    name,
                },
            ),
            spawn_watch(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
                to.clone(),
                |slice: EndpointSlice| Delta::Slice(0, Box::new(SliceFacts::of(&slice))),
                |namespace, name| Delta::SliceGone {
                    origin: 0,
                    namespace,
                    name,
                },
            ),
            spawn_watch(
                Api::<Node>::all(client),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
                to,
                |node: Node| Delta::Node(0, Box::new(node)),
                |_, name| Delta::NodeGone { origin: 0, name },
            ),
        ];
        Self {
            shared,
            wake,
            ready: false,
            tasks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The watch tasks' end of [`KubeSource::shared`].
#[derive(Clone)]
struct Handoff {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
}

impl Handoff {
    /// Records whether the watch of `kind` fails (with `error`) and wakes
    /// the agent when that changes.
    fn failing(&self, kind: &str, error: Option<String>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match error {
            Some(error) => shared.failing.insert(kind.to_string(), error).is_none(),
            None => shared.failing.remove(kind).is_some(),
        };
        shared.outage_changed |= changed;
        drop(shared);
        if changed {
            self.wake.notify_one();
        }
    }

    fn send(&self, deltas: impl IntoIterator<Item = Delta>, ready: bool) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.since.get_or_insert_with(std::time::Instant::now);
        shared.deltas.extend(deltas);
        shared.ready += usize::from(ready);
        drop(shared);
        // A permit is kept when nobody waits, so a wake is never lost.
        self.wake.notify_one();
    }
}

/// Spawns `watcher(api, config).default_backoff()`, turning each event into
/// deltas (`put` for an object, `gone` for a name).
fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    to: Handoff,
    put: fn(K) -> Delta,
    gone: fn(String, String) -> Delta,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let kind = K::kind(&()).into_owned();
    // A watch resumed after an outage says nothing until its objects
    // change (a Node may not for hours), so while it fails the server is
    // asked directly, for one object of the same selection, whether it
    // answers again.
    let probe = ListParams {
        label_selector: config.label_selector.clone(),
        field_selector: config.field_selector.clone(),
        limit: Some(1),
        ..ListParams::default()
    };
    let probe_api = api.clone();
    let stream = watcher(api, config).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Log an outage once, and its end once, not every retry.
        let mut failing = false;
        // Names held, and those a relist in progress has mentioned.
        let mut known: HashSet<(String, String)> = HashSet::new();
        let mut relist: Option<HashSet<(String, String)>> = None;
        let mut listed_once = false;
        let name = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        loop {
            let event = tokio::select! {
                event = stream.next() => match event {
                    Some(event) => event,
                    None => break,
                },
                () = tokio::time::sleep(OUTAGE_PROBE), if failing => {
                    if probe_api.list(&probe).await.is_ok() {
                        tracing::info!(%kind, "API server answers again");
                        to.failing(&kind, None);
                        failing = false;
                    }
                    continue;
                }
            };
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    if failing {
                        tracing::debug!(%kind, error = %e, "watch still failing; retrying");
                    } else {
                        tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff");
                        to.failing(&kind, Some(e.to_string()));
                        failing = true;
                    }
                    continue;
                }
            };
            if failing {
                tracing::info!(%kind, "watch re-established");
                to.failing(&kind, None);
                failing = false;
            }
            match event {
                watcher::Event::Init => relist = Some(HashSet::new()),
                watcher::Event::InitApply(object) => {
                    let key = name(&object);
                    relist.get_or_insert_default().insert(key.clone());
                    known.insert(key);
                    to.send([put(object)], false);
                }
                watcher::Event::InitDone => {
                    let seen = relist.take().unwrap_or_default();
                    let stale: Vec<Delta> = known
                        .difference(&seen)
                        .map(|(namespace, name)| gone(namespace.clone(), name.clone()))
                        .collect();
                    known = seen;
                    to.send(stale, !listed_once);
                    listed_once = true;
                }
                watcher::Event::Apply(object) => {
                    known.insert(name(&object));
                    to.send([put(object)], false);
                }
                watcher::Event::Delete(object) => {
                    let (namespace, name) = name(&object);
                    known.remove(&(namespace.clone(), name.clone()));
                    to.send([gone(namespace, name)], false);
                }
            }
        }
        tracing::error!(%kind, "watch stream ended");
    })
}

impl Source for KubeSource {
    async fn changed(&mut self) {
        loop {
            {
                let shared = self.lock();
                if !self.ready && shared.ready >= WATCHES {
                    drop(shared);
                    tracing::info!("initial lists from the API server complete");
                    self.ready = true;
                    return;
                }
                if self.ready && (!shared.deltas.is_empty() || shared.outage_changed) {
                    return;
                }
            }
            // Cancel-safe: the state is in `shared`, the permit in `wake`.
            self.wake.notified().await;
        }
    }

    fn take_changes(&mut self) -> Changes {
        let mut shared = self.lock();
        shared.outage_changed = false;
        let unavailable = (!shared.failing.is_empty()).then(|| {
            let watches: Vec<String> = shared
                .failing
                .iter()
                .map(|(kind, error)| format!("{kind} watch failing: {error}"))
                .collect();
            watches.join("; ")
        });
        Changes {
            deltas: std::mem::take(&mut shared.deltas),
            warnings: None,
            since: shared.since.take(),
            unavailable,
        }
    }
}
