use std::collections::BTreeSet;

use lb_common::{PROTO_TCP, maps::VIP_KIND_FRAGMENTS};

use super::*;

/// Records every operation and checks the ordering rules as it goes.
#[derive(Default)]
struct FakeMaps {
    ops: Vec<String>,
    backends: BTreeMap<u32, Backend>,
    slots: BTreeMap<u32, u32>,
    vips: BTreeMap<VipKey, VipMeta>,
    any_port: bool,
    prev: BTreeMap<u32, PrevTable>,
    quic: BTreeMap<QuicServerKey, u32>,
}

impl MapWriter for FakeMaps {
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        // Never invalidate a backend a live table still points at.
        if backend.flags & BACKEND_F_VALID == 0 {
            for meta in self.vips.values() {
                for s in meta.table_offset..meta.table_offset + meta.table_size {
                    assert_ne!(
                        self.slots.get(&s),
                        Some(&id),
                        "backend {id} invalidated while a live slot points at it"
                    );
                }
            }
        }
        self.ops
            .push(format!("backend {id} flags={}", backend.flags));
        self.backends.insert(id, backend);
        Ok(())
    }
    fn write_table(&mut self, offset: u32, table: &SlotTable) -> Result<()> {
        let table = table.to_vec();
        // Never overwrite a region a live previous table uses.
        for p in self.prev.values() {
            assert!(
                offset + table.len() as u32 <= p.offset || offset >= p.offset + p.size,
                "table written over a live previous table"
            );
        }
        // Never overwrite a region a live VIP uses.
        for meta in self.vips.values() {
            let live = meta.table_offset..meta.table_offset + meta.table_size;
            assert!(
                offset + table.len() as u32 <= live.start
                    || offset >= live.end
                    || meta.table_size == 0,
                "table written over a live region"
            );
        }
        self.ops
            .push(format!("slots @{offset} len {}", table.len()));
        for (i, id) in table.iter().enumerate() {
            self.slots.insert(offset + i as u32, *id);
        }
        Ok(())
    }
    fn set_vip(&mut self, key: VipKey, meta: VipMeta) -> Result<()> {
        // Every slot of the new table names a valid backend of this VIP.
        for s in meta.table_offset..meta.table_offset + meta.table_size {
            let id = self.slots[&s];
            let b = self
                .backends
                .get(&id)
                .unwrap_or_else(|| panic!("slot points at unwritten backend {id}"));
            assert_eq!(
                b.flags & BACKEND_F_VALID,
                BACKEND_F_VALID,
                "slot points at invalid backend {id}"
            );
            assert_eq!(b.vip_id, meta.vip_id);
        }
        self.ops
            .push(format!("vip kind={} size={}", key.kind, meta.table_size));
        self.vips.insert(key, meta);
        Ok(())
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.ops.push(format!("remove vip kind={}", key.kind));
        self.vips.remove(key);
        Ok(())
    }
    fn forget_flows_of(&mut self, id: u32) -> Result<u64> {
        self.ops.push(format!("forget flows of {id}"));
        Ok(0)
    }
    fn set_any_port_vips(&mut self, on: bool) -> Result<()> {
        if !on {
            assert!(
                !self.vips.keys().any(|k| k.port == 0 && k.kind == 0),
                "cleared while a port-0 VIP exists"
            );
        }
        self.any_port = on;
        Ok(())
    }
    fn set_prev_table(&mut self, vip_id: u32, table: PrevTable) -> Result<()> {
        self.ops.push(format!("prev {vip_id} size={}", table.size));
        if table.size == 0 {
            self.prev.remove(&vip_id);
        } else {
            self.prev.insert(vip_id, table);
        }
        Ok(())
    }
    fn set_quic_server(&mut self, key: QuicServerKey, id: u32) -> Result<()> {
        let b = self
            .backends
            .get(&id)
            .expect("server id names a written backend");
        assert_eq!(
            b.vip_id, key.vip_id,
            "server id names another VIP's backend"
        );
        self.quic.insert(key, id);
        Ok(())
    }
    fn remove_quic_server(&mut self, key: &QuicServerKey) -> Result<()> {
        self.quic.remove(key);
        Ok(())
    }
}

fn key(port: u16) -> VipKey {
    VipKey::new("10.0.0.10".parse().unwrap(), port, PROTO_TCP)
}

