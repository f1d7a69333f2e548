//! The bytes the data path writes: outer headers and ICMP answers.

use std::{vec, vec::Vec};

use crate::{
    ICMP_REPLY_TTL, PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6, PROTO_UDP, TOO_BIG_QUOTE_V4,
    TOO_BIG_QUOTE_V6, maps::Addr,
};

use super::parse::{ParsedIp, be16};

/// RFC 1071 checksum of `bytes` (plus an initial partial sum).
pub fn checksum_with(initial: u32, bytes: &[u8]) -> u16 {
    let mut sum: u64 = initial as u64;
    for c in bytes.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// RFC 1071 checksum of a header.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    checksum_with(0, header)
}

/// RFC 1624 incremental update of a checksum when one 16-bit word changes.
pub fn checksum_update(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// Partial sum of the IPv6 pseudo-header (addresses, length, next header).
pub fn ipv6_pseudo_sum(src: &[u8], dst: &[u8], len: u32, next: u8) -> u32 {
    let mut sum = 0u32;
    for c in src.chunks(2).chain(dst.chunks(2)) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    sum + (len >> 16) + (len & 0xFFFF) + next as u32
}

/// The outer headers toward a backend.
#[derive(Clone, Copy, Debug)]
pub struct Outer {
    pub v6: bool,
    pub gue: bool,
    pub src: Addr,
    pub dst: Addr,
    pub ttl: u8,
    /// GUE source port (host order) and IPv6 flow label source.
    pub hash: u32,
    /// GUE destination port, network byte order.
    pub gue_port: u16,
}

impl Outer {
    pub fn overhead(&self) -> u16 {
        (if self.v6 { 40 } else { 20 }) + if self.gue { 8 } else { 0 }
    }
}

/// GUE source port from the flow hash: the ephemeral range, so receivers
/// spread flows over queues.
pub fn gue_source_port(hash: u32) -> u16 {
    0xC000 | (hash & 0x3FFF) as u16
}

fn ethernet(out: &mut Vec<u8>, pkt: &[u8], p: &ParsedIp, dmac: [u8; 6], smac: [u8; 6], et: u16) {
    out.extend_from_slice(&dmac);
    out.extend_from_slice(&smac);
    if p.l2_len == 18 {
        out.extend_from_slice(&pkt[12..16]);
    }
    out.extend_from_slice(&et.to_be_bytes());
}

/// The encapsulated packet: Ethernet (VLAN tag kept) + outer IP (+ UDP for
/// GUE) + the original IP datagram and anything after it, unchanged.
pub fn encapsulate(pkt: &[u8], p: &ParsedIp, o: &Outer, dmac: [u8; 6], smac: [u8; 6]) -> Vec<u8> {
    encapsulate_nested(pkt, p, o, None, dmac, smac)
}

/// As `encapsulate`, with a second hop: inside the outer layer (to the
/// current backend) a complete encapsulated packet to the second backend,
/// exactly as the balancer would have sent it there.
pub fn encapsulate_nested(
    pkt: &[u8],
    p: &ParsedIp,
    o: &Outer,
    second: Option<&Outer>,
    dmac: [u8; 6],
    smac: [u8; 6],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(pkt.len() + 96);
    ethernet(
        &mut out,
        pkt,
        p,
        dmac,
        smac,
        if o.v6 { 0x86DD } else { 0x0800 },
    );
    let family_proto = |v6: bool| if v6 { PROTO_IPV6 } else { PROTO_IPIP };
    match second {
        None => outer_layer(&mut out, p, o, p.ip_len, family_proto(p.v6)),
        Some(s) => {
            let middle_len = p.ip_len.wrapping_add(s.overhead());
            outer_layer(&mut out, p, o, middle_len, family_proto(s.v6));
            outer_layer(&mut out, p, s, p.ip_len, family_proto(p.v6));
        }
    }
    out.extend_from_slice(&pkt[p.l2_len..]);
    out
}

/// One layer of outer headers in front of `inner_len` bytes of an IP
/// packet whose protocol (without GUE) is `inner_proto`.
fn outer_layer(out: &mut Vec<u8>, p: &ParsedIp, o: &Outer, inner_len: u16, inner_proto: u8) {
    let proto = if o.gue { PROTO_UDP } else { inner_proto };
    let outer_len = inner_len.wrapping_add(o.overhead());
    if o.v6 {
        let vcf: u32 = 6 << 28 | (p.tos as u32) << 20 | (o.hash & 0xFFFFF);
        out.extend_from_slice(&vcf.to_be_bytes());
        out.extend_from_slice(&(outer_len.wrapping_sub(40)).to_be_bytes());
        out.push(proto);
        out.push(o.ttl);
        for w in o.src.iter().chain(&o.dst) {
            out.extend_from_slice(&w.to_ne_bytes());
        }
    } else {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[1] = p.tos;
        ip[2..4].copy_from_slice(&outer_len.to_be_bytes());
        ip[4..6].copy_from_slice(&p.id);
        // RFC 2003: DF copied from an inner IPv4 header; IPv6 inside is
        // never fragmented on the way (RFC 4213).
        ip[6..8].copy_from_slice(&(if p.dont_fragment { 0x4000u16 } else { 0 }).to_be_bytes());
        ip[8] = o.ttl;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&o.src[0].to_ne_bytes());
        ip[16..20].copy_from_slice(&o.dst[0].to_ne_bytes());
        let check = ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        out.extend_from_slice(&ip);
    }
    if o.gue {
        out.extend_from_slice(&gue_source_port(o.hash).to_be_bytes());
        out.extend_from_slice(&o.gue_port.to_ne_bytes());
        out.extend_from_slice(&(inner_len.wrapping_add(8)).to_be_bytes());
        // Zero checksum: allowed for tunnels over IPv6 too (RFC 6935/6936);
        // the inner packet carries its own.
        out.extend_from_slice(&[0, 0]);
    }
}

