//! Connection tracking: the conntrack entry a packet belongs to, the one
//! decision that opens a flow (whichever hook sees its first packet), and
//! what an entry does to a packet of its flow ([`translated`]).

use proxy_common::{
    Backend, CT_FLAG_CLOSING, CT_FLAG_DIRECT, CT_FLAG_FIN_FORWARD, CT_FLAG_FIN_REPLY,
    CT_FLAG_REDIRECT, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT, Config, CtKey, CtValue, maglev, proto,
    stat,
};

use crate::lb::{self, Family};
use crate::maps::{
    BACKENDS, CONNTRACK, CT_SCRATCH, config, count, is_endpoint, is_node_address, may_be_served,
};
use crate::packet::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// A flow idle this long has its other entry looked at on its next
/// packet (and re-created if it was lost, e.g. evicted from the full
/// table), so a flow never stays broken for want of one of its entries.
const TWIN_CHECK_NS: u64 = 1_000_000_000;

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
    let key = flow.key();
    let entry = CONNTRACK.get_ptr_mut(key)?;
    let ct = unsafe { *entry };
    let ended = ct.flags & (CT_FLAG_CLOSING | CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY) != 0;
    let reopened = ended && !ct.is_reply() && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if reopened {
        return None;
    }
    match cfg {
        Some(c) if ct.expired(&key, c, now) && !twin_alive(&key, &ct, c, now) => None,
        _ => Some((entry, ct)),
    }
}

/// Whether the other entry of an idle-looking entry's flow is still in use
/// (a one-way stream refreshes only one of them): the flow lives on.
#[inline(never)]
fn twin_alive(key: &CtKey, ct: &CtValue, cfg: &Config, now: u64) -> bool {
    let twin = ct.twin_key(key);
    unsafe { CONNTRACK.get(twin) }.is_some_and(|t| !t.expired(&twin, cfg, now))
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
/// What a packet without a live conntrack entry becomes (see
/// [`open_flow`]): a new flow (its forward entry written out), or not.
pub mod opened {
    pub const FLOW: u32 = 0;
    pub const PASS: u32 = 1;
    pub const DROP: u32 = 2;
    pub const REJECT: u32 = 3;
}
use opened::{DROP, PASS, REJECT};

/// Opens the flow of `flow`'s packet: both conntrack entries are written,
/// and the forward one (the packet is to be translated with) also to
/// `out`. Returns an [`opened`] code.
#[inline(always)]
pub fn open_flow(flow: &Flow, origin: Origin, now: u64, out: &mut CtValue) -> u32 {
    // Neither a frontend nor an endpoint: passed without the services and
    // endpoints lookups. Inside the service CIDRs the services map also
    // tells REJECT from DROP, so it is always asked there.
    if !may_be_ours(flow.daddr, flow.dport, flow.proto) {
        return PASS;
    }
    let cfg = config();
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
                return PASS;
            }
            (0, to, 0, false, false)
        }
        lb::Choice::Drop => return DROP,
        lb::Choice::Reject => return REJECT,
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
        return DROP;
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
        if taken_over(held, &reply_key, flow, shared, now) {
            break;
        }
        if tries == SNAT_PORT_TRIES {
            count(stat::SNAT_FAILED);
            return DROP;
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
    *out = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        backend_id,
        svc_id,
        snat_addr,
        snat_port: if snat { snat_port } else { 0 },
        _pad: 0,
        last_seen_ns: now,
        ifindex: 0,
        macs: [0; 12],
    };
    // The reply entry is built in per-CPU map memory: on the stack, with
    // the forward one, it took the frames past the verifier's budget.
    let Some(scratch) = CT_SCRATCH.get_ptr_mut(0) else {
        return DROP;
    };
    let scratch = unsafe { &mut *scratch };
    (scratch.0, scratch.1) = out.twin(&flow.key(), now);
    if CONNTRACK.insert(&scratch.0, &scratch.1, 0).is_err() {
        count(stat::CT_INSERT_FAILED);
        return DROP;
    }
    if !direct && flow.proto == proto::UDP && is_node_address(backend.addr) {
        // A UDP server of the node bound to 0.0.0.0 answers from the
        // address its route to the client prefers (say the node's address
        // on the client's veth), not necessarily the one it was reached at:
        // the reply is found by [`any_node_address`] whatever node address
        // it comes from. (netfilter, hence kube-proxy, loses such replies.)
        // Without this entry only answers from the endpoint's own address
        // are translated.
        scratch.0 = any_node_address(&scratch.0);
        let _ = CONNTRACK.insert(&scratch.0, &scratch.1, 0);
    }
    if CONNTRACK.insert(flow.key(), &*out, 0).is_err() {
        // Still translated: this packet is fine, a later one re-chooses.
        count(stat::CT_INSERT_FAILED);
    }
    count(if direct {
        stat::DIRECT_FLOWS
    } else {
        stat::NEW_FLOWS
    });
    opened::FLOW
}