fn vip(port: u16, backends: &[(&str, u32, bool)]) -> DesiredVip {
    DesiredVip {
        key: key(port),
        name: format!("vip:{port}"),
        table_size: 251,
        flags: 0,
        backends: backends
            .iter()
            .map(|&(a, w, h)| DesiredBackend {
                addr: a.parse().unwrap(),
                weight: w,
                healthy: h,
                state: BackendState::Active,
                server_id: None,
            })
            .collect(),
    }
}

fn table_ids(maps: &FakeMaps, key: &VipKey) -> BTreeSet<u32> {
    let meta = maps.vips[key];
    (meta.table_offset..meta.table_offset + meta.table_size)
        .map(|s| maps.slots[&s])
        .collect()
}

/// VIP `key`'s table as the kernel holds it, slot by slot.
fn slots_of(maps: &FakeMaps, key: &VipKey) -> Vec<u32> {
    let meta = maps.vips[key];
    (meta.table_offset..meta.table_offset + meta.table_size)
        .map(|s| maps.slots[&s])
        .collect()
}

#[test]
fn first_apply_writes_backends_then_table_then_vip() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    let report = r
        .apply(
            &[vip(80, &[("10.1.0.1", 1, true), ("10.1.0.2", 1, true)])],
            &mut maps,
        )
        .unwrap();
    assert_eq!(report.vips_added, ["vip:80"]);
    assert_eq!(
        maps.ops,
        [
            "backend 1 flags=1",
            "backend 2 flags=1",
            "slots @0 len 251",
            "vip kind=0 size=251",
            // The address key (echo requests), then the fragment key.
            "vip kind=2 size=251",
            "vip kind=1 size=251"
        ]
    );
}

#[test]
fn unchanged_config_writes_nothing() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    let d = [vip(80, &[("10.1.0.1", 1, true), ("10.1.0.2", 1, true)])];
    r.apply(&d, &mut maps).unwrap();
    maps.ops.clear();
    let report = r.apply(&d, &mut maps).unwrap();
    assert!(maps.ops.is_empty(), "{:?}", maps.ops);
    assert!(report.tables_switched.is_empty());
}

#[test]
fn failed_backend_leaves_the_table_and_is_invalidated_others_stay() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    let healthy = [vip(
        80,
        &[
            ("10.1.0.1", 1, true),
            ("10.1.0.2", 1, true),
            ("10.1.0.3", 1, true),
        ],
    )];
    r.apply(&healthy, &mut maps).unwrap();
    let before: Vec<u32> = r.vips[&key(80)].table.to_vec();
    let healthy_table = r.vips[&key(80)].table.clone();
    let failed = [vip(
        80,
        &[
            ("10.1.0.1", 1, true),
            ("10.1.0.2", 1, false),
            ("10.1.0.3", 1, true),
        ],
    )];
    maps.ops.clear();
    r.apply(&failed, &mut maps).unwrap();
    // New table first, then invalidated (so its tracked flows re-hash).
    assert_eq!(
        maps.ops.last().unwrap(),
        "backend 2 flags=0",
        "{:?}",
        maps.ops
    );
    assert_eq!(table_ids(&maps, &key(80)), BTreeSet::from([1, 3]));
    // Slots of the healthy backends did not move.
    let after = &r.vips[&key(80)].table;
    for (b, a) in before.iter().zip(after.iter()) {
        if *b != 2 {
            assert_eq!(a, *b, "a slot of a healthy backend moved");
        }
    }
    // Recovery brings it back with the same id and the original table,
    // kept from before the failure (not built again).
    r.apply(&healthy, &mut maps).unwrap();
    assert_eq!(r.vips[&key(80)].table, before);
    assert!(r.vips[&key(80)].table.shares_positions(&healthy_table));
}

#[test]
fn vips_with_one_pool_share_their_table_and_keep_their_own_ids() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    let pool = |up: bool| {
        [80, 81, 82].map(|port| {
            vip(
                port,
                &[
                    ("10.1.0.1", 1, true),
                    ("10.1.0.2", 1, up),
                    ("10.1.0.3", 1, true),
                ],
            )
        })
    };
    for up in [true, false, true] {
        r.apply(&pool(up), &mut maps).unwrap();
        let tables: Vec<&SlotTable> = [80, 81, 82].map(|p| &r.vips[&key(p)].table).to_vec();
        assert!(tables[1].shares_positions(tables[0]) && tables[2].shares_positions(tables[0]));
        for port in [80, 81, 82] {
            let v = &r.vips[&key(port)];
            let ids: BTreeSet<u32> = v.backends.values().map(|b| b.id).collect();
            // What the kernel holds: this VIP's own ids, the same owners.
            assert_eq!(v.table, slots_of(&maps, &key(port)));
            assert!(v.table.iter().all(|id| ids.contains(&id)));
            assert_eq!(v.digest, r.vips[&key(80)].digest);
            assert_eq!(table_ids(&maps, &key(port)).len(), if up { 3 } else { 2 });
        }
    }
}

