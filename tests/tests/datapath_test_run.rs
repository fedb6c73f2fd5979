//! The TC program fed crafted packets through BPF_PROG_TEST_RUN: every
//! output byte is checked, checksums are recomputed from scratch, and a fuzz
//! loop holds every output to "unchanged, or exactly a correct translation".
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN) and bpffs; fails loudly without.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use lab::LoadedDatapath;
use lab::fib_node::{EXT_CLIENT, EXT_CLIENT_MAC, FibNode, NODE, OTHER_NODE, OTHER_NODE_MAC};
use proxy_common::{
    Backend, CtKey, SVC_FLAG_DROP, SVC_FLAG_EXTERNAL_SCOPE, SVC_FLAG_MAGLEV, SVC_FLAG_MASQUERADE,
    SVC_FLAG_NODE_ADDRESS, SVC_FLAG_REJECT, ServiceKey, ServiceValue, maglev::flow_hash, map_names,
    proto, scope, stat,
};
use proxy_userspace::{
    contents::{MapAddr, addr_to_map, backend4, port_to_map, svc_key4},
    datapath::{CtTimeouts, DatapathConfig, Hook, maps_dir},
    diff::MapOp,
    maglev::{TableBackend, TableSpec},
    tables::MaglevTables,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const VIP_DROP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// The three backends with ClientIP session affinity (1 s timeout).
const VIP_STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 10, 2),
    Ipv4Addr::new(10, 244, 11, 2),
    Ipv4Addr::new(10, 244, 12, 2),
];
/// Inside the default service CIDR 10.96.0.0/12 but no Service's.
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const HAIRPIN: Ipv4Addr = proxy_userspace::datapath::DEFAULT_HAIRPIN_ADDR;
const SVC_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

const ETH: usize = 14;
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

/// A loaded datapath pinned under a directory of its own, unpinned on drop.
struct Fixture(LoadedDatapath);

impl std::ops::Deref for Fixture {
    type Target = LoadedDatapath;
    fn deref(&self) -> &LoadedDatapath {
        &self.0
    }
}

impl std::ops::DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut LoadedDatapath {
        &mut self.0
    }
}

impl Fixture {
    /// Services: VIP:80 over TCP and UDP -> the three backends; VIP_EMPTY:80
    /// with no endpoints (REJECT); VIP_DROP:80 with no endpoints (DROP).
    /// The service CIDR and hairpin address are the defaults.
    fn new() -> Self {
        Self::with_timeouts(CtTimeouts::default())
    }

    fn with_timeouts(timeouts: CtTimeouts) -> Self {
        Self::with_settings(|cfg| cfg.timeouts = timeouts)
    }

    /// The fixture with its datapath settings changed by `change`.
    fn with_settings(change: impl FnOnce(&mut DatapathConfig)) -> Self {
        let mut fx = Self(LoadedDatapath::load("kep-testrun", |cfg| {
            cfg.conntrack_max = 4096;
            change(cfg);
        }));
        let mut ops = Vec::new();
        for (i, addr) in BACKENDS.iter().enumerate() {
            for (j, p) in [proto::TCP, proto::UDP].into_iter().enumerate() {
                let id = (i * 2 + j + 1) as u32;
                ops.push(MapOp::PutBackend(
                    id,
                    backend4(Backend::new(
                        addr_to_map(*addr),
                        port_to_map(BACKEND_PORT),
                        p,
                    )),
                ));
            }
        }
        let sticky = ServiceKey::new(
            addr_to_map(VIP_STICKY),
            port_to_map(SVC_PORT),
            proto::TCP,
            0,
        );
        for i in 0..BACKENDS.len() {
            ops.push(MapOp::PutService(
                svc_key4(sticky.with_slot(i as u16 + 1)),
                ServiceValue::slot((i * 2 + 1) as u32),
            ));
        }
        ops.push(MapOp::PutService(
            svc_key4(sticky),
            ServiceValue::service(30, BACKENDS.len() as u16, 0).with_affinity(1),
        ));
        for vip in [VIP, VIP_EMPTY, VIP_DROP, VIP_STICKY] {
            ops.push(MapOp::PutService(
                svc_key4(ServiceKey::cluster_ip(addr_to_map(vip))),
                ServiceValue::service(0, 0, SVC_FLAG_REJECT),
            ));
        }
        for (j, p) in [proto::TCP, proto::UDP].into_iter().enumerate() {
            let key = ServiceKey::new(addr_to_map(VIP), port_to_map(SVC_PORT), p, 0);
            for i in 0..BACKENDS.len() {
                let id = (i * 2 + j + 1) as u32;
                ops.push(MapOp::PutService(
                    svc_key4(key.with_slot(i as u16 + 1)),
                    ServiceValue::slot(id),
                ));
            }
            ops.push(MapOp::PutService(
                svc_key4(key),
                ServiceValue::service(j as u32 + 1, BACKENDS.len() as u16, 0),
            ));
            ops.push(MapOp::PutService(
                svc_key4(ServiceKey::new(
                    addr_to_map(VIP_EMPTY),
                    port_to_map(SVC_PORT),
                    p,
                    0,
                )),
                ServiceValue::service(10 + j as u32, 0, SVC_FLAG_REJECT),
            ));
            ops.push(MapOp::PutService(
                svc_key4(ServiceKey::new(
                    addr_to_map(VIP_DROP),
                    port_to_map(SVC_PORT),
                    p,
                    0,
                )),
                ServiceValue::service(20 + j as u32, 0, SVC_FLAG_DROP),
            ));
        }
        let failed = fx.dp.apply(&ops);
        assert!(failed.is_empty(), "map writes failed: {failed:?}");
        fx
    }

    fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run_hook(Hook::Pod, packet)
    }

    fn run_hook(&mut self, hook: Hook, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run_hook_on(hook, packet, 0)
    }

    /// The TC program of `hook` on `packet` as if it arrived on interface
    /// `ifindex` of the calling thread's network namespace (0: none).
    fn run_hook_on(&mut self, hook: Hook, packet: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        test_run_tc(self.hooks.hook_program(hook), packet, ifindex, ifindex)
    }

    /// The egress program on `packet` leaving the node: sent by the node
    /// itself (`ingress_ifindex` 0) or forwarded from that interface.
    fn run_egress(&mut self, packet: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
        test_run_tc(self.hooks.egress_program(), packet, ingress_ifindex, 0)
    }

    /// The XDP program on `packet` as if it arrived on interface `ifindex`
    /// of the calling thread's network namespace (its FIB decides).
    fn run_xdp(&mut self, packet: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, packet.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        let res =
            self.hooks.xdp_program().test_run(opts).unwrap_or_else(|e| {
                panic!("XDP BPF_PROG_TEST_RUN failed for {packet:02x?}: {e:?}")
            });
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    /// A NodePort `node:port` (TCP and UDP, externalTrafficPolicy Cluster:
    /// masqueraded) whose one endpoint is backend `i`.
    fn add_nodeport(&mut self, node: Ipv4Addr, port: u16, i: usize, svc_id: u32) {
        self.add_nodeport_to(
            node,
            port,
            [i * 2 + 1, i * 2 + 2].map(|id| id as u32),
            svc_id,
        );
    }

    /// A NodePort `node:port` as [`Fixture::add_nodeport`] whose one
    /// endpoint is the backend id `ids[0]` for TCP, `ids[1]` for UDP.
    fn add_nodeport_to(&mut self, node: Ipv4Addr, port: u16, ids: [u32; 2], svc_id: u32) {
        let mut ops = Vec::new();
        for (j, p) in [proto::TCP, proto::UDP].into_iter().enumerate() {
            let key = ServiceKey::new(addr_to_map(node), port_to_map(port), p, 0);
            let ext = key.with_scope(scope::EXTERNAL);
            let backend = ids[j];
            let id = svc_id + 2 * j as u32;
            ops.push(MapOp::PutService(
                svc_key4(key.with_slot(1)),
                ServiceValue::slot(backend),
            ));
            ops.push(MapOp::PutService(
                svc_key4(ext.with_slot(1)),
                ServiceValue::slot(backend),
            ));
            ops.push(MapOp::PutService(
                svc_key4(ext),
                ServiceValue::service(id + 1, 1, SVC_FLAG_MASQUERADE | SVC_FLAG_NODE_ADDRESS),
            ));
            ops.push(MapOp::PutService(
                svc_key4(key),
                ServiceValue::service(id, 1, SVC_FLAG_EXTERNAL_SCOPE | SVC_FLAG_NODE_ADDRESS),
            ));
        }
        let failed = self.dp.apply(&ops);
        assert!(failed.is_empty(), "map writes failed: {failed:?}");
        self.dp.set_node_addr(Some(node)).unwrap();
    }
}

/// `prog` on `packet` with the skb's `ingress_ifindex` and `ifindex` set
/// (both 0: no context given).
fn test_run_tc(
    prog: &mut aya::programs::SchedClassifier,
    packet: &[u8],
    ingress_ifindex: u32,
    ifindex: u32,
) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 4096];
    // struct __sk_buff up to `ifindex`; `ingress_ifindex` is at 36.
    let mut ctx = [0u8; 44];
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: (ingress_ifindex != 0 || ifindex != 0).then_some(&ctx[..]),
        ..TestRunOptions::new()
    };
    let res = prog
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN failed for {packet:02x?}: {e:?}"));
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

// ---- packet crafting and checking ---------------------------------------------------------

fn sum16(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += w as u32;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data))
}

fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    sum16(src) + sum16(dst) + proto as u32 + len as u32
}

/// Builds Ethernet + IPv4 (no options) + TCP/UDP with valid checksums.
fn packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    l4: u8,
    tcp_flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let l4_len = if l4 == proto::TCP { 20 } else { 8 } + payload.len();
    let mut p = Vec::with_capacity(ETH + 20 + l4_len);
    p.extend_from_slice(&MAC_B);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, l4, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ipc = checksum(&p[ETH..ETH + 20]);
    p[ETH + 10..ETH + 12].copy_from_slice(&ipc.to_be_bytes());
    let l4_off = p.len();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    if l4 == proto::TCP {
        p.extend_from_slice(&[
            0, 0, 0, 1, 0, 0, 0, 0, 0x50, tcp_flags, 0xff, 0xff, 0, 0, 0, 0,
        ]);
    } else {
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    p.extend_from_slice(payload);
    let csum_off = l4_off + if l4 == proto::TCP { 16 } else { 6 };
    let c = !fold(pseudo_sum(&src.octets(), &dst.octets(), l4, l4_len) + sum16(&p[l4_off..]));
    // UDP transmits a computed 0 as 0xffff; 0 means "no checksum".
    let c = if l4 == proto::UDP && c == 0 {
        0xffff
    } else {
        c
    };
    p[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    p
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    packet(src, dst, sport, dport, proto::TCP, flags, b"hello\n")
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    packet(src, dst, sport, dport, proto::UDP, 0, b"query")
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn ip_src(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[26], p[27], p[28], p[29])
}
fn ip_dst(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[30], p[31], p[32], p[33])
}
fn ihl(p: &[u8]) -> usize {
    (p[ETH] & 0x0f) as usize * 4
}
fn sport(p: &[u8]) -> u16 {
    let o = ETH + ihl(p);
    u16::from_be_bytes([p[o], p[o + 1]])
}
fn dport(p: &[u8]) -> u16 {
    let o = ETH + ihl(p);
    u16::from_be_bytes([p[o + 2], p[o + 3]])
}

fn ip_csum_ok(p: &[u8]) -> bool {
    let h = ihl(p);
    p.len() >= ETH + h && fold(sum16(&p[ETH..ETH + h])) == 0xffff
}

/// L4 checksum over the bytes actually present after the IP header. A zero
/// UDP checksum means "none" and counts as valid.
fn l4_csum_ok(p: &[u8]) -> bool {
    let off = ETH + ihl(p);
    let l4 = p[ETH + 9];
    let seg = &p[off..];
    if l4 == proto::UDP && seg.len() >= 8 && seg[6] == 0 && seg[7] == 0 {
        return true;
    }
    fold(pseudo_sum(&p[26..30], &p[30..34], l4, seg.len()) + sum16(seg)) == 0xffff
}

fn assert_checksums(p: &[u8]) {
    assert!(ip_csum_ok(p), "bad IPv4 header checksum: {p:02x?}");
    assert!(l4_csum_ok(p), "bad L4 checksum: {p:02x?}");
}

/// An ICMP error (`kind`, `code`, then the 4 bytes after the checksum)
/// from `src` to `dst` quoting `quoted` (an IPv4 packet from its IP header
/// on, as much of it as the sender quotes), checksums right.
fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(ETH + 28 + quoted.len());
    p.extend_from_slice(&MAC_B);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&[0x45, 0xc0]);
    p.extend_from_slice(&((28 + quoted.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0x56, 0x78, 0, 0, 64, proto::ICMP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ipc = checksum(&p[ETH..ETH + 20]);
    p[ETH + 10..ETH + 12].copy_from_slice(&ipc.to_be_bytes());
    p.extend_from_slice(&[kind, code, 0, 0]);
    p.extend_from_slice(&rest);
    p.extend_from_slice(quoted);
    let c = checksum(&p[ETH + 20..]);
    p[ETH + 22..ETH + 24].copy_from_slice(&c.to_be_bytes());
    p
}

/// The outer IPv4, the ICMP and the quoted IPv4 header checksums of an ICMP
/// error (no options anywhere) are right.
fn assert_icmp_checksums(p: &[u8]) {
    assert!(ip_csum_ok(p), "bad outer IPv4 checksum: {p:02x?}");
    assert_eq!(
        fold(sum16(&p[ETH + 20..])),
        0xffff,
        "bad ICMP checksum: {p:02x?}"
    );
    assert_eq!(
        fold(sum16(&p[ETH + 28..ETH + 48])),
        0xffff,
        "bad quoted IPv4 checksum: {p:02x?}"
    );
}

/// Bytes where `a` and `b` differ.
fn changed(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

fn ct_entries(fx: &Fixture) -> Vec<(CtKey, proxy_common::CtValue)> {
    fx.upkeep.conntrack().expect("reading conntrack")
}

// ---- tests ---------------------------------------------------------------------------------

/// Reading the maps back (batched lookups) gives exactly what was written,
/// also across many hash buckets.
#[test]
fn maps_read_back_as_written() {
    let mut fx = Fixture::new();
    let mut ops = Vec::new();
    for i in 0..5_000u32 {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i);
        let key = ServiceKey::new(addr_to_map(vip), port_to_map(SVC_PORT), proto::TCP, 0);
        ops.push(MapOp::PutService(
            svc_key4(key.with_slot(1)),
            ServiceValue::slot(1),
        ));
        ops.push(MapOp::PutService(
            svc_key4(key),
            ServiceValue::service(1_000 + i, 1, 0),
        ));
    }
    let failed = fx.dp.apply(&ops);
    assert!(failed.is_empty(), "{failed:?}");
    let read = fx.dp.read_contents().expect("read the maps back");
    assert_eq!(read.services.len(), fx.dp.live().services.len());
    assert_eq!(&read.services, &fx.dp.live().services);
    assert_eq!(&read.backends, &fx.dp.live().backends);
}

#[test]
fn tcp_dnat_rewrites_destination_and_checksums() {
    let mut fx = Fixture::new();
    let input = tcp(CLIENT, VIP, 40000, SVC_PORT, SYN);
    let (ret, out) = fx.run(&input);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(out.len(), input.len());
    assert!(BACKENDS.contains(&ip_dst(&out)), "dst {}", ip_dst(&out));
    assert_eq!(dport(&out), BACKEND_PORT);
    assert_eq!(ip_src(&out), CLIENT);
    assert_eq!(sport(&out), 40000);
    assert_checksums(&out);
    // Only destination address, destination port and the two checksums move.
    let allowed = [24, 25, 30, 31, 32, 33, 36, 37, 50, 51];
    for i in changed(&input, &out) {
        assert!(allowed.contains(&i), "byte {i} changed");
    }

    // Both directions are in conntrack, naming the same backend.
    let ct = ct_entries(&fx);
    assert_eq!(ct.len(), 2, "{ct:?}");
    let fwd = ct
        .iter()
        .find(|(k, _)| k.daddr == addr_to_map(VIP))
        .expect("forward entry");
    let rev = ct.iter().find(|(_, v)| v.is_reply()).expect("reply entry");
    assert_eq!(fwd.1.nat_addr, addr_to_map(ip_dst(&out)));
    assert_eq!(rev.0.saddr, addr_to_map(ip_dst(&out)));
    assert_eq!(rev.1.nat_addr, addr_to_map(VIP));
    assert_eq!(rev.1.nat_port, port_to_map(SVC_PORT));

    // Later packets of the flow keep the backend.
    for _ in 0..20 {
        let (ret, again) = fx.run(&tcp(CLIENT, VIP, 40000, SVC_PORT, ACK));
        assert_eq!(ret, TC_ACT_OK);
        assert_eq!(ip_dst(&again), ip_dst(&out));
        assert_checksums(&again);
    }
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::NEW_FLOWS as usize], 1);
    assert_eq!(stats[stat::FORWARD_HITS as usize], 20);

    // Per-frontend and per-backend traffic: 21 packets of the same size.
    let (per_svc, per_backend) = fx.dp.traffic();
    let expected = proxy_common::Traffic {
        packets: 21,
        bytes: 21 * input.len() as u64,
    };
    assert_eq!(per_svc.get(&fwd.1.svc_id), Some(&expected), "{per_svc:?}");
    assert_eq!(
        per_backend.get(&fwd.1.backend_id),
        Some(&expected),
        "{per_backend:?}"
    );
    assert_eq!(per_svc.len(), 1);
    assert_eq!(per_backend.len(), 1);
    // A deleted backend's counters go with it (its id may be reused).
    assert!(
        fx.dp
            .apply(&[MapOp::DeleteBackend(fwd.1.backend_id)])
            .is_empty()
    );
    assert!(fx.dp.traffic().1.is_empty());
}

