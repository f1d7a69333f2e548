//! Fixtures for IPv6, every VIP/backend family combination, GUE and ICMP:
//! the real program under `BPF_PROG_TEST_RUN`, each packet also checked
//! against the reference model (action, bytes, counters, connection table)
//! by the harness, and here field by field against the specification.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    PROTO_TCP, PROTO_UDP,
    flow_hash::flow_hash,
    maps::{FlowKey, Reason, VIP_F_GUE, VipKey},
    model::{Action, checksum_with, ipv4_checksum, ipv6_pseudo_sum},
    settings::Settings,
};
use lb_tests::{
    fixture::{Harness, LB1_MAC, LB1_PEER_MAC, backend, backend6},
    have_root,
    packets::{self, Ext, LB_MAC, ROUTER_MAC, TcpKind, v6},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: &str = "2001:db8::7";
const ROUTER6: &str = "2001:db8:ffff::1";
/// IPv6 VIP: TCP 80 to IPv6 backends (IP6IP6), UDP 53 to IPv4 backends (6in4).
const VIP6: &str = "fd00::10";
/// IPv4 VIP: TCP 80 to IPv6 backends behind lb1 (4in6, redirected).
const VIP4_TO_V6: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
/// GUE VIPs: IPv4 -> IPv4 and IPv6 -> IPv6.
const VIP4_GUE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 21);
const VIP6_GUE: &str = "fd00::11";
/// IPv6 VIP whose backend has no resolved neighbour.
const VIP6_NO_NEIGH: &str = "fd00::12";

fn ip6(s: &str) -> IpAddr {
    IpAddr::V6(v6(s))
}

fn client6() -> IpAddr {
    ip6(CLIENT6)
}

fn harness(settings: Settings) -> Harness {
    let mut h = Harness::new(settings);
    h.add_vip(
        VipKey::new(ip6(VIP6), 80, PROTO_TCP),
        1,
        &[
            backend6(1, 0x50, 1, 1),
            backend6(2, 0x50, 2, 1),
            backend6(3, 0x50, 3, 1),
        ],
        1009,
    );
    h.add_vip(
        VipKey::new(ip6(VIP6), 53, PROTO_UDP),
        2,
        &[
            backend(11, [10, 50, 0, 4], 1),
            backend(12, [10, 50, 0, 5], 1),
        ],
        1009,
    );
    h.add_vip(
        VipKey::new(IpAddr::V4(VIP4_TO_V6), 80, PROTO_TCP),
        3,
        &[backend6(21, 0x60, 1, 1), backend6(22, 0x60, 2, 1)],
        1009,
    );
    h.add_vip_with_flags(
        VipKey::new(IpAddr::V4(VIP4_GUE), 80, PROTO_TCP),
        4,
        VIP_F_GUE,
        &[backend(31, [10, 50, 0, 6], 1)],
        1009,
    );
    h.add_vip_with_flags(
        VipKey::new(ip6(VIP6_GUE), 80, PROTO_TCP),
        5,
        VIP_F_GUE,
        &[backend6(41, 0x50, 7, 1)],
        1009,
    );
    h.add_vip(
        VipKey::new(ip6(VIP6_NO_NEIGH), 80, PROTO_TCP),
        6,
        &[backend6(51, 0x70, 1, 1)],
        1009,
    );
    h
}

