//! The reference model: for a packet and the maps' contents, what the XDP
//! program must do (action, backend, counters, output bytes, connection
//! table write). Written as plain host code from the specification, not
//! from the program, so the two check each other; the fixture tests and the
//! differential fuzzer compare them packet by packet.

use std::{collections::BTreeMap, collections::HashMap, vec::Vec};

use crate::{
    PROTO_IPIP, PROTO_TCP, PROTO_UDP,
    flow_hash::flow_hash,
    maps::{
        Addr, BACKEND_F_VALID, Backend, ConnEntry, FlowKey, Reason, VIP_KIND_FRAGMENTS,
        VIP_KIND_PORT, VipKey, VipMeta,
    },
    settings::{SETTINGS_F_GATEWAY_MAC, SETTINGS_F_NO_FIB, Settings},
};

/// The maps as the program would see them.
#[derive(Clone, Debug, Default)]
pub struct ModelMaps {
    pub settings: Settings,
    pub vips: BTreeMap<VipKey, VipMeta>,
    pub backends: BTreeMap<u32, Backend>,
    /// `MAGLEV_SLOTS` contents; absent slots read as 0.
    pub slots: BTreeMap<u32, u32>,
    pub conntrack: HashMap<FlowKey, ConnEntry>,
}

/// What the kernel's FIB would answer for the way to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelNextHop {
    Resolved {
        smac: [u8; 6],
        dmac: [u8; 6],
        ifindex: u32,
    },
    NoNeighbour,
    TooBig,
    NoRoute,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    Tx,
    Redirect { ifindex: u32 },
}

impl Action {
    /// The XDP return code.
    pub fn xdp_code(self) -> u32 {
        match self {
            Action::Drop => 1,
            Action::Pass => 2,
            Action::Tx => 3,
            Action::Redirect { .. } => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// Every `REASON_STATS` index the packet is counted under.
    pub reasons: Vec<Reason>,
    pub vip_id: Option<u32>,
    pub backend_id: Option<u32>,
    /// The packet as the program leaves it.
    pub output: Vec<u8>,
    /// A connection table entry the program writes (flow, backend id).
    pub conntrack_write: Option<(FlowKey, u32)>,
}

/// What the model reads from the headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIpv4 {
    pub l2_len: usize,
    pub flow: FlowKey,
    pub tcp_flags: u8,
    pub is_fragment: bool,
    pub tos: u8,
    pub tot_len: u16,
    pub id: [u8; 2],
    pub dont_fragment: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelParse {
    NotIpv4,
    Malformed,
    Ipv4(ParsedIpv4),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses Ethernet (one optional 802.1Q/802.1ad tag), IPv4, TCP/UDP ports.
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
    if ether_type != 0x0800 {
        return ModelParse::NotIpv4;
    }
    if pkt.len() < l2_len + 20 {
        return ModelParse::Malformed;
    }
    let ip = &pkt[l2_len..];
    let ihl = (ip[0] & 0x0F) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return ModelParse::Malformed;
    }
    let tot_len = be16(ip, 2);
    if (tot_len as usize) < ihl || l2_len + tot_len as usize > pkt.len() {
        return ModelParse::Malformed;
    }
    let frags = be16(ip, 6);
    let is_fragment = frags & 0x3FFF != 0;
    let proto = ip[9];
    let mut flow = FlowKey {
        src: [word(ip, 12), 0, 0, 0],
        dst: [word(ip, 16), 0, 0, 0],
        proto,
        ..FlowKey::default()
    };
    let mut tcp_flags = 0;
    if !is_fragment {
        let l4 = &ip[ihl..];
        let need = match proto {
            PROTO_TCP => 20,
            PROTO_UDP => 8,
            _ => 0,
        };
        if need > 0 {
            if (tot_len as usize) < ihl + need {
                return ModelParse::Malformed;
            }
            flow.sport = u16::from_ne_bytes([l4[0], l4[1]]);
            flow.dport = u16::from_ne_bytes([l4[2], l4[3]]);
            if proto == PROTO_TCP {
                tcp_flags = l4[13];
            }
        }
    }
    ModelParse::Ipv4(ParsedIpv4 {
        l2_len,
        flow,
        tcp_flags,
        is_fragment,
        tos: ip[1],
        tot_len,
        id: [ip[4], ip[5]],
        dont_fragment: frags & 0x4000 != 0,
    })
}

/// RFC 1071 checksum of a header.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

impl ModelMaps {
    fn lookup_vip(&self, p: &ParsedIpv4) -> Option<VipMeta> {
        let kind = if p.is_fragment {
            VIP_KIND_FRAGMENTS
        } else {
            VIP_KIND_PORT
        };
        let key = VipKey {
            addr: p.flow.dst,
            port: p.flow.dport,
            proto: p.flow.proto,
            kind,
        };
        if let Some(meta) = self.vips.get(&key) {
            return Some(*meta);
        }
        if p.is_fragment || key.port == 0 {
            return None;
        }
        self.vips.get(&VipKey { port: 0, ..key }).copied()
    }

