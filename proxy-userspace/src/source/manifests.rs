//! The static source: Services, EndpointSlices and Nodes read from a
//! directory of manifests, as `kubectl apply -f DIR` would read them. (A lab
//! gives its node topology labels with a Node manifest.)
//!
//! Only syntax and shape are checked here. A value that parses but is
//! invalid (a bad IP, port 0) is passed on, so that [`crate::model::compute`]
//! reports it the same way whichever source the object came from.
//!
//! A file that does not parse contributes nothing at all rather than the
//! documents before the error: half a file is more surprising than none.
//!
//! Parsing is the expensive part of a re-read (about 40 µs per object with
//! serde_yaml: 2.4 s for 30,000 Services and their slices), and an edit
//! usually touches one document of a big file. So a [`DocCache`] keeps what
//! each document produced, keyed by its file and text: a re-read parses
//! only the documents whose text changed.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml::Value;
use thiserror::Error;

use super::inotify::{DirNotify, Woken};
use super::{Changes, Delta, Objects, Source};
use crate::model::{DEFAULT_NAMESPACE, Origin, SliceFacts};
use crate::yaml_limits;

/// Something in a file that was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceWarning {
    pub file: PathBuf,
    /// `Kind namespace/name` when the problem is one object's.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for SourceWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(object) => write!(f, "{}: {}: {}", self.file.display(), object, self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// Why a file or document was skipped; rendered into
/// [`SourceWarning::reason`].
#[derive(Debug, Error)]
enum Problem {
    #[error("cannot list directory: {0}")]
    ListDir(std::io::Error),
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    #[error("invalid YAML: {0}")]
    Yaml(serde_yaml::Error),
    #[error("{0}")]
    Limit(yaml_limits::LimitError),
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    #[error("document is not a mapping")]
    NotAMapping,
    #[error("document has no kind")]
    NoKind,
    #[error("apiVersion {api_version:?} is not supported for {kind} (expected {expected})")]
    ApiVersion {
        api_version: String,
        kind: String,
        expected: &'static str,
    },
    #[error("items is not a list")]
    BadItems,
    #[error("lists nested in lists are not supported")]
    NestedList,
    #[error("{0}")]
    Decode(serde_yaml::Error),
}

const SERVICE_API_VERSION: &str = "v1";
const NODE_API_VERSION: &str = "v1";
const SLICE_API_VERSION: &str = "discovery.k8s.io/v1";

/// Loads every Service, EndpointSlice and Node from the `*.yaml`, `*.yml` and
/// `*.json` files directly in `dir`, in file name order. Problems are
/// returned as warnings; whatever could be read is returned regardless.
pub fn load_dir(dir: &Path) -> (Objects, Vec<SourceWarning>) {
    let reload = reload(dir, &mut DocCache::default(), Decode::Objects);
    let mut objects = Objects::default();
    for delta in reload.deltas {
        match delta {
            Delta::Service(_, service) => objects.services.push(*service),
            Delta::Slice(_, slice) => objects.slices.push(*slice),
            Delta::Node(_, node) => objects.nodes.push(*node),
            // A fresh cache has nothing to take back.
            _ => {}
        }
    }
    (objects, reload.warnings)
}

/// What changed in a directory since the load that filled the cache.
#[derive(Debug, Default)]
pub struct Reload {
    /// Objects of documents not seen before (each document's text is its
    /// own origin), and removals of the objects of documents gone.
    pub deltas: Vec<Delta>,
    /// Every current warning, in file and document order.
    pub warnings: Vec<SourceWarning>,
}

/// What a reload hands over for each object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// The objects as decoded.
    Objects,
    /// What the model reads: Services trimmed, EndpointSlices reduced to
    /// their facts as each document is decoded, so a large file never has
    /// all its objects in memory at once.
    Facts,
}

/// Reads `dir` again, parsing only documents `cache` has not seen (in that
/// file, with that text), and returns the difference; the cache then holds
/// this load's documents. It keeps the names each document defined, never
/// the objects (the tracker holds those once).
pub fn reload(dir: &Path, cache: &mut DocCache, decode: Decode) -> Reload {
    let mut out = Reload::default();
    let mut next = DocCache::default();
    match manifest_files(dir) {
        Ok(files) => {
            for file in files {
                load_file(&file, cache, &mut next, &mut out, decode);
            }
        }
        Err(e) => out.warnings.push(warning(dir, None, Problem::ListDir(e))),
    }
    for (origin, doc) in cache.documents.drain() {
        out.deltas
            .extend(doc.names.into_iter().map(|name| name.gone(origin)));
    }
    *cache = next;
    out
}

