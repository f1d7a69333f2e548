//! The reconciler: the one owner of map writes. It turns the desired state
//! (config + runtime changes + health) into map operations, in an order
//! that keeps every packet on a valid path:
//!
//! 1. backend entries are written before any slot can point at them;
//! 2. a changed table goes into a fresh region and the VIP switches to it in
//!    one `VIPS` update (atomic per VIP); the old region is freed after;
//! 3. removed backends are invalidated only after no table points at them,
//!    and their ids are quarantined, not reused while tracked flows may
//!    still name them;
//! 4. second chance: a VIP's previous table (the states' one, else the
//!    table before its last switch) is written to `PREV_TABLES` before the
//!    switch and kept for the window; removed backends keep their address
//!    (flagged retired, never valid) for second hops.
//!
//! Writes go through `MapWriter`, so the ordering is tested against a fake.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_common::maps::{
    BACKEND_F_RETIRED, BACKEND_F_VALID, Backend, MAX_BACKENDS, MAX_VIPS, PrevTable, QuicServerKey,
    VIP_F_QUIC, VipKey, VipMeta,
};
use tracing::warn;

use crate::{
    slot_table::SlotTable,
    slots::SlotAllocator,
    vip_table::{BackendSpec, TableDigest, derived_keys},
};
use standby::Standby;
use tables::{Built, Healthy, Job, Prebuilt, TableInputs, build_all};

/// The map operations the reconciler needs.
pub trait MapWriter {
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()>;
    fn write_table(&mut self, offset: u32, table: &SlotTable) -> Result<()>;
    fn set_vip(&mut self, key: VipKey, meta: VipMeta) -> Result<()>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<()>;
    /// Deletes connection-table entries that still name backend `id`, before
    /// the id is given to another backend.
    fn forget_flows_of(&mut self, id: u32) -> Result<u64>;
    /// Tells the data path whether any VIP has port 0.
    fn set_any_port_vips(&mut self, on: bool) -> Result<()>;
    /// Points VIP `vip_id`'s second-chance lookups at a previous table
    /// (size 0: none).
    fn set_prev_table(&mut self, vip_id: u32, table: PrevTable) -> Result<()>;
    /// Routes a QUIC VIP's server id to a backend id.
    fn set_quic_server(&mut self, key: QuicServerKey, id: u32) -> Result<()>;
    /// Forgets a server id (absent: nothing to do).
    fn remove_quic_server(&mut self, key: &QuicServerKey) -> Result<()>;
}

impl MapWriter for crate::dataplane::Dataplane {
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        crate::dataplane::Dataplane::set_backend(self, id, backend)
    }
    fn write_table(&mut self, offset: u32, table: &SlotTable) -> Result<()> {
        crate::dataplane::Dataplane::write_table(self, offset, table)
    }
    fn set_vip(&mut self, key: VipKey, meta: VipMeta) -> Result<()> {
        crate::dataplane::Dataplane::set_vip(self, key, meta)
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        crate::dataplane::Dataplane::remove_vip(self, key)
    }
    fn forget_flows_of(&mut self, id: u32) -> Result<u64> {
        crate::dataplane::Dataplane::forget_flows_of(self, id)
    }
    fn set_any_port_vips(&mut self, on: bool) -> Result<()> {
        crate::dataplane::Dataplane::set_any_port_vips(self, on)
    }
    fn set_prev_table(&mut self, vip_id: u32, table: PrevTable) -> Result<()> {
        crate::dataplane::Dataplane::set_prev_table(self, vip_id, table)
    }
    fn set_quic_server(&mut self, key: QuicServerKey, id: u32) -> Result<()> {
        crate::dataplane::Dataplane::set_quic_server(self, key, id)
    }
    fn remove_quic_server(&mut self, key: &QuicServerKey) -> Result<()> {
        crate::dataplane::Dataplane::remove_quic_server(self, key)
    }
}

/// A backend's part in a change (`BackendConfig::state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Active,
    /// In the current table, not in the previous one.
    Adding,
    /// In the previous table, not in the current one (tracked flows go on).
    Removing,
}

impl BackendState {
    pub fn parse(name: &str) -> Option<BackendState> {
        match name {
            "active" => Some(BackendState::Active),
            "adding" => Some(BackendState::Adding),
            "removing" => Some(BackendState::Removing),
            _ => None,
        }
    }
}

