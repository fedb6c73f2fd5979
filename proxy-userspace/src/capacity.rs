//! What fits in the maps: the room each has left, and an order of the
//! diff's ops that never asks a full map for a new entry.
//!
//! [`diff`] writes everything new before it deletes anything old, so a map
//! near capacity fails the update: with `--backends-max 8`, replacing a
//! Service's endpoints failed the new backends' writes, the slots were
//! pointed at them anyway, the old ones were deleted, and the Service had no
//! working endpoint until the next resync. When the diff's new entries fit,
//! its order is kept as it is. When they do not, [`plan`] orders the same
//! ops so that
//!
//! - what nothing uses any more goes first (removed frontends, their slots,
//!   tables, ranges, and the backends only they used);
//! - each frontend (a services-map entry) is changed as a unit, and only
//!   when all the new entries it needs fit, so a Service too big for its map
//!   does not fill it with slots that can never be used, and every Service
//!   after it is still programmed;
//! - within a frontend, make-before-break still holds slot by slot: a slot
//!   is pointed at a new backend only once that backend is written, and the
//!   backend it leaves is deleted as soon as nothing points at it, so
//!   endpoints are replaced a few at a time through whatever room there is
//!   (at least one free entry, or the old and new would overlap nowhere);
//! - a frontend that does not fit is left as it is (consistent, its old
//!   endpoints serving) and reported in [`Plan::held`], to be tried again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proxy_common::{ServiceValue, map_names};

use crate::contents::{Footprint, MapContents, RangeEntry, SvcKey};
use crate::diff::{MapOp, diff};

/// Entries each map the agent writes can still take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Room {
    pub services: usize,
    pub backends: usize,
    pub tables: usize,
    pub source_ranges: usize,
}

/// Maximum entries of each map the agent writes (the maps' real
/// `max_entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub tables: u32,
    pub source_ranges: u32,
}

impl Capacity {
    /// Room left when the maps hold `live` (all of it, not a restriction).
    pub fn room(&self, live: &MapContents) -> Room {
        let left = |cap: u32, used: usize| (cap as usize).saturating_sub(used);
        Room {
            services: left(self.services, live.services.len()),
            backends: left(self.backends, live.backends.len()),
            tables: left(self.tables, live.tables.len()),
            source_ranges: left(self.source_ranges, live.source_ranges.len()),
        }
    }
}

/// A frontend left as it is because a map has no room for what it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Its services-map entry (slot 0).
    pub frontend: SvcKey,
    /// The map that is short, and its capacity flag.
    pub map: &'static str,
    pub flag: &'static str,
    /// New entries it needs there, and how many are free.
    pub needed: usize,
    pub free: usize,
}

/// The ops to apply, in order, and what they leave undone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    pub held: Vec<Held>,
    /// Ops of the diff the plan leaves out (to be retried).
    pub pending: Vec<MapOp>,
}

/// Passes over the frontends: a frontend held in one may fit in the next,
/// once others freed room.
const PASSES: usize = 4;

/// The ops turning `live` into `desired` that fit in `room` (what the maps
/// have left), over the keys `keys` only (a change's footprint) or over
/// everything.
pub fn plan(
    live: &MapContents,
    desired: &MapContents,
    keys: Option<&Footprint>,
    room: Room,
) -> Plan {
    let ops = match keys {
        Some(keys) => diff(&live.restricted(keys), &desired.restricted(keys)),
        None => diff(live, desired),
    };
    if fits(live, &ops, room) {
        return Plan {
            ops,
            ..Plan::default()
        };
    }
    // The ordering below looks backends up by the slots and tables that
    // point at them, so a restriction must hold those too.
    let views = keys.map(|keys| {
        let mut keys = keys.clone();
        for contents in [live, desired] {
            let part = contents.restricted(&keys);
            keys.backends.extend(
                part.services
                    .iter()
                    .filter(|(k, _)| k.slot != 0)
                    .map(|(_, v)| v.backend_id)
                    .chain(
                        part.tables
                            .values()
                            .flat_map(|t| t.backends().iter().map(|b| b.id)),
                    ),
            );
        }
        (live.restricted(&keys), desired.restricted(&keys))
    });
    let (live, desired) = match &views {
        Some((l, d)) => (l, d),
        None => (live, desired),
    };
    let mut sim = Sim::new(live, desired, room);
    sim.free_unused();
    let mut held = Vec::new();
    for _ in 0..PASSES {
        held.clear();
        let before = sim.ops.len();
        for frontend in sim.changed_frontends() {
            if let Err(h) = sim.change(frontend) {
                held.push(h);
            }
        }
        sim.free_unused();
        if held.is_empty() || sim.ops.len() == before {
            break;
        }
    }
    let pending = diff(&sim.state, desired);
    Plan {
        ops: sim.ops,
        held,
        pending,
    }
}

