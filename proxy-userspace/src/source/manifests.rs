//! The static source: Services, EndpointSlices and Nodes read from a
//! directory of manifests, as `kubectl apply -f DIR` would read them. (A lab
//! gives its node topology labels with a Node manifest.)
//!
//! Only syntax and shape are checked here. A value that parses but is
//! invalid (a bad IP, port 0) is passed on, so that [`crate::model`]
//! reports it the same way whichever source the object came from.
//!
//! A file that does not parse contributes nothing at all rather than the
//! documents before the error: half a file is more surprising than none. A
//! directory or file that cannot be read (missing, no permission, an I/O
//! error) is another matter: that says nothing about what it defines, so
//! what was last read of it stays, and the source reports itself
//! unavailable until it can be read again (the agent is then not ready).
//!
//! Parsing is the expensive part of a re-read (tens of µs per object), and
//! an edit usually touches one document of a big file. So a [`DocCache`]
//! keeps, per file, what each document defined, keyed by a hash of its
//! text: a re-read splits the file at its `---` lines (memchr), hashes
//! each document (foldhash, no copy, no UTF-8 validation of what is
//! unchanged) and parses only the documents whose text changed. A file
//! whose [`Stamp`] (inode, size, times) is as at its last read is not read
//! at all.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml::Value;
use thiserror::Error;

use super::inotify::{DirNotify, Woken};
use super::stamp::Stamp;
use super::{Changes, Delta, Objects, Source};
use crate::model::api::{EndpointSlice, Service};
use crate::model::{DEFAULT_NAMESPACE, Origin, ServiceFacts, SliceFacts};
use crate::yaml_limits::{self, ReadError};

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
    ListDir(io::Error),
    #[error("{0}")]
    Read(yaml_limits::ReadError),
    #[error("symbolic link to {target:?}, which cannot be read: {source}; skipped")]
    Link { target: PathBuf, source: io::Error },
    #[error("not UTF-8: {0}")]
    Utf8(std::str::Utf8Error),
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
    (reload.objects, reload.warnings)
}

/// What changed in a directory since the load that filled the cache.
#[derive(Debug, Default)]
pub struct Reload {
    /// Objects of documents not seen before (each document's text is its
    /// own origin), and removals of the objects of documents gone
    /// ([`Decode::Facts`]).
    pub deltas: Vec<Delta>,
    /// The objects of documents not seen before ([`Decode::Objects`]).
    pub objects: Objects,
    /// Every current warning, in file and document order.
    pub warnings: Vec<SourceWarning>,
    /// Why part of the directory could not be read; what was last read of
    /// it is kept meanwhile.
    pub unavailable: Option<String>,
}

/// What a reload hands over for each object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// The objects as decoded, in [`Reload::objects`] (for tests).
    Objects,
    /// Deltas of what the model keeps: Services and EndpointSlices read
    /// into their facts as each document is decoded, so a large file never
    /// has all its objects in memory at once.
    Facts,
}

/// Reads `dir` again, parsing only documents `cache` has not seen (in that
/// file, with that text), and returns the difference; the cache then holds
/// this load's documents. It keeps the names each document defined, never
/// the objects (the tracker holds those once). A directory that cannot be
/// listed changes nothing.
pub fn reload(dir: &Path, cache: &mut DocCache, decode: Decode) -> Reload {
    let mut out = Reload::default();
    cache.parsed = 0;
    let files = match manifest_files(dir, &mut out.warnings) {
        Ok(files) => files,
        Err(e) => {
            let warning = warning(dir, None, Problem::ListDir(e));
            out.unavailable = Some(warning.to_string());
            out.warnings.push(warning);
            return out;
        }
    };
    cache.read = 0;
    let mut previous = std::mem::take(&mut cache.files);
    for file in files {
        let old = previous.remove(&file).unwrap_or_default();
        let docs = load_file(&file, old, cache, &mut out, decode);
        if !docs.is_empty() {
            cache.files.insert(file, docs);
        }
    }
    for doc in previous.into_values().flatten() {
        out.deltas.extend(doc.gone());
    }
    let DocCache { files, stamps, .. } = cache;
    stamps.retain(|file, _| files.contains_key(file));
    out
}

