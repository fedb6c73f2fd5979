//! Limits on what one manifest file may cost to read: its size, and how far
//! YAML anchors and aliases may expand its documents.
//!
//! serde_yaml expands an alias while it deserializes, by replaying the
//! anchored part as often as it is named, so a small file can name a large
//! anchor thousands of times: a 1 MB file expanding a 1 MB string 2,000
//! times took 7 GB and half a minute before anything could reject it. Here
//! the value is built under a budget instead: every node and every byte of
//! every scalar, aliased ones included, is counted as it is produced, and
//! the document is refused the moment it would pass [`EXPANSION`] times its
//! own text, before that memory is taken.
//!
//! Without aliases a document never comes near the budget (each node and
//! each scalar byte needs at least one character of text, so it counts at
//! most about twice its length); [`EXPANSION`] leaves room for ordinary
//! anchors and merge keys (`<<: *defaults`) on top.

use std::cell::Cell;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};
use thiserror::Error;

/// Largest manifest file read: 64 MiB, about four times 30,000 Services
/// with their EndpointSlices in one file (about 0.5 KB each). Larger sets
/// can be split over several files.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// How many times its own text a YAML file may grow to once its aliases are
/// expanded (counting one per node and one per scalar byte).
pub const EXPANSION: usize = 4;
/// Small files may expand up to this much whatever their size.
pub const EXPANSION_FLOOR: usize = 64 << 10;

/// Why a file was refused.
#[derive(Debug, Error)]
pub enum LimitError {
    #[error("{size} bytes, more than the {MAX_FILE_BYTES} a manifest file may have")]
    TooLarge { size: u64 },
    #[error(
        "anchors and aliases expand its {text} bytes beyond {limit} ({EXPANSION} x its \
         size, at least {EXPANSION_FLOOR}); refused"
    )]
    Expansion { text: usize, limit: usize },
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// Reads `path` whole, or fails without reading it if it is larger than
/// [`MAX_FILE_BYTES`]. The bytes are not checked to be UTF-8: a caller
/// that reads a file again validates only the parts it has not seen.
pub fn read(path: &Path) -> Result<Vec<u8>, ReadError> {
    let file = File::open(path).map_err(ReadError::Io)?;
    let size = file.metadata().map_err(ReadError::Io)?.len();
    let too_large = |size| ReadError::Limit(LimitError::TooLarge { size });
    if size > MAX_FILE_BYTES {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // The file may grow between the stat and the read.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Why [`read`] failed: the file could not be read, or is too large.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("cannot read: {0}")]
    Io(io::Error),
    #[error("{0}")]
    Limit(LimitError),
}

/// Every document of a YAML text (merge keys not applied), or the first
/// problem: invalid YAML, or more expansion than the text's budget.
pub fn documents(text: &str) -> Result<Vec<Value>, LimitError> {
    let limit = text.len().saturating_mul(EXPANSION).max(EXPANSION_FLOOR);
    let budget = Budget {
        left: Cell::new(limit),
        exceeded: Cell::new(false),
    };
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        match Bounded(&budget).deserialize(document) {
            Ok(value) => documents.push(value),
            Err(_) if budget.exceeded.get() => {
                drop(documents);
                release_freed_memory();
                return Err(LimitError::Expansion {
                    text: text.len(),
                    limit,
                });
            }
            Err(e) => return Err(LimitError::Yaml(e)),
        }
    }
    Ok(documents)
}

/// Gives the heap's free memory back to the system. A refused document has
/// just freed up to its whole budget in blocks glibc would otherwise keep
/// for later (its mmap threshold rises after large frees), so the agent's
/// RSS would stay that much higher; so has a large sync (the agent).
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What is left to spend on nodes and scalar bytes.
struct Budget {
    left: Cell<usize>,
    exceeded: Cell<bool>,
}

impl Budget {
    /// Takes `units` before the memory for them is, or fails.
    fn spend<E: de::Error>(&self, units: usize) -> Result<(), E> {
        match self.left.get().checked_sub(units) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.exceeded.set(true);
                Err(E::custom("expansion limit reached"))
            }
        }
    }
}

