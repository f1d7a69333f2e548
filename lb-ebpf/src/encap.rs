//! Encapsulation toward a backend (IPv4 or IPv6 outside, IPv4 or IPv6
//! inside, optionally GUE) and the next hop's Ethernet header.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::parse::{IP_DF, Packet, ptr_at};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86DDu16.to_be();

/// The outer headers to put in front of the packet.
pub struct Outer {
    pub v6: bool,
    pub gue: bool,
    /// Network byte order words; IPv4 uses word 0.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub ttl: u8,
    /// The flow hash: GUE source port and IPv6 flow label.
    pub hash: u32,
    /// Network byte order.
    pub gue_port: u16,
}

impl Outer {
    /// Bytes the outer headers add.
    #[inline(always)]
    pub fn overhead(&self) -> u16 {
        (if self.v6 { 40 } else { 20 }) + if self.gue { 8 } else { 0 }
    }

    /// The outer protocol in front of an IP packet of that family.
    #[inline(always)]
    pub fn proto(&self, inner_v6: bool) -> u8 {
        if self.gue {
            PROTO_UDP
        } else if inner_v6 {
            PROTO_IPV6
        } else {
            PROTO_IPIP
        }
    }
}

/// What the outer IP header copies from the inner one.
#[derive(Clone, Copy)]
pub struct Inner {
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// Raw (network order) IPv4 identification; 0 for IPv6.
    pub ip_id: u16,
    /// IPv4 DF (always set for IPv6).
    pub dont_fragment: bool,
}

impl Inner {
    #[inline(always)]
    pub fn of(pkt: &Packet) -> Inner {
        Inner {
            tos: pkt.tos,
            ip_id: pkt.ip_id,
            dont_fragment: pkt.dont_fragment,
        }
    }
}

/// What `bpf_fib_lookup` said about the way to the backend.
pub enum NextHop {
    /// MACs to write and the interface to send out of.
    Resolved {
        smac: [u8; 6],
        dmac: [u8; 6],
        ifindex: u32,
        mtu: u32,
    },
    /// A route exists but the neighbour is not resolved yet.
    NoNeighbour,
    /// The encapsulated packet is larger than the egress MTU.
    TooBig { mtu: u16 },
    /// No usable route.
    NoRoute,
}

#[inline(always)]
pub fn lookup_next_hop(ctx: &XdpContext, outer: &Outer, pkt: &Packet, outer_len: u16) -> NextHop {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid start.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = outer.proto(pkt.v6);
    params.__bindgen_anon_1.tot_len = outer_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    if outer.v6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = outer.src;
        params.__bindgen_anon_4.ipv6_dst = outer.dst;
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_2.tos = pkt.tos;
        params.__bindgen_anon_3.ipv4_src = outer.src[0];
        params.__bindgen_anon_4.ipv4_dst = outer.dst[0];
    }
    // SAFETY: the helper reads and writes only `params`.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    // SAFETY: on success and on FRAG_NEEDED the kernel (5.12+) reports the
    // egress MTU here.
    let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => NextHop::Resolved {
            smac: params.smac,
            dmac: params.dmac,
            ifindex: params.ifindex,
            mtu: mtu as u32,
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => NextHop::NoNeighbour,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => NextHop::TooBig { mtu },
        _ => NextHop::NoRoute,
    }
}

/// Folds a 32-bit one's complement sum to the 16-bit checksum (host order).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// The checksum of an IPv4 header without options, from its fields.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn ipv4_header_checksum(
    tos: u8,
    tot_len: u16,
    id_raw: u16,
    frags: u16,
    ttl: u8,
    proto: u8,
    src: u32,
    dst: u32,
) -> u16 {
    let src = u32::from_be(src);
    let dst = u32::from_be(dst);
    fold(
        (0x4500 | tos as u32)
            + tot_len as u32
            + u16::from_be(id_raw) as u32
            + frags as u32
            + ((ttl as u32) << 8 | proto as u32)
            + (src >> 16)
            + (src & 0xFFFF)
            + (dst >> 16)
            + (dst & 0xFFFF),
    )
}

/// Writes the Ethernet header (`dmac`/`smac`, keeping a VLAN tag) of a
/// packet whose IP header starts at `pkt.l2_len`.
#[inline(always)]
pub fn write_ethernet(
    ctx: &XdpContext,
    pkt: &Packet,
    dmac: &[u8; 6],
    smac: &[u8; 6],
    ether_type_be: u16,
) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = *dmac;
        (*eth).src_addr = *smac;
        if pkt.l2_len == EthHdr::LEN {
            (*eth).ether_type = ether_type_be;
        } else {
            (*eth).ether_type = pkt.vlan_proto;
            let vlan = ptr_at::<VlanHdr>(ctx, EthHdr::LEN).ok_or(())?;
            (*vlan).tci = pkt.vlan_tci.to_ne_bytes();
            (*vlan).ether_type = ether_type_be;
        }
    }
    Ok(())
}

