//! Connection tracking: the conntrack entry a packet belongs to, the one
//! decision that opens a flow (whichever hook sees its first packet), and
//! what an entry does to a packet of its flow ([`translated`]).

use proxy_common::{
    Backend, CT_FLAG_CLOSING, CT_FLAG_DIRECT, CT_FLAG_REDIRECT, CT_FLAG_REPLY, CT_FLAG_SNAT,
    Config, CtKey, CtValue, maglev, proto, stat,
};

use crate::lb;
use crate::maps::{BACKENDS, CONNTRACK, count, is_endpoint, is_node_address};
use crate::packet::{Flow, TCP_ACK, TCP_SYN};

/// Where a packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a pod (its veth).
    Pod,
    /// From outside the node (a node interface).
    Node,
}

/// Source ports tried for a masqueraded flow whose own port is taken on the
/// node address (another client used it towards the same endpoint).
const SNAT_PORT_TRIES: u32 = 4;
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_SPAN: u32 = 28_000;

/// The flow's conntrack entry while it stands. An idle flow is over: a new
/// one on the same tuple is chosen anew, and a late reply is not
/// translated. A client opening a new connection on the tuple of one that
/// is closing (ports are reused quickly) also starts a new flow, balanced
/// afresh, as netfilter does for a SYN in TIME_WAIT; otherwise it would keep
/// an endpoint the Service may no longer have chosen.
#[inline(always)]
pub fn live_entry(flow: &Flow, cfg: Option<&Config>, now: u64) -> Option<(*mut CtValue, CtValue)> {
    let entry = CONNTRACK.get_ptr_mut(flow.key())?;
    let ct = unsafe { *entry };
    let expired = match cfg {
        Some(c) => ct.expired(&flow.key(), c, now),
        None => false,
    };
    let reopened =
        ct.is_closing() && !ct.is_reply() && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if expired || reopened {
        None
    } else {
        Some((entry, ct))
    }
}

/// What a packet without a live conntrack entry becomes.
pub enum Opened {
    /// A new flow: both conntrack entries are in; this is the forward one,
    /// which the packet is to be translated with.
    Flow(CtValue),
    Pass,
    Drop,
    Reject,
}

