//! What operators reach for first: the pinned maps of a running agent, read
//! without loading anything or talking to the API server, as tables or
//! JSON. Reading is in [`Pinned`]; the views are pure functions of what was
//! read, so they are tested without root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray};
use proxy_common::{
    Addr6, AffinityKey, AffinityValue, Backend, Backend6, CtKey, CtValue, ServiceKey, ServiceKey6,
    ServiceValue, SourceRangeOf, Traffic, map_names, proto, scope, stat,
};
use serde::Serialize;

use crate::{
    contents::{
        AnyBackend, MapAddr, MapContents, RangeEntry, SvcKey, addr_from_map, backend4, backend6,
        ip_from_map, port_from_map, svc_key4, svc_key6,
    },
    datapath::{DatapathError, maps_dir, monotonic_ns, read_ranges, sum_traffic},
};

/// Everything read from the pinned maps at one moment.
pub struct Pinned {
    /// Both families' (`kep_services`, `kep_services6`).
    pub services: Vec<(SvcKey, ServiceValue)>,
    /// Both families' (`kep_backends`, `kep_backends6`).
    pub backends: Vec<(u32, AnyBackend)>,
    pub conntrack: Vec<(CtKey, CtValue)>,
    pub affinity: Vec<(AffinityKey, AffinityValue)>,
    /// loadBalancerSourceRanges, by svc id.
    pub source_ranges: BTreeSet<RangeEntry>,
    /// Per frontend (svc id) and per backend id.
    pub svc_traffic: BTreeMap<u32, Traffic>,
    pub backend_traffic: BTreeMap<u32, Traffic>,
    pub stats: [u64; stat::COUNT as usize],
    /// Map name -> (entries, capacity).
    pub capacity: BTreeMap<&'static str, (usize, u32)>,
    pub now_ns: u64,
}

fn open(bpffs: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(maps_dir(bpffs).join(name)).map_err(|source| DatapathError::Map {
        name,
        source: Box::new(source),
    })
}

/// The allowed prefixes of a pinned source-ranges trie of either family
/// (read as the agent reads its own, by [`read_ranges`]).
fn read_pinned_ranges<A: Copy>(
    bpffs: &Path,
    name: &'static str,
    family: fn(A) -> MapAddr,
) -> Result<BTreeSet<RangeEntry>, DatapathError>
where
    SourceRangeOf<A>: aya::Pod,
{
    let err = |source| DatapathError::Map {
        name,
        source: Box::new(source),
    };
    let trie: LpmTrie<MapData, SourceRangeOf<A>, u8> =
        Map::LpmTrie(open(bpffs, name)?).try_into().map_err(err)?;
    read_ranges(&trie, family).map_err(err)
}

fn read_hash<K: aya::Pod + Default, V: aya::Pod + Default>(
    bpffs: &Path,
    name: &'static str,
    lru: bool,
) -> Result<(Vec<(K, V)>, u32), DatapathError> {
    let data = open(bpffs, name)?;
    let err = |source| DatapathError::Map {
        name,
        source: Box::new(source),
    };
    let max = data.info().map_err(err)?.max_entries();
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    let map: HashMap<MapData, K, V> = map.try_into().map_err(err)?;
    let entries = crate::datapath::read_hash(&map).map_err(err)?;
    Ok((entries, max))
}

