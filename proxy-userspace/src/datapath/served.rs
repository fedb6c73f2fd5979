//! The served filter (`kep_served`, see [`proxy_common::served`]): one bit
//! per hash of every frontend's and endpoint's (address, port, protocol),
//! which lets the datapath pass a packet to none of them without the
//! services and endpoints lookups.
//!
//! A clear bit must never stand for an entry the maps hold, or that
//! entry's new flows would pass untranslated. So the bits of what an apply
//! is about to write are set before it writes ([`ServedFilter::preset`]),
//! and a bit is cleared only after the last entry it stands for is gone
//! ([`ServedFilter::flush`]). Each bit keeps a count of the live entries
//! hashed to it, so an apply costs what it changes, not the whole map.

use std::collections::{BTreeSet, HashMap};

use aya::maps::{Array, MapData, MapError};
use proxy_common::served;

use crate::contents::{AnyBackend, MapAddr, MapContents, SvcKey};
use crate::diff::MapOp;

pub(super) struct ServedFilter {
    /// Live entries (service keys of every slot and scope, backends) per
    /// bit index.
    refs: HashMap<u32, u32>,
    /// The chunks as the counts make them.
    want: Vec<served::Chunk>,
    /// The chunks as last written to the map.
    written: Vec<served::Chunk>,
    /// Chunks whose `want` may differ from `written`.
    dirty: BTreeSet<u32>,
}

/// Bit index of a destination, and its (chunk, word, mask).
fn bit(addr: u32, port: u16, proto: u8) -> (u32, (u32, usize, u64)) {
    let (chunk, word, mask) = served::bit(addr, port, proto);
    let index = chunk * served::CHUNK_BITS + word as u32 * 64 + mask.trailing_zeros();
    (index, (chunk, word, mask))
}

/// The 32 bits of either family's address the bitmap hashes.
fn folded(addr: MapAddr) -> u32 {
    match addr {
        MapAddr::V4(a) => a,
        MapAddr::V6(a) => served::fold6(a),
    }
}

fn of_service(k: &SvcKey) -> (u32, (u32, usize, u64)) {
    bit(folded(k.addr), k.port, k.proto)
}

fn of_backend(b: &AnyBackend) -> (u32, (u32, usize, u64)) {
    bit(folded(b.addr), b.port, b.proto)
}

impl ServedFilter {
    /// The filter of `live`, to be flushed over what `map` holds now (a
    /// previous agent's bits, bits edited by hand, or none).
    pub(super) fn of(live: &MapContents, map: &Array<MapData, served::Chunk>) -> Self {
        let mut f = Self {
            refs: HashMap::new(),
            want: vec![[0; served::CHUNK_WORDS]; served::CHUNKS as usize],
            // A chunk that cannot be read is taken to differ from any
            // wanted value, so the flush writes it.
            written: (0..served::CHUNKS)
                .map(|i| map.get(&i, 0).unwrap_or([u64::MAX; served::CHUNK_WORDS]))
                .collect(),
            dirty: (0..served::CHUNKS).collect(),
        };
        for k in live.services.keys() {
            f.add(of_service(k));
        }
        for b in live.backends.values() {
            f.add(of_backend(b));
        }
        f
    }

    /// The bits `map` holds now, kept as they are (no entry counted yet):
    /// until [`ServedFilter::of`] makes them from the maps, nothing is
    /// cleared, so programs still reading other maps (an agent that
    /// resizes them starts beside its predecessor's) keep every bit they
    /// had.
    pub(super) fn adopt(map: &Array<MapData, served::Chunk>) -> Self {
        let chunks: Vec<served::Chunk> = (0..served::CHUNKS)
            // Unreadable: every bit set, which only costs lookups.
            .map(|i| map.get(&i, 0).unwrap_or([u64::MAX; served::CHUNK_WORDS]))
            .collect();
        Self {
            refs: HashMap::new(),
            want: chunks.clone(),
            written: chunks,
            dirty: BTreeSet::new(),
        }
    }

    fn add(&mut self, (index, (chunk, word, mask)): (u32, (u32, usize, u64))) {
        let n = self.refs.entry(index).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.want[chunk as usize][word] |= mask;
            self.dirty.insert(chunk);
        }
    }

    fn remove(&mut self, (index, (chunk, word, mask)): (u32, (u32, usize, u64))) {
        let Some(n) = self.refs.get_mut(&index) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&index);
            self.want[chunk as usize][word] &= !mask;
            self.dirty.insert(chunk);
        }
    }

    /// A service key written.
    pub(super) fn service_added(&mut self, k: &SvcKey) {
        self.add(of_service(k));
    }

    pub(super) fn service_removed(&mut self, k: &SvcKey) {
        self.remove(of_service(k));
    }

    /// A backend written (`old`: the value it replaced).
    pub(super) fn backend_put(&mut self, old: Option<&AnyBackend>, new: &AnyBackend) {
        self.add(of_backend(new));
        if let Some(old) = old {
            self.remove(of_backend(old));
        }
    }

    pub(super) fn backend_removed(&mut self, b: &AnyBackend) {
        self.remove(of_backend(b));
    }

    /// Sets, in the map, the bits of everything `ops` writes, before the
    /// ops run (whatever becomes of them: a bit set for an entry that was
    /// not written only costs its lookups until the next flush).
    pub(super) fn preset(&mut self, map: &mut Array<MapData, served::Chunk>, ops: &[MapOp]) {
        let mut chunks = self.written.clone();
        let mut touched = BTreeSet::new();
        for op in ops {
            let (_, (chunk, word, mask)) = match op {
                MapOp::PutService(k, _) => of_service(k),
                MapOp::PutBackend(_, b) => of_backend(b),
                _ => continue,
            };
            if chunks[chunk as usize][word] & mask == 0 {
                chunks[chunk as usize][word] |= mask;
                touched.insert(chunk);
            }
        }
        for chunk in touched {
            self.write(map, chunk, chunks[chunk as usize]);
            // Back to what the counts say at the next flush.
            self.dirty.insert(chunk);
        }
    }

    /// Writes the chunks whose bits changed: clears what no live entry
    /// needs any more. Call after the entries were deleted.
    pub(super) fn flush(&mut self, map: &mut Array<MapData, served::Chunk>) {
        for chunk in std::mem::take(&mut self.dirty) {
            let want = self.want[chunk as usize];
            if want != self.written[chunk as usize] {
                self.write(map, chunk, want);
            }
        }
    }

    fn write(&mut self, map: &mut Array<MapData, served::Chunk>, chunk: u32, value: served::Chunk) {
        match map.set(chunk, value, 0) {
            Ok(()) => self.written[chunk as usize] = value,
            Err(e) => {
                report(chunk, &e);
                self.dirty.insert(chunk);
            }
        }
    }
}

/// An array write fails only if the map is gone; the chunk stays dirty, so
/// the next flush tries again.
fn report(chunk: u32, e: &MapError) {
    tracing::warn!(error = %e, chunk, "writing kep_served: new flows to some frontends may pass untranslated until it succeeds");
}
