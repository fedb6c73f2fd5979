//! EndpointSlices: validated once into the facts the model reads (ports by
//! name and protocol, endpoints with their conditions, node and hints), and
//! the candidate endpoints of one Service port.

use super::*;

/// kube-proxy's health check count: distinct addresses of this node's ready
/// endpoints over every port of the Service's slices.
/// The addresses of `family` count: kube-proxy's proxier of each family
/// counts its own, and the Service's primary family's answers.
pub(super) fn local_ready_addresses(
    slices: &[&SliceEndpoints],
    node: &NodeInfo,
    family: Family,
) -> usize {
    slices
        .iter()
        .filter(|slice| !slice.ports.is_empty() && slice.family == family)
        .flat_map(|slice| &slice.endpoints)
        .filter(|info| info.ready && info.is_on(node))
        .map(|info| info.addr)
        .collect::<BTreeSet<_>>()
        .len()
}

pub(super) fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

/// What one EndpointSlice contributes, validated once however many Service
/// ports read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceEndpoints {
    /// `addressType`: every endpoint's address is of it.
    pub(super) family: Family,
    pub(super) ports: Box<[SlicePort]>,
    /// The endpoints that may ever be used: ready, or serving and
    /// terminating.
    pub(super) endpoints: Box<[EndpointInfo]>,
}

/// A port of a slice: its name, protocol and number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SlicePort {
    pub(super) name: Arc<str>,
    pub(super) protocol: Protocol,
    pub(super) number: u16,
}

/// What the endpoint selection needs to know of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EndpointInfo {
    /// The first address.
    pub(super) addr: IpAddr,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) node_name: Option<Arc<str>>,
    /// `None` when it carries no hint (most endpoints).
    pub(super) hints: Option<Box<Hints>>,
}

/// An endpoint's topology hints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Hints {
    /// `hints.forZones` names, sorted; empty when there is none.
    pub(super) zones: Box<[Arc<str>]>,
    /// `hints.forNodes` names, sorted; empty when there is none.
    pub(super) nodes: Box<[Arc<str>]>,
}

impl Hints {
    fn names(hints: Option<&Vec<api::Named>>) -> Box<[Arc<str>]> {
        let names: BTreeSet<&str> = hints
            .into_iter()
            .flatten()
            .map(|hint| hint.name.as_str())
            .collect();
        names.into_iter().map(intern).collect()
    }
}

/// Hint names, sorted; the empty list for an endpoint without hints.
pub(super) fn hinted(info: &EndpointInfo, names: fn(&Hints) -> &[Arc<str>]) -> &[Arc<str>] {
    info.hints.as_deref().map_or(&[], names)
}

/// Whether sorted hint `names` hold `name`.
pub(super) fn hints_name(names: &[Arc<str>], name: &str) -> bool {
    names.binary_search_by(|n| (**n).cmp(name)).is_ok()
}

impl EndpointInfo {
    pub(super) fn from_api(addr: IpAddr, endpoint: &api::Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let hints = endpoint.hints.as_ref().map(|h| Hints {
            zones: Hints::names(h.for_zones.as_ref()),
            nodes: Hints::names(h.for_nodes.as_ref()),
        });
        Self {
            addr,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: endpoint.node_name.as_deref().map(intern),
            hints: hints
                .filter(|h| !h.zones.is_empty() || !h.nodes.is_empty())
                .map(Box::new),
        }
    }

    /// Usable when no endpoint is ready (kube-proxy's terminating fallback).
    pub(super) fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }

    pub(super) fn is_on(&self, node: &NodeInfo) -> bool {
        !node.name.is_empty() && self.node_name.as_deref() == Some(node.name.as_str())
    }
}

/// Everything the model will ever read of one EndpointSlice, a few hundred
/// bytes instead of the object's few kilobytes: sources reduce slices to
/// this as they decode them, so a large initial load never holds the
/// objects themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceFacts {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Its Service and what it contributes; `None` when no Service of ours
    /// reads it.
    pub(crate) parsed: Option<(ServiceName, SliceEndpoints)>,
    pub(crate) warnings: Vec<Warning>,
}

impl SliceFacts {
    pub fn of(slice: &api::EndpointSlice) -> Self {
        let mut warnings = Vec::new();
        let parsed = parse_slice(slice, &mut warnings);
        let (namespace, name) = identity(&slice.metadata);
        Self {
            namespace: intern(namespace),
            name: name.into(),
            parsed,
            warnings,
        }
    }
}

