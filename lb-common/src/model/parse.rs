//! The model's header parser: what the data path may read from a frame.

use crate::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    maps::{FAMILY_IPV4, FAMILY_IPV6, FlowKey},
};

/// IPv6 extension headers walked before giving up (hop-by-hop, routing,
/// destination options; a fragment header ends the walk).
pub const MAX_EXTENSION_HEADERS: usize = 4;

/// What an ICMP message means to the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// Not ICMP, or an ICMP message that is not about a VIP flow.
    None,
    /// An echo request (answered if its destination is a VIP address).
    EchoRequest,
    /// An error that quotes a TCP/UDP packet the VIP sent; `flow` is the
    /// quoted flow turned around (client -> VIP), as the VIP received it.
    Error,
}

/// What the model reads from the headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIp {
    /// Ethernet header bytes: 14, or 18 with one VLAN tag.
    pub l2_len: usize,
    pub v6: bool,
    pub flow: FlowKey,
    pub tcp_flags: u8,
    pub is_fragment: bool,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// The IP datagram's length, header included.
    pub ip_len: u16,
    /// IPv4 identification as on the wire (zero for IPv6).
    pub id: [u8; 2],
    /// IPv4 DF (IPv6 packets are never fragmented on the way: true).
    pub dont_fragment: bool,
    pub icmp: IcmpKind,
    /// Offset of the ICMP header from the IP header (ICMP packets only).
    pub icmp_offset: usize,
    /// UDP datagrams (not fragments, not ICMP): the payload's offset from
    /// the IP header and its length (by the UDP length field).
    pub udp_payload: Option<(usize, usize)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelParse {
    /// Neither IPv4 nor IPv6.
    NotIp,
    Malformed,
    Ip(ParsedIp),
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn word(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn addr16(b: &[u8], at: usize) -> [u32; 4] {
    core::array::from_fn(|i| word(b, at + 4 * i))
}

/// Ports (and TCP flags) of a TCP/UDP header at `l4` inside `ip[..ip_len]`.
/// `None` = the header is cut short.
fn ports(ip: &[u8], l4: usize, ip_len: usize, proto: u8) -> Option<(u16, u16, u8)> {
    let need = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return Some((0, 0, 0)),
    };
    if ip_len < l4 + need {
        return None;
    }
    // Lengths inside the transport header must fit the datagram: a TCP
    // data offset below 5 words or past the end, a UDP length below its
    // header or past the end (shorter is allowed: trailing bytes).
    if proto == PROTO_TCP {
        let doff = (ip[l4 + 12] >> 4) as usize * 4;
        if doff < 20 || l4 + doff > ip_len {
            return None;
        }
    } else {
        let ulen = be16(ip, l4 + 4) as usize;
        if ulen < 8 || l4 + ulen > ip_len {
            return None;
        }
    }
    let flags = if proto == PROTO_TCP { ip[l4 + 13] } else { 0 };
    Some((
        u16::from_ne_bytes([ip[l4], ip[l4 + 1]]),
        u16::from_ne_bytes([ip[l4 + 2], ip[l4 + 3]]),
        flags,
    ))
}

/// ICMP types that are errors about a packet we may have sent.
pub fn is_icmp_error(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        matches!(icmp_type, 1..=4)
    } else {
        matches!(icmp_type, 3 | 11 | 12)
    }
}

/// The quoted TCP/UDP flow of an ICMP error at `icmp` (offset in `ip`), as
/// the VIP received it, if the quote is complete enough and its source is
/// `vip` (the error's destination).
fn quoted_flow(ip: &[u8], icmp: usize, ip_len: usize, v6: bool, vip: [u32; 4]) -> Option<FlowKey> {
    let q = icmp + 8;
    let (src, dst, proto, l4) = if v6 {
        if ip_len < q + 40 + 4 || ip[q] >> 4 != 6 {
            return None;
        }
        (addr16(ip, q + 8), addr16(ip, q + 24), ip[q + 6], q + 40)
    } else {
        if ip_len < q + 20 {
            return None;
        }
        let ihl = (ip[q] & 0x0F) as usize * 4;
        let frag_offset = be16(ip, q + 6) & 0x1FFF;
        if ip[q] >> 4 != 4 || ihl < 20 || frag_offset != 0 || ip_len < q + ihl + 4 {
            return None;
        }
        (
            [word(ip, q + 12), 0, 0, 0],
            [word(ip, q + 16), 0, 0, 0],
            ip[q + 9],
            q + ihl,
        )
    };
    if (proto != PROTO_TCP && proto != PROTO_UDP) || src != vip {
        return None;
    }
    Some(FlowKey {
        src: dst,
        dst: src,
        sport: u16::from_ne_bytes([ip[l4 + 2], ip[l4 + 3]]),
        dport: u16::from_ne_bytes([ip[l4], ip[l4 + 1]]),
        proto,
        family: if v6 { FAMILY_IPV6 } else { FAMILY_IPV4 },
        _pad: [0; 2],
    })
}

