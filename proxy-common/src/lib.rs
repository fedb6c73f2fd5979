//! Map keys and values shared by the eBPF programs and the userspace agent.
//!
//! This crate is the one place that owns each map's layout. Every type is
//! `#[repr(C)]` with explicit padding (the kernel compares keys byte for byte,
//! so padding must be zeroed and never left to the compiler) and a
//! compile-time size assert, so a layout change is a build error on both sides
//! instead of a silent mismatch at run time.
//!
//! Byte order: addresses and L4 ports are kept in **network byte order**
//! exactly as they appear in packets (the datapath compares them without
//! swapping); everything else (ids, counts, slots, flags, timestamps) is in
//! host byte order. Each field's doc says which.
//!
//! Services are split into three levels, so that one backend is written in
//! exactly one place however many services use it:
//!
//! ```text
//! SERVICES  (vip, port, proto, slot 0)  -> { count, flags, svc_id }
//! SERVICES  (vip, port, proto, slot i)  -> { backend_id }        1 <= i <= count
//! BACKENDS  backend_id                  -> { addr, port, proto }
//! ```
//!
//! IPv6: every map keyed or valued by an address has a second, IPv6 map
//! beside the IPv4 one (`kep_services6` beside `kep_services`, ...), as
//! Cilium's `lb6_*` beside `lb4_*`. The IPv4 maps, their entries and the
//! IPv4 programs' memory and lookups stay exactly as they were; an
//! IPv4-only node pays nothing for IPv6 (the IPv6 maps are created without
//! preallocation). Each concept is still defined once: the key and value
//! types are generic over the address ([`ServiceKeyOf`], [`BackendOf`],
//! [`SourceRangeOf`]), instantiated with `u32` for IPv4 and [`Addr6`] for
//! IPv6. Ids are shared: svc ids and backend ids come from one allocator
//! whatever the family, so Maglev tables, traffic counters and conntrack
//! values (`backend_id`, `svc_id`) need no IPv6 twin.
#![no_std]

/// Version of every layout in this crate. Bump it with any change to an
/// existing map's key, value or type: a new agent then pins a fresh set of
/// maps beside the old one and switches the attached programs over, instead
/// of reading old bytes with new types. A new map needs no bump (it is
/// simply created beside the pinned ones).
pub const LAYOUT_VERSION: u32 = 6;

/// An IPv6 address in map form: its 16 wire bytes, as four `u32` whose
/// in-memory bytes are the address's (network byte order, like every
/// IPv4 address here). `[u32; 4]` rather than `[u8; 16]` keeps keys 4-byte
/// aligned, so the datapath compares them word by word.
pub type Addr6 = [u32; 4];

/// Names of the maps as declared by the eBPF object and pinned under the
/// agent's bpffs directory. Kernel map names are limited to 15 bytes.
pub mod map_names {
    pub const SERVICES: &str = "kep_services";
    pub const BACKENDS: &str = "kep_backends";
    /// TCP flows' conntrack entries ([`crate::CtKey`] -> [`crate::CtValue`]).
    pub const CONNTRACK_TCP: &str = "kep_ct_tcp";
    /// Every other protocol's (UDP, SCTP, ICMP...): a flood of short
    /// flows (every DNS query is one) fills this LRU map and evicts only
    /// its own kind, never an idle established TCP connection (Cilium's
    /// `CT_MAP_TCP4` / `CT_MAP_ANY4` split).
    pub const CONNTRACK_OTHER: &str = "kep_ct_other";
    /// Both conntrack maps; a flow's two entries are in the one its
    /// protocol picks ([`conntrack_of`]).
    pub const CONNTRACK: [&str; 2] = [CONNTRACK_TCP, CONNTRACK_OTHER];

    /// The conntrack map that holds flows of IP protocol `ip_proto`.
    pub const fn conntrack_of(ip_proto: u8) -> &'static str {
        if crate::CtKey::new(0, 0, 0, 0, ip_proto).in_tcp_map() {
            CONNTRACK_TCP
        } else {
            CONNTRACK_OTHER
        }
    }
    pub const STATS: &str = "kep_stats";
    pub const CONFIG: &str = "kep_config";
    pub const SOCK_REVNAT: &str = "kep_sock_rnat";
    pub const AFFINITY: &str = "kep_affinity";
    pub const SVC_TRAFFIC: &str = "kep_svc_traffic";
    pub const BACKEND_TRAFFIC: &str = "kep_be_traffic";
    /// Maglev lookup tables: svc id -> table (see [`crate::maglev`]).
    pub const MAGLEV: &str = "kep_maglev";
    /// `loadBalancerSourceRanges`: (svc id, client prefix) LPM trie.
    pub const SOURCE_RANGES: &str = "kep_src_ranges";
    /// The node's own IPv4 addresses (network byte order -> 1).
    pub const NODE_ADDRS: &str = "kep_node_addrs";
    /// Every endpoint's (address, port, protocol), as a [`crate::Backend`]
    /// with flags 0 -> 1: connections straight to one are tracked.
    pub const ENDPOINTS: &str = "kep_endpoints";
    /// IP fragments: datagram -> where its fragments go
    /// ([`crate::FragKey`] -> [`crate::FragValue`]).
    pub const FRAGS: &str = "kep_frags";
    /// Fragments that came before their datagram's first one, held until it
    /// comes ([`crate::StashKey`] -> [`crate::FragmentBytes`]).
    pub const FRAG_STASH: &str = "kep_frag_stash";
    /// Per-CPU room for one fragment's bytes while stashing or replaying.
    pub const FRAG_BUF: &str = "kep_frag_buf";
    /// REJECT answers' rate, per client address ([`crate::RejectBucket`]).
    pub const REJECT_RATE: &str = "kep_reject_rate";
    /// IPv6 frontends ([`crate::ServiceKey6`] -> [`crate::ServiceValue`]).
    pub const SERVICES6: &str = "kep_services6";
    /// IPv6 backends (backend id -> [`crate::Backend6`]); ids are shared
    /// with [`BACKENDS`], so one id is in exactly one of the two.
    pub const BACKENDS6: &str = "kep_backends6";
    /// Every IPv6 endpoint ([`crate::Backend6`] with flags 0 -> 1).
    pub const ENDPOINTS6: &str = "kep_endpoints6";
    /// The node's own IPv6 addresses ([`crate::Addr6`] -> 1).
    pub const NODE_ADDRS6: &str = "kep_node_addrs6";
    /// `loadBalancerSourceRanges` of IPv6 frontends
    /// ([`crate::SourceRange6`] LPM trie).
    pub const SOURCE_RANGES6: &str = "kep_src_ranges6";
    /// IPv6 datapath settings (the single [`crate::Config6`] entry).
    pub const CONFIG6: &str = "kep_config6";
    /// Socket reverse NAT of IPv6 sockets ([`crate::SockRevNatKey6`] ->
    /// [`crate::SockRevNat6`]).
    pub const SOCK_REVNAT6: &str = "kep_sock_rnat6";
    /// The IPv6 maps, as [`ALL`] lists them.
    pub const FAMILY6: [&str; 5] = [
        SERVICES6,
        BACKENDS6,
        ENDPOINTS6,
        NODE_ADDRS6,
        SOURCE_RANGES6,
    ];
    /// Bits set for every frontend's and endpoint's (address, port,
    /// protocol) ([`crate::served`]).
    pub const SERVED: &str = "kep_served";
    /// Every map the agent pins, in creation order.
    pub const ALL: [&str; 26] = [
        SERVICES,
        BACKENDS,
        CONNTRACK_TCP,
        CONNTRACK_OTHER,
        STATS,
        CONFIG,
        SOCK_REVNAT,
        AFFINITY,
        SVC_TRAFFIC,
        BACKEND_TRAFFIC,
        MAGLEV,
        SOURCE_RANGES,
        NODE_ADDRS,
        ENDPOINTS,
        FRAGS,
        FRAG_STASH,
        FRAG_BUF,
        REJECT_RATE,
        SERVICES6,
        BACKENDS6,
        ENDPOINTS6,
        NODE_ADDRS6,
        SOURCE_RANGES6,
        SERVED,
        CONFIG6,
        SOCK_REVNAT6,
    ];
}