#[test]
fn reply_is_reverse_translated_to_the_vip() {
    let mut fx = Fixture::new();
    let (_, out) = fx.run(&tcp(CLIENT, VIP, 41000, SVC_PORT, SYN));
    let backend = ip_dst(&out);
    let reply = tcp(backend, CLIENT, BACKEND_PORT, 41000, SYN | ACK);
    let (ret, rout) = fx.run(&reply);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(ip_src(&rout), VIP);
    assert_eq!(sport(&rout), SVC_PORT);
    assert_eq!(ip_dst(&rout), CLIENT);
    assert_eq!(dport(&rout), 41000);
    assert_checksums(&rout);
    let allowed = [24, 25, 26, 27, 28, 29, 34, 35, 50, 51];
    for i in changed(&reply, &rout) {
        assert!(allowed.contains(&i), "byte {i} changed");
    }
    assert_eq!(fx.upkeep.stats().unwrap()[stat::REPLY_HITS as usize], 1);
}

#[test]
fn udp_dnat_with_and_without_checksum() {
    let mut fx = Fixture::new();
    let input = udp(CLIENT, VIP, 5000, SVC_PORT);
    let (ret, out) = fx.run(&input);
    assert_eq!(ret, TC_ACT_OK);
    assert!(BACKENDS.contains(&ip_dst(&out)));
    assert_eq!(dport(&out), BACKEND_PORT);
    assert_checksums(&out);
    assert_ne!(
        &out[40..42],
        &[0, 0],
        "a present UDP checksum stays present"
    );

    // "No checksum" (0) must stay 0 rather than become a wrong value.
    let mut nocsum = udp(CLIENT, VIP, 5001, SVC_PORT);
    nocsum[40] = 0;
    nocsum[41] = 0;
    let (ret, out) = fx.run(&nocsum);
    assert_eq!(ret, TC_ACT_OK);
    assert!(BACKENDS.contains(&ip_dst(&out)));
    assert_eq!(&out[40..42], &[0, 0]);
    assert!(ip_csum_ok(&out));

    let (_, out) = fx.run(&udp(CLIENT, VIP, 5002, SVC_PORT));
    let reply = udp(ip_dst(&out), CLIENT, BACKEND_PORT, 5002);
    let (ret, rout) = fx.run(&reply);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!((ip_src(&rout), sport(&rout)), (VIP, SVC_PORT));
    assert_checksums(&rout);
}

#[test]
fn non_service_packets_are_unchanged() {
    let mut fx = Fixture::new();
    let cases = [
        tcp(CLIENT, BACKENDS[0], 40000, BACKEND_PORT, SYN),
        udp(CLIENT, Ipv4Addr::new(8, 8, 8, 8), 5000, 53),
        // Just outside 10.96.0.0/12.
        tcp(CLIENT, Ipv4Addr::new(10, 112, 0, 10), 40000, SVC_PORT, SYN),
        // Neither TCP nor UDP: not ours, even to a cluster IP.
        packet(CLIENT, VIP, 40000, SVC_PORT, 99, 0, b"other protocol"),
    ];
    for input in cases {
        let (ret, out) = fx.run(&input);
        assert_eq!(ret, TC_ACT_OK);
        assert_eq!(out, input);
    }
    // Non-IPv4 frames.
    let mut arp = tcp(CLIENT, VIP, 1, SVC_PORT, SYN);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (ret, out) = fx.run(&arp);
    assert_eq!((ret, out), (TC_ACT_OK, arp));
    // Only the connection straight to an endpoint is tracked (both
    // directions, translating nothing); the rest leaves no state.
    let ct = ct_entries(&fx);
    assert_eq!(ct.len(), 2, "{ct:?}");
    assert!(
        ct.iter().all(|(_, v)| v.is_direct() && !v.is_snat()),
        "{ct:?}"
    );
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::DIRECT_FLOWS as usize], 1);
    assert_eq!(stats[stat::NEW_FLOWS as usize], 0);
}

#[test]
fn icmp_echo_passes_untouched() {
    let mut fx = Fixture::new();
    let icmp = packet(CLIENT, VIP, 0x0800, 0, proto::ICMP, 0, b"ping");
    let (ret, out) = fx.run(&icmp);
    assert_eq!((ret, out), (TC_ACT_OK, icmp));
    assert!(ct_entries(&fx).is_empty());
}

#[test]
fn truncated_packets_pass_safely() {
    let mut fx = Fixture::new();
    for (full, l4_hdr) in [
        (tcp(CLIENT, VIP, 42000, SVC_PORT, SYN), 20),
        (udp(CLIENT, VIP, 42001, SVC_PORT), 8),
        (tcp(CLIENT, VIP_EMPTY, 42002, SVC_PORT, SYN), 20),
        (udp(CLIENT, VIP_EMPTY, 42003, SVC_PORT), 8),
    ] {
        // BPF_PROG_TEST_RUN itself refuses an IPv4 frame shorter than the
        // Ethernet + IPv4 headers, so truncation is tested from there up to
        // one byte short of a complete L4 header.
        for len in ETH + 20..ETH + 20 + l4_hdr {
            let cut = &full[..len];
            let (ret, out) = fx.run(cut);
            assert_eq!(ret, TC_ACT_OK, "len {len}");
            assert_eq!(out, cut, "len {len} modified");
        }
    }
    assert!(ct_entries(&fx).is_empty());
}

/// The ICMP port unreachable the datapath sends for a frontend without
/// endpoints, checked field by field.
fn assert_port_unreachable(input: &[u8], out: &[u8]) {
    // The IPv4 header and the whole fixed L4 header are quoted.
    let quote = 20 + if input[ETH + 9] == proto::TCP { 20 } else { 8 };
    assert_eq!(out.len(), ETH + 20 + 8 + quote);
    assert_eq!(&out[0..6], &input[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &input[0..6]);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(out[ETH], 0x45);
    assert_eq!(u16::from_be_bytes([out[16], out[17]]) as usize, 28 + quote);
    assert_eq!(out[ETH + 9], proto::ICMP);
    assert_eq!(ip_src(out), ip_dst(input), "sent by the frontend address");
    assert_eq!(ip_dst(out), ip_src(input));
    assert!(ip_csum_ok(out), "ICMP IPv4 header checksum");
    let icmp = &out[ETH + 20..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination/port unreachable");
    assert_eq!(fold(sum16(icmp)), 0xffff, "ICMP checksum");
    // The quoted L4 checksum is the one field that may differ (see below).
    let l4_csum = 20 + if input[ETH + 9] == proto::TCP { 16 } else { 6 };
    let mut quoted = icmp[8..].to_vec();
    quoted[l4_csum..l4_csum + 2].copy_from_slice(&input[ETH + l4_csum..ETH + l4_csum + 2]);
    assert_eq!(quoted, &input[ETH..ETH + quote], "quotes the request");
    // A request with a partial checksum (CHECKSUM_PARTIAL) leaves the
    // kernel pointed at the quoted L4 header: where the way out finishes
    // checksums in software, it writes the inverted fold of the quoted L4
    // bytes into the quoted checksum field. That must change nothing, or
    // the ICMP checksum computed before it is wrong.
    // (The kernel sums the field as it stands.)
    let mut completed = out.to_vec();
    let finished = !fold(sum16(&out[ETH + 28 + 20..]));
    completed[ETH + 28 + l4_csum..ETH + 28 + l4_csum + 2].copy_from_slice(&finished.to_be_bytes());
    let same_number = |a: &[u8], b: &[u8]| {
        let (a, b) = (
            u16::from_be_bytes([a[0], a[1]]),
            u16::from_be_bytes([b[0], b[1]]),
        );
        a == b || (a | b == 0xffff && (a == 0 || b == 0))
    };
    assert!(
        same_number(
            &completed[ETH + 28 + l4_csum..][..2],
            &out[ETH + 28 + l4_csum..][..2]
        ),
        "software checksum completion rewrites the quote: {out:02x?}"
    );
}

#[test]
fn no_endpoints_reject_with_icmp_port_unreachable() {
    let mut fx = Fixture::new();
    for input in [
        tcp(CLIENT, VIP_EMPTY, 43000, SVC_PORT, SYN),
        udp(CLIENT, VIP_EMPTY, 43001, SVC_PORT),
    ] {
        let (ret, out) = fx.run(&input);
        assert_eq!(
            ret, TC_ACT_REDIRECT,
            "sent back out of the ingress interface"
        );
        assert_port_unreachable(&input, &out);
    }
    assert_eq!(fx.upkeep.stats().unwrap()[stat::REJECTS as usize], 2);
    assert!(
        ct_entries(&fx).is_empty(),
        "a rejected flow leaves no state"
    );
}

#[test]
fn cluster_ip_without_such_port_rejects_and_unallocated_drops() {
    let mut fx = Fixture::new();
    // A cluster IP on a port (or protocol) none of its Services serves.
    for input in [
        tcp(CLIENT, VIP, 46000, 81, SYN),
        udp(CLIENT, VIP, 46001, 443),
        udp(CLIENT, VIP_EMPTY, 46002, 81),
    ] {
        let (ret, out) = fx.run(&input);
        assert_eq!(ret, TC_ACT_REDIRECT);
        assert_port_unreachable(&input, &out);
    }
    // An address in the service CIDR that is nobody's cluster IP.
    for input in [
        tcp(CLIENT, UNALLOCATED, 46003, SVC_PORT, SYN),
        udp(CLIENT, UNALLOCATED, 46004, 53),
    ] {
        let (ret, _) = fx.run(&input);
        assert_eq!(ret, TC_ACT_SHOT);
    }
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::REJECTS as usize], 3);
    assert_eq!(stats[stat::UNALLOCATED_DROPS as usize], 2);
    assert!(ct_entries(&fx).is_empty());
}

#[test]
fn hairpin_is_source_translated_both_ways() {
    let mut fx = Fixture::new();
    let me = BACKENDS[1];
    // The choice is random: try new flows until this backend picks itself.
    let (client_port, out) = (47000..47200)
        .map(|port| (port, fx.run(&tcp(me, VIP, port, SVC_PORT, SYN)).1))
        .find(|(_, out)| ip_dst(out) == me)
        .expect("a backend never picked itself in 200 flows");
    assert_eq!(dport(&out), BACKEND_PORT);
    assert_eq!(ip_src(&out), HAIRPIN, "hairpin source is translated");
    assert_eq!(sport(&out), client_port);
    assert_checksums(&out);
    let reply = tcp(me, HAIRPIN, BACKEND_PORT, client_port, SYN | ACK);
    let (ret, rout) = fx.run(&reply);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!((ip_src(&rout), sport(&rout)), (VIP, SVC_PORT));
    assert_eq!((ip_dst(&rout), dport(&rout)), (me, client_port));
    assert_checksums(&rout);
    // Later packets of the flow keep both translations.
    let (_, again) = fx.run(&tcp(me, VIP, client_port, SVC_PORT, ACK));
    assert_eq!((ip_src(&again), ip_dst(&again)), (HAIRPIN, me));
    assert_checksums(&again);
}

#[test]
fn drop_flag_drops_silently() {
    let mut fx = Fixture::new();
    let (ret, _) = fx.run(&tcp(CLIENT, VIP_DROP, 44000, SVC_PORT, SYN));
    assert_eq!(ret, TC_ACT_SHOT);
    assert_eq!(fx.upkeep.stats().unwrap()[stat::DROPS as usize], 1);
}

#[test]
fn removed_backend_is_not_reused_by_an_old_flow() {
    let mut fx = Fixture::new();
    let (_, out) = fx.run(&tcp(CLIENT, VIP, 45000, SVC_PORT, SYN));
    let chosen = ip_dst(&out);
    // Remove the chosen backend everywhere, as the agent's diff would.
    let idx = BACKENDS.iter().position(|b| *b == chosen).unwrap();
    let key = ServiceKey::new(addr_to_map(VIP), port_to_map(SVC_PORT), proto::TCP, 0);
    let live = fx.dp.live().clone();
    let remaining: Vec<u32> = (1..=3u16)
        .map(|s| live.services[&svc_key4(key.with_slot(s))].backend_id)
        .filter(|id| live.backends[id].addr != MapAddr::V4(addr_to_map(chosen)))
        .collect();
    let removed_id = (idx * 2 + 1) as u32;
    let ops = vec![
        MapOp::PutService(svc_key4(key.with_slot(1)), ServiceValue::slot(remaining[0])),
        MapOp::PutService(svc_key4(key.with_slot(2)), ServiceValue::slot(remaining[1])),
        MapOp::PutService(svc_key4(key), ServiceValue::service(1, 2, 0)),
        MapOp::DeleteService(svc_key4(key.with_slot(3))),
        MapOp::DeleteBackend(removed_id),
    ];
    assert!(fx.dp.apply(&ops).is_empty());
    for _ in 0..20 {
        let (ret, again) = fx.run(&tcp(CLIENT, VIP, 45000, SVC_PORT, ACK));
        assert_eq!(ret, TC_ACT_OK);
        assert_ne!(
            ip_dst(&again),
            chosen,
            "flow still sent to a removed backend"
        );
        assert_checksums(&again);
    }
}

