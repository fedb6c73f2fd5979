//! Maps pinned with other sizes than this agent's `--*-max` flags ask for.
//!
//! Loading adopts a pinned map as it is, so an agent restarted with new
//! capacities used to keep the old sizes (while its metrics reported the new
//! ones). A map whose size differs is migrated instead: a new map of the
//! size asked for is made (pinned beside the old one as `<name>_resize`
//! until it is complete), what the old one held is copied in (the services,
//! backends and source ranges in the make-before-break order, through the
//! same capacity-aware plan as a sync, so a smaller map keeps a consistent
//! part; Maglev tables and conntrack entries as they are), and it takes the
//! old one's pin. The programs of this agent use the new maps from the
//! start; the old programs keep the old maps until their links are switched
//! to the new programs (at attach), after which the conntrack entries they
//! made meanwhile are copied too ([`Datapath::finish_resize`]), so
//! established flows keep their endpoint.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, LpmTrie, Map, MapData};
use proxy_common::{CtKey, CtValue, ServiceKey, maglev::MaglevTable, map_names};

use super::{Datapath, DatapathConfig, DatapathError, map_err, read_hash, read_ranges};
use crate::capacity;

/// Suffix of a new map's pin while it is being filled.
// bpffs refuses dots in names.
const STAGING: &str = "_resize";

/// The maps a flag sizes, with that flag.
const SIZED: [(&str, &str); 6] = [
    (map_names::SERVICES, "--services-max"),
    (map_names::BACKENDS, "--backends-max"),
    (map_names::CONNTRACK_TCP, "--conntrack-max"),
    (map_names::CONNTRACK_OTHER, "--conntrack-other-max"),
    (map_names::MAGLEV, "--maglev-max"),
    (map_names::SOURCE_RANGES, "--source-ranges-max"),
];

/// `BPF_NOEXIST`: what the new programs already wrote wins.
const NOEXIST: u64 = 1;

/// A pinned map of another size than asked for.
pub(super) struct Resize {
    pub name: &'static str,
    old: MapData,
    from: u32,
    to: u32,
}

/// The flag that sizes map `name`, if one does.
pub fn capacity_flag(name: &str) -> Option<&'static str> {
    SIZED
        .iter()
        .find(|(map, _)| *map == name)
        .map(|(_, flag)| *flag)
}

impl DatapathConfig {
    fn max_entries_of(&self, name: &str) -> u32 {
        match name {
            map_names::SERVICES => self.services_max,
            map_names::BACKENDS => self.backends_max,
            map_names::CONNTRACK_TCP => self.conntrack_max,
            map_names::CONNTRACK_OTHER => self.conntrack_other_max,
            map_names::MAGLEV => self.maglev_max,
            _ => self.source_ranges_max,
        }
    }
}

/// Where the new map of `name` is pinned while it is filled.
pub(super) fn staging_pin(maps: &Path, name: &str) -> PathBuf {
    maps.join(format!("{name}{STAGING}"))
}

/// Whether `file` is a pin the agent makes under its maps directory.
pub(super) fn is_map_pin(file: &str) -> bool {
    map_names::ALL.contains(&file.strip_suffix(STAGING).unwrap_or(file))
}

/// The pinned maps under `maps` whose size differs from what `cfg` asks
/// for. A staging pin left by a migration that did not finish is removed:
/// its map is made again.
pub(super) fn find(maps: &Path, cfg: &DatapathConfig) -> Result<Vec<Resize>, DatapathError> {
    let mut found = Vec::new();
    for (name, _) in SIZED {
        let _ = std::fs::remove_file(staging_pin(maps, name));
        let pin = maps.join(name);
        if !pin.exists() {
            continue;
        }
        let old = MapData::from_pin(&pin).map_err(map_err(name))?;
        let from = old.info().map_err(map_err(name))?.max_entries();
        let to = cfg.max_entries_of(name);
        if from != to {
            found.push(Resize {
                name,
                old,
                from,
                to,
            });
        }
    }
    Ok(found)
}

