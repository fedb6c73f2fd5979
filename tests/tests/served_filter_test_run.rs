//! The served filter (`kep_served`): a packet without a conntrack entry is
//! passed without the services and endpoints lookups when its destination's
//! bit is clear, so a clear bit must never stand for a frontend or endpoint
//! the maps hold. These tests hold the agent's bookkeeping to that through
//! many applies (frontends and shared endpoints coming and going, bits
//! shared by two destinations), reading the pinned bitmap back and feeding
//! the TC program packets through BPF_PROG_TEST_RUN.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN) and bpffs; fails loudly without.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::{TestRun, TestRunOptions},
};
use lab::LoadedDatapath;
use lab::bench::testrun::tcp_packet;
use proxy_common::{Backend, ServiceKey, ServiceValue, map_names, proto, served};
use proxy_userspace::{
    contents::{addr_to_map, backend4, port_to_map, svc_key4},
    datapath::{DatapathConfig, Hook, maps_dir},
    diff::MapOp,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const TC_ACT_OK: u32 = 0;
const SYN: u8 = 0x02;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

/// A datapath pinned under a directory of its own, unpinned on drop (also
/// when a check fails).
struct Fixture(LoadedDatapath);

fn settings(cfg: &mut DatapathConfig) {
    cfg.conntrack_max = 16_384;
}

impl Fixture {
    fn new() -> Self {
        Self(LoadedDatapath::load("kep-served", settings))
    }

    fn apply(&mut self, ops: &[MapOp]) {
        let failed = self.0.dp.apply(ops);
        assert!(failed.is_empty(), "map writes failed: {failed:?}");
    }

    /// The bitmap as the datapath reads it.
    fn bits(&self) -> Vec<served::Chunk> {
        let pin = maps_dir(self.0.pin_dir()).join(map_names::SERVED);
        let data = MapData::from_pin(&pin).expect("open the pinned served map");
        let map: Array<MapData, served::Chunk> = Map::Array(data).try_into().unwrap();
        (0..served::CHUNKS)
            .map(|i| map.get(&i, 0).expect("read a chunk"))
            .collect()
    }

    /// The pod program on a SYN `sport` -> `dst:dport`: (verdict, output).
    fn syn(&mut self, sport: u16, dst: Ipv4Addr, dport: u16) -> (Vec<u8>, u32, Vec<u8>) {
        let packet = tcp_packet(CLIENT, dst, sport, dport, SYN);
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        let res = self
            .0
            .hooks
            .hook_program(Hook::Pod)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e:?}"));
        out.truncate(res.data_size_out as usize);
        (packet, res.return_value, out)
    }

    /// Whether a conntrack entry is keyed by CLIENT:sport -> dst:dport.
    fn tracked(&self, sport: u16, dst: Ipv4Addr, dport: u16) -> bool {
        let key = proxy_common::CtKey::new(
            addr_to_map(CLIENT),
            addr_to_map(dst),
            port_to_map(sport),
            port_to_map(dport),
            proto::TCP,
        );
        self.0
            .upkeep
            .conntrack()
            .expect("reading conntrack")
            .iter()
            .any(|(k, _)| *k == key)
    }
}

fn is_set(bits: &[served::Chunk], addr: Ipv4Addr, port: u16) -> bool {
    let (chunk, word, mask) = served::bit(addr_to_map(addr), port_to_map(port), proto::TCP);
    bits[chunk as usize][word] & mask != 0
}

fn bit_index(addr: Ipv4Addr, port: u16) -> u32 {
    let (chunk, word, mask) = served::bit(addr_to_map(addr), port_to_map(port), proto::TCP);
    chunk * served::CHUNK_BITS + word as u32 * 64 + mask.trailing_zeros()
}

/// Frontend `i`: an external IP (outside the service CIDR, so only the
/// filter stands between a packet and the services lookup) and a port.
fn frontend(i: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(203, 0, 113, 1 + (i % 200) as u8),
        80 + i as u16,
    )
}

/// Endpoint `j`: a pod address and port.
fn endpoint(j: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(10, 244, 20 + (j / 200) as u8, 2 + (j % 200) as u8),
        8000 + j as u16,
    )
}

const ENDPOINTS: usize = 24;

/// Frontend `i`'s endpoints: two, shared with other frontends.
fn endpoints_of(i: usize) -> [usize; 2] {
    [i % ENDPOINTS, (i * 7 + 3) % ENDPOINTS]
}

