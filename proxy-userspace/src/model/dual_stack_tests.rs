//! IPv6 and dual-stack Services: every per-Service rule of the IPv4 path
//! holds per family, a frontend only ever gets endpoints of its own
//! family, and bad family input is one warning naming the object while
//! the rest is served.

use super::fixtures::*;
use super::*;
use serde_json::{Value, json};

const V4: &str = "10.96.0.10";
const V6: &str = "fd00:96::10";
const NODE6: &str = "fd00:192::1";

/// `web` with `clusterIPs` and `spec` fields overriding; port http 80
/// (nodePort 30080 when the type allows it).
fn web_with(cluster_ips: &[&str], spec: Value, status: Value) -> api::Service {
    let mut svc = json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]},
        "status": status,
    });
    for (key, value) in spec.as_object().unwrap() {
        svc["spec"][key] = value.clone();
    }
    from(svc)
}

fn dual_stack() -> api::Service {
    web_with(
        &[V4, V6],
        json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}),
        Value::Null,
    )
}

/// A slice of `web` (http -> 8080) of `family` with raw endpoints.
fn family_slice(name: &str, family: &str, endpoints: &[Value]) -> api::EndpointSlice {
    from(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": family,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
}

fn ready(addr: &str) -> Value {
    json!({"addresses": [addr], "conditions": {"ready": true}})
}

fn both_slices() -> Vec<api::EndpointSlice> {
    vec![
        family_slice("web-v4", "IPv4", &[ready("10.0.0.1"), ready("10.0.0.2")]),
        family_slice("web-v6", "IPv6", &[ready("fd00::1"), ready("fd00::2")]),
    ]
}

fn node_both() -> NodeInfo {
    node("node-a", None).with_addresses([
        NODE_IP.parse::<IpAddr>().unwrap(),
        NODE6.parse::<IpAddr>().unwrap(),
    ])
}

fn tcp(addr: &str, port: u16) -> Frontend {
    fe(addr, port, Protocol::Tcp)
}

#[test]
fn a_dual_stack_service_serves_each_family_from_its_own_slices() {
    let (state, warnings) = compute(&[dual_stack()], &both_slices(), &NodeInfo::default());
    assert_eq!(warnings, []);
    assert_eq!(
        endpoints_of(&state, tcp(V4, 80)),
        [ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)]
    );
    assert_eq!(
        endpoints_of(&state, tcp(V6, 80)),
        [ep("fd00::1", 8080), ep("fd00::2", 8080)]
    );
    // One family without endpoints rejects on its own cluster IP only.
    let (state, _) = compute(&[dual_stack()], &both_slices()[..1], &NodeInfo::default());
    assert_eq!(
        state.frontends[&tcp(V6, 80)].empty_action,
        EmptyAction::Reject
    );
    assert!(state.frontends[&tcp(V6, 80)].endpoints.is_empty());
    assert_eq!(endpoints_of(&state, tcp(V4, 80)).len(), 2);
}

#[test]
fn an_ipv6_only_service_is_served() {
    let svc = web_with(
        &[V6],
        json!({"ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack"}),
        Value::Null,
    );
    let (state, warnings) = compute(&[svc], &both_slices(), &NodeInfo::default());
    assert_eq!(warnings, []);
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [tcp(V6, 80)]
    );
    assert_eq!(
        endpoints_of(&state, tcp(V6, 80)),
        [ep("fd00::1", 8080), ep("fd00::2", 8080)]
    );
}

/// Issue 15, bad input: an IPv6 clusterIP on a SingleStack IPv4 Service
/// is one warning naming the Service; its IPv4 frontends are served.
#[test]
fn an_ipv6_cluster_ip_on_a_single_stack_ipv4_service_warns_and_serves_ipv4() {
    let svc = web_with(
        &[V4, V6],
        json!({"ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}),
        Value::Null,
    );
    let (state, warnings) = compute(&[svc], &both_slices(), &NodeInfo::default());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].object, "Service default/web");
    assert!(
        warnings[0]
            .reason
            .contains(&format!("clusterIPs: {V6} is IPv6"))
            && warnings[0].reason.contains("SingleStack"),
        "{}",
        warnings[0]
    );
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [tcp(V4, 80)]
    );
}

