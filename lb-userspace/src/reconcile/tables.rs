//! What a VIP's tables are built from, and building them only when that
//! changed, on every core: a health change of one backend host under 4,096
//! VIPs rebuilds 4,096 tables at once, and an apply in which nothing
//! changed for a VIP must not rebuild it at all.

use std::collections::BTreeMap;

use anyhow::Result;
use lb_common::maps::VipKey;

use crate::vip_table::{BackendSpec, table_with_failures, with_failures_over};

/// The inputs of a VIP's current table and of the previous table its
/// backends' states give (second chance), ids included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInputs {
    pub specs: Vec<BackendSpec>,
    pub failed: Vec<u32>,
    pub size: u32,
    /// Backends of the states' previous table, when there is one.
    pub prev_specs: Option<Vec<BackendSpec>>,
}

/// The current table and the states' previous table.
pub type Built = (Vec<u32>, Option<Vec<u32>>);

impl TableInputs {
    /// Builds the tables; `base` is this VIP's table with no backend
    /// failed, when known (one Maglev build fewer).
    pub fn build(&self, seed: u32, base: Option<&[u32]>) -> Result<Built> {
        let table = match base {
            Some(base) => with_failures_over(base, &self.specs, &self.failed, self.size, seed)?,
            None => table_with_failures(&self.specs, &self.failed, self.size, seed)?,
        };
        let prev = self
            .prev_specs
            .as_ref()
            .map(|p| table_with_failures(p, &self.failed, self.size, seed))
            .transpose()?;
        Ok((table, prev))
    }
}

/// Builds every job's tables on up to `threads` threads; a job whose build
/// fails is left out (its VIP builds it again, and reports the error).
pub fn build_all(
    jobs: Vec<(VipKey, TableInputs, Option<&[u32]>)>,
    seed: u32,
    threads: usize,
) -> BTreeMap<VipKey, (TableInputs, Built)> {
    if jobs.is_empty() {
        return BTreeMap::new();
    }
    let threads = threads.clamp(1, jobs.len());
    let chunk = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|(key, inputs, base)| {
                            let built = inputs.build(seed, *base).ok()?;
                            Some((*key, (inputs.clone(), built)))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The applied table as the base of `new`'s build: when the last build
/// had the same backends and none failed, it is their table.
pub fn base_of<'a>(
    last: Option<&TableInputs>,
    new: &TableInputs,
    applied: &'a [u32],
) -> Option<&'a [u32]> {
    last.filter(|l| l.specs == new.specs && l.size == new.size && l.failed.is_empty())
        .map(|_| applied)
}

/// Threads for table builds: the cores this process may use.
pub fn build_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            jobs.iter().map(|(k, i)| (*k, i.clone(), None)).collect(),
            7,
            4,
        );
        assert_eq!(built.len(), 9);
        for (key, job) in &jobs {
            assert_eq!(built[key].1, job.build(7, None).unwrap(), "{key:?}");
        }
        // Over the healthy table as base: the same result.
        for (_, job) in &jobs {
            let healthy = TableInputs {
                failed: vec![],
                ..job.clone()
            };
            let base = healthy.build(7, None).unwrap().0;
            let from = base_of(Some(&healthy), job, &base);
            assert!(from.is_some());
            assert_eq!(job.build(7, from).unwrap(), job.build(7, None).unwrap());
        }
    }
}