/// One backend as wanted: configured weight, health and drain applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: IpAddr,
    /// Share of new flows; 0 = draining (tracked flows continue).
    pub weight: u32,
    /// False = failed: out of the table and invalid, tracked flows re-hash.
    pub healthy: bool,
    pub state: BackendState,
    /// QUIC VIPs: the server id in the backend's connection IDs.
    pub server_id: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub key: VipKey,
    pub name: String,
    pub table_size: u32,
    /// `VIP_F_*` (encapsulation).
    pub flags: u32,
    pub backends: Vec<DesiredBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedBackend {
    pub id: u32,
    pub weight: u32,
    pub healthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedVip {
    pub name: String,
    pub meta: VipMeta,
    pub table_size: u32,
    pub backends: BTreeMap<IpAddr, AppliedBackend>,
    /// Slot contents (backend ids) as written; shared with the previous
    /// table it becomes on the next switch (no copy).
    pub table: SlotTable,
    /// `table_digest` of `table`: equal on every instance with the same table.
    pub digest: TableDigest,
    /// The previous table second-chance forwarding uses.
    pub prev: Option<PrevState>,
}

/// A VIP's previous table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrevState {
    pub table: SlotTable,
    /// Where it is in `MAGLEV_SLOTS`; `None` once its window has passed
    /// (or when there was no room): the contents are kept so that the same
    /// previous table is not taken up again.
    pub region: Option<PrevTable>,
    pub since: Instant,
    /// Derived from the backends' states (the same on every instance),
    /// not from this instance's history.
    pub explicit: bool,
}

/// Ids handed out fresh first; freed ids wait `quarantine` before reuse.
#[derive(Clone, Debug)]
pub struct IdAllocator {
    next: u32,
    limit: u32,
    freed: VecDeque<(u32, Instant)>,
    quarantine: Duration,
}

impl IdAllocator {
    /// Ids `first..limit`.
    pub fn new(first: u32, limit: u32, quarantine: Duration) -> Self {
        IdAllocator {
            next: first,
            limit,
            freed: VecDeque::new(),
            quarantine,
        }
    }

    /// A fresh id, else the oldest freed one past its quarantine; the flag
    /// says the id was used before.
    pub fn allocate(&mut self, now: Instant) -> Option<(u32, bool)> {
        if self.next < self.limit {
            self.next += 1;
            return Some((self.next - 1, false));
        }
        match self.freed.front() {
            Some(&(id, at)) if now.duration_since(at) >= self.quarantine => {
                self.freed.pop_front();
                Some((id, true))
            }
            _ => None,
        }
    }

    pub fn release(&mut self, id: u32, now: Instant) {
        self.freed.push_back((id, now));
    }

    /// Marks `id` as taken (adopting state from pinned maps).
    pub fn reserve(&mut self, id: u32) {
        if id >= self.next {
            self.next = id + 1;
        }
    }
}

/// What an `apply` changed, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub tables_switched: Vec<String>,
    pub vips_added: Vec<String>,
    pub vips_removed: Vec<String>,
}

pub struct Reconciler {
    pub seed: u32,
    pub vips: BTreeMap<VipKey, AppliedVip>,
    pub alloc: SlotAllocator,
    backend_ids: IdAllocator,
    vip_ids: IdAllocator,
    /// Incremented each time any table is switched (exported as a metric).
    pub generation: u64,
    frag_keys: BTreeMap<VipKey, VipMeta>,
    /// What `ANY_PORT_VIPS` says (None: not known yet).
    any_port: Option<bool>,
    /// How long previous tables are kept (zero: second chance off).
    pub second_chance_window: Duration,
    /// The inputs each VIP's applied tables were built from: unchanged
    /// inputs, unchanged tables (no rebuild).
    built_from: BTreeMap<VipKey, TableInputs>,
    /// Tables built ahead, in parallel, for this apply.
    prebuilt: BTreeMap<VipKey, Prebuilt>,
    /// Each VIP's table with none of its backends failed, while its
    /// backends stay as they are: the base of a failure's table and what a
    /// recovery returns to, without a Maglev build either way.
    healthy: BTreeMap<VipKey, Healthy>,
    /// `QUIC_SERVERS` as written.
    quic_servers: BTreeMap<QuicServerKey, u32>,
    /// Tables built ahead for a host failing under many pools.
    standby: Standby,
    /// The generation of the tables the standby builder last got.
    standby_planned: Option<u64>,
}

