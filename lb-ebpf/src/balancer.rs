//! The packet decision: which VIP, which backend, which way out.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    flow_hash::flow_hash,
    maps::{
        Addr, BACKEND_F_IPV6, BACKEND_F_RETIRED, BACKEND_F_VALID, Backend, CAPTURE_IN, CAPTURE_OUT,
        CONN_SECOND_HOP, ConnEntry, FlowKey, NextHopCache, QuicServerKey, Reason,
        SLOTS_PER_ELEMENT, VIP_F_GUE, VIP_F_QUIC, VIP_KIND_ADDRESS, VIP_KIND_FRAGMENTS,
        VIP_KIND_PORT, VipKey, VipMeta, vip_addr_filter_bit,
    },
    quic_lb::{SHORT_HEADER_READ, flag_params, server_id_of},
    settings::{SETTINGS_F_GATEWAY_MAC, SETTINGS_F_NO_FIB, Settings},
};

use crate::{
    capture,
    encap::{NextHop, Outer, encapsulate, encapsulate_nested, lookup_next_hop},
    icmp::{echo_reply, ingress_macs, quote_len, too_big_reply},
    maps::{
        ANY_PORT_VIPS, BACKENDS, CONNTRACK, FAST_HINT, INSERT_BUDGET, MAGLEV_SLOTS, NEXTHOP_CACHE,
        PREV_TABLES, QUIC_SERVERS, VIP_ADDR_FILTER, VIPS, settings,
    },
    parse::{
        ICMP_ECHO_REQUEST, ICMP_ERROR, Packet, Parsed, TCP_ACK, TCP_RST, TCP_SYN, parse, ptr_at,
    },
    stats::{count, count_backend, count_new_flow, count_vip},
};

/// UDP entries refresh their access time at most this often (saves a write
/// per packet on busy flows).
pub const ATIME_REFRESH_NS: u64 = 1_000_000_000;

/// No header of a linear XDP frame starts this far in (a page at most).
const MAX_LINEAR_OFFSET: usize = 0x4000;

/// `hinted`: the fast path left this packet with this CPU's `FAST_HINT`
/// filled in (a TCP/UDP packet, not a fragment, whose exact VIP key it
/// found): its VIP is taken from there, and a connection table miss there
/// is not looked up again.
#[inline(always)]
pub fn process(ctx: &XdpContext, hinted: bool) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let mut pkt = Packet::EMPTY;
    match parse(ctx, &mut pkt) {
        Parsed::Ip => {}
        Parsed::NotIp => return finish(Reason::PassNotIp, XDP_PASS, bytes),
        Parsed::Malformed => return finish(Reason::PassMalformed, XDP_PASS, bytes),
    }
    let hint = if hinted { FAST_HINT.get(0) } else { None };
    let (vip, conntrack_missed) = match hint {
        Some(h) => (h.vip, h.conntrack_missed),
        None => {
            if !maybe_vip_address(&pkt.flow.dst, pkt.flow.family) {
                return finish(Reason::PassNotVip, XDP_PASS, bytes);
            }
            if pkt.icmp == ICMP_ECHO_REQUEST {
                return answer_echo(ctx, &pkt, bytes);
            }
            let Some(vip) = lookup_vip(&pkt) else {
                // Never back out unbalanced: the router would send it here again.
                if is_vip_address(&pkt) {
                    return finish(Reason::DropNotAService, XDP_DROP, bytes);
                }
                return finish(Reason::PassNotVip, XDP_PASS, bytes);
            };
            (vip, false)
        }
    };
    count_vip(vip.vip_id, bytes);
    if vip.table_size == 0 {
        return finish(Reason::DropNoBackend, XDP_DROP, bytes);
    }
    let cfg = settings();
    let Some(chosen) = choose_backend(ctx, &pkt, &vip, cfg, bytes, conntrack_missed) else {
        return finish(Reason::DropNoBackend, XDP_DROP, bytes);
    };
    count_backend(chosen.id, bytes);
    forward(ctx, &pkt, &vip, &chosen, cfg, bytes)
}

