//! Test packets: built with etherparse, then patched where a case needs
//! something etherparse will not produce (fragments, options, bad lengths).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;
use lb_common::model::ipv4_checksum;

pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Copy, Debug)]
pub enum TcpKind {
    Syn,
    SynAck,
    Ack,
    Rst,
    Fin,
}

/// An Ethernet/IPv4/TCP frame from the router to the LB, with DF.
pub fn tcp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    kind: TcpKind,
    payload: usize,
) -> Vec<u8> {
    let frame = tcp_frame(
        IpAddr::V4(src),
        sport,
        IpAddr::V4(dst),
        dport,
        kind,
        payload,
    );
    set_df(frame, true)
}

fn tcp_frame(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    kind: TcpKind,
    payload: usize,
) -> Vec<u8> {
    let b = ip_step(src, dst).tcp(sport, dport, 0x1000_0000, 65_000);
    let b = match kind {
        TcpKind::Syn => b.syn(),
        TcpKind::SynAck => b.syn().ack(1),
        TcpKind::Ack => b.ack(1),
        TcpKind::Rst => b.rst(),
        TcpKind::Fin => b.fin().ack(1),
    };
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut out = Vec::with_capacity(b.size(payload));
    b.write(&mut out, &body).unwrap();
    out
}

/// An Ethernet/IPv4/UDP frame from the router to the LB.
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
    udp_ip(IpAddr::V4(src), sport, IpAddr::V4(dst), dport, payload)
}

const L3: usize = 14;

/// Recomputes the IPv4 header checksum of the header at `l3`.
pub fn fix_ip_checksum(pkt: &mut [u8], l3: usize) {
    let ihl = (pkt[l3] & 0x0F) as usize * 4;
    pkt[l3 + 10] = 0;
    pkt[l3 + 11] = 0;
    let c = ipv4_checksum(&pkt[l3..l3 + ihl]);
    pkt[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Sets or clears DF (and fixes the checksum).
pub fn set_df(mut pkt: Vec<u8>, df: bool) -> Vec<u8> {
    if df {
        pkt[L3 + 6] |= 0x40;
    } else {
        pkt[L3 + 6] &= !0x40;
    }
    fix_ip_checksum(&mut pkt, L3);
    pkt
}

/// Inserts one 802.1Q tag with VLAN id `vid`.
pub fn with_vlan(pkt: &[u8], vid: u16) -> Vec<u8> {
    let mut out = pkt[..12].to_vec();
    out.extend_from_slice(&0x8100u16.to_be_bytes());
    out.extend_from_slice(&(vid & 0x0FFF).to_be_bytes());
    out.extend_from_slice(&pkt[12..]);
    out
}

/// Adds IPv4 options (padded to 4 bytes with NOPs... then EOL) after the header.
pub fn with_ip_options(pkt: &[u8], options: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let mut out = pkt[..L3 + 20].to_vec();
    out.extend_from_slice(&opts);
    out.extend_from_slice(&pkt[L3 + 20..]);
    let ihl = (20 + opts.len()) / 4;
    out[L3] = 0x40 | ihl as u8;
    let tot = u16::from_be_bytes([out[L3 + 2], out[L3 + 3]]) + opts.len() as u16;
    out[L3 + 2..L3 + 4].copy_from_slice(&tot.to_be_bytes());
    fix_ip_checksum(&mut out, L3);
    out
}

/// Marks the packet as a fragment: `more` sets MF, `offset` in 8-byte units.
pub fn as_fragment(pkt: &[u8], more: bool, offset: u16) -> Vec<u8> {
    let mut out = pkt.to_vec();
    let frags = (if more { 0x2000 } else { 0 }) | (offset & 0x1FFF);
    out[L3 + 6..L3 + 8].copy_from_slice(&frags.to_be_bytes());
    fix_ip_checksum(&mut out, L3);
    out
}

/// Overwrites the IPv4 total length (checksum fixed), for length fuzzing.
pub fn with_total_length(pkt: &[u8], tot_len: u16) -> Vec<u8> {
    let mut out = pkt.to_vec();
    out[L3 + 2..L3 + 4].copy_from_slice(&tot_len.to_be_bytes());
    fix_ip_checksum(&mut out, L3);
    out
}

/// An ARP request (not IPv4).
pub fn arp() -> Vec<u8> {
    let mut out = vec![0xFF; 6];
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&0x0806u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&[10, 100, 0, 1]);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&[10, 100, 0, 2]);
    out
}

fn ip_step(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 61),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 61),
        _ => panic!("mixed address families"),
    }
}