/// What each document of the last load defined, by a 64-bit hash of its
/// file's path and its text (two different documents colliding is a
/// 2^-64 chance per pair; the files are the operator's own).
#[derive(Default)]
pub struct DocCache {
    documents: HashMap<u64, Doc>,
    /// Documents parsed (not found in the cache) by the load that made this.
    parsed: usize,
}

impl DocCache {
    /// How many documents the load that filled this cache had to parse.
    pub fn parsed(&self) -> usize {
        self.parsed
    }
}

/// One document's objects (by name) and warnings.
#[derive(Default)]
struct Doc {
    names: Vec<Named>,
    warnings: Vec<SourceWarning>,
}

/// An object a document defined.
enum Named {
    Service(String, String),
    Slice(String, String),
    Node(String),
}

impl Named {
    fn gone(self, origin: Origin) -> Delta {
        match self {
            Named::Service(namespace, name) => Delta::ServiceGone {
                origin,
                namespace,
                name,
            },
            Named::Slice(namespace, name) => Delta::SliceGone {
                origin,
                namespace,
                name,
            },
            Named::Node(name) => Delta::NodeGone { origin, name },
        }
    }
}

/// A directory of YAML files: re-read when inotify reports a change, only
/// the documents whose text changed parsed again.
pub struct ManifestSource {
    dir: PathBuf,
    /// `None` while the directory does not exist (it is then looked for
    /// every `missing_poll`).
    notify: Option<DirNotify>,
    /// The initial read is due.
    initial: bool,
    missing_poll: Duration,
    cache: DocCache,
}

impl ManifestSource {
    /// Watches `dir` (from now on, so nothing between this and the first
    /// read is missed); a missing directory is looked for every
    /// `missing_poll`.
    pub fn new(dir: PathBuf, missing_poll: Duration) -> Self {
        Self {
            notify: DirNotify::new(&dir).ok(),
            initial: true,
            missing_poll,
            cache: DocCache::default(),
            dir,
        }
    }
}

impl Source for ManifestSource {
    async fn changed(&mut self) {
        if std::mem::take(&mut self.initial) {
            return;
        }
        loop {
            let Some(notify) = &self.notify else {
                tokio::time::sleep(self.missing_poll).await;
                self.notify = DirNotify::new(&self.dir).ok();
                if self.notify.is_some() {
                    tracing::info!(dir = %self.dir.display(), "manifest directory is back");
                    return;
                }
                continue;
            };
            match notify.wait().await {
                Ok(Woken::Changed) => return,
                Ok(Woken::DirectoryGone) => {
                    self.notify = None;
                    return;
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "inotify failed; watching afresh");
                    self.notify = None;
                    return;
                }
            }
        }
    }

    fn take_changes(&mut self) -> Changes {
        let reload = reload(&self.dir, &mut self.cache, Decode::Facts);
        tracing::debug!(parsed = self.cache.parsed(), "manifests read");
        Changes {
            deltas: reload.deltas,
            warnings: Some(reload.warnings.iter().map(ToString::to_string).collect()),
            since: None,
        }
    }
}

/// The documents of a YAML file, each with its own text, split at the
/// `---` lines that start one; `None` where the text uses what a plain
/// split could get wrong (directives, `...` end markers), so the file is
/// parsed whole. Anchors and merge keys never cross documents, so a
/// document parses the same alone.
fn split_documents(text: &str) -> Option<Vec<&str>> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare.starts_with('%') || bare == "..." || bare.starts_with("... ") {
            return None;
        }
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker && offset > start {
            documents.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    if offset > start {
        documents.push(&text[start..offset]);
    }
    Some(documents)
}