/// A new connection on the tuple of a closing one (a client reusing its
/// port) is balanced afresh, as netfilter re-opens a tuple in TIME_WAIT; a
/// packet of the closing connection itself keeps its endpoint.
#[test]
fn syn_on_a_closing_tuple_starts_a_new_flow() {
    const FIN: u8 = 0x01;
    let mut fx = Fixture::new();
    let port = 47000;
    let (_, out) = fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, SYN));
    let old = ip_dst(&out);
    fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, FIN | ACK));
    // The Service now has another single endpoint; the old one still exists
    // (a lingering backend), so only re-balancing moves the new SYN.
    let new = *BACKENDS.iter().find(|b| **b != old).unwrap();
    let new_id = (BACKENDS.iter().position(|b| *b == new).unwrap() * 2 + 1) as u32;
    let key = ServiceKey::new(addr_to_map(VIP), port_to_map(SVC_PORT), proto::TCP, 0);
    let ops = [
        MapOp::PutService(svc_key4(key.with_slot(1)), ServiceValue::slot(new_id)),
        MapOp::PutService(svc_key4(key), ServiceValue::service(1, 1, 0)),
    ];
    assert!(fx.dp.apply(&ops).is_empty());
    let (_, out) = fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, ACK));
    assert_eq!(
        ip_dst(&out),
        old,
        "the closing connection keeps its endpoint"
    );
    let (ret, out) = fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, SYN));
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(
        ip_dst(&out),
        new,
        "a new connection on the reused port is balanced anew"
    );
    assert_checksums(&out);
}

#[test]
fn fin_from_one_side_half_closes_both_from_both_or_rst_closes() {
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    let mut fx = Fixture::new();
    // (port, packets after the SYN: (from the backend?, flags), and how
    // many of the flow's entries are then half-closed and closed).
    type Case = (u16, &'static [(bool, u8)], usize, usize);
    let cases: [Case; 3] = [
        (48000, &[(false, FIN | ACK)], 2, 0),
        (48001, &[(false, FIN | ACK), (true, FIN | ACK)], 0, 2),
        (48002, &[(true, RST)], 0, 2),
    ];
    for (port, packets, half, closed) in cases {
        let (_, out) = fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, SYN));
        let backend = ip_dst(&out);
        for &(from_backend, flags) in packets {
            let packet = if from_backend {
                tcp(backend, CLIENT, BACKEND_PORT, port, flags)
            } else {
                tcp(CLIENT, VIP, port, SVC_PORT, flags)
            };
            let (ret, out) = fx.run(&packet);
            assert_eq!(ret, TC_ACT_OK);
            assert_checksums(&out);
        }
        let flow: Vec<_> = ct_entries(&fx)
            .into_iter()
            .filter(|(k, _)| k.sport == port_to_map(port) || k.dport == port_to_map(port))
            .collect();
        assert_eq!(flow.len(), 2, "{flow:?}");
        let count =
            |f: fn(&proxy_common::CtValue) -> bool| flow.iter().filter(|(_, v)| f(v)).count();
        assert_eq!(
            (count(|v| v.is_half_closed()), count(|v| v.is_closing())),
            (half, closed),
            "flow {port}: (half-closed, closed) entries"
        );
    }
}

/// kube-proxy keeps a half-closed connection (FIN from one side) for an hour
/// (netfilter's CLOSE_WAIT): the other side may go on sending long after.
#[test]
fn a_half_closed_connection_outlives_the_closing_timeout() {
    const FIN: u8 = 0x01;
    let mut fx = Fixture::with_timeouts(CtTimeouts {
        tcp_closing: std::time::Duration::ZERO,
        ..CtTimeouts::default()
    });
    let (_, out) = fx.run(&tcp(CLIENT, VIP, 48100, SVC_PORT, SYN));
    let backend = ip_dst(&out);
    fx.run(&tcp(backend, CLIENT, BACKEND_PORT, 48100, SYN | ACK));
    fx.run(&tcp(CLIENT, VIP, 48100, SVC_PORT, FIN | ACK));
    // Longer than a tick: the datapath reads the coarse clock.
    std::thread::sleep(std::time::Duration::from_millis(10));
    // The endpoint goes on sending; the client acknowledges.
    let (_, reply) = fx.run(&tcp(backend, CLIENT, BACKEND_PORT, 48100, ACK));
    assert_eq!(
        ip_src(&reply),
        VIP,
        "the endpoint's data is still translated"
    );
    assert_checksums(&reply);
    let (_, ack) = fx.run(&tcp(CLIENT, VIP, 48100, SVC_PORT, ACK));
    assert_eq!(ip_dst(&ack), backend);
    assert_eq!(fx.upkeep.stats().unwrap()[stat::NEW_FLOWS as usize], 1);
    assert_eq!(collect(&mut fx), 0);
}

/// A connection that never got an answer goes after netfilter's SYN-sent
/// timeout, not the established one.
#[test]
fn an_unanswered_syn_expires_after_the_syn_sent_timeout() {
    let mut fx = Fixture::with_timeouts(CtTimeouts {
        tcp_syn_sent: std::time::Duration::ZERO,
        ..CtTimeouts::default()
    });
    fx.run(&tcp(CLIENT, VIP, 48200, SVC_PORT, SYN));
    let (_, out) = fx.run(&tcp(CLIENT, VIP, 48201, SVC_PORT, SYN));
    fx.run(&tcp(ip_dst(&out), CLIENT, BACKEND_PORT, 48201, SYN | ACK));
    std::thread::sleep(std::time::Duration::from_millis(10));
    assert_eq!(collect(&mut fx), 2, "the unanswered flow's two entries");
    let left = ct_entries(&fx);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().all(|(k, v)| v.seen_reply()
            && (k.sport == port_to_map(48201) || k.dport == port_to_map(48201)))
    );
}

/// The pinned conntrack map `name`, opened as the datapath sees it.
fn pinned_ct(
    fx: &Fixture,
    name: &str,
) -> aya::maps::HashMap<aya::maps::MapData, CtKey, proxy_common::CtValue> {
    let pin = maps_dir(fx.pin_dir()).join(name);
    let data = aya::maps::MapData::from_pin(&pin).expect("open the pinned conntrack map");
    aya::maps::Map::LruHashMap(data).try_into().unwrap()
}

/// The keys in the pinned conntrack map `name`.
fn pinned_ct_keys(fx: &Fixture, name: &str) -> Vec<CtKey> {
    let mut keys: Vec<CtKey> = pinned_ct(fx, name)
        .keys()
        .collect::<Result<_, _>>()
        .unwrap();
    keys.sort_by_key(|k| (k.saddr, k.daddr, k.sport, k.dport));
    keys
}

/// Deletes one conntrack entry behind the datapath's back, as the LRU
/// evicts one from a full table.
fn evict(fx: &Fixture, key: &CtKey) {
    pinned_ct(fx, map_names::conntrack_of(key.proto))
        .remove(key)
        .expect("the entry was there");
}

/// A garbage collection of both conntrack maps: how many entries went.
fn collect(fx: &mut Fixture) -> usize {
    fx.upkeep
        .collect_conntrack()
        .iter()
        .map(|s| s.deleted)
        .sum()
}

/// TCP flows are tracked in one LRU map and every other protocol in
/// another (issue 17.10): a flood of new UDP flows many times the other
/// map's size evicts only UDP entries, and an idle TCP connection keeps
/// both its entries and its endpoint.
#[test]
fn a_udp_flood_evicts_no_tcp_flow() {
    let mut fx = Fixture::with_settings(|cfg| {
        cfg.conntrack_max = 256;
        cfg.conntrack_other_max = 256;
    });
    let (_, out) = fx.run(&tcp(CLIENT, VIP, 51000, SVC_PORT, SYN));
    let backend = ip_dst(&out);
    fx.run(&tcp(backend, CLIENT, BACKEND_PORT, 51000, SYN | ACK));
    fx.run(&udp(CLIENT, VIP, 51000, SVC_PORT));
    let tcp_keys = pinned_ct_keys(&fx, map_names::CONNTRACK_TCP);
    let other_keys = pinned_ct_keys(&fx, map_names::CONNTRACK_OTHER);
    assert_eq!(
        tcp_keys.len(),
        2,
        "the TCP flow's two entries: {tcp_keys:?}"
    );
    assert!(tcp_keys.iter().all(|k| k.proto == proto::TCP));
    assert_eq!(other_keys.len(), 2, "the UDP flow's two: {other_keys:?}");
    assert!(other_keys.iter().all(|k| k.proto == proto::UDP));

    // Each datagram from a new port is a new flow, answered and asked
    // again (as a resolver's retry), so the LRU sees its entries used as
    // much as the TCP flow's: 4,000 entries for a map of 256.
    for port in 0..2000u16 {
        let (_, out) = fx.run(&udp(CLIENT, VIP, 20_000 + port, SVC_PORT));
        fx.run(&udp(ip_dst(&out), CLIENT, BACKEND_PORT, 20_000 + port));
        fx.run(&udp(CLIENT, VIP, 20_000 + port, SVC_PORT));
    }
    let other_keys = pinned_ct_keys(&fx, map_names::CONNTRACK_OTHER);
    assert!(other_keys.len() <= 256, "{}", other_keys.len());
    assert!(other_keys.iter().all(|k| k.proto == proto::UDP));
    assert_eq!(
        pinned_ct_keys(&fx, map_names::CONNTRACK_TCP),
        tcp_keys,
        "the flood touched the TCP map"
    );
    let (_, fwd) = fx.run(&tcp(CLIENT, VIP, 51000, SVC_PORT, ACK));
    assert_eq!(ip_dst(&fwd), backend, "the connection keeps its endpoint");
    let (_, reply) = fx.run(&tcp(backend, CLIENT, BACKEND_PORT, 51000, ACK));
    assert_eq!(ip_src(&reply), VIP, "its answers are still translated");
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::CT_RESTORED as usize], 0, "nothing was lost");
    assert_eq!(
        stats[stat::NEW_FLOWS as usize],
        1 + 1 + 2000,
        "the TCP flow was not chosen anew"
    );
}

/// A flow that lost its reply entry (evicted from a full table) gets it
/// back from its forward entry at its next packet after a pause, instead
/// of staying broken; and the other way round.
#[test]
fn a_flow_whose_entry_was_evicted_gets_it_back() {
    let mut fx = Fixture::new();
    for (port, lose_reply) in [(48300u16, true), (48301, false)] {
        let (_, out) = fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, SYN));
        let backend = ip_dst(&out);
        fx.run(&tcp(backend, CLIENT, BACKEND_PORT, port, SYN | ACK));
        let entries: Vec<_> = ct_entries(&fx)
            .into_iter()
            .filter(|(k, _)| k.sport == port_to_map(port) || k.dport == port_to_map(port))
            .collect();
        let (lost, _) = entries
            .iter()
            .find(|(_, v)| v.is_reply() == lose_reply)
            .unwrap();
        evict(&fx, lost);
        // Idle past the check interval (1 s), as the connections of the
        // issue were.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        if lose_reply {
            let (_, fwd) = fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, ACK));
            assert_eq!(ip_dst(&fwd), backend);
            let (_, reply) = fx.run(&tcp(backend, CLIENT, BACKEND_PORT, port, ACK));
            assert_eq!(ip_src(&reply), VIP, "the answer is translated again");
            assert_checksums(&reply);
        } else {
            let (_, reply) = fx.run(&tcp(backend, CLIENT, BACKEND_PORT, port, ACK));
            assert_eq!(ip_src(&reply), VIP);
            let (_, fwd) = fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, ACK));
            assert_eq!(ip_dst(&fwd), backend, "the request keeps its endpoint");
        }
        let back = ct_entries(&fx);
        assert!(
            back.iter().any(|(k, v)| k == lost && v.seen_reply()),
            "{back:?}"
        );
    }
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::CT_RESTORED as usize], 2);
    assert_eq!(stats[stat::NEW_FLOWS as usize], 2);
}

/// The kernel rate-limits the ICMP errors it sends per destination
/// (`icmp_ratelimit`: a burst of 6, then one per interval), iptables'
/// REJECT included: so are these answers.
#[test]
fn reject_answers_are_rate_limited_per_client() {
    let mut fx = Fixture::new();
    let mut answered = 0;
    for port in 0..10u16 {
        let (ret, _) = fx.run(&tcp(CLIENT, VIP_EMPTY, 47000 + port, SVC_PORT, SYN));
        match ret {
            TC_ACT_REDIRECT => answered += 1,
            other => assert_eq!(other, TC_ACT_SHOT, "a refused answer drops the request"),
        }
    }
    assert_eq!(answered, 6, "the burst, then nothing within the interval");
    let other = Ipv4Addr::new(10, 244, 1, 3);
    let (ret, out) = fx.run(&tcp(other, VIP_EMPTY, 47100, SVC_PORT, SYN));
    assert_eq!(ret, TC_ACT_REDIRECT, "another client has its own share");
    assert_eq!(ip_dst(&out), other);
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::REJECTS as usize], 7);
    assert_eq!(stats[stat::REJECT_RATE_LIMITED as usize], 4);
    // A second later the client has one more answer.
    std::thread::sleep(std::time::Duration::from_millis(1050));
    let (ret, _) = fx.run(&tcp(CLIENT, VIP_EMPTY, 47200, SVC_PORT, SYN));
    assert_eq!(ret, TC_ACT_REDIRECT);
}

#[test]
fn expired_flows_are_chosen_anew_and_collected() {
    // UDP entries expire at once; TCP ones last.
    let mut fx = Fixture::with_timeouts(CtTimeouts {
        udp: std::time::Duration::ZERO,
        ..CtTimeouts::default()
    });
    fx.run(&udp(CLIENT, VIP, 49000, SVC_PORT));
    // Longer than a tick: the datapath reads the coarse clock.
    std::thread::sleep(std::time::Duration::from_millis(10));
    fx.run(&udp(CLIENT, VIP, 49000, SVC_PORT));
    fx.run(&tcp(CLIENT, VIP, 49001, SVC_PORT, SYN));
    fx.run(&tcp(CLIENT, VIP, 49001, SVC_PORT, ACK));
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(
        stats[stat::NEW_FLOWS as usize],
        3,
        "the idle UDP flow was chosen anew"
    );
    assert_eq!(stats[stat::FORWARD_HITS as usize], 1);
    // Longer than a tick: the datapath reads the coarse clock.
    std::thread::sleep(std::time::Duration::from_millis(10));
    // The forward entry and one reply entry per backend the flow had.
    let udp_entries = ct_entries(&fx)
        .iter()
        .filter(|(k, _)| k.proto == proto::UDP)
        .count();
    assert!(udp_entries >= 2);
    let deleted = collect(&mut fx);
    assert_eq!(deleted, udp_entries, "every expired UDP entry");
    let left = ct_entries(&fx);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|(k, _)| k.proto == proto::TCP));
}

#[test]
fn removed_udp_backend_loses_its_flows_at_once() {
    let mut fx = Fixture::new();
    let mut chosen = Vec::new();
    for port in 50000..50030 {
        let (_, out) = fx.run(&udp(CLIENT, VIP, port, SVC_PORT));
        chosen.push(ip_dst(&out));
        fx.run(&tcp(CLIENT, VIP, port, SVC_PORT, SYN));
    }
    let victim = BACKENDS[0];
    let on_victim = chosen.iter().filter(|b| **b == victim).count();
    assert!(on_victim > 0);
    let before = ct_entries(&fx).len();
    let udp_backend = Backend::new(addr_to_map(victim), port_to_map(BACKEND_PORT), proto::UDP);
    let deleted = fx.upkeep.forget_udp_backends(&[udp_backend]).unwrap();
    assert_eq!(
        deleted,
        on_victim * 2,
        "forward and reply entry of each flow"
    );
    let left = ct_entries(&fx);
    assert_eq!(left.len(), before - deleted);
    assert!(
        !left.iter().any(|(k, v)| k.proto == proto::UDP
            && (v.nat_addr == addr_to_map(victim) || k.saddr == addr_to_map(victim))),
        "UDP state of the removed backend is left"
    );
    // TCP flows to it are left alone (they end or expire on their own).
    let tcp_backend = Backend::new(addr_to_map(victim), port_to_map(BACKEND_PORT), proto::TCP);
    assert_eq!(fx.upkeep.forget_udp_backends(&[tcp_backend]).unwrap(), 0);
}

