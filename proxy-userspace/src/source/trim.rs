//! Objects cut down to what the model reads before anything keeps them.
//!
//! An API server's objects carry much the proxy never looks at: managed
//! fields (often larger than the object), the last-applied annotation (a
//! second copy of it), owner references, timestamps, endpoints' target
//! references, a Node's status (images, conditions, addresses). Kept for
//! 30,000 Services they cost more than everything else the agent holds, so
//! they go as soon as an object arrives, as kube-rs' own examples do with
//! `managed_fields_mut().clear()`.

use k8s_openapi::api::core::v1::{Node, NodeSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Keeps name, namespace and labels: the labels say whether the object is
/// ours (`service-proxy-name`, `headless`) and which Service a slice serves.
fn metadata(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        ..ObjectMeta::default()
    };
}

pub fn service(service: &mut Service) {
    metadata(&mut service.metadata);
    if let Some(status) = &mut service.status {
        // Only the load balancer's ingress IPs are read.
        status.conditions = None;
    }
}

pub fn slice(slice: &mut EndpointSlice) {
    metadata(&mut slice.metadata);
    for endpoint in &mut slice.endpoints {
        endpoint.target_ref = None;
        endpoint.hostname = None;
        endpoint.deprecated_topology = None;
        endpoint.zone = None;
    }
}

/// Keeps, besides name and labels (topology), what tells whether the node
/// may take traffic: its deletion timestamp and taints.
pub fn node(node: &mut Node) {
    let deleting = node.metadata.deletion_timestamp.take();
    metadata(&mut node.metadata);
    node.metadata.deletion_timestamp = deleting;
    node.spec = node.spec.take().map(|spec| NodeSpec {
        taints: spec.taints,
        ..NodeSpec::default()
    });
    node.status = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_the_model_reads_stays() {
        let mut svc: Service = serde_json::from_value(json!({
            "metadata": {
                "name": "web", "namespace": "prod", "uid": "u", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "o"}],
            },
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}},
        }))
        .unwrap();
        let mut expected = svc.clone();
        expected.metadata = ObjectMeta {
            name: Some("web".into()),
            namespace: Some("prod".into()),
            labels: svc.metadata.labels.clone(),
            ..ObjectMeta::default()
        };
        service(&mut svc);
        assert_eq!(svc, expected);
    }
}