/// A slice's Service and what it contributes; `None` for slices no Service
/// of ours reads (another address family, no Service label, another
/// proxy's, a headless Service's).
pub(super) fn parse_slice(
    slice: &api::EndpointSlice,
    warnings: &mut Vec<Warning>,
) -> Option<(ServiceName, SliceEndpoints)> {
    let (namespace, name) = identity(&slice.metadata);
    let object = || format!("EndpointSlice {namespace}/{name}");
    let Some(family) = Family::from_api(&slice.address_type) else {
        // FQDN slices are legal and for someone else (kube-proxy skips
        // them too); anything else is a broken object.
        if slice.address_type != "FQDN" {
            let problem = Problem::AddressType(slice.address_type.clone());
            warn(warnings, &object(), problem);
        }
        return None;
    };
    let labels = slice.metadata.labels.as_ref();
    let Some(service) = labels.and_then(|labels| labels.get(LABEL_SERVICE_NAME)) else {
        // Slices not managed for a Service are legal (custom controllers)
        // and simply unused.
        tracing::debug!("{}: no {LABEL_SERVICE_NAME} label, ignoring", object());
        return None;
    };
    if !is_ours(&slice.metadata) || labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return None;
    }
    let parsed = SliceEndpoints {
        family,
        ports: slice_ports(
            slice.ports.as_deref().unwrap_or_default(),
            &object,
            warnings,
        ),
        endpoints: usable_endpoints(slice, family, &object, warnings),
    };
    Some((ServiceName::new(namespace, service), parsed))
}

pub(super) fn slice_ports(
    ports: &[api::EndpointPort],
    object: &dyn Fn() -> String,
    warnings: &mut Vec<Warning>,
) -> Box<[SlicePort]> {
    let mut valid = Vec::new();
    for port in ports {
        let name = port.name.as_deref().unwrap_or("");
        let protocol = match Protocol::from_api(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(source) => {
                let name = name.to_string();
                warn(
                    warnings,
                    &object(),
                    Problem::SlicePortProtocol { name, source },
                );
                continue;
            }
        };
        let number = match port.port {
            None => Err(Problem::SlicePortMissing {
                name: name.to_string(),
            }),
            Some(port) => port_number(port).ok_or(Problem::SlicePortRange {
                name: name.to_string(),
                port,
            }),
        };
        match number {
            Ok(number) => valid.push(SlicePort {
                name: intern(name),
                protocol,
                number,
            }),
            Err(problem) => warn(warnings, &object(), problem),
        }
    }
    valid.into()
}

/// Every endpoint of a slice with an address of its `addressType` (an
/// address of the other family, or an IPv4-mapped IPv6 one, is warned
/// about and skipped: the slice is broken, not the Service). Selection
/// (`select_endpoints`) decides which ones new flows may use; the others
/// still exist, so flows they already serve are kept.
pub(super) fn usable_endpoints(
    slice: &api::EndpointSlice,
    family: Family,
    object: &dyn Fn() -> String,
    warnings: &mut Vec<Warning>,
) -> Box<[EndpointInfo]> {
    let mut usable = Vec::with_capacity(slice.endpoints.len());
    for (index, endpoint) in slice.endpoints.iter().enumerate() {
        let Some(first) = endpoint.addresses.first() else {
            warn(warnings, &object(), Problem::NoAddress { index });
            continue;
        };
        let addr = first.clone();
        let problem = match parse_ip(first) {
            Ok(ip) if Family::of(ip) == family => {
                usable.push(EndpointInfo::from_api(ip, endpoint));
                continue;
            }
            Err(source @ IpError::Ipv4Mapped) => Problem::MappedAddress {
                index,
                addr,
                source,
            },
            Ok(_) | Err(IpError::NotAnAddress) => Problem::BadAddress {
                index,
                addr,
                family,
            },
        };
        warn(warnings, &object(), problem);
    }
    usable.into()
}

/// One endpoint of one Service port: the destination, and what decides
/// whether it is used.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate<'a> {
    pub(super) endpoint: Endpoint,
    pub(super) info: &'a EndpointInfo,
}

/// The candidate endpoints of one Service port: every usable endpoint of
/// every slice, with the number that slice gives the port's (name, protocol).
/// An address in several slices is a candidate once per copy; the selection
/// only asks "any" and "all" questions, so copies cannot make it depend on
/// slice order.
pub(super) fn candidates_for<'a>(
    slices: &[&'a SliceEndpoints],
    name: &str,
    protocol: Protocol,
    family: Family,
) -> Vec<Candidate<'a>> {
    let mut candidates = Vec::new();
    for slice in slices.iter().filter(|slice| slice.family == family) {
        let numbers = slice
            .ports
            .iter()
            .filter(|p| &*p.name == name && p.protocol == protocol)
            .map(|p| p.number);
        for port in numbers {
            candidates.extend(slice.endpoints.iter().map(|info| Candidate {
                endpoint: Endpoint {
                    addr: info.addr,
                    port,
                },
                info,
            }));
        }
    }
    candidates
}

#[cfg(test)]
mod tests {
    //! Which endpoints of which slices a Service port gets, through
    //! [`compute`] as the agent derives them.

    use super::super::fixtures::*;
    use super::*;
    use serde_json::json;