/// The clock, read once at most and only where a packet needs it (UDP idle
/// checks, new entries): a tracked TCP packet never reads it (the next-hop
/// cache counts jiffies). The coarse clock (monotonic at tick resolution)
/// reads a variable instead of the TSC; every use here is about seconds.
struct Clock(u64);

impl Clock {
    const NOT_READ: Clock = Clock(0);

    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.0 == 0 {
            // SAFETY: helper with no arguments.
            self.0 = unsafe { bpf_ktime_get_coarse_ns() };
        }
        self.0
    }
}

/// The backend a packet goes to, and the flow hash its outer header uses.
struct Chosen {
    id: u32,
    backend: Backend,
    hash: u32,
    /// Second-chance forwarding: the id of the backend that owned the
    /// flow's slot in the VIP's previous table, where the first may send it
    /// on; 0 = none. (An id, not a copy: the BPF stack is nearly full.)
    second: u32,
}

/// False only if the destination is certainly no VIP address (its filter
/// bit is clear): an array read, inlined by the verifier.
#[inline(always)]
pub fn maybe_vip_address(dst: &Addr, family: u8) -> bool {
    let bit = vip_addr_filter_bit(dst, family);
    VIP_ADDR_FILTER
        .get(bit >> 6)
        .is_none_or(|word| (word >> (bit & 63)) & 1 != 0)
}

/// The per-address key: is the destination some VIP's address?
#[inline(always)]
fn address_key(pkt: &Packet) -> VipKey {
    VipKey {
        addr: pkt.flow.dst,
        port: 0,
        proto: 0,
        kind: VIP_KIND_ADDRESS,
        family: pkt.flow.family,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn is_vip_address(pkt: &Packet) -> bool {
    // SAFETY: only presence is read.
    unsafe { VIPS.get(&address_key(pkt)) }.is_some()
}

/// Echo requests to a VIP address are answered here: the address is
/// served by every instance, so any of them may answer.
#[inline(always)]
fn answer_echo(ctx: &XdpContext, pkt: &Packet, bytes: u64) -> u32 {
    // SAFETY: copied out at once.
    let Some(vip_id) = (unsafe { VIPS.get(&address_key(pkt)) }).map(|m| m.vip_id) else {
        return finish(Reason::PassNotVip, XDP_PASS, bytes);
    };
    count_vip(vip_id, bytes);
    if echo_reply(ctx, pkt).is_err() {
        return finish(Reason::DropEncapFailed, XDP_DROP, bytes);
    }
    finish(Reason::IcmpEchoReply, XDP_TX, bytes)
}

/// A packet too big for the way to the backend: tell the client the MTU
/// it may use, unless it may not be told (IPv4 without DF, fragments, ICMP
/// errors, less than a quote's worth of packet): then drop.
#[inline(always)]
fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16, bytes: u64) -> u32 {
    if !pkt.dont_fragment
        || pkt.is_fragment
        || pkt.icmp == ICMP_ERROR
        || (pkt.ip_len as usize) < quote_len(pkt)
    {
        return finish(Reason::DropTooBig, XDP_DROP, bytes);
    }
    if too_big_reply(ctx, pkt, mtu).is_err() {
        return finish(Reason::DropEncapFailed, XDP_DROP, bytes);
    }
    finish(Reason::IcmpTooBigSent, XDP_TX, bytes)
}

#[inline(always)]
pub fn finish(reason: Reason, action: u32, bytes: u64) -> u32 {
    count(reason, bytes);
    action
}

/// Exact (address, port, protocol) first, then the VIP's every-port entry.
/// Fragments carry no ports and use the address's fragment key.
#[inline(always)]
fn lookup_vip(pkt: &Packet) -> Option<VipMeta> {
    let mut key = exact_vip_key(&pkt.flow);
    if pkt.is_fragment {
        key.kind = VIP_KIND_FRAGMENTS;
    }
    // SAFETY: values are copied out at once; userspace replaces, never mutates in place.
    if let Some(meta) = unsafe { VIPS.get(&key) } {
        return Some(*meta);
    }
    if pkt.is_fragment || key.port == 0 || ANY_PORT_VIPS.get(0).is_none_or(|&n| n == 0) {
        return None;
    }
    key.port = 0;
    unsafe { VIPS.get(&key) }.copied()
}

/// The key of the VIP serving exactly the flow's (address, port, protocol).
#[inline(always)]
pub fn exact_vip_key(flow: &FlowKey) -> VipKey {
    VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        kind: VIP_KIND_PORT,
        family: flow.family,
        _pad: [0; 3],
    }
}

