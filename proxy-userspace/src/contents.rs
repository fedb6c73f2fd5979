//! What the agent writes into the maps, in the maps' own form: the wire
//! types the encoder produces, the diff compares and the datapath applies,
//! and the byte-order helpers every reader of the maps shares.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::{
    Addr6, Backend, Backend6, BackendOf, Cidr, Cidr6, ServiceKey, ServiceKey6, ServiceKeyOf,
    ServiceValue,
};

use crate::maglev::TableSpec;
use crate::model::{IpCidr, Ipv4Cidr};

/// Map form of an IPv4 address: the `u32` whose in-memory bytes are the
/// address's wire bytes, which is what the datapath compares against packets.
pub fn addr_to_map(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Inverse of [`addr_to_map`].
pub fn addr_from_map(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// Map form of an IPv6 address: its wire bytes, as [`Addr6`] holds them.
pub fn addr6_to_map(addr: Ipv6Addr) -> Addr6 {
    let b = addr.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}

/// Inverse of [`addr6_to_map`].
pub fn addr6_from_map(addr: Addr6) -> Ipv6Addr {
    let mut b = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(b)
}

/// A map address of either family. The agent keeps both families' entries
/// in one ordered collection (IPv4 first), so the encoder, the diff and its
/// ordering rules are written once; each entry is written into its
/// family's map ([`SvcKey`] into `kep_services` or `kep_services6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapAddr {
    V4(u32),
    V6(Addr6),
}

impl Default for MapAddr {
    fn default() -> Self {
        MapAddr::V4(0)
    }
}

/// A services-map key of either family.
pub type SvcKey = ServiceKeyOf<MapAddr>;
/// A backend of either family.
pub type AnyBackend = BackendOf<MapAddr>;

/// The agent's form of a `kep_services` key.
pub fn svc_key4(key: ServiceKey) -> SvcKey {
    key.with_addr(MapAddr::V4(key.addr))
}

/// The agent's form of a `kep_services6` key.
pub fn svc_key6(key: ServiceKey6) -> SvcKey {
    key.with_addr(MapAddr::V6(key.addr))
}

/// The agent's form of a `kep_backends` value.
pub fn backend4(backend: Backend) -> AnyBackend {
    backend.with_addr(MapAddr::V4(backend.addr))
}

/// The agent's form of a `kep_backends6` value.
pub fn backend6(backend: Backend6) -> AnyBackend {
    backend.with_addr(MapAddr::V6(backend.addr))
}

/// Map form of an address of either family.
pub fn ip_to_map(addr: IpAddr) -> MapAddr {
    match addr {
        IpAddr::V4(v4) => MapAddr::V4(addr_to_map(v4)),
        IpAddr::V6(v6) => MapAddr::V6(addr6_to_map(v6)),
    }
}

/// Inverse of [`ip_to_map`].
pub fn ip_from_map(addr: MapAddr) -> IpAddr {
    match addr {
        MapAddr::V4(v4) => IpAddr::V4(addr_from_map(v4)),
        MapAddr::V6(v6) => IpAddr::V6(addr6_from_map(v6)),
    }
}

/// Map form of an IPv4 prefix: address and mask as [`addr_to_map`].
pub fn cidr_to_map(cidr: Ipv4Cidr) -> Cidr {
    Cidr {
        addr: addr_to_map(cidr.addr),
        mask: addr_to_map(cidr.netmask()),
    }
}

/// Map form of an IPv6 prefix (`None` for an IPv4 one).
pub fn cidr6_to_map(cidr: &IpCidr) -> Option<Cidr6> {
    let IpAddr::V6(addr) = cidr.addr else {
        return None;
    };
    let mask = u128::MAX
        .checked_shl(128 - u32::from(cidr.prefix_len.min(128)))
        .unwrap_or(0);
    Some(Cidr6 {
        addr: addr6_to_map(Ipv6Addr::from(u128::from(addr) & mask)),
        mask: addr6_to_map(Ipv6Addr::from(mask)),
    })
}

/// Map form of an L4 port: network byte order, like [`addr_to_map`].
pub fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// Inverse of [`port_to_map`].
pub fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

/// Everything the agent writes into the services, backends and maglev maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// Both families' entries (`kep_services`, `kep_services6`).
    pub services: BTreeMap<SvcKey, ServiceValue>,
    /// Both families' (`kep_backends`, `kep_backends6`): an id is in one.
    pub backends: BTreeMap<u32, AnyBackend>,
    /// Maglev tables by svc id.
    pub tables: BTreeMap<u32, TableSpec>,
    /// loadBalancerSourceRanges of load-balancer frontends (both entries).
    pub source_ranges: BTreeSet<RangeEntry>,
}

/// One allowed client prefix of one services-map entry (by its svc id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeEntry {
    pub svc_id: u32,
    /// Its family is its frontend's (`kep_src_ranges` or `kep_src_ranges6`).
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// The keys one batch of changes may have altered: a diff restricted to
/// them ([`MapContents::restricted`]) touches nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub services: BTreeSet<SvcKey>,
    pub backends: BTreeSet<u32>,
    /// Maglev tables and source ranges of these svc ids.
    pub svc_ids: BTreeSet<u32>,
}

