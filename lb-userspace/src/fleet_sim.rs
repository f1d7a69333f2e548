//! A fleet simulator (`cargo xtask simulate`): N balancer instances behind
//! an ECMP router, V VIPs of B backends, a population of flows with
//! heavy-tailed lifetimes, and the events of a fleet's life. For each
//! event it reports the share of established flows that would land on
//! another backend (a broken connection) under four strategies, beside the
//! theoretical minimum (the flows of backends that went away):
//!
//! - `hash_mod_n`: backend = healthy backends [hash mod n], no state;
//! - `maglev`: the Maglev table alone (every instance the same table);
//! - `maglev_conntrack`: plus each instance's connection table (a flow keeps
//!   its backend on an instance that saw it, while that backend is valid);
//! - `maglev_conntrack_second_chance`: plus second-chance forwarding (an
//!   instance that never saw a flow sends it to the new owner with the
//!   previous table's owner as a second hop, which keeps it if it has it).
//!
//! The tables are lbd's own (`vip_table`), the flow hash the data path's;
//! deterministic from the seed. No kernel involved (a root test checks the
//! same tables and hashes against the kernel's choices on a small case).

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{PROTO_TCP, flow_hash::flow_hash, maps::FlowKey};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;

use crate::vip_table::{BackendSpec, table_with_failures};

/// The four strategies, in report order.
pub const STRATEGIES: [&str; 4] = [
    "hash_mod_n",
    "maglev",
    "maglev_conntrack",
    "maglev_conntrack_second_chance",
];

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    pub instances: usize,
    pub vips: usize,
    pub backends_per_vip: usize,
    /// Flows alive at any time, on average.
    pub flows: usize,
    pub table_size: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            instances: 64,
            vips: 8,
            backends_per_vip: 20,
            flows: 100_000,
            table_size: 65_537,
        }
    }
}

/// One backend's configured state.
#[derive(Clone, Debug)]
struct Backend {
    spec: BackendSpec,
    failed: bool,
}

/// The fleet's desired state: VIPs and their backends (all instances agree).
#[derive(Clone, Debug)]
struct Fleet {
    vips: Vec<Vec<Backend>>,
}

impl Fleet {
    fn table(&self, vip: usize, size: u32) -> Vec<u32> {
        let specs: Vec<BackendSpec> = self.vips[vip].iter().map(|b| b.spec.clone()).collect();
        let failed: Vec<u32> = self.vips[vip]
            .iter()
            .filter(|b| b.failed)
            .map(|b| b.spec.id)
            .collect();
        table_with_failures(&specs, &failed, size, 0).unwrap_or_default()
    }

    /// Ids a packet may be sent to (present, not failed).
    fn valid(&self, vip: usize, id: u32) -> bool {
        self.vips[vip].iter().any(|b| b.spec.id == id && !b.failed)
    }

    /// Healthy ids with weight, in address order (hash mod n's list).
    fn usable(&self, vip: usize) -> Vec<u32> {
        self.vips[vip]
            .iter()
            .filter(|b| !b.failed && b.spec.weight > 0)
            .map(|b| b.spec.id)
            .collect()
    }
}

/// A flow and what each strategy has it on.
#[derive(Clone, Debug)]
struct Flow {
    key: FlowKey,
    vip: usize,
    hash: u32,
    ecmp: u32,
    /// Per strategy: the backend it is on (0: none).
    backend: [u32; 4],
    /// Per strategy: it landed elsewhere since the last settle (broken).
    broken: [bool; 4],
    /// Instances that have tracked it (bit i = instance i).
    seen: u128,
    ends: f64,
}

/// What happens to the fleet.
#[derive(Clone, Debug)]
pub enum Event {
    /// Each instance in turn leaves the ECMP set and comes back (its
    /// pinned state kept).
    RollingUpgrade,
    InstanceLost,
    InstanceAdded,
    BackendAdded {
        vip: usize,
    },
    BackendRemoved {
        vip: usize,
    },
    BackendFailed {
        vip: usize,
    },
    /// Weight 0: new flows elsewhere, tracked ones stay.
    BackendDrained {
        vip: usize,
    },
    WeightChanged {
        vip: usize,
    },
    /// A backend added on every instance, then an instance joins.
    BackendAddedThenInstanceAdded {
        vip: usize,
    },
    /// A backend removed, then every instance upgraded in turn.
    BackendRemovedThenRollingUpgrade {
        vip: usize,
    },
}