impl Pinned {
    pub fn read(bpffs: &Path) -> Result<Self, DatapathError> {
        let (services4, svc_max): (Vec<(ServiceKey, ServiceValue)>, _) =
            read_hash(bpffs, map_names::SERVICES, false)?;
        let (services6, svc6_max): (Vec<(ServiceKey6, ServiceValue)>, _) =
            read_hash(bpffs, map_names::SERVICES6, false)?;
        let (backends4, be_max): (Vec<(u32, Backend)>, _) =
            read_hash(bpffs, map_names::BACKENDS, false)?;
        let (backends6, be6_max): (Vec<(u32, Backend6)>, _) =
            read_hash(bpffs, map_names::BACKENDS6, false)?;
        let fills = [
            (map_names::SERVICES, (services4.len(), svc_max)),
            (map_names::SERVICES6, (services6.len(), svc6_max)),
            (map_names::BACKENDS, (backends4.len(), be_max)),
            (map_names::BACKENDS6, (backends6.len(), be6_max)),
        ];
        let services: Vec<(SvcKey, ServiceValue)> = services4
            .into_iter()
            .map(|(k, v)| (svc_key4(k), v))
            .chain(services6.into_iter().map(|(k, v)| (svc_key6(k), v)))
            .collect();
        let backends: Vec<(u32, AnyBackend)> = backends4
            .into_iter()
            .map(|(id, b)| (id, backend4(b)))
            .chain(backends6.into_iter().map(|(id, b)| (id, backend6(b))))
            .collect();
        let mut conntrack = Vec::new();
        let mut ct_fill = Vec::new();
        for name in map_names::CONNTRACK {
            let (entries, max): (Vec<(CtKey, CtValue)>, _) = read_hash(bpffs, name, true)?;
            ct_fill.push((name, (entries.len(), max)));
            conntrack.extend(entries);
        }
        let (affinity, aff_max) = read_hash(bpffs, map_names::AFFINITY, true)?;
        let mut source_ranges =
            read_pinned_ranges::<u32>(bpffs, map_names::SOURCE_RANGES, MapAddr::V4)?;
        source_ranges.extend(read_pinned_ranges::<Addr6>(
            bpffs,
            map_names::SOURCE_RANGES6,
            MapAddr::V6,
        )?);
        let stats_map: PerCpuArray<MapData, u64> = Map::PerCpuArray(open(bpffs, map_names::STATS)?)
            .try_into()
            .map_err(|source| DatapathError::Map {
                name: map_names::STATS,
                source: Box::new(source),
            })?;
        let traffic = |name: &'static str,
                       ids: &mut dyn Iterator<Item = u32>|
         -> Result<BTreeMap<u32, Traffic>, DatapathError> {
            let map: PerCpuArray<MapData, Traffic> = Map::PerCpuArray(open(bpffs, name)?)
                .try_into()
                .map_err(|source| DatapathError::Map {
                    name,
                    source: Box::new(source),
                })?;
            Ok(sum_traffic(&map, ids))
        };
        let svc_traffic = traffic(
            map_names::SVC_TRAFFIC,
            &mut services
                .iter()
                .filter(|(k, _)| k.slot == 0)
                .map(|(_, v)| v.svc_id),
        )?;
        let backend_traffic = traffic(
            map_names::BACKEND_TRAFFIC,
            &mut backends.iter().map(|(id, _)| *id),
        )?;
        let mut stats = [0u64; stat::COUNT as usize];
        for (i, slot) in stats.iter_mut().enumerate() {
            if let Ok(per_cpu) = stats_map.get(&(i as u32), 0) {
                *slot = per_cpu.iter().sum();
            }
        }
        let mut capacity = BTreeMap::from(fills);
        capacity.insert(map_names::AFFINITY, (affinity.len(), aff_max));
        capacity.extend(ct_fill);
        Ok(Self {
            services,
            backends,
            conntrack,
            affinity,
            source_ranges,
            svc_traffic,
            backend_traffic,
            stats,
            capacity,
            now_ns: monotonic_ns(),
        })
    }

    /// What the agent would have written for `contents`, as if read back
    /// from the maps (no flows, no traffic yet): the views of what the
    /// encoder produced, without a kernel.
    pub fn of_contents(contents: &MapContents) -> Self {
        Self {
            services: contents.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: contents.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            conntrack: Vec::new(),
            affinity: Vec::new(),
            source_ranges: contents.source_ranges.clone(),
            svc_traffic: BTreeMap::new(),
            backend_traffic: BTreeMap::new(),
            stats: [0; stat::COUNT as usize],
            capacity: BTreeMap::new(),
            now_ns: 0,
        }
    }
}

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

fn endpoint(addr: u32, port: u16) -> String {
    format!("{}:{}", addr_from_map(addr), port_from_map(port))
}

/// `10.0.0.1:80` or `[fd00::1]:80`.
fn endpoint_of(addr: MapAddr, port: u16) -> String {
    SocketAddr::new(ip_from_map(addr), port_from_map(port)).to_string()
}

/// One frontend as operators think of it: VIP:port/proto -> backends.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceView {
    pub frontend: String,
    /// Which traffic the entry serves: `all`, or `external` (from outside
    /// the node, to a frontend whose external traffic is handled apart).
    pub scope: String,
    pub svc_id: u32,
    /// `reject`/`drop` when it has no endpoint; empty otherwise.
    pub empty: String,
    /// How new flows pick a backend: `maglev` (its table) or `random`.
    pub selection: String,
    /// The entry's other `SVC_FLAG_*` bits, by name.
    pub flags: Vec<String>,
    pub affinity_timeout_s: u32,
    /// Client prefixes let in (loadBalancerSourceRanges); `0.0.0.0/32` is
    /// the node's own sockets.
    pub source_ranges: Vec<String>,
    pub backends: Vec<String>,
    /// Both directions of its translated flows.
    pub packets: u64,
    pub bytes: u64,
}