#[inline(always)]
pub fn backend_for(id: u32, vip: &VipMeta) -> Option<Backend> {
    let backend = BACKENDS.get(id)?;
    serves(backend, vip).then_some(*backend)
}

/// Whether `backend` may take `vip`'s packets: valid, and still that VIP's.
#[inline(always)]
pub fn serves(backend: &Backend, vip: &VipMeta) -> bool {
    backend.flags & BACKEND_F_VALID != 0 && backend.vip_id == vip.vip_id
}

#[inline(always)]
pub fn maglev_pick(vip: &VipMeta, hash: u32) -> u32 {
    slot_id(vip.table_offset.wrapping_add(hash % vip.table_size))
}

/// The backend id in slot `slot` of `MAGLEV_SLOTS` (0: none).
#[inline(always)]
fn slot_id(slot: u32) -> u32 {
    MAGLEV_SLOTS
        .get(slot / SLOTS_PER_ELEMENT)
        .map_or(0, |pair| pair[(slot % SLOTS_PER_ELEMENT) as usize])
}

/// Whether this CPU may record one more new flow this second.
#[inline(always)]
fn insert_allowed(cfg: &Settings, now: u64) -> bool {
    if cfg.max_new_flows_per_sec == 0 {
        return true;
    }
    let Some(budget) = INSERT_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    unsafe {
        if now.wrapping_sub((*budget).window_start_ns) >= 1_000_000_000 {
            (*budget).window_start_ns = now;
            (*budget).inserted = 0;
        }
        if (*budget).inserted >= cfg.max_new_flows_per_sec as u64 {
            return false;
        }
        (*budget).inserted += 1;
    }
    true
}

/// Records `flow` -> `entry` unless this CPU's new-flow budget is spent.
/// `recorded` gives the flow's entry when it may have one (a SYN of a flow
/// already recorded: a retransmitted SYN, a reused port; a stale entry):
/// it is rewritten where it is, since a lookup costs a fraction of an
/// update, which allocates, links and frees an element. The time word
/// first: a packet of the same flow read on another CPU meanwhile sees the
/// new time (no second hop) with the old or the new backend, both valid
/// choices.
#[inline(always)]
pub fn record_flow(
    cfg: &Settings,
    now: u64,
    flow: &FlowKey,
    entry: &ConnEntry,
    bytes: u64,
    recorded: impl FnOnce() -> Option<*mut ConnEntry>,
) {
    if !insert_allowed(cfg, now) {
        count(Reason::ConntrackInsertSkipped, bytes);
        return;
    }
    match recorded() {
        // SAFETY: an LRU value, valid for this program run.
        Some(slot) => unsafe {
            (*slot).atime_ns = entry.atime_ns;
            (*slot).hash = entry.hash;
            (*slot).backend_id = entry.backend_id;
        },
        // A full LRU evicts its oldest entry; failure here only costs state.
        None => {
            let _ = CONNTRACK.insert(flow, entry, 0);
        }
    }
}