impl Reconciler {
    pub fn new(seed: u32, slot_capacity: u32, id_quarantine: Duration) -> Self {
        Self::with_capacity(seed, slot_capacity, (MAX_VIPS, MAX_BACKENDS), id_quarantine)
    }

    /// As `new`, for maps sized to `(vips, backend ids)`.
    pub fn with_capacity(
        seed: u32,
        slot_capacity: u32,
        (vips, backends): (u32, u32),
        id_quarantine: Duration,
    ) -> Self {
        Reconciler {
            seed,
            vips: BTreeMap::new(),
            alloc: SlotAllocator::new(slot_capacity),
            backend_ids: IdAllocator::new(1, backends, id_quarantine),
            vip_ids: IdAllocator::new(1, vips, Duration::ZERO),
            generation: 0,
            frag_keys: BTreeMap::new(),
            any_port: None,
            second_chance_window: Duration::ZERO,
            built_from: BTreeMap::new(),
            prebuilt: BTreeMap::new(),
            healthy: BTreeMap::new(),
            quic_servers: BTreeMap::new(),
            standby: Standby::default(),
            standby_planned: None,
        }
    }

    /// Builds, in the background at idle priority, the tables a failure
    /// of a host under many pools would switch to (see `standby`).
    pub fn build_ahead_for_failures(&mut self) {
        if !self.standby.is_on() {
            self.standby = Standby::start(self.seed);
            // Else the first apply plans (after adopting pinned tables too).
            if !self.healthy.is_empty() {
                self.plan_standby();
            }
        }
    }

    /// The tables built ahead for failures.
    pub fn standby(&self) -> &Standby {
        &self.standby
    }

    /// Hands the standby builder every VIP's inputs with its healthy table.
    fn plan_standby(&mut self) {
        if !self.standby.is_on() {
            return;
        }
        self.standby_planned = Some(self.generation);
        // No host can be in MIN_POOLS pools of fewer VIPs: an empty plan
        // (it drops what an earlier one built) and no copy of the inputs.
        if self.healthy.len() < standby::MIN_POOLS {
            self.standby.plan(Vec::new());
            return;
        }
        let healthy = self
            .built_from
            .iter()
            .filter_map(|(key, inputs)| {
                let h = self.healthy_base(key, inputs)?;
                Some((inputs.clone(), h.table.clone()))
            })
            .collect();
        self.standby.plan(healthy);
    }

    /// Takes over `QUIC_SERVERS` entries found pinned (the next `apply`
    /// removes those no QUIC VIP wants).
    pub fn adopt_quic_servers(&mut self, entries: impl IntoIterator<Item = (QuicServerKey, u32)>) {
        self.quic_servers.extend(entries);
    }

    /// The server ids the data path routes, as written.
    pub fn quic_servers(&self) -> &BTreeMap<QuicServerKey, u32> {
        &self.quic_servers
    }

    /// Takes over state found in pinned maps: the VIPs with their regions
    /// and backends, so the next `apply` rewrites only what differs.
    pub fn adopt(&mut self, key: VipKey, vip: AppliedVip) -> Result<()> {
        if vip.meta.table_size > 0
            && !self
                .alloc
                .reserve(vip.meta.table_offset, vip.meta.table_size)
        {
            bail!("pinned table of {} overlaps another", vip.name);
        }
        if let Some(region) = vip.prev.as_ref().and_then(|p| p.region)
            && !self.alloc.reserve(region.offset, region.size)
        {
            bail!("pinned previous table of {} overlaps another", vip.name);
        }
        self.vip_ids.reserve(vip.meta.vip_id);
        for b in vip.backends.values() {
            self.backend_ids.reserve(b.id);
        }
        self.vips.insert(key, vip);
        Ok(())
    }

    /// Marks ids of retired backends (pinned, kept for second hops) taken.
    pub fn reserve_backend_id(&mut self, id: u32) {
        self.backend_ids.reserve(id);
    }

