//! Offline checks of the deployment manifests (manifests/deploy/), no root
//! and no cluster needed:
//!
//! - every document deserializes into its typed k8s-openapi struct with no
//!   unknown or misspelled field (a YAML → JSON → typed → JSON round trip
//!   must give back the same JSON: serde drops what the type does not know);
//! - the ClusterRole grants every API call the agent makes, and nothing
//!   else;
//! - the agent container runs with the least privilege it documents
//!   (capabilities, seccomp) and is probed on its health server.
//!
//! What the cluster would do with them (the runtime's seccomp profile, the
//! probes against a running pod) cannot be checked here: there is no
//! container runtime in CI.
//! - every environment variable the DaemonSet sets (directly or from the
//!   ConfigMap) is one the agent's `run` command reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What the agent asks the API server for, as (apiGroup, resource, verbs).
/// Keep in step with proxy-userspace/src/kube_source.rs: one kube-runtime
/// reflector (list + watch; `get` as kube-proxy's role has it) per resource:
/// Services, discovery.k8s.io/v1 EndpointSlices, and its own Node (a field
/// selector on metadata.name). It records no Events.
const REQUIRED_RULES: &[(&str, &str, &[&str])] = &[
    ("", "services", &["get", "list", "watch"]),
    (
        "discovery.k8s.io",
        "endpointslices",
        &["get", "list", "watch"],
    ),
    ("", "nodes", &["get", "list", "watch"]),
];

/// The capabilities the DaemonSet documents (each justified in its YAML).
const CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];
/// Paths the agent's health server answers (proxy-userspace/src/metrics.rs).
const HEALTH_PATHS: &[&str] = &["/healthz", "/livez", "/readyz"];

/// Environment variables the manifests may set that are not `run` flags:
/// the API server's address for the in-cluster client and the log filter.
const NON_FLAG_ENV: &[&str] = &[
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    "RUST_LOG",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    workspace().join("manifests/deploy")
}

/// One parsed document: its file, kind, name and JSON form.
struct Doc {
    file: String,
    kind: String,
    name: String,
    value: Value,
}

impl Doc {
    fn what(&self) -> String {
        format!("{}: {} {:?}", self.file, self.kind, self.name)
    }
}

/// The Kubernetes object files: every *.yaml but kustomization.yaml.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap_or_else(|e| panic!("reading {}: {e}", deploy_dir().display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no manifests in {}",
        deploy_dir().display()
    );
    files
}

fn load_docs() -> Vec<Doc> {
    let mut docs = Vec::new();
    for path in manifest_files() {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(de)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not valid YAML: {e}"));
            if value.is_null() {
                continue; // an empty document (a trailing `---`)
            }
            let field = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(String::from);
            let kind =
                field(&value, "kind").unwrap_or_else(|| panic!("{file}: document {i} has no kind"));
            let name = value
                .get("metadata")
                .and_then(|m| field(m, "name"))
                .unwrap_or_else(|| panic!("{file}: document {i} ({kind}) has no metadata.name"));
            docs.push(Doc {
                file: file.clone(),
                kind,
                name,
                value,
            });
        }
    }
    docs
}

/// Removes `null` members (serialization skips unset optional fields).
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Every path where `a` (the manifest) and `b` (after the round trip) differ.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => differences(&p, va, vb, out),
                    (Some(va), None) => out.push(format!(
                        "{p}: unknown field (dropped by the typed struct; was {va})"
                    )),
                    (None, Some(vb)) => out.push(format!("{p}: added by the round trip: {vb}")),
                    (None, None) => unreachable!(),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!(
            "{path}: manifest has {a}, the typed struct gives {b}"
        )),
    }
}

/// Deserializes `doc` into `T` and checks nothing was lost or changed.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    let typed: T = serde_json::from_value(doc.value.clone())
        .unwrap_or_else(|e| panic!("{}: does not deserialize: {e}", doc.what()));
    let back = serde_json::to_value(&typed).expect("serializing a k8s-openapi object");
    let mut diffs = Vec::new();
    differences(
        "",
        &without_nulls(&doc.value),
        &without_nulls(&back),
        &mut diffs,
    );
    assert!(
        diffs.is_empty(),
        "{}: the manifest does not match its typed form:\n  {}",
        doc.what(),
        diffs.join("\n  ")
    );
    typed
}

/// The typed objects of manifests/deploy, by kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn typed_objects() -> Objects {
    let mut o = Objects::default();
    for doc in load_docs() {
        let api_version = doc.value.get("apiVersion").and_then(Value::as_str);
        let expected = match doc.kind.as_str() {
            "Namespace" | "ServiceAccount" | "ConfigMap" => "v1",
            "ClusterRole" | "ClusterRoleBinding" => "rbac.authorization.k8s.io/v1",
            "DaemonSet" => "apps/v1",
            other => panic!("{}: unexpected kind {other}", doc.what()),
        };
        assert_eq!(api_version, Some(expected), "{}: apiVersion", doc.what());
        match doc.kind.as_str() {
            "Namespace" => o.namespaces.push(round_trip(&doc)),
            "ServiceAccount" => o.service_accounts.push(round_trip(&doc)),
            "ClusterRole" => o.cluster_roles.push(round_trip(&doc)),
            "ClusterRoleBinding" => o.bindings.push(round_trip(&doc)),
            "ConfigMap" => o.config_maps.push(round_trip(&doc)),
            "DaemonSet" => o.daemon_sets.push(round_trip(&doc)),
            _ => unreachable!(),
        }
    }
    o
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