/// Connection table first (unless a SYN, which always takes the table's
/// current answer), then the Maglev table; records the choice except for
/// RST. The flow is hashed only when the connection table does not already
/// hold its hash.
/// `conntrack_missed`: the fast path has just looked the flow up in vain.
#[inline(always)]
fn choose_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    cfg: &Settings,
    bytes: u64,
    conntrack_missed: bool,
) -> Option<Chosen> {
    let mut clock = Clock::NOT_READ;
    if pkt.is_fragment {
        count(Reason::Fragment, bytes);
        let hash = flow_hash(&pkt.flow, cfg.hash_seed);
        let id = maglev_pick(vip, hash);
        return backend_for(id, vip).map(|backend| Chosen {
            id,
            backend,
            hash,
            second: 0,
        });
    }
    let is_icmp_error = pkt.icmp == ICMP_ERROR;
    if is_icmp_error {
        count(Reason::IcmpErrorForwarded, bytes);
    }
    let is_syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let is_udp = pkt.flow.proto == PROTO_UDP && !is_icmp_error;
    if is_udp
        && vip.flags & VIP_F_QUIC != 0
        && let Some(id) = quic_server(ctx, pkt, vip, bytes)
        && let Some(backend) = quic_backend(id, vip, bytes)
    {
        // Routed by its connection ID, whatever the client's address now:
        // the connection table is neither read nor written.
        return Some(Chosen {
            id,
            backend,
            hash: flow_hash(&pkt.flow, cfg.hash_seed),
            second: 0,
        });
    }
    // The flow's entry when it has one that cannot be used (a failed
    // backend, an idle UDP flow): rewritten in place below.
    let mut stale: Option<*mut ConnEntry> = None;
    if !is_syn
        && !conntrack_missed
        && let Some(entry) = CONNTRACK.get_ptr_mut(&pkt.flow)
    {
        stale = Some(entry);
        // SAFETY: LRU values stay valid for this program run; a racing update
        // can at worst give another valid backend id.
        let (id, stored, atime) =
            unsafe { ((*entry).backend_id, (*entry).hash, (*entry).atime_ns) };
        if let Some(backend) = backend_for(id, vip) {
            let mut fresh = true;
            if is_udp {
                let now = clock.now();
                let idle = now.wrapping_sub(atime);
                fresh = idle <= cfg.udp_idle_timeout_ns;
                if fresh && idle > ATIME_REFRESH_NS {
                    unsafe { (*entry).atime_ns = now };
                }
            }
            if fresh {
                count(Reason::ConntrackHit, bytes);
                let hash = if stored != 0 {
                    stored
                } else {
                    flow_hash(&pkt.flow, cfg.hash_seed)
                };
                // Recorded on a second chance: the same two hops every time.
                let mut second = 0;
                if atime & CONN_SECOND_HOP != 0 {
                    second = second_hop(vip, ((atime >> 32) as u32) & 0x7fff_ffff, id);
                    if second != 0 {
                        count(Reason::SecondChance, bytes);
                    }
                }
                return Some(Chosen {
                    id,
                    backend,
                    hash,
                    second,
                });
            }
        }
    }
    count(Reason::ConntrackMiss, bytes);
    let hash = flow_hash(&pkt.flow, cfg.hash_seed);
    let id = maglev_pick(vip, hash);
    let backend = backend_for(id, vip)?;
    // A TCP segment of a flow this instance never saw, mid-connection: its
    // connection may live on the slot's previous owner.
    let second = if pkt.flow.proto == PROTO_TCP && !is_syn && !is_icmp_error {
        previous_owner(vip, hash, id)
    } else {
        0
    };
    if second != 0 {
        count(Reason::SecondChance, bytes);
    }
    if pkt.tcp_flags & TCP_RST == 0 && !is_icmp_error {
        // RSTs and ICMP errors end or report on a flow: never recorded. A
        // second chance is recorded with both hops (which of the two has
        // the connection is known only at the backends), so the flow keeps
        // them here whatever later table changes do.
        if second == 0 {
            count_new_flow(id, bytes);
        }
        let now = clock.now();
        let entry = if second == 0 {
            ConnEntry {
                backend_id: id,
                hash,
                atime_ns: now,
            }
        } else {
            ConnEntry::with_second_hop(id, second, hash, now)
        };
        record_flow(cfg, now, &pkt.flow, &entry, bytes, || {
            if is_syn {
                CONNTRACK.get_ptr_mut(&pkt.flow)
            } else {
                stale
            }
        });
    }
    Some(Chosen {
        id,
        backend,
        hash,
        second,
    })
}