#[test]
fn ipv4_mapped_and_second_same_family_cluster_ips_warn_and_the_rest_is_served() {
    let mapped = web_with(&[V4, "::ffff:10.96.0.11"], json!({}), Value::Null);
    let (state, warnings) = compute(&[mapped], &both_slices(), &NodeInfo::default());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].reason.contains("IPv4-mapped"),
        "{}",
        warnings[0]
    );
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [tcp(V4, 80)]
    );

    let two = web_with(&[V6, "fd00:96::11"], json!({}), Value::Null);
    let (state, warnings) = compute(&[two], &both_slices(), &NodeInfo::default());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]
            .reason
            .contains("a second IPv6 address fd00:96::11"),
        "{}",
        warnings[0]
    );
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [tcp(V6, 80)]
    );

    // Only a mapped address: nothing to serve, and said so.
    let only = web_with(&["::ffff:10.96.0.11"], json!({}), Value::Null);
    let (state, warnings) = compute(&[only], &[], &NodeInfo::default());
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings.iter().all(|w| w.object == "Service default/web"));
    assert!(warnings.iter().any(|w| w.reason == "no clusterIP"));
    assert!(state.frontends.is_empty());
}

/// Issue 15, bad input: an endpoint of the other family (or IPv4-mapped)
/// in a slice is one warning naming the slice; its other endpoints serve.
#[test]
fn mismatched_slice_families_warn_per_endpoint() {
    let slices = vec![
        family_slice("web-v4", "IPv4", &[ready("10.0.0.1"), ready("fd00::9")]),
        family_slice(
            "web-v6",
            "IPv6",
            &[ready("::ffff:10.0.0.2"), ready("fd00::1")],
        ),
    ];
    let (state, warnings) = compute(&[dual_stack()], &slices, &NodeInfo::default());
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(warnings[0].object, "EndpointSlice default/web-v4");
    assert!(
        warnings[0]
            .reason
            .contains("\"fd00::9\" is not an IPv4 address"),
        "{}",
        warnings[0]
    );
    assert_eq!(warnings[1].object, "EndpointSlice default/web-v6");
    assert!(
        warnings[1].reason.contains("IPv4-mapped"),
        "{}",
        warnings[1]
    );
    assert_eq!(endpoints_of(&state, tcp(V4, 80)), [ep("10.0.0.1", 8080)]);
    assert_eq!(endpoints_of(&state, tcp(V6, 80)), [ep("fd00::1", 8080)]);
}

#[test]
fn unknown_address_types_warn_and_fqdn_slices_are_silently_someone_elses() {
    let slices = vec![
        family_slice("web-x", "IPv7", &[ready("10.0.0.1")]),
        family_slice("web-f", "FQDN", &[ready("example.com")]),
    ];
    let (_, warnings) = compute(&[dual_stack()], &slices, &NodeInfo::default());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].object, "EndpointSlice default/web-x");
    assert!(warnings[0].reason.contains("addressType \"IPv7\""));
}

/// NodePorts answer on the node's addresses of the Service's families;
/// LB ingress and externalIPs of either family; source ranges per family.
#[test]
fn node_ports_lb_and_external_ips_and_source_ranges_per_family() {
    let svc = web_with(
        &[V4, V6],
        json!({"type": "LoadBalancer", "ipFamilyPolicy": "RequireDualStack",
               "externalIPs": ["198.51.100.7", "2001:db8:e::7"],
               "loadBalancerSourceRanges": ["10.1.0.0/16", "2001:db8:c::/48"]}),
        json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}, {"ip": "2001:db8:1b::1"}]}}),
    );
    let (state, warnings) = compute(&[svc], &both_slices(), &node_both());
    assert_eq!(warnings, []);
    let kinds: Vec<(Frontend, FrontendKind)> =
        state.frontends.iter().map(|(f, s)| (*f, s.kind)).collect();
    assert_eq!(
        kinds,
        [
            (tcp(V4, 80), FrontendKind::ClusterIp),
            (tcp("192.168.0.1", 30080), FrontendKind::NodePort),
            (tcp("198.51.100.7", 80), FrontendKind::ExternalIp),
            (tcp("203.0.113.1", 80), FrontendKind::LoadBalancer),
            (tcp("2001:db8:e::7", 80), FrontendKind::ExternalIp),
            (tcp("2001:db8:1b::1", 80), FrontendKind::LoadBalancer),
            (tcp(V6, 80), FrontendKind::ClusterIp),
            (tcp(NODE6, 30080), FrontendKind::NodePort),
        ]
    );
    let ranges = |f: Frontend| {
        let ext = state.frontends[&f].external.as_ref().unwrap();
        ext.source_ranges
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ranges(tcp("203.0.113.1", 80)), ["10.1.0.0/16"]);
    assert_eq!(ranges(tcp("2001:db8:1b::1", 80)), ["2001:db8:c::/48"]);
    let lb6 = state.frontends[&tcp("2001:db8:1b::1", 80)]
        .external
        .as_ref()
        .unwrap();
    assert_eq!(lb6.endpoints, [ep("fd00::1", 8080), ep("fd00::2", 8080)]);
    assert!(lb6.masquerade);
    assert_eq!(
        endpoints_of(&state, tcp(NODE6, 30080)),
        [ep("fd00::1", 8080), ep("fd00::2", 8080)]
    );
}