#[test]
fn client_ip_affinity_keeps_a_client_until_idle_timeout() {
    let mut fx = Fixture::new();
    let other_client = Ipv4Addr::new(10, 244, 2, 2);
    let mut first_port = 51000;
    let mut backend_of = |fx: &mut Fixture, client: Ipv4Addr| {
        first_port += 1;
        ip_dst(
            &fx.run(&tcp(client, VIP_STICKY, first_port, SVC_PORT, SYN))
                .1,
        )
    };
    let kept = backend_of(&mut fx, CLIENT);
    for _ in 0..100 {
        assert_eq!(
            backend_of(&mut fx, CLIENT),
            kept,
            "a new flow left the affine endpoint"
        );
    }
    // Another client has its own choice, and keeps it too.
    let theirs = backend_of(&mut fx, other_client);
    for _ in 0..20 {
        assert_eq!(backend_of(&mut fx, other_client), theirs);
    }
    // After the timeout passes without new flows, the choice is free again:
    // over ten idle periods, a fresh random choice must differ at least once.
    let mut changed = false;
    let mut current = kept;
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let next = backend_of(&mut fx, CLIENT);
        changed |= next != current;
        current = next;
        assert_eq!(
            backend_of(&mut fx, CLIENT),
            current,
            "kept again after the new choice"
        );
    }
    assert!(changed, "the affinity never expired");
    // An endpoint that is gone is not kept: remove the current one, as the
    // agent's diff does (slots rewritten first, then the backend deleted).
    let gone = BACKENDS.iter().position(|b| *b == current).unwrap();
    let sticky = ServiceKey::new(
        addr_to_map(VIP_STICKY),
        port_to_map(SVC_PORT),
        proto::TCP,
        0,
    );
    let remaining: Vec<u32> = (0..BACKENDS.len())
        .filter(|i| *i != gone)
        .map(|i| (i * 2 + 1) as u32)
        .collect();
    let ops = [
        MapOp::PutService(
            svc_key4(sticky.with_slot(1)),
            ServiceValue::slot(remaining[0]),
        ),
        MapOp::PutService(
            svc_key4(sticky.with_slot(2)),
            ServiceValue::slot(remaining[1]),
        ),
        MapOp::PutService(
            svc_key4(sticky),
            ServiceValue::service(30, 2, 0).with_affinity(1),
        ),
        MapOp::DeleteService(svc_key4(sticky.with_slot(3))),
        MapOp::DeleteBackend((gone * 2 + 1) as u32),
    ];
    assert!(fx.dp.apply(&ops).is_empty());
    let after = backend_of(&mut fx, CLIENT);
    assert_ne!(after, current, "kept on a removed endpoint");
    assert_eq!(backend_of(&mut fx, CLIENT), after);
}

// ---- IP fragments -----------------------------------------------------------------------------

/// A namespace of its own with a veth pair, for the fragment tests: the
/// programs run as if on `frag0`, so the held fragments they replay (cloned
/// into `frag0`'s ingress) land in this namespace only, where a packet
/// socket on `frag0` catches them (and its stack, not forwarding, drops
/// them).
struct ReplayNs {
    ns: lab::Netns,
    ifindex: u32,
}

impl ReplayNs {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let ns = lab::Netns::create(&format!(
            "kep-frag-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
        .expect("a namespace for fragment replays (needs root)");
        ns.ip(&[
            "link", "add", "frag0", "type", "veth", "peer", "name", "frag1",
        ])
        .unwrap();
        for dev in ["frag0", "frag1"] {
            ns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        let ifindex = ns.run(|| unsafe { libc::if_nametoindex(c"frag0".as_ptr()) });
        assert_ne!(ifindex, 0);
        Self { ns, ifindex }
    }

    /// A packet socket catching every frame that comes in on `frag0`.
    fn capture(&self) -> Capture {
        let ifindex = self.ifindex;
        self.ns.run(move || unsafe {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            );
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            Capture(std::os::fd::FromRawFd::from_raw_fd(fd))
        })
    }
}

struct Capture(std::os::fd::OwnedFd);

impl Capture {
    /// The IPv4 frames that came in (outgoing ones aside): waiting up to a
    /// second for each of the `expected` ones, then 50 ms for any more.
    fn frames(&self, expected: usize) -> Vec<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 70_000];
        // Bounded: a train has at most 64 held fragments.
        for _ in 0..256 {
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let wait = if frames.len() < expected { 1000 } else { 50 };
            if unsafe { libc::poll(&mut pfd, 1, wait) } != 1 {
                break;
            }
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            assert!(n >= 0, "recvfrom: {}", std::io::Error::last_os_error());
            // IPv4 only: the veth pair's own IPv6 chatter comes in too.
            if from.sll_pkttype != libc::PACKET_OUTGOING && buf[12..14] == [0x08, 0x00] {
                frames.push(buf[..n as usize].to_vec());
            }
        }
        frames
    }
}

/// `frame` (Ethernet + IPv4 without options + payload) cut into fragments
/// of `size` bytes of IP payload (a multiple of 8), IP id `id`, each with
/// its own header and IPv4 checksum; the payload (L4 checksum included) is
/// left as it was.
fn fragments(frame: &[u8], size: usize, id: u16) -> Vec<Vec<u8>> {
    assert_eq!(size % 8, 0);
    let payload = &frame[ETH + 20..];
    let pieces: Vec<&[u8]> = payload.chunks(size).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut f = frame[..ETH + 20].to_vec();
            f.extend_from_slice(piece);
            f[ETH + 2..ETH + 4].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            f[ETH + 4..ETH + 6].copy_from_slice(&id.to_be_bytes());
            let more = if i + 1 < pieces.len() { 0x2000 } else { 0 };
            let offset = (i * size / 8) as u16;
            f[ETH + 6..ETH + 8].copy_from_slice(&(more | offset).to_be_bytes());
            f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
            let c = checksum(&f[ETH..ETH + 20]);
            f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
            f
        })
        .collect()
}

/// The datagram `fragments` (translated, in any order) make: every
/// fragment's addresses agree and its IPv4 checksum is right; returns the
/// reassembled frame (the first fragment's headers, all the payload).
fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
    let offset = |f: &Vec<u8>| (u16::from_be_bytes([f[ETH + 6], f[ETH + 7]]) & 0x1fff) as usize * 8;
    let mut sorted: Vec<&Vec<u8>> = fragments.iter().collect();
    sorted.sort_by_key(|f| offset(f));
    let first = sorted[0];
    assert_eq!(offset(first), 0, "the first fragment is there");
    let mut frame = first[..ETH + 20].to_vec();
    for f in &sorted {
        assert!(ip_csum_ok(f), "IPv4 checksum of a fragment: {f:02x?}");
        assert_eq!(
            (ip_src(f), ip_dst(f)),
            (ip_src(first), ip_dst(first)),
            "every fragment goes where the first went"
        );
        assert_eq!(offset(f), frame.len() - ETH - 20, "no fragment missing");
        frame.extend_from_slice(&f[ETH + 20..]);
    }
    let len = (frame.len() - ETH) as u16;
    frame[ETH + 2..ETH + 4].copy_from_slice(&len.to_be_bytes());
    frame[ETH + 6..ETH + 8].copy_from_slice(&[0, 0]);
    frame[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[ETH..ETH + 20]);
    frame[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    frame
}

/// Every order of `n` items.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut all = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut p = rest.clone();
            p.insert(at, n - 1);
            all.push(p);
        }
    }
    all
}

/// Runs the fragments of `train` in `order` through the pod program on
/// `replay.ifindex`, as the kernel would: fragments that come before the
/// first are held (dropped, stashed); the first is translated and the held
/// ones come back into the interface's ingress, where they are run again.
/// Returns every fragment's output (by index) and how many were held.
fn run_train(
    fx: &mut Fixture,
    replay: &ReplayNs,
    hook: Hook,
    train: &[Vec<u8>],
    order: &[usize],
) -> (Vec<Option<Vec<u8>>>, usize) {
    let capture = replay.capture();
    let mut out: Vec<Option<Vec<u8>>> = vec![None; train.len()];
    let mut held = Vec::new();
    let mut first_seen = false;
    for &i in order {
        let (ret, result) = replay
            .ns
            .run(|| fx.run_hook_on(hook, &train[i], replay.ifindex));
        if i == 0 {
            first_seen = true;
        }
        if !first_seen {
            assert_eq!(ret, TC_ACT_SHOT, "fragment {i} before the first is held");
            held.push(i);
        } else {
            assert_eq!(ret, TC_ACT_OK, "fragment {i} of order {order:?}");
            out[i] = Some(result);
        }
    }
    let replayed = capture.frames(held.len());
    assert_eq!(
        replayed.len(),
        held.len(),
        "order {order:?}: every held fragment comes back once"
    );
    for frame in replayed {
        let i = held
            .iter()
            .copied()
            .find(|&i| train[i] == frame)
            .unwrap_or_else(|| panic!("replayed a frame that was not held: {frame:02x?}"));
        let (ret, result) = replay
            .ns
            .run(|| fx.run_hook_on(hook, &frame, replay.ifindex));
        assert_eq!(ret, TC_ACT_OK, "replayed fragment {i}");
        out[i] = Some(result);
    }
    (out, held.len())
}

/// Datagrams of TCP and UDP, cut into 4 fragments, through a Service in
/// all 24 orders: every fragment leaves for the endpoint the first one's
/// flow chose, none is lost, and the reassembled datagram has the
/// endpoint's port and a right L4 checksum.
#[test]
fn fragment_trains_are_translated_in_every_order() {
    let mut fx = Fixture::new();
    let replay = ReplayNs::new();
    let payload: Vec<u8> = (0..2500u32).map(|i| (i * 7 + 3) as u8).collect();
    let (mut trains, mut held) = (0, 0);
    for l4 in [proto::TCP, proto::UDP] {
        for (n, order) in permutations(4).into_iter().enumerate() {
            let port = 30000 + n as u16 + if l4 == proto::TCP { 100 } else { 0 };
            let datagram = packet(CLIENT, VIP, port, SVC_PORT, l4, SYN, &payload);
            let id = 0x4000 + trains;
            let train = fragments(&datagram, 800, id);
            assert_eq!(train.len(), 4);
            let (out, h) = run_train(&mut fx, &replay, Hook::Pod, &train, &order);
            let out: Vec<Vec<u8>> = out
                .into_iter()
                .map(|o| o.expect("every fragment came out"))
                .collect();
            let whole = reassemble(&out);
            assert!(BACKENDS.contains(&ip_dst(&whole)), "{}", ip_dst(&whole));
            assert_eq!(
                (ip_src(&whole), sport(&whole), dport(&whole)),
                (CLIENT, port, BACKEND_PORT)
            );
            assert_checksums(&whole);
            assert_eq!(&whole[whole.len() - payload.len()..], &payload[..]);
            trains += 1;
            held += h;
        }
    }
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::FRAG_STASHED as usize], held as u64);
    assert_eq!(stats[stat::FRAG_REPLAYED as usize], held as u64);
    assert_eq!(stats[stat::FRAG_UNTRANSLATED as usize], 0);
    assert_eq!(stats[stat::FRAGMENTS as usize], 3 * u64::from(trains));
}

/// The other paths a fragmented datagram takes: an endpoint's fragmented
/// reply (reverse-translated), a Service without endpoints (REJECT answers
/// the first fragment, the rest are dropped, held ones too), DROP,
/// traffic that is not a Service's (left alone, held ones replayed
/// unchanged), the node's own fragmented answer at egress, XDP (leaves
/// every fragment to TC), and the bound on held fragments per datagram.
#[test]
fn fragments_follow_their_first_on_every_path() {
    let mut fx = Fixture::new();
    let replay = ReplayNs::new();
    let payload: Vec<u8> = (0..2000u32).map(|i| (i * 13 + 1) as u8).collect();
    let on = |fx: &mut Fixture, hook: Hook, p: &[u8]| {
        replay.ns.run(|| fx.run_hook_on(hook, p, replay.ifindex))
    };

    // A reply, fragmented by the endpoint, in order and reversed.
    let (_, out) = on(&mut fx, Hook::Pod, &udp(CLIENT, VIP, 31000, SVC_PORT));
    let backend = ip_dst(&out);
    for (id, order) in [(0x5000, vec![0, 1, 2]), (0x5001, vec![2, 1, 0])] {
        let reply = packet(
            backend,
            CLIENT,
            BACKEND_PORT,
            31000,
            proto::UDP,
            0,
            &payload,
        );
        let train = fragments(&reply, 800, id);
        let (out, _) = run_train(&mut fx, &replay, Hook::Pod, &train, &order);
        let out: Vec<Vec<u8>> = out.into_iter().map(Option::unwrap).collect();
        let whole = reassemble(&out);
        assert_eq!((ip_src(&whole), sport(&whole)), (VIP, SVC_PORT));
        assert_eq!((ip_dst(&whole), dport(&whole)), (CLIENT, 31000));
        assert_checksums(&whole);
    }

    // No endpoints: REJECT answers the first fragment; the others go,
    // those held before it too (nothing replayed).
    let capture = replay.capture();
    let train = fragments(
        &packet(CLIENT, VIP_EMPTY, 31001, SVC_PORT, proto::UDP, 0, &payload),
        800,
        0x5002,
    );
    assert_eq!(on(&mut fx, Hook::Pod, &train[2]).0, TC_ACT_SHOT);
    let (ret, answer) = on(&mut fx, Hook::Pod, &train[0]);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(
        (answer[ETH + 9], answer[ETH + 20], answer[ETH + 21]),
        (proto::ICMP, 3, 3)
    );
    assert_eq!(on(&mut fx, Hook::Pod, &train[1]).0, TC_ACT_SHOT);
    assert!(capture.frames(0).is_empty());
    // DROP: all of them.
    let train = fragments(
        &packet(CLIENT, VIP_DROP, 31002, SVC_PORT, proto::UDP, 0, &payload),
        800,
        0x5003,
    );
    for f in &train {
        assert_eq!(on(&mut fx, Hook::Pod, f).0, TC_ACT_SHOT);
    }

    // Not a Service's: untouched, in order or not.
    let other = Ipv4Addr::new(192, 0, 2, 7);
    for (id, order) in [(0x5004, vec![0, 1, 2]), (0x5005, vec![1, 2, 0])] {
        let train = fragments(
            &packet(CLIENT, other, 31003, 53, proto::UDP, 0, &payload),
            800,
            id,
        );
        let (out, _) = run_train(&mut fx, &replay, Hook::Pod, &train, &order);
        for (i, o) in out.into_iter().enumerate() {
            assert_eq!(o.as_ref(), Some(&train[i]), "fragment {i} unchanged");
        }
    }

    // The node's own fragmented answer (a host endpoint's), at egress, in
    // order: translated by the flow's reply entry; a later fragment of a
    // datagram never seen is left alone.
    let (_, out) = on(&mut fx, Hook::Pod, &udp(CLIENT, VIP, 31004, SVC_PORT));
    let host_reply = packet(
        ip_dst(&out),
        CLIENT,
        BACKEND_PORT,
        31004,
        proto::UDP,
        0,
        &payload,
    );
    let train = fragments(&host_reply, 800, 0x5006);
    let out: Vec<Vec<u8>> = train
        .iter()
        .map(|f| {
            let (ret, out) = fx.run_egress(f, 0);
            assert_eq!(ret, TC_ACT_OK);
            out
        })
        .collect();
    let whole = reassemble(&out);
    assert_eq!((ip_src(&whole), sport(&whole)), (VIP, SVC_PORT));
    assert_checksums(&whole);
    let stray = fragments(&host_reply, 800, 0x5007);
    assert_eq!(fx.run_egress(&stray[1], 0), (TC_ACT_OK, stray[1].clone()));

    // XDP leaves fragments, first or not, to TC.
    let train = fragments(
        &packet(CLIENT, VIP, 31005, SVC_PORT, proto::UDP, 0, &payload),
        800,
        0x5008,
    );
    for f in &train {
        let (ret, out) = replay.ns.run(|| fx.run_xdp(f, replay.ifindex));
        assert_eq!((ret, &out), (XDP_PASS, f));
    }

    // At most FRAG_STASH_PER_DATAGRAM held per datagram: the next one goes
    // on untranslated, counted.
    let big: Vec<u8> = vec![7; 66 * 8 * 2];
    let train = fragments(
        &packet(CLIENT, VIP, 31006, SVC_PORT, proto::UDP, 0, &big),
        16,
        0x5009,
    );
    assert!(train.len() > proxy_common::FRAG_STASH_PER_DATAGRAM as usize + 1);
    let before = fx.upkeep.stats().unwrap()[stat::FRAG_UNTRANSLATED as usize];
    let capture = replay.capture();
    for (i, f) in train
        .iter()
        .enumerate()
        .skip(1)
        .take(proxy_common::FRAG_STASH_PER_DATAGRAM as usize + 1)
    {
        let (ret, out) = on(&mut fx, Hook::Pod, f);
        if i <= proxy_common::FRAG_STASH_PER_DATAGRAM as usize {
            assert_eq!(ret, TC_ACT_SHOT, "fragment {i} held");
        } else {
            assert_eq!((ret, &out), (TC_ACT_OK, f), "fragment {i}: no room, passed");
        }
    }
    assert_eq!(
        fx.upkeep.stats().unwrap()[stat::FRAG_UNTRANSLATED as usize],
        before + 1
    );
    let (ret, _) = on(&mut fx, Hook::Pod, &train[0]);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(
        capture
            .frames(proxy_common::FRAG_STASH_PER_DATAGRAM as usize)
            .len(),
        proxy_common::FRAG_STASH_PER_DATAGRAM as usize,
        "the held ones are sent on"
    );
}

