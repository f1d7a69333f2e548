//! Tables built ahead for a backend host failing under many VIPs.
//!
//! A host in the pools of 4,096 VIPs, each pool its own, fails: every pool
//! needs a Maglev build (~0.6 ms each at M = 65,537), seconds on two cores
//! before the last table is switched. The tables that failure would give
//! are known before it happens, so a background thread at idle priority
//! builds them after each change, for every host found in at least
//! [`MIN_POOLS`] distinct pools, and keeps each as the values of the slots
//! that change (the slots the failed backends hold in the healthy table:
//! ~1% of it). When the failure comes, a pool whose table is ready takes
//! its healthy table with that patch over it instead of building one (no
//! copy either): the same table a build gives, slot for slot (see
//! `positions_with_failures`).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use tracing::warn;

use super::tables::{PoolInputs, TableInputs};
use crate::{
    slot_table::{PoolPositions, SlotPatch, SlotTable},
    vip_table::{NO_BACKEND, positions_with_failures},
};

/// A host in fewer distinct pools fails fast enough by building (63
/// builds: ~20 ms on one core).
pub const MIN_POOLS: usize = 64;

/// The most slot values kept ready (4 bytes each: 128 MiB).
const BUDGET_VALUES: usize = 32 << 20;

/// A pool's table with one more backend failed, over its healthy table.
struct Patch {
    /// The healthy table (positions) it patches: a failure's apply uses
    /// the patch only over this very table.
    base: Arc<Vec<u32>>,
    /// The slots whose owner in `base` is failed, with their new owners.
    patch: Arc<SlotPatch>,
}

#[derive(Default)]
struct Ready {
    /// By the pool as it will be once the host has failed.
    patches: HashMap<PoolInputs, Arc<Patch>>,
    /// Plans received and plans finished (equal: idle).
    planned: u64,
    finished: u64,
}

/// The background builder and what it has ready; off until started.
#[derive(Default)]
pub struct Standby {
    ready: Arc<(Mutex<Ready>, Condvar)>,
    plans: Option<mpsc::Sender<Vec<(TableInputs, SlotTable)>>>,
    /// Tables taken from a patch instead of a build.
    used: Arc<AtomicU64>,
    /// The Maglev seed the tables are built with.
    seed: u32,
}

impl Standby {
    /// Starts the builder thread (`seed`: the tables' Maglev seed).
    pub fn start(seed: u32) -> Self {
        let (tx, rx) = mpsc::channel();
        let ready: Arc<(Mutex<Ready>, Condvar)> = Arc::default();
        let shared = ready.clone();
        let spawned = std::thread::Builder::new()
            .name("lb-standby".into())
            .spawn(move || worker(seed, rx, &shared));
        if let Err(e) = spawned {
            warn!("no standby tables (builds on failure): {e}");
            return Standby::default();
        }
        Standby {
            ready,
            plans: Some(tx),
            used: Arc::default(),
            seed,
        }
    }

    pub fn is_on(&self) -> bool {
        self.plans.is_some()
    }

    /// Hands the builder the VIPs' current inputs, each with its healthy
    /// table; it drops what no longer applies and builds what is missing.
    pub fn plan(&self, healthy: Vec<(TableInputs, SlotTable)>) {
        let Some(tx) = &self.plans else { return };
        self.ready.0.lock().expect("standby lock").planned += 1;
        if tx.send(healthy).is_err() {
            // The thread is gone (it only ends with the channel): builds.
            self.ready.0.lock().expect("standby lock").finished += 1;
        }
    }

    /// Waits until every plan handed over is built (or `timeout`).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let (lock, idle) = &*self.ready;
        let guard = lock.lock().expect("standby lock");
        let (guard, _) = idle
            .wait_timeout_while(guard, timeout, |r| r.finished < r.planned)
            .expect("standby lock");
        guard.finished >= guard.planned
    }

    /// Tables ready, and their slot values.
    pub fn ready(&self) -> (usize, usize) {
        let r = self.ready.0.lock().expect("standby lock");
        let values = r.patches.values().map(|p| p.patch.len()).sum();
        (r.patches.len(), values)
    }

    /// Tables taken from a patch so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// `pool`'s table if one is ready over `base` (its healthy table)
    /// with this `seed`.
    pub fn table_for(&self, pool: &PoolInputs, base: &[u32], seed: u32) -> Option<PoolPositions> {
        if !self.is_on() || seed != self.seed {
            return None;
        }
        let patch = self
            .ready
            .0
            .lock()
            .expect("standby lock")
            .patches
            .get(pool)
            .cloned()?;
        if patch.base.as_ptr() != base.as_ptr() || patch.base.len() != base.len() {
            return None;
        }
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(PoolPositions::patched(
            patch.base.clone(),
            patch.patch.clone(),
        ))
    }
}