/// A QUIC VIP's datagram: the backend id its short header's connection ID
/// names (`lb_common::quic_lb`), or `None` (long header, no known server
/// id), counted either way.
#[inline(always)]
fn quic_server(ctx: &XdpContext, pkt: &Packet, vip: &VipMeta, bytes: u64) -> Option<u32> {
    let (config_id, sid_len, cid_len) = flag_params(vip.flags);
    let len = pkt.udp_payload_len as usize;
    let at = pkt.udp_payload as usize;
    // The first octet with the one before it (the UDP checksum's last): a
    // one-octet bounds check compiles to a form the verifier does not
    // credit with any length. The offset is bounded well under 64 KiB
    // first: the verifier credits no bounds check whose pointer may lie
    // past 0xFFFF (a linear XDP frame never reaches that far).
    let first = if len == 0 || at >= MAX_LINEAR_OFFSET {
        None
    } else {
        ptr_at::<[u8; 2]>(ctx, at - 1)
    };
    let Some(first) = first else {
        count(Reason::QuicUnknownServer, bytes);
        return None;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*first)[1] } & 0x80 != 0 {
        count(Reason::QuicLongHeader, bytes);
        return None;
    }
    let head = if len < 1 + cid_len as usize || len < SHORT_HEADER_READ {
        None
    } else {
        ptr_at::<[u8; SHORT_HEADER_READ]>(ctx, at)
    };
    // SAFETY: bounds checked by ptr_at.
    let key = head.map(|h| unsafe {
        let h = &*h;
        (
            h[1] >> 5,
            QuicServerKey {
                vip_id: vip.vip_id,
                server_id: server_id_of(u32::from_be_bytes([h[2], h[3], h[4], h[5]]), sid_len),
            },
        )
    });
    // SAFETY: the value is copied out at once.
    let id = match key {
        Some((config, key)) if config == config_id => unsafe { QUIC_SERVERS.get(&key) }.copied(),
        _ => None,
    };
    if id.is_none() {
        count(Reason::QuicUnknownServer, bytes);
    }
    id
}

/// The backend a QUIC connection ID named, if it is valid (else the
/// datagram is balanced as any UDP flow).
#[inline(always)]
fn quic_backend(id: u32, vip: &VipMeta, bytes: u64) -> Option<Backend> {
    let backend = backend_for(id, vip);
    count(
        if backend.is_some() {
            Reason::QuicRouted
        } else {
            Reason::QuicServerDown
        },
        bytes,
    );
    backend
}

/// The backend id the VIP's previous table gives the flow's slot, when
/// there is a previous table and it names another backend of this VIP that
/// may have the connection: a valid one, or one removed from the VIP (its
/// address kept, retired). A failed one may not: its connections are lost
/// anyway, and a reset from the new owner beats silence.
#[inline(always)]
fn previous_owner(vip: &VipMeta, hash: u32, current: u32) -> u32 {
    let Some(prev) = PREV_TABLES.get(vip.vip_id) else {
        return 0;
    };
    if prev.size == 0 {
        return 0;
    }
    let id = slot_id(prev.offset.wrapping_add(hash % prev.size));
    second_hop(vip, id, current)
}

