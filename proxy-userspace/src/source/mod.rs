//! Where objects come from: a directory of manifests ([`manifests`]) or the
//! API server ([`kube`]). Both hand the agent changes, object by object
//! ([`Delta`]), never a whole snapshot, so the work downstream follows the
//! size of the change and not the size of the cluster.

mod inotify;
pub mod kube;
pub mod manifests;
mod stamp;

use k8s_openapi::api::core::v1::Node;

use crate::model::api::{EndpointSlice, Service};
use crate::model::{Origin, ServiceFacts, SliceFacts, Tracker};

pub use manifests::ManifestSource;

/// The objects of a source as decoded (the fields the model reads), for
/// tests that want them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Node objects (the agent's own node gives its topology labels).
    pub nodes: Vec<Node>,
}

/// One object added, replaced or removed. `origin` tells copies of one name
/// apart (see [`Origin`]). Services and slices arrive already read into
/// what the model keeps of them, so a large initial load never holds the
/// objects themselves.
#[derive(Clone, Debug)]
pub enum Delta {
    Service(Origin, Box<ServiceFacts>),
    ServiceGone {
        origin: Origin,
        namespace: String,
        name: String,
    },
    Slice(Origin, Box<SliceFacts>),
    SliceGone {
        origin: Origin,
        namespace: String,
        name: String,
    },
    Node(Origin, Box<Node>),
    NodeGone {
        origin: Origin,
        name: String,
    },
}

impl Delta {
    /// Hands the change to the tracker.
    pub fn apply_to(self, tracker: &mut Tracker) {
        match self {
            Delta::Service(origin, facts) => tracker.put_service_facts(origin, *facts),
            Delta::ServiceGone {
                origin,
                namespace,
                name,
            } => tracker.delete_service(origin, &namespace, &name),
            Delta::Slice(origin, facts) => tracker.put_slice_facts(origin, *facts),
            Delta::SliceGone {
                origin,
                namespace,
                name,
            } => tracker.delete_slice(origin, &namespace, &name),
            Delta::Node(origin, node) => tracker.put_node(origin, *node),
            Delta::NodeGone { origin, name } => tracker.delete_node(origin, &name),
        }
    }
}

/// What a source has to say since it was last asked.
#[derive(Debug, Default)]
pub struct Changes {
    pub deltas: Vec<Delta>,
    /// The source's own warnings (unreadable files...), when they may have
    /// changed: the whole current list.
    pub warnings: Option<Vec<String>>,
    /// When the first of these changes reached the source, if it knows
    /// better than the moment it reported them.
    pub since: Option<std::time::Instant>,
    /// Why the source cannot be read (completely) right now; `None` when
    /// it can. What it said before stays meanwhile: an outage is never
    /// taken for the objects being deleted.
    pub unavailable: Option<String>,
}

/// A source of Services, EndpointSlices and Nodes.
///
/// `changed` must be cancel-safe: the agent drops it whenever another event
/// (a signal, a timer) wins.
pub trait Source {
    /// Resolves when the source may have changes. The first call resolves
    /// only once the source has its complete initial state, so nothing is
    /// written before that.
    fn changed(&mut self) -> impl Future<Output = ()>;
    /// The changes since the last call (the first call: everything).
    fn take_changes(&mut self) -> Changes;
}
