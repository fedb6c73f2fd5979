//! What the agent writes into the maps, in the maps' own form: the wire
//! types the encoder produces, the diff compares and the datapath applies,
//! and the byte-order helpers every reader of the maps shares.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use proxy_common::{Backend, Cidr, ServiceKey, ServiceValue};

use crate::maglev::TableSpec;
use crate::model::Ipv4Cidr;

/// Map form of an IPv4 address: the `u32` whose in-memory bytes are the
/// address's wire bytes, which is what the datapath compares against packets.
pub fn addr_to_map(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Inverse of [`addr_to_map`].
pub fn addr_from_map(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// Map form of an IPv4 prefix: address and mask as [`addr_to_map`].
pub fn cidr_to_map(cidr: Ipv4Cidr) -> Cidr {
    Cidr {
        addr: addr_to_map(cidr.addr),
        mask: addr_to_map(cidr.netmask()),
    }
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
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    /// Maglev tables by svc id.
    pub tables: BTreeMap<u32, TableSpec>,
    /// loadBalancerSourceRanges of load-balancer frontends (both entries).
    pub source_ranges: BTreeSet<RangeEntry>,
}

/// One allowed client prefix of one services-map entry (by its svc id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeEntry {
    pub svc_id: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// The keys one batch of changes may have altered: a diff restricted to
/// them ([`MapContents::restricted`]) touches nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub services: BTreeSet<ServiceKey>,
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
            addr: Ipv4Addr::UNSPECIFIED,
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
}