impl Datapath {
    /// Fills the new maps of `resized` from the old ones and pins them in
    /// their place.
    pub(super) fn migrate(&mut self, resized: Vec<Resize>) -> Result<(), DatapathError> {
        let maps = super::maps_dir(&self.bpffs);
        let mut old_contents = None;
        let mut done = Vec::new();
        for Resize {
            name,
            old,
            from,
            to,
        } in resized
        {
            tracing::info!(
                map = name,
                from,
                to,
                "map size changed: migrating into a new map"
            );
            let copied = match name {
                map_names::MAGLEV => {
                    let old: HashMap<MapData, u32, MaglevTable> =
                        Map::HashMap(old).try_into().map_err(map_err(name))?;
                    let ids: Vec<u32> = old.keys().filter_map(Result::ok).collect();
                    ids.iter()
                        .filter(|id| {
                            old.get(id, 0)
                                .is_ok_and(|table| self.tables.put_raw(**id, &table).is_ok())
                        })
                        .count()
                }
                map_names::CONNTRACK_TCP | map_names::CONNTRACK_OTHER => {
                    let old: HashMap<MapData, CtKey, CtValue> =
                        Map::LruHashMap(old).try_into().map_err(map_err(name))?;
                    let n = self.copy_conntrack(name, &old);
                    self.old_conntrack.push((name, old));
                    n
                }
                _ => {
                    let contents = old_contents.get_or_insert_with(Vec::new);
                    contents.push((name, old));
                    done.push(name);
                    continue;
                }
            };
            tracing::info!(map = name, copied, "entries copied into the new map");
            done.push(name);
        }
        if let Some(olds) = old_contents {
            self.copy_services(olds)?;
        }
        for name in done {
            std::fs::rename(staging_pin(&maps, name), maps.join(name)).map_err(|source| {
                DatapathError::Bpffs {
                    path: maps.join(name),
                    source: source.into(),
                }
            })?;
        }
        Ok(())
    }

    /// The services, backends and source ranges of the old maps, written
    /// into the new ones through a capacity-aware plan from what the new
    /// maps hold (the maps not resized are adopted as they are).
    fn copy_services(&mut self, olds: Vec<(&'static str, MapData)>) -> Result<(), DatapathError> {
        self.live = self.read_contents()?;
        let mut old = self.live.clone();
        for (name, map) in olds {
            match name {
                map_names::SERVICES => {
                    let m: HashMap<MapData, ServiceKey, _> =
                        Map::HashMap(map).try_into().map_err(map_err(name))?;
                    old.services = read_hash(&m).map_err(map_err(name))?.into_iter().collect();
                }
                map_names::BACKENDS => {
                    let m: HashMap<MapData, u32, _> =
                        Map::HashMap(map).try_into().map_err(map_err(name))?;
                    old.backends = read_hash(&m).map_err(map_err(name))?.into_iter().collect();
                }
                _ => {
                    let m: LpmTrie<MapData, _, u8> =
                        Map::LpmTrie(map).try_into().map_err(map_err(name))?;
                    old.source_ranges = read_ranges(&m).map_err(map_err(name))?;
                }
            }
        }
        // A frontend whose Maglev table did not fit in a smaller map waits
        // for the first sync, which writes both.
        let tableless: Vec<ServiceKey> = old
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.uses_maglev() && !old.tables.contains_key(&v.svc_id))
            .map(|(k, _)| *k)
            .collect();
        old.services
            .retain(|k, _| !tableless.contains(&k.with_slot(0)));
        let room = self.capacity().room(&self.live);
        let plan = capacity::plan(&self.live, &old, None, room);
        let failed = self.apply(&plan.ops);
        tracing::info!(
            written = plan.ops.len() - failed.len(),
            left_to_the_first_sync = plan.held.len() + failed.len() + tableless.len(),
            "copied the services into the resized maps"
        );
        Ok(())
    }

    /// Once every link runs this process's programs: copies the conntrack
    /// entries the old programs made while this agent started into the
    /// resized conntrack maps, and lets the old maps go. Returns how many.
    pub fn finish_resize(&mut self) -> usize {
        std::mem::take(&mut self.old_conntrack)
            .into_iter()
            .map(|(name, old)| self.copy_conntrack(name, &old))
            .sum()
    }

    /// Copies `old`'s entries into this agent's conntrack map `name` where
    /// it has none for the key (up to its capacity: an LRU map evicts, it
    /// never refuses).
    fn copy_conntrack(&mut self, name: &str, old: &HashMap<MapData, CtKey, CtValue>) -> usize {
        let Some((_, new)) = self.conntrack.iter_mut().find(|(n, _)| *n == name) else {
            return 0;
        };
        let entries = read_hash(old).unwrap_or_default();
        entries
            .iter()
            .filter(|(k, v)| new.insert(k, v, NOEXIST).is_ok())
            .count()
    }
}
