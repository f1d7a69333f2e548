//! The reference model: for a packet and the maps' contents, what the XDP
//! program must do (action, backend, counters, output bytes, connection
//! table write). Written as plain host code from the specification, not
//! from the program, so the two check each other; the fixture tests and the
//! differential fuzzer compare them packet by packet.

mod craft;
mod decap;
mod parse;

use std::{collections::BTreeMap, collections::HashMap, vec::Vec};

pub use craft::{
    Outer, checksum_update, checksum_with, encapsulate, encapsulate_nested, gue_source_port,
    ipv4_checksum, ipv6_pseudo_sum,
};
pub use decap::{DecapDecision, DecapNextHop, LocalSocket, decap_decide};
pub use parse::{IcmpKind, MAX_EXTENSION_HEADERS, ModelParse, ParsedIp, ip_bytes, parse};

use crate::{
    PROTO_TCP, PROTO_UDP, TOO_BIG_QUOTE_V4, TOO_BIG_QUOTE_V6,
    flow_hash::flow_hash,
    maps::{
        Addr, BACKEND_F_IPV6, BACKEND_F_RETIRED, BACKEND_F_VALID, Backend, ConnEntry, FlowKey,
        PrevTable, QuicServerKey, Reason, VIP_F_GUE, VIP_F_QUIC, VIP_KIND_ADDRESS,
        VIP_KIND_FRAGMENTS, VIP_KIND_PORT, VipKey, VipMeta,
    },
    quic_lb::{QuicHeader, classify},
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
    /// `PREV_TABLES` by vip id; absent = none.
    pub prev_tables: BTreeMap<u32, PrevTable>,
    /// `QUIC_SERVERS`: (vip id, server id) -> backend id.
    pub quic_servers: BTreeMap<QuicServerKey, u32>,
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
    /// "Fragmentation needed": the egress MTU.
    TooBig {
        mtu: u16,
    },
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
    /// The second hop's backend id (second-chance forwarding).
    pub second_hop: Option<u32>,
    /// The packet as the program leaves it.
    pub output: Vec<u8>,
    /// A connection table entry the program writes (flow, backend id).
    pub conntrack_write: Option<(FlowKey, u32)>,
    /// The second hop that entry records (a flow first seen on a second chance).
    pub conntrack_write_second: Option<u32>,
}

/// The per-address key of the packet's destination: is it a VIP address?
fn address_key(p: &ParsedIp) -> VipKey {
    VipKey {
        addr: p.flow.dst,
        kind: VIP_KIND_ADDRESS,
        family: p.flow.family,
        ..VipKey::default()
    }
}