fn hash_of(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> u32 {
    flow_hash(
        &FlowKey::new(src, sport, dst, dport, proto),
        Settings::DEFAULT.hash_seed,
    )
}

/// What an encapsulated frame must look like.
struct Expect {
    dmac: [u8; 6],
    smac: [u8; 6],
    /// Outer family and GUE.
    outer_v6: bool,
    gue: bool,
    /// The flow hash (outer source, flow label, GUE source port).
    hash: u32,
}

/// Checks every outer field of `out` (which encapsulates `input`) and
/// returns the outer destination address.
fn assert_encapsulated(out: &[u8], input: &[u8], e: &Expect) -> IpAddr {
    let inner = &input[14..];
    let inner_v6 = inner[0] >> 4 == 6;
    let ip_hdr = if e.outer_v6 { 40 } else { 20 };
    let overhead = ip_hdr + if e.gue { 8 } else { 0 };
    assert_eq!(
        out.len(),
        input.len() + overhead,
        "grows by the outer headers"
    );
    assert_eq!(&out[0..6], &e.dmac, "destination MAC");
    assert_eq!(&out[6..12], &e.smac, "source MAC");
    let inner_len = if inner_v6 {
        40 + u16::from_be_bytes([inner[4], inner[5]])
    } else {
        u16::from_be_bytes([inner[2], inner[3]])
    };
    let inner_tos = if inner_v6 {
        ((u16::from_be_bytes([inner[0], inner[1]]) >> 4) & 0xFF) as u8
    } else {
        inner[1]
    };
    let carried = if e.gue {
        17
    } else if inner_v6 {
        41
    } else {
        4
    };
    let o = &out[14..];
    let dst = if e.outer_v6 {
        assert_eq!(&out[12..14], &[0x86, 0xdd], "IPv6 ethertype");
        let vcf = u32::from_be_bytes([o[0], o[1], o[2], o[3]]);
        assert_eq!(vcf >> 28, 6, "version 6");
        assert_eq!((vcf >> 20) as u8, inner_tos, "traffic class copied");
        assert_eq!(
            vcf & 0xFFFFF,
            e.hash & 0xFFFFF,
            "flow label from the flow hash"
        );
        assert_eq!(
            u16::from_be_bytes([o[4], o[5]]),
            inner_len + (overhead - 40) as u16,
            "payload length"
        );
        assert_eq!(o[6], carried, "next header");
        assert_eq!(o[7], 64, "hop limit");
        assert_eq!(
            &o[8..20],
            &[0xfd, 0, 0x01, 0x72, 0, 0x16, 0, 0, 0, 0, 0, 0],
            "outer source inside fd00:172:16::/96"
        );
        assert_eq!(
            &o[20..24],
            &e.hash.to_ne_bytes(),
            "flow hash in the last 32 bits"
        );
        IpAddr::from(<[u8; 16]>::try_from(&o[24..40]).unwrap())
    } else {
        assert_eq!(&out[12..14], &[0x08, 0x00], "IPv4 ethertype");
        assert_eq!(o[0], 0x45);
        assert_eq!(o[1], inner_tos, "TOS copied");
        assert_eq!(
            u16::from_be_bytes([o[2], o[3]]),
            inner_len + overhead as u16,
            "total length"
        );
        if inner_v6 {
            assert_eq!(&o[4..6], &[0, 0], "no identification for IPv6 inside");
            assert_eq!(o[6] & 0x40, 0x40, "DF: IPv6 is never fragmented on the way");
        }
        assert_eq!(o[8], 64, "TTL");
        assert_eq!(o[9], carried, "protocol");
        assert_eq!(ipv4_checksum(&o[..20]), 0, "header checksum");
        assert_eq!(&o[12..14], &[172, 16], "outer source inside 172.16.0.0/16");
        IpAddr::from(<[u8; 4]>::try_from(&o[16..20]).unwrap())
    };
    if e.gue {
        let u = &o[ip_hdr..ip_hdr + 8];
        assert_eq!(
            u16::from_be_bytes([u[0], u[1]]),
            0xC000 | (e.hash & 0x3FFF) as u16,
            "GUE source port from the flow hash"
        );
        assert_eq!(u16::from_be_bytes([u[2], u[3]]), 6080, "GUE port");
        assert_eq!(
            u16::from_be_bytes([u[4], u[5]]),
            inner_len + 8,
            "UDP length"
        );
        assert_eq!(&u[6..8], &[0, 0], "zero UDP checksum");
    }
    assert_eq!(&out[14 + overhead..], inner, "inner packet unchanged");
    dst
}

fn in_net(addr: IpAddr, prefix: &str) -> bool {
    addr.to_string().starts_with(prefix)
}

#[test]
fn every_family_combination_and_gue() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let c6 = client6();
    let c4 = IpAddr::V4(CLIENT4);
    let tx = |outer_v6, gue, hash| Expect {
        dmac: ROUTER_MAC,
        smac: LB_MAC,
        outer_v6,
        gue,
        hash,
    };

    // IPv6 -> IPv6 (IP6IP6): SYN then ACK, same backend, tracked.
    let syn = packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Syn, 0);
    let hash = hash_of(c6, 40_000, ip6(VIP6), 80, PROTO_TCP);
    let o = h.send(&syn);
    assert_eq!(o.model.reasons, [Reason::ConntrackMiss, Reason::Tx]);
    let chosen = assert_encapsulated(&o.kernel.packet, &syn, &tx(true, false, hash));
    assert!(in_net(chosen, "fd00:50::"), "{chosen}");
    let ack = packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Ack, 100);
    let o = h.send(&ack);
    assert_eq!(o.model.reasons, [Reason::ConntrackHit, Reason::Tx]);
    assert_eq!(
        assert_encapsulated(&o.kernel.packet, &ack, &tx(true, false, hash)),
        chosen
    );
    let mut seen = std::collections::BTreeSet::new();
    for port in 41_000..41_040 {
        let p = packets::tcp_ip(c6, port, ip6(VIP6), 80, TcpKind::Syn, 0);
        let hash = hash_of(c6, port, ip6(VIP6), 80, PROTO_TCP);
        seen.insert(assert_encapsulated(
            &h.send(&p).kernel.packet,
            &p,
            &tx(true, false, hash),
        ));
    }
    assert_eq!(seen.len(), 3, "40 IPv6 flows reach every backend");

    // IPv6 -> IPv4 (6in4), UDP.
    let udp = packets::udp_ip(c6, 5353, ip6(VIP6), 53, 40);
    let hash = hash_of(c6, 5353, ip6(VIP6), 53, PROTO_UDP);
    let o = h.send(&udp);
    assert_eq!(o.model.action, Action::Tx);
    let dst = assert_encapsulated(&o.kernel.packet, &udp, &tx(false, false, hash));
    assert!(in_net(dst, "10.50.0."), "{dst}");

    // IPv4 -> IPv6 (4in6), redirected out of lb1.
    let p = packets::tcp_ip(c4, 40_000, IpAddr::V4(VIP4_TO_V6), 80, TcpKind::Syn, 0);
    let hash = hash_of(c4, 40_000, IpAddr::V4(VIP4_TO_V6), 80, PROTO_TCP);
    let o = h.send(&p);
    assert_eq!(o.model.action, Action::Redirect { ifindex: h.lb1 });
    let e = Expect {
        dmac: LB1_PEER_MAC,
        smac: LB1_MAC,
        ..tx(true, false, hash)
    };
    let dst = assert_encapsulated(&o.kernel.packet, &p, &e);
    assert!(in_net(dst, "fd00:60::"), "{dst}");

    // GUE, IPv4 in IPv4 and IPv6 in IPv6.
    let p = packets::tcp_ip(c4, 40_000, IpAddr::V4(VIP4_GUE), 80, TcpKind::Syn, 10);
    let hash = hash_of(c4, 40_000, IpAddr::V4(VIP4_GUE), 80, PROTO_TCP);
    let dst = assert_encapsulated(&h.send(&p).kernel.packet, &p, &tx(false, true, hash));
    assert_eq!(dst, "10.50.0.6".parse::<IpAddr>().unwrap());
    let p = packets::tcp_ip(c6, 40_000, ip6(VIP6_GUE), 80, TcpKind::Syn, 10);
    let hash = hash_of(c6, 40_000, ip6(VIP6_GUE), 80, PROTO_TCP);
    let dst = assert_encapsulated(&h.send(&p).kernel.packet, &p, &tx(true, true, hash));
    assert_eq!(dst, ip6("fd00:50::7"));

    // IPv6 next hop not resolved: handed to the kernel, our MAC kept.
    let p = packets::tcp_ip(c6, 40_000, ip6(VIP6_NO_NEIGH), 80, TcpKind::Syn, 0);
    let hash = hash_of(c6, 40_000, ip6(VIP6_NO_NEIGH), 80, PROTO_TCP);
    let o = h.send(&p);
    assert_eq!(
        o.model.reasons,
        [Reason::ConntrackMiss, Reason::PassNoNeighbour]
    );
    let e = Expect {
        dmac: LB_MAC,
        smac: ROUTER_MAC,
        ..tx(true, false, hash)
    };
    assert_encapsulated(&o.kernel.packet, &p, &e);

    // Not a VIP: an IPv6 address whose last 96 bits are zero must not
    // match an IPv4 VIP (the keys carry the family), nor other ports.
    let lookalike = ip6("a00:14::");
    for (p, reason) in [
        (
            packets::tcp_ip(c6, 1, lookalike, 80, TcpKind::Syn, 0),
            Reason::PassNotVip,
        ),
        // The VIP's address, not one of its services: dropped, not looped.
        (
            packets::tcp_ip(c6, 1, ip6(VIP6), 81, TcpKind::Syn, 0),
            Reason::DropNotAService,
        ),
        (
            packets::udp_ip(c6, 1, ip6(VIP6), 80, 0),
            Reason::DropNotAService,
        ),
    ] {
        let o = h.send(&p);
        assert_eq!(o.model.reasons, [reason]);
        assert_eq!(o.kernel.packet, p);
    }
}