/// Names of the eBPF programs in the object.
pub mod program_names {
    /// TC ingress on pod-facing interfaces.
    pub const TC_POD_INGRESS: &str = "kep_tc_ingress";
    /// TC ingress on the node's own interfaces (traffic from outside the
    /// node: NodePort, LoadBalancer and external IPs, replies of flows
    /// translated elsewhere).
    pub const TC_NODE_INGRESS: &str = "kep_tc_node";
    /// TC egress on pod and node interfaces: what the node itself sends (a
    /// host endpoint's answers, its ICMP errors) reverse-translated.
    pub const TC_EGRESS: &str = "kep_tc_egress";
    /// XDP on the node's own interfaces: the fast path for established
    /// external flows that leave where they came in.
    pub const XDP_NODE: &str = "kep_xdp_node";
    /// cgroup socket hooks for the node's own processes.
    pub const SOCK_CONNECT4: &str = "kep_connect4";
    pub const SOCK_SENDMSG4: &str = "kep_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "kep_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "kep_getpeername4";
    /// Their IPv6 twins (IPv6 sockets, IPv4-mapped addresses included).
    pub const SOCK_CONNECT6: &str = "kep_connect6";
    pub const SOCK_SENDMSG6: &str = "kep_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "kep_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "kep_getpeername6";
}

/// Default capacities; the agent can override each with a flag.
pub mod defaults {
    pub const SERVICES_MAX: u32 = 262_144;
    pub const BACKENDS_MAX: u32 = 131_072;
    /// TCP conntrack entries (two per flow).
    pub const CONNTRACK_MAX: u32 = 262_144;
    /// Conntrack entries of every other protocol (two per flow): a UDP
    /// flow lives the UDP timeout (30 s) after its last datagram, so this
    /// holds ~2,000 new flows a second (DNS queries, mostly) sustained.
    pub const CONNTRACK_OTHER_MAX: u32 = 131_072;
    pub const SOCK_REVNAT_MAX: u32 = 65_536;
    pub const AFFINITY_MAX: u32 = 65_536;
    pub const TRAFFIC_MAX: u32 = 65_536;
    /// Frontends that can have a Maglev table at once.
    pub const MAGLEV_MAX: u32 = 65_536;
    pub const SOURCE_RANGES_MAX: u32 = 16_384;
    /// Addresses of the node's interfaces (a bridge CNI may give every pod
    /// veth a gateway address of its own).
    pub const NODE_ADDRS_MAX: u32 = 4096;
    /// Fragmented datagrams whose fragments are being translated at once.
    pub const FRAGS_MAX: u32 = 8192;
    /// Early fragments held at once, all datagrams together (preallocated:
    /// `FRAG_STASH_MAX` x ~9 KiB).
    pub const FRAG_STASH_MAX: u32 = 256;
    /// Clients whose REJECT answers are rate-limited at once (an LRU: the
    /// least recently answered is forgotten, and starts afresh).
    pub const REJECT_RATE_MAX: u32 = 16_384;
    /// IPv6 frontends' entries and backends: created without
    /// preallocation, so memory follows the IPv6 entries written (about
    /// 100 bytes each), not these bounds.
    pub const SERVICES6_MAX: u32 = SERVICES_MAX;
    pub const BACKENDS6_MAX: u32 = BACKENDS_MAX;
    /// The node's own IPv6 addresses.
    pub const NODE_ADDRS6_MAX: u32 = NODE_ADDRS_MAX;
}

/// IANA protocol numbers as carried in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Which traffic a services-map entry serves.
pub mod scope {
    /// Everyone: pods, the node's processes, and (unless the frontend also
    /// has an [`EXTERNAL`] entry) traffic from outside the node.
    pub const ALL: u8 = 0;
    /// Traffic arriving on a node interface, for frontends whose external
    /// traffic is handled differently (externalTrafficPolicy, masquerade,
    /// source ranges). Its slot-0 entry has its own svc id and slots.
    pub const EXTERNAL: u8 = 1;
}

