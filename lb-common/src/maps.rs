//! Map names and the layout of every map key and value.
//!
//! All multi-byte addresses and ports are kept in network byte order, exactly
//! as they sit in the packet, so the data path never swaps bytes to look
//! something up. Every struct is `#[repr(C)]` with its padding spelled out
//! (the kernel hashes keys byte for byte: implicit padding would be garbage).

use core::mem::size_of;

/// An IPv4 or IPv6 address as four 32-bit words in network byte order.
/// IPv4 uses word 0; the other words are zero. Keys that hold addresses also
/// carry the family, so an IPv6 address whose last 96 bits are zero never
/// meets an IPv4 one.
pub type Addr = [u32; 4];

/// `FlowKey::family` / `VipKey::family` values.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// `VIPS`: `VipKey -> VipMeta`.
pub const MAP_VIPS: &str = "VIPS";
/// `VIPS_BY_ID`: array, vip id -> `VipById`: each VIP's own (port) key and
/// meta, as in `VIPS`. The fast path reaches a tracked flow's VIP from its
/// backend's `vip_id` with an array read instead of a hash lookup.
pub const MAP_VIPS_BY_ID: &str = "VIPS_BY_ID";
/// `BACKENDS`: array, backend id -> `Backend`.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// `MAGLEV_SLOTS`: array of backend ids holding every VIP's Maglev table.
pub const MAP_MAGLEV_SLOTS: &str = "MAGLEV_SLOTS";
/// `CONNTRACK`: LRU hash, `FlowKey -> ConnEntry`.
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// `REASON_STATS`: per-CPU array, `Reason` -> `Counter`.
pub const MAP_REASON_STATS: &str = "REASON_STATS";
/// `VIP_STATS`: per-CPU array, vip id -> `Counter`.
pub const MAP_VIP_STATS: &str = "VIP_STATS";
/// `BACKEND_STATS`: per-CPU array, backend id -> `Counter`.
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
/// `BACKEND_NEW_FLOWS`: per-CPU array, backend id -> `Counter` of new flows
/// (first packets balanced by the table) and their bytes.
pub const MAP_BACKEND_NEW_FLOWS: &str = "BACKEND_NEW_FLOWS";
/// The load-time settings global (see `settings::Settings`).
pub const GLOBAL_SETTINGS: &str = "SETTINGS";
/// `ANY_PORT_VIPS`: array of one u32, non-zero while some VIP has port 0
/// (saves non-VIP traffic a second `VIPS` lookup).
pub const MAP_ANY_PORT_VIPS: &str = "ANY_PORT_VIPS";
/// `NEXTHOP_CACHE`: per-CPU array, backend id -> `NextHopCache`.
pub const MAP_NEXTHOP_CACHE: &str = "NEXTHOP_CACHE";
/// `DECAP_STATS`: per-CPU array, `DecapReason` -> `Counter` (backend side).
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";
/// `PREV_TABLES`: array, vip id -> `PrevTable`: where the VIP's previous
/// Maglev table lies in `MAGLEV_SLOTS` while its second-chance window lasts.
pub const MAP_PREV_TABLES: &str = "PREV_TABLES";
/// `CONTROL_STATE`: array of u64 the control plane keeps across restarts
/// (the data path never reads it); indices `CONTROL_*`.
pub const MAP_CONTROL_STATE: &str = "CONTROL_STATE";
pub const CONTROL_STATE_ENTRIES: u32 = 8;
/// `CONTROL_STATE[CONTROL_TABLE_GENERATION]`: the reconciler's table generation.
pub const CONTROL_TABLE_GENERATION: u32 = 0;
/// `VIP_ADDR_FILTER`: array of `VIP_ADDR_FILTER_WORDS` u64 bit sets: bit
/// `vip_addr_filter_bit(addr)` is set for every VIP address. A packet whose
/// destination's bit is clear is no VIP's: passed after one array read,
/// without a hash lookup. A set bit may be a collision: the lookups decide.
pub const MAP_VIP_ADDR_FILTER: &str = "VIP_ADDR_FILTER";
pub const VIP_ADDR_FILTER_WORDS: u32 = 1024;