/// What each document of the last load defined, per file in document
/// order, by a 64-bit hash of its file's path and its text (foldhash with
/// a per-process random seed: two different documents colliding is a
/// 2^-64 chance per pair, and the files are the operator's own).
#[derive(Default)]
pub struct DocCache {
    files: HashMap<PathBuf, Vec<Doc>>,
    /// Each file's stamp as it was before its last complete read, where
    /// it can be trusted to change with the file ([`Stamp::settled`]).
    stamps: HashMap<PathBuf, Stamp>,
    hasher: foldhash::quality::RandomState,
    /// Documents parsed (not found in the cache) by the last load.
    parsed: usize,
    /// Files read by the last load.
    read: usize,
}

impl DocCache {
    /// How many documents the last load had to parse.
    pub fn parsed(&self) -> usize {
        self.parsed
    }

    /// How many files the last load had to read.
    pub fn read(&self) -> usize {
        self.read
    }
}

/// One document's objects (by name) and warnings.
struct Doc {
    /// Its origin: the hash of its file's path and its text.
    key: Origin,
    /// The length of its text.
    len: usize,
    names: Box<[Named]>,
    warnings: Box<[SourceWarning]>,
}

impl Doc {
    fn gone(self) -> impl Iterator<Item = Delta> {
        let origin = self.key;
        self.names.into_iter().map(move |name| name.gone(origin))
    }
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
    /// The first complete read is still due: nothing is reported before
    /// the directory can be read, so an agent started while it is missing
    /// never writes an empty state over what the maps hold.
    initial: bool,
    missing_poll: Duration,
    cache: DocCache,
    /// When the change being reported was noticed.
    woken: Option<Instant>,
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
            woken: None,
            dir,
        }
    }

    /// Waits until the directory exists and can be listed, saying once
    /// why it cannot.
    async fn until_readable(&mut self) {
        let mut said = false;
        loop {
            match fs::read_dir(&self.dir) {
                Ok(_) => return,
                Err(e) if !said => {
                    tracing::warn!(dir = %self.dir.display(), error = %e,
                        "manifest directory cannot be read; nothing is programmed until it can");
                    said = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(self.missing_poll).await;
            if self.notify.is_none() {
                self.notify = DirNotify::new(&self.dir).ok();
            }
        }
    }
}

impl Source for ManifestSource {
    async fn changed(&mut self) {
        if self.initial {
            self.until_readable().await;
            self.initial = false;
            self.woken = Some(Instant::now());
            return;
        }
        loop {
            let Some(notify) = &self.notify else {
                tokio::time::sleep(self.missing_poll).await;
                self.notify = DirNotify::new(&self.dir).ok();
                if self.notify.is_some() {
                    tracing::info!(dir = %self.dir.display(), "manifest directory is back");
                    break;
                }
                continue;
            };
            match notify.wait().await {
                Ok(Woken::Changed) => break,
                Ok(Woken::DirectoryGone) => {
                    self.notify = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "inotify failed; watching afresh");
                    self.notify = None;
                    break;
                }
            }
        }
        self.woken = Some(Instant::now());
    }

    fn take_changes(&mut self) -> Changes {
        let t = Instant::now();
        let reload = reload(&self.dir, &mut self.cache, Decode::Facts);
        tracing::debug!(
            files_read = self.cache.read(),
            parsed = self.cache.parsed(),
            took_us = t.elapsed().as_micros(),
            "manifests read"
        );
        Changes {
            deltas: reload.deltas,
            warnings: Some(reload.warnings.iter().map(ToString::to_string).collect()),
            since: self.woken.take(),
            unavailable: reload.unavailable,
        }
    }
}

/// Where the documents of a YAML file start and end, split at the `---`
/// lines that start one, on the bytes (so a large file is split without
/// being validated or copied), and each one's hash. Anchors and merge keys
/// never cross documents, so a document parses the same alone. A split is
/// only right where the text has neither directives nor `...` end markers,
/// which [`Plain`] checks of each part.
///
/// The split follows the previous load's documents (`old`): where a part
/// as long as the next old document hashes as it did, the text is that
/// document's, which held no marker but at its start, so its end needs no
/// search; elsewhere (the edited document) the next `---` line is searched
/// for (memchr). An edit of one document of a large file thus costs one
/// hash of the file, not a search through it as well.
fn split_documents(
    text: &[u8],
    old: &[Doc],
    hash: impl Fn(&[u8]) -> u64,
) -> (Vec<Range<usize>>, Vec<u64>) {
    let marker = |at: usize| {
        text[at..].starts_with(b"---")
            && matches!(text.get(at + 3), None | Some(b'\n' | b'\r' | b' ' | b'\t'))
            && (at == 0 || text[at - 1] == b'\n')
    };
    let finder = memchr::memmem::Finder::new(b"\n---");
    // The end of the document starting at `start`: the next marker line.
    let end_of = |start: usize| {
        let mut from = start;
        while let Some(at) = finder.find(&text[from..]) {
            let line = from + at + 1;
            if marker(line) {
                return line;
            }
            from = line;
        }
        text.len()
    };
    let mut parts = Vec::with_capacity(old.len());
    let mut hashes = Vec::with_capacity(old.len());
    let mut start = 0;
    // Guesses from the old documents stop after a few misses in a row
    // (documents inserted or moved): searching is then cheaper.
    let mut misses = 0;
    let mut next_old = old.iter();
    while start < text.len() {
        let guess = next_old.next().filter(|_| misses < 8).and_then(|doc| {
            let end = start + doc.len;
            let fits = end <= text.len() && (end == text.len() || marker(end));
            let hashed = fits.then(|| hash(&text[start..end]))?;
            (hashed == doc.key).then_some((end, hashed))
        });
        let (end, hashed) = guess.unwrap_or_else(|| {
            misses += 1;
            let end = end_of(start);
            (end, hash(&text[start..end]))
        });
        if guess.is_some() {
            misses = 0;
        }
        parts.push(start..end);
        hashes.push(hashed);
        start = end;
    }
    (parts, hashes)
}