/// Manifest files in `dir`, sorted. Hidden files are skipped: editors'
/// temporaries and the `..data` links of a mounted ConfigMap start with a
/// dot. Symlinks are followed, since a mounted ConfigMap's files are links.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_manifest = Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| {
                ["yaml", "yml", "json"]
                    .iter()
                    .any(|m| e.eq_ignore_ascii_case(m))
            });
        if name.starts_with('.') || !is_manifest || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn is_json(file: &Path) -> bool {
    file.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn warning(file: &Path, object: Option<String>, problem: Problem) -> SourceWarning {
    SourceWarning {
        file: file.to_path_buf(),
        object,
        // Parser messages may span lines; a warning is one log line.
        reason: problem.to_string().replace('\n', " "),
    }
}

/// Reads one file into `out`: the objects of its documents `cache` does not
/// hold, and every current warning.
fn load_file(
    file: &Path,
    cache: &mut DocCache,
    next: &mut DocCache,
    out: &mut Reload,
    decode: Decode,
) {
    let text = match yaml_limits::read_to_string(file) {
        Ok(text) => text,
        Err(e) => return out.warnings.push(warning(file, None, Problem::Read(e))),
    };
    let json = is_json(file);
    let chunks = if json { None } else { split_documents(&text) };
    let chunks = chunks.unwrap_or_else(|| vec![text.as_str()]);
    let mut loaded: Vec<(u64, Loader)> = Vec::with_capacity(chunks.len());
    let mut in_file = DefaultHasher::new();
    file.hash(&mut in_file);
    // A document repeated in one file is another copy: its n-th repetition
    // gets an origin of its own.
    let mut repeats: HashMap<u64, u64> = HashMap::new();
    for chunk in chunks {
        let mut hasher = in_file.clone();
        chunk.hash(&mut hasher);
        let mut key = hasher.finish();
        let n = repeats.entry(key).or_default();
        *n += 1;
        if *n > 1 {
            (key, *n).hash(&mut hasher);
            key = hasher.finish();
        }
        if let Some(doc) = cache.documents.remove(&key) {
            loaded.push((key, Loader::unchanged(key, doc, decode)));
            continue;
        }
        next.parsed += 1;
        let mut part = Loader::unchanged(key, Doc::default(), decode);
        match parse_documents(chunk, json) {
            Ok(documents) => {
                for document in documents {
                    part.load_document(file, document, false);
                }
            }
            // The whole file is skipped (module doc): what it defined
            // before goes, and comes back whole once it parses.
            Err(problem) => {
                for (key, part) in loaded {
                    cache.documents.insert(key, part.doc);
                }
                return out.warnings.push(warning(file, None, problem));
            }
        }
        loaded.push((key, part));
    }
    for (key, part) in loaded {
        out.warnings.extend(part.doc.warnings.iter().cloned());
        out.deltas.extend(part.deltas);
        next.documents.insert(key, part.doc);
    }
}

/// What parsing one document's text produced.
struct Loader {
    origin: Origin,
    decode: Decode,
    doc: Doc,
    /// The objects decoded (none for a document found in the cache).
    deltas: Vec<Delta>,
}

impl Loader {
    fn unchanged(origin: Origin, doc: Doc, decode: Decode) -> Self {
        Self {
            origin,
            decode,
            doc,
            deltas: Vec::new(),
        }
    }

    fn warn(&mut self, file: &Path, object: Option<String>, problem: Problem) {
        self.doc.warnings.push(warning(file, object, problem));
    }

    /// `service` as this load hands it over.
    fn kept(&self, mut service: Service) -> Service {
        if self.decode == Decode::Facts {
            super::trim::service(&mut service);
        }
        service
    }

    /// `in_list` bounds recursion: a List's items are objects, not Lists.
    fn load_document(&mut self, file: &Path, document: Value, in_list: bool) {
        if document.is_null() {
            return; // an empty document, e.g. after a trailing `---`
        }
        if !document.is_mapping() {
            return self.warn(file, None, Problem::NotAMapping);
        }
        let kind = text_field(&document, "kind");
        let api_version = text_field(&document, "apiVersion");
        let object = Some(describe(&document, kind.as_deref()));
        let Some(kind) = kind else {
            return self.warn(file, object, Problem::NoKind);
        };
        match kind.as_str() {
            "Service" => {
                if let Some(service) = self.decode::<Service>(
                    file,
                    object,
                    document,
                    &api_version,
                    SERVICE_API_VERSION,
                ) {
                    let service = with_default_namespace(service);
                    let (namespace, name) = names_of(&service.metadata);
                    self.doc.names.push(Named::Service(namespace, name));
                    self.deltas
                        .push(Delta::Service(self.origin, Box::new(self.kept(service))));
                }
            }
            "EndpointSlice" => {
                if let Some(slice) = self.decode::<EndpointSlice>(
                    file,
                    object,
                    document,
                    &api_version,
                    SLICE_API_VERSION,
                ) {
                    let slice = with_default_namespace(slice);
                    let (namespace, name) = names_of(&slice.metadata);
                    self.doc.names.push(Named::Slice(namespace, name));
                    self.deltas.push(match self.decode {
                        Decode::Objects => Delta::Slice(self.origin, Box::new(slice)),
                        Decode::Facts => {
                            Delta::SliceFacts(self.origin, Box::new(SliceFacts::of(&slice)))
                        }
                    });
                }
            }
            "Node" => {
                if let Some(node) =
                    self.decode::<Node>(file, object, document, &api_version, NODE_API_VERSION)
                {
                    // Cluster-scoped: no namespace to default.
                    let name = node.metadata.name.clone().unwrap_or_default();
                    self.doc.names.push(Named::Node(name));
                    self.deltas.push(Delta::Node(self.origin, Box::new(node)));
                }
            }
            "List" | "ServiceList" | "EndpointSliceList" | "NodeList" if in_list => {
                self.warn(file, object, Problem::NestedList)
            }
            "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
                self.load_list(file, object, &kind, document)
            }
            other => tracing::debug!("{}: ignoring kind {other}", file.display()),
        }
    }

    fn load_list(&mut self, file: &Path, object: Option<String>, kind: &str, mut list: Value) {
        let items = match list.get_mut("items").map(std::mem::take) {
            None | Some(Value::Null) => return,
            Some(Value::Sequence(items)) => items,
            Some(_) => return self.warn(file, object, Problem::BadItems),
        };
        // Typed lists, as the API returns them, leave kind out of each item.
        let implied = match kind {
            "ServiceList" => Some((SERVICE_API_VERSION, "Service")),
            "EndpointSliceList" => Some((SLICE_API_VERSION, "EndpointSlice")),
            "NodeList" => Some((NODE_API_VERSION, "Node")),
            _ => None,
        };
        for mut item in items {
            if let (Some((api_version, kind)), Value::Mapping(map)) = (implied, &mut item) {
                map.entry("apiVersion".into())
                    .or_insert_with(|| api_version.into());
                map.entry("kind".into()).or_insert_with(|| kind.into());
            }
            self.load_document(file, item, true);
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &mut self,
        file: &Path,
        object: Option<String>,
        document: Value,
        api_version: &Option<String>,
        expected: &'static str,
    ) -> Option<T> {
        if api_version.as_deref() != Some(expected) {
            let kind = text_field(&document, "kind").unwrap_or_default();
            let problem = Problem::ApiVersion {
                api_version: api_version.clone().unwrap_or_default(),
                kind,
                expected,
            };
            self.warn(file, object, problem);
            return None;
        }
        match serde_yaml::from_value(document) {
            Ok(decoded) => Some(decoded),
            Err(e) => {
                self.warn(file, object, Problem::Decode(e));
                None
            }
        }
    }
}

/// Parses every document of a file, or fails as a whole.
fn parse_documents(text: &str, json: bool) -> Result<Vec<Value>, Problem> {
    if json {
        // YAML parsers are not fully JSON-compatible (tabs, some escapes),
        // so JSON goes through a JSON parser into the same value type.
        return serde_json::from_str::<Value>(text)
            .map(|value| vec![value])
            .map_err(Problem::Json);
    }
    let mut documents = Vec::new();
    for mut value in yaml_limits::documents(text).map_err(Problem::Limit)? {
        // kubectl honours `<<` merge keys; serde_yaml leaves them to us.
        value.apply_merge().map_err(Problem::Yaml)?;
        documents.push(value);
    }
    Ok(documents)
}

fn text_field(document: &Value, field: &str) -> Option<String> {
    document
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// `Kind namespace/name` for warnings, read leniently from the raw document
/// so it can name objects that fail to decode.
fn describe(document: &Value, kind: Option<&str>) -> String {
    let metadata = document.get("metadata");
    let field = |name: &str| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
    let namespace = field("namespace")
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    let name = field("name").unwrap_or("<unnamed>");
    match kind {
        // Cluster-scoped.
        Some("Node") => format!("Node {name}"),
        _ => format!("{} {namespace}/{name}", kind.unwrap_or("<no kind>")),
    }
}

fn names_of(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn with_default_namespace<T: Metadata<Ty = ObjectMeta>>(mut object: T) -> T {
    let meta = object.metadata_mut();
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let path = std::env::temp_dir().join(format!(
                "kep-manifests-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).expect("write manifest");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
";

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: prod
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: [10.0.0.1]
";

    fn names(objects: &Objects) -> (Vec<String>, Vec<String>) {
        let name = |m: &ObjectMeta| {
            format!(
                "{}/{}",
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default()
            )
        };
        (
            objects.services.iter().map(|s| name(&s.metadata)).collect(),
            objects.slices.iter().map(|s| name(&s.metadata)).collect(),
        )
    }

    #[test]
    fn multi_document_file() {
        let dir = TempDir::new();
        dir.write(
            "web.yaml",
            &format!("---\n{SERVICE}---\n{SLICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n---\n"),
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(warnings, []);
        assert_eq!(
            names(&objects),
            (vec!["default/web".into()], vec!["prod/web-a".into()])
        );
        let spec = objects.services[0].spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(objects.slices[0].endpoints[0].addresses, ["10.0.0.1"]);
    }

    /// `count` small Services, one document each, cluster IPs 10.96.1.i.
    fn many_services(count: usize, edited: Option<usize>) -> String {
        (0..count)
            .map(|i| {
                let port = if Some(i) == edited { 81 } else { 80 };
                format!(
                    "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\nspec:\n  clusterIP: 10.96.1.{i}\n  ports:\n  - port: {port}\n"
                )
            })
            .collect()
    }

    /// A source's view through reloads: the objects every reload so far
    /// added and did not take back, in a canonical order (the tracker does
    /// not care about order).
    #[derive(Default)]
    struct Cached {
        cache: DocCache,
        held: BTreeMap<(u8, Origin, String, String), Delta>,
    }

    impl Cached {
        fn parsed(&self) -> usize {
            self.cache.parsed()
        }
    }

    fn canonical(mut objects: Objects) -> Objects {
        let key = |m: &ObjectMeta| (m.namespace.clone(), m.name.clone());
        objects.services.sort_by_key(|o| key(&o.metadata));
        objects.slices.sort_by_key(|o| key(&o.metadata));
        objects.nodes.sort_by_key(|o| key(&o.metadata));
        objects
    }

    fn load_dir_cached(dir: &Path, cached: &mut Cached) -> (Objects, Vec<SourceWarning>) {
        let reload = reload(dir, &mut cached.cache, Decode::Objects);
        for delta in reload.deltas {
            let (kind, origin, ns, name, put) = match &delta {
                Delta::Service(o, s) => (
                    0,
                    *o,
                    s.metadata.namespace.clone(),
                    s.metadata.name.clone(),
                    true,
                ),
                Delta::ServiceGone {
                    origin,
                    namespace,
                    name,
                } => (
                    0,
                    *origin,
                    Some(namespace.clone()),
                    Some(name.clone()),
                    false,
                ),
                Delta::Slice(o, s) => (
                    1,
                    *o,
                    s.metadata.namespace.clone(),
                    s.metadata.name.clone(),
                    true,
                ),
                Delta::SliceGone {
                    origin,
                    namespace,
                    name,
                } => (
                    1,
                    *origin,
                    Some(namespace.clone()),
                    Some(name.clone()),
                    false,
                ),
                Delta::Node(o, n) => (2, *o, None, n.metadata.name.clone(), true),
                Delta::NodeGone { origin, name } => (2, *origin, None, Some(name.clone()), false),
                Delta::SliceFacts(..) => unreachable!("decoded as objects"),
            };
            let key = (
                kind,
                origin,
                ns.unwrap_or_default(),
                name.unwrap_or_default(),
            );
            if put {
                cached.held.insert(key, delta);
            } else {
                assert!(
                    cached.held.remove(&key).is_some(),
                    "took back {key:?}, never added"
                );
            }
        }
        let mut objects = Objects::default();
        for delta in cached.held.values() {
            match delta {
                Delta::Service(_, s) => objects.services.push((**s).clone()),
                Delta::Slice(_, s) => objects.slices.push((**s).clone()),
                Delta::Node(_, n) => objects.nodes.push((**n).clone()),
                _ => unreachable!("only additions are held"),
            }
        }
        (canonical(objects), reload.warnings)
    }

    #[test]
    fn cache_parses_only_changed_documents_and_loads_the_same() {
        let dir = TempDir::new();
        let mut cache = Cached::default();
        dir.write("many.yaml", &many_services(100, None));
        dir.write("other.yaml", &format!("{SERVICE}---\n{SLICE}"));
        let (first, warnings) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(warnings, []);
        assert_eq!(first.services.len(), 101);
        assert_eq!(cache.parsed(), 102);
        // One document edited: one parse, and exactly what a cold load gives.
        dir.write("many.yaml", &many_services(100, Some(42)));
        let (second, _) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(cache.parsed(), 1);
        assert_eq!(second, canonical(load_dir(&dir.0).0));
        let port = |objects: &Objects, name: &str| {
            let svc = objects
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .unwrap();
            svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
        };
        assert_eq!(port(&second, "s42"), 81);
        assert_eq!(port(&second, "s41"), 80);
        // Unchanged: nothing parsed.
        let (third, _) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!((cache.parsed(), &third), (0, &second));
    }

    #[test]
    fn cache_keeps_a_broken_file_skipped_whole_until_fixed() {
        let dir = TempDir::new();
        let mut cache = Cached::default();
        dir.write("many.yaml", &many_services(10, None));
        assert_eq!(load_dir_cached(&dir.0, &mut cache).0.services.len(), 10);
        let broken = many_services(10, None).replace("name: s5\n", "name: [s5\n");
        dir.write("many.yaml", &broken);
        let (objects, warnings) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(objects.services.len(), 0, "half a file is never used");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let (cold, cold_warnings) = load_dir(&dir.0);
        assert_eq!((objects, warnings), (canonical(cold), cold_warnings));
        dir.write("many.yaml", &many_services(10, None));
        let (objects, warnings) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!((objects.services.len(), warnings.len()), (10, 0));
    }

    #[test]
    fn split_documents_follows_markers_and_declines_directives() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: |\n  ---x\n---\n";
        assert_eq!(
            split_documents(text).unwrap(),
            ["a: 1\n", "---\nb: 2\n", "--- # c\nc: |\n  ---x\n", "---\n"]
        );
        assert_eq!(split_documents("%YAML 1.2\n---\na: 1\n"), None);
        assert_eq!(split_documents("a: 1\n...\n---\nb: 2\n"), None);
    }

    #[test]
    fn bad_yaml_file_does_not_stop_other_files() {
        let dir = TempDir::new();
        let bad = dir.write("a-bad.yaml", &format!("{SERVICE}---\nkind: [unclosed\n"));
        dir.write("b-good.yml", SLICE);
        dir.write("notes.txt", "kind: [ignored, not a manifest");
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].file, bad);
        assert_eq!(warnings[0].object, None);
        // The good document before the error is dropped with its file.
        assert_eq!(names(&objects), (vec![], vec!["prod/web-a".into()]));
    }

    #[test]
    fn undecodable_document_names_object() {
        let dir = TempDir::new();
        let file = dir.write(
            "svc.yaml",
            &format!("{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: ns\nspec:\n  ports:\n  - port: eighty\n"),
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(objects.services.len(), 1);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].object.as_deref(), Some("Service ns/broken"));
        let line = warnings[0].to_string();
        assert!(
            line.starts_with(&format!("{}: Service ns/broken: ", file.display())),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn wrong_api_version_and_missing_kind_warn() {
        let dir = TempDir::new();
        dir.write(
            "old.yaml",
            &format!(
                "{}---\nmetadata:\n  name: nokind\n",
                SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1")
            ),
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert!(objects.slices.is_empty());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].reason.contains("v1beta1"), "{}", warnings[0]);
        assert_eq!(
            warnings[1].object.as_deref(),
            Some("<no kind> default/nokind")
        );
    }

    #[test]
    fn merge_keys_are_applied() {
        let dir = TempDir::new();
        dir.write(
            "merge.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - &http {name: http, port: 80}\n  - <<: *http\n    name: alt\n",
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(warnings, []);
        let ports = objects.services[0]
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let ports: Vec<_> = ports
            .iter()
            .map(|p| (p.name.clone().unwrap_or_default(), p.port))
            .collect();
        assert_eq!(ports, [("http".to_string(), 80), ("alt".to_string(), 80)]);
    }

    #[test]
    fn invalid_values_pass_through() {
        let dir = TempDir::new();
        dir.write(
            "svc.yaml",
            &SERVICE
                .replace("10.96.0.10", "10.96.0.300")
                .replace("port: 80", "port: 0"),
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(warnings, []);
        assert_eq!(objects.services.len(), 1);
    }

    #[test]
    fn list_kinds() {
        let dir = TempDir::new();
        dir.write(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {clusterIP: 10.96.0.1}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c}\n",
        );
        dir.write(
            "slices.json",
            r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
	"items": [{"metadata": {"name": "a-1", "labels": {"kubernetes.io/service-name": "a"}},
	           "addressType": "IPv4", "endpoints": []}]}"#,
        );
        dir.write(
            "nested.yaml",
            "kind: List\nitems:\n- kind: List\n  items: []\n",
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(
            names(&objects),
            (vec!["default/a".into()], vec!["default/a-1".into()])
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].file.ends_with("nested.yaml"));
    }

    #[test]
    fn facts_give_the_model_what_objects_give() {
        let dir = TempDir::new();
        dir.write("many.yaml", &many_services(20, None));
        dir.write(
            "web.yaml",
            &format!(
                "{SERVICE}---\n{}",
                SLICE.replace("namespace: prod", "namespace: default")
            ),
        );
        let node = crate::model::NodeInfo::default();
        let mut tracker = crate::model::Tracker::new(node.clone());
        let facts = reload(&dir.0, &mut DocCache::default(), Decode::Facts);
        assert!(
            facts
                .deltas
                .iter()
                .any(|d| matches!(d, Delta::SliceFacts(..))),
            "slices arrive as facts"
        );
        for delta in facts.deltas {
            delta.apply_to(&mut tracker);
        }
        tracker.settle();
        let (objects, _) = load_dir(&dir.0);
        let (expected, _) = crate::model::compute(&objects.services, &objects.slices, &node);
        let got: std::collections::BTreeMap<_, _> =
            tracker.frontends().map(|(f, s)| (*f, s.clone())).collect();
        assert_eq!(got, expected.frontends);
        assert_eq!(got.len(), 21);
    }

    #[test]
    fn objects_come_out_through_model() {
        let dir = TempDir::new();
        dir.write(
            "all.yaml",
            &format!(
                "{SERVICE}---\n{}",
                SLICE.replace("namespace: prod", "namespace: default")
            ),
        );
        let (objects, _) = load_dir(&dir.0);
        let node = crate::model::NodeInfo::default();
        let (state, warnings) = crate::model::compute(&objects.services, &objects.slices, &node);
        assert_eq!(warnings, []);
        let endpoints: Vec<_> = state
            .frontends
            .values()
            .flat_map(|s| s.endpoints.clone())
            .collect();
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].port, 8080);
    }

    const NODE: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    topology.kubernetes.io/zone: zone-a
";

    fn node_names(objects: &Objects) -> Vec<String> {
        objects
            .nodes
            .iter()
            .map(|n| n.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn nodes_are_loaded_with_their_labels() {
        let dir = TempDir::new();
        dir.write("node.yaml", &format!("{SERVICE}---\n{NODE}"));
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(warnings, []);
        assert_eq!(node_names(&objects), ["node-a"]);
        // Cluster-scoped: no namespace is made up for it.
        assert_eq!(objects.nodes[0].metadata.namespace, None);
        let node = crate::model::NodeInfo::from_objects("node-a", &objects.nodes);
        assert_eq!(
            node.labels
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("zone-a")
        );
    }

    #[test]
    fn nodes_in_lists() {
        let dir = TempDir::new();
        dir.write(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: node-a}\n",
        );
        dir.write(
            "nodes.json",
            r#"{"apiVersion": "v1", "kind": "NodeList",
                "items": [{"metadata": {"name": "node-b", "labels": {"x": "y"}}}]}"#,
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert_eq!(warnings, []);
        assert_eq!(node_names(&objects), ["node-a", "node-b"]);
    }

    #[test]
    fn node_with_wrong_api_version_warns() {
        let dir = TempDir::new();
        dir.write(
            "node.yaml",
            &NODE.replace("apiVersion: v1", "apiVersion: v2"),
        );
        let (objects, warnings) = load_dir(&dir.0);
        assert!(objects.nodes.is_empty());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].object.as_deref(), Some("Node node-a"));
    }

    #[test]
    fn missing_dir_is_one_warning() {
        let dir = TempDir::new();
        let gone = dir.0.join("absent");
        let (objects, warnings) = load_dir(&gone);
        assert_eq!(objects, Objects::default());
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].file, gone);
    }
}