    #[test]
    fn named_target_port_resolved_per_slice() {
        // Pods behind one Service may name the same container port with
        // different numbers; each slice carries its own resolution.
        let slices = [
            slice(
                "web-a",
                "web",
                &[("http", 8080, "TCP")],
                &[("10.0.0.1", None)],
            ),
            slice(
                "web-b",
                "web",
                &[("http", 9090, "TCP")],
                &[("10.0.0.2", None)],
            ),
        ];
        let (state, warnings) = compute(&[web()], &slices, &NodeInfo::default());
        assert_eq!(warnings, []);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080), ep("10.0.0.2", 9090)]
        );
        assert_eq!(
            &*state.frontends[&fe("10.96.0.10", 80, Protocol::Tcp)].service,
            "default/web:http"
        );
    }

    #[test]
    fn slice_port_protocol_must_match() {
        let slices = [slice(
            "web-a",
            "web",
            &[("http", 8080, "UDP")],
            &[("10.0.0.1", None)],
        )];
        let (state, _) = compute(&[web()], &slices, &NodeInfo::default());
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            []
        );
    }

    #[test]
    fn unnamed_port_matches_unnamed_slice_port() {
        let svc: Service = from(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }));
        let slc: EndpointSlice = from(json!({
            "metadata": {"name": "web-a", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }));
        let (state, warnings) = compute(&[svc], &[slc], &NodeInfo::default());
        assert_eq!(warnings, []);
        let frontend = fe("10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(endpoints_of(&state, frontend), [ep("10.0.0.1", 8080)]);
        assert_eq!(&*state.frontends[&frontend].service, "default/web");
    }

    #[test]
    fn unready_endpoint_excluded_and_unset_ready_counts() {
        let slices = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[
                ("10.0.0.1", Some(false)),
                ("10.0.0.2", None),
                ("10.0.0.3", Some(true)),
            ],
        )];
        let (state, warnings) = compute(&[web()], &slices, &NodeInfo::default());
        assert_eq!(warnings, []);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.2", 8080), ep("10.0.0.3", 8080)]
        );
    }

    #[test]
    fn endpoint_removed() {
        let before = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.1", None), ("10.0.0.2", None)],
        )];
        let after = [slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.0.0.2", None)],
        )];
        let frontend = fe("10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(
            endpoints_of(
                &compute(&[web()], &before, &NodeInfo::default()).0,
                frontend
            )
            .len(),
            2
        );
        let (state, _) = compute(&[web()], &after, &NodeInfo::default());
        assert_eq!(endpoints_of(&state, frontend), [ep("10.0.0.2", 8080)]);
        assert_eq!(state.frontends[&frontend].empty_action, EmptyAction::Reject);
    }

    #[test]
    fn slices_of_other_services_or_namespaces_not_used() {
        let other_ns: EndpointSlice = from(json!({
            "metadata": {"name": "web-x", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.9"]}],
        }));
        let other_svc = slice(
            "api-a",
            "api",
            &[("http", 8080, "TCP")],
            &[("10.0.0.8", None)],
        );
        let (state, _) = compute(&[web()], &[other_ns, other_svc], &NodeInfo::default());
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            []
        );
    }

    #[test]
    fn non_ipv4_slices_ignored() {
        let v6: EndpointSlice = from(json!({
            "metadata": {"name": "web-6", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"]}],
        }));
        let (state, warnings) = compute(&[web()], &[v6], &NodeInfo::default());
        assert_eq!(warnings, []);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            []
        );
    }

    #[test]
    fn duplicate_endpoint_across_slices_counted_once() {
        let slices = [
            slice(
                "web-a",
                "web",
                &[("http", 8080, "TCP")],
                &[("10.0.0.1", None)],
            ),
            slice(
                "web-b",
                "web",
                &[("http", 8080, "TCP")],
                &[("10.0.0.1", Some(true)), ("10.0.0.2", None)],
            ),
        ];
        let (state, _) = compute(&[web()], &slices, &NodeInfo::default());
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]
        );
    }

    #[test]
    fn bad_endpoint_address_warns_and_skips_endpoint() {
        let bad = slice(
            "bad-a",
            "bad",
            &[("http", 8080, "TCP")],
            &[("10.0.0.999", None), ("10.0.0.7", None)],
        );
        let bad_svc = service(
            "bad",
            "10.96.0.11",
            &[("http", 80, "TCP"), ("alt", 81, "TCP")],
        );
        assert_one_warning(
            std::slice::from_ref(&bad_svc),
            std::slice::from_ref(&bad),
            "EndpointSlice default/bad-a",
        );
        let (state, _) = compute(&[bad_svc], &[bad], &NodeInfo::default());
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.11", 80, Protocol::Tcp)),
            [ep("10.0.0.7", 8080)]
        );
    }

    #[test]
    fn bad_slice_port_warns() {
        let missing: EndpointSlice = from(json!({
            "metadata": {"name": "bad-a", "labels": {"kubernetes.io/service-name": "bad"}},
            "addressType": "IPv4",
            "ports": [{"name": "http"}],
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }));
        assert_one_warning(&[], &[missing], "EndpointSlice default/bad-a");
        let zero = slice("bad-a", "bad", &[("http", 0, "TCP")], &[("10.0.0.1", None)]);
        assert_one_warning(&[], &[zero], "EndpointSlice default/bad-a");
    }
}
