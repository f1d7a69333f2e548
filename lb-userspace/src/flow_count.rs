//! Tracked flows per backend, counted off the daemon's loop: walking a
//! connection table of a million entries takes about a second, which must
//! not hold back health events and API requests. A thread walks its own
//! handle of the map every `INTERVAL` and publishes the counts.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use lb_common::maps::{ConnEntry, FlowKey};

/// How often the table is walked.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The latest counts: backend id -> tracked flows, and when they were taken.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub counts: BTreeMap<u32, u64>,
    pub taken: Option<Instant>,
}

/// Counts flows per backend in a table handle.
pub fn count(table: &HashMap<MapData, FlowKey, ConnEntry>) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    for (_, entry) in table.iter().filter_map(|r| r.ok()) {
        *counts.entry(entry.backend_id).or_insert(0) += 1;
    }
    counts
}

/// The counting thread; stopped when dropped.
pub struct FlowCounter {
    latest: Arc<Mutex<Snapshot>>,
    stop: Arc<AtomicBool>,
}

impl FlowCounter {
    /// Starts counting over `table` (a handle of its own, e.g. from a
    /// duplicated file descriptor).
    pub fn start(table: HashMap<MapData, FlowKey, ConnEntry>) -> Result<FlowCounter> {
        let latest = Arc::new(Mutex::new(Snapshot::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (latest.clone(), stop.clone());
        thread::Builder::new()
            .name("flow-count".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let counts = count(&table);
                    *l.lock().unwrap() = Snapshot {
                        counts,
                        taken: Some(Instant::now()),
                    };
                    thread::sleep(INTERVAL);
                }
            })?;
        Ok(FlowCounter { latest, stop })
    }

    pub fn latest(&self) -> Snapshot {
        self.latest.lock().unwrap().clone()
    }
}

impl Drop for FlowCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