impl Event {
    pub fn name(&self) -> String {
        match self {
            Event::RollingUpgrade => "rolling upgrade".into(),
            Event::InstanceLost => "instance lost".into(),
            Event::InstanceAdded => "instance added".into(),
            Event::BackendAdded { .. } => "backend added".into(),
            Event::BackendRemoved { .. } => "backend removed".into(),
            Event::BackendFailed { .. } => "backend failed".into(),
            Event::BackendDrained { .. } => "backend drained".into(),
            Event::WeightChanged { .. } => "weight 1 -> 2".into(),
            Event::BackendAddedThenInstanceAdded { .. } => "backend added + instance added".into(),
            Event::BackendRemovedThenRollingUpgrade { .. } => {
                "backend removed + rolling upgrade".into()
            }
        }
    }

    /// The VIP whose flows the event concerns (None: every VIP's).
    pub fn vip(&self) -> Option<usize> {
        match self {
            Event::RollingUpgrade | Event::InstanceLost | Event::InstanceAdded => None,
            Event::BackendAdded { vip }
            | Event::BackendRemoved { vip }
            | Event::BackendFailed { vip }
            | Event::BackendDrained { vip }
            | Event::WeightChanged { vip }
            | Event::BackendAddedThenInstanceAdded { vip }
            | Event::BackendRemovedThenRollingUpgrade { vip } => Some(*vip),
        }
    }

    /// The default scenario.
    pub fn scenario() -> Vec<Event> {
        vec![
            Event::RollingUpgrade,
            Event::InstanceLost,
            Event::InstanceAdded,
            Event::BackendAdded { vip: 0 },
            Event::BackendRemoved { vip: 1 },
            Event::BackendFailed { vip: 2 },
            Event::BackendDrained { vip: 3 },
            Event::WeightChanged { vip: 4 },
            Event::BackendAddedThenInstanceAdded { vip: 5 },
            Event::BackendRemovedThenRollingUpgrade { vip: 6 },
        ]
    }
}

/// Per event: the flows established when it happened (of the VIP it
/// concerns, or of all VIPs for instance events) that were still alive
/// after it, and the share of them each strategy broke, beside the minimum.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EventReport {
    pub event: String,
    pub established: u64,
    pub minimum: f64,
    pub broken: BTreeMap<&'static str, f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    #[serde(flatten)]
    pub config: SimConfig,
    pub events: Vec<EventReport>,
}

/// The running simulation.
pub struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    fleet: Fleet,
    /// Per VIP: the current and the previous table (second chance).
    tables: Vec<(Vec<u32>, Vec<u32>)>,
    /// Instance numbers in the ECMP set.
    active: Vec<u32>,
    next_instance: u32,
    next_id: u32,
    flows: Vec<Flow>,
    now: f64,
}

/// The backend a Maglev table gives `hash` (0: no table).
fn slot_owner(table: &[u32], hash: u32) -> u32 {
    if table.is_empty() {
        0
    } else {
        table[(hash % table.len() as u32) as usize]
    }
}

/// The backend hash mod n gives `hash` among `usable` (0: none).
fn hash_mod_n(usable: &[u32], hash: u32) -> u32 {
    usable
        .get((hash as usize) % usable.len().max(1))
        .copied()
        .unwrap_or(0)
}

/// Hash-threshold ECMP (Linux's multipath): the instance whose share of
/// the hash space holds the flow's hash.
fn ecmp(active: &[u32], hash: u32) -> u32 {
    active[((hash as u64 * active.len() as u64) >> 32) as usize]
}