#[test]
fn draining_keeps_the_backend_valid_but_out_of_the_table() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    r.apply(
        &[vip(80, &[("10.1.0.1", 1, true), ("10.1.0.2", 1, true)])],
        &mut maps,
    )
    .unwrap();
    r.apply(
        &[vip(80, &[("10.1.0.1", 1, true), ("10.1.0.2", 0, true)])],
        &mut maps,
    )
    .unwrap();
    assert_eq!(table_ids(&maps, &key(80)), BTreeSet::from([1]));
    assert_eq!(
        maps.backends[&2].flags, BACKEND_F_VALID,
        "tracked flows keep going"
    );
}

#[test]
fn removed_backend_is_invalidated_after_the_switch_and_its_id_not_reused() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(3600));
    let mut maps = FakeMaps::default();
    r.apply(
        &[vip(80, &[("10.1.0.1", 1, true), ("10.1.0.2", 1, true)])],
        &mut maps,
    )
    .unwrap();
    maps.ops.clear();
    r.apply(
        &[vip(80, &[("10.1.0.1", 1, true), ("10.1.0.3", 1, true)])],
        &mut maps,
    )
    .unwrap();
    let switch = maps
        .ops
        .iter()
        .position(|o| o == "vip kind=0 size=251")
        .unwrap();
    let invalidate = maps
        .ops
        .iter()
        .position(|o| o == "backend 2 flags=0")
        .unwrap();
    assert!(switch < invalidate, "{:?}", maps.ops);
    assert_eq!(
        r.backend_id(&key(80), &"10.1.0.3".parse().unwrap()),
        Some(3),
        "fresh id, 2 is quarantined"
    );
}

#[test]
fn ids_are_reused_only_after_quarantine() {
    let mut ids = IdAllocator::new(1, 3, Duration::from_secs(10));
    let t0 = Instant::now();
    assert_eq!(
        (ids.allocate(t0), ids.allocate(t0), ids.allocate(t0)),
        (Some((1, false)), Some((2, false)), None)
    );
    ids.release(1, t0);
    assert_eq!(ids.allocate(t0 + Duration::from_secs(5)), None);
    assert_eq!(
        ids.allocate(t0 + Duration::from_secs(10)),
        Some((1, true)),
        "reused, flagged"
    );
}

#[test]
fn all_backends_failed_gives_an_empty_table_not_a_stale_one() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    r.apply(&[vip(80, &[("10.1.0.1", 1, true)])], &mut maps)
        .unwrap();
    r.apply(&[vip(80, &[("10.1.0.1", 1, false)])], &mut maps)
        .unwrap();
    assert_eq!(maps.vips[&key(80)].table_size, 0);
    assert_eq!(r.alloc.free_slots(), 10_000, "the old region was freed");
}

#[test]
fn removing_a_vip_unmatches_it_first_and_moves_the_fragment_key() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    let both = [
        vip(80, &[("10.1.0.1", 1, true)]),
        vip(443, &[("10.1.0.2", 1, true)]),
    ];
    r.apply(&both, &mut maps).unwrap();
    let frag = VipKey {
        port: 0,
        kind: VIP_KIND_FRAGMENTS,
        ..key(80)
    };
    assert_eq!(
        maps.vips[&frag].vip_id,
        maps.vips[&key(80)].vip_id,
        "lowest port owns fragments"
    );
    maps.ops.clear();
    let report = r.apply(&both[1..], &mut maps).unwrap();
    assert_eq!(report.vips_removed, ["vip:80"]);
    assert_eq!(maps.ops[0], "remove vip kind=0");
    assert_eq!(
        maps.vips[&frag].vip_id,
        maps.vips[&key(443)].vip_id,
        "fragments follow the remaining VIP"
    );
}

