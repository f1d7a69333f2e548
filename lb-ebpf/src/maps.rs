//! Every map of the data path, in one place. Layouts live in `lb_common::maps`.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    maps::{
        Backend, CAPTURE_RING_BYTES, CONTROL_STATE_ENTRIES, CaptureFilter, ConnEntry, Counter,
        DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_SLOTS, DecapReason, FlowKey, InsertBudget,
        MAX_BACKENDS, MAX_VIPS, NextHopCache, PrevTable, QuicServerKey, Reason, SLOTS_PER_ELEMENT,
        SlotPair, VIP_ADDR_FILTER_WORDS, VipById, VipKey, VipMeta,
    },
    settings::Settings,
};

/// `FAST_HINT`'s value: the VIP the packet's exact key found, and whether
/// the connection table had no entry for its flow.
pub struct FastHint {
    pub vip: VipMeta,
    pub conntrack_missed: bool,
}

/// Load-time settings (hash seed, outer source prefix, gateway MAC); read-only.
#[unsafe(no_mangle)]
static SETTINGS: Settings = Settings::DEFAULT;

/// The settings in place: fields are read where they are used (a load each
/// from the global's map value), not copied to the stack first.
#[inline(always)]
pub fn settings() -> &'static Settings {
    // SAFETY: the global lives for the program's life and the loader fills
    // it before the program runs. The address is read volatile so that the
    // compiler cannot see through it and fold the compile-time default.
    unsafe { &*core::ptr::read_volatile(&(&raw const SETTINGS)) }
}

/// VIPs, each (address, port, protocol) and each fragment key, to its meta.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS * 2, 0);

/// Each VIP's `VIPS` entry by vip id (`VipById`): how the fast path finds
/// a tracked flow's VIP (through its backend) without hashing a key.
#[map]
pub static VIPS_BY_ID: Array<VipById> = Array::with_max_entries(MAX_VIPS + 1, 0);

/// Bit sets of VIP addresses (`lb_common::maps::vip_addr_filter_bit`): most
/// non-VIP traffic leaves after one array read instead of a hash lookup.
#[map]
pub static VIP_ADDR_FILTER: Array<u64> = Array::with_max_entries(VIP_ADDR_FILTER_WORDS, 0);

/// Non-zero while some VIP has port 0: otherwise a packet that misses its
/// exact (address, port, protocol) key needs no second lookup.
#[map]
pub static ANY_PORT_VIPS: Array<u32> = Array::with_max_entries(1, 0);

/// Backends by id: outer address, validity, owning VIP.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Every VIP's Maglev table, one region per VIP (`VipMeta::table_offset`),
/// each slot a backend id, two slots an element (`SlotPair`). Resized by
/// userspace at load time, and mmapped there so a whole table is written
/// with memory stores, not a syscall a slot.
#[map]
pub static MAGLEV_SLOTS: Array<SlotPair> =
    Array::with_max_entries(DEFAULT_MAGLEV_SLOTS / SLOTS_PER_ELEMENT, BPF_F_MMAPABLE);

/// The control plane's own state, kept with the pinned maps so that it
/// survives a daemon restart; the data path never reads it.
#[map]
pub static CONTROL_STATE: Array<u64> = Array::with_max_entries(CONTROL_STATE_ENTRIES, 0);

/// `lbctl capture`'s filter (entry 0; `enabled` 0 = off).
#[map]
pub static CAPTURE: Array<CaptureFilter> = Array::with_max_entries(1, 0);

/// Capture records a full ring refused.
#[map]
pub static CAPTURE_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Captured packets, read by `lbctl capture`.
#[map]
pub static CAPTURE_RING: RingBuf = RingBuf::with_byte_size(CAPTURE_RING_BYTES, 0);

/// QUIC VIPs: (vip id, server id) -> backend id, for short-header packets
/// routed by the server id in their connection ID.
#[map]
pub static QUIC_SERVERS: HashMap<QuicServerKey, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Each VIP's previous Maglev table (by vip id) while its second-chance
/// window lasts; read only on a connection-table miss.
#[map]
pub static PREV_TABLES: Array<PrevTable> = Array::with_max_entries(MAX_VIPS, 0);

/// Connection table: flow -> backend it was sent to. One hash shared by all
/// CPUs, so a flow stays put even when RSS moves it to another CPU; each CPU
/// keeps its own LRU list (BPF_F_NO_COMMON_LRU), so inserts do not contend.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, ConnEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, BPF_F_NO_COMMON_LRU);

/// What the fast path learnt about a packet it left to the general path
/// (entry 0, this CPU's; read by the same program run, right after).
#[map]
pub static FAST_HINT: PerCpuArray<FastHint> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU cache of `bpf_fib_lookup` answers by backend id.
#[map]
pub static NEXTHOP_CACHE: PerCpuArray<NextHopCache> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Packets and bytes per `Reason`.
#[map]
pub static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Packets and bytes per VIP id.
#[map]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Packets and bytes per backend id.
#[map]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// New flows (first packets) per backend id: balanced by the Maglev table,
/// recorded or not. Touched only on a connection-table miss.
#[map]
pub static BACKEND_NEW_FLOWS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Backend side: packets and bytes per `DecapReason`.
#[map]
pub static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DecapReason::COUNT, 0);

/// Per-CPU budget of connection-table inserts per second (SYN flood guard).
#[map]
pub static INSERT_BUDGET: PerCpuArray<InsertBudget> = PerCpuArray::with_max_entries(1, 0);