fn backend(j: usize) -> Backend {
    let (a, p) = endpoint(j);
    Backend::new(addr_to_map(a), port_to_map(p), proto::TCP)
}

fn key(i: usize) -> ServiceKey {
    let (a, p) = frontend(i);
    ServiceKey::new(addr_to_map(a), port_to_map(p), proto::TCP, 0)
}

/// The ops from frontends `old` to `new` in the order the agent's diff
/// keeps (backends before the slots that name them, frontends deleted
/// before the backends only they used).
fn transition(old: &BTreeSet<usize>, new: &BTreeSet<usize>) -> Vec<MapOp> {
    let used = |set: &BTreeSet<usize>| -> BTreeSet<usize> {
        set.iter().flat_map(|&i| endpoints_of(i)).collect()
    };
    let (was, will) = (used(old), used(new));
    let mut ops = Vec::new();
    for &j in will.difference(&was) {
        ops.push(MapOp::PutBackend(j as u32 + 1, backend4(backend(j))));
    }
    for &i in new.difference(old) {
        for (s, j) in endpoints_of(i).into_iter().enumerate() {
            ops.push(MapOp::PutService(
                svc_key4(key(i).with_slot(s as u16 + 1)),
                ServiceValue::slot(j as u32 + 1),
            ));
        }
        ops.push(MapOp::PutService(
            svc_key4(key(i)),
            ServiceValue::service(i as u32 + 1, 2, 0),
        ));
    }
    for &i in old.difference(new) {
        ops.push(MapOp::DeleteService(svc_key4(key(i))));
        for s in 1..=2 {
            ops.push(MapOp::DeleteService(svc_key4(key(i).with_slot(s))));
        }
    }
    for &j in was.difference(&will) {
        ops.push(MapOp::DeleteBackend(j as u32 + 1));
    }
    ops
}

/// After every apply of a random walk over 40 frontends and 24 shared
/// endpoints: the bits are exactly those of the frontends and endpoints
/// present (none missing, none left behind), every present frontend's new
/// flow is translated, every present endpoint's direct connection tracked,
/// and the absent ones pass untouched.
#[test]
fn the_filter_follows_every_apply_and_never_hides_a_frontend_or_endpoint() {
    let mut fx = Fixture::new();
    let mut rng = StdRng::seed_from_u64(16);
    let mut present = BTreeSet::new();
    let mut sport = 1_024u16;
    for round in 0..25 {
        let next: BTreeSet<usize> = (0..40).filter(|_| rng.random_bool(0.5)).collect();
        fx.apply(&transition(&present, &next));
        present = next;
        let endpoints: BTreeSet<usize> = present.iter().flat_map(|&i| endpoints_of(i)).collect();

        let bits = fx.bits();
        let mut expected: BTreeSet<u32> = BTreeSet::new();
        let frontends = present.iter().map(|&i| ("frontend", frontend(i)));
        let endpoints_at = endpoints.iter().map(|&j| ("endpoint", endpoint(j)));
        for (what, (a, p)) in frontends.chain(endpoints_at) {
            assert!(
                is_set(&bits, a, p),
                "round {round}: {what} {a}:{p} has no bit"
            );
            expected.insert(bit_index(a, p));
        }
        let set: BTreeSet<u32> = (0..served::BITS)
            .filter(|b| {
                let c = &bits[(b / served::CHUNK_BITS) as usize];
                c[((b % served::CHUNK_BITS) / 64) as usize] & (1 << (b % 64)) != 0
            })
            .collect();
        assert_eq!(set, expected, "round {round}: bits left behind or missing");

        for i in 0..40 {
            let (a, p) = frontend(i);
            sport += 1;
            let (input, verdict, out) = fx.syn(sport, a, p);
            assert_eq!(verdict, TC_ACT_OK, "round {round}: frontend {a}:{p}");
            if present.contains(&i) {
                let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
                let allowed = endpoints_of(i).map(|j| endpoint(j).0);
                assert!(
                    allowed.contains(&dst),
                    "round {round}: new flow to frontend {a}:{p} went to {dst}, not one of {allowed:?}"
                );
            } else {
                assert_eq!(
                    out, input,
                    "round {round}: absent frontend {a}:{p} was changed"
                );
            }
        }
        for j in 0..ENDPOINTS {
            let (a, p) = endpoint(j);
            sport += 1;
            let (input, verdict, out) = fx.syn(sport, a, p);
            assert_eq!(
                (verdict, &out),
                (TC_ACT_OK, &input),
                "round {round}: {a}:{p}"
            );
            assert_eq!(
                fx.tracked(sport, a, p),
                endpoints.contains(&j),
                "round {round}: a connection straight to {a}:{p} (an endpoint: {}) tracked wrongly",
                endpoints.contains(&j)
            );
        }
    }
}