#[test]
fn every_document_is_a_valid_typed_object() {
    let o = typed_objects();
    for (kind, n) in [
        ("Namespace", o.namespaces.len()),
        ("ServiceAccount", o.service_accounts.len()),
        ("ClusterRole", o.cluster_roles.len()),
        ("ClusterRoleBinding", o.bindings.len()),
        ("ConfigMap", o.config_maps.len()),
        ("DaemonSet", o.daemon_sets.len()),
    ] {
        assert_eq!(n, 1, "expected exactly one {kind} in manifests/deploy");
    }
}

#[test]
fn the_round_trip_catches_a_misspelled_field() {
    let doc = Doc {
        file: "inline".into(),
        kind: "ServiceAccount".into(),
        name: "x".into(),
        value: serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "x", "namespce": "typo"},
        }),
    };
    let caught = std::panic::catch_unwind(|| round_trip::<ServiceAccount>(&doc));
    let message = caught.expect_err("a misspelled field must fail the round trip");
    let text = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(text.contains(".metadata.namespce"), "{text}");
}

#[test]
fn kustomization_lists_every_manifest_and_the_namespace() {
    let path = deploy_dir().join("kustomization.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let k: Value = serde_yaml::from_str(&text).expect("kustomization.yaml is YAML");
    assert_eq!(k["namespace"], "kube-ebpf-proxy", "kustomization namespace");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("kustomization resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_string())
        .collect();
    let files: BTreeSet<String> = manifest_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml resources vs manifests/deploy/*.yaml"
    );
}

fn lists(list: &Option<Vec<String>>, x: &str) -> bool {
    list.as_deref()
        .unwrap_or_default()
        .iter()
        .any(|v| v == x || v == "*")
}

#[test]
fn cluster_role_grants_every_api_call_of_the_agent() {
    let o = typed_objects();
    let role = &o.cluster_roles[0];
    let rules = role.rules.as_deref().unwrap_or_default();
    let mut missing = Vec::new();
    for (group, resource, verbs) in REQUIRED_RULES {
        for verb in *verbs {
            let granted = rules.iter().any(|r| {
                lists(&r.api_groups, group)
                    && lists(&r.resources, resource)
                    && r.verbs.iter().any(|v| v == verb || v == "*")
            });
            if !granted {
                missing.push(format!("{verb} {resource} (apiGroup {group:?})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "rbac.yaml: ClusterRole {:?} does not grant: {}",
        name_of(&role.metadata),
        missing.join(", ")
    );

    // Bound to the DaemonSet's service account.
    let ds = &o.daemon_sets[0];
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let sa = pod
        .service_account_name
        .as_deref()
        .expect("DaemonSet serviceAccountName");
    let sa_ns = ds
        .metadata
        .namespace
        .as_deref()
        .expect("DaemonSet namespace");
    assert!(
        o.service_accounts
            .iter()
            .any(|s| name_of(&s.metadata) == sa && s.metadata.namespace.as_deref() == Some(sa_ns)),
        "no ServiceAccount {sa_ns}/{sa}"
    );
    let bound = o.bindings.iter().any(|b| {
        b.role_ref.kind == "ClusterRole"
            && b.role_ref.name == name_of(&role.metadata)
            && b.subjects.as_deref().unwrap_or_default().iter().any(|s| {
                s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(sa_ns)
            })
    });
    assert!(
        bound,
        "no ClusterRoleBinding of {:?} to {sa_ns}/{sa}",
        name_of(&role.metadata)
    );
}

/// Every grant is one the agent needs: no other resource, verb or group, no
/// wildcard (an unused grant is a credential an attacker could use).
#[test]
fn cluster_role_grants_nothing_the_agent_does_not_use() {
    let o = typed_objects();
    let role = &o.cluster_roles[0];
    let mut extra = Vec::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "rbac.yaml: unexpected rule {rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    let needed = REQUIRED_RULES.iter().any(|(g, r, verbs)| {
                        g == group && r == resource && verbs.contains(&verb.as_str())
                    });
                    if !needed {
                        extra.push(format!("{verb} {resource} (apiGroup {group:?})"));
                    }
                }
            }
        }
    }
    assert!(
        extra.is_empty(),
        "rbac.yaml: ClusterRole {:?} grants what the agent never calls: {}",
        name_of(&role.metadata),
        extra.join(", ")
    );
}

/// The DaemonSet's agent container (the one started with `run`).
fn agent_container(o: &Objects) -> (&PodSpec, &Container) {
    let pod = o.daemon_sets[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let agent = pod
        .containers
        .iter()
        .find(|c| {
            c.args
                .as_deref()
                .and_then(<[String]>::first)
                .is_some_and(|a| a == "run")
        })
        .expect("a container with args [run, ...]");
    (pod, agent)
}

#[test]
fn agent_container_runs_with_least_privilege() {
    let o = typed_objects();
    let (pod, agent) = agent_container(&o);
    let sc = agent
        .security_context
        .as_ref()
        .expect("the agent container's securityContext");
    assert_eq!(sc.privileged, Some(false), "privileged");
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "allowPrivilegeEscalation"
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "readOnlyRootFilesystem"
    );
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "drop");
    let mut added: Vec<&str> = caps
        .add
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    added.sort_unstable();
    assert_eq!(added, CAPABILITIES, "capabilities added");
    // The container's own profile wins over the pod's.
    let seccomp = sc.seccomp_profile.as_ref().or(pod
        .security_context
        .as_ref()
        .and_then(|p| p.seccomp_profile.as_ref()));
    assert_eq!(
        seccomp.map(|p| p.type_.as_str()),
        Some("RuntimeDefault"),
        "the agent runs under the runtime's default seccomp profile"
    );
}

/// The port the health server listens on: the ConfigMap's
/// KEP_HEALTHZ_BIND_ADDRESS, else the agent's default (from its help).
fn health_port(o: &Objects) -> i32 {
    let configured = o
        .config_maps
        .iter()
        .filter_map(|c| c.data.as_ref()?.get("KEP_HEALTHZ_BIND_ADDRESS"))
        .next()
        .cloned();
    let addr = configured.unwrap_or_else(|| {
        let help = run_help();
        let flag = help
            .split("--healthz-bind-address <")
            .nth(1)
            .expect("--healthz-bind-address in run --help");
        let default = flag
            .split("[default: ")
            .nth(1)
            .and_then(|d| d.split(']').next())
            .expect("a default for --healthz-bind-address");
        default.to_string()
    });
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in health address {addr:?}"))
}

#[test]
fn probes_reach_the_health_server() {
    let o = typed_objects();
    let (_, agent) = agent_container(&o);
    let port = health_port(&o);
    assert_eq!(port, 10256, "kube-proxy's healthz port");
    for (what, probe) in [
        ("livenessProbe", &agent.liveness_probe),
        ("readinessProbe", &agent.readiness_probe),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what}: an httpGet probe"));
        assert_eq!(get.port, IntOrString::Int(port), "{what} port");
        let path = get.path.as_deref().unwrap_or("/");
        assert!(HEALTH_PATHS.contains(&path), "{what}: {path}");
    }
    // A liveness probe on /healthz would restart the agent of a node being
    // deleted (/healthz fails then, on purpose).
    let live = agent
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(live.and_then(|g| g.path.as_deref()), Some("/livez"));
}

/// `kube-ebpf-proxy run --help`, from $KEP_AGENT_BIN or the debug build.
fn run_help() -> String {
    let bin = std::env::var_os("KEP_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/kube-ebpf-proxy"));
    assert!(
        bin.is_file(),
        "agent binary {} not found: run `cargo build -p proxy-userspace` (after \
         `cargo xtask build-ebpf`) or set KEP_AGENT_BIN",
        bin.display()
    );
    let out = std::process::Command::new(&bin)
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("running {} run --help: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} run --help failed: {out:?}",
        bin.display()
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

#[test]
fn every_env_var_set_is_an_agent_flag() {
    let o = typed_objects();
    let (_, agent) = agent_container(&o);

    // name → where it is set
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for e in agent.env.as_deref().unwrap_or_default() {
        names.insert(e.name.clone(), "daemonset.yaml env".into());
    }
    for from in agent.env_from.as_deref().unwrap_or_default() {
        let Some(cm_ref) = &from.config_map_ref else {
            panic!("daemonset.yaml: envFrom other than a configMapRef: {from:?}");
        };
        let cm = o
            .config_maps
            .iter()
            .find(|c| name_of(&c.metadata) == cm_ref.name)
            .unwrap_or_else(|| {
                panic!(
                    "envFrom ConfigMap {:?} is not in manifests/deploy",
                    cm_ref.name
                )
            });
        for key in cm.data.iter().flat_map(|d| d.keys()) {
            names.insert(key.clone(), format!("ConfigMap {:?}", cm_ref.name));
        }
    }

    let help = run_help();
    let unknown: Vec<String> = names
        .iter()
        .filter(|(name, _)| !NON_FLAG_ENV.contains(&name.as_str()))
        .filter(|(name, _)| !help.contains(&format!("[env: {name}=")))
        .map(|(name, from)| format!("{name} (from {from})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "environment variables `kube-ebpf-proxy run --help` does not list: {}",
        unknown.join(", ")
    );

    // NODE_NAME from the downward API's spec.nodeName.
    let node = agent
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME must be set in the DaemonSet's env (downward API)");
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"), "NODE_NAME's fieldRef");
}