/// The node program: a fragmented datagram to a masqueraded NodePort whose
/// endpoint is behind another node. Every fragment is masqueraded and sent
/// out by FIB redirect as its first was (XDP passes them all to TC).
#[test]
fn fragments_of_a_nodeport_flow_follow_their_first_out_of_the_node() {
    let mut fx = Fixture::new();
    fx.add_nodeport(NODE, NODEPORT_REMOTE, 0, 100);
    let node = fib_node();
    let payload: Vec<u8> = (0..2000u32).map(|i| (i * 3) as u8).collect();
    let datagram = packet(
        EXT_CLIENT,
        NODE,
        33000,
        NODEPORT_REMOTE,
        proto::UDP,
        0,
        &payload,
    );
    let train = fragments(&datagram, 800, 0x6000);
    let out: Vec<Vec<u8>> = train
        .iter()
        .map(|f| {
            let (ret, out) = node.ns.run(|| fx.run_xdp(f, node.eth0));
            assert_eq!((ret, &out), (XDP_PASS, f), "XDP leaves fragments to TC");
            let (ret, out) = node.ns.run(|| fx.run_hook_on(Hook::Node, f, node.eth0));
            assert_eq!(ret, TC_ACT_REDIRECT, "out by FIB redirect, as the first");
            assert_eq!(out[0..6], OTHER_NODE_MAC);
            assert_eq!(ttl(&out), ttl(f) - 1);
            out
        })
        .collect();
    let whole = reassemble(&out);
    assert_eq!((ip_src(&whole), sport(&whole)), (NODE, 33000));
    assert_eq!((ip_dst(&whole), dport(&whole)), (BACKENDS[0], BACKEND_PORT));
    assert_checksums(&whole);
}

// ---- tuple reuse ------------------------------------------------------------------------------

/// A frontend whose one endpoint is backend 0 (TCP and UDP), so a client
/// port's Service flow and its direct connection share the tuple towards
/// the endpoint.
const VIP_ONE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);

fn add_vip_one(fx: &mut Fixture) {
    let mut ops = vec![MapOp::PutService(
        svc_key4(ServiceKey::cluster_ip(addr_to_map(VIP_ONE))),
        ServiceValue::service(0, 0, SVC_FLAG_REJECT),
    )];
    for (j, p) in [proto::TCP, proto::UDP].into_iter().enumerate() {
        let key = ServiceKey::new(addr_to_map(VIP_ONE), port_to_map(SVC_PORT), p, 0);
        ops.push(MapOp::PutService(
            svc_key4(key.with_slot(1)),
            ServiceValue::slot(j as u32 + 1),
        ));
        ops.push(MapOp::PutService(
            svc_key4(key),
            ServiceValue::service(40 + j as u32, 1, 0),
        ));
    }
    assert!(fx.dp.apply(&ops).is_empty());
}

/// The packet's (source, source port, destination, destination port).
fn tuple(p: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    (ip_src(p), sport(p), ip_dst(p), dport(p))
}

/// The issue's sequence: a Service flow ends (FIN both ways), then the
/// client opens a connection straight to the endpoint from the same port.
/// Its packets and the endpoint's answers are left as they are (before,
/// the answers matched the closed flow's reply entry and came back from
/// the VIP); the closed flow's entry is taken over, no port remapped.
#[test]
fn a_direct_connection_on_a_closed_service_flows_tuple_is_not_translated() {
    const FIN: u8 = 0x01;
    let mut fx = Fixture::new();
    add_vip_one(&mut fx);
    let b = BACKENDS[0];
    let port = 56000;
    fx.run(&tcp(CLIENT, VIP_ONE, port, SVC_PORT, SYN));
    fx.run(&tcp(b, CLIENT, BACKEND_PORT, port, SYN | ACK));
    fx.run(&tcp(CLIENT, VIP_ONE, port, SVC_PORT, FIN | ACK));
    fx.run(&tcp(b, CLIENT, BACKEND_PORT, port, FIN | ACK));
    for (input, flags) in [
        (tcp(CLIENT, b, port, BACKEND_PORT, SYN), "SYN"),
        (tcp(b, CLIENT, BACKEND_PORT, port, SYN | ACK), "SYN-ACK"),
        (tcp(CLIENT, b, port, BACKEND_PORT, ACK), "ACK"),
        (tcp(b, CLIENT, BACKEND_PORT, port, ACK), "answer"),
    ] {
        let (ret, out) = fx.run(&input);
        assert_eq!(
            (ret, &out),
            (TC_ACT_OK, &input),
            "{flags} must be untouched"
        );
    }
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::DIRECT_FLOWS as usize], 1);
    assert_eq!(stats[stat::PORT_REMAPS as usize], 0);
    // UDP: a Service flow idle past its timeout is over as well.
    let mut fx = Fixture::with_timeouts(CtTimeouts {
        udp: std::time::Duration::ZERO,
        ..CtTimeouts::default()
    });
    add_vip_one(&mut fx);
    fx.run(&udp(CLIENT, VIP_ONE, port, SVC_PORT));
    // Longer than a tick: the datapath reads the coarse clock.
    std::thread::sleep(std::time::Duration::from_millis(10));
    let direct = udp(CLIENT, b, port, BACKEND_PORT);
    assert_eq!(fx.run(&direct).1, direct);
    let answer = udp(b, CLIENT, BACKEND_PORT, port);
    assert_eq!(fx.run(&answer).1, answer);
    assert_eq!(fx.upkeep.stats().unwrap()[stat::PORT_REMAPS as usize], 0);
}

/// Two live connections whose tuples towards the endpoint clash, in both
/// orders and for TCP and UDP: the later one gets another source port (as
/// netfilter's NAT remaps a clashing tuple), and both keep working.
#[test]
fn a_clash_with_a_live_flow_remaps_the_later_ones_source_port() {
    let mut fx = Fixture::new();
    add_vip_one(&mut fx);
    let b = BACKENDS[0];
    let makers: [(u8, MakePacket); 2] = [(proto::TCP, tcp_syn), (proto::UDP, udp)];
    let mut remaps = 0;
    for (l4, make) in makers {
        for service_first in [true, false] {
            let port = 57000 + u16::from(l4) * 2 + u16::from(service_first);
            let via_vip = make(CLIENT, VIP_ONE, port, SVC_PORT);
            let direct = make(CLIENT, b, port, BACKEND_PORT);
            let (first, second) = if service_first {
                (&via_vip, &direct)
            } else {
                (&direct, &via_vip)
            };
            let (_, out1) = fx.run(first);
            let (_, out2) = fx.run(second);
            remaps += 1;
            let what = format!("proto {l4}, service first: {service_first}");
            assert_eq!(
                tuple(&out1),
                (CLIENT, port, b, BACKEND_PORT),
                "{what}: the first keeps its port"
            );
            let moved = sport(&out2);
            assert_ne!(moved, port, "{what}: the later one is remapped");
            assert_eq!(tuple(&out2), (CLIENT, moved, b, BACKEND_PORT), "{what}");
            assert_checksums(&out2);
            // Each one's answers reach its own socket.
            let answer = |to: u16| make(b, CLIENT, BACKEND_PORT, to);
            let (to_first, to_second) = (fx.run(&answer(port)).1, fx.run(&answer(moved)).1);
            let (to_vip, to_direct) = if service_first {
                (to_first, to_second)
            } else {
                (to_second, to_first)
            };
            assert_eq!(tuple(&to_vip), (VIP_ONE, SVC_PORT, CLIENT, port), "{what}");
            assert_eq!(tuple(&to_direct), (b, BACKEND_PORT, CLIENT, port), "{what}");
            assert_checksums(&to_vip);
            assert_checksums(&to_direct);
            // And later packets of both keep their translation.
            let next = |p: &[u8]| {
                let mut p = p.to_vec();
                if l4 == proto::TCP {
                    p = tcp(ip_src(&p), ip_dst(&p), sport(&p), dport(&p), ACK);
                }
                p
            };
            assert_eq!(tuple(&fx.run(&next(first)).1), tuple(&out1), "{what}");
            assert_eq!(tuple(&fx.run(&next(second)).1), tuple(&out2), "{what}");
        }
    }
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::PORT_REMAPS as usize], remaps);
    assert_eq!(stats[stat::DIRECT_FLOWS as usize], remaps);
}

/// A masqueraded source is shared by every external client: one client's
/// closing flow keeps its node port until it is over, and another client
/// using the same port gets another one (its own reused port, by contrast,
/// takes its old flow's over: see the tests above).
#[test]
fn a_shared_source_never_takes_another_clients_closing_flow() {
    const FIN: u8 = 0x01;
    let mut fx = Fixture::new();
    fx.add_nodeport(NODE, NODEPORT_REMOTE, 0, 100);
    let node = fib_node();
    let other = Ipv4Addr::new(192, 168, 50, 101);
    let on_node =
        |fx: &mut Fixture, p: &[u8]| node.ns.run(|| fx.run_hook_on(Hook::Node, p, node.eth0));
    let (_, first) = on_node(&mut fx, &tcp(EXT_CLIENT, NODE, 45000, NODEPORT_REMOTE, SYN));
    assert_eq!((ip_src(&first), sport(&first)), (NODE, 45000));
    on_node(
        &mut fx,
        &tcp(EXT_CLIENT, NODE, 45000, NODEPORT_REMOTE, FIN | ACK),
    );
    let (_, second) = on_node(&mut fx, &tcp(other, NODE, 45000, NODEPORT_REMOTE, SYN));
    assert_eq!(ip_src(&second), NODE);
    assert_ne!(
        sport(&second),
        45000,
        "the closing flow keeps its node port"
    );
    // The first client's last packets still find their way back.
    let (_, late) = on_node(
        &mut fx,
        &tcp(BACKENDS[0], NODE, BACKEND_PORT, 45000, FIN | ACK),
    );
    assert_eq!((ip_dst(&late), dport(&late)), (EXT_CLIENT, 45000));
    assert_eq!(fx.upkeep.stats().unwrap()[stat::PORT_REMAPS as usize], 0);
}

// ---- the node itself as an endpoint ----------------------------------------------------------

/// A NodePort (externalTrafficPolicy Cluster: masqueraded) whose endpoint
/// is the node itself: the request goes to the local stack with the client
/// kept (neither masqueraded to the node's own address nor redirected), and
/// the node's answer is reversed at egress. The same endpoint is an
/// ordinary masqueraded one where the address is not the node's.
#[test]
fn nodeport_to_the_node_itself_is_delivered_locally_with_the_client_kept() {
    let mut fx = Fixture::new();
    let ids = [50, 51];
    let ops: Vec<MapOp> = [proto::TCP, proto::UDP]
        .into_iter()
        .zip(ids)
        .map(|(p, id)| {
            MapOp::PutBackend(
                id,
                backend4(Backend::new(addr_to_map(NODE), port_to_map(9090), p)),
            )
        })
        .collect();
    assert!(fx.dp.apply(&ops).is_empty());
    fx.add_nodeport_to(NODE, 30090, ids, 300);
    let node = fib_node();

    // Not (yet) known as the node's address: masqueraded, as to any
    // endpoint (which the node's stack would drop: its own address as
    // source, coming in from outside).
    let syn = tcp(EXT_CLIENT, NODE, 44000, 30090, SYN);
    let (_, out) = node.ns.run(|| fx.run_hook_on(Hook::Node, &syn, node.eth0));
    assert_eq!((ip_src(&out), ip_dst(&out)), (NODE, NODE));

    assert_eq!(
        fx.dp
            .set_node_addresses(&[NODE.into(), GATEWAY.into()])
            .unwrap(),
        2
    );
    let makers: [(u8, MakePacket); 2] = [(proto::TCP, tcp_syn), (proto::UDP, udp)];
    for (l4, make) in makers {
        let port = 44001 + u16::from(l4);
        let request = make(EXT_CLIENT, NODE, port, 30090);
        // XDP leaves it to TC, which hands it to the stack.
        let (ret, out) = node.ns.run(|| fx.run_xdp(&request, node.eth0));
        assert_eq!((ret, &out), (XDP_PASS, &request), "proto {l4}");
        let (ret, out) = node
            .ns
            .run(|| fx.run_hook_on(Hook::Node, &request, node.eth0));
        assert_eq!(ret, TC_ACT_OK, "proto {l4}: to the local stack");
        assert_eq!(
            (ip_src(&out), sport(&out), ip_dst(&out), dport(&out)),
            (EXT_CLIENT, port, NODE, 9090),
            "proto {l4}: the client is kept"
        );
        assert_checksums(&out);
        let (ret, reply) = fx.run_egress(&make(NODE, EXT_CLIENT, 9090, port), 0);
        assert_eq!(ret, TC_ACT_OK);
        assert_eq!(
            (ip_src(&reply), sport(&reply), ip_dst(&reply), dport(&reply)),
            (NODE, 30090, EXT_CLIENT, port),
            "proto {l4}: the node's answer leaves from the NodePort"
        );
        assert_checksums(&reply);
    }
    let own: Vec<_> = ct_entries(&fx)
        .into_iter()
        .filter(|(_, v)| v.backend_id >= 50)
        .collect();
    assert!(
        own.iter()
            .filter(|(k, _)| k.sport != port_to_map(44000) && k.dport != port_to_map(44000))
            .all(|(_, v)| !v.is_snat() && !v.redirects()),
        "{own:?}"
    );
    // Addresses that go are forgotten.
    assert_eq!(fx.dp.set_node_addresses(&[GATEWAY.into()]).unwrap(), 1);
    let syn = tcp(EXT_CLIENT, NODE, 44100, 30090, SYN);
    let (_, out) = node.ns.run(|| fx.run_hook_on(Hook::Node, &syn, node.eth0));
    assert_eq!(ip_src(&out), NODE);
}

