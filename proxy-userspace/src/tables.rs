//! Maglev tables in the kernel: one value per frontend in the pinned
//! maglev map (svc id -> `proxy_common::maglev::MaglevTable`, whose layout
//! that module owns).
//!
//! A table is never edited in place. [`MaglevTables::put`] writes the whole
//! new value with one update; the map has no preallocation, so the kernel
//! allocates a new element and swaps it in under RCU: the datapath sees the
//! old table or the new one and nothing in between.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::maglev::{self, MaglevTable};

use crate::maglev::TableSpec;

pub struct MaglevTables {
    map: HashMap<MapData, u32, MaglevTable>,
}

impl MaglevTables {
    pub fn new(map: HashMap<MapData, u32, MaglevTable>) -> Self {
        Self { map }
    }

    /// Swaps in `table` (built from `spec`) as `svc_id`'s.
    pub fn put(&mut self, svc_id: u32, spec: &TableSpec, table: &[u32]) -> Result<(), MapError> {
        let mut value = Box::new(MaglevTable {
            words: [0; maglev::HEADER_LEN + maglev::MAX_SIZE as usize],
        });
        let fingerprint = spec.fingerprint();
        value.words[maglev::SIZE] = spec.size();
        value.words[maglev::FINGERPRINT_LO] = fingerprint as u32;
        value.words[maglev::FINGERPRINT_HI] = (fingerprint >> 32) as u32;
        // `check_size` keeps sizes within what a value holds; a longer
        // table would be cut, so refuse it instead.
        let Some(slots) = value.words[maglev::HEADER_LEN..].get_mut(..table.len()) else {
            return Err(MapError::OutOfBounds {
                index: table.len() as u32,
                max_entries: maglev::MAX_SIZE,
            });
        };
        slots.copy_from_slice(table);
        self.map.insert(svc_id, value.as_ref(), 0)
    }

    /// Writes a table value as it is (copied from another map).
    pub fn put_raw(&mut self, svc_id: u32, value: &MaglevTable) -> Result<(), MapError> {
        self.map.insert(svc_id, value, 0)
    }

    pub fn delete(&mut self, svc_id: u32) -> Result<(), MapError> {
        self.map.remove(&svc_id)
    }

    /// Every table, as a spec that compares equal to the one it was built
    /// from. Tables in `known` (what this process wrote) are taken from
    /// there and only checked to still exist: reading one back copies its
    /// whole 64 KiB value, which at tens of thousands of frontends would cost
    /// seconds of CPU on every periodic resync. Others (an earlier agent's)
    /// are read from their header.
    pub fn read_all(
        &self,
        known: &BTreeMap<u32, TableSpec>,
    ) -> Result<BTreeMap<u32, TableSpec>, MapError> {
        let ids: Vec<u32> = self.map.keys().collect::<Result<_, _>>()?;
        let mut out = BTreeMap::new();
        for svc_id in ids {
            if let Some(spec) = known.get(&svc_id) {
                out.insert(svc_id, spec.clone());
                continue;
            }
            match self.map.get(&svc_id, 0) {
                Ok(table) => {
                    out.insert(
                        svc_id,
                        TableSpec::read_back(table.size(), table.fingerprint()),
                    );
                }
                // Deleted between listing and reading.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// `svc_id`'s table (backend ids by position), for inspection and tests.
    pub fn table(&self, svc_id: u32) -> Result<Option<Vec<u32>>, MapError> {
        let table = match self.map.get(&svc_id, 0) {
            Ok(table) => table,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(
            (0..table.size())
                .filter_map(|pos| table.entry(pos))
                .collect(),
        ))
    }
}