/// Tells whether a part of a split (which starts at a line start) has
/// neither a directive line (`%...`) nor a `...` end marker, what a plain
/// split at `---` lines could get wrong: where one has, the file is parsed
/// whole.
struct Plain {
    directive: memchr::memmem::Finder<'static>,
    end: memchr::memmem::Finder<'static>,
}

impl Plain {
    fn new() -> Self {
        Self {
            directive: memchr::memmem::Finder::new(b"\n%"),
            end: memchr::memmem::Finder::new(b"\n..."),
        }
    }

    fn check(&self, part: &[u8]) -> bool {
        let ends_marker = |at: usize| matches!(part.get(at + 3), None | Some(b'\n' | b'\r' | b' '));
        let ends = part.starts_with(b"...").then_some(0).into_iter();
        let mut ends = ends.chain(self.end.find_iter(part).map(|at| at + 1));
        !part.starts_with(b"%") && self.directive.find(part).is_none() && !ends.any(ends_marker)
    }
}

/// Manifest files in `dir`, sorted. Hidden files are skipped: editors'
/// temporaries and the `..data` links of a mounted ConfigMap start with a
/// dot. Symlinks are followed, since a mounted ConfigMap's files are links;
/// one that leads nowhere (dangling, a loop) is a warning.
fn manifest_files(dir: &Path, warnings: &mut Vec<SourceWarning>) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let first_warning = warnings.len();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
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
        if name.starts_with('.') || !is_manifest {
            continue;
        }
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(path),
            Ok(_) => {}
            Err(source) if entry.file_type().is_ok_and(|t| t.is_symlink()) => {
                let target = fs::read_link(&path).unwrap_or_default();
                warnings.push(warning(&path, None, Problem::Link { target, source }));
            }
            // Gone since it was listed: the next event says so.
            Err(_) => {}
        }
    }
    files.sort();
    // In file name order, as the files' own warnings, not the directory's.
    warnings[first_warning..].sort_by(|a, b| a.file.cmp(&b.file));
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