    fn valid_backend(&self, id: u32, vip: &VipMeta) -> Option<Backend> {
        self.backends
            .get(&id)
            .filter(|b| b.flags & BACKEND_F_VALID != 0 && b.vip_id == vip.vip_id)
            .copied()
    }

    fn maglev_pick(&self, vip: &VipMeta, hash: u32) -> u32 {
        let slot = vip.table_offset.wrapping_add(hash % vip.table_size);
        self.slots.get(&slot).copied().unwrap_or(0)
    }

    /// Records what the program wrote to the connection table.
    pub fn apply(&mut self, d: &Decision, now_ns: u64) {
        if let Some((flow, backend_id)) = d.conntrack_write {
            self.conntrack.insert(
                flow,
                ConnEntry {
                    backend_id,
                    _pad: 0,
                    atime_ns: now_ns,
                },
            );
        }
    }

    /// The program's decision for `pkt`. `now_ns` (if given) ages UDP
    /// entries; `None` treats every entry as fresh.
    /// `next_hop(backend, outer_total_length)` stands for `bpf_fib_lookup`.
    pub fn decide(
        &self,
        pkt: &[u8],
        ingress_ifindex: u32,
        next_hop: impl Fn(&Addr, u16) -> ModelNextHop,
        now_ns: Option<u64>,
    ) -> Decision {
        let mut d = Decision {
            action: Action::Pass,
            reasons: Vec::new(),
            vip_id: None,
            backend_id: None,
            output: pkt.to_vec(),
            conntrack_write: None,
        };
        let p = match parse(pkt) {
            ModelParse::NotIpv4 => return d.finish(Reason::PassNotIpv4, Action::Pass),
            ModelParse::Malformed => return d.finish(Reason::PassMalformed, Action::Pass),
            ModelParse::Ipv4(p) => p,
        };
        let Some(vip) = self.lookup_vip(&p) else {
            return d.finish(Reason::PassNotVip, Action::Pass);
        };
        d.vip_id = Some(vip.vip_id);
        if vip.table_size == 0 {
            return d.finish(Reason::DropNoBackend, Action::Drop);
        }
        let cfg = self.settings;
        let hash = flow_hash(&p.flow, cfg.hash_seed);
        let chosen = if p.is_fragment {
            d.reasons.push(Reason::Fragment);
            let id = self.maglev_pick(&vip, hash);
            self.valid_backend(id, &vip).map(|b| (id, b))
        } else {
            let is_syn = p.tcp_flags & 0x12 == 0x02;
            let tracked = (!is_syn)
                .then(|| self.conntrack.get(&p.flow))
                .flatten()
                .and_then(|e| {
                    let fresh = p.flow.proto != PROTO_UDP
                        || now_ns.is_none_or(|now| {
                            now.wrapping_sub(e.atime_ns) <= cfg.udp_idle_timeout_ns
                        });
                    let b = self.valid_backend(e.backend_id, &vip)?;
                    fresh.then_some((e.backend_id, b))
                });
            if let Some(hit) = tracked {
                d.reasons.push(Reason::ConntrackHit);
                Some(hit)
            } else {
                d.reasons.push(Reason::ConntrackMiss);
                let id = self.maglev_pick(&vip, hash);
                let b = self.valid_backend(id, &vip);
                if b.is_some() && p.tcp_flags & 0x04 == 0 {
                    d.conntrack_write = Some((p.flow, id));
                }
                b.map(|b| (id, b))
            }
        };
        let Some((backend_id, backend)) = chosen else {
            return d.finish(Reason::DropNoBackend, Action::Drop);
        };
        d.backend_id = Some(backend_id);
        let outer_src = cfg.encap_src_prefix | (hash & !cfg.encap_src_mask);
        let hop = if cfg.flags & SETTINGS_F_NO_FIB != 0 {
            ModelNextHop::NoRoute
        } else {
            next_hop(&backend.addr, p.tot_len.wrapping_add(20))
        };
        let our_mac: [u8; 6] = pkt[0..6].try_into().unwrap();
        let peer_mac: [u8; 6] = pkt[6..12].try_into().unwrap();
        let encap = |dmac: [u8; 6], smac: [u8; 6]| {
            encapsulate(
                pkt,
                &p,
                outer_src,
                backend.addr[0],
                cfg.outer_ttl,
                dmac,
                smac,
            )
        };
        match hop {
            ModelNextHop::Resolved {
                smac,
                dmac,
                ifindex,
            } => {
                d.output = encap(dmac, smac);
                if ifindex == ingress_ifindex {
                    d.finish(Reason::Tx, Action::Tx)
                } else {
                    d.finish(Reason::Redirect, Action::Redirect { ifindex })
                }
            }
            ModelNextHop::NoNeighbour => {
                d.output = encap(our_mac, peer_mac);
                d.finish(Reason::PassNoNeighbour, Action::Pass)
            }
            ModelNextHop::TooBig => d.finish(Reason::DropTooBig, Action::Drop),
            ModelNextHop::NoRoute => {
                if cfg.flags & SETTINGS_F_GATEWAY_MAC == 0 {
                    return d.finish(Reason::DropNoRoute, Action::Drop);
                }
                d.output = encap(cfg.gateway_mac, our_mac);
                d.reasons.push(Reason::FibFallbackGateway);
                d.finish(Reason::Tx, Action::Tx)
            }
        }
    }
}

impl Decision {
    fn finish(mut self, reason: Reason, action: Action) -> Decision {
        self.reasons.push(reason);
        self.action = action;
        self
    }
}

/// The encapsulated packet: Ethernet (VLAN tag kept) + outer IPv4 + the
/// original IP packet and anything after it, unchanged.
fn encapsulate(
    pkt: &[u8],
    p: &ParsedIpv4,
    src: u32,
    dst: u32,
    ttl: u8,
    dmac: [u8; 6],
    smac: [u8; 6],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(pkt.len() + 20);
    out.extend_from_slice(&dmac);
    out.extend_from_slice(&smac);
    if p.l2_len == 18 {
        out.extend_from_slice(&pkt[12..16]);
    }
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = p.tos;
    ip[2..4].copy_from_slice(&(p.tot_len.wrapping_add(20)).to_be_bytes());
    ip[4..6].copy_from_slice(&p.id);
    ip[6..8].copy_from_slice(&(if p.dont_fragment { 0x4000u16 } else { 0 }).to_be_bytes());
    ip[8] = ttl;
    ip[9] = PROTO_IPIP;
    ip[12..16].copy_from_slice(&src.to_ne_bytes());
    ip[16..20].copy_from_slice(&dst.to_ne_bytes());
    let check = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&pkt[p.l2_len..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_header() {
        // Example header from RFC 1071 discussions (checksum field zeroed).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&h), 0xb861);
    }

    #[test]
    fn truncated_and_foreign_frames() {
        assert_eq!(parse(&[0u8; 10]), ModelParse::Malformed);
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp), ModelParse::NotIpv4);
    }
}
