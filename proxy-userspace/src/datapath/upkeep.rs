//! Keeping the maps tidy between syncs, and reading what the datapath
//! counted: conntrack garbage collection, deleting UDP flows of removed
//! endpoints, pruning session affinity, and the counters.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use proxy_common::{Backend, CtKey, CtValue, Traffic, map_names, stat};

use super::{Datapath, DatapathError, ignore_missing, map_err, monotonic_ns};

impl Datapath {
    /// Datapath counters summed over CPUs, indexed by `proxy_common::stat`.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], DatapathError> {
        sum_stats(&self.stats)
    }

    /// Packets and bytes per frontend (svc id) and per backend id, summed
    /// over CPUs.
    pub fn traffic(&self) -> (BTreeMap<u32, Traffic>, BTreeMap<u32, Traffic>) {
        (
            sum_traffic(&self.svc_traffic),
            sum_traffic(&self.backend_traffic),
        )
    }

    /// Every conntrack entry (for inspection and tests).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        self.conntrack
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::CONNTRACK))
    }

    /// Deletes conntrack entries idle past their timeout (the datapath
    /// already ignores them; this frees their space). Returns how many.
    pub fn collect_conntrack(&mut self) -> Result<usize, DatapathError> {
        let now = monotonic_ns();
        let settings = self.settings;
        self.delete_conntrack(|k, v| v.expired(k, &settings, now))
    }

    /// Deletes at once the UDP flows of backends that were removed, so a
    /// client's next datagram is balanced to a live endpoint (kube-proxy's
    /// UDP stale-flow cleanup; stale UDP state is what black-holes DNS).
    /// TCP flows are left to end or expire. Returns how many entries.
    pub fn forget_udp_backends(&mut self, gone: &[Backend]) -> Result<usize, DatapathError> {
        let gone: Vec<&Backend> = gone
            .iter()
            .filter(|b| b.proto == proxy_common::proto::UDP)
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.delete_conntrack(|k, v| {
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
    /// many.
    pub fn prune_affinity(&mut self) -> Result<usize, DatapathError> {
        let mut valid: std::collections::HashMap<u32, std::collections::HashSet<u32>> =
            std::collections::HashMap::new();
        for (key, value) in &self.live.services {
            if key.slot == 0 && value.affinity_timeout_s != 0 {
                let backends = (1..=value.count)
                    .filter_map(|slot| self.live.services.get(&key.with_slot(slot)))
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
        self.delete_conntrack(|_, _| true)
    }

    fn delete_conntrack(
        &mut self,
        doomed: impl Fn(&CtKey, &CtValue) -> bool,
    ) -> Result<usize, DatapathError> {
        Ok(delete_where(&mut self.conntrack, doomed))
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

/// A per-CPU traffic map's entries, summed over CPUs.
pub fn sum_traffic(map: &PerCpuHashMap<MapData, u32, Traffic>) -> BTreeMap<u32, Traffic> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(id, per_cpu)| {
            let total = per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets + t.packets,
                bytes: a.bytes + t.bytes,
            });
            (id, total)
        })
        .collect()
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