/// Grows the packet by the outer headers and writes them and the Ethernet
/// header. The inner packet is left byte for byte as it arrived.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    outer: &Outer,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), ()> {
    grow(ctx, pkt, outer, outer.overhead(), dmac, smac)?;
    write_outer(
        ctx,
        Inner::of(pkt),
        outer,
        pkt.l2_len,
        pkt.ip_len,
        outer.proto(pkt.v6),
    )
}

/// As `encapsulate`, with a second hop: inside the outer layer (to the
/// current backend) a second layer to the `second` backend, so that what
/// the first backend may send on is an ordinary encapsulated packet. Kept
/// apart from `encapsulate` so that the common path stays as it was.
#[inline(always)]
pub fn encapsulate_nested(
    ctx: &XdpContext,
    pkt: &Packet,
    outer: &Outer,
    second: &Outer,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), ()> {
    let second_overhead = second.overhead();
    grow(
        ctx,
        pkt,
        outer,
        outer.overhead() + second_overhead,
        dmac,
        smac,
    )?;
    // The outer layer carries an IP packet of the second's family.
    let inner_len = pkt.ip_len.wrapping_add(second_overhead);
    write_outer(
        ctx,
        Inner::of(pkt),
        outer,
        pkt.l2_len,
        inner_len,
        outer.proto(second.v6),
    )?;
    let at = pkt.l2_len + outer.overhead() as usize;
    write_outer(
        ctx,
        Inner::of(pkt),
        second,
        at,
        pkt.ip_len,
        second.proto(pkt.v6),
    )
}

/// Makes room for `overhead` bytes of outer headers and writes the
/// Ethernet header for `outer`'s family.
#[inline(always)]
fn grow(
    ctx: &XdpContext,
    pkt: &Packet,
    outer: &Outer,
    overhead: u16,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), ()> {
    // SAFETY: the helper only moves ctx->data; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(());
    }
    let ether_type = if outer.v6 { ETH_P_IPV6_BE } else { ETH_P_IP_BE };
    write_ethernet(ctx, pkt, dmac, smac, ether_type)
}

/// Writes one layer of outer headers (IP, and UDP for GUE) at `at`, in
/// front of `inner_len` bytes of carried IP packet.
#[inline(always)]
pub fn write_outer(
    ctx: &XdpContext,
    inner: Inner,
    outer: &Outer,
    at: usize,
    inner_len: u16,
    proto: u8,
) -> Result<(), ()> {
    let outer_len = inner_len.wrapping_add(outer.overhead());
    let ip_hdr_len;
    if outer.v6 {
        ip_hdr_len = Ipv6Hdr::LEN;
        let ip = ptr_at::<Ipv6Hdr>(ctx, at).ok_or(())?;
        let vcf: u32 = 6 << 28 | (inner.tos as u32) << 20 | (outer.hash & 0xFFFFF);
        // SAFETY: bounds checked by ptr_at; the addresses are byte arrays.
        unsafe {
            *ip = Ipv6Hdr {
                vcf: vcf.to_be_bytes(),
                payload_len: outer_len.wrapping_sub(40).to_be_bytes(),
                next_hdr: proto,
                hop_limit: outer.ttl,
                src_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(outer.src),
                dst_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(outer.dst),
            };
        }
    } else {
        ip_hdr_len = Ipv4Hdr::LEN;
        // RFC 2003: DF copied from an inner IPv4 header; IPv6 inside is
        // never fragmented on the way (RFC 4213).
        let frags = if inner.dont_fragment { IP_DF } else { 0 };
        let ip = ptr_at::<Ipv4Hdr>(ctx, at).ok_or(())?;
        let check = ipv4_header_checksum(
            inner.tos,
            outer_len,
            inner.ip_id,
            frags,
            outer.ttl,
            proto,
            outer.src[0],
            outer.dst[0],
        );
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *ip = Ipv4Hdr {
                vihl: 0x45,
                tos: inner.tos,
                tot_len: outer_len.to_be_bytes(),
                id: inner.ip_id.to_ne_bytes(),
                frags: frags.to_be_bytes(),
                ttl: outer.ttl,
                proto,
                check: check.to_be_bytes(),
                src_addr: outer.src[0].to_ne_bytes(),
                dst_addr: outer.dst[0].to_ne_bytes(),
            };
        }
    }
    if outer.gue {
        let udp = ptr_at::<UdpHdr>(ctx, at + ip_hdr_len).ok_or(())?;
        let sport = 0xC000 | (outer.hash & 0x3FFF) as u16;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *udp = UdpHdr {
                src: sport.to_be_bytes(),
                dst: outer.gue_port.to_ne_bytes(),
                len: inner_len.wrapping_add(8).to_be_bytes(),
                // Zero: allowed for tunnels over IPv6 too (RFC 6935/6936).
                check: [0, 0],
            };
        }
    }
    Ok(())
}