/// The filter bit of a destination address (0..65536): a multiplicative
/// hash of the address words (network order as in the packet) and family.
#[inline(always)]
pub fn vip_addr_filter_bit(addr: &Addr, family: u8) -> u32 {
    let x = addr[0]
        ^ addr[1].rotate_left(8)
        ^ addr[2].rotate_left(16)
        ^ addr[3].rotate_left(24)
        ^ family as u32;
    x.wrapping_mul(0x9E37_79B1) >> 16
}

/// The XDP entry point of the load balancer.
pub const PROGRAM_BALANCER: &str = "balancer";
/// An XDP program that only passes (benchmark floor, veth peers).
pub const PROGRAM_PASS: &str = "pass";
/// An XDP program that drops everything (benchmark sinks).
pub const PROGRAM_SINK: &str = "sink";
/// The XDP entry point of the backend side (decapsulation).
pub const PROGRAM_DECAP: &str = "decap";
/// Benchmark only: live-frames generator (rewrites the frame, tail-calls).
pub const PROGRAM_BENCH_GEN: &str = "bench_gen";
/// `BENCH_FRAME`: array of one frame template for `bench_gen`.
pub const MAP_BENCH_FRAME: &str = "BENCH_FRAME";
/// `BENCH_NEXT`: program array, slot 0 = the program `bench_gen` runs.
pub const MAP_BENCH_NEXT: &str = "BENCH_NEXT";
/// Length of `bench_gen`'s frames (shorter test frames are padded).
pub const BENCH_FRAME_LEN: usize = 64;

/// Compile-time capacities. The large ones are resized at load time
/// (`EbpfLoader::map_max_entries`); these are the defaults.
pub const MAX_VIPS: u32 = 1024;
pub const MAX_BACKENDS: u32 = 16384;
pub const DEFAULT_MAGLEV_SLOTS: u32 = 1 << 22;

/// Maglev slots per `MAGLEV_SLOTS` element: element `i` holds slots `2i`
/// and `2i + 1`. The kernel puts array elements 8 bytes apart whatever
/// their size, so one u32 slot per element left half of every cache line
/// empty (a 65,537-slot table took 512 KiB; a new flow's slot read missed
/// the cache more often).
pub const SLOTS_PER_ELEMENT: u32 = 2;
/// One `MAGLEV_SLOTS` element: two slots' backend ids.
pub type SlotPair = [u32; SLOTS_PER_ELEMENT as usize];
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 20;

/// Backend id 0 is never allocated: a zeroed slot or entry points nowhere.
pub const BACKEND_ID_NONE: u32 = 0;

/// `VipKey::kind` of an ordinary (address, port, protocol) key.
pub const VIP_KIND_PORT: u8 = 0;
/// `VipKey::kind` of the per-(address, protocol) key that IPv4 fragments
/// use: fragments after the first carry no ports. Userspace points it at the
/// port-0 VIP of that address if there is one, else at the lowest port's VIP.
pub const VIP_KIND_FRAGMENTS: u8 = 1;
/// `VipKey::kind` of the per-address key (port 0, protocol 0) that says
/// "this address is a VIP": echo requests to it are answered by the data
/// path. Its meta is the address's fragment owner's.
pub const VIP_KIND_ADDRESS: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: Addr,
    /// Network byte order; 0 = every port.
    pub port: u16,
    pub proto: u8,
    /// `VIP_KIND_PORT`, `VIP_KIND_FRAGMENTS` or `VIP_KIND_ADDRESS`.
    pub kind: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `VipMeta::flags`: encapsulate in GUE (outer UDP to `Settings::gue_port`,
/// the inner IP packet right after the UDP header) instead of IP-in-IP.
pub const VIP_F_GUE: u32 = 1;
/// `VipMeta::flags`: a QUIC VIP (UDP): short-header packets whose
/// connection ID names a server (`QUIC_SERVERS`) go to it without the
/// connection table. The QUIC-LB parameters sit in higher flag bits
/// (`quic_lb::QuicLbParams::flag_bits`).
pub const VIP_F_QUIC: u32 = 2;

/// `QUIC_SERVERS`: hash, `QuicServerKey -> u32` backend id.
pub const MAP_QUIC_SERVERS: &str = "QUIC_SERVERS";

/// A server id within a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuicServerKey {
    pub vip_id: u32,
    pub server_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `VIP_STATS`; stable for the VIP's lifetime.
    pub vip_id: u32,
    /// `VIP_F_*` switches (encapsulation kind).
    pub flags: u32,
    /// Where this VIP's Maglev table starts in `MAGLEV_SLOTS`.
    pub table_offset: u32,
    /// M, the table's prime size; 0 = the VIP has no backend (drop).
    pub table_size: u32,
}

