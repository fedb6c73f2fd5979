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

#[cfg(test)]
mod tests {
    //! Endpoint selection (conditions, internalTrafficPolicy, topology
    //! hints), through [`compute`] as the agent derives it.

    use super::super::fixtures::*;
    use super::*;
    use serde_json::json;

    fn web_local() -> Service {
        let mut svc = web();
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        svc
    }

    fn web_prefer_same_node() -> Service {
        let mut svc = web();
        svc.spec.as_mut().unwrap().traffic_distribution = Some("PreferSameNode".into());
        svc
    }

    /// The addresses `web`'s frontend uses on `node`, and its empty action.
    fn web_on(
        service: Service,
        slices: &[EndpointSlice],
        node: &NodeInfo,
    ) -> (Vec<String>, EmptyAction) {
        let (state, warnings) = compute(&[service], slices, node);
        assert_eq!(warnings, []);
        let st = &state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert!(st.endpoints.iter().all(|e| e.port == 8080));
        let addrs = st.endpoints.iter().map(|e| e.addr.to_string()).collect();
        (addrs, st.empty_action)
    }

    #[test]
    fn terminating_endpoints_used_only_when_none_is_ready() {
        let a = node("node-a", None);
        let mixed = web_slice(
            "web-a",
            &[
                on("10.0.0.1", "node-b", READY),
                on("10.0.0.2", "node-b", TERMINATING),
            ],
        );
        assert_eq!(web_on(web(), &[mixed], &a).0, ["10.0.0.1"]);
        // The ready endpoint may be in another slice: the fallback is per
        // Service port, not per slice.
        let draining = web_slice("web-a", &[on("10.0.0.2", "node-b", TERMINATING)]);
        let ready = web_slice("web-b", &[on("10.0.0.1", "node-b", READY)]);
        assert_eq!(
            web_on(web(), &[draining.clone(), ready], &a).0,
            ["10.0.0.1"]
        );
        assert_eq!(
            web_on(web(), &[draining], &a),
            (vec!["10.0.0.2".to_string()], EmptyAction::Reject)
        );
    }