/// Key of the services maps: one frontend `(vip, port, proto)` in one
/// scope, and a slot; [`ServiceKey`] for IPv4, [`ServiceKey6`] for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKeyOf<A> {
    /// Frontend address, network byte order (`u32` or [`Addr6`]).
    pub addr: A,
    /// Frontend L4 port, network byte order.
    pub port: u16,
    /// Host byte order. 0 is the service entry itself; 1..=count are the
    /// backend slots.
    pub slot: u16,
    /// IP protocol number (`proto::TCP`, `proto::UDP`).
    pub proto: u8,
    /// `scope::*`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// Key of `kep_services`.
pub type ServiceKey = ServiceKeyOf<u32>;
/// Key of `kep_services6`.
pub type ServiceKey6 = ServiceKeyOf<Addr6>;

impl<A: Copy> ServiceKeyOf<A> {
    pub const fn new(addr: A, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            slot,
            proto,
            scope: scope::ALL,
            _pad: [0; 2],
        }
    }

    /// The same frontend's entry for another scope.
    pub const fn with_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
    }

    /// The cluster-IP entry of `addr`: present when `addr` is a cluster IP,
    /// so traffic to it on a port or protocol no Service serves is rejected
    /// (kube-proxy REJECTs it) instead of leaving the node. Real frontends
    /// never have port 0.
    pub const fn cluster_ip(addr: A) -> Self {
        Self::new(addr, 0, 0, 0)
    }

    /// The same frontend at another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }

    /// The same key with its address in another form (the agent keeps
    /// both families' keys in one ordered map, and writes each into its
    /// family's map).
    pub const fn with_addr<B: Copy>(self, addr: B) -> ServiceKeyOf<B> {
        ServiceKeyOf {
            addr,
            port: self.port,
            slot: self.slot,
            proto: self.proto,
            scope: self.scope,
            _pad: [0; 2],
        }
    }
}

/// The service entry has no usable backend and new flows are answered with
/// ICMP unreachable (kube-proxy REJECT). Set together with `count == 0`.
pub const SVC_FLAG_REJECT: u16 = 1 << 0;
/// The service entry has no usable backend and new flows are silently
/// dropped (kube-proxy DROP, e.g. internalTrafficPolicy Local with no local
/// endpoint). Set together with `count == 0`.
pub const SVC_FLAG_DROP: u16 = 1 << 1;
/// New flows pick their backend from the frontend's Maglev table (keyed by
/// `svc_id` in the maglev map) rather than a random slot. Set only once the
/// table is written; a frontend whose table is missing falls back to its
/// slots, which list the same backends.
pub const SVC_FLAG_MAGLEV: u16 = 1 << 2;
/// (Scope ALL entry.) The frontend has a `scope::EXTERNAL` entry that
/// traffic from outside the node uses instead of this one.
pub const SVC_FLAG_EXTERNAL_SCOPE: u16 = 1 << 3;
/// (Scope EXTERNAL entry.) New flows are also source-translated to the
/// node's address (`Config::node_addr`): externalTrafficPolicy Cluster,
/// whose endpoint may be on another node and must answer through this one.
pub const SVC_FLAG_MASQUERADE: u16 = 1 << 4;
/// (Scope EXTERNAL entry.) Only clients inside the frontend's
/// `loadBalancerSourceRanges` (source-ranges map, by svc id) get in; the
/// rest is dropped.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 5;
/// The frontend address is one of this node's own (a NodePort): replies
/// leave with the node's address as source.
pub const SVC_FLAG_NODE_ADDRESS: u16 = 1 << 6;

/// Value of the services map.
///
/// At slot 0 `count`, `flags`, `svc_id` and `affinity_timeout_s` are
/// meaningful and `backend_id` is 0; at slot i > 0 only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceValue {
    /// Host byte order. Slot > 0: key into the backends map.
    pub backend_id: u32,
    /// Host byte order. Slot 0: stable id of this frontend, for counters.
    pub svc_id: u32,
    /// Host byte order. Slot 0: number of backend slots (1..=count).
    pub count: u16,
    /// Host byte order. Slot 0: `SVC_FLAG_*` bits.
    pub flags: u16,
    /// Host byte order. Slot 0: sessionAffinity ClientIP timeout in
    /// seconds; 0 means no affinity.
    pub affinity_timeout_s: u32,
}

impl ServiceValue {
    pub const fn service(svc_id: u32, count: u16, flags: u16) -> Self {
        Self {
            backend_id: 0,
            svc_id,
            count,
            flags,
            affinity_timeout_s: 0,
        }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            svc_id: 0,
            count: 0,
            flags: 0,
            affinity_timeout_s: 0,
        }
    }

    /// The same service entry with ClientIP session affinity.
    pub const fn with_affinity(self, timeout_s: u32) -> Self {
        Self {
            affinity_timeout_s: timeout_s,
            ..self
        }
    }

    pub const fn rejects(&self) -> bool {
        self.flags & SVC_FLAG_REJECT != 0
    }

    pub const fn drops(&self) -> bool {
        self.flags & SVC_FLAG_DROP != 0
    }

    pub const fn uses_maglev(&self) -> bool {
        self.flags & SVC_FLAG_MAGLEV != 0
    }

    pub const fn has_external_scope(&self) -> bool {
        self.flags & SVC_FLAG_EXTERNAL_SCOPE != 0
    }

    pub const fn masquerades(&self) -> bool {
        self.flags & SVC_FLAG_MASQUERADE != 0
    }

    pub const fn checks_source_ranges(&self) -> bool {
        self.flags & SVC_FLAG_SOURCE_RANGES != 0
    }

    pub const fn on_node_address(&self) -> bool {
        self.flags & SVC_FLAG_NODE_ADDRESS != 0
    }
}

/// Value of the backends maps (key: backend id, `u32`, host byte order);
/// [`Backend`] for IPv4, [`Backend6`] for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendOf<A> {
    /// Endpoint address, network byte order (`u32` or [`Addr6`]).
    pub addr: A,
    /// Endpoint L4 port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Host byte order; reserved, 0.
    pub flags: u8,
}

