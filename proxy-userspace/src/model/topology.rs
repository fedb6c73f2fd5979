//! Which endpoints each frontend of a Service port uses: traffic policies
//! (internal and external, Cluster or Local), the terminating fallback, and
//! topology hints (kube-proxy's `CategorizeEndpoints`).

use super::*;

/// How a Service's ClusterIP traffic may choose endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TrafficPolicy {
    /// `internalTrafficPolicy: Local`; anything else is Cluster.
    pub(super) local: bool,
    /// `trafficDistribution: PreferSameNode`: `hints.forNodes` count.
    pub(super) prefer_same_node: bool,
}

impl TrafficPolicy {
    pub(super) fn of(spec: &api::ServiceSpec) -> Self {
        Self {
            local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            prefer_same_node: spec.traffic_distribution.as_deref() == Some("PreferSameNode"),
        }
    }
}

/// The endpoint sets of one Service port (kube-proxy's
/// `CategorizeEndpoints`); every frontend of the port picks from them.
pub(super) struct EndpointSets {
    /// Ready endpoints narrowed by topology, else the serving-terminating
    /// ones: what the Cluster policies use.
    pub(super) cluster: BTreeSet<Endpoint>,
    /// This node's ready endpoints, else its serving-terminating ones: what
    /// the Local policies use.
    pub(super) local: BTreeSet<Endpoint>,
    /// Whether any endpoint is usable anywhere: without one, new flows are
    /// rejected whatever the policy; with one, a Local policy that left
    /// nothing drops them.
    pub(super) any: bool,
    /// Every candidate, for `lingering`.
    pub(super) all: BTreeSet<Endpoint>,
    pub(super) internal_local: bool,
}

pub(super) fn categorize(
    candidates: &[Candidate<'_>],
    policy: TrafficPolicy,
    node: &NodeInfo,
) -> EndpointSets {
    let ready: Vec<Candidate<'_>> = candidates
        .iter()
        .copied()
        .filter(|c| c.info.ready)
        .collect();
    let serving_terminating = |keep: &dyn Fn(&Candidate<'_>) -> bool| -> BTreeSet<Endpoint> {
        candidates
            .iter()
            .filter(|c| c.info.serving_terminating() && keep(c))
            .map(|c| c.endpoint)
            .collect()
    };
    let cluster: BTreeSet<Endpoint> = if ready.is_empty() {
        serving_terminating(&|_| true)
    } else {
        prefer_topology(ready.clone(), policy, node)
            .iter()
            .map(|c| c.endpoint)
            .collect()
    };
    let local_ready: BTreeSet<Endpoint> = ready
        .iter()
        .filter(|c| c.info.is_on(node))
        .map(|c| c.endpoint)
        .collect();
    let local = if local_ready.is_empty() {
        serving_terminating(&|c| c.info.is_on(node))
    } else {
        local_ready
    };
    EndpointSets {
        any: !cluster.is_empty(),
        cluster,
        local,
        all: candidates.iter().map(|c| c.endpoint).collect(),
        internal_local: policy.local,
    }
}

impl EndpointSets {
    /// The state of one frontend of `kind` (see the module documentation
    /// for the rules and their sources).
    pub(super) fn state(
        &self,
        service: Arc<str>,
        kind: FrontendKind,
        exposure: &Exposure,
        affinity_timeout_s: Option<u32>,
    ) -> FrontendState {
        let choose = |local: bool| {
            if local {
                let action = if self.any {
                    EmptyAction::Drop
                } else {
                    EmptyAction::Reject
                };
                (&self.local, action)
            } else {
                (&self.cluster, EmptyAction::Reject)
            }
        };
        // Internal traffic policy only governs cluster IPs; in-cluster
        // traffic to the other kinds uses the cluster-wide endpoints.
        let (endpoints, empty_action) =
            choose(kind == FrontendKind::ClusterIp && self.internal_local);
        let external = (kind != FrontendKind::ClusterIp).then(|| {
            let (endpoints, empty_action) = choose(exposure.external_local);
            ExternalTraffic {
                endpoints: endpoints.iter().copied().collect(),
                empty_action,
                masquerade: !exposure.external_local,
                source_ranges: if kind == FrontendKind::LoadBalancer {
                    exposure.source_ranges.clone()
                } else {
                    Vec::new()
                },
                allow_node: kind == FrontendKind::LoadBalancer && exposure.allow_node,
            }
        });
        let lingering = self
            .all
            .iter()
            .filter(|e| {
                !endpoints.contains(e)
                    && external
                        .as_ref()
                        .is_none_or(|x| x.endpoints.binary_search(e).is_err())
            })
            .copied()
            .collect();
        FrontendState {
            service,
            kind,
            endpoints: endpoints.iter().copied().collect(),
            empty_action,
            affinity_timeout_s,
            lingering,
            external,
        }
    }
}

/// kube-proxy's topology modes: narrows the ready endpoints to the ones
/// hinted for this node, else for this node's zone, when every ready endpoint
/// carries that kind of hint and at least one is hinted for us; otherwise
/// keeps them all, so it never narrows to nothing.
pub(super) fn prefer_topology<'a>(
    ready: Vec<Candidate<'a>>,
    policy: TrafficPolicy,
    node: &NodeInfo,
) -> Vec<Candidate<'a>> {
    let narrowed = |names: fn(&Hints) -> &[Arc<str>], name: &str| {
        if !ready.iter().all(|c| !hinted(c.info, names).is_empty()) {
            return None;
        }
        let same: Vec<Candidate<'a>> = ready
            .iter()
            .copied()
            .filter(|c| hints_name(hinted(c.info, names), name))
            .collect();
        (!same.is_empty()).then_some(same)
    };
    if policy.prefer_same_node
        && !node.name.is_empty()
        && let Some(same_node) = narrowed(|h| &h.nodes, &node.name)
    {
        return same_node;
    }
    if let Some(zone) = node.zone()
        && let Some(same_zone) = narrowed(|h| &h.zones, zone)
    {
        return same_zone;
    }
    ready
}