impl ModelMaps {
    fn lookup_vip(&self, p: &ParsedIp) -> Option<VipMeta> {
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
            family: p.flow.family,
            _pad: [0; 3],
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

    /// The backend the flow's slot had in the VIP's previous table, if
    /// that is another backend of this VIP that may have the connection.
    fn previous_owner(&self, vip: &VipMeta, hash: u32, current: u32) -> Option<(u32, Backend)> {
        let prev = self.prev_tables.get(&vip.vip_id).filter(|t| t.size != 0)?;
        let slot = prev.offset.wrapping_add(hash % prev.size);
        let id = self.slots.get(&slot).copied().unwrap_or(0);
        self.second_hop_backend(vip, id, current)
    }

    /// Backend `id` as a second hop after `current`: another backend of
    /// this VIP, valid or retired (removed, address kept); a failed one is not.
    fn second_hop_backend(&self, vip: &VipMeta, id: u32, current: u32) -> Option<(u32, Backend)> {
        if id == current {
            return None;
        }
        let b = self.backends.get(&id).filter(|b| {
            b.vip_id == vip.vip_id && b.flags & (BACKEND_F_VALID | BACKEND_F_RETIRED) != 0
        })?;
        Some((id, *b))
    }

    /// A QUIC VIP's UDP datagram: the backend its connection ID names, if
    /// that is a valid backend of the VIP; else `None` (balanced as any
    /// UDP flow). Counts what it found.
    fn quic_route(
        &self,
        pkt: &[u8],
        p: &ParsedIp,
        vip: &VipMeta,
        reasons: &mut Vec<Reason>,
    ) -> Option<(u32, Backend)> {
        if vip.flags & VIP_F_QUIC == 0 || p.icmp != IcmpKind::None || p.flow.proto != PROTO_UDP {
            return None;
        }
        let (offset, len) = p.udp_payload?;
        let payload = &ip_bytes(pkt, p)[offset..offset + len];
        let server_id = match classify(payload, vip.flags) {
            QuicHeader::Long => {
                reasons.push(Reason::QuicLongHeader);
                return None;
            }
            QuicHeader::Unroutable => {
                reasons.push(Reason::QuicUnknownServer);
                return None;
            }
            QuicHeader::Short { server_id } => server_id,
        };
        let key = QuicServerKey {
            vip_id: vip.vip_id,
            server_id,
        };
        let Some(&id) = self.quic_servers.get(&key) else {
            reasons.push(Reason::QuicUnknownServer);
            return None;
        };
        let Some(b) = self.valid_backend(id, vip) else {
            reasons.push(Reason::QuicServerDown);
            return None;
        };
        reasons.push(Reason::QuicRouted);
        Some((id, b))
    }

    /// Records what the program wrote to the connection table.
    pub fn apply(&mut self, d: &Decision, now_ns: u64) {
        if let Some((flow, backend_id)) = d.conntrack_write {
            let hash = flow_hash(&flow, self.settings.hash_seed);
            let entry = match d.conntrack_write_second {
                Some(second) => ConnEntry::with_second_hop(backend_id, second, hash, now_ns),
                None => ConnEntry {
                    backend_id,
                    hash,
                    atime_ns: now_ns,
                },
            };
            self.conntrack.insert(flow, entry);
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
            second_hop: None,
            output: pkt.to_vec(),
            conntrack_write: None,
            conntrack_write_second: None,
        };
        let p = match parse(pkt) {
            ModelParse::NotIp => return d.finish(Reason::PassNotIp, Action::Pass),
            ModelParse::Malformed => return d.finish(Reason::PassMalformed, Action::Pass),
            ModelParse::Ip(p) => p,
        };
        if p.icmp == IcmpKind::EchoRequest {
            let Some(vip) = self.vips.get(&address_key(&p)) else {
                return d.finish(Reason::PassNotVip, Action::Pass);
            };
            d.vip_id = Some(vip.vip_id);
            d.output = craft::echo_reply(pkt, &p);
            return d.finish(Reason::IcmpEchoReply, Action::Tx);
        }
        let Some(vip) = self.lookup_vip(&p) else {
            if self.vips.contains_key(&address_key(&p)) {
                return d.finish(Reason::DropNotAService, Action::Drop);
            }
            return d.finish(Reason::PassNotVip, Action::Pass);
        };
        d.vip_id = Some(vip.vip_id);
        if vip.table_size == 0 {
            return d.finish(Reason::DropNoBackend, Action::Drop);
        }
        let cfg = self.settings;
        let hash = flow_hash(&p.flow, cfg.hash_seed);
        let is_icmp_error = p.icmp == IcmpKind::Error;
        let mut second = None;
        let chosen = if p.is_fragment {
            d.reasons.push(Reason::Fragment);
            let id = self.maglev_pick(&vip, hash);
            self.valid_backend(id, &vip).map(|b| (id, b))
        } else {
            if is_icmp_error {
                d.reasons.push(Reason::IcmpErrorForwarded);
            }
            let is_syn = p.tcp_flags & 0x12 == 0x02;
            let quic = self.quic_route(pkt, &p, &vip, &mut d.reasons);
            // Routed by its connection ID: the connection table is not read.
            let tracked = (quic.is_none() && !is_syn)
                .then(|| self.conntrack.get(&p.flow))
                .flatten()
                .and_then(|e| {
                    let fresh = p.flow.proto != PROTO_UDP
                        || now_ns.is_none_or(|now| {
                            now.wrapping_sub(e.atime_ns) <= cfg.udp_idle_timeout_ns
                        });
                    let b = self.valid_backend(e.backend_id, &vip)?;
                    fresh.then_some((e.backend_id, b, e.second_hop()))
                });
            if quic.is_some() {
                quic
            } else if let Some((id, b, recorded_second)) = tracked {
                d.reasons.push(Reason::ConntrackHit);
                // Recorded on a second chance: the same two hops every time.
                if recorded_second != 0 {
                    second = self.second_hop_backend(&vip, recorded_second, id);
                    if second.is_some() {
                        d.reasons.push(Reason::SecondChance);
                    }
                }
                Some((id, b))
            } else {
                d.reasons.push(Reason::ConntrackMiss);
                let id = self.maglev_pick(&vip, hash);
                let b = self.valid_backend(id, &vip);
                // Mid-connection TCP this instance never saw: the previous
                // owner of the slot may have it (second chance).
                if b.is_some() && p.flow.proto == PROTO_TCP && !is_syn && !is_icmp_error {
                    second = self.previous_owner(&vip, hash, id);
                }
                if second.is_some() {
                    d.reasons.push(Reason::SecondChance);
                }
                if b.is_some() && p.tcp_flags & 0x04 == 0 && !is_icmp_error {
                    // RSTs and ICMP errors end or report on a flow: never
                    // recorded. A second chance is recorded with both hops,
                    // so later table changes do not lose the flow here.
                    d.conntrack_write = Some((p.flow, id));
                    d.conntrack_write_second = second.map(|(s, _)| s);
                }
                b.map(|b| (id, b))
            }
        };
        let Some((backend_id, backend)) = chosen else {
            return d.finish(Reason::DropNoBackend, Action::Drop);
        };
        d.backend_id = Some(backend_id);
        let v6 = backend.flags & BACKEND_F_IPV6 != 0;
        let outer = Outer {
            v6,
            gue: vip.flags & VIP_F_GUE != 0,
            src: encap_source(&cfg, v6, hash),
            dst: backend.addr,
            ttl: cfg.outer_ttl,
            hash,
            gue_port: cfg.gue_port,
        };
        let second = second.map(|(id, b): (u32, Backend)| {
            d.second_hop = Some(id);
            let v6 = b.flags & BACKEND_F_IPV6 != 0;
            Outer {
                v6,
                src: encap_source(&cfg, v6, hash),
                dst: b.addr,
                ..outer
            }
        });
        let overhead = outer.overhead() + second.map_or(0, |s| s.overhead());
        let outer_len = p.ip_len.wrapping_add(overhead);
        if cfg.mtu != 0 && outer_len > cfg.mtu {
            return d.too_big(pkt, &p, cfg.mtu.wrapping_sub(overhead));
        }
        let hop = if cfg.flags & SETTINGS_F_NO_FIB != 0 {
            ModelNextHop::NoRoute
        } else {
            next_hop(&backend.addr, outer_len)
        };
        let our_mac: [u8; 6] = pkt[0..6].try_into().unwrap();
        let peer_mac: [u8; 6] = pkt[6..12].try_into().unwrap();
        let encap = |dmac: [u8; 6], smac: [u8; 6]| {
            encapsulate_nested(pkt, &p, &outer, second.as_ref(), dmac, smac)
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
            ModelNextHop::TooBig { mtu } => d.too_big(pkt, &p, mtu.wrapping_sub(overhead)),
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

/// The outer source address: the configured prefix, varied by flow.
fn encap_source(cfg: &Settings, v6: bool, hash: u32) -> Addr {
    if v6 {
        let s6 = cfg.encap_src6_prefix;
        [s6[0], s6[1], s6[2], hash]
    } else {
        [cfg.encap_src_prefix | (hash & !cfg.encap_src_mask), 0, 0, 0]
    }
}

impl Decision {
    fn finish(mut self, reason: Reason, action: Action) -> Decision {
        self.reasons.push(reason);
        self.action = action;
        self
    }

    /// Too big once encapsulated: tell the client the MTU it may use, unless
    /// it may not be told (IPv4 without DF, fragments, ICMP errors, or less
    /// than a quote's worth of packet), in which case drop.
    fn too_big(mut self, pkt: &[u8], p: &ParsedIp, mtu: u16) -> Decision {
        let quote = if p.v6 {
            TOO_BIG_QUOTE_V6
        } else {
            TOO_BIG_QUOTE_V4
        };
        if !p.dont_fragment
            || p.is_fragment
            || p.icmp == IcmpKind::Error
            || (p.ip_len as usize) < quote
        {
            return self.finish(Reason::DropTooBig, Action::Drop);
        }
        self.output = craft::too_big_reply(pkt, p, mtu);
        self.finish(Reason::IcmpTooBigSent, Action::Tx)
    }
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
        assert_eq!(parse(&arp), ModelParse::NotIp);
    }
}