/// Backend `j` (from 1) of VIP `vip`: 10.50.VIP.j, then 10.51.VIP.j...
fn address(vip: usize, j: u32) -> IpAddr {
    IpAddr::from([10, 50 + (j >> 8) as u8, vip as u8, j as u8])
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let mut next_id = 1;
        let vips = (0..cfg.vips)
            .map(|v| {
                (0..cfg.backends_per_vip as u32)
                    .map(|j| {
                        next_id += 1;
                        Backend {
                            spec: BackendSpec {
                                id: next_id - 1,
                                addr: address(v, j + 1),
                                weight: 1,
                            },
                            failed: false,
                        }
                    })
                    .collect()
            })
            .collect();
        let fleet = Fleet { vips };
        let tables = (0..cfg.vips)
            .map(|v| {
                let t = fleet.table(v, cfg.table_size);
                (t.clone(), t)
            })
            .collect();
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(cfg.seed),
            active: (0..cfg.instances as u32).collect(),
            next_instance: cfg.instances as u32,
            next_id,
            fleet,
            tables,
            flows: Vec::new(),
            now: 0.0,
            cfg,
        };
        sim.refill();
        sim
    }

    /// A lifetime (seconds) from a web-like mix: 90% short (exponential,
    /// mean 10 s), 10% long-lived (log-uniform from 10 minutes to a day:
    /// streams, websockets, database sessions).
    fn lifetime(&mut self) -> f64 {
        if self.rng.random_bool(0.9) {
            let u: f64 = self.rng.random_range(1e-12..1.0);
            -10.0 * u.ln()
        } else {
            let l: f64 = self.rng.random_range(600f64.ln()..86_400f64.ln());
            l.exp()
        }
    }

    /// New flows until the population is back to `flows`, each placed by
    /// every strategy as lbd would place a new flow.
    fn refill(&mut self) {
        while self.flows.len() < self.cfg.flows {
            let vip = self.rng.random_range(0..self.cfg.vips);
            let src = IpAddr::from(self.rng.random::<[u8; 4]>());
            let key = FlowKey::new(
                src,
                self.rng.random_range(1024..65535),
                Self::vip_address(vip),
                443,
                PROTO_TCP,
            );
            let hash = flow_hash(&key, 0);
            let ecmp_hash = flow_hash(&key, 0x5eed);
            let ends = self.now + self.lifetime();
            let mut flow = Flow {
                key,
                vip,
                hash,
                ecmp: ecmp_hash,
                backend: [0; 4],
                broken: [false; 4],
                seen: 0,
                ends,
            };
            flow.backend[0] = hash_mod_n(&self.fleet.usable(vip), hash);
            let owner = self.owner(vip, hash);
            flow.backend[1] = owner;
            flow.backend[2] = owner;
            flow.backend[3] = owner;
            flow.seen = 1u128 << (ecmp(&self.active, ecmp_hash) % 128);
            self.flows.push(flow);
        }
    }

    fn owner(&self, vip: usize, hash: u32) -> u32 {
        slot_owner(&self.tables[vip].0, hash)
    }

    /// Time passes: flows end, new ones start (on the current state).
    fn advance(&mut self, secs: f64) {
        self.now += secs;
        let now = self.now;
        self.flows.retain(|f| f.ends > now);
        self.refill();
    }

    /// Applies a backend change to every instance's tables (the previous
    /// table kept for second chance).
    fn change_backends(&mut self, vip: usize, f: impl FnOnce(&mut Vec<Backend>, u32)) {
        let id = self.next_id;
        f(&mut self.fleet.vips[vip], id);
        self.next_id += 1;
        let new = self.fleet.table(vip, self.cfg.table_size);
        let old = std::mem::replace(&mut self.tables[vip].0, new);
        self.tables[vip].1 = old;
    }

    /// Every established flow's next packet: where each strategy sends it.
    /// A flow that lands on another backend is broken under that strategy
    /// (and, stateful, is tracked there from then on: a new connection).
    fn route_all(&mut self) {
        let usable: Vec<Vec<u32>> = (0..self.cfg.vips).map(|v| self.fleet.usable(v)).collect();
        for i in 0..self.flows.len() {
            let (vip, hash, ecmp_hash) =
                (self.flows[i].vip, self.flows[i].hash, self.flows[i].ecmp);
            let bit = 1u128 << (ecmp(&self.active, ecmp_hash) % 128);
            let owner = self.owner(vip, hash);
            let prev = slot_owner(&self.tables[vip].1, hash);
            let modn = hash_mod_n(&usable[vip], hash);
            let fleet = &self.fleet;
            let valid = |b: u32| fleet.valid(vip, b);
            let f = &mut self.flows[i];
            let seen = f.seen & bit != 0;
            let mut land = [modn, owner, owner, owner];
            for s in [2, 3] {
                let b = f.backend[s];
                if seen && valid(b) {
                    land[s] = b; // tracked here
                } else if s == 3 && owner != b && prev == b && valid(b) {
                    land[s] = b; // second hop: the previous owner has it
                }
            }
            for ((to, on), broken) in land.iter().zip(&mut f.backend).zip(&mut f.broken) {
                if to != on {
                    *broken = true;
                    *on = *to;
                }
            }
            f.seen |= bit;
        }
    }

    /// Each instance in turn leaves the ECMP set (its flows go to the
    /// others) and comes back, a minute apart.
    fn rolling_upgrade(&mut self) {
        let all = self.active.clone();
        for i in all {
            self.active.retain(|&a| a != i);
            self.route_all();
            self.advance(30.0);
            self.active.push(i);
            self.active.sort_unstable();
            self.route_all();
            self.advance(30.0);
        }
    }

    /// Removes a backend of `vip` (chosen at random) on every instance and
    /// routes every flow; returns its id.
    fn remove_one(&mut self, vip: usize) -> u32 {
        let j = self.rng.random_range(0..self.fleet.vips[vip].len());
        let id = self.fleet.vips[vip][j].spec.id;
        self.change_backends(vip, |b, _| {
            b.remove(j);
        });
        self.route_all();
        id
    }

    fn instance_added(&mut self) {
        self.active.push(self.next_instance % 128);
        self.next_instance += 1;
        self.route_all();
    }

    /// Runs one event; the share of the flows established before it that
    /// each strategy broke, and the minimum.
    pub fn run(&mut self, event: &Event) -> EventReport {
        // Flows established now, and which ones must break (their backend
        // goes away): tracked by index into a snapshot of identities.
        let before: Vec<((u32, u32), u32)> = self
            .flows
            .iter()
            .map(|f| ((f.hash, f.ecmp), f.backend[2]))
            .collect();
        let mut gone: Vec<u32> = Vec::new();
        let pick = |sim: &mut Sim, vip: usize| -> usize {
            sim.rng.random_range(0..sim.fleet.vips[vip].len())
        };
        match event {
            Event::RollingUpgrade => self.rolling_upgrade(),
            Event::InstanceLost => {
                let i = self.rng.random_range(0..self.active.len());
                self.active.remove(i);
                self.route_all();
            }
            Event::InstanceAdded => self.instance_added(),
            Event::BackendAdded { vip } => {
                let j = self.fleet.vips[*vip].len() as u32 + 1;
                let vip = *vip;
                self.change_backends(vip, |b, id| {
                    b.push(Backend {
                        spec: BackendSpec {
                            id,
                            addr: address(vip, j),
                            weight: 1,
                        },
                        failed: false,
                    })
                });
                self.route_all();
            }
            Event::BackendRemoved { vip } => gone.push(self.remove_one(*vip)),
            Event::BackendFailed { vip } => {
                let j = pick(self, *vip);
                gone.push(self.fleet.vips[*vip][j].spec.id);
                self.change_backends(*vip, |b, _| b[j].failed = true);
                self.route_all();
            }
            Event::BackendDrained { vip } => {
                let j = pick(self, *vip);
                self.change_backends(*vip, |b, _| b[j].spec.weight = 0);
                self.route_all();
            }
            Event::WeightChanged { vip } => {
                let j = pick(self, *vip);
                self.change_backends(*vip, |b, _| b[j].spec.weight = 2);
                self.route_all();
            }
            Event::BackendAddedThenInstanceAdded { vip } => {
                self.run(&Event::BackendAdded { vip: *vip });
                self.advance(10.0);
                self.instance_added();
            }
            Event::BackendRemovedThenRollingUpgrade { vip } => {
                gone.push(self.remove_one(*vip));
                self.rolling_upgrade();
            }
        }
        self.tally(event, &before, &gone)
    }

    fn tally(&self, event: &Event, before: &[((u32, u32), u32)], gone: &[u32]) -> EventReport {
        // The flows established before the event that are still alive;
        // the minimum: those whose backend went away.
        let origin: BTreeMap<(u32, u32), u32> = before.iter().copied().collect();
        let mut established = 0u64;
        let mut broken = [0u64; 4];
        let mut minimum = 0u64;
        for f in self
            .flows
            .iter()
            .filter(|f| event.vip().is_none_or(|v| v == f.vip))
        {
            let Some(was) = origin.get(&(f.hash, f.ecmp)) else {
                continue;
            };
            established += 1;
            for (s, b) in f.broken.iter().enumerate() {
                broken[s] += *b as u64;
            }
            minimum += gone.contains(was) as u64;
        }
        let share = |n: u64| {
            if established == 0 {
                0.0
            } else {
                n as f64 / established as f64
            }
        };
        EventReport {
            event: event.name(),
            established,
            minimum: share(minimum),
            broken: STRATEGIES
                .iter()
                .zip(broken)
                .map(|(s, n)| (*s, share(n)))
                .collect(),
        }
    }

    /// VIP `vip`'s backends as lbd would be given them.
    pub fn vip_backends(&self, vip: usize) -> Vec<BackendSpec> {
        self.fleet.vips[vip]
            .iter()
            .map(|b| b.spec.clone())
            .collect()
    }

    /// VIP `vip`'s current Maglev table (backend ids).
    pub fn table(&self, vip: usize) -> &[u32] {
        &self.tables[vip].0
    }

    /// Every live flow: its VIP, its key and the backend the Maglev table
    /// gives a new flow with that key.
    pub fn placements(&self) -> Vec<(usize, FlowKey, u32)> {
        self.flows
            .iter()
            .map(|f| (f.vip, f.key, self.owner(f.vip, f.hash)))
            .collect()
    }

    /// The VIP address of VIP `vip` (port 443/tcp).
    pub fn vip_address(vip: usize) -> IpAddr {
        IpAddr::from([10, 0, 0, vip as u8 + 1])
    }

    /// Starts a measurement: no flow broken, each tracked by the instance
    /// that has it now, every instance's previous table its current one.
    pub fn settle(&mut self) {
        let active = &self.active;
        for f in &mut self.flows {
            f.broken = [false; 4];
            f.seen = 1u128 << (ecmp(active, f.ecmp) % 128);
        }
        for t in &mut self.tables {
            t.1 = t.0.clone();
        }
    }

    /// The whole scenario: each event on its own, 10 minutes apart.
    pub fn scenario(mut self, events: &[Event]) -> Report {
        let mut reports = Vec::new();
        for e in events {
            self.settle();
            self.advance(600.0);
            reports.push(self.run(e));
        }
        Report {
            config: self.cfg,
            events: reports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            seed: 3,
            instances: 16,
            vips: 8,
            backends_per_vip: 10,
            flows: 20_000,
            table_size: 4093,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_report() {
        let a = Sim::new(small()).scenario(&Event::scenario());
        let b = Sim::new(small()).scenario(&Event::scenario());
        assert_eq!(a, b);
        let c = Sim::new(SimConfig { seed: 4, ..small() }).scenario(&Event::scenario());
        assert_ne!(a, c);
    }

    #[test]
    fn the_strategies_order_as_the_design_says() {
        let r = Sim::new(small()).scenario(&Event::scenario());
        let get = |name: &str| r.events.iter().find(|e| e.event == name).unwrap();
        let b = |e: &EventReport, s: &str| e.broken[s];
        // Identical tables everywhere: moving flows between instances
        // breaks nothing, whatever the strategy.
        for name in ["rolling upgrade", "instance lost", "instance added"] {
            let e = get(name);
            assert!(e.established > 100, "{name}");
            for s in STRATEGIES {
                assert_eq!(b(e, s), 0.0, "{name} {s}");
            }
        }
        // A backend added: hash mod n moves nearly every flow of the VIP,
        // Maglev about 1/(n+1), connection tables none.
        let e = get("backend added");
        assert!(b(e, "hash_mod_n") > 0.8, "{e:?}");
        let m = b(e, "maglev");
        assert!((0.04..0.2).contains(&m), "{e:?}");
        assert_eq!(b(e, "maglev_conntrack"), 0.0);
        // Failure and removal: the stateful ones lose exactly the flows of
        // the backend that went away.
        for name in ["backend removed", "backend failed"] {
            let e = get(name);
            assert!(e.minimum > 0.0);
            assert_eq!(b(e, "maglev_conntrack"), e.minimum, "{name}");
            assert_eq!(b(e, "maglev_conntrack_second_chance"), e.minimum, "{name}");
        }
        // The case connection tables alone miss and second chance covers:
        // a backend added, then flows moved to an instance that never saw them.
        let e = get("backend added + instance added");
        assert!(b(e, "maglev_conntrack") > 0.0, "{e:?}");
        assert_eq!(b(e, "maglev_conntrack_second_chance"), 0.0, "{e:?}");
        let e = get("backend removed + rolling upgrade");
        assert!(b(e, "maglev_conntrack") >= b(e, "maglev_conntrack_second_chance"));
        assert_eq!(b(e, "maglev_conntrack_second_chance"), e.minimum, "{e:?}");
    }
}
