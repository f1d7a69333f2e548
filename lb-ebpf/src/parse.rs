//! Header parsing. Every read is bounds-checked against `data_end` first;
//! lengths are then checked against the IP datagram's own length, so the
//! outcome matches the reference model (`lb_common::model::parse`).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    maps::{FAMILY_IPV4, FAMILY_IPV6, FlowKey},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1FFF;
pub const IP_DF: u16 = 0x4000;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Extension headers walked before giving up (as the model).
const MAX_EXTENSION_HEADERS: usize = 4;
const ICMP_HDR_LEN: usize = 8;

/// `Packet::icmp`.
pub const ICMP_NONE: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 1;
/// An error quoting a TCP/UDP packet the VIP sent; `flow` is that flow
/// turned around (client -> VIP).
pub const ICMP_ERROR: u8 = 2;

/// A pointer to a `T` at `offset`, or `None` if the packet is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[derive(PartialEq, Eq)]
pub enum Parsed {
    NotIp,
    Malformed,
    Ip,
}

/// What the rest of the program needs from an IPv4/IPv6 packet.
pub struct Packet {
    /// Bytes of Ethernet header, 14 or 18 with one VLAN tag.
    pub l2_len: usize,
    /// VLAN tag control information (network order), when `l2_len == 18`.
    pub vlan_tci: u16,
    pub vlan_proto: u16,
    pub v6: bool,
    /// Ports are zero for fragments, ICMP and other protocols.
    pub flow: FlowKey,
    pub tcp_flags: u8,
    pub is_fragment: bool,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// Length of the IP datagram, header included (host order).
    pub ip_len: u16,
    /// Raw (network order) IPv4 identification field; 0 for IPv6.
    pub ip_id: u16,
    /// IPv4 DF; always set for IPv6.
    pub dont_fragment: bool,
    /// `ICMP_NONE`, `ICMP_ECHO_REQUEST` or `ICMP_ERROR`.
    pub icmp: u8,
    /// Offset of the ICMP header from the IP header.
    pub icmp_offset: usize,
    /// UDP datagrams (not fragments): where the payload starts in the
    /// frame and its length by the UDP header (QUIC VIPs read it).
    pub udp_payload: u16,
    pub udp_payload_len: u16,
}

impl Packet {
    pub const EMPTY: Packet = Packet {
        l2_len: 0,
        vlan_tci: 0,
        vlan_proto: 0,
        v6: false,
        flow: FlowKey {
            src: [0; 4],
            dst: [0; 4],
            sport: 0,
            dport: 0,
            proto: 0,
            family: 0,
            _pad: [0; 2],
        },
        tcp_flags: 0,
        is_fragment: false,
        tos: 0,
        ip_len: 0,
        ip_id: 0,
        dont_fragment: false,
        icmp: ICMP_NONE,
        icmp_offset: 0,
        udp_payload: 0,
        udp_payload_len: 0,
    };
}

/// Fills `pkt` (which starts as `Packet::EMPTY`); filled in place so the
/// packet is never copied (the BPF stack is 512 bytes).
#[inline(always)]
pub fn parse(ctx: &XdpContext, pkt: &mut Packet) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l2_len = EthHdr::LEN;
    let mut vlan_tci = 0;
    let mut vlan_proto = 0;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, l2_len) else {
            return Parsed::Malformed;
        };
        vlan_proto = ether_type.to_be();
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            vlan_tci = u16::from_ne_bytes((*vlan).tci);
            ether_type = u16::from_be((*vlan).ether_type);
        }
        l2_len += VlanHdr::LEN;
    }
    pkt.l2_len = l2_len;
    pkt.vlan_tci = vlan_tci;
    pkt.vlan_proto = vlan_proto;
    let parsed = match ether_type {
        ETH_P_IP => parse_ipv4(ctx, pkt),
        ETH_P_IPV6 => parse_ipv6(ctx, pkt),
        _ => return Parsed::NotIp,
    };
    match parsed {
        Some(()) => Parsed::Ip,
        None => Parsed::Malformed,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, pkt: &mut Packet) -> Option<()> {
    let l2_len = pkt.l2_len;
    let ip = ptr_at::<Ipv4Hdr>(ctx, l2_len)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0F) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    let ip_len = u16::from_be_bytes(ip.tot_len);
    let packet_len = ctx.data_end() - ctx.data();
    if (ip_len as usize) < ihl || l2_len + ip_len as usize > packet_len {
        return None;
    }
    if !ipv4_header_checksum_ok(ctx, l2_len, ihl) {
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    pkt.flow.src[0] = u32::from_ne_bytes(ip.src_addr);
    pkt.flow.dst[0] = u32::from_ne_bytes(ip.dst_addr);
    pkt.flow.proto = ip.proto;
    pkt.flow.family = FAMILY_IPV4;
    pkt.is_fragment = frags & (IP_MF | IP_OFFSET) != 0;
    pkt.tos = ip.tos;
    pkt.ip_len = ip_len;
    pkt.ip_id = u16::from_ne_bytes(ip.id);
    pkt.dont_fragment = frags & IP_DF != 0;
    transport(ctx, ihl, pkt)
}

