//! ICMP answers sent by the data path itself: echo replies for VIP
//! addresses, and "fragmentation needed" / "packet too big" when a packet
//! would not fit once encapsulated.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    ICMP_REPLY_TTL as REPLY_TTL, PROTO_ICMP, PROTO_ICMPV6, TOO_BIG_QUOTE_V4 as QUOTE_V4,
    TOO_BIG_QUOTE_V6 as QUOTE_V6,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    encap::{ETH_P_IP_BE, ETH_P_IPV6_BE, fold, ipv4_header_checksum, write_ethernet},
    parse::{Packet, ptr_at},
};

const ICMP_HDR_LEN: usize = 8;

/// Bytes of the datagram a too-big answer to `pkt` quotes.
#[inline(always)]
pub fn quote_len(pkt: &Packet) -> usize {
    if pkt.v6 { QUOTE_V6 } else { QUOTE_V4 }
}

/// RFC 1624: a checksum (host order) after one 16-bit word changed.
#[inline(always)]
fn checksum_update(check: u16, old: u16, new: u16) -> u16 {
    fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// (destination, source) MACs of the packet as it arrived: ours and the sender's.
#[inline(always)]
pub fn ingress_macs(ctx: &XdpContext) -> Option<([u8; 6], [u8; 6])> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { Some(((*eth).dst_addr, (*eth).src_addr)) }
}

/// Turns an echo request into its reply, in place.
#[inline(always)]
pub fn echo_reply(ctx: &XdpContext, pkt: &Packet) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    let icmp = ptr_at::<[u8; 4]>(ctx, pkt.l2_len + pkt.icmp_offset).ok_or(())?;
    // SAFETY: every pointer was bounds-checked by ptr_at.
    unsafe {
        let ours = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = ours;
        let reply_type = if pkt.v6 {
            let ip = ptr_at::<Ipv6Hdr>(ctx, pkt.l2_len).ok_or(())?;
            let src = (*ip).src_addr;
            (*ip).src_addr = (*ip).dst_addr;
            (*ip).dst_addr = src;
            (*ip).hop_limit = REPLY_TTL;
            129
        } else {
            let ip = ptr_at::<Ipv4Hdr>(ctx, pkt.l2_len).ok_or(())?;
            let src = (*ip).src_addr;
            (*ip).src_addr = (*ip).dst_addr;
            (*ip).dst_addr = src;
            let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
            (*ip).ttl = REPLY_TTL;
            let new = u16::from_be_bytes([REPLY_TTL, (*ip).proto]);
            let check = checksum_update(u16::from_be_bytes((*ip).check), old, new);
            (*ip).check = check.to_be_bytes();
            0
        };
        let old = u16::from_be_bytes([(*icmp)[0], (*icmp)[1]]);
        (*icmp)[0] = reply_type;
        let new = u16::from_be_bytes([reply_type, (*icmp)[1]]);
        let check = checksum_update(u16::from_be_bytes([(*icmp)[2], (*icmp)[3]]), old, new);
        let check = check.to_be_bytes();
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    Ok(())
}