/// The slots of `base` whose backend has failed, with their owners in
/// `table` (the rest of `table` is `base`).
fn patch_of(base: &[u32], failed: &[bool], table: &[u32]) -> SlotPatch {
    let (slots, values) = base
        .iter()
        .zip(table)
        .enumerate()
        .filter(|(_, (b, _))| **b != NO_BACKEND && failed[**b as usize])
        .map(|(slot, (_, t))| (slot as u32, *t))
        .unzip();
    SlotPatch::new(slots, values)
}

/// What to build: for every host healthy in at least `MIN_POOLS` distinct
/// pools, each of those pools with the host failed, over the pool's
/// healthy table; hosts in the most pools first, within the budget.
fn plan_jobs(healthy: &[(TableInputs, SlotTable)]) -> Vec<(PoolInputs, Arc<Vec<u32>>)> {
    let mut pools: HashMap<PoolInputs, Arc<Vec<u32>>> = HashMap::new();
    for (inputs, table) in healthy {
        if inputs.prev_specs.is_some() {
            continue;
        }
        let (pool, ids) = inputs.pool();
        let Some(base) = table.pool_positions().as_whole() else {
            continue;
        };
        if table.ids() == ids.as_slice() && base.len() == pool.size as usize {
            pools.entry(pool).or_insert_with(|| base.clone());
        }
    }
    let mut hosts: HashMap<IpAddr, usize> = HashMap::new();
    for pool in pools.keys() {
        for i in can_fail(pool) {
            *hosts.entry(pool.backends[i].0).or_default() += 1;
        }
    }
    // (pools of the host, host, pool, its healthy table, the host's
    // position), hosts in the most pools first.
    let mut candidates: Vec<_> = pools
        .iter()
        .flat_map(|(pool, base)| can_fail(pool).map(move |i| (pool.backends[i].0, pool, base, i)))
        .map(|(host, pool, base, i)| (hosts[&host], host, pool, base, i))
        .filter(|&(n, ..)| n >= MIN_POOLS)
        .collect();
    candidates.sort_unstable_by_key(|&(n, host, ..)| std::cmp::Reverse((n, host)));
    let mut jobs = Vec::new();
    let mut values = 0usize;
    for (_, _, pool, base, i) in candidates {
        let mut after = pool.clone();
        after.failed[i] = true;
        // The failed backends' share of the slots, by weight.
        let total: u64 = pool.backends.iter().map(|&(_, w)| w as u64).sum();
        let down: u64 = pool
            .backends
            .iter()
            .zip(&after.failed)
            .filter(|(_, f)| **f)
            .map(|(&(_, w), _)| w as u64)
            .sum();
        values += (pool.size as u64 * down / total.max(1)) as usize + 1;
        if values > BUDGET_VALUES {
            break;
        }
        jobs.push((after, base.clone()));
    }
    jobs
}

/// Positions of `pool`'s backends that can fail: healthy, with a share
/// of the slots.
fn can_fail(pool: &PoolInputs) -> impl Iterator<Item = usize> + '_ {
    (0..pool.backends.len()).filter(|&i| pool.backends[i].1 > 0 && !pool.failed[i])
}

