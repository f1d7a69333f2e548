//! Backend side: strips the outer headers of packets the balancer
//! encapsulated (IPv4 or IPv6 outside, IPv4 or IPv6 inside, IP-in-IP or GUE)
//! so the kernel delivers the inner packet to the VIP on `lo`. This kernel
//! has no ipip/ip6_tunnel/fou modules; hosts that have them can use kernel
//! tunnels instead.
//!
//! Second-chance forwarding: a packet whose inner packet is itself an
//! encapsulated packet (to another backend, the second hop) is a TCP
//! segment the balancer could not place for sure. If this host has its
//! connection (a socket for the 4-tuple that is not only listening, or a
//! valid SYN cookie), both layers are removed and it is delivered here;
//! otherwise only the outer layer is, and the rest, an ordinary
//! encapsulated packet, is sent on to the second backend. A packet is
//! forwarded at most once: what is sent on carries no second hop.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup as FibParams,
        bpf_sock_tuple,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::{
        bpf_fib_lookup, bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
        bpf_xdp_adjust_head,
    },
    programs::XdpContext,
};
use lb_common::{PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP, maps::DecapReason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    encap::{ETH_P_IP_BE, ETH_P_IPV6_BE},
    maps::{DECAP_STATS, settings},
    parse::{TCP_ACK, TCP_RST, TCP_SYN, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TCP_LISTEN: u32 = 10;
const IP_MF_OFFSET: u16 = 0x3FFF;

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
fn pass(reason: DecapReason, bytes: u64) -> u32 {
    count(reason, bytes);
    XDP_PASS
}

/// An IP header at `at`: (its length, the protocol it carries, its
/// version), or `None` when it is not a whole IPv4/IPv6 header of the
/// `version` asked for (0 = either).
#[inline(always)]
fn ip_at(ctx: &XdpContext, at: usize, version: u8) -> Option<(usize, u8, u8)> {
    // Every IP header has at least an IPv4 header's length.
    let ip = ptr_at::<Ipv4Hdr>(ctx, at)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
    let v = vihl >> 4;
    if version != 0 && v != version {
        return None;
    }
    if v == 4 {
        let ihl = ((vihl & 0x0F) as usize) * 4;
        if ihl < Ipv4Hdr::LEN {
            return None;
        }
        Some((ihl, proto, 4))
    } else if v == 6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, at)?;
        // SAFETY: bounds checked by ptr_at.
        Some((Ipv6Hdr::LEN, unsafe { (*ip).next_hdr }, 6))
    } else {
        None
    }
}

/// If the IP header at `at` (`ip_len` bytes, carrying `proto`) starts an
/// encapsulation of ours: the bytes to strip to its inner packet and the
/// inner packet's IP version (IPIP: 4, IPv6: 6, GUE: either).
#[inline(always)]
fn tunnel_at(ctx: &XdpContext, at: usize, ip_len: usize, proto: u8) -> Option<(usize, u8)> {
    match proto {
        PROTO_IPIP => Some((ip_len, 4)),
        PROTO_IPV6 => Some((ip_len, 6)),
        PROTO_UDP => {
            let udp = ptr_at::<UdpHdr>(ctx, at + ip_len)?;
            // SAFETY: bounds checked by ptr_at.
            let dst = u16::from_ne_bytes(unsafe { (*udp).dst });
            (dst == settings().gue_port).then_some((ip_len + UdpHdr::LEN, 0))
        }
        _ => None,
    }
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass(DecapReason::PassNotEncapsulated, bytes);
    };
    // SAFETY: bounds checked by ptr_at.
    let (dst, src, ether_type) = unsafe { ((*eth).dst_addr, (*eth).src_addr, (*eth).ether_type) };
    let outer_version = if ether_type == ETH_P_IP_BE {
        4
    } else if ether_type == ETH_P_IPV6_BE {
        6
    } else {
        return pass(DecapReason::PassNotEncapsulated, bytes);
    };
    let Some((ip_len, proto, _)) = ip_at(ctx, EthHdr::LEN, outer_version) else {
        return pass(DecapReason::PassNotEncapsulated, bytes);
    };
    let Some((strip, expect_version)) = tunnel_at(ctx, EthHdr::LEN, ip_len, proto) else {
        return pass(DecapReason::PassNotEncapsulated, bytes);
    };
    // The inner header must be there and be the IP version announced (GUE
    // variant 1: the version nibble says which).
    let inner_at = EthHdr::LEN + strip;
    // Two bytes asked for: a one-byte check compiles to a comparison the
    // verifier does not take as a bound.
    let Some(first) = ptr_at::<[u8; 2]>(ctx, inner_at) else {
        return pass(DecapReason::PassMalformed, bytes);
    };
    // SAFETY: bounds checked by ptr_at.
    let version = unsafe { (*first)[0] } >> 4;
    if (expect_version != 0 && version != expect_version) || (version != 4 && version != 6) {
        return pass(DecapReason::PassMalformed, bytes);
    }
    if let Some((inner_len, inner_proto, _)) = ip_at(ctx, inner_at, version)
        && let Some((second_strip, innermost_version)) =
            tunnel_at(ctx, inner_at, inner_len, inner_proto)
    {
        return second_hop(
            ctx,
            (dst, src),
            strip,
            version,
            second_strip,
            innermost_version,
            bytes,
        );
    }
    if strip_to(ctx, strip, (dst, src), version).is_err() {
        return pass(DecapReason::PassMalformed, bytes);
    }
    pass(DecapReason::Decapsulated, bytes)
}