/// Replaces the packet by an ICMP "fragmentation needed" (IPv4) or "packet
/// too big" (IPv6) from the VIP to the client that reports `mtu` and quotes
/// the start of the datagram. The caller checked that the datagram is at
/// least a quote long and that the client may be told.
#[inline(always)]
pub fn too_big_reply(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<(), ()> {
    let (ours, peer) = ingress_macs(ctx).ok_or(())?;
    let (hdr_len, quote) = if pkt.v6 {
        (Ipv6Hdr::LEN, QUOTE_V6)
    } else {
        (Ipv4Hdr::LEN, QUOTE_V4)
    };
    let grow = (hdr_len + ICMP_HDR_LEN) as i32;
    // Room for the new IP and ICMP headers; the old datagram, now right
    // after them, becomes the quote once the tail is cut.
    // SAFETY: the helpers only move ctx->data / data_end.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(());
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    let want = (pkt.l2_len + hdr_len + ICMP_HDR_LEN + quote) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len) } != 0 {
        return Err(());
    }
    let src = pkt.flow.dst;
    let dst = pkt.flow.src;
    let icmp_at = pkt.l2_len + hdr_len;
    if pkt.v6 {
        write_ethernet(ctx, pkt, &peer, &ours, ETH_P_IPV6_BE)?;
        let ip = ptr_at::<Ipv6Hdr>(ctx, pkt.l2_len).ok_or(())?;
        let msg = ptr_at::<[u8; ICMP_HDR_LEN + QUOTE_V6]>(ctx, icmp_at).ok_or(())?;
        let icmp_len = (ICMP_HDR_LEN + QUOTE_V6) as u32;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *ip = Ipv6Hdr {
                vcf: (6u32 << 28).to_be_bytes(),
                payload_len: (icmp_len as u16).to_be_bytes(),
                next_hdr: PROTO_ICMPV6,
                hop_limit: REPLY_TTL,
                src_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(src),
                dst_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(dst),
            };
            let m = msg as *mut u8;
            *(m as *mut [u8; 4]) = [2, 0, 0, 0];
            *(m.add(4) as *mut [u8; 4]) = (mtu as u32).to_be_bytes();
        }
        // Pseudo-header: addresses, upper-layer length, next header; summed
        // as native words like bpf_csum_diff does.
        let mut sum: u64 = src[0] as u64
            + src[1] as u64
            + src[2] as u64
            + src[3] as u64
            + dst[0] as u64
            + dst[1] as u64
            + dst[2] as u64
            + dst[3] as u64;
        sum += icmp_len.to_be() as u64 + (PROTO_ICMPV6 as u32).to_be() as u64;
        sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
        sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
        write_icmp_checksum(msg as *mut u8, ICMP_HDR_LEN + QUOTE_V6, sum as u32)
    } else {
        write_ethernet(ctx, pkt, &peer, &ours, ETH_P_IP_BE)?;
        let ip = ptr_at::<Ipv4Hdr>(ctx, pkt.l2_len).ok_or(())?;
        let msg = ptr_at::<[u8; ICMP_HDR_LEN + QUOTE_V4]>(ctx, icmp_at).ok_or(())?;
        let tot_len = (Ipv4Hdr::LEN + ICMP_HDR_LEN + QUOTE_V4) as u16;
        let check = ipv4_header_checksum(0, tot_len, 0, 0, REPLY_TTL, PROTO_ICMP, src[0], dst[0]);
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *ip = Ipv4Hdr {
                vihl: 0x45,
                tos: 0,
                tot_len: tot_len.to_be_bytes(),
                id: [0, 0],
                frags: [0, 0],
                ttl: REPLY_TTL,
                proto: PROTO_ICMP,
                check: check.to_be_bytes(),
                src_addr: src[0].to_ne_bytes(),
                dst_addr: dst[0].to_ne_bytes(),
            };
            let m = msg as *mut u8;
            *(m as *mut [u8; 4]) = [3, 4, 0, 0];
            let mtu = mtu.to_be_bytes();
            *(m.add(4) as *mut [u8; 4]) = [0, 0, mtu[0], mtu[1]];
        }
        write_icmp_checksum(msg as *mut u8, ICMP_HDR_LEN + QUOTE_V4, 0)
    }
}

/// Checksums the ICMP message at `msg` (checksum field zero) with `seed`
/// and stores the result.
#[inline(always)]
fn write_icmp_checksum(msg: *mut u8, len: usize, seed: u32) -> Result<(), ()> {
    // SAFETY: `msg` points at `len` bytes checked by the caller's ptr_at.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, msg as *mut u32, len as u32, seed) };
    if sum < 0 {
        return Err(());
    }
    // Sum of native-order words: the folded value is stored as is.
    let check = fold(sum as u32);
    // SAFETY: as above.
    unsafe { *(msg.add(2) as *mut [u8; 2]) = check.to_ne_bytes() };
    Ok(())
}
