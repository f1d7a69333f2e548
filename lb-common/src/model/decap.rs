//! The reference model of the backend side (`decap`): what it does with a
//! frame, given which sockets the host has and what its FIB answers.

use std::vec::Vec;

use crate::{
    PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP,
    maps::{Addr, DecapReason, FAMILY_IPV4, FAMILY_IPV6, FlowKey},
};

use super::{
    Action,
    parse::{be16, word},
};

/// What a TCP socket lookup for a 4-tuple finds on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalSocket {
    None,
    /// Only a listener; `cookie_valid`: the segment is an ACK carrying a
    /// SYN cookie this listener issued.
    Listening {
        cookie_valid: bool,
    },
    /// A connection (established, half-open or closing).
    Connected,
}

/// The FIB's answer for the way to a second hop, looked up as output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapNextHop {
    Resolved {
        smac: [u8; 6],
        dmac: [u8; 6],
        ifindex: u32,
    },
    /// The destination is this host.
    Local,
    /// The interface does not forward: the FIB answers nothing else; the
    /// packet goes back to the MAC that delivered it.
    ForwardingDisabled,
    /// No resolved next hop (no route, neighbour unknown, ...).
    Unresolved,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecapDecision {
    pub action: Action,
    pub reason: DecapReason,
    pub output: Vec<u8>,
}

/// An IP header at `at` as `decap` reads it: (length, protocol, version).
fn ip_at(pkt: &[u8], at: usize, version: u8) -> Option<(usize, u8, u8)> {
    if pkt.len() < at + 20 {
        return None;
    }
    let v = pkt[at] >> 4;
    if version != 0 && v != version {
        return None;
    }
    match v {
        4 => {
            let ihl = (pkt[at] & 0x0F) as usize * 4;
            (ihl >= 20).then_some((ihl, pkt[at + 9], 4))
        }
        6 if pkt.len() >= at + 40 => Some((40, pkt[at + 6], 6)),
        _ => None,
    }
}

/// The encapsulation starting with the IP header at `at`: bytes to strip
/// and the inner version (0 = GUE, either).
fn tunnel_at(
    pkt: &[u8],
    at: usize,
    ip_len: usize,
    proto: u8,
    gue_port: u16,
) -> Option<(usize, u8)> {
    match proto {
        PROTO_IPIP => Some((ip_len, 4)),
        PROTO_IPV6 => Some((ip_len, 6)),
        PROTO_UDP if pkt.len() >= at + ip_len + 8 => {
            (be16(pkt, at + ip_len + 2) == gue_port).then_some((ip_len + 8, 0))
        }
        _ => None,
    }
}

/// The frame after removing `strip` bytes behind the Ethernet header,
/// with these MACs and the type of an IP `version` packet.
fn stripped(pkt: &[u8], strip: usize, dmac: &[u8], smac: &[u8], version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(pkt.len());
    out.extend_from_slice(dmac);
    out.extend_from_slice(smac);
    out.extend_from_slice(&(if version == 4 { 0x0800u16 } else { 0x86DD }).to_be_bytes());
    out.extend_from_slice(&pkt[14 + strip..]);
    out
}