fn worker(
    seed: u32,
    plans: mpsc::Receiver<Vec<(TableInputs, SlotTable)>>,
    ready: &(Mutex<Ready>, Condvar),
) {
    // Idle priority: these builds must never delay a switch or a probe.
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes this thread's scheduling policy only.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    let (lock, idle) = ready;
    let mut next = plans.recv().ok();
    while let Some(mut healthy) = next.take() {
        let mut taken = 1;
        // Only the latest plan matters.
        while let Ok(newer) = plans.try_recv() {
            healthy = newer;
            taken += 1;
        }
        let jobs = plan_jobs(&healthy);
        drop(healthy);
        {
            let wanted: HashSet<&PoolInputs> = jobs.iter().map(|(p, _)| p).collect();
            lock.lock()
                .expect("standby lock")
                .patches
                .retain(|pool, _| wanted.contains(pool));
        }
        for (pool, base) in jobs {
            let have = lock
                .lock()
                .expect("standby lock")
                .patches
                .get(&pool)
                .cloned();
            if have.is_some_and(|p| Arc::ptr_eq(&p.base, &base)) {
                continue;
            }
            // A newer plan replaces this one before its builds.
            if let Ok(newer) = plans.try_recv() {
                next = Some(newer);
                break;
            }
            let Ok(table) =
                positions_with_failures(&pool.backends, &pool.failed, pool.size, seed, Some(&base))
            else {
                continue;
            };
            let patch = Arc::new(patch_of(&base, &pool.failed, &table));
            lock.lock()
                .expect("standby lock")
                .patches
                .insert(pool, Arc::new(Patch { base, patch }));
        }
        let mut r = lock.lock().expect("standby lock");
        r.finished += taken;
        idle.notify_all();
        drop(r);
        if next.is_none() {
            next = plans.recv().ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vip_table::BackendSpec;

    fn inputs(first: u8, n: u8, shared: IpAddr, failed: Vec<u32>) -> TableInputs {
        let mut specs: Vec<BackendSpec> = (0..n - 1)
            .map(|i| BackendSpec {
                id: i as u32 + 2,
                addr: IpAddr::from([10, first, 0, i]),
                weight: 1,
            })
            .collect();
        specs.push(BackendSpec {
            id: 1,
            addr: shared,
            weight: 1,
        });
        TableInputs {
            specs,
            failed,
            size: 251,
            prev_specs: None,
        }
    }

    #[test]
    fn patch_round_trips() {
        let base = Arc::new(vec![0, 1, 2, 1, NO_BACKEND, 0]);
        let failed = [false, true, false];
        let table = [0, 2, 2, 0, NO_BACKEND, 0];
        let patch = patch_of(&base, &failed, &table);
        assert_eq!(patch, SlotPatch::new(vec![1, 3], vec![2, 0]));
        let patched = PoolPositions::patched(base, Arc::new(patch));
        assert_eq!(patched.to_vec(), table);
        assert_eq!((0..6).map(|s| patched.get(s)).collect::<Vec<_>>(), table);
        assert_eq!(patched.iter_from(2).collect::<Vec<_>>(), table[2..]);
        assert!(patched.as_whole().is_none());
    }

    /// A host shared by MIN_POOLS distinct pools gets a table ready for
    /// each, equal to the build a failure would run; a host in fewer
    /// pools gets none.
    #[test]
    fn ready_tables_equal_builds() {
        let shared = IpAddr::from([192, 0, 2, 1]);
        let seed = 7;
        let healthy: Vec<(TableInputs, SlotTable)> = (0..MIN_POOLS as u8)
            .map(|v| {
                let inputs = inputs(v, 5, shared, vec![]);
                let table = inputs.build(seed, None).unwrap().table;
                (inputs, table)
            })
            .collect();
        let standby = Standby::start(seed);
        standby.plan(healthy.clone());
        assert!(standby.wait_idle(Duration::from_secs(30)));
        assert_eq!(standby.ready().0, MIN_POOLS);
        for (inputs, table) in &healthy {
            let failed = TableInputs {
                failed: vec![1],
                ..inputs.clone()
            };
            let (pool, ids) = failed.pool();
            let base = table.positions_in(&ids).unwrap();
            let got = standby.table_for(&pool, &base, seed).expect("ready");
            assert!(standby.table_for(&pool, &base, seed + 1).is_none());
            let want = failed.build(seed, None).unwrap().table;
            assert_eq!(SlotTable::of_pool(got, ids), want);
            // Another failure in the pool: not ready, built.
            let other = TableInputs {
                failed: vec![2],
                ..inputs.clone()
            };
            assert!(standby.table_for(&other.pool().0, &base, seed).is_none());
        }
        assert_eq!(standby.used(), MIN_POOLS as u64);
        // One pool fewer: the host is under the threshold, nothing kept.
        standby.plan(healthy[1..].to_vec());
        assert!(standby.wait_idle(Duration::from_secs(30)));
        assert_eq!(standby.ready(), (0, 0));
    }
}
