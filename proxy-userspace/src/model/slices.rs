//! EndpointSlices: validated once into the facts the model reads (ports by
//! name and protocol, endpoints with their conditions, node and hints), and
//! the candidate endpoints of one Service port.

use super::*;

/// kube-proxy's health check count: distinct addresses of this node's ready
/// endpoints over every port of the Service's slices.
pub(super) fn local_ready_addresses(slices: &[&SliceEndpoints], node: &NodeInfo) -> usize {
    slices
        .iter()
        .filter(|slice| !slice.ports.is_empty())
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
    /// (name, protocol, number)
    pub(super) ports: Vec<(String, Protocol, u16)>,
    /// The endpoints that may ever be used: ready, or serving and
    /// terminating.
    pub(super) endpoints: Vec<EndpointInfo>,
}

/// What the endpoint selection needs to know of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EndpointInfo {
    /// The first address.
    pub(super) addr: Ipv4Addr,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) node_name: Option<String>,
    /// `hints.forZones` names; empty when there is no hint.
    pub(super) zone_hints: BTreeSet<String>,
    /// `hints.forNodes` names; empty when there is no hint.
    pub(super) node_hints: BTreeSet<String>,
}

impl EndpointInfo {
    pub(super) fn from_api(addr: Ipv4Addr, endpoint: &ApiEndpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let hints = endpoint.hints.as_ref();
        Self {
            addr,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: endpoint.node_name.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|zone| zone.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|node| node.name.clone())
                .collect(),
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
    pub namespace: String,
    pub name: String,
    /// Its Service and what it contributes; `None` when no Service of ours
    /// reads it.
    pub(crate) parsed: Option<((String, String), SliceEndpoints)>,
    pub(crate) warnings: Vec<Warning>,
}

impl SliceFacts {
    pub fn of(slice: &EndpointSlice) -> Self {
        let mut warnings = Vec::new();
        let parsed = parse_slice(slice, &mut warnings);
        Self {
            namespace: namespace_of(&slice.metadata).to_string(),
            name: slice.metadata.name.clone().unwrap_or_default(),
            parsed,
            warnings,
        }
    }
}

/// A slice's Service (namespace, name) and what it contributes; `None` for
/// slices no Service of ours reads (another address family, no Service
/// label, another proxy's, a headless Service's).
pub(super) fn parse_slice(
    slice: &EndpointSlice,
    warnings: &mut Vec<Warning>,
) -> Option<((String, String), SliceEndpoints)> {
    let namespace = namespace_of(&slice.metadata);
    let name = slice.metadata.name.as_deref().unwrap_or("");
    let object = format!("EndpointSlice {namespace}/{name}");
    if slice.address_type != "IPv4" {
        tracing::debug!("{object}: ignoring addressType {:?}", slice.address_type);
        return None;
    }
    let labels = slice.metadata.labels.as_ref();
    let Some(service) = labels.and_then(|labels| labels.get(LABEL_SERVICE_NAME)) else {
        // Slices not managed for a Service are legal (custom controllers)
        // and simply unused.
        tracing::debug!("{object}: no {LABEL_SERVICE_NAME} label, ignoring");
        return None;
    };
    if !is_ours(&slice.metadata) || labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return None;
    }
    let parsed = SliceEndpoints {
        ports: slice_ports(
            slice.ports.as_deref().unwrap_or_default(),
            &object,
            warnings,
        ),
        endpoints: usable_endpoints(slice, &object, warnings),
    };
    Some(((namespace.to_string(), service.clone()), parsed))
}

pub(super) fn slice_ports(
    ports: &[EndpointPort],
    object: &str,
    warnings: &mut Vec<Warning>,
) -> Vec<(String, Protocol, u16)> {
    let mut valid = Vec::new();
    for port in ports {
        let name = port.name.clone().unwrap_or_default();
        let protocol = match Protocol::from_api(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(source) => {
                warn(
                    warnings,
                    object,
                    Problem::SlicePortProtocol { name, source },
                );
                continue;
            }
        };
        let number = match port.port {
            None => Err(Problem::SlicePortMissing { name: name.clone() }),
            Some(port) => port_number(port).ok_or(Problem::SlicePortRange {
                name: name.clone(),
                port,
            }),
        };
        match number {
            Ok(number) => valid.push((name, protocol, number)),
            Err(problem) => warn(warnings, object, problem),
        }
    }
    valid
}

/// Every endpoint of a slice with a parseable address. Selection
/// (`select_endpoints`) decides which ones new flows may use; the others
/// still exist, so flows they already serve are kept.
pub(super) fn usable_endpoints(
    slice: &EndpointSlice,
    object: &str,
    warnings: &mut Vec<Warning>,
) -> Vec<EndpointInfo> {
    let mut usable = Vec::new();
    for (index, endpoint) in slice.endpoints.iter().enumerate() {
        let Some(first) = endpoint.addresses.first() else {
            warn(warnings, object, Problem::NoAddress { index });
            continue;
        };
        let Ok(addr) = first.parse::<Ipv4Addr>() else {
            let problem = Problem::BadAddress {
                index,
                addr: first.clone(),
            };
            warn(warnings, object, problem);
            continue;
        };
        usable.push(EndpointInfo::from_api(addr, endpoint));
    }
    usable
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
) -> Vec<Candidate<'a>> {
    let mut candidates = Vec::new();
    for slice in slices {
        let numbers = slice
            .ports
            .iter()
            .filter(|(n, p, _)| n == name && *p == protocol)
            .map(|(_, _, number)| *number);
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