// ---- ICMP errors ----------------------------------------------------------------------------

/// The node's address on the client's link (its pod gateway).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

/// A packet from (address, port) to (address, port).
type MakePacket = fn(Ipv4Addr, Ipv4Addr, u16, u16) -> Vec<u8>;

/// `tcp` with SYN, as a function like `udp`.
fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    tcp(src, dst, sport, dport, SYN)
}

/// Netfilter's RELATED translation: an ICMP error about a packet of a
/// translated flow is translated as a packet of that flow going its way,
/// the quote turned back into what the peer sent (or expects), every
/// checksum right. Both directions, every error type, short and whole
/// quotes, TCP and UDP (with and without checksum).
#[test]
fn icmp_errors_about_a_translated_flow_are_translated_both_ways() {
    let mut fx = Fixture::new();
    let mut translated = 0;
    let makers: [(u8, MakePacket); 2] = [(proto::TCP, tcp_syn), (proto::UDP, udp)];
    for (l4, make) in makers {
        for udp_csum in [true, false] {
            if l4 == proto::TCP && !udp_csum {
                continue;
            }
            let port = 52000 + u16::from(l4) + u16::from(udp_csum);
            let mut request = make(CLIENT, VIP, port, SVC_PORT);
            if !udp_csum {
                request[ETH + 26..ETH + 28].copy_from_slice(&[0, 0]);
            }
            let (_, dnat) = fx.run(&request);
            let backend = ip_dst(&dnat);
            let whole = dnat.len() - ETH;
            // To the client about the DNAT-ed request: a backend's port
            // unreachable, a router's "fragmentation needed" (MTU 1400),
            // time exceeded, parameter problem; quoting 8 bytes of L4 or
            // the whole packet.
            for (from, kind, code, rest, quote) in [
                (backend, 3, 3, [0; 4], 28),
                (GATEWAY, 3, 4, [0, 0, 0x05, 0x78], whole),
                (GATEWAY, 11, 0, [0; 4], whole),
                (backend, 12, 0, [20, 0, 0, 0], 28),
            ] {
                let error = icmp_error(from, CLIENT, kind, code, rest, &dnat[ETH..ETH + quote]);
                let (ret, out) = fx.run(&error);
                assert_eq!(ret, TC_ACT_OK);
                assert_eq!(out.len(), error.len());
                assert_eq!(
                    (ip_src(&out), ip_dst(&out)),
                    (VIP, CLIENT),
                    "type {kind}/{code}: from the frontend, as netfilter's"
                );
                assert_eq!(
                    &out[ETH + 28..],
                    &request[ETH..ETH + quote],
                    "type {kind}/{code}, proto {l4}: quotes what the client sent"
                );
                assert_eq!(&out[ETH + 20..ETH + 22], &[kind, code]);
                assert_eq!(&out[ETH + 24..ETH + 28], &rest);
                assert_icmp_checksums(&out);
                translated += 1;
            }
            // The backend's reply, reverse-translated, and the client's
            // error about it: to the backend, quoting what it sent.
            let mut reply = make(backend, CLIENT, BACKEND_PORT, port);
            if !udp_csum {
                reply[ETH + 26..ETH + 28].copy_from_slice(&[0, 0]);
            }
            let (_, reversed) = fx.run(&reply);
            assert_eq!(ip_src(&reversed), VIP);
            let error = icmp_error(CLIENT, VIP, 3, 3, [0; 4], &reversed[ETH..]);
            let (ret, out) = fx.run(&error);
            assert_eq!(ret, TC_ACT_OK);
            assert_eq!((ip_src(&out), ip_dst(&out)), (CLIENT, backend));
            assert_eq!(&out[ETH + 28..], &reply[ETH..], "proto {l4}");
            assert_icmp_checksums(&out);
            translated += 1;
        }
    }
    assert_eq!(
        fx.upkeep.stats().unwrap()[stat::ICMP_ERRORS as usize],
        translated
    );
}

/// A hairpin flow's errors: the backend is its own client behind the
/// hairpin address, both ways.
#[test]
fn icmp_errors_about_a_hairpin_flow_are_translated() {
    let mut fx = Fixture::new();
    let me = BACKENDS[2];
    let (port, out) = (47000..47200)
        .map(|port| (port, fx.run(&udp(me, VIP, port, SVC_PORT)).1))
        .find(|(_, out)| ip_dst(out) == me)
        .expect("a backend never picked itself in 200 flows");
    let request = udp(me, VIP, port, SVC_PORT);
    let error = icmp_error(me, HAIRPIN, 3, 3, [0; 4], &out[ETH..]);
    let (_, translated) = fx.run(&error);
    assert_eq!((ip_src(&translated), ip_dst(&translated)), (VIP, me));
    assert_eq!(&translated[ETH + 28..], &request[ETH..]);
    assert_icmp_checksums(&translated);
    let reply = udp(me, HAIRPIN, BACKEND_PORT, port);
    let (_, reversed) = fx.run(&reply);
    let error = icmp_error(me, VIP, 3, 3, [0; 4], &reversed[ETH..]);
    let (_, translated) = fx.run(&error);
    assert_eq!((ip_src(&translated), ip_dst(&translated)), (HAIRPIN, me));
    assert_eq!(&translated[ETH + 28..], &reply[ETH..]);
    assert_icmp_checksums(&translated);
}

/// ICMP that is no error about a tracked flow is not ours.
#[test]
fn other_icmp_passes_untouched() {
    let mut fx = Fixture::new();
    let request = tcp(CLIENT, VIP, 54000, SVC_PORT, SYN);
    let (_, dnat) = fx.run(&request);
    let backend = ip_dst(&dnat);
    let mut non_first = dnat.clone();
    non_first[ETH + 6..ETH + 8].copy_from_slice(&[0x20, 0x10]);
    let mut ip_options = dnat.clone();
    ip_options[ETH] = 0x44;
    let cases = [
        // Echo request and a redirect about the flow.
        packet(CLIENT, VIP, 0x0800, 0, proto::ICMP, 0, b"ping"),
        icmp_error(
            GATEWAY,
            CLIENT,
            5,
            1,
            GATEWAY.octets(),
            &dnat[ETH..ETH + 28],
        ),
        // About a flow nobody tracks.
        icmp_error(
            backend,
            CLIENT,
            3,
            3,
            [0; 4],
            &tcp(CLIENT, backend, 54001, BACKEND_PORT, SYN)[ETH..ETH + 28],
        ),
        // Quoting fewer than the 8 bytes of ports it needs, a non-first
        // fragment (no ports), a bogus quoted header length.
        icmp_error(backend, CLIENT, 3, 3, [0; 4], &dnat[ETH..ETH + 26]),
        icmp_error(backend, CLIENT, 3, 3, [0; 4], &non_first[ETH..ETH + 28]),
        icmp_error(backend, CLIENT, 3, 3, [0; 4], &ip_options[ETH..ETH + 28]),
    ];
    for input in cases {
        let (ret, out) = fx.run(&input);
        assert_eq!((ret, &out), (TC_ACT_OK, &input));
        let (ret, out) = fx.run_egress(&input, 0);
        assert_eq!((ret, out), (TC_ACT_OK, input));
    }
    assert_eq!(fx.upkeep.stats().unwrap()[stat::ICMP_ERRORS as usize], 0);
}

/// An error about a masqueraded NodePort flow, from its endpoint on another
/// node: back to the external client from the node address, sent out by
/// FIB redirect as the flow's replies are.
#[test]
fn icmp_error_about_a_masqueraded_nodeport_flow_reaches_the_client() {
    let mut fx = Fixture::new();
    fx.add_nodeport(NODE, NODEPORT_REMOTE, 0, 100);
    let node = fib_node();
    let syn = tcp(EXT_CLIENT, NODE, 43000, NODEPORT_REMOTE, SYN);
    let (_, out) = node.ns.run(|| fx.run_hook_on(Hook::Node, &syn, node.eth0));
    assert_eq!((ip_src(&out), ip_dst(&out)), (NODE, BACKENDS[0]));
    let error = icmp_error(BACKENDS[0], NODE, 3, 3, [0; 4], &out[ETH..ETH + 40]);
    let (ret, translated) = node
        .ns
        .run(|| fx.run_hook_on(Hook::Node, &error, node.eth0));
    assert_eq!(ret, TC_ACT_REDIRECT, "its source is the node's own address");
    assert_eq!(translated[0..6], EXT_CLIENT_MAC);
    assert_eq!(
        (ip_src(&translated), ip_dst(&translated)),
        (NODE, EXT_CLIENT)
    );
    // The quote is what the client sent, but for the hop the node counted
    // (and the quoted header's checksum, checked below).
    let mut sent = syn[ETH..ETH + 40].to_vec();
    sent[8] -= 1;
    sent[10..12].copy_from_slice(&translated[ETH + 28 + 10..ETH + 28 + 12]);
    assert_eq!(&translated[ETH + 28..], &sent[..]);
    assert_eq!(ttl(&translated), ttl(&error) - 1);
    assert_icmp_checksums(&translated);
}

/// What the node itself sends leaves by an interface's egress: a
/// "fragmentation needed" its stack sends about a DNAT-ed packet it cannot
/// forward, and a host endpoint's reply, are reverse-translated there. The
/// node never starts a flow at egress, and what it forwards was seen where
/// it came in.
#[test]
fn egress_translates_what_the_node_itself_sends() {
    let mut fx = Fixture::new();
    let request = tcp(CLIENT, VIP, 55000, SVC_PORT, ACK);
    let (_, dnat) = fx.run(&tcp(CLIENT, VIP, 55000, SVC_PORT, SYN));
    let (_, dnat_ack) = fx.run(&request);
    let backend = ip_dst(&dnat);
    let need_frag = icmp_error(GATEWAY, CLIENT, 3, 4, [0, 0, 0x05, 0x78], &dnat_ack[ETH..]);
    let (ret, out) = fx.run_egress(&need_frag, 0);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!((ip_src(&out), ip_dst(&out)), (VIP, CLIENT));
    assert_eq!(&out[ETH + 28..], &request[ETH..]);
    assert_icmp_checksums(&out);

    let reply = tcp(backend, CLIENT, BACKEND_PORT, 55000, SYN | ACK);
    let (ret, out) = fx.run_egress(&reply, 0);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!((ip_src(&out), sport(&out)), (VIP, SVC_PORT));
    assert_checksums(&out);
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::REPLY_HITS as usize], 1);

    // Forwarded: untouched, whatever it is.
    for input in [&need_frag, &reply] {
        let (ret, out) = fx.run_egress(input, 1);
        assert_eq!((ret, &out), (TC_ACT_OK, input));
    }
    // No flow starts at egress, not even to a frontend.
    let before = ct_entries(&fx).len();
    for input in [
        tcp(CLIENT, VIP, 55001, SVC_PORT, SYN),
        udp(CLIENT, VIP_EMPTY, 55002, SVC_PORT),
    ] {
        let (ret, out) = fx.run_egress(&input, 0);
        assert_eq!((ret, out), (TC_ACT_OK, input));
    }
    assert_eq!(ct_entries(&fx).len(), before);
    assert_eq!(fx.upkeep.stats().unwrap()[stat::ICMP_ERRORS as usize], 1);
}

// ---- Maglev ---------------------------------------------------------------------------------

/// A table over the TCP backends of VIP:80 at `indexes` (ids 2i+1).
fn vip_table(size: u32, indexes: &[usize]) -> TableSpec {
    let backends = indexes
        .iter()
        .map(|i| TableBackend {
            addr: BACKENDS[*i].into(),
            port: BACKEND_PORT,
            id: (*i * 2 + 1) as u32,
        })
        .collect();
    TableSpec::new(size, backends)
}

/// The backend address `table` gives a TCP flow from CLIENT:`sport` to VIP:80.
fn table_choice(table: &[u32], sport: u16) -> Ipv4Addr {
    let hash = flow_hash(
        addr_to_map(CLIENT),
        addr_to_map(VIP),
        port_to_map(sport),
        port_to_map(SVC_PORT),
        proto::TCP,
    );
    let id = table[(hash % table.len() as u32) as usize];
    BACKENDS[(id as usize - 1) / 2]
}