/// Removes `strip` bytes after the Ethernet header, whose addresses are
/// kept and whose type becomes that of an IP `version` packet.
#[inline(always)]
fn strip_to(
    ctx: &XdpContext,
    strip: usize,
    macs: ([u8; 6], [u8; 6]),
    version: u8,
) -> Result<(), ()> {
    // SAFETY: moves ctx->data; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return Err(());
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = macs.0;
        (*eth).src_addr = macs.1;
        (*eth).ether_type = if version == 4 {
            ETH_P_IP_BE
        } else {
            ETH_P_IPV6_BE
        };
    }
    Ok(())
}

/// What this host knows of the innermost packet's connection.
#[derive(PartialEq, Eq)]
enum Local {
    /// Delivered here: the connection is here, or the packet may not be
    /// forwarded (no TCP, a SYN, a fragment).
    Here,
    /// No connection here: send it on.
    Elsewhere,
}

/// A packet with a second hop: the middle packet (an encapsulated packet
/// to the second backend, IP `middle_version`) starts `strip` bytes after
/// the Ethernet header, its own encapsulation is `middle_strip` bytes, and
/// the innermost packet is IP `innermost_version` (0: GUE, either).
#[inline(always)]
fn second_hop(
    ctx: &XdpContext,
    macs: ([u8; 6], [u8; 6]),
    strip: usize,
    middle_version: u8,
    middle_strip: usize,
    innermost_version: u8,
    bytes: u64,
) -> u32 {
    let middle_at = EthHdr::LEN + strip;
    let innermost_at = middle_at + middle_strip;
    let Some((ip_len, proto, version)) = ip_at(ctx, innermost_at, innermost_version) else {
        return pass(DecapReason::PassMalformed, bytes);
    };
    let local = if proto == PROTO_TCP {
        match connection_here(ctx, innermost_at, ip_len, version) {
            Some(l) => l,
            None => return pass(DecapReason::PassMalformed, bytes),
        }
    } else {
        Local::Here
    };
    let hop = if local == Local::Elsewhere {
        forward_hop(ctx, middle_at, middle_version)
    } else {
        Hop::Local
    };
    match hop {
        Hop::Local => {
            if strip_to(ctx, strip + middle_strip, macs, version).is_err() {
                return pass(DecapReason::PassMalformed, bytes);
            }
            pass(DecapReason::SecondHopLocal, bytes)
        }
        Hop::Back => {
            // To the hop that delivered it (the router), which routes it on.
            if strip_to(ctx, strip, (macs.1, macs.0), middle_version).is_err() {
                return pass(DecapReason::PassMalformed, bytes);
            }
            count(DecapReason::SecondHopForwarded, bytes);
            XDP_TX
        }
        Hop::Kernel => {
            if strip_to(ctx, strip, macs, middle_version).is_err() {
                return pass(DecapReason::PassMalformed, bytes);
            }
            pass(DecapReason::SecondHopToKernel, bytes)
        }
        Hop::Out {
            smac,
            dmac,
            ifindex,
        } => {
            if strip_to(ctx, strip, (dmac, smac), middle_version).is_err() {
                return pass(DecapReason::PassMalformed, bytes);
            }
            count(DecapReason::SecondHopForwarded, bytes);
            if ifindex as usize == ctx.ingress_ifindex() {
                XDP_TX
            } else {
                // SAFETY: helper takes plain integers.
                unsafe { bpf_redirect(ifindex, 0) as u32 }
            }
        }
    }
}

