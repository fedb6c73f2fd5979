//! Maglev tables in the kernel: one inner array per frontend, reached
//! through the pinned maglev map (a hash of maps keyed by svc id). The
//! layout of an inner array is `proxy_common::maglev`'s.
//!
//! A table is never edited in place. [`MaglevTables::put`] builds the new
//! one in a fresh inner array, fills it with one batch update, and only then
//! points the outer entry at it, so the datapath sees the old table or the
//! new one and nothing in between. The old array is freed by the kernel once
//! no program holds it.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya::maps::{Array, HashOfMaps, Map, MapData, MapError};
use aya::sys::SyscallError;
use proxy_common::maglev;

use crate::datapath::bpf_syscall;
use crate::maglev::TableSpec;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// Kernel name of every inner array, as `bpftool map list` shows it.
const INNER_NAME: &[u8] = b"kep_maglev_tbl";

pub struct MaglevTables {
    outer: HashOfMaps<MapData, u32, Array<MapData, u32>>,
}

impl MaglevTables {
    pub fn new(outer: HashOfMaps<MapData, u32, Array<MapData, u32>>) -> Self {
        Self { outer }
    }

    /// Swaps in `table` (built from `spec`) as `svc_id`'s.
    pub fn put(&mut self, svc_id: u32, spec: &TableSpec, table: &[u32]) -> Result<(), MapError> {
        let fingerprint = spec.fingerprint();
        let mut values = Vec::with_capacity(table.len() + maglev::HEADER_LEN as usize);
        values.push(spec.size());
        values.push(fingerprint as u32);
        values.push((fingerprint >> 32) as u32);
        values.extend_from_slice(table);
        let inner = create_inner(values.len() as u32).map_err(syscall("bpf_map_create"))?;
        update_batch(&inner, &values).map_err(syscall("bpf_map_update_batch"))?;
        let inner = Array::<MapData, u32>::try_from(Map::Array(MapData::from_fd(inner)?))?;
        self.outer.insert(svc_id, &inner, 0)
    }

    pub fn delete(&mut self, svc_id: u32) -> Result<(), MapError> {
        match self.outer.remove(&svc_id) {
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Every table's header, as a spec that compares equal to the one it was
    /// built from.
    pub fn read_all(&self) -> Result<BTreeMap<u32, TableSpec>, MapError> {
        let mut out = BTreeMap::new();
        let ids: Vec<u32> = self.outer.keys().collect::<Result<_, _>>()?;
        for svc_id in ids {
            let inner = match self.outer.get(&svc_id, 0) {
                Ok(inner) => inner,
                // Deleted between listing and reading.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e),
            };
            let size = inner.get(&maglev::SIZE, 0)?;
            let lo = inner.get(&maglev::FINGERPRINT_LO, 0)?;
            let hi = inner.get(&maglev::FINGERPRINT_HI, 0)?;
            let fingerprint = u64::from(lo) | (u64::from(hi) << 32);
            out.insert(svc_id, TableSpec::read_back(size, fingerprint));
        }
        Ok(out)
    }

    /// `svc_id`'s table (backend ids by position), for inspection and tests.
    pub fn table(&self, svc_id: u32) -> Result<Option<Vec<u32>>, MapError> {
        let inner = match self.outer.get(&svc_id, 0) {
            Ok(inner) => inner,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let size = inner.get(&maglev::SIZE, 0)?;
        (0..size)
            .map(|i| inner.get(&(maglev::HEADER_LEN + i), 0))
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
    }
}

fn syscall(call: &'static str) -> impl FnOnce(io::Error) -> MapError {
    move |io_error| MapError::SyscallError(SyscallError { call, io_error })
}

/// A `u32 -> u32` array of `len` entries that fits the maglev map's inner
/// template (same type, sizes and flags; `BPF_F_INNER_MAP` lets the length
/// differ).
fn create_inner(len: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut map_name = [0u8; 16];
    map_name[..INNER_NAME.len()].copy_from_slice(INNER_NAME);
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: len,
        map_flags: maglev::BPF_F_INNER_MAP,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    let fd = bpf_syscall(BPF_MAP_CREATE, &attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Writes `values[i]` at index `i` for every `i`, in one syscall.
fn update_batch(map: &OwnedFd, values: &[u32]) -> io::Result<()> {
    #[repr(C)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    let attr = Batch {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: values.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // On any failure the kernel returns an error (and how far it got,
    // which does not matter: the array is discarded).
    bpf_syscall(BPF_MAP_UPDATE_BATCH, &attr).map(|_| ())
}
