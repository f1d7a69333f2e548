//! The fast path: a packet of the common shape, decided in straight-line
//! code that reads the headers in place (no `Packet` to fill and copy).
//!
//! It takes an Ethernet frame without VLAN tag carrying IPv4 without
//! options or IPv6 without extension headers, not a fragment, with TCP or
//! UDP, either to no VIP address (passed), or to a VIP port where it finds
//! a usable backend of the packet's family whose next hop is cached and
//! that no capture wants: by the flow's connection table entry, or for a
//! SYN (which always takes the Maglev table's answer) by the VIP's table,
//! then recorded. Anything else, and every check that fails, returns
//! `GENERAL`: the general path (`balancer::process`) then decides the
//! packet from its first byte. So this path only ever makes the decision
//! the general path would make, and commits (counters, the packet's bytes,
//! a SYN's entry) only once it is sure of it; the differential fuzzer
//! holds both to the reference model.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    flow_hash::flow_hash,
    maps::{
        BACKEND_F_IPV6, Backend, CONN_SECOND_HOP, ConnEntry, FAMILY_IPV4, FAMILY_IPV6, FlowKey,
        Reason, VIP_F_QUIC, VIP_KIND_PORT, VipMeta,
    },
    settings::{SETTINGS_F_NO_FIB, Settings},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    balancer::{
        ATIME_REFRESH_NS, backend_for, exact_vip_key, finish, first_layer, maglev_pick,
        maybe_vip_address, record_flow, second_hop, second_layer, serves, usable_next_hop,
    },
    capture,
    encap::{ETH_P_IP_BE, ETH_P_IPV6_BE, Inner, Outer, write_outer},
    maps::{BACKENDS, CONNTRACK, FAST_HINT, NEXTHOP_CACHE, VIPS, VIPS_BY_ID, settings},
    parse::{IP_DF, IP_MF, IP_OFFSET, TCP_ACK, TCP_RST, TCP_SYN, folds_to_ffff, ptr_at},
    stats::{count, count_backend, count_new_flow, count_vip},
};

/// "Not decided here": the general path takes the packet.
pub const GENERAL: u32 = u32::MAX;
/// As `GENERAL`, with this CPU's `FAST_HINT` filled in for this packet: the
/// general path skips the lookups already made.
pub const GENERAL_HINTED: u32 = u32::MAX - 1;

/// Frame bytes the IPv4 fast path reads: Ethernet, IPv4, a TCP header
/// (a UDP header and its first 12 payload bytes). Shorter frames (tiny UDP
/// datagrams on links that do not pad to 60 bytes) take the general path.
const V4_READ: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;
/// The same for IPv6.
const V6_READ: usize = EthHdr::LEN + Ipv6Hdr::LEN + TcpHdr::LEN;

/// What the decision and the encapsulation need from the headers.
struct Headers {
    flow: FlowKey,
    /// The IP datagram's length, header included.
    ip_len: u16,
    inner: Inner,
    /// A TCP SYN without ACK or RST: a flow to record.
    syn: bool,
}

/// The backend a packet goes to, and how it was found.
struct Choice<'a> {
    vip: &'a VipMeta,
    backend: &'a Backend,
    id: u32,
    hash: u32,
    /// The second hop recorded with a tracked flow (0: none).
    second: u32,
    /// A SYN's: a flow to record.
    new: bool,
    /// A SYN's flow's entry, if it has one: rewritten in place.
    recorded: Option<*mut ConnEntry>,
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let mut h = Headers {
        flow: FlowKey::default(),
        ip_len: 0,
        inner: Inner {
            tos: 0,
            ip_id: 0,
            dont_fragment: true,
        },
        syn: false,
    };
    if !read_headers(ctx, &mut h) {
        return GENERAL;
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let flow = &h.flow;
    if !maybe_vip_address(&flow.dst, flow.family) {
        return finish(Reason::PassNotVip, XDP_PASS, bytes);
    }
    let cfg = settings();
    // Each kind with its own copy of what follows: straight-line code.
    if h.syn {
        new_flow(ctx, &h, cfg, bytes)
    } else {
        tracked_flow(ctx, &h, cfg, bytes)
    }
}

