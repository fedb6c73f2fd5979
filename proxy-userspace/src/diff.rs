//! Live map contents + desired map contents -> the minimal ordered updates.
//!
//! The datapath keeps reading the maps while the agent applies these ops one
//! at a time, with no transaction, so every intermediate state must be one
//! the datapath handles correctly. The datapath reads slot 0 of a frontend,
//! picks a slot in `1..=count`, then looks that slot's backend id up. Hence
//! the order:
//!
//! 1. put backends: a slot written later can only point at an existing one;
//! 2. put slots > 0: written before any count that covers them, and
//!    replacing a slot's backend id swaps between two existing backends;
//! 3. put Maglev tables (each a whole new table swapped in at once, pointing
//!    only at backends from step 1) and source ranges (so a frontend is
//!    never told to check ranges that are not there yet);
//! 4. put slot-0 entries: a growing count only ever covers slots written in
//!    step 2, and the Maglev flag is set only once step 3 wrote the table; a
//!    shrinking count is lowered here, before step 6 removes the slots it no
//!    longer covers;
//! 5. delete slot-0 entries of removed frontends: from then on the datapath
//!    stops at slot 0 and never reads their slots or table;
//! 6. delete tables, source ranges and slots > 0 that nothing uses any
//!    more;
//! 7. delete backends last, once no slot or table points at them.
//!
//! If applying stops part way, the maps are still consistent, and the next
//! diff against the re-read live contents finishes the job.

use proxy_common::ServiceValue;

use crate::contents::{AnyBackend, MapContents, RangeEntry, SvcKey};
use crate::maglev::TableSpec;

/// One map update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, AnyBackend),
    PutService(SvcKey, ServiceValue),
    DeleteService(SvcKey),
    DeleteBackend(u32),
    /// Build the Maglev table of this svc id and swap it in.
    PutTable(u32, TableSpec),
    DeleteTable(u32),
    PutSourceRange(RangeEntry),
    DeleteSourceRange(RangeEntry),
}