/// Backend `id` as the second hop after `current` (0: none): another
/// backend of this VIP, valid or retired (removed, address kept); a failed
/// one is not.
#[inline(always)]
pub fn second_hop(vip: &VipMeta, id: u32, current: u32) -> u32 {
    let usable = |b: &Backend| {
        b.vip_id == vip.vip_id && b.flags & (BACKEND_F_VALID | BACKEND_F_RETIRED) != 0
    };
    if id == current || !BACKENDS.get(id).is_some_and(usable) {
        return 0;
    }
    id
}

/// The outer source address: the configured prefix, varied by flow so
/// receivers spread flows over queues.
#[inline(always)]
pub fn encap_source(cfg: &Settings, v6: bool, hash: u32) -> [u32; 4] {
    if v6 {
        let s6 = cfg.encap_src6_prefix;
        [s6[0], s6[1], s6[2], hash]
    } else {
        [cfg.encap_src_prefix | (hash & !cfg.encap_src_mask), 0, 0, 0]
    }
}

/// The outer layer toward `backend` for a flow of hash `hash`.
#[inline(always)]
pub fn first_layer(cfg: &Settings, vip: &VipMeta, backend: &Backend, hash: u32) -> Outer {
    let v6 = backend.flags & BACKEND_F_IPV6 != 0;
    Outer {
        v6,
        gue: vip.flags & VIP_F_GUE != 0,
        src: encap_source(cfg, v6, hash),
        dst: backend.addr,
        ttl: cfg.outer_ttl,
        hash,
        gue_port: cfg.gue_port,
    }
}

/// The second hop's layer (inside `outer`), for backend `id` (0: none).
#[inline(always)]
pub fn second_layer(cfg: &Settings, outer: &Outer, id: u32) -> Option<Outer> {
    if id == 0 {
        return None;
    }
    BACKENDS.get(id).map(|b| {
        let v6 = b.flags & BACKEND_F_IPV6 != 0;
        Outer {
            v6,
            src: encap_source(cfg, v6, outer.hash),
            dst: b.addr,
            ..*outer
        }
    })
}