/// Switches VIP:80/TCP (svc id 1) to Maglev with `spec`.
fn use_table(fx: &mut Fixture, spec: &TableSpec) {
    let key = ServiceKey::new(addr_to_map(VIP), port_to_map(SVC_PORT), proto::TCP, 0);
    let ops = [
        MapOp::PutTable(1, spec.clone()),
        MapOp::PutService(svc_key4(key), ServiceValue::service(1, 3, SVC_FLAG_MAGLEV)),
    ];
    let failed = fx.dp.apply(&ops);
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
fn maglev_table_decides_the_backend_of_each_new_flow() {
    let mut fx = Fixture::new();
    let spec = vip_table(251, &[0, 1, 2]);
    use_table(&mut fx, &spec);
    let table = spec.build();
    assert_eq!(fx.dp.maglev_table(1).unwrap(), Some(table.clone()));
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40_000..40_300 {
        let (ret, out) = fx.run(&tcp(CLIENT, VIP, sport, SVC_PORT, SYN));
        assert_eq!(ret, TC_ACT_OK);
        assert_eq!(ip_dst(&out), table_choice(&table, sport), "sport {sport}");
        assert_checksums(&out);
        seen.insert(ip_dst(&out));
    }
    assert_eq!(seen.len(), 3, "every backend owns part of the table");
    // Conntrack gone (agent restart across a layout change, another node):
    // the same flow still reaches the same backend.
    assert!(fx.upkeep.flush_conntrack().unwrap() > 0);
    for sport in 40_000..40_050 {
        let (_, out) = fx.run(&tcp(CLIENT, VIP, sport, SVC_PORT, SYN));
        assert_eq!(ip_dst(&out), table_choice(&table, sport));
    }
    // Without a table the frontend falls back to its slots.
    assert!(fx.dp.apply(&[MapOp::DeleteTable(1)]).is_empty());
    assert_eq!(fx.dp.maglev_table(1).unwrap(), None);
    let (ret, out) = fx.run(&tcp(CLIENT, VIP, 40_999, SVC_PORT, SYN));
    assert_eq!(ret, TC_ACT_OK);
    assert!(BACKENDS.contains(&ip_dst(&out)));
}

/// Tables of different sizes and backends are swapped while packets flow:
/// every new flow must get exactly what the old or the new table says. A
/// table rewritten in place would show a new size over old entries (or the
/// reverse) and send flows where neither table does.
#[test]
fn maglev_table_swaps_atomically_under_traffic() {
    let mut fx = Fixture::new();
    let a = vip_table(251, &[0, 1]);
    let b = vip_table(509, &[1, 2]);
    use_table(&mut fx, &a);
    let (table_a, table_b) = (a.build(), b.build());
    let pin = maps_dir(fx.pin_dir()).join(proxy_common::map_names::MAGLEV);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapped = std::sync::Arc::new(AtomicU32::new(0));
    let swapper = {
        let stop = stop.clone();
        let swapped = swapped.clone();
        let (a, b) = (a.clone(), b.clone());
        std::thread::spawn(move || {
            let data = aya::maps::MapData::from_pin(&pin).expect("open the pinned maglev map");
            let map = aya::maps::Map::HashMap(data)
                .try_into()
                .expect("the maglev map is a hash map");
            let mut tables = MaglevTables::new(map);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(25);
            let mut swaps = 0u32;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let spec = if swaps.is_multiple_of(2) { &b } else { &a };
                tables.put(1, spec, &spec.build()).expect("swap table");
                swaps += 1;
                swapped.store(swaps, Ordering::Relaxed);
            }
            swaps
        })
    };
    let (mut from_a, mut from_b) = (0u32, 0u32);
    let mut sport = 1024u16;
    // At least 20,000 flows and 20 swaps (the swapper may start late on a
    // loaded machine), within 20 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut round = 0u32;
    while (round < 20_000 || swapped.load(Ordering::Relaxed) < 20)
        && std::time::Instant::now() < deadline
    {
        round += 1;
        // A fresh flow every time; the client address varies too once the
        // source ports wrap.
        sport = if sport == u16::MAX { 1024 } else { sport + 1 };
        let client = Ipv4Addr::from(u32::from(CLIENT) + (round >> 16));
        let (ret, out) = fx.run(&tcp(client, VIP, sport, SVC_PORT, SYN));
        assert_eq!(ret, TC_ACT_OK);
        let got = ip_dst(&out);
        let hash = flow_hash(
            addr_to_map(client),
            addr_to_map(VIP),
            port_to_map(sport),
            port_to_map(SVC_PORT),
            proto::TCP,
        );
        let want_a = BACKENDS[(table_a[(hash % 251) as usize] as usize - 1) / 2];
        let want_b = BACKENDS[(table_b[(hash % 509) as usize] as usize - 1) / 2];
        assert!(
            got == want_a || got == want_b,
            "round {round}: flow got {got}, table A says {want_a}, table B {want_b}"
        );
        from_a += u32::from(got == want_a && got != want_b);
        from_b += u32::from(got == want_b && got != want_a);
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper thread");
    assert!(swaps > 10, "only {swaps} swaps happened");
    assert!(
        from_a > 0 && from_b > 0,
        "both tables must have served flows (A {from_a}, B {from_b}, {swaps} swaps)"
    );
}

// ---- fuzz ----------------------------------------------------------------------------------

/// Whether the datapath must answer `input` with ICMP port unreachable: a
/// new flow to a frontend without endpoints, or to a cluster IP on a port
/// or protocol it does not serve.
fn expects_reject(input: &[u8]) -> bool {
    let l4 = input[ETH + 9];
    let dst = ip_dst(input);
    let served = dst == VIP && dport(input) == SVC_PORT;
    let empty = dst == VIP_EMPTY && dport(input) == SVC_PORT;
    let cluster_ip = [VIP, VIP_EMPTY, VIP_DROP].contains(&dst);
    ihl(input) == 20
        && (l4 == proto::TCP || l4 == proto::UDP)
        && (empty || (cluster_ip && !served && !(dst == VIP_DROP && dport(input) == SVC_PORT)))
}

/// What a correct datapath may do to one input.
fn check_fuzz_output(input: &[u8], ret: u32, out: &[u8]) -> Result<(), String> {
    if ret == TC_ACT_REDIRECT {
        if !expects_reject(input) {
            return Err("unexpected redirect".into());
        }
        assert_port_unreachable(input, out);
        return Ok(());
    }
    if ret != TC_ACT_OK && ret != TC_ACT_SHOT {
        return Err(format!("unexpected verdict {ret}"));
    }
    if out == input {
        return Ok(());
    }
    if input[12..14] == [0x08, 0x00] && input[ETH + 9] == proto::ICMP {
        return check_icmp_fuzz_output(input, out);
    }
    if input[12..14] == [0x08, 0x00]
        && u16::from_be_bytes([input[ETH + 6], input[ETH + 7]]) & 0x1fff != 0
    {
        return check_fragment_fuzz_output(input, out);
    }
    if out.len() != input.len() {
        return Err("length changed".into());
    }
    let off = ETH + ihl(input);
    let l4 = input[ETH + 9];
    let csum = off + if l4 == proto::TCP { 16 } else { 6 };
    // Only checksums, addresses and ports may move.
    let header_fields = [
        24,
        25,
        26,
        27,
        28,
        29,
        30,
        31,
        32,
        33,
        off,
        off + 1,
        off + 2,
        off + 3,
        csum,
        csum + 1,
    ];
    if let Some(i) = changed(input, out)
        .into_iter()
        .find(|i| !header_fields.contains(i))
    {
        return Err(format!("byte {i} changed"));
    }
    let (src, sp, dst, dp) = (ip_src(input), sport(input), ip_dst(input), dport(input));
    let after = (ip_src(out), sport(out), ip_dst(out), dport(out));
    let to_backend = BACKENDS.contains(&after.2) && after.3 == BACKEND_PORT && after.1 == sp;
    let dnat = dst == VIP && dp == SVC_PORT && to_backend && after.0 == src;
    let hairpin =
        dst == VIP && dp == SVC_PORT && to_backend && after.2 == src && after.0 == HAIRPIN;
    let from_backend = BACKENDS.contains(&src)
        && sp == BACKEND_PORT
        && after.0 == VIP
        && after.1 == SVC_PORT
        && after.3 == dp;
    let reverse = from_backend && after.2 == dst;
    let hairpin_reverse = from_backend && dst == HAIRPIN && after.2 == src;
    if !(dnat || hairpin || reverse || hairpin_reverse) {
        return Err(format!(
            "not a translation: {src}:{sp} -> {dst}:{dp} became {after:?}"
        ));
    }
    if ip_csum_ok(input) && !ip_csum_ok(out) {
        return Err("IPv4 checksum broken".into());
    }
    if l4_csum_ok(input) && !l4_csum_ok(out) {
        return Err("L4 checksum broken".into());
    }
    if l4 == proto::UDP && input[csum..csum + 2] == [0, 0] && out[csum..csum + 2] != [0, 0] {
        return Err("zero UDP checksum changed".into());
    }
    Ok(())
}

/// A changed ICMP packet must be an error about a flow of the fixture's
/// services translated as such (see
/// `icmp_errors_about_a_translated_flow_are_translated_both_ways`), with
/// no checksum broken.
fn check_icmp_fuzz_output(input: &[u8], out: &[u8]) -> Result<(), String> {
    if out.len() != input.len() {
        return Err("length changed".into());
    }
    let icmp = ETH + ihl(input);
    let inner = icmp + 8;
    let inner_ihl = (input[inner] & 0x0f) as usize * 4;
    let l4 = inner + inner_ihl;
    let l4_csum = l4
        + if input[inner + 9] == proto::TCP {
            16
        } else {
            6
        };
    let mut allowed: Vec<usize> = (ETH + 10..ETH + 20).collect();
    allowed.extend([icmp + 2, icmp + 3, inner + 10, inner + 11]);
    allowed.extend(inner + 12..inner + 20);
    allowed.extend([l4, l4 + 1, l4 + 2, l4 + 3, l4_csum, l4_csum + 1]);
    if let Some(i) = changed(input, out)
        .into_iter()
        .find(|i| !allowed.contains(i))
    {
        return Err(format!("byte {i} changed"));
    }
    let addr = |p: &[u8], o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let port = |p: &[u8], o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
    let quote = |p: &[u8]| {
        (
            addr(p, inner + 12),
            port(p, l4),
            addr(p, inner + 16),
            port(p, l4 + 2),
        )
    };
    let (q, after) = (quote(input), quote(out));
    let outer = (ip_src(out), ip_dst(out));
    // About a DNAT-ed request, to its client (the backend itself behind the
    // hairpin address): from the frontend, quoting client -> frontend.
    let client = if q.0 == HAIRPIN { q.2 } else { q.0 };
    let about_request = BACKENDS.contains(&q.2)
        && q.3 == BACKEND_PORT
        && after == (client, q.1, VIP, SVC_PORT)
        && outer == (VIP, client);
    // About a reverse-translated reply, to its backend: quoting backend ->
    // client (the hairpin address for a backend reaching itself).
    let about_reply = q.0 == VIP
        && q.1 == SVC_PORT
        && BACKENDS.contains(&after.0)
        && after.1 == BACKEND_PORT
        && after.3 == q.3
        && (after.2 == q.2 || (after.2 == HAIRPIN && after.0 == q.2))
        && outer == (after.2, after.0);
    if !(about_request || about_reply) {
        return Err(format!(
            "not a translation: quote {q:?} became {after:?}, outer {outer:?}"
        ));
    }
    let icmp_ok = |p: &[u8]| fold(sum16(&p[icmp..])) == 0xffff;
    let inner_ok = |p: &[u8]| fold(sum16(&p[inner..inner + inner_ihl])) == 0xffff;
    if ip_csum_ok(input) && !ip_csum_ok(out) {
        return Err("outer IPv4 checksum broken".into());
    }
    if icmp_ok(input) && !icmp_ok(out) {
        return Err("ICMP checksum broken".into());
    }
    if inner_ok(input) && !inner_ok(out) {
        return Err("quoted IPv4 checksum broken".into());
    }
    Ok(())
}

/// A changed later fragment (no ports) may only have had its addresses
/// translated as a packet of one of the fixture's flows, with a right IPv4
/// checksum if it had one.
fn check_fragment_fuzz_output(input: &[u8], out: &[u8]) -> Result<(), String> {
    if out.len() != input.len() {
        return Err("length changed".into());
    }
    if let Some(i) = changed(input, out)
        .into_iter()
        .find(|i| !(ETH + 10..ETH + 20).contains(i))
    {
        return Err(format!("byte {i} of a later fragment changed"));
    }
    let (src, dst) = (ip_src(input), ip_dst(input));
    let after = (ip_src(out), ip_dst(out));
    let forward =
        dst == VIP && BACKENDS.contains(&after.1) && (after.0 == src || after.0 == HAIRPIN);
    let reply = BACKENDS.contains(&src)
        && after.0 == VIP
        && (after.1 == dst || (dst == HAIRPIN && BACKENDS.contains(&after.1)));
    if !(forward || reply) {
        return Err(format!(
            "not a translation: {src} -> {dst} became {after:?}"
        ));
    }
    if ip_csum_ok(input) && !ip_csum_ok(out) {
        return Err("IPv4 checksum broken".into());
    }
    Ok(())
}

/// An ICMP error of a random type quoting a packet shaped like the flows
/// [`random_packet`] opens (so often one of them), cut at a random length.
fn random_icmp_error(rng: &mut StdRng) -> Vec<u8> {
    let mut quoted = random_packet(rng);
    let backend = BACKENDS[rng.random_range(0..3)];
    let (src, dst, sp, dp) = match rng.random_range(0..4) {
        0 => (CLIENT, backend, rng.random_range(1024..1100), BACKEND_PORT),
        1 => (VIP, CLIENT, SVC_PORT, rng.random_range(1024..1100)),
        2 => (HAIRPIN, backend, rng.random_range(1024..1100), BACKEND_PORT),
        _ => (VIP, backend, SVC_PORT, rng.random_range(1024..1100)),
    };
    if rng.random_bool(0.8) {
        let l4 = quoted[ETH + 9];
        let payload = ETH + 20 + if l4 == proto::TCP { 20 } else { 8 };
        quoted = packet(src, dst, sp, dp, l4, rng.random(), &quoted[payload..]);
    }
    let cut = rng.random_range(ETH + 20..=quoted.len());
    let kind = [3, 3, 11, 12, 5, 8][rng.random_range(0..6)];
    let (from, to) = match rng.random_range(0..3) {
        0 => (GATEWAY, ip_src(&quoted)),
        1 => (ip_dst(&quoted), ip_src(&quoted)),
        _ => (Ipv4Addr::from(rng.random::<u32>()), CLIENT),
    };
    icmp_error(
        from,
        to,
        kind,
        rng.random_range(0..5),
        rng.random(),
        &quoted[ETH..cut],
    )
}

fn random_packet(rng: &mut StdRng) -> Vec<u8> {
    let l4 = if rng.random_bool(0.5) {
        proto::TCP
    } else {
        proto::UDP
    };
    let payload: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
    let (src, dst, sp, dp) = match rng.random_range(0..8) {
        0 | 1 => (CLIENT, VIP, rng.random_range(1024..1100), SVC_PORT),
        5 => (
            BACKENDS[rng.random_range(0..3)],
            VIP,
            rng.random_range(1024..1100),
            SVC_PORT,
        ),
        6 => (
            BACKENDS[rng.random_range(0..3)],
            HAIRPIN,
            BACKEND_PORT,
            rng.random_range(1024..1100),
        ),
        7 => (
            CLIENT,
            [VIP, UNALLOCATED][rng.random_range(0..2)],
            rng.random(),
            rng.random_range(79..82),
        ),
        2 => (
            BACKENDS[rng.random_range(0..3)],
            CLIENT,
            BACKEND_PORT,
            rng.random_range(1024..1100),
        ),
        3 => (CLIENT, VIP_EMPTY, rng.random(), SVC_PORT),
        _ => (
            Ipv4Addr::from(rng.random::<u32>()),
            Ipv4Addr::from(rng.random::<u32>()),
            rng.random(),
            rng.random(),
        ),
    };
    packet(src, dst, sp, dp, l4, rng.random(), &payload)
}

fn mutate(rng: &mut StdRng, p: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..6) {
            0 => {
                let i = rng.random_range(0..p.len());
                p[i] = rng.random();
            }
            1 => {
                let len = rng.random_range(ETH..=p.len());
                p.truncate(len);
            }
            // Header fields the parser decides on.
            2 if p.len() > ETH => p[ETH] = 0x40 | rng.random_range(0..16u8),
            3 if p.len() > ETH + 6 => p[ETH + 6] = rng.random(),
            4 if p.len() > ETH + 9 => {
                p[ETH + 9] =
                    [proto::TCP, proto::UDP, proto::ICMP, rng.random()][rng.random_range(0..4)]
            }
            5 => p.extend((0..rng.random_range(0..8)).map(|_| rng.random::<u8>())),
            _ => {}
        }
    }
}

/// BPF_PROG_TEST_RUN refuses frames shorter than the Ethernet header plus
/// the minimal network header their ethertype announces; such input never
/// reaches the program, so it is padded instead of skipped.
fn pad_to_test_run_minimum(p: &mut Vec<u8>) {
    let min = match p.get(12..14) {
        Some([0x08, 0x00]) => ETH + 20,
        Some([0x86, 0xdd]) => ETH + 40,
        _ => ETH,
    };
    if p.len() < min {
        p.resize(min, 0);
    }
}