/// Value of `kep_backends`, key of `kep_endpoints`.
pub type Backend = BackendOf<u32>;
/// Value of `kep_backends6`, key of `kep_endpoints6`.
pub type Backend6 = BackendOf<Addr6>;

impl<A: Copy> BackendOf<A> {
    pub const fn new(addr: A, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            flags: 0,
        }
    }

    /// The same backend with its address in another form (see
    /// [`ServiceKeyOf::with_addr`]).
    pub const fn with_addr<B: Copy>(self, addr: B) -> BackendOf<B> {
        BackendOf {
            addr,
            port: self.port,
            proto: self.proto,
            flags: self.flags,
        }
    }
}

/// Conntrack key: the 5-tuple exactly as a packet carries it.
///
/// A translated flow has two entries: the forward one keyed by what the
/// client sends (client -> VIP) and the reply one keyed by what the backend
/// sends (backend -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    /// Source IPv4 address, network byte order.
    pub saddr: u32,
    /// Destination IPv4 address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// Whether this flow's entries are in the TCP conntrack map
    /// ([`map_names::CONNTRACK_TCP`]); every other protocol's are in
    /// [`map_names::CONNTRACK_OTHER`]. A flow's two entries share their
    /// protocol, so they are always in the same map.
    pub const fn in_tcp_map(&self) -> bool {
        self.proto == proto::TCP
    }

    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }
}

/// The entry is the reply direction (backend -> client): rewrite the source.
/// Without it the entry is the forward direction: rewrite the destination.
pub const CT_FLAG_REPLY: u16 = 1 << 0;

/// The flow's source is translated too (`snat_addr:snat_port`): a hairpin
/// (a pod reaching itself through a Service gets `Config::hairpin_addr`, so
/// it never receives a packet from its own address) or a masqueraded
/// external flow (the node's address, so the endpoint answers through this
/// node). On the forward entry `snat_*` is the source written; on the reply
/// entry it is the client's original address and port, written back as the
/// destination.
pub const CT_FLAG_SNAT: u16 = 1 << 1;
/// The flow is over: an RST, or a FIN from both sides. It expires after
/// the short closing timeout, and a new connection may take its tuple. Set
/// on both entries of the flow.
pub const CT_FLAG_CLOSING: u16 = 1 << 2;
/// After translation the flow's packets carry one of the node's own
/// addresses as source (a NodePort's reply, a masqueraded request), which
/// the node's stack would drop as a martian: they are sent out directly,
/// by a FIB lookup and redirect. Set on both entries.
pub const CT_FLAG_REDIRECT: u16 = 1 << 3;

/// Not a Service flow: a connection straight to an endpoint's address,
/// tracked so that its replies are never taken for those of a Service flow
/// that used the same tuple, nor its tuple given to one. Its entries
/// translate nothing, unless a clash with a live flow gave it another
/// source port (`CT_FLAG_SNAT` with the client's own address). Set on both
/// entries; `svc_id` and `backend_id` are 0.
pub const CT_FLAG_DIRECT: u16 = 1 << 4;

/// A packet of the reply direction has been seen: the flow is no longer
/// SYN-sent/unreplied (netfilter's `SEEN_REPLY`), so it gets its
/// protocol's established timeout. Set on both entries.
pub const CT_FLAG_SEEN_REPLY: u16 = 1 << 5;
/// The client sent a FIN. With only one side's FIN the connection is
/// half-closed (netfilter's CLOSE_WAIT, 1 h under kube-proxy): the other
/// side may still send. Set on both entries.
pub const CT_FLAG_FIN_FORWARD: u16 = 1 << 6;
/// The endpoint sent a FIN; see [`CT_FLAG_FIN_FORWARD`].
pub const CT_FLAG_FIN_REPLY: u16 = 1 << 7;
/// Fast path: this direction's packets are delivered straight into a pod
/// on this node (`bpf_redirect_peer` into the peer of host interface
/// `ifindex`, with `macs`), past the host's routing and netfilter.
pub const CT_FLAG_PEER: u16 = 1 << 8;
/// Fast path: this direction's packets leave by node interface `ifindex`
/// towards an endpoint on another node (`bpf_redirect_neigh`: the kernel's
/// route and neighbour, no netfilter).
pub const CT_FLAG_NEIGH: u16 = 1 << 9;

/// Conntrack value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtValue {
    /// Network byte order. Forward: backend address written as destination.
    /// Reply: service VIP written as source.
    pub nat_addr: u32,
    /// Network byte order. Forward: backend port. Reply: service port.
    pub nat_port: u16,
    /// Host byte order. `CT_FLAG_*` bits.
    pub flags: u16,
    /// Host byte order. Backend chosen for this flow; the forward path checks
    /// it still exists before reusing the entry.
    pub backend_id: u32,
    /// Host byte order. Frontend id (`ServiceValue::svc_id`).
    pub svc_id: u32,
    /// Network byte order; with `CT_FLAG_SNAT` only. Forward: the source
    /// address written. Reply: the client's address, written back as the
    /// destination.
    pub snat_addr: u32,
    /// Network byte order; with `CT_FLAG_SNAT` only, like `snat_addr`.
    pub snat_port: u16,
    pub _pad: u16,
    /// Host byte order. `bpf_ktime_get_coarse_ns` of the last packet seen.
    pub last_seen_ns: u64,
    /// Host byte order; with `CT_FLAG_PEER` or `CT_FLAG_NEIGH` only: the
    /// interface this direction's packets are sent to past the stack.
    pub ifindex: u32,
    /// With `CT_FLAG_PEER` only: destination then source MAC address
    /// written before the redirect.
    pub macs: [u8; 12],
}

impl CtValue {
    pub const fn is_reply(&self) -> bool {
        self.flags & CT_FLAG_REPLY != 0
    }

    pub const fn is_snat(&self) -> bool {
        self.flags & CT_FLAG_SNAT != 0
    }

    pub const fn redirects(&self) -> bool {
        self.flags & CT_FLAG_REDIRECT != 0
    }