/// Names of the flags not shown in their own column.
fn flag_names(v: &ServiceValue) -> Vec<String> {
    [
        (v.has_external_scope(), "external-scope"),
        (v.masquerades(), "masquerade"),
        (v.checks_source_ranges(), "source-ranges"),
        (v.on_node_address(), "node-address"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_string())
    .collect()
}

pub fn services(p: &Pinned) -> Vec<ServiceView> {
    let slots: BTreeMap<SvcKey, u32> = p
        .services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(k, v)| (*k, v.backend_id))
        .collect();
    let backends: BTreeMap<u32, AnyBackend> = p.backends.iter().copied().collect();
    let mut entries: Vec<&(SvcKey, ServiceValue)> = p
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0 && k.port != 0)
        .collect();
    // By address, port and protocol as numbers, as an operator reads them.
    entries.sort_by_key(|(k, _)| (ip_from_map(k.addr), port_from_map(k.port), k.proto, k.scope));
    entries
        .into_iter()
        .map(|(k, v)| ServiceView {
            frontend: format!("{}/{}", endpoint_of(k.addr, k.port), proto_name(k.proto)),
            scope: match k.scope {
                scope::ALL => "all".into(),
                scope::EXTERNAL => "external".into(),
                other => other.to_string(),
            },
            svc_id: v.svc_id,
            empty: if v.count > 0 {
                String::new()
            } else if v.drops() {
                "drop".into()
            } else {
                "reject".into()
            },
            selection: if v.uses_maglev() { "maglev" } else { "random" }.into(),
            flags: flag_names(v),
            affinity_timeout_s: v.affinity_timeout_s,
            source_ranges: p
                .source_ranges
                .iter()
                .filter(|r| r.svc_id == v.svc_id)
                .map(|r| format!("{}/{}", r.addr, r.prefix_len))
                .collect(),
            backends: (1..=v.count)
                .map(|slot| {
                    match slots
                        .get(&k.with_slot(slot))
                        .and_then(|id| backends.get(id))
                    {
                        Some(b) => endpoint_of(b.addr, b.port),
                        None => format!("<slot {slot} missing>"),
                    }
                })
                .collect(),
            packets: p.svc_traffic.get(&v.svc_id).map_or(0, |t| t.packets),
            bytes: p.svc_traffic.get(&v.svc_id).map_or(0, |t| t.bytes),
        })
        .collect()
}

/// The services view as table rows (header first); `traffic` adds the
/// packet and byte counters.
pub fn services_rows(views: &[ServiceView], traffic: bool) -> Vec<Vec<String>> {
    let mut header = vec![
        "frontend",
        "scope",
        "svc",
        "selection",
        "affinity_s",
        "no endpoints",
        "flags",
        "source ranges",
    ];
    if traffic {
        header.extend(["packets", "bytes"]);
    }
    header.push("backends");
    let mut rows = vec![header.into_iter().map(String::from).collect()];
    rows.extend(views.iter().map(|x| {
        let mut row = vec![
            x.frontend.clone(),
            x.scope.clone(),
            x.svc_id.to_string(),
            x.selection.clone(),
            x.affinity_timeout_s.to_string(),
            x.empty.clone(),
            x.flags.join(","),
            x.source_ranges.join(","),
        ];
        if traffic {
            row.extend([x.packets.to_string(), x.bytes.to_string()]);
        }
        row.push(x.backends.join(","));
        row
    }));
    rows
}

/// Cluster IPs, each with its port-less entry: traffic to one on a port or
/// protocol no Service serves is rejected.
pub fn cluster_ips(p: &Pinned) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = p
        .services
        .iter()
        .filter(|(k, _)| k.port == 0 && k.slot == 0)
        .map(|(k, _)| ip_from_map(k.addr))
        .collect();
    out.sort();
    out
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub endpoint: String,
    pub proto: String,
    pub packets: u64,
    pub bytes: u64,
}