impl Footprint {
    /// Adds the key `op` writes.
    pub fn add(&mut self, op: &crate::diff::MapOp) {
        use crate::diff::MapOp;
        match op {
            MapOp::PutBackend(id, _) | MapOp::DeleteBackend(id) => {
                self.backends.insert(*id);
            }
            MapOp::PutService(key, _) | MapOp::DeleteService(key) => {
                self.services.insert(*key);
            }
            MapOp::PutTable(id, _) | MapOp::DeleteTable(id) => {
                self.svc_ids.insert(*id);
            }
            MapOp::PutSourceRange(range) | MapOp::DeleteSourceRange(range) => {
                self.svc_ids.insert(range.svc_id);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.backends.is_empty() && self.svc_ids.is_empty()
    }
}

impl MapContents {
    /// The part of these contents under `keys`.
    pub fn restricted(&self, keys: &Footprint) -> MapContents {
        MapContents {
            services: keys
                .services
                .iter()
                .filter_map(|k| self.services.get(k).map(|v| (*k, *v)))
                .collect(),
            backends: keys
                .backends
                .iter()
                .filter_map(|id| self.backends.get(id).map(|b| (*id, *b)))
                .collect(),
            tables: keys
                .svc_ids
                .iter()
                .filter_map(|id| self.tables.get(id).map(|t| (*id, t.clone())))
                .collect(),
            source_ranges: keys
                .svc_ids
                .iter()
                .flat_map(|id| self.ranges_of(*id))
                .copied()
                .collect(),
        }
    }

    /// The source ranges of `svc_id`.
    pub fn ranges_of(&self, svc_id: u32) -> impl Iterator<Item = &RangeEntry> {
        let first = RangeEntry {
            svc_id,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix_len: 0,
        };
        self.source_ranges
            .range(first..)
            .take_while(move |r| r.svc_id == svc_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Likewise for IPv6 prefixes (`Cidr6::contains`, what the socket
    /// hooks drop unallocated service addresses by); an IPv4 one has no
    /// IPv6 map form.
    #[test]
    fn an_ipv6_prefix_in_map_form_contains_exactly_its_addresses() {
        for text in [
            "fd00:10:96::/108",
            "fd00::1:2:3/64",
            "2001:db8::7/128",
            "::/0",
            "fd00::/7",
        ] {
            let cidr: IpCidr = text.parse().unwrap();
            let map = cidr6_to_map(&cidr).unwrap();
            let IpAddr::V6(addr) = cidr.addr else {
                panic!("{text}")
            };
            let len = u32::from(cidr.prefix_len);
            let host = u128::MAX.checked_shr(len).unwrap_or(0);
            let first = u128::from(addr) & !host;
            let last = first | host;
            let inside = |a: u128| (a & !host) == first;
            for a in [first.wrapping_sub(1), first, last, last.wrapping_add(1)] {
                let ip = Ipv6Addr::from(a);
                assert_eq!(map.contains(&addr6_to_map(ip)), inside(a), "{text} {ip}");
            }
        }
        assert_eq!(cidr6_to_map(&"10.96.0.0/12".parse().unwrap()), None);
    }

    /// The datapath's check of a prefix agrees with the model's, on both
    /// sides of each edge, whatever the host bits given.
    #[test]
    fn a_prefix_in_map_form_contains_what_the_model_says() {
        for text in ["10.96.0.0/12", "10.1.2.3/8", "192.168.7.7/32", "0.0.0.0/0"] {
            let cidr: Ipv4Cidr = text.parse().unwrap();
            let map = cidr_to_map(cidr);
            let first = u32::from(cidr.addr);
            let last = first | !u32::from(cidr.netmask());
            for addr in [first.wrapping_sub(1), first, last, last.wrapping_add(1)] {
                let addr = Ipv4Addr::from(addr);
                assert_eq!(
                    map.contains(addr_to_map(addr)),
                    cidr.contains(addr),
                    "{text} {addr}"
                );
            }
        }
        let cidr: Ipv4Cidr = "10.96.0.0/12".parse().unwrap();
        assert_eq!(
            cidr_to_map(cidr).mask,
            addr_to_map(Ipv4Addr::new(255, 240, 0, 0))
        );
    }

    /// An IPv6 address in map form is its 16 wire bytes in order, and
    /// reads back; both families' keys order IPv4 first.
    #[test]
    fn an_ipv6_address_in_map_form_is_its_wire_bytes() {
        let addr: Ipv6Addr = "2001:db8::a:1".parse().unwrap();
        let map = addr6_to_map(addr);
        let bytes: Vec<u8> = map.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, addr.octets());
        assert_eq!(addr6_from_map(map), addr);
        let v6 = ip_to_map(IpAddr::V6(addr));
        assert_eq!(ip_from_map(v6), IpAddr::V6(addr));
        assert!(ip_to_map(IpAddr::V4(Ipv4Addr::BROADCAST)) < v6);
    }
}