/// The IPv4 header at `at`, `ihl` bytes with options, sums to 0xFFFF in
/// ones' complement. 32-bit words summed in 64 bits, then folded: the
/// same test as on 16-bit words, in a quarter of the additions.
#[inline(always)]
fn ipv4_header_checksum_ok(ctx: &XdpContext, at: usize, ihl: usize) -> bool {
    let Some(base) = ptr_at::<[u32; 5]>(ctx, at) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let w = unsafe { *base };
    let mut sum = w[0] as u64 + w[1] as u64 + w[2] as u64 + w[3] as u64 + w[4] as u64;
    let mut off = Ipv4Hdr::LEN;
    // Options: at most 10 more words.
    for _ in 0..10 {
        if off >= ihl {
            break;
        }
        let Some(word) = ptr_at::<u32>(ctx, at + off) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        sum += unsafe { *word } as u64;
        off += 4;
    }
    folds_to_ffff(sum)
}

/// Whether a sum of 32-bit words folds to 0xFFFF in 16-bit ones' complement
/// (an IPv4 header with a right checksum does).
#[inline(always)]
pub fn folds_to_ffff(mut sum: u64) -> bool {
    sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum == 0xFFFF
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, pkt: &mut Packet) -> Option<()> {
    let l2_len = pkt.l2_len;
    let ip = ptr_at::<Ipv6Hdr>(ctx, l2_len)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return None;
    }
    let ip_len = Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
    let packet_len = ctx.data_end() - ctx.data();
    if l2_len + ip_len > packet_len || ip_len > 0xFFFF {
        return None;
    }
    let mut next = ip.next_hdr;
    let mut off = Ipv6Hdr::LEN;
    let mut is_fragment = false;
    let mut walked = 0;
    // Bounded walk: hop-by-hop, routing and destination options are
    // skipped; a fragment header ends the walk (fragment data follows).
    loop {
        match next {
            0 | 43 | 60 => {
                if walked == MAX_EXTENSION_HEADERS {
                    return None;
                }
                let ext = ptr_at::<[u8; 2]>(ctx, l2_len + off)?;
                if ip_len < off + 8 {
                    return None;
                }
                // SAFETY: bounds checked by ptr_at.
                let (nh, len) = unsafe { ((*ext)[0], (*ext)[1]) };
                next = nh;
                off += (len as usize + 1) * 8;
                walked += 1;
            }
            44 => {
                if walked == MAX_EXTENSION_HEADERS {
                    return None;
                }
                let frag = ptr_at::<[u8; 4]>(ctx, l2_len + off)?;
                if ip_len < off + 8 {
                    return None;
                }
                // SAFETY: bounds checked by ptr_at.
                let (nh, offset_flags) =
                    unsafe { ((*frag)[0], u16::from_be_bytes([(*frag)[2], (*frag)[3]])) };
                next = nh;
                is_fragment = offset_flags & 0xFFF9 != 0;
                off += 8;
                break;
            }
            _ => break,
        }
    }
    if off > ip_len {
        return None;
    }
    let vcf = u32::from_be_bytes(ip.vcf);
    pkt.v6 = true;
    pkt.flow.src = words(&ip.src_addr);
    pkt.flow.dst = words(&ip.dst_addr);
    pkt.flow.proto = next;
    pkt.flow.family = FAMILY_IPV6;
    pkt.is_fragment = is_fragment;
    pkt.tos = (vcf >> 20) as u8;
    pkt.ip_len = ip_len as u16;
    pkt.dont_fragment = true;
    transport(ctx, off, pkt)
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Ports, TCP flags and the ICMP meaning of the header at `l4` (from the IP
/// header). `None` = malformed.
#[inline(always)]
fn transport(ctx: &XdpContext, l4: usize, pkt: &mut Packet) -> Option<()> {
    if pkt.is_fragment {
        return Some(());
    }
    let ip_len = pkt.ip_len as usize;
    let at = pkt.l2_len + l4;
    match pkt.flow.proto {
        PROTO_TCP => {
            // Bounds first, then the length check: in the other order LLVM
            // derives the bounds from ip_len and drops the check the
            // verifier needs.
            let tcp = ptr_at::<TcpHdr>(ctx, at)?;
            if ip_len < l4 + TcpHdr::LEN {
                return None;
            }
            // SAFETY: bounds checked by ptr_at.
            let doff = ((unsafe { *((tcp as *const u8).add(12)) } >> 4) as usize) * 4;
            if doff < TcpHdr::LEN || l4 + doff > ip_len {
                return None;
            }
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                pkt.flow.sport = u16::from_ne_bytes((*tcp).source);
                pkt.flow.dport = u16::from_ne_bytes((*tcp).dest);
                pkt.tcp_flags = *((tcp as *const u8).add(13));
            }
        }
        PROTO_UDP => {
            let udp = ptr_at::<UdpHdr>(ctx, at)?;
            if ip_len < l4 + UdpHdr::LEN {
                return None;
            }
            // SAFETY: bounds checked by ptr_at.
            let ulen = u16::from_be_bytes(unsafe { (*udp).len }) as usize;
            if ulen < UdpHdr::LEN || l4 + ulen > ip_len {
                return None;
            }
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                pkt.flow.sport = u16::from_ne_bytes((*udp).src);
                pkt.flow.dport = u16::from_ne_bytes((*udp).dst);
            }
            pkt.udp_payload = (at + UdpHdr::LEN) as u16;
            pkt.udp_payload_len = (ulen - UdpHdr::LEN) as u16;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if (pkt.flow.proto == PROTO_ICMPV6) != pkt.v6 {
                return Some(());
            }
            let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, at)?;
            if ip_len < l4 + ICMP_HDR_LEN {
                return None;
            }
            pkt.icmp_offset = l4;
            // SAFETY: bounds checked by ptr_at.
            let icmp_type = unsafe { (*icmp)[0] };
            let (echo, error) = if pkt.v6 {
                (icmp_type == 128, icmp_type >= 1 && icmp_type <= 4)
            } else {
                (
                    icmp_type == 8,
                    icmp_type == 3 || icmp_type == 11 || icmp_type == 12,
                )
            };
            if echo {
                pkt.icmp = ICMP_ECHO_REQUEST;
            } else if error && quoted_flow(ctx, l4 + ICMP_HDR_LEN, pkt) {
                pkt.icmp = ICMP_ERROR;
            }
        }
        _ => {}
    }
    Some(())
}