#[test]
fn ipv6_extension_headers() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let c6 = client6();
    let plain = packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Syn, 0);
    let chosen = h.send(&plain).model.backend_id.unwrap();
    // Ports behind up to four extension headers: the same flow, tracked.
    for exts in [
        vec![Ext::HopByHop],
        vec![Ext::HopByHop, Ext::DestinationOptions],
        vec![Ext::HopByHop, Ext::Routing, Ext::DestinationOptions],
        vec![
            Ext::HopByHop,
            Ext::Routing,
            Ext::DestinationOptions,
            Ext::DestinationOptions,
        ],
    ] {
        let ack = packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Ack, 20);
        let p = packets::with_ipv6_extensions(&ack, &exts);
        let o = h.send(&p);
        assert_eq!(
            o.model.reasons,
            [Reason::ConntrackHit, Reason::Tx],
            "{exts:?}"
        );
        assert_eq!(o.model.backend_id, Some(chosen), "{exts:?}");
    }
    // A fifth header is beyond the bounded walk: passed, counted.
    let ack = packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Ack, 20);
    let five = packets::with_ipv6_extensions(
        &ack,
        &[
            Ext::HopByHop,
            Ext::Routing,
            Ext::DestinationOptions,
            Ext::Routing,
            Ext::DestinationOptions,
        ],
    );
    let o = h.send(&five);
    assert_eq!(o.model.reasons, [Reason::PassMalformed]);
    assert_eq!(o.kernel.packet, five);
    // Fragments (first with M, and a later one): hashed on addresses, all
    // to one backend, untracked. An atomic fragment (offset 0, no M) is not one.
    let udp = packets::udp_ip(c6, 7000, ip6(VIP6), 53, 100);
    let first = packets::with_ipv6_extensions(
        &udp,
        &[Ext::Fragment {
            offset: 0,
            more: true,
        }],
    );
    let later = packets::with_ipv6_extensions(
        &packets::udp_ip(c6, 1, ip6(VIP6), 2, 100),
        &[
            Ext::HopByHop,
            Ext::Fragment {
                offset: 100,
                more: false,
            },
        ],
    );
    let o1 = h.send(&first);
    let o2 = h.send(&later);
    assert_eq!(o1.model.reasons, [Reason::Fragment, Reason::Tx]);
    assert_eq!(o2.model.reasons, [Reason::Fragment, Reason::Tx]);
    assert_eq!(o1.model.backend_id, o2.model.backend_id);
    assert!(o1.model.conntrack_write.is_none() && o2.model.conntrack_write.is_none());
    let atomic = packets::with_ipv6_extensions(
        &udp,
        &[Ext::Fragment {
            offset: 0,
            more: false,
        }],
    );
    assert_eq!(
        h.send(&atomic).model.reasons,
        [Reason::ConntrackMiss, Reason::Tx]
    );
}