    pub const fn is_closing(&self) -> bool {
        self.flags & CT_FLAG_CLOSING != 0
    }

    pub const fn is_direct(&self) -> bool {
        self.flags & CT_FLAG_DIRECT != 0
    }

    /// Sent past the stack (`CT_FLAG_PEER`, `CT_FLAG_NEIGH`).
    pub const fn has_fast_path(&self) -> bool {
        self.flags & (CT_FLAG_PEER | CT_FLAG_NEIGH) != 0
    }

    pub const fn seen_reply(&self) -> bool {
        self.flags & CT_FLAG_SEEN_REPLY != 0
    }

    /// A FIN from one side only: the other may still send.
    pub const fn is_half_closed(&self) -> bool {
        !self.is_closing() && self.flags & (CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY) != 0
    }

    /// The flow's state bits (shared by both entries).
    pub const STATE: u16 =
        CT_FLAG_SEEN_REPLY | CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY | CT_FLAG_CLOSING;

    /// How long this entry may stay idle, by protocol and state, as
    /// netfilter's: a connection-oriented flow (TCP, SCTP) without a reply
    /// yet gets the SYN-sent timeout, a half-closed one the CLOSE_WAIT
    /// timeout, a closed one the closing timeout.
    pub const fn timeout_ns(&self, key: &CtKey, cfg: &Config) -> u64 {
        if key.proto == proto::TCP || key.proto == proto::SCTP {
            if self.is_closing() {
                cfg.ct_tcp_closing_ns
            } else if !self.seen_reply() {
                cfg.ct_tcp_syn_sent_ns
            } else if self.is_half_closed() {
                cfg.ct_tcp_close_wait_ns
            } else {
                cfg.ct_tcp_established_ns
            }
        } else {
            cfg.ct_udp_ns
        }
    }

    /// What this entry makes of a packet keyed `key` (as it came):
    /// `(saddr, daddr, sport, dport)` after translation. A reply leaves from
    /// the frontend (towards the client's own address and port with
    /// `CT_FLAG_SNAT`); a forward packet goes to the backend (from the
    /// translated source with `CT_FLAG_SNAT`). The one definition every
    /// hook translates by.
    pub const fn translate(&self, key: &CtKey) -> (u32, u32, u16, u16) {
        if self.is_reply() {
            let (daddr, dport) = if self.is_snat() {
                (self.snat_addr, self.snat_port)
            } else {
                (key.daddr, key.dport)
            };
            (self.nat_addr, daddr, self.nat_port, dport)
        } else {
            let (saddr, sport) = if self.is_snat() {
                (self.snat_addr, self.snat_port)
            } else {
                (key.saddr, key.sport)
            };
            (saddr, self.nat_addr, sport, self.nat_port)
        }
    }

    /// The key of the flow's entry for the other direction (the answer to
    /// a packet translated by this one).
    pub const fn twin_key(&self, key: &CtKey) -> CtKey {
        let (saddr, daddr, sport, dport) = self.translate(key);
        CtKey::new(daddr, saddr, dport, sport, key.proto)
    }

    /// The flow's other entry as it is written when the flow opens (also
    /// when one of the two was lost, e.g. evicted): the same flow state,
    /// no fast path of its own (it learns one again), seen at `now_ns`.
    pub const fn twin(&self, key: &CtKey, now_ns: u64) -> (CtKey, CtValue) {
        let twin_key = self.twin_key(key);
        let (snat_addr, snat_port) = if !self.is_snat() {
            (0, 0)
        } else if self.is_reply() {
            // The forward entry writes the source this reply goes back to.
            (key.daddr, key.dport)
        } else {
            // The reply entry writes back the client's own address.
            (key.saddr, key.sport)
        };
        let (nat_addr, nat_port) = if self.is_reply() {
            (key.saddr, key.sport)
        } else {
            (key.daddr, key.dport)
        };
        let value = CtValue {
            nat_addr,
            nat_port,
            flags: (self.flags ^ CT_FLAG_REPLY) & !(CT_FLAG_PEER | CT_FLAG_NEIGH),
            backend_id: self.backend_id,
            svc_id: self.svc_id,
            snat_addr,
            snat_port,
            _pad: 0,
            last_seen_ns: now_ns,
            ifindex: 0,
            macs: [0; 12],
        };
        (twin_key, value)
    }

    /// Idle for longer than its timeout at `now_ns` (monotonic clock).
    pub const fn expired(&self, key: &CtKey, cfg: &Config, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.timeout_ns(key, cfg)
    }
}

/// An IPv4 prefix: address and mask, both network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: u32,
    pub mask: u32,
}

impl Cidr {
    pub const fn contains(&self, addr: u32) -> bool {
        addr & self.mask == self.addr
    }
}

/// Most service CIDRs the datapath checks (a cluster has one or two).
pub const MAX_SERVICE_CIDRS: usize = 4;

/// Datapath settings, the single entry (index 0) of the config array,
/// written by the agent when it starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Service CIDRs; the first `service_cidr_count` are used. Traffic to an
    /// address inside them that is no cluster IP is dropped.
    pub service_cidrs: [Cidr; MAX_SERVICE_CIDRS],
    /// Host byte order.
    pub service_cidr_count: u32,
    /// Network byte order. Source address of hairpin flows.
    pub hairpin_addr: u32,
    /// Host byte order. The socket hooks translate only sockets of this
    /// network namespace (the agent's: the node's), never a pod's or a
    /// test's neighbour; 0 means no socket is translated.
    pub netns_cookie: u64,
    /// Network byte order. Source given to masqueraded external flows (the
    /// node's primary address); 0: none, such flows are dropped.
    pub node_addr: u32,
    /// Host byte order. `CONFIG_FLAG_*`.
    pub flags: u32,
    /// Host byte order, nanoseconds. Idle timeouts of conntrack entries: an
    /// expired entry is never reused (the flow is chosen anew) and the
    /// agent's garbage collection deletes it. 0 expires at once.
    pub ct_tcp_established_ns: u64,
    pub ct_tcp_closing_ns: u64,
    pub ct_udp_ns: u64,
    /// A TCP/SCTP flow that has not seen a reply (netfilter's SYN_SENT).
    pub ct_tcp_syn_sent_ns: u64,
    /// A TCP flow with a FIN from one side only (netfilter's CLOSE_WAIT).
    pub ct_tcp_close_wait_ns: u64,
    /// Host byte order, nanoseconds. REJECT answers to one client address
    /// come at most one per interval on average, with a burst of
    /// `reject_burst` (the kernel's `icmp_ratelimit` for every ICMP error
    /// it sends); 0: no limit.
    pub reject_interval_ns: u64,
    pub reject_burst: u32,
    pub _pad: u32,
}