/// Two destinations whose bits are one: removing one keeps the other's
/// bit (it still serves), removing both clears it.
#[test]
fn a_bit_shared_by_two_frontends_stays_until_both_are_gone() {
    // Two frontend ports on one address with the same bit: with 2^20 bits,
    // a few thousand ports give a pair.
    let addr = Ipv4Addr::new(203, 0, 113, 77);
    let mut seen: BTreeMap<u32, u16> = BTreeMap::new();
    let (a, b) = (1..=u16::MAX)
        .find_map(|port| {
            seen.insert(bit_index(addr, port), port)
                .map(|other| (other, port))
        })
        .expect("some two ports share a bit");
    let mut fx = Fixture::new();
    let endpoint = Backend::new(
        addr_to_map(Ipv4Addr::new(10, 244, 30, 2)),
        port_to_map(8080),
        proto::TCP,
    );
    let frontend = |port: u16| {
        svc_key4(ServiceKey::new(
            addr_to_map(addr),
            port_to_map(port),
            proto::TCP,
            0,
        ))
    };
    let mut ops = vec![MapOp::PutBackend(1, backend4(endpoint))];
    for (id, port) in [(1, a), (2, b)] {
        ops.push(MapOp::PutService(
            frontend(port).with_slot(1),
            ServiceValue::slot(1),
        ));
        ops.push(MapOp::PutService(
            frontend(port),
            ServiceValue::service(id, 1, 0),
        ));
    }
    fx.apply(&ops);
    fx.apply(&[
        MapOp::DeleteService(frontend(a)),
        MapOp::DeleteService(frontend(a).with_slot(1)),
    ]);
    assert!(
        is_set(&fx.bits(), addr, b),
        "{addr}:{b} lost its bit with {addr}:{a}"
    );
    let (input, verdict, out) = fx.syn(2_000, addr, b);
    assert_eq!(verdict, TC_ACT_OK);
    assert_ne!(out, input, "the new flow to {addr}:{b} was not translated");
    assert_eq!(&out[30..34], &[10, 244, 30, 2]);
    let (input, _, out) = fx.syn(2_001, addr, a);
    assert_eq!(
        out, input,
        "the removed frontend {addr}:{a} still translates"
    );

    fx.apply(&[
        MapOp::DeleteService(frontend(b)),
        MapOp::DeleteService(frontend(b).with_slot(1)),
        MapOp::DeleteBackend(1),
    ]);
    assert!(
        fx.bits().iter().all(|c| c.iter().all(|w| *w == 0)),
        "bits left behind once nothing is served"
    );
}

/// A restarted agent (the maps adopted) makes the bits of what the maps
/// hold, whatever the pinned bitmap held before (bits wiped by hand here).
#[test]
fn a_restarted_agent_rewrites_the_bits_of_what_the_maps_hold() {
    let mut fx = Fixture::new();
    let all: BTreeSet<usize> = (0..10).collect();
    fx.apply(&transition(&BTreeSet::new(), &all));
    let before = fx.bits();
    {
        let pin = maps_dir(fx.0.pin_dir()).join(map_names::SERVED);
        let mut map: Array<MapData, served::Chunk> = Map::Array(MapData::from_pin(&pin).unwrap())
            .try_into()
            .unwrap();
        for i in 0..served::CHUNKS {
            map.set(i, [0; served::CHUNK_WORDS], 0).unwrap();
        }
    }
    // The agent restarts: the old datapath lets go of the directory
    // (its lock) and a new one adopts the pinned maps.
    let Fixture(LoadedDatapath {
        dp,
        upkeep,
        hooks,
        pins,
    }) = fx;
    drop((dp, upkeep, hooks));
    let mut fx = Fixture(LoadedDatapath::load_in(pins, settings));
    assert_eq!(fx.bits(), before);
    let (a, p) = frontend(3);
    let (input, _, out) = fx.syn(3_000, a, p);
    assert_ne!(
        out, input,
        "frontend {a}:{p} not translated after the restart"
    );
}