/// The ICMP/ICMPv6 message of `frame` has a valid checksum.
fn icmp_checksum_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    if ip[0] >> 4 == 6 {
        let len = u16::from_be_bytes([ip[4], ip[5]]) as u32;
        let sum = ipv6_pseudo_sum(&ip[8..24], &ip[24..40], len, 58);
        checksum_with(sum, &ip[40..40 + len as usize]) == 0
    } else {
        let ihl = (ip[0] & 0x0F) as usize * 4;
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        checksum_with(0, &ip[ihl..tot]) == 0 && ipv4_checksum(&ip[..ihl]) == 0
    }
}

#[test]
fn echo_requests_to_vip_addresses_are_answered() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    for (client, vip) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4_TO_V6)),
        (client6(), ip6(VIP6)),
    ] {
        let req = packets::echo_request(client, vip, 77, 5, 56);
        assert!(icmp_checksum_ok(&req));
        let o = h.send(&req);
        assert_eq!(o.model.reasons, [Reason::IcmpEchoReply], "{vip}");
        assert_eq!(o.model.action, Action::Tx);
        let r = &o.kernel.packet;
        assert_eq!(r.len(), req.len());
        assert_eq!(&r[0..6], &ROUTER_MAC, "back to the sender's MAC");
        assert_eq!(&r[6..12], &LB_MAC);
        let ip = &r[14..];
        let (src, dst, ttl, icmp) = if vip.is_ipv6() {
            (
                IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()),
                IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()),
                ip[7],
                &ip[40..],
            )
        } else {
            (
                IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()),
                IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
                ip[8],
                &ip[20..],
            )
        };
        assert_eq!((src, dst), (vip, client), "addresses swapped");
        assert_eq!(ttl, 64);
        assert_eq!(icmp[0], if vip.is_ipv6() { 129 } else { 0 }, "echo reply");
        let req_icmp = &req[r.len() - icmp.len()..];
        assert_eq!(
            &icmp[4..],
            &req_icmp[4..],
            "identifier, sequence, data kept"
        );
        assert!(icmp_checksum_ok(r), "reply checksums valid");
    }
    // Not a VIP address: passed.
    let p = packets::echo_request(client6(), ip6("fd00::99"), 1, 1, 8);
    assert_eq!(h.send(&p).model.reasons, [Reason::PassNotVip]);
}