/// `Config::flags`: Service flows between pods (and to endpoints on other
/// nodes) are delivered past the host's routing and netfilter
/// (`CT_FLAG_PEER`, `CT_FLAG_NEIGH`).
pub const CONFIG_FLAG_FAST_PATH: u32 = 1 << 0;

/// An IPv6 prefix: `addr` and `mask` in map form ([`Addr6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr6 {
    pub addr: Addr6,
    pub mask: Addr6,
}

impl Cidr6 {
    pub const fn contains(&self, addr: &Addr6) -> bool {
        addr[0] & self.mask[0] == self.addr[0]
            && addr[1] & self.mask[1] == self.addr[1]
            && addr[2] & self.mask[2] == self.addr[2]
            && addr[3] & self.mask[3] == self.addr[3]
    }
}

/// The IPv6 datapath's settings, the single entry of `kep_config6`,
/// written by the agent beside [`Config`] (which keeps what both families
/// share: timeouts, the network namespace of the socket hooks, flags).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config6 {
    /// IPv6 service CIDRs; the first `service_cidr_count` are used, as
    /// [`Config::service_cidrs`].
    pub service_cidrs: [Cidr6; MAX_SERVICE_CIDRS],
    /// Host byte order.
    pub service_cidr_count: u32,
    pub _pad: u32,
}

/// Data of a source-ranges LPM trie key (the trie's key is this behind a
/// `prefix_len`): a frontend (svc id of its external entry) and a client
/// prefix. The trie matches `prefix_len` leading bits of `svc_id_be` then
/// `addr`, so ranges are written with `prefix_len` = 32 + their length and
/// looked up with 64.
///
/// [`SourceRange6`] is the same for IPv6 frontends: `prefix_len` = 32 +
/// the range's length, looked up with 160.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRangeOf<A> {
    /// The svc id, big-endian (the trie compares bytes in order).
    pub svc_id_be: u32,
    /// Client address or prefix, network byte order (`u32` or [`Addr6`]).
    pub addr: A,
}

/// Key data of `kep_src_ranges`.
pub type SourceRange = SourceRangeOf<u32>;
/// Key data of `kep_src_ranges6`.
pub type SourceRange6 = SourceRangeOf<Addr6>;

impl<A> SourceRangeOf<A> {
    /// Bits of `svc_id_be`, always matched whole.
    pub const SVC_BITS: u32 = 32;
}

/// Key of the session-affinity map: one client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    /// Host byte order. `ServiceValue::svc_id` of the frontend.
    pub svc_id: u32,
    /// Client IPv4 address, network byte order (0 for the node's own
    /// sockets, which share the node's address).
    pub client: u32,
}

/// The endpoint a client is kept on, and when it last opened a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityValue {
    /// Host byte order.
    pub backend_id: u32,
    pub _pad: u32,
    /// Host byte order. `bpf_ktime_get_ns` of the last new flow.
    pub last_used_ns: u64,
}

/// Packets and bytes through one frontend (key: svc id) or to and from one
/// backend (key: backend id), per CPU; both directions of translated flows
/// count. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// One client's REJECT answers (key: its address, network byte order): a
/// token bucket as the kernel's `inet_peer_xrlim_allow`, in nanoseconds of
/// credit. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RejectBucket {
    /// Credit: an answer costs `Config::reject_interval_ns`; it grows with
    /// time up to `reject_burst` answers.
    pub credit_ns: u64,
    /// `bpf_ktime_get_coarse_ns` of the last answer or refusal.
    pub last_ns: u64,
}

/// Key of the socket reverse-NAT map: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockRevNatKey {
    /// Host byte order. `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The frontend a socket really addressed, shown back to the application
/// (getpeername, recvmsg source) instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockRevNat {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// [`SockRevNatKey`] of an IPv6 socket: the backend it was sent to (an
/// IPv4-mapped address when it reached an IPv4 frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockRevNatKey6 {
    /// Host byte order. `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    pub addr: Addr6,
    /// Network byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

/// [`SockRevNat`] of an IPv6 socket: the frontend it addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockRevNat6 {
    pub addr: Addr6,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// An IP datagram whose fragments are on their way: its addresses,
/// protocol and IP id, as its fragments carry them where the hook sees
/// them (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IP id, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Where a datagram's later fragments go: its first fragment's addresses
/// after translation, or [`FRAG_FLAG_DROP`]; or [`FRAG_FLAG_PENDING`] while
/// the first fragment has not come.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragValue {
    /// Network byte order.
    pub saddr: u32,
    pub daddr: u32,
    /// Host byte order. `FRAG_FLAG_*`.
    pub flags: u32,
    /// Host byte order. Pending: one past the highest stash slot an early
    /// fragment took (a hint: slots are claimed by insertion, so CPUs racing
    /// for one never share it).
    pub stashed: u32,
    /// Host byte order. `bpf_ktime_get_ns` when written: a datagram's
    /// fragments come within the kernel's reassembly time or not at all.
    pub created_ns: u64,
}

/// The first fragment has not come yet; `stashed` early ones wait.
pub const FRAG_FLAG_PENDING: u32 = 1 << 0;
/// The datagram is dropped (rejected or dropped by its first fragment).
pub const FRAG_FLAG_DROP: u32 = 1 << 1;
/// The datagram's packets are sent past the stack (`CT_FLAG_REDIRECT`).
pub const FRAG_FLAG_REDIRECT: u32 = 1 << 2;