#[test]
fn fuzz_every_output_is_unchanged_or_a_correct_translation() {
    // Every REJECT answered, so that each is checked (the rate limit has
    // its own test).
    let mut fx = Fixture::with_settings(|cfg| cfg.reject_limit = None);
    let seed: u64 = std::env::var("KEP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b65_7000);
    let mut rng = StdRng::seed_from_u64(seed);
    let iterations = 100_000;
    let (mut translated, mut rejected) = (0u32, 0u32);
    for n in 0..iterations {
        let mut p = match rng.random_range(0..12) {
            0 => (0..rng.random_range(ETH..128))
                .map(|_| rng.random::<u8>())
                .collect(),
            1..=4 => random_packet(&mut rng),
            5 => random_icmp_error(&mut rng),
            6 => {
                let mut p = random_icmp_error(&mut rng);
                mutate(&mut rng, &mut p);
                p
            }
            _ => {
                let mut p = random_packet(&mut rng);
                mutate(&mut rng, &mut p);
                p
            }
        };
        pad_to_test_run_minimum(&mut p);
        let (ret, out) = fx.run(&p);
        if let Err(why) = check_fuzz_output(&p, ret, &out) {
            panic!(
                "fuzz case {n} (seed {seed}): {why}\n in:  {p:02x?}\n out: {out:02x?} verdict {ret}"
            );
        }
        if ret == TC_ACT_REDIRECT {
            rejected += 1;
        } else if out != p {
            translated += 1;
        }
    }
    // The generator must really exercise the translation paths.
    assert!(translated > iterations / 10, "only {translated} translated");
    assert!(rejected > iterations / 50, "only {rejected} rejected");
    let icmp = fx.upkeep.stats().unwrap()[stat::ICMP_ERRORS as usize];
    assert!(
        icmp > iterations as u64 / 100,
        "only {icmp} ICMP errors translated"
    );
}

// ---- XDP on node interfaces ------------------------------------------------------------------

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// Served by backend 0, which is behind the other node.
const NODEPORT_REMOTE: u16 = 30080;
/// Served by backend 1, which is on this node.
const NODEPORT_LOCAL: u16 = 30081;

fn fib_node() -> FibNode {
    FibNode::new().expect("a namespace for FIB lookups (needs root)")
}

fn ttl(p: &[u8]) -> u8 {
    p[ETH + 8]
}

#[test]
fn xdp_sends_a_nodeport_flow_to_another_node_back_out_translated() {
    let mut fx = Fixture::new();
    fx.add_nodeport(NODE, NODEPORT_REMOTE, 0, 100);
    let node = fib_node();
    for (l4, make) in [(proto::TCP, tcp_syn as MakePacket), (proto::UDP, udp)] {
        let client_port = 40000 + l4 as u16;
        let input = make(EXT_CLIENT, NODE, client_port, NODEPORT_REMOTE);
        let (ret, out) = node.ns.run(|| fx.run_xdp(&input, node.eth0));
        assert_eq!(
            ret, XDP_TX,
            "proto {l4}: new flow to another node's endpoint goes back out"
        );
        assert_eq!(out[0..6], OTHER_NODE_MAC, "next hop: the other node");
        assert_eq!(out[6..12], node.eth0_mac, "from this node's interface");
        assert_eq!(
            (ip_src(&out), sport(&out)),
            (NODE, client_port),
            "masqueraded, port kept"
        );
        assert_eq!((ip_dst(&out), dport(&out)), (BACKENDS[0], BACKEND_PORT));
        assert_eq!(
            ttl(&out),
            ttl(&input) - 1,
            "a forwarded packet loses one TTL"
        );
        assert_checksums(&out);
        assert_eq!(out.len(), input.len());

        // The endpoint's answer, back through this node.
        let reply = make(BACKENDS[0], NODE, BACKEND_PORT, client_port);
        let (ret, rout) = node.ns.run(|| fx.run_xdp(&reply, node.eth0));
        assert_eq!(ret, XDP_TX, "proto {l4}: reply goes back out");
        assert_eq!(rout[0..6], EXT_CLIENT_MAC);
        assert_eq!((ip_src(&rout), sport(&rout)), (NODE, NODEPORT_REMOTE));
        assert_eq!((ip_dst(&rout), dport(&rout)), (EXT_CLIENT, client_port));
        assert_eq!(ttl(&rout), ttl(&reply) - 1);
        assert_checksums(&rout);
    }
    // The TC program finds the same entries: the closing FIN, passed on by
    // XDP, is translated there identically.
    let fin = tcp(EXT_CLIENT, NODE, 40006, NODEPORT_REMOTE, 0x01 | ACK);
    let (ret, out) = node.ns.run(|| fx.run_xdp(&fin, node.eth0));
    assert_eq!((ret, &out), (XDP_PASS, &fin), "FIN is the TC program's");
    let (_, tc_out) = node.ns.run(|| fx.run_hook_on(Hook::Node, &fin, node.eth0));
    assert_eq!((ip_src(&tc_out), ip_dst(&tc_out)), (NODE, BACKENDS[0]));
    assert_checksums(&tc_out);
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::XDP_TX as usize], 4);
    assert_eq!(stats[stat::NEW_FLOWS as usize], 2);
    assert_eq!(stats[stat::REPLY_HITS as usize], 2);
}

#[test]
fn xdp_leaves_local_endpoints_to_tc_with_the_flow_already_chosen() {
    let mut fx = Fixture::new();
    fx.add_nodeport(NODE, NODEPORT_LOCAL, 1, 200);
    let node = fib_node();
    let syn = tcp(EXT_CLIENT, NODE, 41000, NODEPORT_LOCAL, SYN);
    let (ret, out) = node.ns.run(|| fx.run_xdp(&syn, node.eth0));
    assert_eq!(
        (ret, &out),
        (XDP_PASS, &syn),
        "a local endpoint's veth is TC's"
    );
    let forward = CtKey::new(
        addr_to_map(EXT_CLIENT),
        addr_to_map(NODE),
        port_to_map(41000),
        port_to_map(NODEPORT_LOCAL),
        proto::TCP,
    );
    let entries = ct_entries(&fx);
    let (_, ct) = entries
        .iter()
        .find(|(k, _)| *k == forward)
        .expect("XDP opened the flow");
    assert_eq!(ct.nat_addr, addr_to_map(BACKENDS[1]));
    let (ret, out) = node.ns.run(|| fx.run_hook_on(Hook::Node, &syn, node.eth0));
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!((ip_src(&out), ip_dst(&out)), (NODE, BACKENDS[1]));
    assert_eq!(
        ttl(&out),
        ttl(&syn) - 1,
        "redirected past the stack, TTL counted"
    );
    assert_checksums(&out);
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::NEW_FLOWS as usize], 1, "one choice, made once");
    assert_eq!(stats[stat::FORWARD_HITS as usize], 1);
    assert_eq!(stats[stat::XDP_TX as usize], 0);
}

#[test]
fn xdp_drops_and_passes_what_it_must() {
    let mut fx = Fixture::new();
    fx.add_nodeport(NODE, NODEPORT_REMOTE, 0, 100);
    let node = fib_node();
    // A frontend with DROP (no local endpoint for policy Local, say).
    let (ret, _) = node
        .ns
        .run(|| fx.run_xdp(&tcp(EXT_CLIENT, VIP_DROP, 42000, SVC_PORT, SYN), node.eth0));
    assert_eq!(ret, XDP_DROP);
    // REJECT needs the TC program's ICMP answer; other traffic is not ours.
    for p in [
        tcp(EXT_CLIENT, VIP_EMPTY, 42001, SVC_PORT, SYN),
        tcp(EXT_CLIENT, NODE, 42002, 22, SYN),
        udp(EXT_CLIENT, OTHER_NODE, 42003, 53),
    ] {
        let (ret, out) = node.ns.run(|| fx.run_xdp(&p, node.eth0));
        assert_eq!((ret, &out), (XDP_PASS, &p));
    }
    // TTL 1: the stack owes the sender a time-exceeded.
    let mut last_hop = tcp(EXT_CLIENT, NODE, 42004, NODEPORT_REMOTE, SYN);
    last_hop[ETH + 8] = 1;
    let (ret, _) = node.ns.run(|| fx.run_xdp(&last_hop, node.eth0));
    assert_eq!(ret, XDP_PASS);
}

/// CRC32c (Castagnoli) as RFC 4960 appendix B computes it, bit by bit (an
/// independent check of the datapath's table-driven update).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Ethernet + IPv4 + SCTP with one chunk of `chunk_type` and `payload`,
/// its CRC32c right (or left 0, as a sender offloading it leaves it).
fn sctp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    chunk_type: u8,
    payload: &[u8],
    crc: bool,
) -> Vec<u8> {
    let chunk_len = 4 + payload.len();
    let l4_len = 12 + chunk_len;
    let mut p = packet(src, dst, sport, dport, proto::UDP, 0, &[]);
    p.truncate(ETH + 20);
    p[ETH + 2..ETH + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    p[ETH + 9] = proto::SCTP;
    p[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let ipc = checksum(&p[ETH..ETH + 20]);
    p[ETH + 10..ETH + 12].copy_from_slice(&ipc.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0x0a, 0x0b, 0x0c, 0x0d, 0, 0, 0, 0]);
    p.extend_from_slice(&[chunk_type, 0]);
    p.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    p.extend_from_slice(payload);
    if crc {
        let c = crc32c(&p[ETH + 20..]);
        p[ETH + 28..ETH + 32].copy_from_slice(&c.to_le_bytes());
    }
    p
}

/// The stored CRC32c of an SCTP packet, and the one its bytes call for.
fn sctp_crcs(p: &[u8]) -> (u32, u32) {
    let l4 = ETH + ihl(p);
    let stored = u32::from_le_bytes(p[l4 + 8..l4 + 12].try_into().unwrap());
    let mut zeroed = p[l4..].to_vec();
    zeroed[8..12].copy_from_slice(&[0; 4]);
    (stored, crc32c(&zeroed))
}

/// SCTP Services are translated like TCP ones (Kubernetes allows a
/// targetPort other than the port): addresses, and ports with the CRC32c
/// updated; a CRC left to offload (0) stays 0.
#[test]
fn sctp_flows_are_translated_with_their_crc32c() {
    const INIT: u8 = 1;
    const DATA: u8 = 0;
    let mut fx = Fixture::new();
    let key = ServiceKey::new(addr_to_map(VIP), port_to_map(SVC_PORT), proto::SCTP, 0);
    let mut ops = Vec::new();
    for (i, addr) in BACKENDS.iter().enumerate() {
        let id = 100 + i as u32;
        ops.push(MapOp::PutBackend(
            id,
            backend4(Backend::new(
                addr_to_map(*addr),
                port_to_map(BACKEND_PORT),
                proto::SCTP,
            )),
        ));
        ops.push(MapOp::PutService(
            svc_key4(key.with_slot(i as u16 + 1)),
            ServiceValue::slot(id),
        ));
    }
    ops.push(MapOp::PutService(
        svc_key4(key),
        ServiceValue::service(40, 3, 0),
    ));
    assert!(fx.dp.apply(&ops).is_empty());
    let payload = [0x11u8; 97];
    for (port, crc) in [(36412u16, true), (36413, false)] {
        let init = sctp(CLIENT, VIP, port, SVC_PORT, INIT, &payload, crc);
        let (ret, out) = fx.run(&init);
        assert_eq!(ret, TC_ACT_OK);
        let backend = ip_dst(&out);
        assert!(BACKENDS.contains(&backend), "{out:02x?}");
        assert_eq!((sport(&out), dport(&out)), (port, BACKEND_PORT));
        assert!(ip_csum_ok(&out));
        let (stored, right) = sctp_crcs(&out);
        if crc {
            assert_eq!(stored, right, "the CRC32c follows the port");
        } else {
            assert_eq!(stored, 0, "an offloaded CRC is left to the sender's kernel");
        }
        let answer = sctp(backend, CLIENT, BACKEND_PORT, port, DATA, &payload, crc);
        let (_, back) = fx.run(&answer);
        assert_eq!((ip_src(&back), sport(&back)), (VIP, SVC_PORT));
        assert!(ip_csum_ok(&back));
        let (stored, right) = sctp_crcs(&back);
        assert_eq!(stored, if crc { right } else { 0 });
    }
    let stats = fx.upkeep.stats().unwrap();
    assert_eq!(stats[stat::NEW_FLOWS as usize], 2);
    assert_eq!(stats[stat::REPLY_HITS as usize], 2);
}

fn ttl_of(p: &[u8]) -> u8 {
    p[ETH + 8]
}

/// The fast path: the reply direction learns the client pod's interface
/// and MACs from the flow's first packet, the request direction the
/// endpoint's from the first reply; from then on both go past the stack
/// (`bpf_redirect_peer`), MACs written and TTL decremented as a router
/// would. `--fast-path off` keeps every packet on the stack, and so does a
/// hairpin flow.
#[test]
fn the_fast_path_is_learnt_from_each_directions_first_packet() {
    // `lo`: every namespace has it, and its MTU passes the MTU check.
    const LO: u32 = 1;
    for fast in [true, false] {
        let mut fx = Fixture::with_settings(|cfg| cfg.fast_path = fast);
        let syn = tcp(CLIENT, VIP, 46000, SVC_PORT, SYN);
        let (ret, out) = fx.run_hook_on(Hook::Pod, &syn, LO);
        assert_eq!(ret, TC_ACT_OK, "the first packet takes the stack");
        let backend = ip_dst(&out);
        // The backend's answer comes in on its own interface, MACs its own.
        let mut syn_ack = tcp(backend, CLIENT, BACKEND_PORT, 46000, SYN | ACK);
        syn_ack[..12]
            .copy_from_slice(&[[0x02, 0, 0, 0, 0, 0xcc], [0x02, 0, 0, 0, 0, 0xdd]].concat());
        let (ret, back) = fx.run_hook_on(Hook::Pod, &syn_ack, LO);
        let (ret2, fwd) = fx.run_hook_on(Hook::Pod, &tcp(CLIENT, VIP, 46000, SVC_PORT, ACK), LO);
        assert_eq!(ip_src(&back), VIP);
        assert_eq!(ip_dst(&fwd), backend);
        assert_checksums(&back);
        assert_checksums(&fwd);
        if !fast {
            assert_eq!((ret, ret2), (TC_ACT_OK, TC_ACT_OK), "fast path off");
            assert_eq!((ttl_of(&back), ttl_of(&fwd)), (64, 64));
            assert_eq!(fx.upkeep.stats().unwrap()[stat::FAST_PATH_PEER as usize], 0);
            continue;
        }
        assert_eq!((ret, ret2), (TC_ACT_REDIRECT, TC_ACT_REDIRECT));
        // Into the client: to its MAC (the SYN's source), from its gateway's.
        assert_eq!(&back[..6], &MAC_A, "{back:02x?}");
        assert_eq!(&back[6..12], &MAC_B);
        // Into the endpoint: to its MAC (the answer's source).
        assert_eq!(&fwd[..6], &[0x02, 0, 0, 0, 0, 0xdd]);
        assert_eq!(&fwd[6..12], &[0x02, 0, 0, 0, 0, 0xcc]);
        assert_eq!((ttl_of(&back), ttl_of(&fwd)), (63, 63));
        assert_eq!(fx.upkeep.stats().unwrap()[stat::FAST_PATH_PEER as usize], 2);

        // A pod reaching itself (its Service's one endpoint) keeps the
        // stack.
        let mut fx = Fixture::with_settings(|cfg| cfg.fast_path = true);
        add_vip_one(&mut fx);
        let (_, out) = fx.run_hook_on(
            Hook::Pod,
            &tcp(BACKENDS[0], VIP_ONE, 46001, SVC_PORT, SYN),
            LO,
        );
        assert_eq!((ip_src(&out), ip_dst(&out)), (HAIRPIN, BACKENDS[0]));
        let answer = tcp(BACKENDS[0], HAIRPIN, BACKEND_PORT, 46001, SYN | ACK);
        let (ret, _) = fx.run_hook_on(Hook::Pod, &answer, LO);
        let (ret2, _) = fx.run_hook_on(
            Hook::Pod,
            &tcp(BACKENDS[0], VIP_ONE, 46001, SVC_PORT, ACK),
            LO,
        );
        assert_eq!((ret, ret2), (TC_ACT_OK, TC_ACT_OK), "hairpin");
    }
}