#[test]
fn icmp_errors_reach_the_backend_of_the_flow_they_quote() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let router4: IpAddr = "198.51.100.1".parse().unwrap();
    for (client, vip, router) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4_TO_V6), router4),
        (client6(), ip6(VIP6), ip6(ROUTER6)),
    ] {
        for sport in [40_000u16, 40_001, 40_002, 40_003] {
            let syn = packets::tcp_ip(client, sport, vip, 80, TcpKind::Syn, 0);
            let backend = h.send(&syn).model.backend_id.unwrap();
            // The backend's answer VIP -> client, as a router quotes it.
            let reply = packets::tcp_ip(vip, 80, client, sport, TcpKind::SynAck, 1300);
            let quote_len = if vip.is_ipv6() { 1000 } else { 548 };
            let err = packets::icmp_too_big_error(router, vip, 1280, &reply[14..14 + quote_len]);
            let o = h.send(&err);
            // IPv6 backends of the IPv4 VIP sit behind lb1.
            let outcome = if vip.is_ipv6() {
                Reason::Tx
            } else {
                Reason::Redirect
            };
            assert_eq!(
                o.model.reasons,
                [Reason::IcmpErrorForwarded, Reason::ConntrackHit, outcome],
                "{vip}"
            );
            assert_eq!(o.model.backend_id, Some(backend), "the flow's backend");
            assert!(o.model.conntrack_write.is_none(), "errors are not tracked");
        }
        // A quote whose source is not the error's destination: not ours.
        let other = packets::tcp_ip(client, 80, client, 40_000, TcpKind::SynAck, 0);
        let err = packets::icmp_too_big_error(router, vip, 1280, &other[14..]);
        assert_eq!(h.send(&err).model.reasons, [Reason::DropNotAService]);
        // A quote cut before the ports: not ours either.
        let reply = packets::tcp_ip(vip, 80, client, 40_000, TcpKind::SynAck, 0);
        let cut = if vip.is_ipv6() { 42 } else { 22 };
        let err = packets::icmp_too_big_error(router, vip, 1280, &reply[14..14 + cut]);
        assert_eq!(h.send(&err).model.reasons, [Reason::DropNotAService]);
    }
}

/// Checks a too-big answer to `input` field by field; `mtu` is the value it must report.
fn assert_too_big_reply(out: &[u8], input: &[u8], client: IpAddr, vip: IpAddr, mtu: u32) {
    assert_eq!(&out[0..6], &ROUTER_MAC, "back the way it came");
    assert_eq!(&out[6..12], &LB_MAC);
    let ip = &out[14..];
    if vip.is_ipv6() {
        assert_eq!(out.len(), 14 + 40 + 8 + 256);
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 8 + 256);
        assert_eq!((ip[6], ip[7]), (58, 64), "ICMPv6, hop limit 64");
        assert_eq!(&ip[8..24], &v6(&vip.to_string()).octets(), "from the VIP");
        assert_eq!(
            &ip[24..40],
            &v6(&client.to_string()).octets(),
            "to the client"
        );
        assert_eq!((ip[40], ip[41]), (2, 0), "packet too big");
        assert_eq!(u32::from_be_bytes([ip[44], ip[45], ip[46], ip[47]]), mtu);
        assert_eq!(&ip[48..], &input[14..14 + 256], "quotes the packet");
    } else {
        assert_eq!(out.len(), 14 + 20 + 8 + 128);
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 128);
        assert_eq!((ip[8], ip[9]), (64, 1), "TTL 64, ICMP");
        assert_eq!(IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()), vip);
        assert_eq!(
            IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
            client
        );
        assert_eq!((ip[20], ip[21]), (3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([ip[26], ip[27]]) as u32, mtu);
        assert_eq!(&ip[28..], &input[14..14 + 128], "quotes the packet");
    }
    assert!(icmp_checksum_ok(out), "checksums valid");
}

