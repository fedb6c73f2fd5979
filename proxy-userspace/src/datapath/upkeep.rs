//! Keeping the maps tidy between syncs, and reading what the datapath
//! counted: conntrack garbage collection, deleting UDP flows of removed
//! endpoints, pruning session affinity, and the counters.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, Traffic, map_names, proto, stat,
};

use super::{Datapath, DatapathError, ignore_missing, map_err, monotonic_ns};
use crate::contents::MapContents;

/// The maps the datapath writes itself and the agent only tidies or
/// reads: conntrack, session affinity and the counters. The agent's loop
/// owns this, beside the [`super::Hooks`]; the control plane never needs it.
pub struct Upkeep {
    /// The conntrack maps by name, as in `map_names::CONNTRACK` (TCP,
    /// every other protocol), and their real capacity.
    pub(super) conntrack: [(&'static str, HashMap<MapData, CtKey, CtValue>, u32); 2],
    /// The conntrack maps replaced by a resize (by name), until the old
    /// programs are switched off them.
    pub(super) old_conntrack: Vec<(&'static str, HashMap<MapData, CtKey, CtValue>)>,
    pub(super) affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub(super) stats: PerCpuArray<MapData, u64>,
    /// The settings the programs run with (conntrack timeouts).
    pub(super) settings: Config,
}

impl Datapath {
    /// Packets and bytes per frontend (svc id) and per backend id, summed
    /// over CPUs; ids without traffic are left out.
    pub fn traffic(&self) -> (BTreeMap<u32, Traffic>, BTreeMap<u32, Traffic>) {
        let svc_ids = self
            .live
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, v)| v.svc_id);
        (
            sum_traffic(&self.svc_traffic, svc_ids),
            sum_traffic(&self.backend_traffic, self.live.backends.keys().copied()),
        )
    }
}

impl Upkeep {
    /// Datapath counters summed over CPUs, indexed by `proxy_common::stat`.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], DatapathError> {
        sum_stats(&self.stats)
    }

    /// Every conntrack entry, of both maps (for inspection and tests).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        let mut all = Vec::new();
        for (name, map, _) in &self.conntrack {
            for entry in map.iter() {
                all.push(entry.map_err(map_err(name))?);
            }
        }
        Ok(all)
    }

    /// Deletes the flows idle past their timeout (the datapath already
    /// ignores them; this frees their space): both entries of a flow go
    /// together, once neither is in use (a one-way stream refreshes only
    /// one), and so does an entry whose other one is gone (a flow's
    /// entries are in the same map). Says how full each map is after.
    pub fn collect_conntrack(&mut self) -> Vec<CtSweep> {
        let now = monotonic_ns();
        let settings = self.settings;
        let mut sweeps = Vec::new();
        for (name, map, capacity) in &mut self.conntrack {
            let entries: std::collections::HashMap<CtKey, CtValue> =
                map.iter().filter_map(Result::ok).collect();
            let doomed: Vec<CtKey> = entries
                .iter()
                .filter(|(k, v)| {
                    v.expired(k, &settings, now) && {
                        let twin = v.twin_key(k);
                        entries
                            .get(&twin)
                            .is_none_or(|t| t.expired(&twin, &settings, now))
                    }
                })
                .map(|(k, _)| *k)
                .collect();
            let deleted = doomed
                .iter()
                .filter(|key| ignore_missing(map.remove(key)).is_ok())
                .count();
            sweeps.push(CtSweep {
                map: name,
                deleted,
                remaining: entries.len() - deleted,
                capacity: *capacity as usize,
            });
        }
        sweeps
    }

    /// Deletes at once the UDP flows of backends that were removed, so a
    /// client's next datagram is balanced to a live endpoint (kube-proxy's
    /// UDP stale-flow cleanup; stale UDP state is what black-holes DNS).
    /// TCP flows are left to end or expire. Returns how many entries.
    pub fn forget_udp_backends(&mut self, gone: &[Backend]) -> Result<usize, DatapathError> {
        let gone: Vec<&Backend> = gone.iter().filter(|b| b.proto == proto::UDP).collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.delete_conntrack(&[map_names::conntrack_of(proto::UDP)], |k, v| {
            gone.iter().any(|b| {
                k.proto == b.proto
                    && if v.is_reply() {
                        // saddr 0: a host endpoint's "from any node address"
                        // reply entry (the datapath's `any_node_address`);
                        // another host endpoint on the same port may lose
                        // its own, which only costs its odd-source answers.
                        (k.saddr == b.addr || k.saddr == 0) && k.sport == b.port
                    } else {
                        v.nat_addr == b.addr && v.nat_port == b.port
                    }
            })
        })
    }

    /// Deletes session-affinity entries that no longer hold: the frontend
    /// is gone or lost its affinity, or the endpoint left it (the datapath
    /// only checks that the backend still exists somewhere). Returns how
    /// many. `live`: what the services map holds.
    pub fn prune_affinity(&mut self, live: &MapContents) -> Result<usize, DatapathError> {
        let mut valid: std::collections::HashMap<u32, std::collections::HashSet<u32>> =
            std::collections::HashMap::new();
        for (key, value) in &live.services {
            if key.slot == 0 && value.affinity_timeout_s != 0 {
                let backends = (1..=value.count)
                    .filter_map(|slot| live.services.get(&key.with_slot(slot)))
                    .map(|v| v.backend_id)
                    .collect();
                valid.insert(value.svc_id, backends);
            }
        }
        Ok(delete_where(&mut self.affinity, |k, v| {
            !valid
                .get(&k.svc_id)
                .is_some_and(|b| b.contains(&v.backend_id))
        }))
    }

    /// Deletes every conntrack entry: established flows are chosen anew at
    /// their next packet (for tests and benchmarks that need a clean table).
    pub fn flush_conntrack(&mut self) -> Result<usize, DatapathError> {
        self.delete_conntrack(&map_names::CONNTRACK, |_, _| true)
    }

    /// Deletes the entries `doomed` picks in the conntrack maps named.
    fn delete_conntrack(
        &mut self,
        maps: &[&str],
        doomed: impl Fn(&CtKey, &CtValue) -> bool,
    ) -> Result<usize, DatapathError> {
        Ok(self
            .conntrack
            .iter_mut()
            .filter(|(name, _, _)| maps.contains(name))
            .map(|(_, map, _)| delete_where(map, &doomed))
            .sum())
    }
}