#[test]
fn a_reused_backend_id_has_its_old_flows_forgotten_first() {
    let mut r = Reconciler::new(0, 10_000, Duration::ZERO);
    r.backend_ids = IdAllocator::new(1, 3, Duration::ZERO);
    let mut maps = FakeMaps::default();
    r.apply(
        &[vip(80, &[("10.1.0.1", 1, true), ("10.1.0.2", 1, true)])],
        &mut maps,
    )
    .unwrap();
    r.apply(&[vip(80, &[("10.1.0.1", 1, true)])], &mut maps)
        .unwrap();
    maps.ops.clear();
    r.apply(
        &[vip(80, &[("10.1.0.1", 1, true), ("10.1.0.3", 1, true)])],
        &mut maps,
    )
    .unwrap();
    assert_eq!(maps.ops[0], "forget flows of 2", "{:?}", maps.ops);
    assert_eq!(maps.ops[1], "backend 2 flags=1");
}

#[test]
fn a_full_slot_map_is_a_clear_error_and_changes_nothing() {
    // Room for one 251-slot table and a bit: a second VIP does not fit.
    let mut r = Reconciler::new(0, 300, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    let one = [vip(80, &[("10.1.0.1", 1, true)])];
    r.apply(&one, &mut maps).unwrap();
    let before_vips = maps.vips.clone();
    let before_slots = maps.slots.clone();
    let err = r
        .apply(
            &[one[0].clone(), vip(443, &[("10.1.0.2", 1, true)])],
            &mut maps,
        )
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("MAGLEV_SLOTS is full"),
        "{err:#}"
    );
    assert_eq!(
        maps.vips.get(&key(80)),
        before_vips.get(&key(80)),
        "the running VIP is untouched"
    );
    let live = before_vips[&key(80)];
    for s in live.table_offset..live.table_offset + live.table_size {
        assert_eq!(maps.slots[&s], before_slots[&s], "its table is untouched");
    }
    assert!(
        !maps.vips.contains_key(&key(443)),
        "nothing half-installed is matched"
    );
}

#[test]
fn any_port_flag_is_set_before_a_port_zero_vip_and_cleared_after() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut maps = FakeMaps::default();
    r.apply(&[vip(80, &[("10.1.0.1", 1, true)])], &mut maps)
        .unwrap();
    assert!(!maps.any_port);
    r.apply(
        &[
            vip(80, &[("10.1.0.1", 1, true)]),
            vip(0, &[("10.1.0.2", 1, true)]),
        ],
        &mut maps,
    )
    .unwrap();
    assert!(maps.any_port);
    r.apply(&[vip(80, &[("10.1.0.1", 1, true)])], &mut maps)
        .unwrap();
    assert!(!maps.any_port);
}

fn with_states(mut v: DesiredVip, states: &[BackendState]) -> DesiredVip {
    for (b, s) in v.backends.iter_mut().zip(states) {
        b.state = *s;
    }
    v
}

fn prev_ids(maps: &FakeMaps, vip_id: u32) -> Vec<u32> {
    let p = maps.prev[&vip_id];
    (p.offset..p.offset + p.size)
        .map(|s| maps.slots[&s])
        .collect()
}

fn second_chance(window_secs: u64) -> Reconciler {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    r.second_chance_window = Duration::from_secs(window_secs);
    r
}

const FOUR: [(&str, u32, bool); 4] = [
    ("10.1.0.1", 1, true),
    ("10.1.0.2", 1, true),
    ("10.1.0.3", 1, true),
    ("10.1.0.4", 1, true),
];

#[test]
fn states_give_every_instance_the_same_pair_of_tables() {
    use BackendState::{Active, Adding, Removing};
    // A fresh instance starting in the middle of an addition...
    let mut fresh = second_chance(600);
    let mut maps = FakeMaps::default();
    let adding = with_states(vip(80, &FOUR), &[Active, Active, Active, Adding]);
    fresh
        .apply(std::slice::from_ref(&adding), &mut maps)
        .unwrap();
    let vip_id = maps.vips[&key(80)].vip_id;
    // ...has the three-backend table as its previous one, written before
    // the VIP was switched on.
    let three = vip(80, &FOUR[..3]);
    let mut plain = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut plain_maps = FakeMaps::default();
    plain.apply(&[three], &mut plain_maps).unwrap();
    let ids = |m: &FakeMaps, t: Vec<u32>| -> Vec<String> {
        t.iter().map(|id| m.backends[id].ip().to_string()).collect()
    };
    let three_table = plain.vips[&key(80)].table.to_vec();
    assert_eq!(
        ids(&maps, prev_ids(&maps, vip_id)),
        ids(&plain_maps, three_table)
    );
    let prev_at = maps
        .ops
        .iter()
        .position(|o| o.starts_with("prev "))
        .unwrap();
    let vip_at = maps
        .ops
        .iter()
        .position(|o| o.starts_with("vip kind=0"))
        .unwrap();
    assert!(
        prev_at < vip_at,
        "previous table before the switch: {:?}",
        maps.ops
    );
    // The current table has the fourth backend.
    assert!(table_ids(&maps, &key(80)).len() == 4);
    // The addition is over: every state active, the same current table,
    // no previous table.
    fresh.apply(&[vip(80, &FOUR)], &mut maps).unwrap();
    assert!(!maps.prev.contains_key(&vip_id), "{:?}", maps.ops);
    // Removing: the backend leaves the current table, stays in the previous
    // one and stays valid for its tracked flows.
    let removing = with_states(vip(80, &FOUR), &[Active, Active, Active, Removing]);
    fresh.apply(&[removing], &mut maps).unwrap();
    let removed_id = fresh
        .backend_id(&key(80), &"10.1.0.4".parse().unwrap())
        .unwrap();
    assert!(!table_ids(&maps, &key(80)).contains(&removed_id));
    assert!(prev_ids(&maps, vip_id).contains(&removed_id));
    assert_eq!(
        maps.backends[&removed_id].flags & BACKEND_F_VALID,
        BACKEND_F_VALID
    );
}