#[test]
fn too_big_packets_are_answered_with_the_mtu_to_use() {
    if !have_root() {
        return;
    }
    // The configured MTU (1500), then with it off, the egress MTU the FIB
    // reports (also 1500): the same answers.
    for settings in [
        Settings::DEFAULT,
        Settings {
            mtu: 0,
            ..Settings::DEFAULT
        },
    ] {
        let mut h = harness(settings);
        let c4 = IpAddr::V4(CLIENT4);
        let c6 = client6();
        // IPv6 in IPv6: 40 bytes of overhead.
        let p = packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Ack, 1500 - 60);
        let o = h.send(&p);
        assert_eq!(
            o.model.reasons,
            [Reason::ConntrackMiss, Reason::IcmpTooBigSent]
        );
        assert_too_big_reply(&o.kernel.packet, &p, c6, ip6(VIP6), 1460);
        // 1460 fits.
        let p = packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Ack, 1460 - 60);
        assert_eq!(h.send(&p).model.action, Action::Tx);
        // IPv4 with DF into IPv6: 40 bytes; over GUE in IPv4: 28.
        let p = packets::tcp_ip(c4, 40_000, IpAddr::V4(VIP4_TO_V6), 80, TcpKind::Ack, 1470);
        assert_too_big_reply(
            &h.send(&p).kernel.packet,
            &p,
            c4,
            IpAddr::V4(VIP4_TO_V6),
            1460,
        );
        let p = packets::tcp_ip(c4, 40_000, IpAddr::V4(VIP4_GUE), 80, TcpKind::Ack, 1460);
        assert_too_big_reply(
            &h.send(&p).kernel.packet,
            &p,
            c4,
            IpAddr::V4(VIP4_GUE),
            1472,
        );
        // Without DF the client may not be told: dropped, counted.
        let p = packets::set_df(p, false);
        assert_eq!(
            h.send(&p).model.reasons,
            [Reason::ConntrackHit, Reason::DropTooBig]
        );
    }
}

#[test]
fn ipv6_and_icmp_frames_truncated_or_with_bad_lengths() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let c6 = client6();
    let reply = packets::tcp_ip(ip6(VIP6), 80, c6, 40_000, TcpKind::SynAck, 0);
    let reply4 = packets::tcp_ip(
        IpAddr::V4(VIP4_TO_V6),
        80,
        IpAddr::V4(CLIENT4),
        40_000,
        TcpKind::SynAck,
        0,
    );
    let frames = [
        packets::with_ipv6_extensions(
            &packets::tcp_ip(c6, 40_000, ip6(VIP6), 80, TcpKind::Ack, 8),
            &[Ext::HopByHop, Ext::DestinationOptions],
        ),
        packets::echo_request(c6, ip6(VIP6), 1, 1, 16),
        packets::icmp_too_big_error(ip6(ROUTER6), ip6(VIP6), 1280, &reply[14..]),
        packets::icmp_too_big_error(
            "198.51.100.1".parse().unwrap(),
            IpAddr::V4(VIP4_TO_V6),
            1280,
            &reply4[14..],
        ),
    ];
    for frame in &frames {
        // BPF_PROG_TEST_RUN takes nothing shorter than an Ethernet header.
        for len in 14..=frame.len() {
            // Cut short as is (the length fields then overrun the frame)...
            h.send_batched(&frame[..len]);
            // ...and with the IP length fields matching the cut.
            let mut cut = frame[..len].to_vec();
            if len >= 14 + 40 && cut[14] >> 4 == 6 {
                let payload = (len - 54) as u16;
                cut[18..20].copy_from_slice(&payload.to_be_bytes());
            } else if len >= 14 + 20 && cut[14] >> 4 == 4 {
                cut = packets::with_total_length(&cut, (len - 14) as u16);
            }
            h.send_batched(&cut);
        }
    }
    h.assert_counters();
}