/// `decap`'s decision for `frame`. `gue_port` in host order;
/// `socket(flow)` stands for `bpf_skc_lookup_tcp` (+ the SYN cookie check),
/// `next_hop(version, destination, total length)` for `bpf_fib_lookup`.
pub fn decap_decide(
    frame: &[u8],
    gue_port: u16,
    ingress_ifindex: u32,
    socket: impl Fn(&FlowKey) -> LocalSocket,
    next_hop: impl Fn(u8, &Addr, u16) -> DecapNextHop,
) -> DecapDecision {
    let unchanged = |reason| DecapDecision {
        action: Action::Pass,
        reason,
        output: frame.to_vec(),
    };
    if frame.len() < 14 {
        return unchanged(DecapReason::PassNotEncapsulated);
    }
    let outer_version = match be16(frame, 12) {
        0x0800 => 4,
        0x86DD => 6,
        _ => return unchanged(DecapReason::PassNotEncapsulated),
    };
    let Some((ip_len, proto, _)) = ip_at(frame, 14, outer_version) else {
        return unchanged(DecapReason::PassNotEncapsulated);
    };
    let Some((strip, expect)) = tunnel_at(frame, 14, ip_len, proto, gue_port) else {
        return unchanged(DecapReason::PassNotEncapsulated);
    };
    let inner_at = 14 + strip;
    if frame.len() < inner_at + 2 {
        return unchanged(DecapReason::PassMalformed);
    }
    let version = frame[inner_at] >> 4;
    if (expect != 0 && version != expect) || (version != 4 && version != 6) {
        return unchanged(DecapReason::PassMalformed);
    }
    let (dmac, smac) = (&frame[0..6], &frame[6..12]);
    let second = ip_at(frame, inner_at, version)
        .and_then(|(len, proto, _)| tunnel_at(frame, inner_at, len, proto, gue_port));
    let Some((middle_strip, innermost_version)) = second else {
        return DecapDecision {
            action: Action::Pass,
            reason: DecapReason::Decapsulated,
            output: stripped(frame, strip, dmac, smac, version),
        };
    };
    let innermost_at = inner_at + middle_strip;
    let Some((in_len, in_proto, in_version)) = ip_at(frame, innermost_at, innermost_version) else {
        return unchanged(DecapReason::PassMalformed);
    };
    let here = if in_proto == PROTO_TCP {
        match connection_here(frame, innermost_at, in_len, in_version, &socket) {
            Some(here) => here,
            None => return unchanged(DecapReason::PassMalformed),
        }
    } else {
        true
    };
    let hop = if here {
        DecapNextHop::Local
    } else {
        let dst = if version == 4 {
            [word(frame, inner_at + 16), 0, 0, 0]
        } else {
            core::array::from_fn(|i| word(frame, inner_at + 24 + 4 * i))
        };
        let tot_len = if version == 4 {
            be16(frame, inner_at + 2)
        } else {
            be16(frame, inner_at + 4).wrapping_add(40)
        };
        next_hop(version, &dst, tot_len)
    };
    match hop {
        DecapNextHop::Local => DecapDecision {
            action: Action::Pass,
            reason: DecapReason::SecondHopLocal,
            output: stripped(frame, strip + middle_strip, dmac, smac, in_version),
        },
        DecapNextHop::ForwardingDisabled => DecapDecision {
            action: Action::Tx,
            reason: DecapReason::SecondHopForwarded,
            output: stripped(frame, strip, smac, dmac, version),
        },
        DecapNextHop::Unresolved => DecapDecision {
            action: Action::Pass,
            reason: DecapReason::SecondHopToKernel,
            output: stripped(frame, strip, dmac, smac, version),
        },
        DecapNextHop::Resolved {
            smac: new_smac,
            dmac: new_dmac,
            ifindex,
        } => DecapDecision {
            action: if ifindex == ingress_ifindex {
                Action::Tx
            } else {
                Action::Redirect { ifindex }
            },
            reason: DecapReason::SecondHopForwarded,
            output: stripped(frame, strip, &new_dmac, &new_smac, version),
        },
    }
}

/// Whether the TCP segment of the IP packet at `at` is this host's to
/// keep; `None` if its TCP header is cut short.
fn connection_here(
    frame: &[u8],
    at: usize,
    ip_len: usize,
    version: u8,
    socket: &impl Fn(&FlowKey) -> LocalSocket,
) -> Option<bool> {
    let th = at + ip_len;
    if frame.len() < th + 20 {
        return None;
    }
    let flags = frame[th + 13];
    if flags & 0x12 == 0x02 {
        return Some(true);
    }
    let mut flow = FlowKey {
        sport: u16::from_ne_bytes([frame[th], frame[th + 1]]),
        dport: u16::from_ne_bytes([frame[th + 2], frame[th + 3]]),
        proto: PROTO_TCP,
        ..FlowKey::default()
    };
    if version == 4 {
        if be16(frame, at + 6) & 0x3FFF != 0 {
            return Some(true);
        }
        flow.family = FAMILY_IPV4;
        flow.src[0] = word(frame, at + 12);
        flow.dst[0] = word(frame, at + 16);
    } else {
        flow.family = FAMILY_IPV6;
        flow.src = core::array::from_fn(|i| word(frame, at + 8 + 4 * i));
        flow.dst = core::array::from_fn(|i| word(frame, at + 24 + 4 * i));
    }
    Some(match socket(&flow) {
        LocalSocket::None => false,
        LocalSocket::Connected => true,
        // The cookie is checked only for a bare ACK with the whole header
        // pair readable.
        LocalSocket::Listening { cookie_valid } => {
            cookie_valid && flags & 0x16 == 0x10 && frame.len() >= at + 40
        }
    })
}