pub fn backends(p: &Pinned) -> Vec<BackendView> {
    let mut out: Vec<BackendView> = p
        .backends
        .iter()
        .map(|(id, b)| BackendView {
            id: *id,
            endpoint: endpoint_of(b.addr, b.port),
            proto: proto_name(b.proto),
            packets: p.backend_traffic.get(id).map_or(0, |t| t.packets),
            bytes: p.backend_traffic.get(id).map_or(0, |t| t.bytes),
        })
        .collect();
    out.sort_by_key(|b| b.id);
    out
}

/// The backends view as table rows (header first); `traffic` adds the
/// packet and byte counters.
pub fn backends_rows(views: &[BackendView], traffic: bool) -> Vec<Vec<String>> {
    let mut header = vec!["id", "endpoint", "proto"];
    if traffic {
        header.extend(["packets", "bytes"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect()];
    rows.extend(views.iter().map(|x| {
        let mut row = vec![x.id.to_string(), x.endpoint.clone(), x.proto.clone()];
        if traffic {
            row.extend([x.packets.to_string(), x.bytes.to_string()]);
        }
        row
    }));
    rows
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FlowView {
    /// The 5-tuple as packets carry it.
    pub tuple: String,
    /// `forward` (client -> VIP) or `reply` (backend -> client); `direct
    /// forward` / `direct reply` for a connection straight to an endpoint,
    /// tracked untranslated.
    pub direction: String,
    /// What the tuple is translated to.
    pub nat: String,
    pub backend_id: u32,
    pub closing: bool,
    /// Source translation too (hairpin or masquerade): forward, the source
    /// written; reply, the client written back as destination. Empty
    /// without.
    pub snat: String,
    pub idle_s: u64,
}

pub fn conntrack(p: &Pinned) -> Vec<FlowView> {
    let mut out: Vec<FlowView> = p
        .conntrack
        .iter()
        .map(|(k, v)| FlowView {
            tuple: format!(
                "{} -> {}/{}",
                endpoint(k.saddr, k.sport),
                endpoint(k.daddr, k.dport),
                proto_name(k.proto)
            ),
            direction: match (v.is_direct(), v.is_reply()) {
                (false, false) => "forward",
                (false, true) => "reply",
                (true, false) => "direct forward",
                (true, true) => "direct reply",
            }
            .into(),
            nat: endpoint(v.nat_addr, v.nat_port),
            backend_id: v.backend_id,
            closing: v.is_closing(),
            snat: if v.is_snat() {
                endpoint(v.snat_addr, v.snat_port)
            } else {
                String::new()
            },
            idle_s: p.now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        })
        .collect();
    out.sort_by(|a, b| a.tuple.cmp(&b.tuple));
    out
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AffinityView {
    pub svc_id: u32,
    pub client: String,
    pub backend_id: u32,
    pub idle_s: u64,
}

pub fn affinity(p: &Pinned) -> Vec<AffinityView> {
    let mut out: Vec<AffinityView> = p
        .affinity
        .iter()
        .map(|(k, v)| AffinityView {
            svc_id: k.svc_id,
            client: Ipv4Addr::from(k.client.to_ne_bytes()).to_string(),
            backend_id: v.backend_id,
            idle_s: p.now_ns.saturating_sub(v.last_used_ns) / 1_000_000_000,
        })
        .collect();
    out.sort_by(|a, b| (a.svc_id, &a.client).cmp(&(b.svc_id, &b.client)));
    out
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub frontends: usize,
    pub maps: BTreeMap<&'static str, MapFill>,
    pub counters: BTreeMap<&'static str, u64>,
    /// Pinned hook links (`tc-ingress-<if>`, `tc-node-<if>`, `xdp-<if>`) and the
    /// interface index each runs on; `null`: detached.
    pub links: BTreeMap<String, Option<u32>>,
}

#[derive(Debug, Serialize)]
pub struct MapFill {
    pub entries: usize,
    pub capacity: u32,
}

pub fn status(p: &Pinned, links: BTreeMap<String, Option<u32>>) -> StatusView {
    StatusView {
        links,
        frontends: services(p).len(),
        maps: p
            .capacity
            .iter()
            .map(|(name, (entries, capacity))| {
                (
                    *name,
                    MapFill {
                        entries: *entries,
                        capacity: *capacity,
                    },
                )
            })
            .collect(),
        counters: stat::NAMES.iter().copied().zip(p.stats).collect(),
    }
}

/// Aligned columns; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<w$}", w = widths[c]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contents::{addr_to_map, addr6_to_map, port_to_map};

    fn pinned() -> Pinned {
        let vip = addr_to_map("10.96.0.10".parse().unwrap());
        let key = ServiceKey::new(vip, port_to_map(80), proto::TCP, 0);
        let be = Backend::new(
            addr_to_map("10.244.10.2".parse().unwrap()),
            port_to_map(8080),
            proto::TCP,
        );
        let vip6 = addr6_to_map("fd00:96::10".parse().unwrap());
        let key6 = ServiceKey6::new(vip6, port_to_map(80), proto::TCP, 0);
        let be6 = Backend6::new(
            addr6_to_map("fd00:244::2".parse().unwrap()),
            port_to_map(8080),
            proto::TCP,
        );
        let services4 = [
            (key, ServiceValue::service(7, 1, 0).with_affinity(30)),
            (key.with_slot(1), ServiceValue::slot(3)),
            (
                ServiceKey::cluster_ip(vip),
                ServiceValue::service(0, 0, proxy_common::SVC_FLAG_REJECT),
            ),
            (
                ServiceKey::new(vip, port_to_map(53), proto::UDP, 0),
                ServiceValue::service(8, 0, proxy_common::SVC_FLAG_REJECT),
            ),
        ];
        let services6 = [
            (key6, ServiceValue::service(9, 1, 0)),
            (key6.with_slot(1), ServiceValue::slot(4)),
            (
                ServiceKey6::cluster_ip(vip6),
                ServiceValue::service(0, 0, proxy_common::SVC_FLAG_REJECT),
            ),
        ];
        Pinned {
            services: services4
                .into_iter()
                .map(|(k, v)| (svc_key4(k), v))
                .chain(services6.into_iter().map(|(k, v)| (svc_key6(k), v)))
                .collect(),
            backends: vec![(3, backend4(be)), (4, backend6(be6))],
            conntrack: vec![],
            affinity: vec![(
                AffinityKey {
                    svc_id: 7,
                    client: addr_to_map("10.244.1.2".parse().unwrap()),
                },
                AffinityValue {
                    backend_id: 3,
                    _pad: 0,
                    last_used_ns: 1_000_000_000,
                },
            )],
            source_ranges: BTreeSet::new(),
            svc_traffic: BTreeMap::from([(
                7,
                Traffic {
                    packets: 10,
                    bytes: 1000,
                },
            )]),
            backend_traffic: BTreeMap::new(),
            stats: [0; stat::COUNT as usize],
            capacity: BTreeMap::new(),
            now_ns: 6_000_000_000,
        }
    }

    #[test]
    fn services_read_as_frontends_with_backends() {
        let views = services(&pinned());
        assert_eq!(
            views,
            [
                ServiceView {
                    frontend: "10.96.0.10:53/UDP".into(),
                    scope: "all".into(),
                    svc_id: 8,
                    empty: "reject".into(),
                    selection: "random".into(),
                    flags: vec![],
                    affinity_timeout_s: 0,
                    source_ranges: vec![],
                    backends: vec![],
                    packets: 0,
                    bytes: 0,
                },
                ServiceView {
                    frontend: "10.96.0.10:80/TCP".into(),
                    scope: "all".into(),
                    svc_id: 7,
                    empty: String::new(),
                    selection: "random".into(),
                    flags: vec![],
                    affinity_timeout_s: 30,
                    source_ranges: vec![],
                    backends: vec!["10.244.10.2:8080".into()],
                    packets: 10,
                    bytes: 1000,
                },
                ServiceView {
                    frontend: "[fd00:96::10]:80/TCP".into(),
                    scope: "all".into(),
                    svc_id: 9,
                    empty: String::new(),
                    selection: "random".into(),
                    flags: vec![],
                    affinity_timeout_s: 0,
                    source_ranges: vec![],
                    backends: vec!["[fd00:244::2]:8080".into()],
                    packets: 0,
                    bytes: 0,
                },
            ]
        );
    }

    #[test]
    fn affinity_and_backends_views() {
        let p = pinned();
        assert_eq!(
            affinity(&p),
            [AffinityView {
                svc_id: 7,
                client: "10.244.1.2".into(),
                backend_id: 3,
                idle_s: 5
            }]
        );
        assert_eq!(backends(&p)[0].endpoint, "10.244.10.2:8080");
        assert_eq!(backends(&p)[1].endpoint, "[fd00:244::2]:8080");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&[
            vec!["A".into(), "BB".into()],
            vec!["ccc".into(), "d".into()],
        ]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}