#[test]
fn a_switch_keeps_the_old_table_as_previous_and_a_removed_backend_as_an_address() {
    let mut r = second_chance(600);
    let mut maps = FakeMaps::default();
    r.apply(&[vip(80, &FOUR)], &mut maps).unwrap();
    let vip_id = maps.vips[&key(80)].vip_id;
    let before = r.vips[&key(80)].clone();
    let gone = r
        .backend_id(&key(80), &"10.1.0.4".parse().unwrap())
        .unwrap();
    let writes = maps.ops.iter().filter(|o| o.starts_with("slots")).count();
    r.apply(&[vip(80, &FOUR[..3])], &mut maps).unwrap();
    // The old region became the previous table: one table written, not two.
    assert_eq!(
        maps.ops.iter().filter(|o| o.starts_with("slots")).count(),
        writes + 1
    );
    assert_eq!(maps.prev[&vip_id].offset, before.meta.table_offset);
    assert_eq!(before.table, prev_ids(&maps, vip_id));
    let b = maps.backends[&gone];
    assert_eq!(
        b.flags & (BACKEND_F_VALID | BACKEND_F_RETIRED),
        BACKEND_F_RETIRED
    );
    assert_eq!(b.vip_id, vip_id);
    assert_eq!(b.ip().to_string(), "10.1.0.4");
    // Nothing changes: the previous table stays; the window ends it.
    r.apply(&[vip(80, &FOUR[..3])], &mut maps).unwrap();
    assert!(maps.prev.contains_key(&vip_id));
    let early = r.expire_prev(&mut maps, Instant::now()).unwrap();
    assert!(early.is_empty());
    let ended = r
        .expire_prev(&mut maps, Instant::now() + Duration::from_secs(601))
        .unwrap();
    assert_eq!(ended, ["vip:80"]);
    assert!(!maps.prev.contains_key(&vip_id));
    // Its region is free again, and a later apply does not take it up again.
    r.apply(&[vip(80, &FOUR[..3])], &mut maps).unwrap();
    assert!(!maps.prev.contains_key(&vip_id));
}

#[test]
fn no_window_no_previous_table() {
    use BackendState::{Active, Adding};
    let mut r = second_chance(0);
    let mut maps = FakeMaps::default();
    r.apply(&[vip(80, &FOUR)], &mut maps).unwrap();
    r.apply(&[vip(80, &FOUR[..3])], &mut maps).unwrap();
    let adding = with_states(vip(80, &FOUR), &[Active, Active, Active, Adding]);
    r.apply(&[adding], &mut maps).unwrap();
    assert!(maps.prev.is_empty());
    assert!(!maps.ops.iter().any(|o| o.starts_with("prev ")));
}

/// A QUIC VIP whose backends carry server ids 10, 20, ...
fn quic_vip(port: u16, addrs: &[&str]) -> DesiredVip {
    let mut v = vip(
        port,
        &addrs.iter().map(|a| (*a, 1, true)).collect::<Vec<_>>(),
    );
    v.flags = VIP_F_QUIC;
    for (i, b) in v.backends.iter_mut().enumerate() {
        b.server_id = Some(10 * (i as u32 + 1));
    }
    v
}

