//! Backend side: strips the outer headers of packets the balancer
//! encapsulated (IPv4 or IPv6 outside, IPv4 or IPv6 inside, IP-in-IP or GUE)
//! so the kernel delivers the inner packet to the VIP on `lo`. This kernel
//! has no ipip/ip6_tunnel/fou modules; hosts that have them can use kernel
//! tunnels instead.

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS, helpers::bpf_xdp_adjust_head, programs::XdpContext,
};
use lb_common::{PROTO_IPIP, PROTO_IPV6, PROTO_UDP, maps::DecapReason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    encap::{ETH_P_IP_BE, ETH_P_IPV6_BE},
    maps::{DECAP_STATS, settings},
    parse::ptr_at,
};

#[inline(always)]
fn count(reason: DecapReason, bytes: u64) -> u32 {
    if let Some(c) = DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    XDP_PASS
}

/// (length of the outer IP header, protocol it carries), or `None` when the
/// frame is not IPv4/IPv6 with a whole outer header.
#[inline(always)]
fn outer_ip(ctx: &XdpContext, ether_type: u16) -> Option<(usize, u8)> {
    if ether_type == ETH_P_IP_BE {
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
        let ihl = ((vihl & 0x0F) as usize) * 4;
        if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return None;
        }
        Some((ihl, proto))
    } else if ether_type == ETH_P_IPV6_BE {
        let ip = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let (v, next) = unsafe { ((*ip).vcf[0] >> 4, (*ip).next_hdr) };
        if v != 6 {
            return None;
        }
        Some((Ipv6Hdr::LEN, next))
    } else {
        None
    }
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return count(DecapReason::PassNotEncapsulated, bytes);
    };
    // SAFETY: bounds checked by ptr_at.
    let (dst, src, ether_type) = unsafe { ((*eth).dst_addr, (*eth).src_addr, (*eth).ether_type) };
    let Some((ip_len, proto)) = outer_ip(ctx, ether_type) else {
        return count(DecapReason::PassNotEncapsulated, bytes);
    };
    let mut strip = ip_len;
    let mut expect_version = 0;
    match proto {
        PROTO_IPIP => expect_version = 4,
        PROTO_IPV6 => expect_version = 6,
        PROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(ctx, EthHdr::LEN + ip_len) else {
                return count(DecapReason::PassNotEncapsulated, bytes);
            };
            // SAFETY: bounds checked by ptr_at.
            if u16::from_ne_bytes(unsafe { (*udp).dst }) != settings().gue_port {
                return count(DecapReason::PassNotEncapsulated, bytes);
            }
            strip += UdpHdr::LEN;
        }
        _ => return count(DecapReason::PassNotEncapsulated, bytes),
    }
    // The inner header must be there and be the IP version announced (GUE
    // variant 1: the version nibble says which).
    let Some(inner) = ptr_at::<u8>(ctx, EthHdr::LEN + strip) else {
        return count(DecapReason::PassMalformed, bytes);
    };
    // SAFETY: bounds checked by ptr_at.
    let version = unsafe { *inner } >> 4;
    if (expect_version != 0 && version != expect_version) || (version != 4 && version != 6) {
        return count(DecapReason::PassMalformed, bytes);
    }
    // SAFETY: moves ctx->data; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return count(DecapReason::PassMalformed, bytes);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = if version == 4 {
            ETH_P_IP_BE
        } else {
            ETH_P_IPV6_BE
        };
    }
    count(DecapReason::Decapsulated, bytes)
}