/// Whether the TCP segment in the IP packet at `at` (header `ip_len`
/// bytes, IP `version`) belongs to a connection of this host; `None` if its
/// TCP header is cut short.
#[inline(always)]
fn connection_here(ctx: &XdpContext, at: usize, ip_len: usize, version: u8) -> Option<Local> {
    let th_at = at + ip_len;
    let th = ptr_at::<TcpHdr>(ctx, th_at)?;
    // SAFETY: bounds checked by ptr_at; byte 13 holds the flags.
    let flags = unsafe { *(th as *const u8).add(13) };
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Some(Local::Here);
    }
    // SAFETY: bpf_sock_tuple is plain data; all-zero is a valid start.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (sport, dport) = unsafe { ((*th).source, (*th).dest) };
    let tuple_size;
    if version == 4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, at)?;
        // SAFETY: bounds checked by ptr_at.
        let (frags, saddr, daddr) = unsafe { ((*ip).frags, (*ip).src_addr, (*ip).dst_addr) };
        if u16::from_be_bytes(frags) & IP_MF_OFFSET != 0 {
            return Some(Local::Here);
        }
        // SAFETY: writing the IPv4 member of the union.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = u32::from_ne_bytes(saddr);
            t.daddr = u32::from_ne_bytes(daddr);
            t.sport = u16::from_ne_bytes(sport);
            t.dport = u16::from_ne_bytes(dport);
        }
        tuple_size = 12;
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, at)?;
        // SAFETY: bounds checked by ptr_at; writing the IPv6 member.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).src_addr);
            t.daddr = core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).dst_addr);
            t.sport = u16::from_ne_bytes(sport);
            t.dport = u16::from_ne_bytes(dport);
        }
        tuple_size = 36;
    }
    // SAFETY: the helper reads the tuple; a socket it returns is released below.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.ctx.cast(),
            &mut tuple,
            tuple_size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return Some(Local::Elsewhere);
    }
    // SAFETY: a socket the helper returned, released before returning.
    let state = unsafe { (*sk).state };
    let mut here = state != TCP_LISTEN;
    // Only a listener: the segment may still complete a handshake this host
    // answered with a SYN cookie (it kept no state for it).
    if !here && flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK {
        let iph_len = if version == 4 {
            Ipv4Hdr::LEN
        } else {
            Ipv6Hdr::LEN
        };
        if let (Some(iph), Some(th)) = (ptr_at::<[u8; 40]>(ctx, at), ptr_at::<TcpHdr>(ctx, th_at)) {
            // SAFETY: pointers into the packet, bounds checked for the lengths given.
            here = unsafe {
                bpf_tcp_check_syncookie(
                    sk.cast(),
                    iph.cast(),
                    iph_len as u32,
                    th.cast(),
                    TcpHdr::LEN as u32,
                )
            } == 0;
        }
    }
    // SAFETY: the socket from the lookup above.
    unsafe { bpf_sk_release(sk.cast()) };
    Some(if here { Local::Here } else { Local::Elsewhere })
}

/// Where the middle packet goes.
enum Hop {
    /// Nowhere else: the second backend is this host (or the FIB has no
    /// route to it at all, which it reports the same way: delivered here,
    /// where the client gets a reset rather than silence).
    Local,
    /// Out of `ifindex` with these MACs.
    Out {
        smac: [u8; 6],
        dmac: [u8; 6],
        ifindex: u32,
    },
    /// Back out to the MAC it came from: this host does not forward on
    /// that interface, so its FIB gives no next hop, and the hop that
    /// delivered the packet (the router) can route it on.
    Back,
    /// The FIB has no resolved next hop: the kernel routes it (or not).
    Kernel,
}

/// The way to the second backend: a FIB lookup for the middle packet at
/// `at` as if this host sent it.
#[inline(always)]
fn forward_hop(ctx: &XdpContext, at: usize, version: u8) -> Hop {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid start.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.ifindex = ctx.ingress_ifindex() as u32;
    if version == 4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, at) else {
            return Hop::Kernel;
        };
        params.family = AF_INET;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            params.l4_protocol = (*ip).proto;
            params.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
            params.__bindgen_anon_2.tos = (*ip).tos;
            params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
            params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, at) else {
            return Hop::Kernel;
        };
        params.family = AF_INET6;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            params.l4_protocol = (*ip).next_hdr;
            params.__bindgen_anon_1.tot_len =
                u16::from_be_bytes((*ip).payload_len).wrapping_add(40);
            params.__bindgen_anon_3.ipv6_src =
                core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).src_addr);
            params.__bindgen_anon_4.ipv6_dst =
                core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).dst_addr);
        }
    }
    // SAFETY: the helper reads and writes only `params`.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Hop::Out {
            smac: params.smac,
            dmac: params.dmac,
            ifindex: params.ifindex,
        },
        BPF_FIB_LKUP_RET_NOT_FWDED => Hop::Local,
        BPF_FIB_LKUP_RET_FWD_DISABLED => Hop::Back,
        _ => Hop::Kernel,
    }
}