/// What a conntrack garbage collection left in one conntrack map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtSweep {
    pub map: &'static str,
    pub deleted: usize,
    pub remaining: usize,
    pub capacity: usize,
}

/// Free nodes the kernel's LRU hash map keeps per CPU (`LOCAL_FREE_TARGET`
/// in `kernel/bpf/bpf_lru_list.c`): when a CPU's run out it takes this many
/// more, evicting as many of the least recently used entries if the map
/// has no free ones. A full map can so show up to this many entries per
/// CPU fewer than its capacity.
const LRU_FREE_BATCH: usize = 128;

impl CtSweep {
    /// Within 10 % of its capacity (or of the LRU's free batches, in a
    /// small map on many CPUs) the LRU map is about to evict, or evicting,
    /// live flows (each new flow takes two entries): time to raise its
    /// capacity flag. A flood kept a 1,024-entry map on 2 CPUs under 90 %
    /// at every collection: the kernel had evicted a batch ahead.
    pub fn near_full(&self) -> bool {
        let cpus = aya::util::nr_cpus().map_or(1, |n| n);
        self.remaining + self.slack(cpus) >= self.capacity
    }

    /// Entries a map this full may show free, on `cpus` CPUs.
    fn slack(&self, cpus: usize) -> usize {
        (LRU_FREE_BATCH * cpus).clamp(self.capacity / 10, self.capacity / 2)
    }
}

/// Deletes the entries of `map` that `doomed` picks; returns how many went.
/// An entry already gone (LRU eviction, a concurrent delete) is fine.
fn delete_where<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    doomed: impl Fn(&K, &V) -> bool,
) -> usize {
    let keys: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| doomed(k, v))
        .map(|(k, _)| k)
        .collect();
    keys.iter()
        .filter(|key| ignore_missing(map.remove(key)).is_ok())
        .count()
}

/// The traffic counted for `ids` in a per-CPU traffic array (indexed by
/// id), summed over CPUs; ids without traffic (or past the array) are left
/// out. Only ids in use are read: one lookup each.
pub fn sum_traffic(
    map: &PerCpuArray<MapData, Traffic>,
    ids: impl IntoIterator<Item = u32>,
) -> BTreeMap<u32, Traffic> {
    ids.into_iter()
        .filter_map(|id| {
            let per_cpu = map.get(&id, 0).ok()?;
            let total = per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets + t.packets,
                bytes: a.bytes + t.bytes,
            });
            (total.packets != 0).then_some((id, total))
        })
        .collect()
}

/// Zeroes `id`'s counters (it is no longer in use and may be handed to
/// another frontend or backend). An id past the array has none.
pub fn clear_traffic(map: &mut PerCpuArray<MapData, Traffic>, id: u32) {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n);
    if let Ok(zero) = PerCpuValues::try_from(vec![Traffic::default(); cpus]) {
        let _ = map.set(id, zero, 0);
    }
}

fn sum_stats(
    stats: &PerCpuArray<MapData, u64>,
) -> Result<[u64; stat::COUNT as usize], DatapathError> {
    let mut out = [0u64; stat::COUNT as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let per_cpu = stats
            .get(&(i as u32), 0)
            .map_err(map_err(map_names::STATS))?;
        *slot = per_cpu.iter().sum();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(remaining: usize, capacity: usize) -> CtSweep {
        CtSweep {
            map: map_names::CONNTRACK_OTHER,
            deleted: 0,
            remaining,
            capacity,
        }
    }

    #[test]
    fn a_big_map_is_near_full_at_90_percent() {
        assert_eq!(sweep(235_930, 262_144).slack(2), 26_214);
        assert_eq!(sweep(0, 262_144).slack(64), 26_214);
    }

    #[test]
    fn a_small_map_allows_for_the_lru_free_batches() {
        // 1,024 entries on 2 CPUs: a full map may read 768.
        assert_eq!(sweep(0, 1024).slack(2), 256);
        // Never more than half: an empty map is not near full.
        assert_eq!(sweep(0, 1024).slack(64), 512);
    }
}