/// Chooses the endpoint of a new flow and writes its conntrack entries:
/// one decision, whichever hook (TC or XDP) sees the flow's first packet.
///
/// A connection that is no Service flow is tracked too where it could
/// clash with one: a new connection straight to an endpoint's address and
/// port (netfilter tracks everything; this is the part that matters). Its
/// entries translate nothing ([`CT_FLAG_DIRECT`]), so its replies are never
/// taken for those of a Service flow that used the same tuple, and a later
/// Service flow cannot take its tuple unseen.
///
/// The tuple the endpoint answers to (the reply entry's key) belongs to one
/// flow at a time. Held by an entry that is over (expired, or closing after
/// a FIN or RST: the client reused its port, so its old connection is
/// done) or by an earlier flow of this very client to this very frontend,
/// it is taken over. Held by another live flow, the new flow's source port
/// is remapped, as netfilter's NAT does for a clashing tuple.
#[inline(always)]
pub fn open_flow(flow: &Flow, origin: Origin, cfg: Option<&Config>, now: u64) -> Opened {
    let hash = maglev::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    let (backend_id, backend, svc_id, mut masquerade, mut node_address) = match lb::choose(
        flow.daddr,
        flow.dport,
        flow.proto,
        flow.saddr,
        hash,
        origin == Origin::Node,
    ) {
        lb::Choice::Backend {
            id,
            backend,
            svc_id,
            masquerade,
            node_address,
        } => (id, backend, svc_id, masquerade, node_address),
        lb::Choice::Pass => {
            let to = Backend::new(flow.daddr, flow.dport, flow.proto);
            if !opens_connection(flow) || !is_endpoint(&to) {
                return Opened::Pass;
            }
            (0, to, 0, false, false)
        }
        lb::Choice::Drop => return Opened::Drop,
        lb::Choice::Reject => return Opened::Reject,
    };
    let direct = svc_id == 0;

    // An endpoint that is this node itself (a hostNetwork pod) gets the
    // packet from the local stack with the client's address kept: the
    // node's own address as source could not be answered (source and
    // destination would be this node), and kube-proxy's masquerade, in
    // POSTROUTING, never sees locally delivered packets either. Its
    // answers are sent by the node, so reversed at egress.
    if (masquerade || node_address) && is_node_address(backend.addr) {
        masquerade = false;
        node_address = false;
    }

    // A pod that picked itself gets a source it does not own, so its reply
    // comes back through this node instead of being a martian to itself
    // (kube-proxy masquerades hairpin traffic for the same reason). An
    // external client of a Cluster-policy frontend gets the node's address,
    // so an endpoint on another node answers through this one.
    let mut snat_addr = match cfg {
        Some(c) if backend.addr == flow.saddr && !direct => c.hairpin_addr,
        Some(c) if masquerade => c.node_addr,
        _ => 0,
    };
    if masquerade && snat_addr == 0 {
        count(stat::SNAT_FAILED);
        return Opened::Drop;
    }
    let mut flags = if direct { CT_FLAG_DIRECT } else { 0 };
    if masquerade || node_address {
        flags |= CT_FLAG_REDIRECT;
    }

    // The reply entry goes in first: without it the backend's answer could not
    // be translated back, so a flow that cannot get one is not started.
    let reply_dst = if snat_addr != 0 {
        snat_addr
    } else {
        flow.saddr
    };
    let mut snat_port = flow.sport;
    let mut reply_key = CtKey::new(backend.addr, reply_dst, backend.port, snat_port, flow.proto);
    // A source shared with other clients (the node's or the hairpin
    // address) does not take over another client's closing flow: its last
    // packets may still come, and another port is free for the asking.
    let shared = snat_addr != 0;
    let mut tries = 0;
    while let Some(held) = unsafe { CONNTRACK.get(reply_key) } {
        if taken_over(held, &reply_key, flow, shared, cfg, now) {
            break;
        }
        if tries == SNAT_PORT_TRIES {
            count(stat::SNAT_FAILED);
            return Opened::Drop;
        }
        if snat_addr == 0 {
            // The client keeps its address; only its port moves.
            snat_addr = flow.saddr;
            count(stat::PORT_REMAPS);
        }
        let port = SNAT_PORT_MIN + (hash >> (tries * 4)) % SNAT_PORT_SPAN;
        snat_port = (port as u16).to_be();
        reply_key.dport = snat_port;
        tries += 1;
    }
    let snat = snat_addr != 0;
    if snat {
        flags |= CT_FLAG_SNAT;
    }
    let reply = CtValue {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        flags: CT_FLAG_REPLY | flags,
        _pad: 0,
        backend_id,
        svc_id,
        snat_addr: if snat { flow.saddr } else { 0 },
        snat_port: if snat { flow.sport } else { 0 },
        _pad2: 0,
        last_seen_ns: now,
    };
    if CONNTRACK.insert(reply_key, reply, 0).is_err() {
        count(stat::CT_INSERT_FAILED);
        return Opened::Drop;
    }
    if !direct && flow.proto == proto::UDP && is_node_address(backend.addr) {
        // A UDP server of the node bound to 0.0.0.0 answers from the
        // address its route to the client prefers (say the node's address
        // on the client's veth), not necessarily the one it was reached at:
        // the reply is found by [`any_node_address`] whatever node address
        // it comes from. (netfilter, hence kube-proxy, loses such replies.)
        // Without this entry only answers from the endpoint's own address
        // are translated.
        let _ = CONNTRACK.insert(any_node_address(&reply_key), reply, 0);
    }
    let forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        snat_addr,
        snat_port: if snat { snat_port } else { 0 },
        ..reply
    };
    if CONNTRACK.insert(flow.key(), forward, 0).is_err() {
        // Still translated: this packet is fine, a later one re-chooses.
        count(stat::CT_INSERT_FAILED);
    }
    count(if direct {
        stat::DIRECT_FLOWS
    } else {
        stat::NEW_FLOWS
    });
    Opened::Flow(forward)
}

