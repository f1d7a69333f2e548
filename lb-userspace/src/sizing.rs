//! What the maps cost in kernel memory for a config: `lbd check-config`
//! prints it, so an operator sizes `max_vips`, `max_backends`,
//! `maglev_slots` and `conntrack_entries` before loading anything. The
//! estimates follow the kernel's own accounting (the `memlock` it reports
//! per map); a root test compares them with it.

use std::mem::size_of;

use lb_common::maps::{
    Backend, CAPTURE_RING_BYTES, CONTROL_STATE_ENTRIES, CaptureFilter, ConnEntry, Counter, FlowKey,
    InsertBudget, MAP_ANY_PORT_VIPS, MAP_BACKEND_NEW_FLOWS, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_CAPTURE, MAP_CAPTURE_LOST, MAP_CAPTURE_RING, MAP_CONNTRACK, MAP_CONTROL_STATE,
    MAP_INSERT_BUDGET, MAP_MAGLEV_SLOTS, MAP_NEXTHOP_CACHE, MAP_PREV_TABLES, MAP_QUIC_SERVERS,
    MAP_REASON_STATS, MAP_VIP_ADDR_FILTER, MAP_VIP_STATS, MAP_VIPS, MAP_VIPS_BY_ID, NextHopCache,
    PrevTable, QuicServerKey, Reason, SLOTS_PER_ELEMENT, SlotPair, VIP_ADDR_FILTER_WORDS, VipById,
    VipKey, VipMeta,
};

use crate::config::LbConfig;

/// How the kernel lays a map out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Array,
    /// Memory-mappable array: values are 8-byte cells, page-rounded.
    MmapArray,
    PerCpuArray,
    /// Preallocated hash (and LRU hash): one element per entry.
    Hash,
    RingBuf,
}

/// One map of the data path and what it costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapCost {
    pub name: &'static str,
    pub kind: Kind,
    pub entries: u32,
    pub bytes: u64,
}

const PAGE: u64 = 4096;
/// `struct htab_elem` before the key (x86-64): list node, LRU node, hash.
const HTAB_ELEM: u64 = 48;
/// One bucket of a hash map (list head and lock).
const HTAB_BUCKET: u64 = 16;

fn round8(n: usize) -> u64 {
    (n as u64).div_ceil(8) * 8
}

/// Bytes of one map of `kind` with `entries` of `key`/`value` bytes, on a
/// host with `cpus` possible CPUs.
pub fn map_bytes(kind: Kind, key: usize, value: usize, entries: u32, cpus: u32) -> u64 {
    let n = entries as u64;
    match kind {
        Kind::Array => n * round8(value),
        Kind::MmapArray => (n * round8(value)).div_ceil(PAGE) * PAGE,
        // A pointer per entry, and the values on every CPU.
        Kind::PerCpuArray => n * 8 + n * round8(value) * cpus as u64,
        Kind::Hash => {
            let buckets = n.next_power_of_two();
            buckets * HTAB_BUCKET + n * (HTAB_ELEM + round8(key) + round8(value))
        }
        Kind::RingBuf => n,
    }
}