/// An early fragment held in the stash: its datagram, the generation of
/// the datagram's pending record (the low bits of its `created_ns`, so a
/// later datagram reusing the IP id never sees an older one's frames), and
/// its slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StashKey {
    pub frag: FragKey,
    /// Host byte order.
    pub generation: u32,
    /// Host byte order.
    pub slot: u32,
}

impl StashKey {
    pub const fn new(frag: FragKey, generation: u32, slot: u32) -> Self {
        Self {
            frag,
            generation,
            slot,
        }
    }
}

/// Most bytes of one held fragment, from its Ethernet header (a 9,000-byte
/// MTU's frames fit).
pub const FRAG_STASH_BYTES: usize = 9216;

/// Most early fragments of one datagram held (a 65,535-byte datagram has
/// 45 fragments at a 1,500-byte MTU).
pub const FRAG_STASH_PER_DATAGRAM: u32 = 64;

/// One fragment's frame, as it came.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentBytes {
    /// Host byte order; at most [`FRAG_STASH_BYTES`].
    pub len: u32,
    pub bytes: [u8; FRAG_STASH_BYTES],
}

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016).
///
/// Each frontend with a table has an entry `svc_id -> MaglevTable` in the
/// maglev map, a hash map without preallocation. Its value holds a header
/// and then the table:
///
/// ```text
/// [SIZE]            table size M (prime, at most MAX_SIZE)
/// [FINGERPRINT_LO]  low 32 bits of the fingerprint of what the table was built from
/// [FINGERPRINT_HI]  high 32 bits
/// [HEADER_LEN + i]  backend id of table position i, 0 <= i < M
/// ```
///
/// A table is replaced with one update of its whole value: the kernel
/// allocates the new element and swaps it in under RCU, so a packet sees
/// the whole old or the whole new table, never a mix. (A map of maps would
/// give the same guarantee, but the kernel waits for an RCU grace period on
/// every update of one — milliseconds per frontend.)
/// A filter in front of the two lookups a packet without a conntrack entry
/// makes (services, then endpoints): one bit per hash of every frontend's
/// and every endpoint's (address, port, protocol), whatever its slot or
/// scope. A clear bit proves neither map has that destination, so a packet
/// outside the service CIDRs to it is passed after one array load instead
/// of two hash misses; a set bit (a destination of ours, or a collision)
/// only means the lookups run as before. The agent keeps it a superset of
/// the maps at every instant: bits are set before the entries they cover
/// are written and cleared after those are deleted. Only the opening of a
/// flow is filtered, never a conntrack lookup, so flows outlive the
/// frontends and endpoints they were opened to, as before.
pub mod served {
    /// Bits per chunk (one array value: a 512-byte line of 64 words).
    pub const CHUNK_BITS: u32 = 4096;
    pub const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;
    /// Chunks in the map; 2^20 bits (128 KiB): at 100,000 frontends and
    /// endpoints about one destination in ten is a false positive.
    pub const CHUNKS: u32 = 256;
    pub const BITS: u32 = CHUNK_BITS * CHUNKS;

    /// One array value.
    pub type Chunk = [u64; CHUNK_WORDS];

    /// An IPv6 address (map byte order) folded to the 32 bits [`bit`]
    /// hashes: both families share the one bitmap.
    #[inline(always)]
    pub const fn fold6(addr: crate::Addr6) -> u32 {
        addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24)
    }

    /// Where `(addr, port, proto)` (map byte order, as packets carry them)
    /// has its bit: (chunk, word in the chunk, mask).
    #[inline(always)]
    pub const fn bit(addr: u32, port: u16, proto: u8) -> (u32, usize, u64) {
        let h = crate::maglev::mix32(
            crate::maglev::mix32(addr ^ 0x2545_f491) ^ ((port as u32) << 8 | proto as u32),
        ) % BITS;
        (
            h / CHUNK_BITS,
            ((h % CHUNK_BITS) / 64) as usize,
            1 << (h % 64),
        )
    }
}

pub mod maglev {
    pub const SIZE: usize = 0;
    pub const FINGERPRINT_LO: usize = 1;
    pub const FINGERPRINT_HI: usize = 2;
    pub const HEADER_LEN: usize = 3;
    /// Default table size: prime, and large enough that a few hundred
    /// endpoints still each get within a percent of their share.
    pub const DEFAULT_SIZE: u32 = 16_381;
    /// Largest table size: what a map value holds (64 KiB per frontend).
    pub const MAX_SIZE: u32 = 16_381;

    /// The maglev map's value.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MaglevTable {
        pub words: [u32; HEADER_LEN + MAX_SIZE as usize],
    }

    impl MaglevTable {
        pub const fn size(&self) -> u32 {
            self.words[SIZE]
        }

        pub const fn fingerprint(&self) -> u64 {
            self.words[FINGERPRINT_LO] as u64 | (self.words[FINGERPRINT_HI] as u64) << 32
        }

        /// Backend id at table position `pos` (< size).
        #[inline(always)]
        pub fn entry(&self, pos: u32) -> Option<u32> {
            self.words.get(HEADER_LEN + pos as usize).copied()
        }
    }

    /// One round of a 32-bit finaliser (murmur3's fmix32): every input bit
    /// affects every output bit.
    #[inline(always)]
    pub const fn mix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        h
    }

    /// Hash of a flow's 5-tuple (fields in map byte order, as packets carry
    /// them) that picks its table position. The datapath and the agent's
    /// tests share it; it is fixed (no per-boot seed) so every node picks the
    /// same position for the same flow.
    #[inline(always)]
    pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        let mut h = mix32(saddr ^ 0x9e37_79b9);
        h = mix32(h ^ daddr);
        h = mix32(h ^ ((sport as u32) << 16 | dport as u32));
        mix32(h ^ proto as u32)
    }
}

