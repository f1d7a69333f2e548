//! Backend side: strips the outer IPv4 header of IPIP packets so the kernel
//! delivers the inner packet to the VIP on `lo` (this kernel has no ipip
//! module; hosts that have it can use a kernel tunnel instead).

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS, helpers::bpf_xdp_adjust_head, programs::XdpContext,
};
use lb_common::{PROTO_IPIP, maps::DecapReason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{maps::DECAP_STATS, parse::ptr_at};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

#[inline(always)]
fn count(reason: DecapReason, bytes: u64) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        count(DecapReason::PassNotIpip, bytes);
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let (dst, src, ether_type) = unsafe { ((*eth).dst_addr, (*eth).src_addr, (*eth).ether_type) };
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        count(DecapReason::PassNotIpip, bytes);
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto) = unsafe { ((*outer).vihl, (*outer).proto) };
    if ether_type != ETH_P_IP_BE || proto != PROTO_IPIP {
        count(DecapReason::PassNotIpip, bytes);
        return XDP_PASS;
    }
    let ihl = ((vihl & 0x0F) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        count(DecapReason::PassMalformed, bytes);
        return XDP_PASS;
    }
    // The inner header must be there and be IPv4.
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN + ihl) else {
        count(DecapReason::PassMalformed, bytes);
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*inner).vihl } >> 4 != 4 {
        count(DecapReason::PassMalformed, bytes);
        return XDP_PASS;
    }
    // SAFETY: moves ctx->data; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ihl as i32) } != 0 {
        count(DecapReason::PassMalformed, bytes);
        return XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = ETH_P_IP_BE;
    }
    count(DecapReason::Decapsulated, bytes);
    XDP_PASS
}