    pub fn adopt_fragment_key(&mut self, key: VipKey, meta: VipMeta) {
        self.frag_keys.insert(key, meta);
    }

    /// Brings the maps to `desired`.
    pub fn apply(
        &mut self,
        desired: &[DesiredVip],
        maps: &mut impl MapWriter,
    ) -> Result<ApplyReport> {
        let now = Instant::now();
        let mut report = ApplyReport::default();
        // Port-0 VIPs: the data path must look for them before one exists...
        let want_any_port = desired.iter().any(|d| d.key.port == 0);
        if want_any_port && self.any_port != Some(true) {
            maps.set_any_port_vips(true)?;
            self.any_port = Some(true);
        }
        // VIPs that are gone: stop matching them first, then clean up.
        let wanted: BTreeMap<VipKey, &DesiredVip> = desired.iter().map(|d| (d.key, d)).collect();
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let vip = self.vips.remove(&key).expect("listed");
            self.built_from.remove(&key);
            self.healthy.remove(&key);
            maps.remove_vip(&key)
                .with_context(|| format!("removing VIP {}", vip.name))?;
            let owned: Vec<VipKey> = self
                .frag_keys
                .iter()
                .filter(|(_, m)| m.vip_id == vip.meta.vip_id)
                .map(|(k, _)| *k)
                .collect();
            for fk in owned {
                maps.remove_vip(&fk)?;
                self.frag_keys.remove(&fk);
            }
            self.retire(&vip, vip.backends.values().map(|b| b.id), maps, now)?;
            self.vip_ids.release(vip.meta.vip_id, now);
            report.vips_removed.push(vip.name);
        }
        self.prebuild(desired);
        for d in desired {
            let applied = self.apply_vip(d, maps, now, &mut report);
            if applied.is_err() {
                // Its tables were not written: built again next time.
                self.built_from.remove(&d.key);
                self.prebuilt.clear();
            }
            let switched = applied.with_context(|| format!("VIP {}", d.name))?;
            if switched {
                report.tables_switched.push(d.name.clone());
            }
        }
        self.apply_fragment_keys(maps)?;
        self.apply_quic_servers(desired, maps)?;
        // ...and may stop only once none is left.
        if !want_any_port && self.any_port != Some(false) {
            maps.set_any_port_vips(false)?;
            self.any_port = Some(false);
        }
        // Plans follow the tables (and the first apply, after adopting).
        if self.standby_planned != Some(self.generation) || !report.vips_removed.is_empty() {
            self.plan_standby();
        }
        Ok(report)
    }

    /// Brings `QUIC_SERVERS` to the QUIC VIPs' server ids: each names its
    /// backend's id (written before, in `redo_vip`); ids of backends and
    /// VIPs that are gone are removed. The data path checks that the id is
    /// a valid backend of the packet's VIP, so order within does not matter.
    fn apply_quic_servers(
        &mut self,
        desired: &[DesiredVip],
        maps: &mut impl MapWriter,
    ) -> Result<()> {
        let mut want = BTreeMap::new();
        for d in desired.iter().filter(|d| d.flags & VIP_F_QUIC != 0) {
            let Some(v) = self.vips.get(&d.key) else {
                continue;
            };
            for b in &d.backends {
                if let (Some(server_id), Some(applied)) = (b.server_id, v.backends.get(&b.addr)) {
                    let key = QuicServerKey {
                        vip_id: v.meta.vip_id,
                        server_id,
                    };
                    want.insert(key, applied.id);
                }
            }
        }
        if want.is_empty() && self.quic_servers.is_empty() {
            return Ok(());
        }
        for (key, id) in &want {
            if self.quic_servers.get(key) != Some(id) {
                maps.set_quic_server(*key, *id)
                    .context("writing a QUIC server id")?;
                self.quic_servers.insert(*key, *id);
            }
        }
        let gone: Vec<QuicServerKey> = self
            .quic_servers
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            maps.remove_quic_server(&key)
                .context("removing a QUIC server id")?;
            self.quic_servers.remove(&key);
        }
        Ok(())
    }

    /// Invalidates backends no table points at any more, frees their ids
    /// and the VIP's table region.
    fn retire(
        &mut self,
        vip: &AppliedVip,
        ids: impl Iterator<Item = u32>,
        maps: &mut impl MapWriter,
        now: Instant,
    ) -> Result<()> {
        for id in ids {
            maps.set_backend(id, Backend::default())?;
            self.backend_ids.release(id, now);
        }
        if let Some(region) = vip.prev.as_ref().and_then(|p| p.region) {
            maps.set_prev_table(vip.meta.vip_id, PrevTable::default())?;
            self.alloc.release(region.offset, region.size);
        }
        self.alloc
            .release(vip.meta.table_offset, vip.meta.table_size);
        Ok(())
    }

    /// What VIP `d`'s tables are built from, with its backends' ids.
    fn table_inputs(&self, d: &DesiredVip, ids: &BTreeMap<IpAddr, u32>) -> TableInputs {
        let specs_without = |left_out: BackendState| -> Vec<BackendSpec> {
            d.backends
                .iter()
                .map(|b| BackendSpec {
                    id: ids[&b.addr],
                    addr: b.addr,
                    weight: if b.state == left_out { 0 } else { b.weight },
                })
                .collect()
        };
        let transitional = d.backends.iter().any(|b| b.state != BackendState::Active);
        TableInputs {
            specs: specs_without(BackendState::Removing),
            failed: d
                .backends
                .iter()
                .filter(|b| !b.healthy)
                .map(|b| ids[&b.addr])
                .collect(),
            size: d.table_size,
            prev_specs: (transitional && !self.second_chance_window.is_zero())
                .then(|| specs_without(BackendState::Adding)),
        }
    }

    /// VIP `key`'s current table and the states' previous table: the
    /// applied ones when their inputs did not change, else the ones built
    /// ahead for this apply, else built now.
    fn tables_for(
        &mut self,
        key: VipKey,
        inputs: TableInputs,
        existing: Option<&AppliedVip>,
    ) -> Result<Built> {
        if let Some(v) = existing
            && self.built_from.get(&key) == Some(&inputs)
        {
            let prev = inputs
                .prev_specs
                .as_ref()
                .and_then(|_| v.prev.as_ref().map(|p| p.table.clone()));
            if inputs.prev_specs.is_none() || prev.is_some() {
                return Ok(Built {
                    table: v.table.clone(),
                    prev,
                    digest: v.digest.clone(),
                });
            }
        }
        let ahead = self.prebuilt.remove(&key).and_then(|p| p.take(&inputs));
        let built = match ahead.or_else(|| self.as_healthy(&key, &inputs)) {
            Some(built) => built,
            None => {
                let base = self.healthy_base(&key, &inputs).map(|h| &h.table);
                inputs.build_or_patch(self.seed, base, &self.standby)?
            }
        };
        if inputs.failed.is_empty() {
            self.healthy.insert(
                key,
                Healthy {
                    specs: inputs.specs.clone(),
                    size: inputs.size,
                    table: built.table.clone(),
                    digest: built.digest.clone(),
                },
            );
        } else if self.healthy_base(&key, &inputs).is_none() {
            self.healthy.remove(&key);
        }
        self.built_from.insert(key, inputs);
        Ok(built)
    }

    /// VIP `key`'s healthy table, if it is the one of `inputs`' backends.
    fn healthy_base(&self, key: &VipKey, inputs: &TableInputs) -> Option<&Healthy> {
        self.healthy
            .get(key)
            .filter(|h| h.size == inputs.size && h.specs == inputs.specs)
    }

    /// The tables of `inputs` when they are the healthy table's: none
    /// failed, no previous table from states.
    fn as_healthy(&self, key: &VipKey, inputs: &TableInputs) -> Option<Built> {
        if !inputs.failed.is_empty() || inputs.prev_specs.is_some() {
            return None;
        }
        self.healthy_base(key, inputs).map(|h| Built {
            table: h.table.clone(),
            prev: None,
            digest: h.digest.clone(),
        })
    }

    /// Builds, on every core and once per pool, the tables of VIPs whose
    /// inputs changed (new VIPs too: their pool's tables, ids follow in
    /// `apply_vip`).
    fn prebuild(&mut self, desired: &[DesiredVip]) {
        let jobs: Vec<Job> = desired
            .iter()
            .filter_map(|d| {
                let Some(applied) = self.vips.get(&d.key) else {
                    // Not applied yet: ids are handed out later.
                    let ids = d.backends.iter().map(|b| (b.addr, 0)).collect();
                    return Some(Job {
                        key: d.key,
                        inputs: self.table_inputs(d, &ids),
                        ids_known: false,
                        base: None,
                    });
                };
                let (ids, ids_known) = match applied_ids(applied, d, |_, _| true) {
                    Some(ids) => (ids, true),
                    None => (d.backends.iter().map(|b| (b.addr, 0)).collect(), false),
                };
                let inputs = self.table_inputs(d, &ids);
                let last = self.built_from.get(&d.key);
                if ids_known
                    && (last == Some(&inputs) || self.as_healthy(&d.key, &inputs).is_some())
                {
                    return None;
                }
                let base = self.healthy_base(&d.key, &inputs).map(|h| &h.table);
                Some(Job {
                    key: d.key,
                    inputs,
                    ids_known,
                    base,
                })
            })
            .collect();
        // One table is not worth the threads.
        self.prebuilt = if jobs.len() > 1 {
            build_all(jobs, self.seed, &self.standby)
        } else {
            BTreeMap::new()
        };
    }

    /// Whether VIP `d` is exactly as applied (same backends, ids, weights,
    /// states, health, size, flags): then nothing is written or rebuilt.
    fn unchanged(&self, d: &DesiredVip) -> bool {
        let Some(v) = self.vips.get(&d.key) else {
            return false;
        };
        if v.meta.flags != d.flags
            || v.table_size != d.table_size
            || v.backends.len() != d.backends.len()
        {
            return false;
        }
        let ids = applied_ids(v, d, |a, b| a.weight == b.weight && a.healthy == b.healthy);
        ids.is_some_and(|ids| self.built_from.get(&d.key) == Some(&self.table_inputs(d, &ids)))
    }

    fn apply_vip(
        &mut self,
        d: &DesiredVip,
        maps: &mut impl MapWriter,
        now: Instant,
        report: &mut ApplyReport,
    ) -> Result<bool> {
        if self.unchanged(d) {
            return Ok(false);
        }
        // Taken out while it is redone (no copy of its tables), put back
        // as it was if that fails.
        let existing = self.vips.remove(&d.key);
        let result = self.redo_vip(d, &existing, maps, now, report);
        if result.is_err()
            && let Some(v) = existing
        {
            self.vips.insert(d.key, v);
        }
        result
    }

    fn redo_vip(
        &mut self,
        d: &DesiredVip,
        existing: &Option<AppliedVip>,
        maps: &mut impl MapWriter,
        now: Instant,
        report: &mut ApplyReport,
    ) -> Result<bool> {
        let vip_id = match &existing {
            Some(v) => v.meta.vip_id,
            None => {
                report.vips_added.push(d.name.clone());
                self.vip_ids.allocate(now).context("too many VIPs")?.0
            }
        };
        let old_backends = existing
            .as_ref()
            .map(|v| v.backends.clone())
            .unwrap_or_default();
        // 1. Entries of new and recovered backends, before any slot names them.
        //    Failed ones are invalidated after the switch (step 3), so no
        //    packet meets a slot naming an invalid backend.
        let mut backends = BTreeMap::new();
        let mut failing = Vec::new();
        for b in &d.backends {
            let old = old_backends.get(&b.addr);
            let id = match old {
                Some(old) => old.id,
                None => {
                    let (id, reused) = self
                        .backend_ids
                        .allocate(now)
                        .context("backend ids exhausted")?;
                    if reused {
                        maps.forget_flows_of(id)?;
                    }
                    id
                }
            };
            let entry = |flags| Backend::new(b.addr, flags, vip_id);
            match (old.map(|o| o.healthy), b.healthy) {
                (None, _) => {
                    maps.set_backend(id, entry(if b.healthy { BACKEND_F_VALID } else { 0 }))?
                }
                (Some(false), true) => maps.set_backend(id, entry(BACKEND_F_VALID))?,
                (Some(true), false) => failing.push((id, entry(0))),
                _ => {}
            }
            backends.insert(
                b.addr,
                AppliedBackend {
                    id,
                    weight: b.weight,
                    healthy: b.healthy,
                },
            );
        }
        // 2. The table, switched atomically when it changed.
        let ids: BTreeMap<IpAddr, u32> = backends.iter().map(|(a, b)| (*a, b.id)).collect();
        let inputs = self.table_inputs(d, &ids);
        let Built {
            table,
            prev: explicit_prev,
            digest,
        } = self.tables_for(d.key, inputs, existing.as_ref())?;
        let unchanged = existing.as_ref().is_some_and(|v| {
            v.table == table && v.table_size == d.table_size && v.meta.flags == d.flags
        });
        let switched = !unchanged || existing.is_none();
        let mut meta = existing.as_ref().map(|v| v.meta).unwrap_or(VipMeta {
            vip_id,
            flags: d.flags,
            table_offset: 0,
            table_size: 0,
        });
        let prev;
        if switched {
            let len = table.len() as u32;
            let offset = if len == 0 {
                0
            } else {
                self.alloc
                    .allocate(len)
                    .context("MAGLEV_SLOTS is full: raise lb.maglev_slots")?
            };
            if len > 0 {
                maps.write_table(offset, &table)?;
            }
            // The previous table is in place before packets see the new one.
            let (p, reused_old_region) = self.settle_prev(
                vip_id,
                explicit_prev,
                existing.as_ref(),
                &table,
                true,
                maps,
                now,
            )?;
            prev = p;
            meta = VipMeta {
                vip_id,
                flags: d.flags,
                table_offset: offset,
                table_size: len,
            };
            maps.set_vip(d.key, meta)?;
            // The fragment and address keys share the VIP's meta: move them
            // along before the old region can be reused.
            for (fk, fmeta) in self.frag_keys.iter_mut() {
                if fmeta.vip_id == vip_id {
                    maps.set_vip(*fk, meta)?;
                    *fmeta = meta;
                }
            }
            if let Some(old) = &existing
                && !reused_old_region
            {
                self.alloc
                    .release(old.meta.table_offset, old.meta.table_size);
            }
            self.generation += 1;
        } else {
            prev = self
                .settle_prev(
                    vip_id,
                    explicit_prev,
                    existing.as_ref(),
                    &table,
                    false,
                    maps,
                    now,
                )?
                .0;
        }
        // 3. Failed backends and backends that left this VIP: no slot points
        //    at them any more; invalid now, so their tracked flows re-hash.
        for (id, entry) in failing {
            maps.set_backend(id, entry)?;
        }
        let removed: Vec<(u32, IpAddr)> = old_backends
            .iter()
            .filter(|(a, _)| !backends.contains_key(*a))
            .map(|(a, b)| (b.id, *a))
            .collect();
        for (id, addr) in removed {
            // Kept as an address only while a previous table may name it.
            let entry = if self.second_chance_window.is_zero() {
                Backend::default()
            } else {
                Backend::new(addr, BACKEND_F_RETIRED, vip_id)
            };
            maps.set_backend(id, entry)?;
            self.backend_ids.release(id, now);
        }
        self.vips.insert(
            d.key,
            AppliedVip {
                name: d.name.clone(),
                meta,
                table_size: d.table_size,
                backends,
                table,
                digest,
                prev,
            },
        );
        Ok(switched)
    }

    /// Decides and writes VIP `vip_id`'s previous table: the one its
    /// backends' states give (`explicit`), else, when the table is being
    /// switched, the table it had until now, else the one it already has
    /// unless that one came from states that are gone. Returns it, and
    /// whether it took over the old current table's region (which the
    /// caller then must not free).
    #[allow(clippy::too_many_arguments)]
    fn settle_prev(
        &mut self,
        vip_id: u32,
        explicit: Option<SlotTable>,
        existing: Option<&AppliedVip>,
        current: &SlotTable,
        switching: bool,
        maps: &mut impl MapWriter,
        now: Instant,
    ) -> Result<(Option<PrevState>, bool)> {
        let old_prev = existing.and_then(|v| v.prev.as_ref());
        let wanted: Option<(SlotTable, bool)> = if self.second_chance_window.is_zero() {
            None
        } else if let Some(t) = explicit {
            Some((t, true))
        } else if switching {
            existing
                .filter(|v| !v.table.is_empty())
                .map(|v| (v.table.clone(), false))
        } else {
            old_prev
                .filter(|p| !p.explicit)
                .map(|p| (p.table.clone(), false))
        };
        // A previous table equal to the current one sends nothing anywhere.
        let wanted = wanted.filter(|(t, _)| !t.is_empty() && t != current);
        let old_region = old_prev.and_then(|p| p.region);
        let Some((table, explicit)) = wanted else {
            if let Some(region) = old_region {
                maps.set_prev_table(vip_id, PrevTable::default())?;
                self.alloc.release(region.offset, region.size);
            }
            return Ok((None, false));
        };
        if let Some(p) = old_prev.filter(|p| p.table == table) {
            return Ok((
                Some(PrevState {
                    explicit,
                    ..p.clone()
                }),
                false,
            ));
        }
        let len = table.len() as u32;
        let mut reused = false;
        let region = match existing {
            Some(v) if switching && v.table == table && v.meta.table_size == len => {
                reused = true;
                Some(PrevTable {
                    offset: v.meta.table_offset,
                    size: len,
                })
            }
            _ => match self.alloc.allocate(len) {
                Some(offset) => {
                    maps.write_table(offset, &table)?;
                    Some(PrevTable { offset, size: len })
                }
                None => {
                    warn!(
                        vip_id,
                        "no room in MAGLEV_SLOTS for a previous table: no second chance for this change (raise lb.maglev_slots)"
                    );
                    None
                }
            },
        };
        maps.set_prev_table(vip_id, region.unwrap_or_default())?;
        if let Some(old) = old_region {
            self.alloc.release(old.offset, old.size);
        }
        Ok((
            Some(PrevState {
                table,
                region,
                since: now,
                explicit,
            }),
            reused,
        ))
    }

    /// Ends the second-chance window of every previous table older than
    /// it; the names of the VIPs concerned.
    pub fn expire_prev(&mut self, maps: &mut impl MapWriter, now: Instant) -> Result<Vec<String>> {
        let window = self.second_chance_window;
        let mut ended = Vec::new();
        for vip in self.vips.values_mut() {
            let Some(p) = vip.prev.as_mut() else { continue };
            let Some(region) = p.region else { continue };
            if now.duration_since(p.since) < window {
                continue;
            }
            maps.set_prev_table(vip.meta.vip_id, PrevTable::default())?;
            self.alloc.release(region.offset, region.size);
            p.region = None;
            ended.push(vip.name.clone());
        }
        Ok(ended)
    }

    /// Points each (address, protocol)'s fragment key and each address's
    /// key (echo requests) at its owner VIP.
    fn apply_fragment_keys(&mut self, maps: &mut impl MapWriter) -> Result<()> {
        let keys: Vec<VipKey> = self.vips.keys().copied().collect();
        let wanted: BTreeMap<VipKey, VipMeta> = derived_keys(&keys)
            .into_iter()
            .map(|(key, owner)| (key, self.vips[&owner].meta))
            .collect();
        for (key, meta) in &wanted {
            if self.frag_keys.get(key) != Some(meta) {
                maps.set_vip(*key, *meta)?;
            }
        }
        for key in self.frag_keys.keys().filter(|k| !wanted.contains_key(k)) {
            maps.remove_vip(key)?;
        }
        self.frag_keys = wanted;
        Ok(())
    }

    /// The backend id serving `addr` in VIP `key`, if any.
    pub fn backend_id(&self, key: &VipKey, addr: &IpAddr) -> Option<u32> {
        self.vips.get(key)?.backends.get(addr).map(|b| b.id)
    }
}

/// The ids `applied` has for each of `d`'s backends, if it has all of
/// them and each passes `same`.
fn applied_ids(
    applied: &AppliedVip,
    d: &DesiredVip,
    same: impl Fn(&AppliedBackend, &DesiredBackend) -> bool,
) -> Option<BTreeMap<IpAddr, u32>> {
    d.backends
        .iter()
        .map(|b| {
            applied
                .backends
                .get(&b.addr)
                .filter(|a| same(a, b))
                .map(|a| (b.addr, a.id))
        })
        .collect()
}

pub mod standby;
mod tables;

#[cfg(test)]
mod tests;