/// Whether a new flow to `(daddr, dport, proto)` may be translated or
/// tracked: the address is inside a service CIDR, or the served filter
/// does not rule out a frontend or endpoint there. (A frame of its own:
/// inlined, it took the XDP program's frames past the verifier's 512
/// bytes.)
#[inline(never)]
pub fn may_be_ours(daddr: u32, dport: u16, proto: u8) -> bool {
    u32::in_service_cidr(&daddr) || may_be_served(daddr, dport, proto)
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
/// (re-chosen after expiry, a reopen or a backend's removal). (A frame of
/// its own: inlined into the port search, its branches multiplied the
/// verifier's states past its limit.)
#[inline(never)]
fn taken_over(held: &CtValue, key: &CtKey, flow: &Flow, shared: bool, now: u64) -> bool {
    if (held.is_closing() && !shared) || config().is_some_and(|c| held.expired(key, c, now)) {
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

/// The first packet of a connection: a TCP SYN, an SCTP INIT, or any UDP
/// datagram.
#[inline(always)]
fn opens_connection(flow: &Flow) -> bool {
    flow.proto == proto::UDP || flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The flow state bits a packet adds: its first reply, a FIN from its
/// side, an RST; FINs from both sides close the flow (netfilter: a
/// half-closed connection lives on in CLOSE_WAIT, a closed one goes soon).
#[inline(always)]
pub fn state_after(flow: &Flow, ct: &CtValue) -> u16 {
    let mut flags = ct.flags;
    if ct.is_reply() {
        flags |= CT_FLAG_SEEN_REPLY;
    }
    if flow.tcp_flags & TCP_FIN != 0 {
        flags |= if ct.is_reply() {
            CT_FLAG_FIN_REPLY
        } else {
            CT_FLAG_FIN_FORWARD
        };
    }
    if flow.tcp_flags & TCP_RST != 0
        || flags & (CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY)
            == CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY
    {
        flags |= CT_FLAG_CLOSING;
    }
    flags & CtValue::STATE & !ct.flags
}

/// Brings the flow's other entry up to date with the state bits `added` by
/// this packet. An entry that was lost (evicted from a full table) is
/// written again from this one, so both entries of a flow live or go
/// together.
#[inline(never)]
pub fn sync_twin(flow: &Flow, ct: &CtValue, added: u16, now: u64) {
    let key = flow.key();
    if let Some(twin) = CONNTRACK.get_ptr_mut(ct.twin_key(&key)) {
        unsafe { (*twin).flags |= added };
        return;
    }
    // Built in per-CPU map memory: on the stack the pair took this frame
    // past the verifier's budget.
    let Some(scratch) = CT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let scratch = unsafe { &mut *scratch };
    (scratch.0, scratch.1) = ct.twin(&key, now);
    if CONNTRACK.insert(&scratch.0, &scratch.1, 0).is_ok() {
        count(stat::CT_RESTORED);
    }
}

/// Per-packet bookkeeping of a live entry: its last-seen time, and the
/// flow's state on both entries when this packet changes it (or the flow
/// was idle: its other entry is checked).
#[inline(always)]
pub fn touch(flow: &Flow, entry: *mut CtValue, ct: &CtValue, now: u64) {
    let added = state_after(flow, ct);
    unsafe {
        if added != 0 {
            (*entry).flags |= added;
        }
        (*entry).last_seen_ns = now;
    }
    if added != 0 || now.saturating_sub(ct.last_seen_ns) > TWIN_CHECK_NS {
        sync_twin(flow, ct, added, now);
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
}

/// What the conntrack entry `ct` makes of this packet of its flow
/// ([`CtValue::translate`]).
#[inline(always)]
pub fn translated(flow: &Flow, ct: &CtValue) -> Tuple {
    let (saddr, daddr, sport, dport) = ct.translate(&flow.key());
    Tuple {
        saddr,
        daddr,
        sport,
        dport,
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