/// The key of a UDP host endpoint's reply entry with the source address
/// left out (0, never a real source): where the node's answer is looked up
/// when it leaves from another of the node's addresses.
#[inline(always)]
pub fn any_node_address(reply_key: &CtKey) -> CtKey {
    CtKey {
        saddr: 0,
        ..*reply_key
    }
}

/// Whether the entry `held` at `key`, the reply key a new flow wants, may
/// be taken over: it is over (idle past its timeout, or closing, unless
/// the source is `shared` with other clients), or it is the reply entry of
/// an earlier flow of the same client tuple to the same frontend
/// (re-chosen after expiry, a reopen or a backend's removal).
#[inline(always)]
fn taken_over(
    held: &CtValue,
    key: &CtKey,
    flow: &Flow,
    shared: bool,
    cfg: Option<&Config>,
    now: u64,
) -> bool {
    if (held.is_closing() && !shared) || cfg.is_some_and(|c| held.expired(key, c, now)) {
        return true;
    }
    let client = if held.is_snat() {
        (held.snat_addr, held.snat_port)
    } else {
        (key.daddr, key.dport)
    };
    held.is_reply()
        && client == (flow.saddr, flow.sport)
        && (held.nat_addr, held.nat_port) == (flow.daddr, flow.dport)
}

/// The first packet of a connection: a TCP SYN, or any UDP datagram.
#[inline(always)]
fn opens_connection(flow: &Flow) -> bool {
    flow.proto != proto::TCP || flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// FIN or RST: both entries of the flow switch to the closing timeout, so a
/// closed connection's state goes soon instead of after a day.
#[inline(always)]
pub fn mark_closing(entry: *mut CtValue, ct: &CtValue, flow: &Flow) {
    unsafe { (*entry).flags |= CT_FLAG_CLOSING };
    let twin = translated(flow, ct).reversed(flow.proto);
    if let Some(other) = CONNTRACK.get_ptr_mut(twin) {
        unsafe { (*other).flags |= CT_FLAG_CLOSING };
    }
}

/// A flow's addresses and ports after translation, as stored in packets.
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    /// Whether `flow` leaves as it came (a direct flow's entries).
    #[inline(always)]
    pub fn unchanged(&self, flow: &Flow) -> bool {
        (self.saddr, self.daddr, self.sport, self.dport)
            == (flow.saddr, flow.daddr, flow.sport, flow.dport)
    }

    /// The key of the flow's entry for the other direction: the answer to
    /// a packet leaving as this tuple.
    #[inline(always)]
    pub fn reversed(&self, proto: u8) -> CtKey {
        CtKey::new(self.daddr, self.saddr, self.dport, self.sport, proto)
    }
}

/// What the conntrack entry `ct` makes of this packet of its flow: a reply
/// leaves from the frontend (and, with `CT_FLAG_SNAT`, goes to the client's
/// own address and port, which the forward direction hid); a forward packet
/// goes to the backend (from the translated source with `CT_FLAG_SNAT`).
/// The one definition both hooks translate by.
#[inline(always)]
pub fn translated(flow: &Flow, ct: &CtValue) -> Tuple {
    if ct.is_reply() {
        let (daddr, dport) = if ct.is_snat() {
            (ct.snat_addr, ct.snat_port)
        } else {
            (flow.daddr, flow.dport)
        };
        Tuple {
            saddr: ct.nat_addr,
            sport: ct.nat_port,
            daddr,
            dport,
        }
    } else {
        let (saddr, sport) = if ct.is_snat() {
            (ct.snat_addr, ct.snat_port)
        } else {
            (flow.saddr, flow.sport)
        };
        Tuple {
            saddr,
            sport,
            daddr: ct.nat_addr,
            dport: ct.nat_port,
        }
    }
}

/// Whether a live entry may translate its packet: a reply or a direct
/// flow's entry always; a forward entry only while its backend id still
/// names the same address and port (ids are recycled after a backend is
/// removed).
#[inline(always)]
pub fn usable(ct: &CtValue) -> bool {
    if ct.is_reply() || ct.is_direct() {
        return true;
    }
    match unsafe { BACKENDS.get(ct.backend_id) } {
        Some(b) => b.addr == ct.nat_addr && b.port == ct.nat_port,
        None => false,
    }
}
