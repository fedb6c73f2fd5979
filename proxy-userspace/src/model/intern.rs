//! Shared strings for the names that repeat across objects: namespaces,
//! port names, node names, zones. 30,000 Services in a handful of
//! namespaces, with their endpoints on a few hundred nodes, hold a few
//! hundred distinct strings, each once instead of once per object.
//!
//! Sources intern as they decode (on whichever thread), so one
//! process-wide set serves them all. An entry nobody else holds any more
//! is dropped by [`prune`], which the tracker calls as objects go.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

static NAMES: Mutex<Names> = Mutex::new(Names {
    set: None,
    pruned_at: 0,
});

struct Names {
    set: Option<HashSet<Arc<str>>>,
    /// The set's size after the last prune.
    pruned_at: usize,
}

fn names() -> MutexGuard<'static, Names> {
    NAMES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared copy of `text`.
pub fn intern(text: &str) -> Arc<str> {
    let mut names = names();
    let set = names.set.get_or_insert_with(HashSet::new);
    if let Some(shared) = set.get(text) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(text);
    set.insert(shared.clone());
    shared
}

/// Drops the strings no object holds any more, once the set has doubled
/// since the last time (so a steady state costs nothing).
pub fn prune() {
    let mut names = names();
    let Names { set, pruned_at } = &mut *names;
    let Some(set) = set else {
        return;
    };
    if set.len() >= 2 * (*pruned_at).max(64) {
        *pruned_at = retain_used(set);
    }
}

/// Keeps the strings held outside the set; how many that is.
fn retain_used(set: &mut HashSet<Arc<str>>) -> usize {
    set.retain(|s| Arc::strong_count(s) > 1);
    set.shrink_to_fit();
    set.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_text_and_unused_ones_go() {
        let a = intern("kep-intern-test-a");
        let b = intern("kep-intern-test-a");
        assert!(Arc::ptr_eq(&a, &b));
        let kept = intern("kep-intern-test-b");
        drop((a, b));
        let mut names = names();
        let set = names.set.as_mut().unwrap();
        retain_used(set);
        assert!(!set.contains("kep-intern-test-a"), "unused: dropped");
        assert!(set.contains(&*kept), "still held: kept");
    }
}