/// `VIPS_BY_ID`'s value: a copy of the VIP's `VIPS` entry of kind
/// `VIP_KIND_PORT` (all zero: no VIP has this id). Array values are copied
/// in place, so a reader racing an update may see a mix of the old and the
/// new value: readers match `key` against the packet and `meta.vip_id`
/// against the id they came with, and use nothing of it beyond the switches
/// of one packet's decision (see `lb-ebpf/src/fast.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipById {
    pub key: VipKey,
    pub meta: VipMeta,
}

/// A VIP's previous Maglev table (the one before its last change) while
/// second-chance forwarding uses it; `size` 0 = none. A TCP packet that is
/// not a SYN and misses the connection table, whose slot names another
/// backend in this table than in the current one, is sent to the current
/// backend with this table's backend as a second hop (nested
/// encapsulation). Kept apart from `VipMeta` so the hot path reads nothing
/// more and pinned `VIPS` maps keep their layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrevTable {
    pub offset: u32,
    pub size: u32,
}

/// `Backend::flags`: may receive packets (new and tracked). A removed or
/// failed backend is cleared so tracked flows re-hash instead of black-holing.
pub const BACKEND_F_VALID: u32 = 1;
/// `Backend::flags`: `addr` is IPv6 (the outer header is IPv6).
pub const BACKEND_F_IPV6: u32 = 2;
/// `Backend::flags`: removed from its VIP, never valid again; the entry
/// keeps its address only as a second hop named by a previous table.
pub const BACKEND_F_RETIRED: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Outer destination address.
    pub addr: Addr,
    pub flags: u32,
    /// The VIP this backend id belongs to: a tracked flow whose backend now
    /// belongs to another VIP is re-hashed (guards against id reuse).
    pub vip_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order; 0 for fragments and ICMP.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub backend_id: u32,
    /// The flow's hash (`flow_hash` with the program's seed), so a tracked
    /// packet's outer header needs no hashing. 0 = not recorded (an entry
    /// written by an older program, or a hash that happens to be 0):
    /// computed again.
    pub hash: u32,
    /// Last time a UDP packet used this entry (`bpf_ktime_get_coarse_ns`,
    /// CLOCK_MONOTONIC at tick resolution), refreshed at most once a
    /// second; TCP entries leave it at their creation time. A TCP entry
    /// recorded on a second chance has `CONN_SECOND_HOP` set instead: see
    /// `ConnEntry::with_second_hop`.
    pub atime_ns: u64,
}

/// `ConnEntry::atime_ns` bit 63: a TCP flow first seen here on a second
/// chance; bits 32-62 hold the second hop's backend id, bits 0-31 the
/// creation time in units of 2^30 ns (about a second).
pub const CONN_SECOND_HOP: u64 = 1 << 63;

impl ConnEntry {
    /// A TCP flow that reached this instance mid-connection when its slot
    /// had just changed owner: its packets go to `backend_id` with
    /// `second` as second hop from now on, whatever later table changes
    /// do (one of the two has the connection).
    pub fn with_second_hop(backend_id: u32, second: u32, hash: u32, now_ns: u64) -> ConnEntry {
        ConnEntry {
            backend_id,
            hash,
            atime_ns: CONN_SECOND_HOP
                | ((second as u64 & 0x7fff_ffff) << 32)
                | ((now_ns >> 30) & 0xffff_ffff),
        }
    }

    /// The recorded second hop's backend id (0: none).
    #[inline(always)]
    pub fn second_hop(&self) -> u32 {
        if self.atime_ns & CONN_SECOND_HOP != 0 {
            ((self.atime_ns >> 32) as u32) & 0x7fff_ffff
        } else {
            0
        }
    }

    /// When the entry was made (or a UDP one last refreshed), in ns.
    pub fn time_ns(&self) -> u64 {
        if self.atime_ns & CONN_SECOND_HOP != 0 {
            (self.atime_ns & 0xffff_ffff) << 30
        } else {
            self.atime_ns
        }
    }
}