/// A source range holding the node's IPv6 address lets the node and the
/// Service's IPv6 LB IPs in, on the IPv6 frontends.
#[test]
fn allow_from_node_per_family() {
    let svc = web_with(
        &[V6],
        json!({"type": "LoadBalancer", "loadBalancerSourceRanges": [format!("{NODE6}/128")]}),
        json!({"loadBalancer": {"ingress": [{"ip": "2001:db8:1b::1"}]}}),
    );
    let (state, warnings) = compute(&[svc], &both_slices(), &node_both());
    assert_eq!(warnings, []);
    let ext = state.frontends[&tcp("2001:db8:1b::1", 80)]
        .external
        .as_ref()
        .unwrap();
    assert!(ext.allow_node);
    let ranges: Vec<String> = ext.source_ranges.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        ranges,
        ["2001:db8:1b::1/128", format!("{NODE6}/128").as_str()]
    );
}

/// Traffic policies, the terminating fallback and affinity are decided
/// per family, as kube-proxy's proxier of each family decides them.
#[test]
fn policies_and_terminating_fallback_per_family() {
    let svc = web_with(
        &[V4, V6],
        json!({"type": "NodePort", "internalTrafficPolicy": "Local",
               "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP"}),
        Value::Null,
    );
    let slices = vec![
        // IPv4: ready, on node-b only.
        family_slice("web-v4", "IPv4", &[on("10.0.0.1", "node-b", READY)]),
        // IPv6: none ready; a terminating one here and one on node-b.
        family_slice(
            "web-v6",
            "IPv6",
            &[
                on("fd00::1", "node-a", TERMINATING),
                on("fd00::2", "node-b", TERMINATING),
            ],
        ),
    ];
    let (state, warnings) = compute(&[svc], &slices, &node_both());
    assert_eq!(warnings, []);
    let v4 = &state.frontends[&tcp(V4, 80)];
    assert!(v4.endpoints.is_empty());
    assert_eq!(v4.empty_action, EmptyAction::Drop, "iTP Local, none here");
    let v6 = &state.frontends[&tcp(V6, 80)];
    assert_eq!(v6.endpoints, [ep("fd00::1", 8080)], "local terminating one");
    assert_eq!(v6.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
    let np6 = state.frontends[&tcp(NODE6, 30080)]
        .external
        .as_ref()
        .unwrap();
    assert_eq!(np6.endpoints, [ep("fd00::1", 8080)]);
    assert!(!np6.masquerade);
    let np4 = state.frontends[&tcp(NODE_IP, 30080)]
        .external
        .as_ref()
        .unwrap();
    assert_eq!(np4.empty_action, EmptyAction::Drop);
}

/// The health check counts the primary family's local endpoints: a
/// dual-stack pod is one endpoint, not two.
#[test]
fn health_check_counts_the_primary_family() {
    let svc = |families: Value| {
        web_with(
            &[V4, V6],
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": 32000, "ipFamilies": families,
                   "ipFamilyPolicy": "PreferDualStack"}),
            Value::Null,
        )
    };
    let slices = vec![
        family_slice("web-v4", "IPv4", &[on("10.0.0.1", "node-a", READY)]),
        family_slice(
            "web-v6",
            "IPv6",
            &[
                on("fd00::1", "node-a", READY),
                on("fd00::2", "node-a", READY),
            ],
        ),
    ];
    for (families, count) in [(json!(["IPv4", "IPv6"]), 1), (json!(["IPv6", "IPv4"]), 2)] {
        let (state, warnings) = compute(&[svc(families.clone())], &slices, &node_both());
        assert_eq!(warnings, []);
        assert_eq!(
            state.health_checks[&32000].local_endpoints, count,
            "{families}"
        );
    }
}

#[test]
fn ipv6_prefixes_parse_and_contain_within_their_family_only() {
    let cidr: IpCidr = "2001:db8:c::1/48".parse().unwrap();
    assert_eq!(cidr.to_string(), "2001:db8:c::/48");
    assert!(cidr.contains("2001:db8:c:ffff::1".parse().unwrap()));
    assert!(!cidr.contains("2001:db8:d::".parse().unwrap()));
    let all6: IpCidr = "::/0".parse().unwrap();
    assert!(
        !all6.contains("10.0.0.1".parse().unwrap()),
        "never across families"
    );
    let all4: IpCidr = "0.0.0.0/0".parse().unwrap();
    assert!(!all4.contains("fd00::1".parse().unwrap()));
    assert!("fd00::/129".parse::<IpCidr>().is_err());
    assert!("10.0.0.0/33".parse::<IpCidr>().is_err());
    assert!("fd00::".parse::<IpCidr>().is_err());
    assert_eq!(
        "10.1.2.3/8".parse::<IpCidr>().unwrap(),
        "10.0.0.0/8".parse::<Ipv4Cidr>().unwrap().into()
    );
}