/// Every map lbd loads, sized as `lb` asks.
pub fn plan(lb: &LbConfig, cpus: u32) -> Vec<MapCost> {
    // The per-VIP and per-backend maps as the loader sizes them.
    let sized = |name: &str| {
        crate::dataplane::map_size(lb.max_vips, lb.max_backends, name)
            .expect("a map map_sizes sizes")
    };
    let rows: [(&'static str, Kind, usize, usize, u32); 20] = [
        (
            MAP_VIPS,
            Kind::Hash,
            size_of::<VipKey>(),
            size_of::<VipMeta>(),
            sized(MAP_VIPS),
        ),
        (
            MAP_VIP_ADDR_FILTER,
            Kind::Array,
            4,
            8,
            VIP_ADDR_FILTER_WORDS,
        ),
        (MAP_ANY_PORT_VIPS, Kind::Array, 4, 4, 1),
        (
            MAP_VIPS_BY_ID,
            Kind::Array,
            4,
            size_of::<VipById>(),
            sized(MAP_VIPS_BY_ID),
        ),
        (
            MAP_PREV_TABLES,
            Kind::Array,
            4,
            size_of::<PrevTable>(),
            sized(MAP_PREV_TABLES),
        ),
        (
            MAP_VIP_STATS,
            Kind::PerCpuArray,
            4,
            size_of::<Counter>(),
            sized(MAP_VIP_STATS),
        ),
        (
            MAP_BACKENDS,
            Kind::Array,
            4,
            size_of::<Backend>(),
            sized(MAP_BACKENDS),
        ),
        (
            MAP_BACKEND_STATS,
            Kind::PerCpuArray,
            4,
            size_of::<Counter>(),
            sized(MAP_BACKEND_STATS),
        ),
        (
            MAP_BACKEND_NEW_FLOWS,
            Kind::PerCpuArray,
            4,
            size_of::<Counter>(),
            sized(MAP_BACKEND_NEW_FLOWS),
        ),
        (
            MAP_NEXTHOP_CACHE,
            Kind::PerCpuArray,
            4,
            size_of::<NextHopCache>(),
            sized(MAP_NEXTHOP_CACHE),
        ),
        (
            MAP_QUIC_SERVERS,
            Kind::Hash,
            size_of::<QuicServerKey>(),
            4,
            sized(MAP_QUIC_SERVERS),
        ),
        (
            MAP_MAGLEV_SLOTS,
            Kind::MmapArray,
            4,
            size_of::<SlotPair>(),
            lb.maglev_slots.div_ceil(SLOTS_PER_ELEMENT),
        ),
        (
            MAP_CONNTRACK,
            Kind::Hash,
            size_of::<FlowKey>(),
            size_of::<ConnEntry>(),
            lb.conntrack_entries,
        ),
        (
            MAP_REASON_STATS,
            Kind::PerCpuArray,
            4,
            size_of::<Counter>(),
            Reason::COUNT,
        ),
        (
            MAP_INSERT_BUDGET,
            Kind::PerCpuArray,
            4,
            size_of::<InsertBudget>(),
            1,
        ),
        (MAP_CAPTURE, Kind::Array, 4, size_of::<CaptureFilter>(), 1),
        (MAP_CAPTURE_LOST, Kind::PerCpuArray, 4, 8, 1),
        (MAP_CAPTURE_RING, Kind::RingBuf, 0, 0, CAPTURE_RING_BYTES),
        (MAP_CONTROL_STATE, Kind::Array, 4, 8, CONTROL_STATE_ENTRIES),
        // The backend side's counters ship in the same object.
        (
            "DECAP_STATS",
            Kind::PerCpuArray,
            4,
            size_of::<Counter>(),
            lb_common::maps::DecapReason::COUNT,
        ),
    ];
    rows.into_iter()
        .map(|(name, kind, key, value, entries)| MapCost {
            name,
            kind,
            entries,
            bytes: map_bytes(kind, key, value, entries, cpus),
        })
        .collect()
}

/// CPUs the kernel sizes per-CPU maps for (`/sys/devices/system/cpu/possible`).
pub fn possible_cpus() -> u32 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    parse_cpu_list(text.trim())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// Counts the CPUs in a list like `0-3,8-11`.
pub fn parse_cpu_list(list: &str) -> Option<u32> {
    let mut n = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// The plan as a table, largest first, with the total.
pub fn render(plan: &[MapCost], cpus: u32) -> String {
    let mut rows: Vec<&MapCost> = plan.iter().collect();
    rows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(b.name)));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|m| {
            let entries = match m.kind {
                Kind::RingBuf => "(ring)".to_string(),
                _ => m.entries.to_string(),
            };
            vec![m.name.to_string(), entries, human(m.bytes)]
        })
        .collect();
    let total: u64 = plan.iter().map(|m| m.bytes).sum();
    format!(
        "kernel memory of the maps ({cpus} possible CPUs):\n{}  total {}\n",
        crate::render::table(&["map", "entries", "memory"], &cells, "  "),
        human(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_plan_follows_the_config() {
        let mut c = crate::config::Config::parse(include_str!("../../examples/lbd.toml")).unwrap();
        c.lb.max_vips = 4096;
        c.lb.max_backends = 500_000;
        let plan = plan(&c.lb, 2);
        let get = |n: &str| plan.iter().find(|m| m.name == n).unwrap().clone();
        assert_eq!(get(MAP_VIPS).entries, 3 * 4096);
        assert_eq!(get(MAP_BACKENDS).entries, 500_000);
        assert_eq!(get(MAP_BACKENDS).bytes, 500_000 * 24);
        // Per-CPU: a pointer per entry plus the value on each CPU.
        assert_eq!(get(MAP_BACKEND_STATS).bytes, 500_000 * (8 + 2 * 16));
        // Slots are 4 bytes each, two to an element, in a page-rounded mapping.
        let slots = get(MAP_MAGLEV_SLOTS);
        assert_eq!(slots.entries, c.lb.maglev_slots.div_ceil(2));
        assert_eq!(
            slots.bytes,
            (c.lb.maglev_slots as u64 * 4).div_ceil(4096) * 4096
        );
        let text = render(&plan, 2);
        assert!(
            text.contains("CONNTRACK") && text.contains("total"),
            "{text}"
        );
    }
}