/// A `bpf_fib_lookup` answer for one backend, kept per CPU for about a
/// second (2^`Settings::nexthop_ttl_shift` jiffies) so that tracked packets skip the
/// FIB (the costliest step of the fast path). Route or neighbour changes are
/// seen within the TTL. Timed in jiffies: the verifier turns
/// `bpf_jiffies64` into one load, where a clock read is a helper call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopCache {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub ifindex: u32,
    /// The egress MTU the FIB reported; larger packets take the FIB path.
    pub mtu: u32,
    /// The interface the answer was looked up for (policy routing may differ).
    pub ingress_ifindex: u32,
    /// `bpf_jiffies64` value from which the answer is looked up again. An
    /// entry further ahead than one TTL (written by an older program, which
    /// kept nanoseconds here) counts as expired.
    pub expires_jiffies: u64,
}

/// This CPU's count of connection-table inserts in the current second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InsertBudget {
    pub window_start_ns: u64,
    pub inserted: u64,
}

/// `INSERT_BUDGET`: per-CPU array of one `InsertBudget`.
pub const MAP_INSERT_BUDGET: &str = "INSERT_BUDGET";

/// `CAPTURE`: array of one `CaptureFilter`: which forwarded packets the
/// data path copies into `CAPTURE_RING` (`lbctl capture`).
pub const MAP_CAPTURE: &str = "CAPTURE";
/// `CAPTURE_LOST`: per-CPU array of one u64: records a full ring refused.
pub const MAP_CAPTURE_LOST: &str = "CAPTURE_LOST";
/// `CAPTURE_RING`: BPF ring buffer of `CaptureRecord`s.
pub const MAP_CAPTURE_RING: &str = "CAPTURE_RING";
/// Size of `CAPTURE_RING` (a power of two pages): 4096 records.
pub const CAPTURE_RING_BYTES: u32 = 8 << 20;
/// Bytes of a packet kept (the rest is counted in `len` only): a full
/// 1500-byte frame with two layers of encapsulation fits.
pub const CAPTURE_SNAPLEN: usize = 2024;
/// `CaptureFilter::vip_id` that matches every VIP.
pub const CAPTURE_ANY_VIP: u32 = u32::MAX;
/// `CaptureRecord::direction`: the packet as it arrived.
pub const CAPTURE_IN: u32 = 0;
/// `CaptureRecord::direction`: the packet as it left (encapsulated).
pub const CAPTURE_OUT: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    /// 0: off (the data path's only cost: reading this word).
    pub enabled: u32,
    /// The VIP whose packets are captured, or `CAPTURE_ANY_VIP`.
    pub vip_id: u32,
    /// The backend whose packets are captured, or 0 for any.
    pub backend_id: u32,
    pub _pad: u32,
}

/// One captured packet.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CaptureRecord {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// The packet's length; `data` holds `caplen` bytes of it.
    pub len: u32,
    pub caplen: u32,
    /// `CAPTURE_IN` or `CAPTURE_OUT`.
    pub direction: u32,
    /// The interface it arrived on.
    pub ifindex: u32,
    pub data: [u8; CAPTURE_SNAPLEN],
}

