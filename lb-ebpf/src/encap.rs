//! IPv4-in-IPv4 encapsulation and the next hop's Ethernet header.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::PROTO_IPIP;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, vlan::VlanHdr};

use crate::parse::{IP_DF, Ipv4Packet, ptr_at};

const AF_INET: u8 = 2;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const IPV4_HDR_LEN: u16 = 20;

/// The outer header to put in front of the packet.
pub struct OuterIpv4 {
    /// Network byte order.
    pub src: u32,
    pub dst: u32,
    pub ttl: u8,
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
    TooBig,
    /// No usable route.
    NoRoute,
}

#[inline(always)]
pub fn lookup_next_hop(ctx: &XdpContext, outer: &OuterIpv4, pkt: &Ipv4Packet) -> NextHop {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid start.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = PROTO_IPIP;
    params.__bindgen_anon_1.tot_len = pkt.tot_len.wrapping_add(IPV4_HDR_LEN);
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_2.tos = pkt.tos;
    params.__bindgen_anon_3.ipv4_src = outer.src;
    params.__bindgen_anon_4.ipv4_dst = outer.dst;
    // SAFETY: the helper reads and writes only `params`.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => NextHop::Resolved {
            smac: params.smac,
            dmac: params.dmac,
            ifindex: params.ifindex,
            // SAFETY: on success the kernel (5.12+) reports the egress MTU here.
            mtu: unsafe { params.__bindgen_anon_1.mtu_result } as u32,
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => NextHop::NoNeighbour,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => NextHop::TooBig,
        _ => NextHop::NoRoute,
    }
}

/// The IPv4 header checksum of the outer header, from its fields.
#[inline(always)]
fn outer_checksum(
    tos: u8,
    tot_len: u16,
    id_raw: u16,
    frags: u16,
    ttl: u8,
    src: u32,
    dst: u32,
) -> u16 {
    let src = u32::from_be(src);
    let dst = u32::from_be(dst);
    let mut sum: u32 = (0x4500 | tos as u32)
        + tot_len as u32
        + u16::from_be(id_raw) as u32
        + frags as u32
        + ((ttl as u32) << 8 | PROTO_IPIP as u32)
        + (src >> 16)
        + (src & 0xFFFF)
        + (dst >> 16)
        + (dst & 0xFFFF);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// Grows the packet by an outer IPv4 header and writes the Ethernet header
/// (`dmac`/`smac`, keeping a VLAN tag) and the outer header. The inner
/// packet is left byte for byte as it arrived.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    outer: &OuterIpv4,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<(), ()> {
    // SAFETY: the helper only moves ctx->data; pointers are re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_HDR_LEN as i32)) } != 0 {
        return Err(());
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    let tot_len = pkt.tot_len.wrapping_add(IPV4_HDR_LEN);
    // RFC 2003: DF is copied from the inner header.
    let frags = if pkt.dont_fragment { IP_DF } else { 0 };
    // SAFETY: every pointer below was bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = *dmac;
        (*eth).src_addr = *smac;
        if pkt.l2_len == EthHdr::LEN {
            (*eth).ether_type = ETH_P_IP_BE;
        } else {
            (*eth).ether_type = pkt.vlan_proto;
            let vlan = ptr_at::<VlanHdr>(ctx, EthHdr::LEN).ok_or(())?;
            (*vlan).tci = pkt.vlan_tci.to_ne_bytes();
            (*vlan).ether_type = ETH_P_IP_BE;
        }
        let ip = ptr_at::<Ipv4Hdr>(ctx, pkt.l2_len).ok_or(())?;
        let check = outer_checksum(
            pkt.tos, tot_len, pkt.ip_id, frags, outer.ttl, outer.src, outer.dst,
        );
        *ip = Ipv4Hdr {
            vihl: 0x45,
            tos: pkt.tos,
            tot_len: tot_len.to_be_bytes(),
            id: pkt.ip_id.to_ne_bytes(),
            frags: frags.to_be_bytes(),
            ttl: outer.ttl,
            proto: PROTO_IPIP,
            check: check.to_be_bytes(),
            src_addr: outer.src.to_ne_bytes(),
            dst_addr: outer.dst.to_ne_bytes(),
        };
    }
    Ok(())
}
