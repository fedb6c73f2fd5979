//! Where objects come from: a directory of manifests ([`manifests`]) or the
//! API server ([`kube`]). Both hand the agent changes, object by object
//! ([`Delta`]), never a whole snapshot, so the work downstream follows the
//! size of the change and not the size of the cluster.

mod inotify;
pub mod kube;
pub mod manifests;
pub mod trim;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Origin, SliceFacts, Tracker};

pub use manifests::ManifestSource;

/// The objects a source holds, for tests and tools that want them whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Node objects (the agent's own node gives its topology labels).
    pub nodes: Vec<Node>,
}

/// One object added, replaced or removed. `origin` tells copies of one name
/// apart (see [`Origin`]).
#[derive(Clone, Debug)]
pub enum Delta {
    Service(Origin, Box<Service>),
    ServiceGone {
        origin: Origin,
        namespace: String,
        name: String,
    },
    Slice(Origin, Box<EndpointSlice>),
    /// A slice already reduced to what the model reads (what sources send:
    /// a large initial load never holds the objects themselves).
    SliceFacts(Origin, Box<SliceFacts>),
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
            Delta::Service(origin, service) => tracker.put_service(origin, *service),
            Delta::ServiceGone {
                origin,
                namespace,
                name,
            } => tracker.delete_service(origin, &namespace, &name),
            Delta::Slice(origin, slice) => tracker.put_slice(origin, *slice),
            Delta::SliceFacts(origin, facts) => tracker.put_slice_facts(origin, *facts),
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
