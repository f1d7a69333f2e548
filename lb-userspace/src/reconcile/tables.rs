//! What a VIP's tables are built from, and building them only when that
//! changed, once per pool and on every core: a health change of one
//! backend host under 4,096 VIPs changes 4,096 tables at once, VIPs with
//! the same backends share one Maglev build, and an apply in which nothing
//! changed for a VIP must not rebuild it at all.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use anyhow::Result;
use lb_common::maps::VipKey;
use rayon::prelude::*;

use super::standby::Standby;
use crate::{
    slot_table::{PoolPositions, SlotTable},
    vip_table::{BackendSpec, TableDigest, positions_with_failures},
};

/// The inputs of a VIP's current table and of the previous table its
/// backends' states give (second chance), ids included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInputs {
    pub specs: Vec<BackendSpec>,
    pub failed: Vec<u32>,
    pub size: u32,
    /// Backends of the states' previous table, when there is one (the
    /// same backends in the same order as `specs`, other weights).
    pub prev_specs: Option<Vec<BackendSpec>>,
}

/// A VIP's tables as backend ids, and the current one's digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    pub table: SlotTable,
    pub prev: Option<SlotTable>,
    pub digest: TableDigest,
}

/// What VIPs with the same pool share: backends sorted by address with
/// their weights, which have failed, the size, and the weights of the
/// states' previous table. Ids are left out (each VIP has its own).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolInputs {
    pub backends: Vec<(IpAddr, u32)>,
    pub failed: Vec<bool>,
    pub size: u32,
    pub prev_weights: Option<Vec<u32>>,
}

/// A pool's tables as positions in `PoolInputs::backends`.
#[derive(Debug)]
pub struct PoolTables {
    table: PoolPositions,
    prev: Option<Arc<Vec<u32>>>,
    digest: TableDigest,
}

impl TableInputs {
    /// The pool these inputs describe, and each position's backend id.
    pub fn pool(&self) -> (PoolInputs, Vec<u32>) {
        let mut order: Vec<usize> = (0..self.specs.len()).collect();
        order.sort_unstable_by_key(|&i| self.specs[i].addr);
        let failed: HashSet<u32> = self.failed.iter().copied().collect();
        let pool = PoolInputs {
            backends: order
                .iter()
                .map(|&i| (self.specs[i].addr, self.specs[i].weight))
                .collect(),
            failed: order
                .iter()
                .map(|&i| failed.contains(&self.specs[i].id))
                .collect(),
            size: self.size,
            prev_weights: self
                .prev_specs
                .as_ref()
                .map(|p| order.iter().map(|&i| p[i].weight).collect()),
        };
        (pool, order.iter().map(|&i| self.specs[i].id).collect())
    }

    /// Builds the tables; `base` is this VIP's table with no backend
    /// failed, when known (one Maglev build fewer).
    pub fn build(&self, seed: u32, base: Option<&SlotTable>) -> Result<Built> {
        self.build_or_patch(seed, base, &Standby::default())
    }

    /// [`TableInputs::build`], or its patch from `standby` if ready.
    pub fn build_or_patch(
        &self,
        seed: u32,
        base: Option<&SlotTable>,
        standby: &Standby,
    ) -> Result<Built> {
        let (pool, ids) = self.pool();
        let base = base.and_then(|b| b.positions_in(&ids));
        Ok(pool.build(seed, base.as_deref(), standby)?.for_ids(&ids))
    }
}

impl PoolInputs {
    /// Builds the pool's tables; `base`: its table with none failed, over
    /// which `standby` may have the table ready.
    pub fn build(&self, seed: u32, base: Option<&[u32]>, standby: &Standby) -> Result<PoolTables> {
        let ready = match base {
            Some(base) if self.prev_weights.is_none() => standby.table_for(self, base, seed),
            _ => None,
        };
        let table = match ready {
            Some(table) => table,
            None => PoolPositions::whole(Arc::new(positions_with_failures(
                &self.backends,
                &self.failed,
                self.size,
                seed,
                base,
            )?)),
        };
        let prev = self
            .prev_weights
            .as_ref()
            .map(|weights| {
                let backends: Vec<(IpAddr, u32)> = self
                    .backends
                    .iter()
                    .zip(weights)
                    .map(|(&(addr, _), &w)| (addr, w))
                    .collect();
                positions_with_failures(&backends, &self.failed, self.size, seed, None)
            })
            .transpose()?;
        let addrs: Vec<IpAddr> = self.backends.iter().map(|(a, _)| *a).collect();
        Ok(PoolTables {
            digest: TableDigest::of_positions(addrs, table.clone()),
            table,
            prev: prev.map(Arc::new),
        })
    }
}