#[test]
fn quic_server_ids_follow_backends_and_vips() {
    let mut r = Reconciler::new(0, 10_000, Duration::from_secs(60));
    let mut m = FakeMaps::default();
    let plain = vip(80, &[("10.30.1.2", 1, true)]);
    r.apply(
        &[plain.clone(), quic_vip(443, &["10.30.1.2", "10.30.2.2"])],
        &mut m,
    )
    .unwrap();
    let vip_id = m.vips[&key(443)].vip_id;
    let id_of =
        |r: &Reconciler, addr: &str| r.backend_id(&key(443), &addr.parse().unwrap()).unwrap();
    let want: BTreeMap<QuicServerKey, u32> = [
        (
            QuicServerKey {
                vip_id,
                server_id: 10,
            },
            id_of(&r, "10.30.1.2"),
        ),
        (
            QuicServerKey {
                vip_id,
                server_id: 20,
            },
            id_of(&r, "10.30.2.2"),
        ),
    ]
    .into();
    assert_eq!(m.quic, want, "only the QUIC VIP's backends, by server id");
    assert_eq!(r.quic_servers(), &want);
    // A failed backend keeps its entry (the data path checks validity);
    // a removed one loses it.
    let mut failed = quic_vip(443, &["10.30.1.2", "10.30.2.2"]);
    failed.backends[1].healthy = false;
    r.apply(&[plain.clone(), failed], &mut m).unwrap();
    assert_eq!(m.quic, want);
    r.apply(&[plain.clone(), quic_vip(443, &["10.30.1.2"])], &mut m)
        .unwrap();
    assert_eq!(m.quic.len(), 1);
    // The VIP no longer QUIC, or gone: nothing left.
    r.apply(
        &[plain.clone(), vip(443, &[("10.30.1.2", 1, true)])],
        &mut m,
    )
    .unwrap();
    assert!(m.quic.is_empty());
    r.apply(&[plain.clone(), quic_vip(443, &["10.30.1.2"])], &mut m)
        .unwrap();
    assert_eq!(m.quic.len(), 1);
    r.apply(&[plain], &mut m).unwrap();
    assert!(m.quic.is_empty());
    assert!(r.quic_servers().is_empty());
}

/// A host in the pools of MIN_POOLS VIPs, each pool otherwise its own,
/// fails: with the tables built ahead, every VIP switches to its
/// standby table (no build), and the maps end up slot for slot as a
/// reconciler without them writes; a second failure in one pool, not
/// built ahead, is built; recovery returns to the healthy tables.
#[test]
fn standby_tables_switch_a_shared_host_failure_exactly_as_builds_do() {
    let pools = standby::MIN_POOLS as u16;
    let desired = |shared_up: bool, other_up: bool| -> Vec<DesiredVip> {
        (0..pools)
            .map(|v| {
                let own: Vec<String> = (1..=4)
                    .map(|i| format!("10.{}.{v}.{i}", 1 + v / 256))
                    .collect();
                let mut backends: Vec<(&str, u32, bool)> = own
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (a.as_str(), 1, other_up || v != 0 || i != 0))
                    .collect();
                backends.push(("192.0.2.1", 1, shared_up));
                vip(1000 + v, &backends)
            })
            .collect()
    };
    let mut ahead = Reconciler::new(0, 100_000, Duration::from_secs(60));
    ahead.build_ahead_for_failures();
    let mut plain = Reconciler::new(0, 100_000, Duration::from_secs(60));
    let (mut ahead_maps, mut plain_maps) = (FakeMaps::default(), FakeMaps::default());
    for (up, other) in [(true, true), (false, true), (false, false), (true, true)] {
        assert!(ahead.standby().wait_idle(Duration::from_secs(60)));
        let used = ahead.standby().used();
        if (up, other) == (false, true) {
            assert_eq!(ahead.standby().ready().0, pools as usize);
        }
        let d = desired(up, other);
        ahead.apply(&d, &mut ahead_maps).unwrap();
        plain.apply(&d, &mut plain_maps).unwrap();
        let from_standby = ahead.standby().used() - used;
        // The shared host's failure comes from the standby tables; the
        // second failure (not built ahead) and the recovery do not.
        let want = if (up, other) == (false, true) {
            pools as u64
        } else {
            0
        };
        assert_eq!(from_standby, want, "shared up {up}, other up {other}");
        for v in 0..pools {
            let k = key(1000 + v);
            assert_eq!(slots_of(&ahead_maps, &k), slots_of(&plain_maps, &k));
            assert_eq!(ahead.vips[&k].table, plain.vips[&k].table);
            assert_eq!(ahead.vips[&k].digest, plain.vips[&k].digest);
        }
    }
}