/// How long a cached next hop is used (`Settings::nexthop_ttl_shift` holds
/// it as a power of two of the host's jiffies).
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Why a packet left the program the way it did. Indexes `REASON_STATS`.
/// A packet is counted under exactly one outcome reason, and VIP packets
/// additionally under one conntrack reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): XDP_PASS.
    PassNotIp = 0,
    /// IP but no VIP matches: XDP_PASS, unchanged.
    PassNotVip = 1,
    /// Too short or inconsistent headers: XDP_PASS, the kernel's stack judges.
    PassMalformed = 2,
    /// Encapsulated, but the next hop's MAC is not resolved yet: handed to the
    /// kernel, which resolves the neighbour and forwards it.
    PassNoNeighbour = 3,
    /// The VIP has no backend in its table: XDP_DROP.
    DropNoBackend = 4,
    /// No route to the backend and no gateway MAC configured: XDP_DROP.
    DropNoRoute = 5,
    /// `bpf_xdp_adjust_head` refused room for the outer header: XDP_DROP.
    DropEncapFailed = 6,
    /// Encapsulated and sent back out of the ingress interface (XDP_TX).
    Tx = 7,
    /// Encapsulated and redirected to another interface (XDP_REDIRECT).
    Redirect = 8,
    /// A VIP packet whose flow was found in CONNTRACK with a valid backend.
    ConntrackHit = 9,
    /// A VIP packet that took the Maglev table's answer.
    ConntrackMiss = 10,
    /// An IPv4 fragment of a VIP, hashed on (src, dst, proto).
    Fragment = 11,
    /// Sent through the configured gateway MAC because `bpf_fib_lookup`
    /// gave no answer (also counted under Tx).
    FibFallbackGateway = 12,
    /// The encapsulated packet would exceed the configured MTU or the
    /// egress MTU, and the client cannot be told (IPv4 without DF, or an
    /// ICMP error): XDP_DROP.
    DropTooBig = 13,
    /// A new flow was balanced but not recorded: this CPU reached its
    /// `max_new_flows_per_sec` budget (SYN flood protection).
    ConntrackInsertSkipped = 14,
    /// The encapsulated packet would exceed the MTU: answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big" (XDP_TX).
    IcmpTooBigSent = 15,
    /// An echo request to a VIP address: answered (XDP_TX).
    IcmpEchoReply = 16,
    /// An ICMP error quoting a VIP flow: sent to that flow's backend (also
    /// counted under the outcome).
    IcmpErrorForwarded = 17,
    /// To a VIP address, but no VIP has its port and protocol: dropped.
    /// Passed, it would go back to the router (the LB host does not own
    /// the address) and loop until its TTL runs out.
    DropNotAService = 18,
    /// Sent with a second hop: a TCP packet (not a SYN) that missed the
    /// connection table and whose slot belonged to another backend in the
    /// VIP's previous table; that backend is the second hop (also counted
    /// under the outcome and `ConntrackMiss`).
    SecondChance = 19,
    /// A QUIC short-header packet whose connection ID named a valid
    /// backend of its VIP: sent there, without the connection table (also
    /// counted under the outcome).
    QuicRouted = 20,
    /// A QUIC long-header packet (handshake): balanced as any UDP flow.
    QuicLongHeader = 21,
    /// A QUIC short-header packet whose connection ID names no server of
    /// the VIP (unknown id, other config, too short): balanced as any UDP flow.
    QuicUnknownServer = 22,
    /// A QUIC short-header packet whose server is known but not valid
    /// (failed): balanced as any UDP flow.
    QuicServerDown = 23,
}

impl Reason {
    /// Outcomes that sent the packet on toward a backend (by XDP or, while
    /// the neighbour resolves, by the kernel).
    pub const FORWARDED: [Reason; 3] = [Reason::Tx, Reason::Redirect, Reason::PassNoNeighbour];
    /// Outcomes that dropped the packet.
    pub const DROPPED: [Reason; 5] = [
        Reason::DropNoBackend,
        Reason::DropNoRoute,
        Reason::DropTooBig,
        Reason::DropEncapFailed,
        Reason::DropNotAService,
    ];

    pub const COUNT: u32 = 24;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassMalformed,
        Reason::PassNoNeighbour,
        Reason::DropNoBackend,
        Reason::DropNoRoute,
        Reason::DropEncapFailed,
        Reason::Tx,
        Reason::Redirect,
        Reason::ConntrackHit,
        Reason::ConntrackMiss,
        Reason::Fragment,
        Reason::FibFallbackGateway,
        Reason::DropTooBig,
        Reason::ConntrackInsertSkipped,
        Reason::IcmpTooBigSent,
        Reason::IcmpEchoReply,
        Reason::IcmpErrorForwarded,
        Reason::DropNotAService,
        Reason::SecondChance,
        Reason::QuicRouted,
        Reason::QuicLongHeader,
        Reason::QuicUnknownServer,
        Reason::QuicServerDown,
    ];

    /// Stable name for metrics and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassNoNeighbour => "pass_no_neighbour",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropNoRoute => "drop_no_route",
            Reason::DropEncapFailed => "drop_encap_failed",
            Reason::Tx => "tx",
            Reason::Redirect => "redirect",
            Reason::ConntrackHit => "conntrack_hit",
            Reason::ConntrackMiss => "conntrack_miss",
            Reason::Fragment => "fragment",
            Reason::FibFallbackGateway => "fib_fallback_gateway",
            Reason::DropTooBig => "drop_too_big",
            Reason::ConntrackInsertSkipped => "conntrack_insert_skipped",
            Reason::IcmpTooBigSent => "icmp_too_big_sent",
            Reason::IcmpEchoReply => "icmp_echo_reply",
            Reason::IcmpErrorForwarded => "icmp_error_forwarded",
            Reason::DropNotAService => "drop_not_a_service",
            Reason::SecondChance => "second_chance",
            Reason::QuicRouted => "quic_routed",
            Reason::QuicLongHeader => "quic_long_header",
            Reason::QuicUnknownServer => "quic_unknown_server",
            Reason::QuicServerDown => "quic_server_down",
        }
    }
}