impl PoolTables {
    /// The tables of a VIP of this pool whose backends have `ids`.
    pub fn for_ids(&self, ids: &[u32]) -> Built {
        Built {
            table: SlotTable::of_pool(self.table.clone(), ids.to_vec()),
            prev: self
                .prev
                .as_ref()
                .map(|p| SlotTable::new(p.clone(), ids.to_vec())),
            digest: self.digest.clone(),
        }
    }
}

/// A VIP's tables built ahead of its apply: as ids when its backends all
/// had ids, else as its pool's (ids are handed out in the apply).
#[derive(Debug)]
pub enum Prebuilt {
    Ready(TableInputs, Built),
    Pool(PoolInputs, Arc<PoolTables>),
}

impl Prebuilt {
    /// The tables, if built from `inputs`.
    pub fn take(self, inputs: &TableInputs) -> Option<Built> {
        match self {
            Prebuilt::Ready(ahead, built) => (ahead == *inputs).then_some(built),
            Prebuilt::Pool(pool, tables) => {
                let (now, ids) = inputs.pool();
                (now == pool).then(|| tables.for_ids(&ids))
            }
        }
    }
}

/// One VIP to build ahead: its inputs, whether their ids are real, and
/// its applied table when that is the table with none failed.
pub struct Job<'a> {
    pub key: VipKey,
    pub inputs: TableInputs,
    pub ids_known: bool,
    pub base: Option<&'a SlotTable>,
}