/// Reads one file into `out` given what `old` (its documents at the last
/// load) defined: the objects of its documents not seen before, removals of
/// those gone, and every current warning. Returns its documents now.
fn load_file(
    file: &Path,
    old: Vec<Doc>,
    cache: &mut DocCache,
    out: &mut Reload,
    decode: Decode,
) -> Vec<Doc> {
    let stat_at = std::time::SystemTime::now();
    let stamp = Stamp::of(file);
    if !old.is_empty() && stamp.is_some() && cache.stamps.get(file) == stamp.as_ref() {
        out.warnings
            .extend(old.iter().flat_map(|d| d.warnings.iter().cloned()));
        return old;
    }
    cache.stamps.remove(file);
    cache.read += 1;
    let bytes = match yaml_limits::read(file) {
        Ok(bytes) => bytes,
        // Removed since it was listed: as if it had not been listed.
        Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
            out.deltas.extend(old.into_iter().flat_map(Doc::gone));
            return Vec::new();
        }
        // Unreadable says nothing about its contents: keep what it had.
        Err(e @ ReadError::Io(_)) => {
            let warning = warning(file, None, Problem::Read(e));
            out.unavailable.get_or_insert_with(|| warning.to_string());
            out.warnings.push(warning);
            out.warnings
                .extend(old.iter().flat_map(|d| d.warnings.iter().cloned()));
            return old;
        }
        // Too large: what it holds is refused, as a file that does not
        // parse.
        Err(e @ ReadError::Limit(_)) => {
            out.warnings.push(warning(file, None, Problem::Read(e)));
            out.deltas.extend(old.into_iter().flat_map(Doc::gone));
            return Vec::new();
        }
    };
    let json = is_json(file);
    let mut in_file = cache.hasher.build_hasher();
    in_file.write(file.as_os_str().as_bytes());
    let key_of = |chunk: &[u8], repeat: u64| {
        let mut hasher = in_file.clone();
        hasher.write(chunk);
        hasher.write_u64(repeat);
        hasher.finish()
    };
    // The whole file as one part.
    let whole = || {
        (
            std::iter::once(0..bytes.len()).collect(),
            vec![key_of(&bytes, 0)],
        )
    };
    let (mut chunks, mut keys) = if json {
        whole()
    } else {
        split_documents(&bytes, &old, |chunk| key_of(chunk, 0))
    };
    // A part seen before was checked then: only the others (nearly always
    // the edited one) need to be.
    let plain = Plain::new();
    let unseen = |i: usize| old.get(i).is_none_or(|d| d.key != keys[i]);
    if chunks.len() > 1
        && (0..chunks.len()).any(|i| unseen(i) && !plain.check(&bytes[chunks[i].clone()]))
    {
        (chunks, keys) = whole();
    }
    // A document repeated in one file is another copy: its n-th
    // repetition gets an origin of its own. (Keys are hashes already: no
    // need to hash them again.)
    let mut seen: HashSet<u64, std::hash::BuildHasherDefault<Identity>> =
        HashSet::with_capacity_and_hasher(keys.len(), Default::default());
    for (key, range) in keys.iter_mut().zip(&chunks) {
        let mut repeat = 0;
        while !seen.insert(*key) {
            repeat += 1;
            *key = key_of(&bytes[range.clone()], repeat);
        }
    }
    // An edit keeps the other documents where they were, so the old
    // document at the same position is nearly always the one; the rest
    // (moved, or new) are looked for among the few old ones left.
    let mut old: Vec<Option<Doc>> = old.into_iter().map(Some).collect();
    let mut docs: Vec<Option<Doc>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| match old.get_mut(i) {
            Some(slot) if slot.as_ref().is_some_and(|d| d.key == *key) => slot.take(),
            _ => None,
        })
        .collect();
    let mut left: HashMap<u64, Doc> = old.into_iter().flatten().map(|d| (d.key, d)).collect();
    let mut todo = Vec::new();
    for (i, slot) in docs.iter_mut().enumerate() {
        if slot.is_none() {
            *slot = left.remove(&keys[i]);
            if slot.is_none() {
                todo.push((keys[i], &bytes[chunks[i].clone()]));
            }
        }
    }
    cache.parsed += todo.len();
    let mut parsed = parse_all(file, json, decode, todo).into_iter();
    let mut deltas = Vec::new();
    let mut objects = Objects::default();
    // The documents found unchanged (their objects are out already).
    let reused: Vec<bool> = docs.iter().map(Option::is_some).collect();
    for ((slot, unchanged), range) in docs.iter_mut().zip(&reused).zip(&chunks) {
        if *unchanged {
            continue;
        }
        match parsed.next().expect("one result per document parsed") {
            Ok(mut part) => {
                deltas.append(&mut part.deltas);
                objects.append(&mut part.objects);
                *slot = Some(part.doc(range.len()));
            }
            // The whole file is skipped (module doc): what it defined
            // before goes, and comes back whole once it parses.
            Err(problem) => {
                out.warnings.push(warning(file, None, problem));
                let before = docs.into_iter().zip(reused).filter(|(_, r)| *r);
                let gone = before.filter_map(|(d, _)| d).chain(left.into_values());
                out.deltas.extend(gone.flat_map(Doc::gone));
                return Vec::new();
            }
        }
    }
    out.deltas.extend(left.into_values().flat_map(Doc::gone));
    out.deltas.append(&mut deltas);
    out.objects.append(&mut objects);
    let docs: Vec<Doc> = docs.into_iter().flatten().collect();
    out.warnings
        .extend(docs.iter().flat_map(|d| d.warnings.iter().cloned()));
    // Taken before the read: a write during it changes the stamp, so the
    // next load reads the file again.
    if let Some(stamp) = stamp.filter(|s| s.settled(stat_at)) {
        cache.stamps.insert(file.to_path_buf(), stamp);
    }
    docs
}

