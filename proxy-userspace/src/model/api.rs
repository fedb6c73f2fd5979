//! Services and EndpointSlices as the proxy reads them: only the fields the
//! model looks at, decoded straight from the API server's JSON or a
//! manifest's YAML.
//!
//! An API server's objects carry much the proxy never reads: managed fields
//! (often larger than the object), the last-applied annotation (a second
//! copy of it), owner references, timestamps, endpoints' target
//! references. Decoding them into k8s-openapi's types and trimming after
//! the fact allocated all of that for every object of a 30,000-Service
//! list; here serde skips what is not named without keeping any of it.
//!
//! The fields kept have k8s-openapi's types and its leniency (a required
//! field that is missing or null reads as its default), so whatever the
//! model reads is accepted or refused exactly as k8s-openapi would. Fields
//! the proxy does not read are not type-checked at all.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A Service: `metadata`, `spec` and `status.loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ServiceSpec>,
    #[serde(default)]
    pub status: Option<ServiceStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    pub ip_families: Option<Vec<String>>,
    #[serde(default)]
    pub ip_family_policy: Option<String>,
    #[serde(default)]
    pub ports: Option<Vec<ServicePort>>,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    #[serde(default)]
    pub external_traffic_policy: Option<String>,
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    #[serde(default)]
    pub session_affinity: Option<String>,
    #[serde(default)]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(default)]
    pub load_balancer_source_ranges: Option<Vec<String>>,
    #[serde(default)]
    pub health_check_node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    pub port: i32,
    #[serde(default)]
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(default, rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    #[serde(default)]
    pub timeout_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct LoadBalancerStatus {
    #[serde(default)]
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub ip_mode: Option<String>,
}

/// An EndpointSlice: `metadata`, `addressType`, `ports` and `endpoints`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "or_default")]
    pub address_type: String,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
    #[serde(default, deserialize_with = "or_default")]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "or_default")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub hints: Option<EndpointHints>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHints {
    #[serde(default)]
    pub for_zones: Option<Vec<Named>>,
    #[serde(default)]
    pub for_nodes: Option<Vec<Named>>,
}

/// `hints.forZones[]` and `hints.forNodes[]` entries.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Named {
    #[serde(default, deserialize_with = "or_default")]
    pub name: String,
}

/// k8s-openapi reads a required field that is null as its default.
fn or_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    deserializer: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// What is read of `metadata`: the name, namespace and labels (whether an
/// object is ours, which Service a slice serves), and the resource version
/// a watch resumes from.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    resource_version: Option<String>,
}

fn slim_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = Option::<SlimMeta>::deserialize(deserializer)?;
    Ok(meta.map_or_else(ObjectMeta::default, |m| ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        resource_version: m.resource_version,
        ..ObjectMeta::default()
    }))
}

/// What kube-runtime's watcher needs to list and watch these types.
macro_rules! resource {
    ($type:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = kube::core::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(Service, "Service", "", "v1", "services");
resource!(
    EndpointSlice,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices"
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Everything the model reads decodes as k8s-openapi decodes it; the
    /// rest is dropped on the way in.
    #[test]
    fn reads_what_k8s_openapi_reads_and_keeps_nothing_else() {
        let object = json!({
            "metadata": {
                "name": "web", "namespace": "prod", "uid": "u", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "o"}],
            },
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": null, "nodePort": 30001}],
                     "selector": {"app": "web"}},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4", "ipMode": "VIP"}]},
                       "conditions": []},
        });
        let ours: Service = serde_json::from_value(object.clone()).unwrap();
        let theirs: k8s_openapi::api::core::v1::Service = serde_json::from_value(object).unwrap();
        assert_eq!(
            ours.metadata,
            ObjectMeta {
                name: Some("web".into()),
                namespace: Some("prod".into()),
                labels: theirs.metadata.labels.clone(),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            }
        );
        let spec = ours.spec.unwrap();
        let their_spec = theirs.spec.unwrap();
        assert_eq!(spec.cluster_ip, their_spec.cluster_ip);
        let port = &spec.ports.unwrap()[0];
        let their_port = &their_spec.ports.unwrap()[0];
        assert_eq!(
            (port.port, port.node_port),
            (their_port.port, their_port.node_port)
        );
        let ingress = &ours.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0];
        assert_eq!(
            (ingress.ip.as_deref(), ingress.ip_mode.as_deref()),
            (Some("1.2.3.4"), Some("VIP"))
        );
    }
}
