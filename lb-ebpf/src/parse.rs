//! Header parsing. Every read is bounds-checked against `data_end` first.

use aya_ebpf::programs::XdpContext;
use lb_common::maps::FlowKey;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1FFF;
pub const IP_DF: u16 = 0x4000;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to a `T` at `offset`, or `None` if the packet is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

pub enum Parsed {
    NotIpv4,
    Malformed,
    Ipv4(Ipv4Packet),
}

/// What the rest of the program needs from an IPv4 TCP/UDP packet.
pub struct Ipv4Packet {
    /// Bytes of Ethernet header, 14 or 18 with one VLAN tag.
    pub l2_len: usize,
    /// VLAN tag control information (network order), when `l2_len == 18`.
    pub vlan_tci: u16,
    pub vlan_proto: u16,
    /// Ports are zero for fragments and for protocols other than TCP/UDP.
    pub flow: FlowKey,
    pub tcp_flags: u8,
    pub is_fragment: bool,
    pub tos: u8,
    /// Host order.
    pub tot_len: u16,
    /// Raw (network order) identification field.
    pub ip_id: u16,
    pub dont_fragment: bool,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
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
    if ether_type != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l2_len) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0F) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Parsed::Malformed;
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    let packet_len = ctx.data_end() - ctx.data();
    if (tot_len as usize) < ihl || l2_len + tot_len as usize > packet_len {
        return Parsed::Malformed;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let is_fragment = frags & (IP_MF | IP_OFFSET) != 0;
    let mut flow = FlowKey {
        src: [u32::from_ne_bytes(ip.src_addr), 0, 0, 0],
        dst: [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0],
        sport: 0,
        dport: 0,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let mut tcp_flags = 0;
    if !is_fragment {
        let l4 = l2_len + ihl;
        match ip.proto {
            lb_common::PROTO_TCP => {
                // Bounds first, then the length check: in the other order
                // LLVM derives the bounds from tot_len and drops the check
                // the verifier needs.
                let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                // The whole fixed TCP header must be inside the datagram.
                if (tot_len as usize) < ihl + TcpHdr::LEN {
                    return Parsed::Malformed;
                }
                // SAFETY: bounds checked by ptr_at.
                unsafe {
                    flow.sport = u16::from_ne_bytes((*tcp).source);
                    flow.dport = u16::from_ne_bytes((*tcp).dest);
                    tcp_flags = *((tcp as *const u8).add(13));
                }
            }
            lb_common::PROTO_UDP => {
                let Some(udp) = ptr_at::<UdpHdr>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                if (tot_len as usize) < ihl + UdpHdr::LEN {
                    return Parsed::Malformed;
                }
                // SAFETY: bounds checked by ptr_at.
                unsafe {
                    flow.sport = u16::from_ne_bytes((*udp).src);
                    flow.dport = u16::from_ne_bytes((*udp).dst);
                }
            }
            _ => {}
        }
    }
    Parsed::Ipv4(Ipv4Packet {
        l2_len,
        vlan_tci,
        vlan_proto,
        flow,
        tcp_flags,
        is_fragment,
        tos: ip.tos,
        tot_len,
        ip_id: u16::from_ne_bytes(ip.id),
        dont_fragment: frags & IP_DF != 0,
    })
}