/// Encapsulates toward the chosen backend when its way out is cached, and
/// commits: counters, and a SYN's flow recorded (`new`). Else leaves the
/// packet to the general path.
#[inline(always)]
fn forward(ctx: &XdpContext, h: &Headers, c: Choice<'_>, cfg: &Settings, bytes: u64) -> u32 {
    let flow = &h.flow;
    let (vip, backend, id) = (c.vip, c.backend, c.id);
    let v6 = flow.family == FAMILY_IPV6;
    if (backend.flags & BACKEND_F_IPV6 != 0) != v6 || cfg.flags & SETTINGS_F_NO_FIB != 0 {
        return hint(flow, false);
    }
    let outer = first_layer(cfg, vip, backend, c.hash);
    let second_outer = second_layer(cfg, &outer, c.second);
    let overhead = outer.overhead() + second_outer.as_ref().map_or(0, |s| s.overhead());
    let outer_len = h.ip_len.wrapping_add(overhead);
    if cfg.mtu != 0 && outer_len > cfg.mtu {
        return hint(flow, false);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(hop) = NEXTHOP_CACHE.get(id) else {
        return hint(flow, false);
    };
    // SAFETY: helper with no arguments (inlined by the verifier as a load).
    let now = unsafe { bpf_jiffies64() };
    if !usable_next_hop(hop, now, cfg.nexthop_ttl(), ingress, outer_len)
        || capture::wanted(vip.vip_id, id)
    {
        return hint(flow, false);
    }
    if c.new {
        // Decided: recorded as the general path records a SYN.
        count(Reason::ConntrackMiss, bytes);
        count_new_flow(id, bytes);
        // SAFETY: helper with no arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let entry = ConnEntry {
            backend_id: id,
            hash: c.hash,
            atime_ns: now,
        };
        record_flow(cfg, now, flow, &entry, bytes, || c.recorded);
    } else {
        count(Reason::ConntrackHit, bytes);
    }
    // Decided: the general path would count and send the same.
    count_vip(vip.vip_id, bytes);
    if c.second != 0 {
        count(Reason::SecondChance, bytes);
    }
    count_backend(id, bytes);
    let (dmac, smac, ifindex) = (hop.dmac, hop.smac, hop.ifindex);
    let written = encapsulate(
        ctx,
        h.inner,
        &outer,
        second_outer.as_ref(),
        h.ip_len,
        &dmac,
        &smac,
    );
    if written.is_err() {
        return finish(Reason::DropEncapFailed, XDP_DROP, bytes);
    }
    if ifindex == ingress {
        return finish(Reason::Tx, XDP_TX, bytes);
    }
    count(Reason::Redirect, bytes);
    // SAFETY: helper takes plain integers.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// A tracked flow: its backend from its connection table entry, its VIP
/// found through that backend with array reads. The VIP whose own key is
/// this packet's is the one the general path's exact `VIPS` lookup finds
/// (userspace keeps `VIPS_BY_ID` a copy of `VIPS`). A read racing an
/// update may mix two values: the key and the id must still match, and
/// only switches of this packet's decision are used.
#[inline(always)]
fn tracked_flow(ctx: &XdpContext, h: &Headers, cfg: &Settings, bytes: u64) -> u32 {
    let flow = &h.flow;
    let Some(entry) = CONNTRACK.get_ptr_mut(flow) else {
        return hint(flow, true);
    };
    // SAFETY: LRU values stay valid for this program run.
    let (id, hash, atime) = unsafe { ((*entry).backend_id, (*entry).hash, (*entry).atime_ns) };
    let Some(backend) = BACKENDS.get(id).copied() else {
        return hint(flow, false);
    };
    let Some(by_id) = VIPS_BY_ID.get(backend.vip_id) else {
        return hint(flow, false);
    };
    let vip = by_id.meta;
    let k = &by_id.key;
    if k.addr != flow.dst
        || k.port != flow.dport
        || k.proto != flow.proto
        || k.kind != VIP_KIND_PORT
        || k.family != flow.family
        || !serves(&backend, &vip)
    {
        return hint(flow, false);
    }
    let udp = flow.proto == PROTO_UDP;
    // Entries without their hash (an older program's) are the general
    // path's; so are UDP entries with the second-hop mark (never written).
    let second_hop_mark = atime & CONN_SECOND_HOP != 0;
    if vip.table_size == 0
        || (udp && vip.flags & VIP_F_QUIC != 0)
        || hash == 0
        || (udp && second_hop_mark)
    {
        return hint(flow, false);
    }
    if udp {
        // SAFETY: helper with no arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let idle = now.wrapping_sub(atime);
        if idle > cfg.udp_idle_timeout_ns {
            return hint(flow, false);
        }
        if idle > ATIME_REFRESH_NS {
            // SAFETY: as above. The general path would write the same.
            unsafe { (*entry).atime_ns = now };
        }
    }
    // Recorded on a second chance: the same two hops every time.
    let second = if second_hop_mark {
        second_hop(&vip, ((atime >> 32) as u32) & 0x7fff_ffff, id)
    } else {
        0
    };
    let c = Choice {
        vip: &vip,
        backend: &backend,
        id,
        hash,
        second,
        new: false,
        recorded: None,
    };
    forward(ctx, h, c, cfg, bytes)
}

/// A SYN: its VIP by the packet's exact key, its backend by the VIP's
/// Maglev table (as the general path, for which a SYN never reads the
/// connection table: it takes the table's current answer).
#[inline(always)]
fn new_flow(ctx: &XdpContext, h: &Headers, cfg: &Settings, bytes: u64) -> u32 {
    let flow = &h.flow;
    // SAFETY: copied out at once; userspace replaces values, never mutates them.
    let Some(vip) = (unsafe { VIPS.get(&exact_vip_key(flow)) }).copied() else {
        return GENERAL;
    };
    if vip.table_size == 0 {
        return leave(&vip, false);
    }
    let hash = flow_hash(flow, cfg.hash_seed);
    let id = maglev_pick(&vip, hash);
    // The flow's entry (a retransmitted SYN, a reused port), looked up
    // while the slot read is still on its way from memory: the two cache
    // misses of a new flow overlap (0.94 of looking it up when recording).
    let recorded = CONNTRACK.get_ptr_mut(flow);
    let Some(backend) = backend_for(id, &vip) else {
        return leave(&vip, false);
    };
    let c = Choice {
        recorded,
        vip: &vip,
        backend: &backend,
        id,
        hash,
        second: 0,
        new: true,
    };
    forward(ctx, h, c, cfg, bytes)
}

/// Leaves the packet to the general path with what was learnt: the VIP of
/// the packet's exact key, and whether the connection table missed (else
/// the general path looks again: it needs the entry). The VIP comes from
/// `VIPS` (whose values are replaced whole), never from `VIPS_BY_ID`: the
/// general path uses all of it. Without an exact key: no hint.
#[inline(always)]
fn hint(flow: &FlowKey, conntrack_missed: bool) -> u32 {
    // SAFETY: copied out at once; userspace replaces values, never mutates them.
    match unsafe { VIPS.get(&exact_vip_key(flow)) } {
        Some(vip) => leave(vip, conntrack_missed),
        None => GENERAL,
    }
}

/// `hint` with the packet's VIP as read from `VIPS`.
#[inline(always)]
fn leave(vip: &VipMeta, conntrack_missed: bool) -> u32 {
    let Some(slot) = FAST_HINT.get_ptr_mut(0) else {
        return GENERAL;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    unsafe {
        (*slot).vip = *vip;
        (*slot).conntrack_missed = conntrack_missed;
    }
    GENERAL_HINTED
}

/// Reads a frame of the fast path's shape into `h`; false for any other
/// (and for every frame the general path would call malformed).
#[inline(always)]
fn read_headers(ctx: &XdpContext, h: &mut Headers) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    let packet_len = ctx.data_end() - ctx.data();
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    let l4;
    if ether_type == ETH_P_IP_BE {
        let Some(ip) = ptr_at::<[u8; V4_READ - EthHdr::LEN]>(ctx, EthHdr::LEN) else {
            return false;
        };
        // SAFETY: as above; an IPv4 header without options.
        let ip = unsafe { &*(ip as *const Ipv4Hdr) };
        let ip_len = u16::from_be_bytes(ip.tot_len);
        if ip.vihl != 0x45
            || (ip_len as usize) < Ipv4Hdr::LEN
            || EthHdr::LEN + ip_len as usize > packet_len
        {
            return false;
        }
        // SAFETY: the header's five words, bounds checked above.
        let w = unsafe { *(ip as *const Ipv4Hdr as *const [u32; 5]) };
        let sum = w[0] as u64 + w[1] as u64 + w[2] as u64 + w[3] as u64 + w[4] as u64;
        let frags = u16::from_be_bytes(ip.frags);
        if !folds_to_ffff(sum) || frags & (IP_MF | IP_OFFSET) != 0 {
            return false;
        }
        h.flow.src[0] = u32::from_ne_bytes(ip.src_addr);
        h.flow.dst[0] = u32::from_ne_bytes(ip.dst_addr);
        h.flow.proto = ip.proto;
        h.flow.family = FAMILY_IPV4;
        h.ip_len = ip_len;
        h.inner = Inner {
            tos: ip.tos,
            ip_id: u16::from_ne_bytes(ip.id),
            dont_fragment: frags & IP_DF != 0,
        };
        l4 = Ipv4Hdr::LEN;
    } else if ether_type == ETH_P_IPV6_BE {
        let Some(ip) = ptr_at::<[u8; V6_READ - EthHdr::LEN]>(ctx, EthHdr::LEN) else {
            return false;
        };
        // SAFETY: as above.
        let ip = unsafe { &*(ip as *const Ipv6Hdr) };
        let ip_len = Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
        if ip.vcf[0] >> 4 != 6 || EthHdr::LEN + ip_len > packet_len || ip_len > 0xFFFF {
            return false;
        }
        // SAFETY: the addresses are 16 bytes, read as four words.
        unsafe {
            h.flow.src = core::mem::transmute::<[u8; 16], [u32; 4]>(ip.src_addr);
            h.flow.dst = core::mem::transmute::<[u8; 16], [u32; 4]>(ip.dst_addr);
        }
        h.flow.proto = ip.next_hdr;
        h.flow.family = FAMILY_IPV6;
        h.ip_len = ip_len as u16;
        h.inner.tos = (u32::from_be_bytes(ip.vcf) >> 20) as u8;
        l4 = Ipv6Hdr::LEN;
    } else {
        return false;
    }
    let ip_len = h.ip_len as usize;
    // The transport header lies within the bytes read (bounds checked).
    let at = EthHdr::LEN + l4;
    let Some(ports) = ptr_at::<[u8; TcpHdr::LEN]>(ctx, at) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let t = unsafe { &*ports };
    match h.flow.proto {
        PROTO_TCP => {
            let doff = ((t[12] >> 4) as usize) * 4;
            if ip_len < l4 + TcpHdr::LEN || doff < TcpHdr::LEN || l4 + doff > ip_len {
                return false;
            }
            // A SYN with RST set is no flow to record: the general path's.
            let flags = t[13];
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                if flags & TCP_RST != 0 {
                    return false;
                }
                h.syn = true;
            }
        }
        PROTO_UDP => {
            let ulen = u16::from_be_bytes([t[4], t[5]]) as usize;
            if ip_len < l4 + UdpHdr::LEN || ulen < UdpHdr::LEN || l4 + ulen > ip_len {
                return false;
            }
        }
        _ => return false,
    }
    h.flow.sport = u16::from_ne_bytes([t[0], t[1]]);
    h.flow.dport = u16::from_ne_bytes([t[2], t[3]]);
    true
}