/// Encapsulates toward `backend` and sends it on its way.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    chosen: &Chosen,
    cfg: &Settings,
    bytes: u64,
) -> u32 {
    let (backend, backend_id, hash) = (&chosen.backend, chosen.id, chosen.hash);
    let outer = first_layer(cfg, vip, backend, hash);
    let second = second_layer(cfg, &outer, chosen.second);
    let overhead = outer.overhead() + second.as_ref().map_or(0, |s| s.overhead());
    let outer_len = pkt.ip_len.wrapping_add(overhead);
    if cfg.mtu != 0 && outer_len > cfg.mtu {
        return too_big(ctx, pkt, cfg.mtu.wrapping_sub(overhead), bytes);
    }
    let hop = if cfg.flags & SETTINGS_F_NO_FIB != 0 {
        NextHop::NoRoute
    } else {
        cached_next_hop(ctx, &outer, pkt, outer_len, backend_id, cfg)
    };
    // The MACs and the way out first, so that the encapsulation is written
    // in one place (the program carries its code once).
    let (dmac, smac, exit) = match hop {
        NextHop::Resolved {
            smac,
            dmac,
            ifindex,
            ..
        } => {
            let exit = if ifindex as usize == ctx.ingress_ifindex() {
                Exit::Tx
            } else {
                Exit::Redirect(ifindex)
            };
            (dmac, smac, exit)
        }
        NextHop::NoNeighbour => {
            // Keep our own MAC as destination so the kernel accepts the
            // packet, forwards it and resolves the neighbour.
            let Some((our_mac, peer_mac)) = ingress_macs(ctx) else {
                return finish(Reason::DropEncapFailed, XDP_DROP, bytes);
            };
            (our_mac, peer_mac, Exit::Kernel)
        }
        NextHop::TooBig { mtu } => return too_big(ctx, pkt, mtu.wrapping_sub(overhead), bytes),
        NextHop::NoRoute => {
            if cfg.flags & SETTINGS_F_GATEWAY_MAC == 0 {
                return finish(Reason::DropNoRoute, XDP_DROP, bytes);
            }
            let Some((our_mac, _)) = ingress_macs(ctx) else {
                return finish(Reason::DropEncapFailed, XDP_DROP, bytes);
            };
            (cfg.gateway_mac, our_mac, Exit::Gateway)
        }
    };
    // Asked twice rather than carried across the encapsulation: a flag
    // live through it would double what the verifier explores.
    if capture::wanted(vip.vip_id, backend_id) {
        capture::record(ctx, CAPTURE_IN);
    }
    let written = match &second {
        None => encapsulate(ctx, pkt, &outer, &dmac, &smac),
        Some(s) => encapsulate_nested(ctx, pkt, &outer, s, &dmac, &smac),
    };
    if written.is_err() {
        return finish(Reason::DropEncapFailed, XDP_DROP, bytes);
    }
    if capture::wanted(vip.vip_id, backend_id) {
        capture::record(ctx, CAPTURE_OUT);
    }
    match exit {
        Exit::Tx => finish(Reason::Tx, XDP_TX, bytes),
        Exit::Redirect(ifindex) => {
            count(Reason::Redirect, bytes);
            // SAFETY: helper takes plain integers.
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
        Exit::Kernel => finish(Reason::PassNoNeighbour, XDP_PASS, bytes),
        Exit::Gateway => {
            count(Reason::FibFallbackGateway, bytes);
            finish(Reason::Tx, XDP_TX, bytes)
        }
    }
}

/// How an encapsulated packet leaves.
enum Exit {
    Tx,
    Redirect(u32),
    /// To the kernel, which resolves the neighbour and forwards it.
    Kernel,
    /// XDP_TX to the configured gateway MAC (no route in the FIB).
    Gateway,
}

/// Whether a cached FIB answer may be used for a packet of `outer_len`
/// bytes that came in on `ingress`: fresh (expiring within one TTL from
/// now, not from another clock), looked up for that interface, and the
/// packet fits its MTU.
#[inline(always)]
pub fn usable_next_hop(e: &NextHopCache, now: u64, ttl: u64, ingress: u32, outer_len: u16) -> bool {
    e.expires_jiffies.wrapping_sub(now).wrapping_sub(1) < ttl
        && e.ingress_ifindex == ingress
        && outer_len as u32 <= e.mtu
}

/// The next hop toward a backend: this CPU's cached FIB answer while fresh
/// and the packet fits its MTU, else a FIB lookup (cached when it succeeds).
#[inline(always)]
fn cached_next_hop(
    ctx: &XdpContext,
    outer: &Outer,
    pkt: &Packet,
    outer_len: u16,
    backend_id: u32,
    cfg: &Settings,
) -> NextHop {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: helper with no arguments (inlined by the verifier as a load).
    let now = unsafe { bpf_jiffies64() };
    let ttl = cfg.nexthop_ttl();
    let slot = NEXTHOP_CACHE.get_ptr_mut(backend_id);
    if let Some(entry) = slot {
        // SAFETY: this CPU's slot of a per-CPU array.
        let e = unsafe { &*entry };
        if usable_next_hop(e, now, ttl, ingress, outer_len) {
            return NextHop::Resolved {
                smac: e.smac,
                dmac: e.dmac,
                ifindex: e.ifindex,
                mtu: e.mtu,
            };
        }
    }
    let hop = lookup_next_hop(ctx, outer, pkt, outer_len);
    if let (
        NextHop::Resolved {
            smac,
            dmac,
            ifindex,
            mtu,
        },
        Some(entry),
    ) = (&hop, slot)
        && *mtu != 0
    {
        // SAFETY: as above.
        unsafe {
            *entry = NextHopCache {
                smac: *smac,
                dmac: *dmac,
                ifindex: *ifindex,
                mtu: *mtu,
                ingress_ifindex: ingress,
                expires_jiffies: now + ttl,
            };
        }
    }
    hop
}
