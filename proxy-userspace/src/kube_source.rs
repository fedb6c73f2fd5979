//! The API-server source: Services, EndpointSlices and this node's Node
//! object, kept in kube-runtime reflector stores.
//!
//! One watcher per resource, each with the default backoff, so a refused or
//! dropped connection is retried forever and the agent keeps serving what
//! the maps hold meanwhile. A relist (after a 410 Gone, a restart of the API
//! server) replaces a store's contents atomically when it completes, and
//! [`KubeSource::snapshot`] always returns whole stores, so an object deleted
//! while the watch was down cannot linger.

use std::sync::Arc;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::Source;
use crate::manifests::Objects;

/// Label selector for Services, as kube-proxy's: services handled by another
/// proxy are not ours.
pub const SERVICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";
/// Label selector for EndpointSlices, as kube-proxy's: neither headless
/// services' slices nor another proxy's.
pub const SLICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// Objects from the Kubernetes API server.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Bumped by the reflector tasks on every store change.
    changes: watch::Receiver<u64>,
    /// Kept so `changes` never reports a closed channel.
    _changes_tx: Arc<watch::Sender<u64>>,
    /// Whether the initial lists have all completed (and been reported).
    ready: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the reflectors on the current tokio runtime. Never fails:
    /// connection errors are logged and retried with backoff.
    pub fn new(client: Client, node_name: &str) -> Self {
        let (tx, changes) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let mut tasks = Vec::new();
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
            tx.clone(),
            &mut tasks,
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
            tx.clone(),
            &mut tasks,
        );
        let nodes = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            tx.clone(),
            &mut tasks,
        );
        Self {
            services,
            slices,
            nodes,
            changes,
            _changes_tx: tx,
            ready: false,
            tasks,
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Spawns `watcher(api, config).default_backoff().reflect(writer)`, which
/// bumps `changes` whenever the store's contents may have changed.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    changes: Arc<watch::Sender<u64>>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let kind = K::kind(&()).into_owned();
    let (store, writer) = reflector::store::<K>();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Log an outage once, and its end once, not every retry.
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        tracing::info!(%kind, "watch re-established");
                        failing = false;
                    }
                    match event {
                        // The store changes on these; Init and InitApply only
                        // fill the relist buffer, swapped in at InitDone.
                        watcher::Event::Apply(_)
                        | watcher::Event::Delete(_)
                        | watcher::Event::InitDone => changes.send_modify(|n| *n += 1),
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                    }
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(%kind, error = %e, "watch still failing; retrying");
                    } else {
                        tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff");
                        failing = true;
                    }
                }
            }
        }
        tracing::error!(%kind, "watch stream ended");
    }));
    store
}

fn contents<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut items: Vec<K> = store.state().iter().map(|o| (**o).clone()).collect();
    // Store order is a hash map's; sort so snapshots are deterministic.
    items.sort_by(|a, b| {
        let (a, b) = (a.meta(), b.meta());
        (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
    });
    items
}

impl Source for KubeSource {
    async fn changed(&mut self) {
        if !self.ready {
            // Each wait is cancel-safe and returns at once once that store
            // is ready, so a dropped future loses nothing.
            let waits = [
                self.services.wait_until_ready().await,
                self.slices.wait_until_ready().await,
                self.nodes.wait_until_ready().await,
            ];
            if waits.iter().any(Result::is_err) {
                // A writer is only dropped if its task died; it was logged.
                tracing::error!("a reflector stopped before its initial list");
            }
            tracing::info!(
                services = self.services.len(),
                slices = self.slices.len(),
                nodes = self.nodes.len(),
                "initial lists from the API server complete"
            );
            self.ready = true;
            // The first snapshot covers every change reported so far.
            self.changes.borrow_and_update();
            return;
        }
        // Cancel-safe; never fails as a sender is kept in `self`.
        let _ = self.changes.changed().await;
    }

    fn snapshot(&mut self) -> (Objects, Vec<String>) {
        (
            Objects {
                services: contents(&self.services),
                slices: contents(&self.slices),
                nodes: contents(&self.nodes),
            },
            Vec::new(),
        )
    }
}