/// Builds every job's tables on every core, once per distinct pool; a
/// job whose build fails is left out (its VIP builds it again, and reports
/// the error).
pub fn build_all(jobs: Vec<Job>, seed: u32, standby: &Standby) -> BTreeMap<VipKey, Prebuilt> {
    let pools: Vec<(PoolInputs, Vec<u32>)> = jobs.par_iter().map(|j| j.inputs.pool()).collect();
    let mut groups: HashMap<&PoolInputs, Vec<usize>> = HashMap::new();
    for (i, (pool, _)) in pools.iter().enumerate() {
        groups.entry(pool).or_default().push(i);
    }
    let groups: Vec<(&PoolInputs, Vec<usize>)> = groups.into_iter().collect();
    let tables: Vec<Option<Arc<PoolTables>>> = groups
        .par_iter()
        .map(|(pool, members)| {
            // Any member's applied table serves as the pool's base.
            let base = members
                .iter()
                .find_map(|&m| jobs[m].base?.positions_in(&pools[m].1));
            pool.build(seed, base.as_deref(), standby)
                .ok()
                .map(Arc::new)
        })
        .collect();
    let mut of_job: Vec<Option<Arc<PoolTables>>> = vec![None; jobs.len()];
    for ((_, members), built) in groups.iter().zip(&tables) {
        for &m in members {
            of_job[m].clone_from(built);
        }
    }
    jobs.into_par_iter()
        .zip(pools)
        .zip(of_job)
        .filter_map(|((job, (pool, ids)), tables)| {
            let tables = tables?;
            let built = if job.ids_known {
                Prebuilt::Ready(job.inputs, tables.for_ids(&ids))
            } else {
                Prebuilt::Pool(pool, tables)
            };
            Some((job.key, built))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// A VIP's table with none of its backends failed, and what it was
/// built from.
#[derive(Debug)]
pub struct Healthy {
    pub specs: Vec<BackendSpec>,
    pub size: u32,
    pub table: SlotTable,
    pub digest: TableDigest,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vip_table::table_with_failures;

    fn inputs(n: u32, failed: Vec<u32>) -> TableInputs {
        TableInputs {
            specs: (1..=n)
                .map(|i| BackendSpec {
                    id: i,
                    addr: std::net::IpAddr::from([10, 0, 0, i as u8]),
                    weight: 1,
                })
                .collect(),
            failed,
            size: 251,
            prev_specs: None,
        }
    }

    fn job(key: VipKey, inputs: &TableInputs, ids_known: bool) -> Job<'static> {
        Job {
            key,
            inputs: inputs.clone(),
            ids_known,
            base: None,
        }
    }

    #[test]
    fn parallel_builds_equal_one_at_a_time() {
        let jobs: Vec<(VipKey, TableInputs)> = (0..9u8)
            .map(|i| {
                let key = VipKey::new(std::net::IpAddr::from([10, 9, 0, i]), 80, 6);
                (
                    key,
                    inputs(3 + i as u32, if i % 2 == 0 { vec![1] } else { vec![] }),
                )
            })
            .collect();
        let built = build_all(
            jobs.iter().map(|(k, i)| job(*k, i, true)).collect(),
            7,
            &Standby::default(),
        );
        assert_eq!(built.len(), 9);
        for (key, inputs) in &jobs {
            let ahead = built.get(key).unwrap();
            assert!(matches!(ahead, Prebuilt::Ready(..)));
            let want = inputs.build(7, None).unwrap();
            let Prebuilt::Ready(_, got) = ahead else {
                unreachable!()
            };
            assert_eq!(*got, want, "{key:?}");
            assert_eq!(
                got.table,
                table_with_failures(&inputs.specs, &inputs.failed, 251, 7).unwrap()
            );
        }
        // Over the healthy table as base: the same result.
        for (_, job) in &jobs {
            let healthy = TableInputs {
                failed: vec![],
                ..job.clone()
            };
            let base = healthy.build(7, None).unwrap().table;
            assert_eq!(
                job.build(7, Some(&base)).unwrap(),
                job.build(7, None).unwrap()
            );
        }
    }

    /// VIPs with the same backend addresses, weights and failures share
    /// one build, each with its own ids; the digest follows addresses.
    #[test]
    fn vips_of_one_pool_share_a_build_with_their_own_ids() {
        let a = inputs(20, vec![3]);
        // The same pool listed in another order, with other ids.
        let mut b = a.clone();
        b.specs.reverse();
        for s in &mut b.specs {
            s.id += 100;
        }
        b.failed = vec![103];
        let key = |i: u8| VipKey::new(std::net::IpAddr::from([10, 9, 1, i]), 80, 6);
        let built = build_all(
            vec![job(key(1), &a, true), job(key(2), &b, false)],
            7,
            &Standby::default(),
        );
        let Some(Prebuilt::Ready(_, got_a)) = built.get(&key(1)) else {
            panic!("ready")
        };
        assert_eq!(*got_a, a.build(7, None).unwrap());
        let Some(Prebuilt::Pool(_, tables)) = built.get(&key(2)) else {
            panic!("pool")
        };
        let got_b = Prebuilt::Pool(b.pool().0, tables.clone()).take(&b).unwrap();
        assert_eq!(got_b, b.build(7, None).unwrap());
        assert_eq!(
            got_b.table,
            got_a.table.iter().map(|id| id + 100).collect::<Vec<_>>()
        );
        assert_eq!(got_b.digest, got_a.digest);
        assert!(got_a.table.iter().all(|id| id != 3));
        // The same pool's tables serve any VIP of it, and no other pool.
        assert!(
            Prebuilt::Pool(b.pool().0, tables.clone())
                .take(&a)
                .is_some()
        );
        assert!(
            Prebuilt::Pool(b.pool().0, tables.clone())
                .take(&inputs(20, vec![]))
                .is_none()
        );
    }

    #[test]
    fn digests_of_pools_equal_digests_of_id_tables() {
        let a = inputs(12, vec![2, 5]);
        let built = a.build(7, None).unwrap();
        let by_addr = a.specs.iter().map(|s| (s.addr, s.id));
        assert_eq!(
            built.digest.as_str(),
            crate::vip_table::table_digest(&built.table.to_vec(), by_addr)
        );
    }
}