/// Builds a [`Value`] as serde_yaml's own `Deserialize` does, spending from
/// the budget for every node and scalar byte.
#[derive(Clone, Copy)]
struct Bounded<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.0.spend(1)?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.0.spend(1)?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.0.spend(1)?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.0.spend(1)?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.0.spend(1 + s.len())?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.0.spend(1 + s.len())?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.spend(1)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.spend(1)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.spend(1)?;
        let mut mapping = Mapping::new();
        while let Some(key) = map.next_key_seed(self)? {
            if mapping.contains_key(&key) {
                let key = serde_yaml::to_string(&key).unwrap_or_default();
                return Err(de::Error::custom(format_args!(
                    "duplicate entry with key {}",
                    key.trim_end()
                )));
            }
            let value = map.next_value_seed(self)?;
            mapping.insert(key, value);
        }
        Ok(Value::Mapping(mapping))
    }

    /// A tagged node (`!tag value`), which serde_yaml presents as an enum.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (tag, contents): (String, _) = data.variant()?;
        if tag.is_empty() {
            return Err(de::Error::custom("empty YAML tag is not allowed"));
        }
        self.0.spend(1 + tag.len())?;
        let value = contents.newtype_variant_seed(self)?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize as _;
    use std::time::{Duration, Instant};

    /// What serde_yaml itself makes of `text`.
    fn unbounded(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect()
    }

    /// The file: one 1 MB string expanded 2,000 times.
    fn alias_bomb() -> String {
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: bomb\n  annotations:\n    a: &big \"{}\"\n",
            "x".repeat(1 << 20)
        );
        text.push_str("spec:\n  ports: [");
        for i in 0..2000 {
            text.push_str(if i == 0 { "*big" } else { ", *big" });
        }
        text.push_str("]\n");
        text
    }

    #[test]
    fn the_alias_bomb_is_refused_at_once() {
        let text = alias_bomb();
        let started = Instant::now();
        let err = documents(&text).unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, LimitError::Expansion { text: n, .. } if n == text.len()),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("anchors and aliases") && message.contains("refused"),
            "{message}"
        );
        // It stops after about 4 MB of copies, not 2 GB.
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    /// Nested aliases (the "billion laughs"): each level 10 x the last.
    #[test]
    fn nested_expansion_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(matches!(
            documents(&text),
            Err(LimitError::Expansion { .. })
        ));
    }

    #[test]
    fn ordinary_documents_parse_as_serde_yaml_parses_them() {
        let texts = [
            // Block and flow style, every scalar type, a tag, documents.
            "a: 1\nb: -2\nc: 1.5\nd: true\ne: null\nf: ~\ng: \"s\"\nh: [1, {i: j}]\n---\nk: !t v\n",
            // Anchors and merge keys, used as manifests use them.
            "base: &base {protocol: TCP, port: 80}\nports:\n- <<: *base\n  name: a\n- <<: *base\n  name: b\n",
            // The densest alias-free shapes.
            "{a,b,c,d,e,f,g}",
            "a:\nb:\nc:\n",
            "",
        ];
        for text in texts {
            assert_eq!(documents(text).unwrap(), unbounded(text), "{text:?}");
        }
        // A large alias-free file, far past the floor.
        let big: String = (0..20_000)
            .map(|i| format!("- {{name: p{i}, port: {i}, protocol: TCP}}\n"))
            .collect();
        assert!(big.len() > EXPANSION_FLOOR * 10);
        assert_eq!(documents(&big).unwrap(), unbounded(&big));
    }

    #[test]
    fn invalid_yaml_and_duplicate_keys_are_errors() {
        let e = documents("a: [1, 2\n").unwrap_err();
        assert!(matches!(e, LimitError::Yaml(_)), "{e}");
        let e = documents("a: 1\na: 2\n").unwrap_err();
        assert!(e.to_string().contains("duplicate entry with key a"), "{e}");
    }

    #[test]
    fn files_over_the_size_limit_are_not_read() {
        let path = std::env::temp_dir().join(format!("kep-yaml-limits-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        // Sparse: no disk is used.
        file.set_len(MAX_FILE_BYTES + 1).unwrap();
        let err = read(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, ReadError::Limit(_)), "{err}");
        assert!(
            err.to_string().contains("a manifest file may have"),
            "{err}"
        );
    }
}