/// The answer to a packet that is too big once encapsulated: ICMPv4
/// "fragmentation needed" or ICMPv6 "packet too big" from the VIP to the
/// client, quoting the start of the packet, sent back the way it came.
pub fn too_big_reply(pkt: &[u8], p: &ParsedIp, mtu: u16) -> Vec<u8> {
    let our_mac: [u8; 6] = pkt[0..6].try_into().unwrap();
    let peer_mac: [u8; 6] = pkt[6..12].try_into().unwrap();
    let ip = &pkt[p.l2_len..];
    let mut out = Vec::new();
    if p.v6 {
        ethernet(&mut out, pkt, p, peer_mac, our_mac, 0x86DD);
        let quote = &ip[..TOO_BIG_QUOTE_V6];
        let len = 8 + TOO_BIG_QUOTE_V6 as u32;
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&(6u32 << 28).to_be_bytes());
        hdr.extend_from_slice(&(len as u16).to_be_bytes());
        hdr.push(PROTO_ICMPV6);
        hdr.push(ICMP_REPLY_TTL);
        hdr.extend_from_slice(&ip[24..40]);
        hdr.extend_from_slice(&ip[8..24]);
        let mut icmp = vec![2, 0, 0, 0];
        icmp.extend_from_slice(&(mtu as u32).to_be_bytes());
        icmp.extend_from_slice(quote);
        let sum = ipv6_pseudo_sum(&ip[24..40], &ip[8..24], len, PROTO_ICMPV6);
        let check = checksum_with(sum, &icmp);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&icmp);
    } else {
        ethernet(&mut out, pkt, p, peer_mac, our_mac, 0x0800);
        let quote = &ip[..TOO_BIG_QUOTE_V4];
        let mut hdr = [0u8; 20];
        hdr[0] = 0x45;
        hdr[2..4].copy_from_slice(&((20 + 8 + TOO_BIG_QUOTE_V4) as u16).to_be_bytes());
        hdr[8] = ICMP_REPLY_TTL;
        hdr[9] = PROTO_ICMP;
        hdr[12..16].copy_from_slice(&ip[16..20]);
        hdr[16..20].copy_from_slice(&ip[12..16]);
        let check = ipv4_checksum(&hdr);
        hdr[10..12].copy_from_slice(&check.to_be_bytes());
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&mtu.to_be_bytes());
        icmp.extend_from_slice(quote);
        let check = checksum_with(0, &icmp);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&icmp);
    }
    out
}

/// The echo reply to an echo request to a VIP address: MACs and addresses
/// swapped, TTL/hop limit reset, type changed; checksums are updated
/// incrementally (RFC 1624), so everything else stays byte for byte.
pub fn echo_reply(pkt: &[u8], p: &ParsedIp) -> Vec<u8> {
    let mut out = pkt.to_vec();
    out[0..6].copy_from_slice(&pkt[6..12]);
    out[6..12].copy_from_slice(&pkt[0..6]);
    let l3 = p.l2_len;
    let icmp = l3 + p.icmp_offset;
    if p.v6 {
        out[l3 + 8..l3 + 24].copy_from_slice(&pkt[l3 + 24..l3 + 40]);
        out[l3 + 24..l3 + 40].copy_from_slice(&pkt[l3 + 8..l3 + 24]);
        out[l3 + 7] = ICMP_REPLY_TTL;
        let old = be16(pkt, icmp);
        out[icmp] = 129;
        let check = checksum_update(be16(pkt, icmp + 2), old, be16(&out, icmp));
        out[icmp + 2..icmp + 4].copy_from_slice(&check.to_be_bytes());
    } else {
        out[l3 + 12..l3 + 16].copy_from_slice(&pkt[l3 + 16..l3 + 20]);
        out[l3 + 16..l3 + 20].copy_from_slice(&pkt[l3 + 12..l3 + 16]);
        let old_ttl = be16(pkt, l3 + 8);
        out[l3 + 8] = ICMP_REPLY_TTL;
        let check = checksum_update(be16(pkt, l3 + 10), old_ttl, be16(&out, l3 + 8));
        out[l3 + 10..l3 + 12].copy_from_slice(&check.to_be_bytes());
        let old = be16(pkt, icmp);
        out[icmp] = 0;
        let check = checksum_update(be16(pkt, icmp + 2), old, be16(&out, icmp));
        out[icmp + 2..icmp + 4].copy_from_slice(&check.to_be_bytes());
    }
    out
}
