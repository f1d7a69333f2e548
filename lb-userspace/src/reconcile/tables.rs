//! What a VIP's tables are built from, and building them only when that
//! changed, on every core: a health change of one backend host under 4,096
//! VIPs rebuilds 4,096 tables at once, and an apply in which nothing
//! changed for a VIP must not rebuild it at all.

use std::collections::BTreeMap;

use anyhow::Result;
use lb_common::maps::VipKey;

use crate::vip_table::{BackendSpec, table_with_failures};

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
    pub fn build(&self, seed: u32) -> Result<Built> {
        let table = table_with_failures(&self.specs, &self.failed, self.size, seed)?;
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
    jobs: Vec<(VipKey, TableInputs)>,
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
                        .filter_map(|(key, inputs)| {
                            let built = inputs.build(seed).ok()?;
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
        let built = build_all(jobs.clone(), 7, 4);
        assert_eq!(built.len(), 9);
        for (key, job) in jobs {
            assert_eq!(built[&key].1, job.build(7).unwrap(), "{key:?}");
        }
    }
}