/// The updates turning `live` into `desired`, in the order they must be
/// applied (see the module docs). Identical contents give no op.
pub fn diff(live: &MapContents, desired: &MapContents) -> Vec<MapOp> {
    let mut ops = Vec::new();

    for (id, backend) in &desired.backends {
        if live.backends.get(id) != Some(backend) {
            ops.push(MapOp::PutBackend(*id, *backend));
        }
    }
    let changed_services = desired
        .services
        .iter()
        .filter(|(key, value)| live.services.get(key) != Some(value));
    let (slot0_puts, slot_puts): (Vec<_>, Vec<_>) =
        changed_services.partition(|(key, _)| key.slot == 0);
    ops.extend(
        slot_puts
            .into_iter()
            .map(|(k, v)| MapOp::PutService(*k, *v)),
    );
    for (svc_id, table) in &desired.tables {
        if live.tables.get(svc_id) != Some(table) {
            ops.push(MapOp::PutTable(*svc_id, table.clone()));
        }
    }
    for range in desired.source_ranges.difference(&live.source_ranges) {
        ops.push(MapOp::PutSourceRange(*range));
    }
    ops.extend(
        slot0_puts
            .into_iter()
            .map(|(k, v)| MapOp::PutService(*k, *v)),
    );

    let removed_services = live
        .services
        .keys()
        .filter(|key| !desired.services.contains_key(key));
    let (slot0_deletes, slot_deletes): (Vec<&SvcKey>, Vec<&SvcKey>) =
        removed_services.partition(|key| key.slot == 0);
    ops.extend(slot0_deletes.into_iter().map(|k| MapOp::DeleteService(*k)));
    for svc_id in live.tables.keys() {
        if !desired.tables.contains_key(svc_id) {
            ops.push(MapOp::DeleteTable(*svc_id));
        }
    }
    for range in live.source_ranges.difference(&desired.source_ranges) {
        ops.push(MapOp::DeleteSourceRange(*range));
    }
    ops.extend(slot_deletes.into_iter().map(|k| MapOp::DeleteService(*k)));

    for id in live.backends.keys() {
        if !desired.backends.contains_key(id) {
            ops.push(MapOp::DeleteBackend(*id));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::Capacity;
    use crate::contents::{ip_to_map, port_to_map};
    use crate::encode::{Encoder, LbAlgorithm, LbAlgorithms};
    use crate::model::{DesiredState, EmptyAction, Endpoint, Frontend, FrontendState, Protocol};
    use std::net::Ipv4Addr;

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last).into(),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn endpoints(lasts: &[u8]) -> Vec<Endpoint> {
        let mut eps: Vec<Endpoint> = lasts
            .iter()
            .map(|last| Endpoint {
                addr: Ipv4Addr::new(10, 0, 0, *last).into(),
                port: 8080,
            })
            .collect();
        eps.sort();
        eps.dedup();
        eps
    }

    fn desired(entries: &[(Frontend, &[u8])]) -> DesiredState {
        DesiredState {
            frontends: entries
                .iter()
                .map(|(fe, lasts)| {
                    let state = FrontendState {
                        service: format!("default/svc-{}", fe.addr).into(),
                        kind: crate::model::FrontendKind::ClusterIp,
                        endpoints: endpoints(lasts),
                        empty_action: EmptyAction::Reject,
                        affinity_timeout_s: None,
                        lingering: Vec::new(),
                        external: None,
                    };
                    (*fe, state)
                })
                .collect(),
            health_checks: Default::default(),
        }
    }

    fn key(fe: Frontend, slot: u16) -> SvcKey {
        SvcKey::new(
            ip_to_map(fe.addr),
            port_to_map(fe.port),
            fe.proto.number(),
            slot,
        )
    }

    fn apply(contents: &mut MapContents, op: &MapOp) {
        match op {
            MapOp::PutBackend(id, b) => {
                contents.backends.insert(*id, *b);
            }
            MapOp::PutService(k, v) => {
                contents.services.insert(*k, *v);
            }
            MapOp::DeleteService(k) => {
                contents.services.remove(k);
            }
            MapOp::DeleteBackend(id) => {
                contents.backends.remove(id);
            }
            MapOp::PutTable(svc_id, table) => {
                contents.tables.insert(*svc_id, table.clone());
            }
            MapOp::DeleteTable(svc_id) => {
                contents.tables.remove(svc_id);
            }
            MapOp::PutSourceRange(r) => {
                contents.source_ranges.insert(*r);
            }
            MapOp::DeleteSourceRange(r) => {
                contents.source_ranges.remove(r);
            }
        }
    }

    /// What the datapath relies on: every slot a count covers exists, every
    /// slot that exists points at an existing backend, a frontend flagged
    /// Maglev has its table, and tables point at existing backends.
    fn check_consistent(contents: &MapContents) -> Result<(), String> {
        for (svc_id, table) in &contents.tables {
            if let Some(id) = table
                .backends()
                .iter()
                .map(|b| b.id)
                .find(|id| !contents.backends.contains_key(id))
            {
                return Err(format!("table of {svc_id} points at missing backend {id}"));
            }
        }
        for (key, value) in &contents.services {
            if key.slot == 0 && value.uses_maglev() && !contents.tables.contains_key(&value.svc_id)
            {
                return Err(format!("{key:?} uses Maglev but has no table"));
            }
            if key.slot == 0 {
                for slot in 1..=value.count {
                    if !contents.services.contains_key(&key.with_slot(slot)) {
                        return Err(format!(
                            "{key:?} count {} but slot {slot} missing",
                            value.count
                        ));
                    }
                }
            } else if !contents.backends.contains_key(&value.backend_id) {
                return Err(format!(
                    "{key:?} points at missing backend {}",
                    value.backend_id
                ));
            }
        }
        Ok(())
    }

    /// Applies `diff(live, desired)` op by op, checking consistency after
    /// each op, and returns the ops.
    fn apply_checked(live: &MapContents, desired: &MapContents) -> Vec<MapOp> {
        check_consistent(live).expect("starting state is consistent");
        let ops = diff(live, desired);
        let mut state = live.clone();
        for (i, op) in ops.iter().enumerate() {
            apply(&mut state, op);
            if let Err(e) = check_consistent(&state) {
                panic!("after op {i} {op:?}: {e}\nops: {ops:#?}");
            }
        }
        assert_eq!(&state, desired);
        ops
    }

    /// Applies `plan(live, desired, room)` op by op, checking consistency
    /// and that no op asks a full map for a new entry, as the kernel would
    /// refuse it; returns the plan and the state it leaves.
    fn apply_planned(
        live: &MapContents,
        desired: &MapContents,
        cap: &Capacity,
    ) -> (crate::capacity::Plan, MapContents) {
        check_consistent(live).expect("starting state is consistent");
        let plan = crate::capacity::plan(live, desired, None, cap.room(live));
        let mut state = live.clone();
        for (i, op) in plan.ops.iter().enumerate() {
            apply(&mut state, op);
            if let Err(e) = check_consistent(&state) {
                panic!("after op {i} {op:?}: {e}\nops: {:#?}", plan.ops);
            }
            let over = state.services.len() > cap.services as usize
                || state.backends.len() > cap.backends as usize
                || state.tables.len() > cap.tables as usize
                || state.source_ranges.len() > cap.source_ranges as usize;
            assert!(!over, "op {i} {op:?} overfills a map: {cap:?}");
        }
        if plan.held.is_empty() && plan.pending.is_empty() {
            assert_eq!(&state, desired);
        }
        assert_eq!(diff(&state, desired), plan.pending);
        (plan, state)
    }

    fn capacity(services: u32, backends: u32) -> Capacity {
        Capacity {
            services,
            backends,
            tables: 64,
            source_ranges: 64,
        }
    }

    /// issue 17 item 8: with `--backends-max 8`, replacing one Service's
    /// three endpoints while another holds three more used to fail the new
    /// backends and point the slots at nothing; now the endpoints are
    /// swapped through the two free entries, never leaving a slot without
    /// its backend, and the change completes in one plan.
    #[test]
    fn endpoints_are_replaced_through_little_room() {
        let (web, dns) = (frontend(10, 80), frontend(11, 53));
        let mut encoder = Encoder::new();
        let live = encoder.encode(&desired(&[(web, &[1, 2, 3]), (dns, &[4, 5, 6])]));
        let next = encoder.encode(&desired(&[(web, &[7, 8, 9]), (dns, &[4, 5, 6])]));
        let cap = capacity(64, 8);
        let (plan, state) = apply_planned(&live, &next, &cap);
        assert!(plan.held.is_empty() && plan.pending.is_empty(), "{plan:#?}");
        assert_eq!(state, next);
        // The diff's own order would need all 9 backends at once.
        let mut peak = live.clone();
        let most = diff(&live, &next)
            .iter()
            .map(|op| {
                apply(&mut peak, op);
                peak.backends.len()
            })
            .max();
        assert_eq!(most, Some(9));
    }

    /// A Service too big for the services map is held whole; the ones
    /// after it are programmed (it used to fill the map with slots it could
    /// never use, and nothing after it was programmed).
    #[test]
    fn a_frontend_too_big_holds_only_itself() {
        let big: Vec<u8> = (1..=100).collect();
        let small = [frontend(20, 80), frontend(21, 80), frontend(22, 80)];
        let mut entries: Vec<(Frontend, &[u8])> = vec![(frontend(10, 80), &big)];
        entries.extend(small.iter().map(|f| (*f, &[1u8, 2][..])));
        let next = Encoder::new().encode(&desired(&entries));
        let cap = capacity(64, 128);
        let (plan, state) = apply_planned(&MapContents::default(), &next, &cap);
        assert_eq!(plan.held.len(), 1, "{:#?}", plan.held);
        assert_eq!(plan.held[0].frontend, key(frontend(10, 80), 0));
        assert_eq!(plan.held[0].map, proxy_common::map_names::SERVICES);
        for f in small {
            let k = key(f, 0);
            assert_eq!(state.services.get(&k), next.services.get(&k), "{f:?}");
        }
        assert!(!state.services.contains_key(&key(frontend(10, 80), 1)));
    }

    #[test]
    fn identical_contents_give_no_op() {
        let mut encoder = Encoder::new();
        let contents = encoder.encode(&desired(&[(frontend(10, 80), &[1, 2])]));
        assert_eq!(diff(&contents, &contents), []);
        assert_eq!(diff(&MapContents::default(), &MapContents::default()), []);
    }

    #[test]
    fn one_endpoint_added_is_three_ops() {
        let web = frontend(10, 80);
        let api = frontend(11, 80);
        let mut encoder = Encoder::new();
        let live = encoder.encode(&desired(&[(web, &[1]), (api, &[5])]));
        let next = encoder.encode(&desired(&[(web, &[1, 2]), (api, &[5])]));
        let svc_id = live.services[&key(web, 0)].svc_id;
        let new_backend = AnyBackend::new(
            ip_to_map(Ipv4Addr::new(10, 0, 0, 2).into()),
            port_to_map(8080),
            6,
        );
        assert_eq!(
            apply_checked(&live, &next),
            [
                MapOp::PutBackend(3, new_backend),
                MapOp::PutService(key(web, 2), ServiceValue::slot(3)),
                MapOp::PutService(key(web, 0), ServiceValue::service(svc_id, 2, 0)),
            ]
        );
    }

    #[test]
    fn one_endpoint_removed_is_three_ops() {
        let web = frontend(10, 80);
        let mut encoder = Encoder::new();
        let live = encoder.encode(&desired(&[(web, &[1, 2])]));
        let next = encoder.encode(&desired(&[(web, &[1])]));
        let svc_id = live.services[&key(web, 0)].svc_id;
        assert_eq!(
            apply_checked(&live, &next),
            [
                MapOp::PutService(key(web, 0), ServiceValue::service(svc_id, 1, 0)),
                MapOp::DeleteService(key(web, 2)),
                MapOp::DeleteBackend(2),
            ]
        );
    }

    #[test]
    fn first_endpoint_removed_shifts_slots_safely() {
        let web = frontend(10, 80);
        let mut encoder = Encoder::new();
        let live = encoder.encode(&desired(&[(web, &[1, 2, 3])]));
        let next = encoder.encode(&desired(&[(web, &[2, 3])]));
        let ops = apply_checked(&live, &next);
        assert_eq!(ops.len(), 5, "{ops:#?}");
    }

    #[test]
    fn frontend_removed_and_emptied() {
        let web = frontend(10, 80);
        let api = frontend(11, 80);
        let mut encoder = Encoder::new();
        let live = encoder.encode(&desired(&[(web, &[1, 2]), (api, &[2, 3])]));
        let next = encoder.encode(&desired(&[(api, &[])]));
        let ops = apply_checked(&live, &next);
        assert!(matches!(ops[0], MapOp::PutService(k, v) if k == key(api, 0) && v.rejects()));
        // web's slot 0 and its cluster IP's port-less entry go before its
        // slots and backends.
        let cluster_ip = SvcKey::cluster_ip(ip_to_map(web.addr));
        assert!(ops[1..3].contains(&MapOp::DeleteService(key(web, 0))));
        assert!(ops[1..3].contains(&MapOp::DeleteService(cluster_ip)));
        assert_eq!(ops.len(), 3 + 4 + 3);
    }

    #[test]
    fn from_empty_and_back() {
        let mut encoder = Encoder::new();
        let full = encoder.encode(&desired(&[
            (frontend(10, 80), &[1, 2]),
            (frontend(11, 53), &[]),
        ]));
        let ops = apply_checked(&MapContents::default(), &full);
        assert_eq!(ops.len(), full.services.len() + full.backends.len());
        let empty = encoder.encode(&DesiredState::default());
        let ops = apply_checked(&full, &empty);
        assert_eq!(ops.len(), full.services.len() + full.backends.len());
    }

    #[test]
    fn changed_backend_value_is_rewritten() {
        let web = frontend(10, 80);
        let mut live = Encoder::new().encode(&desired(&[(web, &[1])]));
        let desired = live.clone();
        live.backends.get_mut(&1).expect("backend 1").port = 0;
        assert_eq!(
            diff(&live, &desired),
            [MapOp::PutBackend(1, desired.backends[&1])]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Small frontend and endpoint spaces so consecutive states overlap.
        fn arb_desired() -> impl Strategy<Value = DesiredState> {
            prop::collection::btree_map(
                (0u8..4, prop::sample::select(vec![53u16, 80])),
                prop::collection::vec(0u8..8, 0..6),
                0..4,
            )
            .prop_map(|entries| {
                let entries: Vec<(Frontend, Vec<u8>)> = entries
                    .into_iter()
                    .map(|((last, port), eps)| (frontend(last, port), eps))
                    .collect();
                let refs: Vec<(Frontend, &[u8])> = entries
                    .iter()
                    .map(|(fe, eps)| (*fe, eps.as_slice()))
                    .collect();
                desired(&refs)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 200,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn every_intermediate_state_is_consistent(
                states in prop::collection::vec(arb_desired(), 1..6),
                maglev in any::<bool>(),
            ) {
                let mut encoder = if maglev {
                    Encoder::with_algorithms(LbAlgorithms::everywhere(LbAlgorithm::Maglev { table_size: 251 }))
                } else {
                    Encoder::new()
                };
                let mut live = MapContents::default();
                for state in &states {
                    let next = encoder.encode(state);
                    let ops = apply_checked(&live, &next);
                    let changed = next.services.iter().filter(|(k, v)| live.services.get(k) != Some(v)).count()
                        + live.services.keys().filter(|k| !next.services.contains_key(k)).count()
                        + next.backends.iter().filter(|(k, v)| live.backends.get(k) != Some(v)).count()
                        + live.backends.keys().filter(|k| !next.backends.contains_key(k)).count()
                        + next.tables.iter().filter(|(k, v)| live.tables.get(k) != Some(v)).count()
                        + live.tables.keys().filter(|k| !next.tables.contains_key(k)).count();
                    prop_assert_eq!(ops.len(), changed);
                    live = next;
                }
            }

            /// The same with maps too small for some states: every op is
            /// consistent and fits, a state that fits with room to spare is
            /// reached, and one that does not fit is reached once retries
            /// have the room.
            #[test]
            fn every_intermediate_state_fits_and_is_consistent(
                states in prop::collection::vec(arb_desired(), 1..6),
                services in 0u32..48,
                backends in 0u32..12,
                tables in 0u32..6,
                maglev in any::<bool>(),
            ) {
                let mut encoder = if maglev {
                    Encoder::with_algorithms(LbAlgorithms::everywhere(LbAlgorithm::Maglev { table_size: 251 }))
                } else {
                    Encoder::new()
                };
                let cap = Capacity { services, backends, tables, source_ranges: 64 };
                let mut live = MapContents::default();
                for state in &states {
                    let next = encoder.encode(state);
                    // Retries, as the agent does, until nothing changes.
                    for _ in 0..4 {
                        let (plan, after) = apply_planned(&live, &next, &cap);
                        let done = plan.ops.is_empty();
                        live = after;
                        if done {
                            break;
                        }
                    }
                    let roomy = live.services.len().max(next.services.len()) + next.services.len()
                        <= cap.services as usize
                        && live.backends.len() + next.backends.len() <= cap.backends as usize
                        && live.tables.len() + next.tables.len() <= cap.tables as usize;
                    if roomy {
                        prop_assert_eq!(&live, &next);
                    }
                }
            }
        }
    }
}