/// Indexes of the per-CPU `u64` counters in the stats map.
pub mod stat {
    /// New flows translated to a backend.
    pub const NEW_FLOWS: u32 = 0;
    /// Packets translated through an existing forward conntrack entry.
    pub const FORWARD_HITS: u32 = 1;
    /// Packets reverse-translated through a reply conntrack entry.
    pub const REPLY_HITS: u32 = 2;
    /// New flows to a frontend without usable backends answered with ICMP.
    pub const REJECTS: u32 = 3;
    /// New flows to a frontend without usable backends dropped.
    pub const DROPS: u32 = 4;
    /// Conntrack inserts that failed (map full or update error).
    pub const CT_INSERT_FAILED: u32 = 5;
    /// New service flows dropped because a backend slot pointed nowhere
    /// (never expected: the agent writes backends before slots).
    pub const UNTRANSLATABLE: u32 = 6;
    /// Packets to a service-CIDR address that is no cluster IP, dropped.
    pub const UNALLOCATED_DROPS: u32 = 7;
    /// Sockets of the node's own processes translated at connect/sendmsg.
    pub const SOCK_TRANSLATED: u32 = 8;
    /// New external flows dropped by loadBalancerSourceRanges.
    pub const SOURCE_RANGE_DROPS: u32 = 9;
    /// New external flows that needed masquerading but found no free
    /// source port (or no node address).
    pub const SNAT_FAILED: u32 = 10;
    /// Packets translated and sent back out by XDP (`XDP_TX`), also counted
    /// as forward or reply hits.
    pub const XDP_TX: u32 = 11;
    /// ICMP errors about a tracked flow (a router's "fragmentation needed",
    /// a backend's "port unreachable", ...) translated like its packets.
    pub const ICMP_ERRORS: u32 = 12;
    /// Connections straight to an endpoint's address, tracked (untranslated)
    /// so no Service flow takes their tuple.
    pub const DIRECT_FLOWS: u32 = 13;
    /// New flows whose tuple towards the endpoint was held by another live
    /// flow, given another source port (netfilter's implicit remap).
    pub const PORT_REMAPS: u32 = 14;
    /// Later fragments (no ports) translated like their datagram's first.
    pub const FRAGMENTS: u32 = 15;
    /// Later fragments that came before their datagram's first one, held
    /// until it came.
    pub const FRAG_STASHED: u32 = 16;
    /// Held fragments sent on once their first fragment came.
    pub const FRAG_REPLAYED: u32 = 17;
    /// Fragments that could not be held (the stash full, more than
    /// [`crate::FRAG_STASH_PER_DATAGRAM`] of one datagram, bigger than
    /// [`crate::FRAG_STASH_BYTES`]) and went on untranslated, or held ones
    /// whose first fragment was too big to replay them with.
    pub const FRAG_UNTRANSLATED: u32 = 18;
    /// A flow's entry written again from its other one after it was lost
    /// (evicted from a full table): the flow goes on instead of breaking.
    pub const CT_RESTORED: u32 = 19;
    /// REJECT answers not sent: the client had its share
    /// (`Config::reject_interval_ns`, the kernel's `icmp_ratelimit`); the
    /// request is dropped, as the kernel drops what it may not answer.
    pub const REJECT_RATE_LIMITED: u32 = 20;
    /// SCTP packets whose ports could not be translated with a right
    /// CRC32c (a packet longer than the CRC tables cover), passed
    /// untranslated.
    pub const SCTP_CRC_FAILED: u32 = 21;
    /// Packets delivered straight into a pod on this node (`CT_FLAG_PEER`).
    pub const FAST_PATH_PEER: u32 = 22;
    /// Packets sent straight to an endpoint on another node
    /// (`CT_FLAG_NEIGH`).
    pub const FAST_PATH_NEIGH: u32 = 23;
    /// Number of counters; the size of the stats array.
    pub const COUNT: u32 = 24;
    /// Names in index order, for the CLI and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "new_flows",
        "forward_hits",
        "reply_hits",
        "rejects",
        "drops",
        "ct_insert_failed",
        "untranslatable",
        "unallocated_drops",
        "sock_translated",
        "source_range_drops",
        "snat_failed",
        "xdp_tx",
        "icmp_errors",
        "direct_flows",
        "port_remaps",
        "fragments",
        "frag_stashed",
        "frag_replayed",
        "frag_untranslated",
        "ct_restored",
        "reject_rate_limited",
        "sctp_crc_failed",
        "fast_path_peer",
        "fast_path_neigh",
    ];
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 12);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<AffinityKey>() == 8);
    assert!(core::mem::size_of::<Traffic>() == 16);
    assert!(core::mem::size_of::<RejectBucket>() == 16);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::size_of::<CtKey>() == 16);
    assert!(core::mem::size_of::<CtValue>() == 48);
    assert!(core::mem::size_of::<SourceRange>() == 8);
    assert!(core::mem::align_of::<CtValue>() == 8);
    assert!(core::mem::size_of::<Config>() == 8 * MAX_SERVICE_CIDRS + 80);
    assert!(core::mem::size_of::<SockRevNatKey>() == 16);
    assert!(core::mem::size_of::<SockRevNat>() == 8);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragValue>() == 24);
    assert!(core::mem::size_of::<StashKey>() == 20);
    assert!(core::mem::size_of::<FragmentBytes>() == 4 + FRAG_STASH_BYTES);
    assert!(core::mem::size_of::<ServiceKey6>() == 24);
    assert!(core::mem::size_of::<Backend6>() == 20);
    assert!(core::mem::size_of::<SourceRange6>() == 20);
    assert!(core::mem::size_of::<Config6>() == 32 * MAX_SERVICE_CIDRS + 8);
    assert!(core::mem::size_of::<SockRevNatKey6>() == 32);
    assert!(core::mem::size_of::<SockRevNat6>() == 20);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is repr(C), made only of integers, with all padding
    // spelled out as named fields, so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceKey6 {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::SourceRange6 {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNat {}
    unsafe impl aya::Pod for super::Config6 {}
    unsafe impl aya::Pod for super::SockRevNatKey6 {}
    unsafe impl aya::Pod for super::SockRevNat6 {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::RejectBucket {}
    unsafe impl aya::Pod for super::SourceRange {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::StashKey {}
    unsafe impl aya::Pod for super::FragmentBytes {}
    unsafe impl aya::Pod for super::maglev::MaglevTable {}
}