/// Whether the new keys `ops` write fit in `room`.
fn fits(live: &MapContents, ops: &[MapOp], room: Room) -> bool {
    let mut need = Room::default();
    for op in ops {
        match op {
            MapOp::PutService(k, _) if !live.services.contains_key(k) => need.services += 1,
            MapOp::PutBackend(id, _) if !live.backends.contains_key(id) => need.backends += 1,
            MapOp::PutTable(id, _) if !live.tables.contains_key(id) => need.tables += 1,
            MapOp::PutSourceRange(_) => need.source_ranges += 1,
            _ => {}
        }
    }
    need.services <= room.services
        && need.backends <= room.backends
        && need.tables <= room.tables
        && need.source_ranges <= room.source_ranges
}

/// The maps as the ops so far leave them, with the room left and who
/// points at each backend.
struct Sim<'a> {
    state: MapContents,
    desired: &'a MapContents,
    room: Room,
    /// Slots and tables pointing at each backend id.
    refs: HashMap<u32, usize>,
    ops: Vec<MapOp>,
}

impl<'a> Sim<'a> {
    fn new(live: &MapContents, desired: &'a MapContents, room: Room) -> Self {
        let mut refs: HashMap<u32, usize> = HashMap::new();
        for (key, value) in &live.services {
            if key.slot != 0 {
                *refs.entry(value.backend_id).or_default() += 1;
            }
        }
        for table in live.tables.values() {
            for b in table.backends() {
                *refs.entry(b.id).or_default() += 1;
            }
        }
        Self {
            state: live.clone(),
            desired,
            room,
            refs,
            ops: Vec::new(),
        }
    }

    fn refer(&mut self, id: u32, by: isize) {
        let n = self.refs.entry(id).or_default();
        *n = n.saturating_add_signed(by);
    }

    /// Frontends (slot-0 keys) whose desired entries differ from the state.
    fn changed_frontends(&self) -> Vec<SvcKey> {
        let differs = |key: &SvcKey, value: &ServiceValue| {
            if self.state.services.get(key) != Some(value) {
                return true;
            }
            let slots = (1..=value.count).any(|s| {
                let k = key.with_slot(s);
                self.state.services.get(&k) != self.desired.services.get(&k)
            });
            let missing = (1..=value.count).any(|s| {
                self.desired
                    .services
                    .get(&key.with_slot(s))
                    .is_some_and(|v| !self.state.backends.contains_key(&v.backend_id))
            });
            let id = value.svc_id;
            slots
                || missing
                || self.state.tables.get(&id) != self.desired.tables.get(&id)
                || !self.state.ranges_of(id).eq(self.desired.ranges_of(id))
        };
        self.desired
            .services
            .iter()
            .filter(|(key, value)| key.slot == 0 && differs(key, value))
            .map(|(key, _)| *key)
            .collect()
    }