/// Parses Ethernet (one optional 802.1Q/802.1ad tag), IPv4 or IPv6 (with
/// up to `MAX_EXTENSION_HEADERS` extension headers), TCP/UDP ports and ICMP.
pub fn parse(pkt: &[u8]) -> ModelParse {
    if pkt.len() < 14 {
        return ModelParse::Malformed;
    }
    let mut l2_len = 14;
    let mut ether_type = be16(pkt, 12);
    if ether_type == 0x8100 || ether_type == 0x88A8 {
        if pkt.len() < 18 {
            return ModelParse::Malformed;
        }
        ether_type = be16(pkt, 16);
        l2_len = 18;
    }
    let ip = &pkt[l2_len..];
    let parsed = match ether_type {
        0x0800 => parse_ipv4(ip),
        0x86DD => parse_ipv6(ip),
        _ => return ModelParse::NotIp,
    };
    match parsed {
        Some(mut p) => {
            p.l2_len = l2_len;
            ModelParse::Ip(p)
        }
        None => ModelParse::Malformed,
    }
}

fn parse_ipv4(ip: &[u8]) -> Option<ParsedIp> {
    if ip.len() < 20 {
        return None;
    }
    let ihl = (ip[0] & 0x0F) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let ip_len = be16(ip, 2);
    if (ip_len as usize) < ihl || ip_len as usize > ip.len() {
        return None;
    }
    // A header with its checksum (options included) sums to zero.
    if super::craft::ipv4_checksum(&ip[..ihl]) != 0 {
        return None;
    }
    let frags = be16(ip, 6);
    let mut p = ParsedIp {
        l2_len: 0,
        v6: false,
        flow: FlowKey {
            src: [word(ip, 12), 0, 0, 0],
            dst: [word(ip, 16), 0, 0, 0],
            proto: ip[9],
            family: FAMILY_IPV4,
            ..FlowKey::default()
        },
        tcp_flags: 0,
        is_fragment: frags & 0x3FFF != 0,
        tos: ip[1],
        ip_len,
        id: [ip[4], ip[5]],
        dont_fragment: frags & 0x4000 != 0,
        icmp: IcmpKind::None,
        icmp_offset: 0,
        udp_payload: None,
    };
    transport(ip, ihl, &mut p)?;
    Some(p)
}

fn parse_ipv6(ip: &[u8]) -> Option<ParsedIp> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    let ip_len = 40 + be16(ip, 4) as usize;
    if ip_len > ip.len() || ip_len > 0xFFFF {
        return None;
    }
    let mut next = ip[6];
    let mut off = 40;
    let mut is_fragment = false;
    let mut walked = 0;
    loop {
        match next {
            0 | 43 | 60 => {
                if walked == MAX_EXTENSION_HEADERS || ip_len < off + 8 {
                    return None;
                }
                next = ip[off];
                off += (ip[off + 1] as usize + 1) * 8;
                walked += 1;
            }
            44 => {
                if walked == MAX_EXTENSION_HEADERS || ip_len < off + 8 {
                    return None;
                }
                next = ip[off];
                // Offset and M flag; what follows a fragment header is
                // fragment data (the first fragment's ports are ignored too,
                // so every fragment of a datagram hashes alike).
                is_fragment = be16(ip, off + 2) & 0xFFF9 != 0;
                off += 8;
                break;
            }
            _ => break,
        }
    }
    if off > ip_len {
        return None;
    }
    let tos = ((be16(ip, 0) >> 4) & 0xFF) as u8;
    let mut p = ParsedIp {
        l2_len: 0,
        v6: true,
        flow: FlowKey {
            src: addr16(ip, 8),
            dst: addr16(ip, 24),
            proto: next,
            family: FAMILY_IPV6,
            ..FlowKey::default()
        },
        tcp_flags: 0,
        is_fragment,
        tos,
        ip_len: ip_len as u16,
        id: [0, 0],
        dont_fragment: true,
        icmp: IcmpKind::None,
        icmp_offset: 0,
        udp_payload: None,
    };
    transport(ip, off, &mut p)?;
    Some(p)
}

/// Ports, TCP flags and ICMP meaning of the transport header at `l4`.
fn transport(ip: &[u8], l4: usize, p: &mut ParsedIp) -> Option<()> {
    if p.is_fragment {
        return Some(());
    }
    let ip_len = p.ip_len as usize;
    let icmp_proto = if p.v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    if p.flow.proto == icmp_proto {
        if ip_len < l4 + 8 {
            return None;
        }
        p.icmp_offset = l4;
        let echo = if p.v6 { 128 } else { 8 };
        if ip[l4] == echo {
            p.icmp = IcmpKind::EchoRequest;
        } else if is_icmp_error(p.v6, ip[l4])
            && let Some(flow) = quoted_flow(ip, l4, ip_len, p.v6, p.flow.dst)
        {
            p.flow = flow;
            p.icmp = IcmpKind::Error;
        }
        return Some(());
    }
    let (sport, dport, flags) = ports(ip, l4, ip_len, p.flow.proto)?;
    p.flow.sport = sport;
    p.flow.dport = dport;
    p.tcp_flags = flags;
    if p.flow.proto == PROTO_UDP {
        p.udp_payload = Some((l4 + 8, be16(ip, l4 + 4) as usize - 8));
    }
    Some(())
}

/// Bytes of a parsed frame's IP datagram (without trailing padding).
pub fn ip_bytes<'a>(pkt: &'a [u8], p: &ParsedIp) -> &'a [u8] {
    &pkt[p.l2_len..p.l2_len + p.ip_len as usize]
}