    #[test]
    fn terminating_endpoints_that_are_not_serving_are_never_used() {
        let slices = [web_slice(
            "web-a",
            &[
                on("10.0.0.1", "node-a", GONE),
                // serving unset defers to ready (false).
                json!({"addresses": ["10.0.0.2"],
                       "conditions": {"ready": false, "terminating": true}}),
                // Not ready, not terminating: neither set.
                on("10.0.0.3", "node-a", (false, true, false)),
            ],
        )];
        assert_eq!(
            web_on(web(), &slices, &node("node-a", None)),
            (vec![], EmptyAction::Reject)
        );
        assert_eq!(
            web_on(web_local(), &slices, &node("node-a", None)),
            (vec![], EmptyAction::Reject),
            "nothing usable anywhere rejects even under the Local policy"
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_local_endpoints() {
        let slices = [web_slice(
            "web-a",
            &[
                on("10.0.0.1", "node-a", READY),
                on("10.0.0.2", "node-b", READY),
                on("10.0.0.3", "node-a", TERMINATING),
                json!({"addresses": ["10.0.0.4"]}), // no nodeName
            ],
        )];
        assert_eq!(
            web_on(web_local(), &slices, &node("node-a", None)).0,
            ["10.0.0.1"]
        );
        assert_eq!(
            web_on(web_local(), &slices, &node("node-b", None)).0,
            ["10.0.0.2"]
        );
        // Cluster (the default) uses every ready endpoint wherever it is.
        assert_eq!(
            web_on(web(), &slices, &node("node-a", None)).0,
            ["10.0.0.1", "10.0.0.2", "10.0.0.4"]
        );
        // An agent that does not know its name has no local endpoints, even
        // for endpoints that carry no nodeName either.
        assert_eq!(
            web_on(web_local(), &slices, &NodeInfo::default()),
            (vec![], EmptyAction::Drop)
        );
    }

    #[test]
    fn internal_traffic_policy_local_without_local_endpoints_drops() {
        let slices = [web_slice("web-a", &[on("10.0.0.2", "node-b", READY)])];
        assert_eq!(
            web_on(web_local(), &slices, &node("node-a", None)),
            (vec![], EmptyAction::Drop)
        );
        // No endpoint anywhere: kube-proxy's "has no endpoints" REJECT.
        assert_eq!(
            web_on(web_local(), &[], &node("node-a", None)),
            (vec![], EmptyAction::Reject)
        );
    }

    #[test]
    fn internal_traffic_policy_local_falls_back_to_local_terminating() {
        // The only local endpoint is terminating; a remote one is ready, but
        // Local never leaves the node.
        let slices = [web_slice(
            "web-a",
            &[
                on("10.0.0.1", "node-a", TERMINATING),
                on("10.0.0.2", "node-b", READY),
                on("10.0.0.3", "node-a", GONE),
            ],
        )];
        assert_eq!(
            web_on(web_local(), &slices, &node("node-a", None)).0,
            ["10.0.0.1"]
        );
    }

    #[test]
    fn zone_hints_used_when_every_endpoint_has_one() {
        let slices = [web_slice(
            "web-a",
            &[
                with_hints("10.0.0.1", &["zone-a"], &[]),
                with_hints("10.0.0.2", &["zone-b"], &[]),
                with_hints("10.0.0.3", &["zone-b", "zone-a"], &[]),
            ],
        )];
        assert_eq!(
            web_on(web(), &slices, &node("node-a", Some("zone-a"))).0,
            ["10.0.0.1", "10.0.0.3"]
        );
        assert_eq!(
            web_on(web(), &slices, &node("node-a", Some("zone-b"))).0,
            ["10.0.0.2", "10.0.0.3"]
        );
    }

    #[test]
    fn zone_hints_ignored_when_one_endpoint_lacks_them() {
        let slices = [
            web_slice("web-a", &[with_hints("10.0.0.1", &["zone-a"], &[])]),
            web_slice("web-b", &[with_hints("10.0.0.2", &[], &[])]),
        ];
        assert_eq!(
            web_on(web(), &slices, &node("node-a", Some("zone-a"))).0,
            ["10.0.0.1", "10.0.0.2"]
        );
        // Unready endpoints do not count, hinted or not.
        let slices = [web_slice(
            "web-a",
            &[
                with_hints("10.0.0.1", &["zone-a"], &[]),
                with_hints("10.0.0.2", &["zone-b"], &[]),
                on("10.0.0.3", "node-a", (false, false, false)),
            ],
        )];
        assert_eq!(
            web_on(web(), &slices, &node("node-a", Some("zone-a"))).0,
            ["10.0.0.1"]
        );
    }

    #[test]
    fn zone_hints_ignored_without_a_zone_label() {
        let slices = [web_slice(
            "web-a",
            &[
                with_hints("10.0.0.1", &["zone-a"], &[]),
                with_hints("10.0.0.2", &["zone-b"], &[]),
            ],
        )];
        let all = ["10.0.0.1", "10.0.0.2"];
        assert_eq!(web_on(web(), &slices, &node("node-a", None)).0, all);
        assert_eq!(web_on(web(), &slices, &node("node-a", Some(""))).0, all);
        assert_eq!(web_on(web(), &slices, &NodeInfo::default()).0, all);
    }

    #[test]
    fn zone_hints_ignored_when_none_is_for_this_zone() {
        let slices = [web_slice(
            "web-a",
            &[
                with_hints("10.0.0.1", &["zone-a"], &[]),
                with_hints("10.0.0.2", &["zone-b"], &[]),
            ],
        )];
        assert_eq!(
            web_on(web(), &slices, &node("node-a", Some("zone-c"))).0,
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn topology_ignored_under_local_policy_and_for_terminating_fallback() {
        let mut local = with_hints("10.0.0.1", &["zone-b"], &[]);
        local["nodeName"] = json!("node-a");
        let slices = [web_slice(
            "web-a",
            &[local, with_hints("10.0.0.2", &["zone-a"], &[])],
        )];
        assert_eq!(
            web_on(web_local(), &slices, &node("node-a", Some("zone-a"))).0,
            ["10.0.0.1"]
        );
        let terminating = |addr: &str, zone: &str| {
            let mut endpoint = with_hints(addr, &[zone], &[]);
            endpoint["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
            endpoint
        };
        let slices = [web_slice(
            "web-a",
            &[
                terminating("10.0.0.1", "zone-a"),
                terminating("10.0.0.2", "zone-b"),
            ],
        )];
        assert_eq!(
            web_on(web(), &slices, &node("node-a", Some("zone-a"))).0,
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn prefer_same_node_uses_node_hints() {
        let slices = [web_slice(
            "web-a",
            &[
                with_hints("10.0.0.1", &["zone-a"], &["node-a"]),
                with_hints("10.0.0.2", &["zone-a"], &["node-b"]),
                with_hints("10.0.0.3", &["zone-b"], &["node-c"]),
            ],
        )];
        let a = node("node-a", Some("zone-a"));
        assert_eq!(web_on(web_prefer_same_node(), &slices, &a).0, ["10.0.0.1"]);
        // Without PreferSameNode only the zone hints count.
        assert_eq!(web_on(web(), &slices, &a).0, ["10.0.0.1", "10.0.0.2"]);
        // No endpoint for this node: zone hints next.
        let d = node("node-d", Some("zone-a"));
        assert_eq!(
            web_on(web_prefer_same_node(), &slices, &d).0,
            ["10.0.0.1", "10.0.0.2"]
        );
        // An endpoint without a node hint: zone hints next.
        let mut partial = slices.to_vec();
        partial.push(web_slice(
            "web-b",
            &[with_hints("10.0.0.4", &["zone-a"], &[])],
        ));
        assert_eq!(
            web_on(web_prefer_same_node(), &partial, &a).0,
            ["10.0.0.1", "10.0.0.2", "10.0.0.4"]
        );
    }

    #[test]
    fn topology_mode_annotation_does_not_matter() {
        let annotated = |mode: &str| {
            let mut svc = web();
            svc.metadata.annotations = Some(
                [(
                    "service.kubernetes.io/topology-mode".to_string(),
                    mode.to_string(),
                )]
                .into(),
            );
            svc
        };
        let hinted_slices = [web_slice(
            "web-a",
            &[
                with_hints("10.0.0.1", &["zone-a"], &[]),
                with_hints("10.0.0.2", &["zone-b"], &[]),
            ],
        )];
        let plain = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.1", None), ("10.0.0.2", None)],
        )];
        let a = node("node-a", Some("zone-a"));
        for svc in [web(), annotated("Auto"), annotated("Disabled")] {
            assert_eq!(web_on(svc.clone(), &hinted_slices, &a).0, ["10.0.0.1"]);
            assert_eq!(web_on(svc, &plain, &a).0, ["10.0.0.1", "10.0.0.2"]);
        }
    }

    #[test]
    fn selection_independent_of_order_and_duplicates() {
        // 10.0.0.2 appears in two slices, hinted in one only: the copy
        // without hints turns zone hints off whichever slice comes first.
        let slices = vec![
            web_slice(
                "web-a",
                &[
                    with_hints("10.0.0.1", &["zone-a"], &[]),
                    with_hints("10.0.0.2", &["zone-b"], &[]),
                ],
            ),
            web_slice(
                "web-b",
                &[
                    on("10.0.0.2", "node-a", READY),
                    on("10.0.0.3", "node-b", TERMINATING),
                ],
            ),
        ];
        let a = node("node-a", Some("zone-a"));
        for service in [web(), web_local(), web_prefer_same_node()] {
            let forward = compute(std::slice::from_ref(&service), &slices, &a);
            let mut reversed: Vec<EndpointSlice> = slices.iter().rev().cloned().collect();
            for slice in &mut reversed {
                slice.endpoints.reverse();
            }
            assert_eq!(compute(&[service], &reversed, &a), forward);
        }
        assert_eq!(web_on(web(), &slices, &a).0, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(web_on(web_local(), &slices, &a).0, ["10.0.0.2"]);
    }

    #[test]
    fn node_info_from_objects() {
        let nodes: Vec<Node> = vec![
            from(json!({"metadata": {"name": "node-b",
                                     "labels": {LABEL_TOPOLOGY_ZONE: "zone-b"}}})),
            from(json!({"metadata": {"name": "node-a",
                                     "labels": {LABEL_TOPOLOGY_ZONE: "zone-a"}}})),
        ];
        let a = NodeInfo::from_objects("node-a", &nodes);
        assert_eq!(a, node("node-a", Some("zone-a")));
        assert_eq!(a.zone(), Some("zone-a"));
        assert_eq!(
            NodeInfo::from_objects("node-c", &nodes),
            node("node-c", None)
        );
        assert_eq!(NodeInfo::from_objects("", &nodes), NodeInfo::default());
        // A duplicate (broken static source) resolves the same either way.
        let mut dup = nodes.clone();
        dup.push(from(json!({"metadata": {"name": "node-a"}})));
        let one = NodeInfo::from_objects("node-a", &dup);
        dup.reverse();
        assert_eq!(NodeInfo::from_objects("node-a", &dup), one);
    }
}