    /// Deletes what nothing desired uses and nothing points at: removed
    /// frontends (slot 0 first, so the datapath stops reading the rest),
    /// their slots, tables and ranges, stray slots, and unused backends.
    fn free_unused(&mut self) {
        let removed: Vec<(SvcKey, u32)> = self
            .state
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0 && !self.desired.services.contains_key(k))
            .map(|(k, v)| (*k, v.svc_id))
            .collect();
        for (key, _) in &removed {
            self.delete_service(*key);
        }
        let stray: Vec<SvcKey> = self
            .state
            .services
            .keys()
            .filter(|k| {
                k.slot != 0
                    && !self.desired.services.contains_key(k)
                    && self
                        .state
                        .services
                        .get(&k.with_slot(0))
                        .is_none_or(|v| v.count < k.slot)
            })
            .copied()
            .collect();
        for key in stray {
            self.delete_service(key);
        }
        let in_use: BTreeSet<u32> = self
            .state
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.svc_id != 0)
            .map(|(_, v)| v.svc_id)
            .collect();
        let tables: Vec<u32> = self
            .state
            .tables
            .keys()
            .filter(|id| !self.desired.tables.contains_key(id) && !in_use.contains(id))
            .copied()
            .collect();
        for id in tables {
            self.delete_table(id);
        }
        let ranges: Vec<RangeEntry> = self
            .state
            .source_ranges
            .difference(&self.desired.source_ranges)
            .filter(|r| !in_use.contains(&r.svc_id))
            .copied()
            .collect();
        for r in ranges {
            self.delete_range(r);
        }
        let backends: Vec<u32> = self.state.backends.keys().copied().collect();
        for id in backends {
            self.free_backend(id);
        }
        // Rewrites of existing backends take no room and break nothing.
        let rewrites: Vec<u32> = self
            .desired
            .backends
            .iter()
            .filter(|(id, b)| self.state.backends.get(id).is_some_and(|old| old != *b))
            .map(|(id, _)| *id)
            .collect();
        for id in rewrites {
            self.put_backend(id);
        }
    }

    /// Changes one frontend to its desired entries, if all it needs fits;
    /// otherwise changes nothing and says what is short.
    fn change(&mut self, frontend: SvcKey) -> Result<(), Held> {
        let want = self.desired.services[&frontend];
        let have = self.state.services.get(&frontend).copied();
        let slots: Vec<(SvcKey, ServiceValue)> = (1..=want.count)
            .map(|s| {
                let k = frontend.with_slot(s);
                (k, self.desired.services[&k])
            })
            .collect();
        let table = want
            .uses_maglev()
            .then(|| self.desired.tables.get(&want.svc_id))
            .flatten();
        let ranges: Vec<RangeEntry> = self
            .desired
            .ranges_of(want.svc_id)
            .filter(|r| !self.state.source_ranges.contains(r))
            .copied()
            .collect();

        // What it needs.
        let new_keys = slots
            .iter()
            .map(|(k, _)| k)
            .chain([&frontend])
            .filter(|k| !self.state.services.contains_key(k))
            .count();
        let mut new_backends: BTreeSet<u32> = slots
            .iter()
            .map(|(_, v)| v.backend_id)
            .chain(table.iter().flat_map(|t| t.backends().iter().map(|b| b.id)))
            .filter(|id| !self.state.backends.contains_key(id))
            .collect();
        let new_table = table.is_some() && !self.state.tables.contains_key(&want.svc_id);
        // Backends only this frontend points at and nobody wants: each is
        // freed once its slot moves on.
        let mut own: BTreeMap<u32, usize> = BTreeMap::new();
        if let Some(have) = have {
            for s in 1..=have.count {
                if let Some(v) = self.state.services.get(&frontend.with_slot(s)) {
                    *own.entry(v.backend_id).or_default() += 1;
                }
            }
            if let Some(t) = self.state.tables.get(&have.svc_id) {
                for b in t.backends() {
                    *own.entry(b.id).or_default() += 1;
                }
            }
        }
        let freed = own
            .iter()
            .filter(|(id, n)| {
                !self.desired.backends.contains_key(id) && self.refs.get(id) == Some(n)
            })
            .count();
        let held = |map, flag, needed, free| Held {
            frontend,
            map,
            flag,
            needed,
            free,
        };
        if new_keys > self.room.services {
            return Err(held(
                map_names::SERVICES,
                "--services-max",
                new_keys,
                self.room.services,
            ));
        }
        if usize::from(new_table) > self.room.tables {
            return Err(held(map_names::MAGLEV, "--maglev-max", 1, 0));
        }
        if ranges.len() > self.room.source_ranges {
            return Err(held(
                map_names::SOURCE_RANGES,
                "--source-ranges-max",
                ranges.len(),
                self.room.source_ranges,
            ));
        }
        // A table needs every backend at once; slots can take them a few at
        // a time, freeing old ones on the way, but need room to start.
        let backends_fit = if table.is_some() {
            new_backends.len() <= self.room.backends
        } else {
            new_backends.is_empty()
                || (self.room.backends > 0 && new_backends.len() <= self.room.backends + freed)
        };
        if !backends_fit {
            return Err(held(
                map_names::BACKENDS,
                "--backends-max",
                new_backends.len(),
                self.room.backends,
            ));
        }

        for r in ranges {
            self.put_range(r);
        }
        if let Some(table) = table
            && self.state.tables.get(&want.svc_id) != Some(table)
        {
            for b in table.backends() {
                if new_backends.remove(&b.id) {
                    self.put_backend(b.id);
                }
            }
            self.put_table(want.svc_id, table.clone());
        }
        // Slots already right whose backend went missing (a map edited by
        // hand) get it back first.
        for (key, value) in &slots {
            if self.state.services.get(key) == Some(value)
                && new_backends.remove(&value.backend_id)
                && self.room.backends > 0
            {
                self.put_backend(value.backend_id);
            }
        }
        // Slots whose backend exists first (they free old ones), then one
        // new backend at a time.
        let mut pending: Vec<(SvcKey, ServiceValue)> = slots
            .into_iter()
            .filter(|(k, v)| self.state.services.get(k) != Some(v))
            .collect();
        while !pending.is_empty() {
            let ready = pending
                .iter()
                .position(|(_, v)| self.state.backends.contains_key(&v.backend_id));
            let at = match ready {
                Some(at) => at,
                None if self.room.backends > 0 => {
                    // Where the backend left behind is freed by the move,
                    // so the room comes back for the next one.
                    let at = pending
                        .iter()
                        .position(|(k, _)| {
                            self.state.services.get(k).is_some_and(|old| {
                                !self.desired.backends.contains_key(&old.backend_id)
                                    && self.refs.get(&old.backend_id) == Some(&1)
                            })
                        })
                        .unwrap_or(0);
                    self.put_backend(pending[at].1.backend_id);
                    at
                }
                // Cannot happen when the needs were counted right; the
                // state is consistent either way, and the rest waits.
                None => break,
            };
            let (key, value) = pending.remove(at);
            let old = self.state.services.get(&key).map(|v| v.backend_id);
            self.put_service(key, value);
            if let Some(old) = old {
                self.free_backend(old);
            }
        }
        let covered = (1..=want.count).all(|s| {
            self.state.services.get(&frontend.with_slot(s))
                == self.desired.services.get(&frontend.with_slot(s))
        });
        if !covered {
            return Err(held(
                map_names::BACKENDS,
                "--backends-max",
                new_backends.len(),
                self.room.backends,
            ));
        }
        if have != Some(want) {
            self.put_service(frontend, want);
        }
        // What the frontend no longer uses.
        if let Some(have) = have {
            for s in want.count + 1..=have.count {
                let key = frontend.with_slot(s);
                if let Some(old) = self.state.services.get(&key).map(|v| v.backend_id) {
                    self.delete_service(key);
                    self.free_backend(old);
                }
            }
            let old_table = have.svc_id != want.svc_id || !want.uses_maglev();
            if old_table && !self.desired.tables.contains_key(&have.svc_id) {
                self.delete_table(have.svc_id);
            }
        }
        for svc_id in [Some(want.svc_id), have.map(|h| h.svc_id)]
            .into_iter()
            .flatten()
        {
            let gone: Vec<RangeEntry> = self
                .state
                .ranges_of(svc_id)
                .filter(|r| !self.desired.source_ranges.contains(r))
                .copied()
                .collect();
            for r in gone {
                self.delete_range(r);
            }
        }
        Ok(())
    }

    fn emit(&mut self, op: MapOp) {
        self.ops.push(op);
    }

    fn put_backend(&mut self, id: u32) {
        let b = self.desired.backends[&id];
        if self.state.backends.insert(id, b).is_none() {
            self.room.backends -= 1;
        }
        self.emit(MapOp::PutBackend(id, b));
    }

    /// Deletes backend `id` if nothing desired uses it and nothing points
    /// at it.
    fn free_backend(&mut self, id: u32) {
        let unused = !self.desired.backends.contains_key(&id)
            && self.refs.get(&id).copied().unwrap_or(0) == 0
            && self.state.backends.remove(&id).is_some();
        if unused {
            self.room.backends += 1;
            self.emit(MapOp::DeleteBackend(id));
        }
    }

    fn put_service(&mut self, key: SvcKey, value: ServiceValue) {
        let old = self.state.services.insert(key, value);
        if old.is_none() {
            self.room.services -= 1;
        }
        if key.slot != 0 {
            if let Some(old) = old {
                self.refer(old.backend_id, -1);
            }
            self.refer(value.backend_id, 1);
        }
        self.emit(MapOp::PutService(key, value));
    }

    fn delete_service(&mut self, key: SvcKey) {
        if let Some(old) = self.state.services.remove(&key) {
            self.room.services += 1;
            if key.slot != 0 {
                self.refer(old.backend_id, -1);
            }
            self.emit(MapOp::DeleteService(key));
        }
    }

    fn put_table(&mut self, svc_id: u32, table: crate::maglev::TableSpec) {
        for b in table.backends() {
            self.refer(b.id, 1);
        }
        match self.state.tables.insert(svc_id, table.clone()) {
            Some(old) => {
                for b in old.backends() {
                    self.refer(b.id, -1);
                }
            }
            None => self.room.tables -= 1,
        }
        self.emit(MapOp::PutTable(svc_id, table));
    }

    fn delete_table(&mut self, svc_id: u32) {
        if let Some(old) = self.state.tables.remove(&svc_id) {
            self.room.tables += 1;
            for b in old.backends() {
                self.refer(b.id, -1);
            }
            self.emit(MapOp::DeleteTable(svc_id));
        }
    }

    fn put_range(&mut self, r: RangeEntry) {
        if self.state.source_ranges.insert(r) {
            self.room.source_ranges -= 1;
            self.emit(MapOp::PutSourceRange(r));
        }
    }

    fn delete_range(&mut self, r: RangeEntry) {
        if self.state.source_ranges.remove(&r) {
            self.room.source_ranges += 1;
            self.emit(MapOp::DeleteSourceRange(r));
        }
    }
}