/// Below this many documents to parse, one thread does it.
const PARALLEL_PARSE: usize = 256;

/// Parses `documents` (origin, text), in order; on as many threads as
/// there are cores when there are many (the initial load of a large
/// directory), since documents parse independently.
fn parse_all(
    file: &Path,
    json: bool,
    decode: Decode,
    documents: Vec<(Origin, &[u8])>,
) -> Vec<Result<Loader, Problem>> {
    let parse = |(origin, chunk): (Origin, &[u8])| {
        let text = std::str::from_utf8(chunk).map_err(Problem::Utf8)?;
        let mut part = Loader::new(origin, decode);
        for value in parse_documents(text, json)? {
            part.load_document(file, value, false);
        }
        Ok(part)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if documents.len() < PARALLEL_PARSE || threads < 2 {
        return documents.into_iter().map(parse).collect();
    }
    let per_thread = documents.len().div_ceil(threads);
    let parse = &parse;
    std::thread::scope(|scope| {
        let parts: Vec<_> = documents
            .chunks(per_thread)
            .map(|part| scope.spawn(move || part.iter().copied().map(parse).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| part.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// A hasher for keys that are hashes already.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Objects {
    fn append(&mut self, other: &mut Objects) {
        self.services.append(&mut other.services);
        self.slices.append(&mut other.slices);
        self.nodes.append(&mut other.nodes);
    }
}

/// What parsing one document's text produced.
struct Loader {
    origin: Origin,
    decode: Decode,
    names: Vec<Named>,
    warnings: Vec<SourceWarning>,
    /// The objects decoded, as deltas ([`Decode::Facts`]) or as themselves.
    deltas: Vec<Delta>,
    objects: Objects,
}

impl Loader {
    fn new(origin: Origin, decode: Decode) -> Self {
        Self {
            origin,
            decode,
            names: Vec::new(),
            warnings: Vec::new(),
            deltas: Vec::new(),
            objects: Objects::default(),
        }
    }

    fn doc(self, len: usize) -> Doc {
        Doc {
            key: self.origin,
            len,
            names: self.names.into(),
            warnings: self.warnings.into(),
        }
    }

    fn warn(&mut self, file: &Path, object: Option<String>, problem: Problem) {
        self.warnings.push(warning(file, object, problem));
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
                if let Some(mut service) = self.decode::<Service>(
                    file,
                    object,
                    document,
                    &api_version,
                    SERVICE_API_VERSION,
                ) {
                    let (namespace, name) = default_namespace(&mut service.metadata);
                    self.names.push(Named::Service(namespace, name));
                    match self.decode {
                        Decode::Objects => self.objects.services.push(service),
                        Decode::Facts => self.deltas.push(Delta::Service(
                            self.origin,
                            Box::new(ServiceFacts::of(&service)),
                        )),
                    }
                }
            }
            "EndpointSlice" => {
                if let Some(mut slice) = self.decode::<EndpointSlice>(
                    file,
                    object,
                    document,
                    &api_version,
                    SLICE_API_VERSION,
                ) {
                    let (namespace, name) = default_namespace(&mut slice.metadata);
                    self.names.push(Named::Slice(namespace, name));
                    match self.decode {
                        Decode::Objects => self.objects.slices.push(slice),
                        Decode::Facts => self
                            .deltas
                            .push(Delta::Slice(self.origin, Box::new(SliceFacts::of(&slice)))),
                    }
                }
            }
            "Node" => {
                if let Some(node) =
                    self.decode::<Node>(file, object, document, &api_version, NODE_API_VERSION)
                {
                    // Cluster-scoped: no namespace to default.
                    let name = node.metadata.name.clone().unwrap_or_default();
                    self.names.push(Named::Node(name));
                    match self.decode {
                        Decode::Objects => self.objects.nodes.push(node),
                        Decode::Facts => self.deltas.push(Delta::Node(self.origin, Box::new(node))),
                    }
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

/// Gives `meta` the default namespace if it names none; its (namespace,
/// name).
fn default_namespace(meta: &mut ObjectMeta) -> (String, String) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
    }
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
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

    /// A source's view through reloads: what the deltas of every reload so
    /// far add up to.
    #[derive(Default)]
    struct Cached {
        cache: DocCache,
        held: BTreeMap<(u8, Origin, String, String), Delta>,
    }

    impl Cached {
        fn parsed(&self) -> usize {
            self.cache.parsed()
        }

        /// Each object's facts by (kind, namespace, name), origins aside
        /// (a cold load hashes with other keys).
        fn view(&self) -> View {
            let mut view: Vec<_> = self
                .held
                .iter()
                .map(|((kind, _, ns, name), delta)| {
                    let facts = match delta {
                        Delta::Service(_, f) => format!("{f:?}"),
                        Delta::Slice(_, f) => format!("{f:?}"),
                        Delta::Node(_, n) => format!("{n:?}"),
                        _ => unreachable!("only additions are held"),
                    };
                    (*kind, ns.clone(), name.clone(), facts)
                })
                .collect();
            view.sort();
            view
        }

        /// The frontends the view programs.
        fn frontends(&self) -> std::collections::BTreeSet<crate::model::Frontend> {
            let mut tracker = crate::model::Tracker::new(Default::default());
            for delta in self.held.values() {
                delta.clone().apply_to(&mut tracker);
            }
            tracker.settle();
            tracker.frontends().map(|(f, _)| *f).collect()
        }
    }

    /// Each object's (kind, namespace, name, facts).
    type View = Vec<(u8, String, String, String)>;

    /// Reloads `dir` into `cached`; the view and the warnings.
    fn load_dir_cached(dir: &Path, cached: &mut Cached) -> (View, Vec<SourceWarning>) {
        let reload = reload(dir, &mut cached.cache, Decode::Facts);
        for delta in reload.deltas {
            let (kind, origin, ns, name, put) = match &delta {
                Delta::Service(o, f) => (0, *o, &*f.name.namespace, &*f.name.name, true),
                Delta::ServiceGone {
                    origin,
                    namespace,
                    name,
                } => (0, *origin, namespace.as_str(), name.as_str(), false),
                Delta::Slice(o, f) => (1, *o, &*f.namespace, &*f.name, true),
                Delta::SliceGone {
                    origin,
                    namespace,
                    name,
                } => (1, *origin, namespace.as_str(), name.as_str(), false),
                Delta::Node(o, n) => (2, *o, "", n.metadata.name.as_deref().unwrap_or(""), true),
                Delta::NodeGone { origin, name } => (2, *origin, "", name.as_str(), false),
            };
            let key = (kind, origin, ns.to_string(), name.to_string());
            if put {
                cached.held.insert(key, delta);
            } else {
                assert!(
                    cached.held.remove(&key).is_some(),
                    "took back {key:?}, never added"
                );
            }
        }
        (cached.view(), reload.warnings)
    }

    /// A cold load's view.
    fn cold(dir: &Path) -> (View, Vec<SourceWarning>) {
        load_dir_cached(dir, &mut Cached::default())
    }

    #[test]
    fn cache_parses_only_changed_documents_and_loads_the_same() {
        let dir = TempDir::new();
        let mut cache = Cached::default();
        dir.write("many.yaml", &many_services(100, None));
        dir.write("other.yaml", &format!("{SERVICE}---\n{SLICE}"));
        let (first, warnings) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(warnings, []);
        assert_eq!(first.iter().filter(|o| o.0 == 0).count(), 101);
        assert_eq!(cache.parsed(), 102);
        // One document edited: one parse, and exactly what a cold load gives.
        dir.write("many.yaml", &many_services(100, Some(42)));
        let (second, _) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(cache.parsed(), 1);
        assert_eq!(second, cold(&dir.0).0);
        let frontends = cache.frontends();
        let has = |addr: &str, port: u16| {
            frontends
                .iter()
                .any(|f| f.addr.to_string() == addr && f.port == port)
        };
        assert!(has("10.96.1.42", 81) && !has("10.96.1.42", 80));
        assert!(has("10.96.1.41", 80));
        // Unchanged: nothing parsed.
        let (third, _) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!((cache.parsed(), &third), (0, &second));
    }

    #[test]
    fn a_reload_reads_only_the_files_changed_since_their_last_read() {
        let dir = TempDir::new();
        let mut cache = Cached::default();
        let a = dir.write("a.yaml", &many_services(10, None));
        let b = dir.write(
            "b.yaml",
            &format!(
                "{SERVICE}---\n{}",
                SLICE.replace("discovery.k8s.io/v1", "v9")
            ),
        );
        let (first, warnings) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(cache.cache.read(), 2);
        // Just written: a rewrite in the same clock tick could leave the
        // stamps as they are, so they are not trusted yet.
        load_dir_cached(&dir.0, &mut cache);
        assert_eq!(cache.cache.read(), 2);
        let settled = || {
            let now = SystemTime::now();
            [&a, &b]
                .iter()
                .all(|f| Stamp::of(f).is_some_and(|s| s.settled(now)))
        };
        for _ in 0..40 {
            if settled() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(settled(), "the files' stamps never settled");
        // Read once more now that the stamps are old enough to trust...
        load_dir_cached(&dir.0, &mut cache);
        assert_eq!(cache.cache.read(), 2);
        // ...then neither is read, and nothing changes, warnings included.
        let (same, again) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(cache.cache.read(), 0);
        assert_eq!((same, again), (first, warnings));
        // A same-size edit of one file: that file alone is read.
        dir.write("a.yaml", &many_services(10, Some(3)));
        let (edited, _) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(cache.cache.read(), 1);
        assert_eq!(cache.parsed(), 1);
        assert_eq!(edited, cold(&dir.0).0);
    }

    #[test]
    fn cache_keeps_a_broken_file_skipped_whole_until_fixed() {
        let dir = TempDir::new();
        let mut cache = Cached::default();
        dir.write("many.yaml", &many_services(10, None));
        assert_eq!(load_dir_cached(&dir.0, &mut cache).0.len(), 10);
        let broken = many_services(10, None).replace("name: s5\n", "name: [s5\n");
        dir.write("many.yaml", &broken);
        let (objects, warnings) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!(objects.len(), 0, "half a file is never used");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!((objects, warnings), cold(&dir.0));
        dir.write("many.yaml", &many_services(10, None));
        let (objects, warnings) = load_dir_cached(&dir.0, &mut cache);
        assert_eq!((objects.len(), warnings.len()), (10, 0));
    }

    #[test]
    fn split_documents_follows_markers_and_declines_directives() {
        // The parts, or `None` where the file is parsed whole.
        let split = |text: &str| {
            let parts = split_documents(text.as_bytes(), &[], |_| 0).0;
            let plain = Plain::new();
            parts
                .iter()
                .all(|r| plain.check(&text.as_bytes()[r.clone()]))
                .then(|| {
                    parts
                        .into_iter()
                        .map(|r| text[r].to_string())
                        .collect::<Vec<_>>()
                })
        };
        let text = "a: 1\n---\nb: 2\n--- # c\nc: |\n  ---x\n---\n";
        assert_eq!(
            split(text).unwrap(),
            ["a: 1\n", "---\nb: 2\n", "--- # c\nc: |\n  ---x\n", "---\n"]
        );
        // Markers at the very start, CRLF line ends, a `---` that only
        // starts a longer token.
        assert_eq!(
            split("---\r\na: 1\r\n---\r\nb: ---x\r\n----\r\n").unwrap(),
            ["---\r\na: 1\r\n", "---\r\nb: ---x\r\n----\r\n"]
        );
        assert_eq!(split("%YAML 1.2\n---\na: 1\n"), None);
        assert_eq!(split("a: 1\n...\n---\nb: 2\n"), None);
        assert_eq!(split("...\n"), None);
        assert_eq!(split("a: 1\n...x\n").unwrap(), ["a: 1\n...x\n"]);
    }

    /// Following the previous load's documents splits exactly as a fresh
    /// search does, whatever the edit.
    mod follow {
        use super::*;
        use proptest::prelude::*;

        fn hash(text: &[u8]) -> u64 {
            use std::hash::{DefaultHasher, Hasher};
            let mut h = DefaultHasher::new();
            h.write(text);
            h.finish()
        }

        fn docs_of(text: &[u8]) -> Vec<Doc> {
            let (parts, keys) = split_documents(text, &[], hash);
            parts
                .into_iter()
                .zip(keys)
                .map(|(range, key)| Doc {
                    key,
                    len: range.len(),
                    names: Box::new([]),
                    warnings: Box::new([]),
                })
                .collect()
        }

        fn line() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "a: 1\n",
                "- b\n",
                "--- # x\n",
                "---\n",
                "----\n",
                "  ---\n",
                "c: ---\n",
                "\n",
            ])
        }

        fn text() -> impl Strategy<Value = Vec<&'static str>> {
            prop::collection::vec(line(), 0..24)
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 500,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn same_split(
                before in text(),
                at in 0usize..24,
                removed in 0usize..4,
                inserted in text(),
            ) {
                let at = at.min(before.len());
                let removed = removed.min(before.len() - at);
                let mut after = before.clone();
                after.splice(at..at + removed, inserted.iter().take(4).copied());
                let (before, after) = (before.concat(), after.concat());
                let old = docs_of(before.as_bytes());
                let followed = split_documents(after.as_bytes(), &old, hash);
                let fresh = split_documents(after.as_bytes(), &[], hash);
                prop_assert_eq!(followed, fresh);
            }
        }
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
            facts.deltas.iter().any(|d| matches!(d, Delta::Slice(..))),
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

    /// Issue 17.12: a link that leads nowhere was skipped silently. Each
    /// (dangling, a loop) is one warning naming the link, the same at every
    /// re-read (the agent logs a warning when it first appears, so once),
    /// and the other files load.
    #[test]
    fn dangling_and_looping_links_are_one_warning_each() {
        let dir = TempDir::new();
        dir.write("web.yaml", SERVICE);
        let dangling = dir.0.join("dangling.yaml");
        std::os::unix::fs::symlink(dir.0.join("absent.yaml"), &dangling).unwrap();
        let looping = dir.0.join("loop.yaml");
        std::os::unix::fs::symlink(&looping, &looping).unwrap();
        let mut cache = DocCache::default();
        let mut last = None;
        for _ in 0..2 {
            let reload = reload(&dir.0, &mut cache, Decode::Facts);
            let files: Vec<&Path> = reload.warnings.iter().map(|w| &*w.file).collect();
            assert_eq!(files, [&*dangling, &*looping], "{:?}", reload.warnings);
            assert!(
                reload.warnings[0].reason.contains("absent.yaml")
                    && reload.warnings[0].reason.contains("cannot be read"),
                "{}",
                reload.warnings[0]
            );
            assert_eq!(reload.unavailable, None, "a bad link is not an outage");
            if let Some(previous) = last.replace(reload.warnings.clone()) {
                assert_eq!(previous, reload.warnings);
            }
        }
        assert_eq!(last.unwrap(), load_dir(&dir.0).1);
        assert_eq!(load_dir(&dir.0).0.services.len(), 1);
    }

    /// Issue 17.7 at the source: a directory that goes is reported
    /// unavailable with nothing removed; back, it is read again and only
    /// what changed meanwhile is handed over.
    #[test]
    fn a_directory_gone_removes_nothing_and_is_unavailable() {
        let dir = TempDir::new();
        dir.write("web.yaml", SERVICE);
        dir.write("slice.yaml", SLICE);
        let mut cache = DocCache::default();
        let first = reload(&dir.0, &mut cache, Decode::Facts);
        assert_eq!((first.deltas.len(), first.unavailable), (2, None));
        let away = dir.0.with_extension("away");
        fs::rename(&dir.0, &away).unwrap();
        let gone = reload(&dir.0, &mut cache, Decode::Facts);
        fs::rename(&away, &dir.0).unwrap();
        assert!(gone.deltas.is_empty(), "{:?}", gone.deltas);
        let why = gone.unavailable.expect("reported unavailable");
        assert!(why.contains("cannot list directory"), "{why}");
        let back = reload(&dir.0, &mut cache, Decode::Facts);
        assert_eq!((back.deltas.len(), back.unavailable), (0, None));
        assert_eq!(cache.parsed(), 0);
    }

    /// Issue 17.12: a manifest with an mtime in the future was re-read at
    /// every 200 ms poll, forever (the poller read any file modified
    /// "recently", and the future counts). With inotify nothing wakes the
    /// source but a change: a second, five of those polls, passes without
    /// a wake; a real edit then wakes it and parses one document.
    #[tokio::test(flavor = "current_thread")]
    async fn a_future_mtime_wakes_nothing() {
        let dir = TempDir::new();
        let file = dir.write("many.yaml", &many_services(50, None));
        let future = SystemTime::now() + Duration::from_secs(24 * 3600);
        let touch = |path: &Path| {
            fs::File::open(path).unwrap().set_modified(future).unwrap();
        };
        touch(&file);
        touch(&dir.0);
        let mut source = ManifestSource::new(dir.0.clone(), Duration::from_millis(200));
        source.changed().await;
        assert_eq!(source.take_changes().deltas.len(), 50);
        let quiet = tokio::time::timeout(Duration::from_secs(1), source.changed()).await;
        assert!(quiet.is_err(), "woken with nothing changed");
        let edited = many_services(50, Some(7));
        let staging = dir.0.with_extension("staging");
        fs::write(&staging, edited).unwrap();
        touch(&staging);
        fs::rename(&staging, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(5), source.changed())
            .await
            .expect("an edit wakes the source");
        let changes = source.take_changes();
        assert_eq!(source.cache.parsed(), 1);
        // The edited Service: its old copy gone, its new one in.
        assert_eq!(changes.deltas.len(), 2, "{:?}", changes.deltas);
    }
}