/// An Ethernet/IP/TCP frame of either family (IPv4 with DF, as `tcp`).
pub fn tcp_ip(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    kind: TcpKind,
    payload: usize,
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => tcp(s, sport, d, dport, kind, payload),
        _ => tcp_frame(src, sport, dst, dport, kind, payload),
    }
}

/// An Ethernet/IP/UDP frame of either family.
pub fn udp_ip(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: usize) -> Vec<u8> {
    let b = ip_step(src, dst).udp(sport, dport);
    let body: Vec<u8> = (0..payload).map(|i| (i * 7) as u8).collect();
    let mut out = Vec::with_capacity(b.size(payload));
    b.write(&mut out, &body).unwrap();
    out
}

/// An Ethernet/IP/UDP frame of either family carrying `body`.
pub fn udp_with(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, body: &[u8]) -> Vec<u8> {
    let b = ip_step(src, dst).udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(body.len()));
    b.write(&mut out, body).unwrap();
    out
}

/// A QUIC short-header packet (as a UDP payload) to connection ID `cid`.
pub fn quic_short(cid: &[u8], tail: usize) -> Vec<u8> {
    let mut p = vec![0x43];
    p.extend_from_slice(cid);
    p.extend((0..tail).map(|i| (i * 13) as u8));
    p
}

/// A QUIC v1 Initial (long header) from a client, to connection ID `dcid`.
pub fn quic_initial(dcid: &[u8], tail: usize) -> Vec<u8> {
    let mut p = vec![0xC3, 0, 0, 0, 1, dcid.len() as u8];
    p.extend_from_slice(dcid);
    p.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8]);
    p.extend((0..tail).map(|i| (i * 5) as u8));
    p
}

/// An echo request (ICMP or ICMPv6 by family).
pub fn echo_request(src: IpAddr, dst: IpAddr, id: u16, seq: u16, payload: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let step = ip_step(src, dst);
    let mut out = Vec::new();
    if src.is_ipv4() {
        let b = step.icmpv4_echo_request(id, seq);
        b.write(&mut out, &body).unwrap();
    } else {
        let b = step.icmpv6_echo_request(id, seq);
        b.write(&mut out, &body).unwrap();
    }
    out
}

/// An ICMP error from `from` to `to` that quotes `quoted` (an IP datagram,
/// no Ethernet header): type 3 code 4 (IPv4) or ICMPv6 packet too big.
pub fn icmp_too_big_error(from: IpAddr, to: IpAddr, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let step = ip_step(from, to);
    let mut out = Vec::new();
    if from.is_ipv4() {
        let m = (mtu as u16).to_be_bytes();
        step.icmpv4_raw(3, 4, [0, 0, m[0], m[1]])
            .write(&mut out, quoted)
            .unwrap();
    } else {
        step.icmpv6_raw(2, 0, mtu.to_be_bytes())
            .write(&mut out, quoted)
            .unwrap();
    }
    out
}

/// The IPv6 extension headers `with_ipv6_extensions` can insert.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestinationOptions,
    /// Fragment header: offset (8-byte units) and the M flag.
    Fragment {
        offset: u16,
        more: bool,
    },
}

/// Inserts IPv6 extension headers (in order) between the IPv6 header and
/// the upper-layer header; fixes next-header chain and payload length.
pub fn with_ipv6_extensions(pkt: &[u8], exts: &[Ext]) -> Vec<u8> {
    let l3 = 14;
    let upper = pkt[l3 + 6];
    let mut chain = Vec::new();
    let codes: Vec<u8> = exts
        .iter()
        .map(|e| match e {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::DestinationOptions => 60,
            Ext::Fragment { .. } => 44,
        })
        .collect();
    for (i, e) in exts.iter().enumerate() {
        let next = codes.get(i + 1).copied().unwrap_or(upper);
        match e {
            // 16 bytes: length field 1; PadN fills the options.
            Ext::HopByHop | Ext::DestinationOptions => {
                chain.extend_from_slice(&[next, 1, 1, 12]);
                chain.extend_from_slice(&[0; 12]);
            }
            // Type 0 routing header with no segments left (8 bytes).
            Ext::Routing => chain.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]),
            Ext::Fragment { offset, more } => {
                let of = (offset << 3) | u16::from(*more);
                chain.extend_from_slice(&[next, 0]);
                chain.extend_from_slice(&of.to_be_bytes());
                chain.extend_from_slice(&[0, 0, 0, 42]);
            }
        }
    }
    let mut out = pkt[..l3 + 40].to_vec();
    if let Some(first) = codes.first() {
        out[l3 + 6] = *first;
    }
    let payload_len = u16::from_be_bytes([pkt[l3 + 4], pkt[l3 + 5]]) + chain.len() as u16;
    out[l3 + 4..l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&chain);
    out.extend_from_slice(&pkt[l3 + 40..]);
    out
}

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}