/// What the backend-side `decap` program did with a packet. Indexes `DECAP_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// IP-in-IP (any mix of IPv4/IPv6) or GUE: outer headers removed, the
    /// inner packet passed to the stack.
    Decapsulated = 0,
    /// Not encapsulated for us: passed unchanged.
    PassNotEncapsulated = 1,
    /// Encapsulated, with a broken outer or inner header: passed unchanged.
    PassMalformed = 2,
    /// Carried a second hop, and this host has the connection (a socket
    /// for the inner 4-tuple that is not only listening, or a valid SYN
    /// cookie), or the inner packet is no TCP segment that may be forwarded
    /// (a SYN, UDP): both layers removed, delivered here.
    SecondHopLocal = 3,
    /// Carried a second hop and no local connection: the outer layer
    /// removed and the rest (an ordinary encapsulated packet to the second
    /// backend) sent on toward it (XDP_TX / redirect).
    SecondHopForwarded = 4,
    /// As `SecondHopForwarded`, but the FIB had no resolved next hop: the
    /// packet is handed to the kernel to route (or drop).
    SecondHopToKernel = 5,
}

impl DecapReason {
    pub const COUNT: u32 = 6;
    pub const ALL: [DecapReason; 6] = [
        DecapReason::Decapsulated,
        DecapReason::PassNotEncapsulated,
        DecapReason::PassMalformed,
        DecapReason::SecondHopLocal,
        DecapReason::SecondHopForwarded,
        DecapReason::SecondHopToKernel,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::Decapsulated => "decapsulated",
            DecapReason::PassNotEncapsulated => "pass_not_encapsulated",
            DecapReason::PassMalformed => "pass_malformed",
            DecapReason::SecondHopLocal => "second_hop_local",
            DecapReason::SecondHopForwarded => "second_hop_forwarded",
            DecapReason::SecondHopToKernel => "second_hop_to_kernel",
        }
    }
}

// The kernel and userspace must agree on these sizes byte for byte.
const _: () = assert!(size_of::<VipKey>() == 24);
const _: () = assert!(size_of::<VipMeta>() == 16);
const _: () = assert!(size_of::<Backend>() == 24);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<ConnEntry>() == 16);
const _: () = assert!(size_of::<Counter>() == 16);
const _: () = assert!(size_of::<NextHopCache>() == 32);
const _: () = assert!(size_of::<PrevTable>() == 8);
const _: () = assert!(size_of::<VipById>() == 40);
const _: () = assert!(size_of::<QuicServerKey>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_bits_are_in_range_and_spread_a_subnet() {
        let mut seen = [false; 65536];
        for d in 0..=255u8 {
            let a = [u32::from_ne_bytes([10, 0, 0, d]), 0, 0, 0];
            let bit = vip_addr_filter_bit(&a, FAMILY_IPV4);
            assert!(bit < VIP_ADDR_FILTER_WORDS * 64);
            seen[bit as usize] = true;
        }
        let distinct = seen.iter().filter(|s| **s).count();
        assert!(distinct >= 250, "a /24 shares bits: {distinct}");
        // The family is part of it: ::a00:a is not 10.0.0.10.
        let v4 = [u32::from_ne_bytes([10, 0, 0, 10]), 0, 0, 0];
        assert_ne!(
            vip_addr_filter_bit(&v4, FAMILY_IPV4),
            vip_addr_filter_bit(&v4, FAMILY_IPV6)
        );
    }
}