/// Grows the frame by the outer headers and writes them with an Ethernet
/// header without VLAN tag (as the frame came in). With a second hop, its
/// layer goes inside the outer one (as `encap::encapsulate_nested`). The
/// outer layer's family is the packet's (the fast path's condition).
#[inline(always)]
fn encapsulate(
    ctx: &XdpContext,
    inner: Inner,
    outer: &Outer,
    second: Option<&Outer>,
    ip_len: u16,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), ()> {
    let second_overhead = second.map_or(0, |s| s.overhead());
    let overhead = outer.overhead() + second_overhead;
    // SAFETY: the helper only moves ctx->data; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(());
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = *dmac;
        (*eth).src_addr = *smac;
        (*eth).ether_type = if outer.v6 { ETH_P_IPV6_BE } else { ETH_P_IP_BE };
    }
    let Some(second) = second else {
        return write_outer(
            ctx,
            inner,
            outer,
            EthHdr::LEN,
            ip_len,
            outer.proto(outer.v6),
        );
    };
    write_outer(
        ctx,
        inner,
        outer,
        EthHdr::LEN,
        ip_len.wrapping_add(second_overhead),
        outer.proto(second.v6),
    )?;
    let at = EthHdr::LEN + outer.overhead() as usize;
    write_outer(ctx, inner, second, at, ip_len, second.proto(outer.v6))
}
