//! Tracked flows per backend, counted off the daemon's loop: walking a
//! connection table of a million entries takes about a second, which must
//! not hold back health events and API requests. A walk runs on a thread of
//! its own, over its own handle of the map, when someone asks for counts
//! older than `MAX_AGE`; the asker gets the latest finished counts.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use lb_common::maps::{ConnEntry, FlowKey};

/// Counts younger than this are served as they are.
pub const MAX_AGE: Duration = Duration::from_secs(1);

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

/// Walks on demand, one walk at a time; costs nothing while nobody asks.
pub struct FlowCounter {
    table: Arc<HashMap<MapData, FlowKey, ConnEntry>>,
    latest: Arc<Mutex<Snapshot>>,
    walking: Arc<AtomicBool>,
}

impl FlowCounter {
    /// Counts over `table` (a handle of its own, e.g. from a duplicated
    /// file descriptor).
    pub fn new(table: HashMap<MapData, FlowKey, ConnEntry>) -> FlowCounter {
        FlowCounter {
            table: Arc::new(table),
            latest: Arc::new(Mutex::new(Snapshot::default())),
            walking: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The latest finished counts; starts a walk if they are older than
    /// `MAX_AGE` (or missing) and none is running.
    pub fn latest(&self) -> Snapshot {
        let snapshot = self.latest.lock().unwrap().clone();
        let stale = snapshot.taken.is_none_or(|t| t.elapsed() > MAX_AGE);
        if stale && !self.walking.swap(true, Ordering::AcqRel) {
            let (table, latest, walking) = (
                self.table.clone(),
                self.latest.clone(),
                self.walking.clone(),
            );
            let spawned = thread::Builder::new()
                .name("flow-count".into())
                .spawn(move || {
                    let counts = count(&table);
                    *latest.lock().unwrap() = Snapshot {
                        counts,
                        taken: Some(Instant::now()),
                    };
                    walking.store(false, Ordering::Release);
                });
            if spawned.is_err() {
                self.walking.store(false, Ordering::Release);
            }
        }
        snapshot
    }
}