/// Reads the TCP/UDP flow an ICMP error quotes at `q` (from the IP header)
/// into `pkt.flow`, turned around, if the quote is complete enough and its
/// source is the error's destination (the VIP). Leaves `pkt` alone otherwise.
#[inline(always)]
fn quoted_flow(ctx: &XdpContext, q: usize, pkt: &mut Packet) -> bool {
    let ip_len = pkt.ip_len as usize;
    let at = pkt.l2_len + q;
    // The quoted packet went VIP -> client: its source must be the error's
    // destination, and the flow is stored the other way round.
    let (proto, l4) = if pkt.v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, at) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip_len < q + Ipv6Hdr::LEN + 4 || ip.vcf[0] >> 4 != 6 {
            return false;
        }
        if words(&ip.src_addr) != pkt.flow.dst {
            return false;
        }
        (ip.next_hdr, q + Ipv6Hdr::LEN)
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, at) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let ihl = ((ip.vihl & 0x0F) as usize) * 4;
        let frag_offset = u16::from_be_bytes(ip.frags) & IP_OFFSET;
        if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || frag_offset != 0 {
            return false;
        }
        if u32::from_ne_bytes(ip.src_addr) != pkt.flow.dst[0] {
            return false;
        }
        (ip.proto, q + ihl)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return false;
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, pkt.l2_len + l4) else {
        return false;
    };
    if ip_len < l4 + 4 {
        return false;
    }
    // The quoted destination (the client) becomes the flow's source.
    let quoted_dst = if pkt.v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, at) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        words(unsafe { &(*ip).dst_addr })
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, at) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        [u32::from_ne_bytes(unsafe { (*ip).dst_addr }), 0, 0, 0]
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    // flow.dst already is the quoted source (the VIP), checked above.
    pkt.flow.src = quoted_dst;
    pkt.flow.sport = u16::from_ne_bytes([ports[2], ports[3]]);
    pkt.flow.dport = u16::from_ne_bytes([ports[0], ports[1]]);
    pkt.flow.proto = proto;
    true
}
