//! Katran-style fixture table through `BPF_PROG_TEST_RUN`: the real program,
//! real maps, every packet also checked against the reference model (action,
//! output bytes, counters, connection table). Needs root.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    PROTO_TCP, PROTO_UDP,
    maps::{Reason, VipKey},
    model::{Action, ipv4_checksum},
    settings::{SETTINGS_F_GATEWAY_MAC, Settings},
};
use lb_tests::{
    fixture::{Harness, LB1_MAC, LB1_PEER_MAC, backend, v4},
    have_root,
    packets::{self, LB_MAC, ROUTER_MAC, TcpKind},
};

const CLIENT: [u8; 4] = [192, 0, 2, 7];
const VIP_TCP: [u8; 4] = [10, 0, 0, 10];
const VIP_ANY_PORT: [u8; 4] = [10, 0, 0, 11];
const VIP_UDP: [u8; 4] = [10, 0, 0, 12];
const VIP_EMPTY: [u8; 4] = [10, 0, 0, 13];
const VIP_NO_NEIGH: [u8; 4] = [10, 0, 0, 14];
const VIP_NO_ROUTE: [u8; 4] = [10, 0, 0, 15];

fn key(addr: [u8; 4], port: u16, proto: u8) -> VipKey {
    VipKey::new(IpAddr::V4(v4(addr)), port, proto)
}

/// The standard set of VIPs the fixtures run against.
fn harness(settings: Settings) -> Harness {
    harness_with_conntrack(settings, 1 << 16)
}

fn harness_with_conntrack(settings: Settings, conntrack_entries: u32) -> Harness {
    let mut h = Harness::with_conntrack(settings, conntrack_entries);
    h.add_vip(
        key(VIP_TCP, 80, PROTO_TCP),
        1,
        &[
            backend(1, [10, 50, 0, 1], 1),
            backend(2, [10, 50, 0, 2], 1),
            backend(3, [10, 50, 0, 3], 1),
        ],
        4099,
    );
    h.add_vip(
        key(VIP_ANY_PORT, 0, PROTO_TCP),
        2,
        &[
            backend(11, [10, 60, 0, 1], 1),
            backend(12, [10, 60, 0, 2], 1),
        ],
        1009,
    );
    h.add_vip(
        key(VIP_UDP, 53, PROTO_UDP),
        3,
        &[
            backend(21, [10, 50, 0, 4], 1),
            backend(22, [10, 50, 0, 5], 1),
        ],
        1009,
    );
    h.add_vip(key(VIP_EMPTY, 80, PROTO_TCP), 4, &[], 1009);
    h.add_vip(
        key(VIP_NO_NEIGH, 80, PROTO_TCP),
        5,
        &[backend(31, [10, 70, 0, 1], 1)],
        1009,
    );
    h.add_vip(
        key(VIP_NO_ROUTE, 80, PROTO_TCP),
        6,
        &[backend(41, [10, 80, 0, 1], 1)],
        1009,
    );
    h
}

fn client(port: u16) -> (Ipv4Addr, u16) {
    (v4(CLIENT), port)
}

fn tcp(dst: [u8; 4], dport: u16, sport: u16, kind: TcpKind) -> Vec<u8> {
    let (src, sport) = client(sport);
    packets::tcp(src, sport, v4(dst), dport, kind, 0)
}

/// Checks every field of an IPIP frame against the input it encapsulates.
fn assert_ipip(
    out: &[u8],
    input: &[u8],
    l2_len: usize,
    dmac: [u8; 6],
    smac: [u8; 6],
    backends: &[[u8; 4]],
) -> [u8; 4] {
    assert_eq!(
        out.len(),
        input.len() + 20,
        "grows by exactly one IPv4 header"
    );
    assert_eq!(&out[0..6], &dmac, "destination MAC");
    assert_eq!(&out[6..12], &smac, "source MAC");
    assert_eq!(
        &out[12..l2_len],
        &input[12..l2_len],
        "ethertype / VLAN tag kept"
    );
    let outer = &out[l2_len..l2_len + 20];
    let inner = &input[l2_len..];
    assert_eq!(outer[0], 0x45, "version 4, IHL 5");
    assert_eq!(outer[1], inner[1], "TOS copied");
    assert_eq!(
        u16::from_be_bytes([outer[2], outer[3]]),
        u16::from_be_bytes([inner[2], inner[3]]) + 20,
        "total length"
    );
    assert_eq!(&outer[4..6], &inner[4..6], "identification copied");
    assert_eq!(
        outer[6] & 0x40,
        inner[6] & 0x40,
        "DF copied from the inner header"
    );
    assert_eq!(outer[6] & 0xBF, 0, "no MF, offset 0");
    assert_eq!(outer[7], 0);
    assert_eq!(outer[8], 64, "outer TTL");
    assert_eq!(outer[9], 4, "protocol IPIP");
    assert_eq!(ipv4_checksum(outer), 0, "outer header checksum valid");
    assert_eq!(
        &outer[12..14],
        &[172, 16],
        "outer source inside 172.16.0.0/16"
    );
    let dst: [u8; 4] = outer[16..20].try_into().unwrap();
    assert!(
        backends.contains(&dst),
        "outer destination {dst:?} is one of the VIP's backends"
    );
    assert_eq!(&out[l2_len + 20..], inner, "inner packet unchanged");
    dst
}

#[test]
fn fixture_table() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let tcp_backends = [[10, 50, 0, 1], [10, 50, 0, 2], [10, 50, 0, 3]];

    // TCP SYN, then ACKs of the same flow: same backend, tracked.
    let syn = tcp(VIP_TCP, 80, 40_000, TcpKind::Syn);
    let o = h.send(&syn);
    assert_eq!(o.model.action, Action::Tx);
    assert_eq!(o.model.reasons, [Reason::ConntrackMiss, Reason::Tx]);
    let chosen = assert_ipip(
        &o.kernel.packet,
        &syn,
        14,
        ROUTER_MAC,
        LB_MAC,
        &tcp_backends,
    );
    let ack = tcp(VIP_TCP, 80, 40_000, TcpKind::Ack);
    let o = h.send(&ack);
    assert_eq!(o.model.reasons, [Reason::ConntrackHit, Reason::Tx]);
    assert_eq!(
        assert_ipip(
            &o.kernel.packet,
            &ack,
            14,
            ROUTER_MAC,
            LB_MAC,
            &tcp_backends
        ),
        chosen
    );
    let with_payload = packets::tcp(v4(CLIENT), 40_000, v4(VIP_TCP), 80, TcpKind::Ack, 1000);
    assert_eq!(
        assert_ipip(
            &h.send(&with_payload).kernel.packet,
            &with_payload,
            14,
            ROUTER_MAC,
            LB_MAC,
            &tcp_backends
        ),
        chosen
    );

    // An ACK of a flow never seen (e.g. moved here by ECMP): table answer, tracked from now on.
    let o = h.send(&tcp(VIP_TCP, 80, 40_001, TcpKind::Ack));
    assert_eq!(o.model.reasons, [Reason::ConntrackMiss, Reason::Tx]);
    assert!(o.model.conntrack_write.is_some());

    // Many flows spread over all three backends, each as the model says.
    let mut seen = std::collections::BTreeSet::new();
    for port in 41_000..41_060 {
        let p = tcp(VIP_TCP, 80, port, TcpKind::Syn);
        seen.insert(assert_ipip(
            &h.send(&p).kernel.packet,
            &p,
            14,
            ROUTER_MAC,
            LB_MAC,
            &tcp_backends,
        ));
    }
    assert_eq!(seen.len(), 3, "60 flows reach every backend");

    // UDP VIP.
    let udp = packets::udp(v4(CLIENT), 5353, v4(VIP_UDP), 53, 40);
    let o = h.send(&udp);
    assert_eq!(o.model.action, Action::Tx);
    assert_ipip(
        &o.kernel.packet,
        &udp,
        14,
        ROUTER_MAC,
        LB_MAC,
        &[[10, 50, 0, 4], [10, 50, 0, 5]],
    );

    // Port-0 VIP: any port matches; backends behind lb1, so XDP_REDIRECT.
    for port in [22, 443, 8080] {
        let p = tcp(VIP_ANY_PORT, port, 40_000, TcpKind::Syn);
        let o = h.send(&p);
        assert_eq!(o.model.action, Action::Redirect { ifindex: h.lb1 });
        assert_ipip(
            &o.kernel.packet,
            &p,
            14,
            LB1_PEER_MAC,
            LB1_MAC,
            &[[10, 60, 0, 1], [10, 60, 0, 2]],
        );
    }

    // Not for a VIP: passed byte for byte. To a VIP address but no VIP's
    // port or protocol: dropped (passed, it would loop via the router).
    for (name, p, reason) in [
        (
            "other address",
            tcp([10, 9, 9, 9], 80, 40_000, TcpKind::Syn),
            Reason::PassNotVip,
        ),
        (
            "VIP address, other port",
            tcp(VIP_TCP, 81, 40_000, TcpKind::Syn),
            Reason::DropNotAService,
        ),
        (
            "VIP address and port, UDP",
            packets::udp(v4(CLIENT), 1, v4(VIP_TCP), 80, 10),
            Reason::DropNotAService,
        ),
        (
            "UDP VIP, TCP packet",
            tcp(VIP_UDP, 53, 40_000, TcpKind::Syn),
            Reason::DropNotAService,
        ),
        ("ARP", packets::arp(), Reason::PassNotIp),
    ] {
        let o = h.send(&p);
        let action = if reason == Reason::DropNotAService {
            Action::Drop
        } else {
            Action::Pass
        };
        assert_eq!(o.model.action, action, "{name}");
        assert_eq!(o.model.reasons, [reason], "{name}");
        assert_eq!(o.kernel.packet, p, "{name}: unchanged");
    }
    let mut icmp = tcp(VIP_TCP, 80, 40_000, TcpKind::Syn);
    icmp[14 + 9] = 1;
    packets::fix_ip_checksum(&mut icmp, 14);
    assert_eq!(
        h.send(&icmp).model.reasons,
        [Reason::DropNotAService],
        "ICMP (neither echo nor a quoting error) to a VIP address"
    );

    // VLAN-tagged: the tag is kept on the way out.
    let tagged = packets::with_vlan(&tcp(VIP_TCP, 80, 40_000, TcpKind::Ack), 42);
    let o = h.send(&tagged);
    assert_eq!(o.model.action, Action::Tx);
    assert_eq!(
        assert_ipip(
            &o.kernel.packet,
            &tagged,
            18,
            ROUTER_MAC,
            LB_MAC,
            &tcp_backends
        ),
        chosen,
        "same flow, same backend"
    );

    // IPv4 options (IHL 8): ports found behind them, inner kept whole.
    let opts = packets::with_ip_options(
        &tcp(VIP_TCP, 80, 40_000, TcpKind::Ack),
        &[0x94, 0x04, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0],
    );
    assert_eq!(opts[14] & 0x0F, 8);
    let o = h.send(&opts);
    assert_eq!(o.model.reasons, [Reason::ConntrackHit, Reason::Tx]);
    assert_eq!(
        assert_ipip(
            &o.kernel.packet,
            &opts,
            14,
            ROUTER_MAC,
            LB_MAC,
            &tcp_backends
        ),
        chosen
    );

    // Fragments: hashed on (src, dst, proto), first and later ones together, untracked.
    let whole = packets::set_df(packets::udp(v4(CLIENT), 7000, v4(VIP_UDP), 53, 1200), false);
    let first = packets::as_fragment(&whole, true, 0);
    let later = packets::as_fragment(
        &packets::udp(v4(CLIENT), 9, v4(VIP_UDP), 9, 200),
        false,
        150,
    );
    let udp_backends = [[10, 50, 0, 4], [10, 50, 0, 5]];
    let o1 = h.send(&first);
    let o2 = h.send(&later);
    assert_eq!(o1.model.reasons, [Reason::Fragment, Reason::Tx]);
    assert_eq!(o2.model.reasons, [Reason::Fragment, Reason::Tx]);
    assert!(o1.model.conntrack_write.is_none() && o2.model.conntrack_write.is_none());
    assert_eq!(
        assert_ipip(
            &o1.kernel.packet,
            &first,
            14,
            ROUTER_MAC,
            LB_MAC,
            &udp_backends
        ),
        assert_ipip(
            &o2.kernel.packet,
            &later,
            14,
            ROUTER_MAC,
            LB_MAC,
            &udp_backends
        ),
        "all fragments of a datagram reach one backend"
    );
    let tcp_frag = packets::as_fragment(&tcp(VIP_TCP, 80, 40_000, TcpKind::Ack), true, 0);
    assert_eq!(
        h.send(&tcp_frag).model.reasons,
        [Reason::Fragment, Reason::Tx]
    );

    // A VIP with no backends drops, counted.
    let o = h.send(&tcp(VIP_EMPTY, 80, 40_000, TcpKind::Syn));
    assert_eq!(
        (o.model.action, o.model.reasons.as_slice()),
        (Action::Drop, &[Reason::DropNoBackend][..])
    );

    // Next hop not resolved: encapsulated and handed to the kernel, our MAC kept as destination.
    let p = tcp(VIP_NO_NEIGH, 80, 40_000, TcpKind::Syn);
    let o = h.send(&p);
    assert_eq!(o.model.action, Action::Pass);
    assert_eq!(
        o.model.reasons,
        [Reason::ConntrackMiss, Reason::PassNoNeighbour]
    );
    assert_ipip(
        &o.kernel.packet,
        &p,
        14,
        LB_MAC,
        ROUTER_MAC,
        &[[10, 70, 0, 1]],
    );

    // No route and no gateway MAC: dropped, counted.
    let o = h.send(&tcp(VIP_NO_ROUTE, 80, 40_000, TcpKind::Syn));
    assert_eq!(
        o.model.reasons,
        [Reason::ConntrackMiss, Reason::DropNoRoute]
    );

    // Size: 1400 bytes goes; a full-MTU packet plus 20 bytes of
    // encapsulation exceeds the configured MTU (1500): with DF the client
    // is told (checked field by field in the ICMP fixtures), without DF it
    // is dropped.
    let big = packets::tcp(v4(CLIENT), 40_000, v4(VIP_TCP), 80, TcpKind::Ack, 1400 - 54);
    assert_eq!(big.len(), 1400);
    assert_eq!(h.send(&big).model.action, Action::Tx);
    let too_big = packets::tcp(v4(CLIENT), 40_000, v4(VIP_TCP), 80, TcpKind::Ack, 1500 - 40);
    let o = h.send(&too_big);
    assert_eq!(
        o.model.reasons,
        [Reason::ConntrackHit, Reason::IcmpTooBigSent]
    );
    let o = h.send(&packets::set_df(too_big, false));
    assert_eq!(o.model.reasons, [Reason::ConntrackHit, Reason::DropTooBig]);

    // Malformed headers: passed to the kernel's stack unchanged, counted.
    let good = tcp(VIP_TCP, 80, 40_000, TcpKind::Ack);
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44;
    for (name, p) in [
        ("IP version 6 in an IPv4 frame", bad_version),
        ("IHL 4", short_ihl),
        (
            "total length beyond the frame",
            packets::with_total_length(&good, good.len() as u16),
        ),
        (
            "total length shorter than the header",
            packets::with_total_length(&good, 19),
        ),
        (
            "total length without a whole TCP header",
            packets::with_total_length(&good, 30),
        ),
    ] {
        let o = h.send(&p);
        assert_eq!(o.model.reasons, [Reason::PassMalformed], "{name}");
        assert_eq!(o.kernel.packet, p, "{name}: unchanged");
    }
}

#[test]
fn truncated_at_every_length() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    // VLAN tag + IPv4 options + TCP: every header boundary is crossed.
    let full = packets::with_vlan(
        &packets::with_ip_options(&tcp(VIP_TCP, 80, 40_000, TcpKind::Syn), &[1, 1, 1, 1]),
        7,
    );
    let l4_end = 18 + 24 + 20;
    assert_eq!(full.len(), l4_end);
    for len in 14..full.len() {
        let o = h.send(&full[..len]);
        assert_eq!(
            o.model.reasons,
            [Reason::PassMalformed],
            "cut at {len} bytes"
        );
        assert_eq!(o.model.action, Action::Pass);
    }
    let udp = packets::with_vlan(&packets::udp(v4(CLIENT), 1, v4(VIP_UDP), 53, 0), 7);
    for len in 14..udp.len() {
        assert_eq!(
            h.send(&udp[..len]).model.reasons,
            [Reason::PassMalformed],
            "UDP cut at {len}"
        );
    }
    assert_eq!(
        h.send(&full).model.action,
        Action::Tx,
        "the whole frame goes through"
    );
    // Frames with trailing bytes after the IP datagram (Ethernet padding) are fine.
    let mut padded = tcp(VIP_TCP, 80, 40_000, TcpKind::Ack);
    padded.extend_from_slice(&[0; 6]);
    assert_eq!(h.send(&padded).model.action, Action::Tx);
}

#[test]
fn inconsistent_headers_are_malformed_never_forwarded() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let good_tcp = tcp(VIP_TCP, 80, 40_000, TcpKind::Ack);
    let good_udp = packets::udp(v4(CLIENT), 1, v4(VIP_UDP), 53, 10);
    assert_eq!(h.send(&good_tcp).model.action, Action::Tx);
    assert_eq!(h.send(&good_udp).model.action, Action::Tx);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let mut bad_sum = good_tcp.clone();
    bad_sum[14 + 10] ^= 0x01;
    cases.push(("IPv4 header checksum".into(), bad_sum));
    let mut with_opts = packets::with_ip_options(&good_tcp, &[1, 1, 1, 1]);
    with_opts[14 + 21] = 7; // an option byte changed, checksum not
    cases.push(("IPv4 checksum over options".into(), with_opts));
    for doff in [0u8, 4, 6, 15] {
        // No options in these frames: anything above 5 words runs past the end.
        let mut f = good_tcp.clone();
        f[14 + 20 + 12] = doff << 4;
        cases.push((format!("TCP data offset {doff}"), f));
    }
    for len in [0u16, 7, 19, 400] {
        let mut f = good_udp.clone();
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&len.to_be_bytes());
        cases.push((format!("UDP length {len} of 18"), f));
    }
    for (name, f) in cases {
        let o = h.send(&f);
        assert_eq!(o.model.reasons, [Reason::PassMalformed], "{name}");
        assert_eq!(o.model.action, Action::Pass, "{name}");
        assert_eq!(o.kernel.packet, f, "{name}: passed unchanged");
    }
    // A UDP length shorter than the datagram (trailing bytes) is legal.
    let mut short = good_udp.clone();
    short[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(h.send(&short).model.action, Action::Tx);
}

#[test]
fn the_vip_address_filter_follows_vips_and_collisions_fall_through() {
    if !have_root() {
        return;
    }
    use lb_common::maps::{FAMILY_IPV4, vip_addr_filter_bit};
    let mut h = harness(Settings::DEFAULT);
    let vip = [10, 0, 0, 40];
    let key40 = key(vip, 80, PROTO_TCP);
    let b = [backend(40, [10, 50, 0, 1], 1)];
    h.add_vip(key40, 40, &b, 251);
    assert_eq!(
        h.send(&tcp(vip, 80, 40_000, TcpKind::Syn)).model.action,
        Action::Tx
    );
    // A non-VIP address that shares the VIP's filter bit: the lookups decide.
    let bit = |a: [u8; 4]| vip_addr_filter_bit(&[u32::from_ne_bytes(a), 0, 0, 0], FAMILY_IPV4);
    let twin = (0..=u16::MAX)
        .map(|i| [10, 77, (i >> 8) as u8, i as u8])
        .find(|a| bit(*a) == bit(vip))
        .expect("a colliding address among 65536");
    let o = h.send(&tcp(twin, 80, 40_000, TcpKind::Syn));
    assert_eq!(o.model.reasons, [Reason::PassNotVip], "collision {twin:?}");
    // Gone: its address is no VIP's any more, passed (not dropped).
    h.remove_vip(key40);
    let o = h.send(&tcp(vip, 80, 40_000, TcpKind::Syn));
    assert_eq!(o.model.reasons, [Reason::PassNotVip]);
    // And back.
    h.add_vip(key40, 40, &b, 251);
    assert_eq!(
        h.send(&tcp(vip, 80, 40_001, TcpKind::Syn)).model.action,
        Action::Tx
    );
    h.assert_counters();
}

#[test]
fn tracked_flow_survives_table_change_and_syn_takes_new_answer() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let vip = key(VIP_TCP, 80, PROTO_TCP);
    let all = [
        backend(1, [10, 50, 0, 1], 1),
        backend(2, [10, 50, 0, 2], 1),
        backend(3, [10, 50, 0, 3], 1),
    ];
    // Open 30 flows; remember each flow's backend.
    let flows: Vec<(u16, u32)> = (50_000..50_030)
        .map(|port| {
            (
                port,
                h.send(&tcp(VIP_TCP, 80, port, TcpKind::Syn))
                    .model
                    .backend_id
                    .unwrap(),
            )
        })
        .collect();
    // Drain backend 1 (weight 0: still valid, out of the table).
    let drained: Vec<_> = all
        .iter()
        .map(|b| {
            if b.id == 1 {
                backend(1, [10, 50, 0, 1], 0)
            } else {
                b.clone()
            }
        })
        .collect();
    h.add_vip(vip, 1, &drained, 4099);
    let on_one: Vec<u16> = flows.iter().filter(|f| f.1 == 1).map(|f| f.0).collect();
    assert!(!on_one.is_empty(), "some of 30 flows landed on backend 1");
    for &(port, id) in &flows {
        let o = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Ack));
        assert_eq!(
            o.model.backend_id,
            Some(id),
            "tracked flow {port} stays on its backend"
        );
        assert_eq!(o.model.reasons[0], Reason::ConntrackHit);
    }
    // A new SYN on a drained flow's 5-tuple takes the table's current answer.
    let port = on_one[0];
    let o = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Syn));
    assert_ne!(
        o.model.backend_id,
        Some(1),
        "SYN re-hashes away from the drained backend"
    );
    // The fresh answer is now tracked.
    let rehashed = o.model.backend_id;
    assert_eq!(
        h.send(&tcp(VIP_TCP, 80, port, TcpKind::Ack))
            .model
            .backend_id,
        rehashed
    );

    // Backend 1 fails (invalid): its remaining tracked flows re-hash.
    h.set_backend_valid(1, false);
    for &p in &on_one[1..] {
        let o = h.send(&tcp(VIP_TCP, 80, p, TcpKind::Ack));
        assert_eq!(
            o.model.reasons[0],
            Reason::ConntrackMiss,
            "flow {p} re-hashed"
        );
        assert_ne!(o.model.backend_id, Some(1));
    }
}

/// The fast path reaches a tracked flow's VIP through its backend's vip id
/// (`VIPS_BY_ID`): when the VIP's key moves to another id, or goes, the
/// old id must lead nowhere, or the flow would stay on a backend the
/// general path no longer gives it.
#[test]
fn tracked_flows_follow_their_vip_key_to_a_new_id_and_out() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let vip = key(VIP_TCP, 80, PROTO_TCP);
    let ports = 51_000..51_020;
    for port in ports.clone() {
        h.send(&tcp(VIP_TCP, 80, port, TcpKind::Syn));
        let o = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Ack));
        assert_eq!(o.model.reasons[0], Reason::ConntrackHit, "flow {port}");
        assert!(matches!(o.model.backend_id, Some(1..=3)));
    }
    // The same key, now VIP 7's, with other backends; backends 1-3 stay
    // valid as VIP 1's (ids are quarantined, not wiped, in the real plane).
    let moved = [
        backend(51, [10, 50, 0, 6], 1),
        backend(52, [10, 50, 0, 7], 1),
    ];
    h.add_vip(vip, 7, &moved, 4099);
    assert!(
        !h.dp.vips_by_id().iter().any(|(id, _)| *id == 1),
        "VIP 1's index entry is gone with its key"
    );
    for port in ports.clone() {
        let o = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Ack));
        assert_eq!(
            o.model.reasons[0],
            Reason::ConntrackMiss,
            "flow {port} re-hashed"
        );
        assert!(matches!(o.model.backend_id, Some(51 | 52)));
        assert_eq!(o.model.action, Action::Tx);
        // Tracked again, on the new VIP's backend.
        let o = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Ack));
        assert_eq!(o.model.reasons[0], Reason::ConntrackHit);
        assert_eq!(o.model.action, Action::Tx);
    }
    h.remove_vip(vip);
    assert!(h.dp.vips_by_id().iter().all(|(id, _)| *id != 7));
    for port in ports {
        let o = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Ack));
        assert_eq!(o.model.backend_id, None, "flow {port}: its VIP is gone");
    }
}

/// A flow tracked through an every-port VIP, then a VIP of its own port:
/// the general path's exact key finds the new VIP, and so must the fast
/// path (the tracked backend's VIP has port 0, not the packet's).
#[test]
fn an_exact_port_vip_takes_over_flows_tracked_by_the_every_port_vip() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let ports = 52_000..52_010;
    for port in ports.clone() {
        h.send(&tcp(VIP_ANY_PORT, 81, port, TcpKind::Syn));
        let o = h.send(&tcp(VIP_ANY_PORT, 81, port, TcpKind::Ack));
        assert_eq!(o.model.reasons[0], Reason::ConntrackHit);
        assert!(matches!(o.model.backend_id, Some(11 | 12)));
    }
    h.add_vip(
        key(VIP_ANY_PORT, 81, PROTO_TCP),
        8,
        &[backend(61, [10, 50, 0, 8], 1)],
        1009,
    );
    for port in ports {
        let o = h.send(&tcp(VIP_ANY_PORT, 81, port, TcpKind::Ack));
        assert_eq!(o.model.vip_id, Some(8), "flow {port}: its port's VIP");
        assert_eq!(o.model.backend_id, Some(61), "flow {port} re-hashed");
        assert_eq!(o.model.action, Action::Tx);
    }
}

#[test]
fn rst_creates_no_entry() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let rst = tcp(VIP_TCP, 80, 45_000, TcpKind::Rst);
    let o = h.send(&rst);
    assert_eq!(o.model.action, Action::Tx, "a RST is still forwarded");
    assert!(o.model.conntrack_write.is_none());
    let (flow, _) = (lb_common::model::parse(&rst), ());
    if let lb_common::model::ModelParse::Ip(p) = flow {
        assert!(
            h.dp.conntrack_get(&p.flow).is_none(),
            "no entry in the kernel's table"
        );
    } else {
        panic!("RST did not parse");
    }
    let o = h.send(&tcp(VIP_TCP, 80, 45_000, TcpKind::Fin));
    assert!(
        o.model.conntrack_write.is_some(),
        "a FIN/ACK of an unknown flow is tracked"
    );
}

#[test]
fn gateway_mac_when_fib_has_no_route() {
    if !have_root() {
        return;
    }
    let gateway = [0x02, 0, 0, 0, 0, 0x99];
    let settings = Settings {
        flags: SETTINGS_F_GATEWAY_MAC,
        gateway_mac: gateway,
        ..Settings::DEFAULT
    };
    let mut h = harness(settings);
    let p = tcp(VIP_NO_ROUTE, 80, 40_000, TcpKind::Syn);
    let o = h.send(&p);
    assert_eq!(o.model.action, Action::Tx);
    assert_eq!(
        o.model.reasons,
        [
            Reason::ConntrackMiss,
            Reason::FibFallbackGateway,
            Reason::Tx
        ]
    );
    assert_ipip(&o.kernel.packet, &p, 14, gateway, LB_MAC, &[[10, 80, 0, 1]]);
}

/// The per-CPU next-hop cache is timed in jiffies: within its TTL a
/// neighbour's new MAC is not seen (the cached answer is used), after it
/// the FIB is asked again and the new MAC is written.
#[test]
fn cached_next_hop_follows_a_neighbour_change_after_its_ttl() {
    if !have_root() {
        return;
    }
    // One thread for the namespace (entered per thread) and the CPU (the
    // cache is per CPU), so that pinning does not outlive the test.
    std::thread::spawn(|| {
        lb_tests::pin_to_cpu(0);
        let tick_ns = lb_userspace::dataplane::host_tick_ns();
        let tick = std::time::Duration::from_nanos(tick_ns);
        // About a quarter of a second, whatever the host's HZ.
        let shift = lb_common::settings::nexthop_ttl_shift(tick_ns) - 2;
        let ttl = tick * (1 << shift);
        let settings = Settings {
            nexthop_ttl_shift: shift,
            ..Settings::DEFAULT
        };
        let mut h = harness(settings);
        let p = tcp(VIP_TCP, 80, 47_000, TcpKind::Syn);
        let dmac = |h: &mut Harness| -> [u8; 6] {
            let out = h.dp.test_run(&p, h.lb0).unwrap();
            assert_eq!(out.action, Action::Tx.xdp_code());
            out.packet[0..6].try_into().unwrap()
        };
        let filled = std::time::Instant::now();
        assert_eq!(dmac(&mut h), ROUTER_MAC, "the FIB's answer");
        let moved = [0x02, 0, 0, 0, 0, 0x77];
        let moved_str = "02:00:00:00:00:77";
        h.ip(&[
            "neigh",
            "replace",
            "10.100.0.1",
            "lladdr",
            moved_str,
            "dev",
            "lb0",
            "nud",
            "permanent",
        ]);
        let cached = dmac(&mut h);
        if filled.elapsed() < ttl - tick {
            assert_eq!(cached, ROUTER_MAC, "the cached answer within the TTL");
        }
        std::thread::sleep(ttl + 2 * tick);
        assert_eq!(dmac(&mut h), moved, "the new neighbour after the TTL");
    })
    .join()
    .unwrap();
}

#[test]
fn udp_entries_expire_after_idle_timeout() {
    if !have_root() {
        return;
    }
    let settings = Settings {
        udp_idle_timeout_ns: 50_000_000,
        ..Settings::DEFAULT
    };
    let mut h = harness(settings);
    let p = packets::udp(v4(CLIENT), 6000, v4(VIP_UDP), 53, 10);
    let first = h.send(&p).model.backend_id;
    assert_eq!(h.send(&p).model.reasons[0], Reason::ConntrackHit);
    std::thread::sleep(std::time::Duration::from_millis(120));
    // The model is told the entry is stale (now far past its atime).
    let model = h.model.decide(&p, h.lb0, h.next_hop(), Some(u64::MAX / 2));
    let kernel = h.dp.test_run(&p, h.lb0).unwrap();
    assert_eq!(model.reasons[0], Reason::ConntrackMiss);
    assert_eq!(
        kernel.packet, model.output,
        "re-hashed after the idle timeout"
    );
    assert_eq!(model.backend_id, first, "same table, same answer");
}

/// Floods `count` SYNs of new flows; returns how many of `established`
/// flows kept their entry and backend.
fn flood_and_count_survivors(h: &mut Harness, established: &[(u16, u32)], count: u32) -> usize {
    for i in 0..count {
        let src = Ipv4Addr::from(0xC612_0000u32 + i); // 198.18.0.0/15
        let p = packets::tcp(src, 40_000, v4(VIP_TCP), 80, TcpKind::Syn, 0);
        let out = h.dp.test_run(&p, h.lb0).unwrap();
        assert_eq!(
            out.action,
            Action::Tx.xdp_code(),
            "flood SYNs are still balanced"
        );
    }
    established
        .iter()
        .filter(|(port, backend)| {
            let flow = lb_common::maps::FlowKey::new(
                IpAddr::V4(v4(CLIENT)),
                *port,
                IpAddr::V4(v4(VIP_TCP)),
                80,
                PROTO_TCP,
            );
            h.dp.conntrack_get(&flow).map(|e| e.backend_id) == Some(*backend)
        })
        .count()
}

fn establish(h: &mut Harness, n: u16) -> Vec<(u16, u32)> {
    (0..n)
        .map(|i| {
            let port = 20_000 + i;
            let out = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Syn));
            (port, out.model.backend_id.unwrap())
        })
        .collect()
}

#[test]
fn syn_flood_does_not_evict_established_flows() {
    if !have_root() {
        return;
    }
    // Each CPU evicts from its own LRU list and has its own budget: keep the
    // established flows and the flood on one CPU, or a migration between
    // them would spare the entries the unguarded flood must evict.
    lb_tests::pin_to_cpu(0);
    // Table of 8192 entries; a flood of 40,000 new flows, 5x its size.
    let guarded = Settings {
        max_new_flows_per_sec: 2000,
        ..Settings::DEFAULT
    };
    let mut h = harness_with_conntrack(guarded, 8192);
    let established = establish(&mut h, 1000);
    std::thread::sleep(std::time::Duration::from_millis(1100)); // a fresh budget window
    let started = std::time::Instant::now();
    let kept = flood_and_count_survivors(&mut h, &established, 40_000);
    let skipped = h.dp.reason_counter(Reason::ConntrackInsertSkipped).packets;
    eprintln!(
        "guarded: {kept}/1000 established flows kept through 40,000 flood SYNs in {:?}; {skipped} not recorded",
        started.elapsed()
    );
    assert_eq!(
        kept, 1000,
        "every established flow keeps its entry and backend"
    );
    assert!(
        skipped >= 40_000 - 2 * 2000 * (started.elapsed().as_secs() + 1),
        "the budget held"
    );

    // Without the guard the same flood evicts established flows: the test can fail.
    let mut h = harness_with_conntrack(Settings::DEFAULT, 8192);
    let established = establish(&mut h, 1000);
    let kept = flood_and_count_survivors(&mut h, &established, 40_000);
    eprintln!("unguarded: {kept}/1000 established flows kept");
    assert!(kept < 1000);
}

/// Second chance: the VIP had a fourth backend (10.50.0.4) before its last
/// change. A mid-connection TCP packet this instance has no entry for,
/// whose slot belonged to it, goes to the slot's current owner with the old
/// owner as a second hop: an IPIP packet inside the IPIP packet, recorded
/// with both hops so that its later packets take the same two whatever the
/// tables do next. SYNs, UDP and flows tracked without one never get one.
#[test]
fn second_chance_nests_mid_connection_misses_only() {
    if !have_root() {
        return;
    }
    let mut h = harness(Settings::DEFAULT);
    let mut before = vec![
        backend(1, [10, 50, 0, 1], 1),
        backend(2, [10, 50, 0, 2], 1),
        backend(3, [10, 50, 0, 3], 1),
    ];
    before.push(backend(4, [10, 50, 0, 4], 1));
    h.set_prev_table(1, &before, 4099);
    let mut nested = 0;
    let mut plain = 0;
    let mut recorded = Vec::new();
    for port in 30_000..30_400u16 {
        let ack = tcp(VIP_TCP, 80, port, TcpKind::Ack);
        let o = h.send(&ack);
        let out = &o.kernel.packet;
        match o.model.second_hop {
            Some(second) => {
                nested += 1;
                assert_eq!(second, 4, "only the removed backend's slots moved");
                assert!(o.model.reasons.contains(&Reason::SecondChance));
                assert_eq!(
                    o.model.conntrack_write.map(|(_, id)| id),
                    o.model.backend_id
                );
                assert_eq!(
                    o.model.conntrack_write_second,
                    Some(4),
                    "recorded with both hops"
                );
                let lb_common::model::ModelParse::Ip(parsed) = lb_common::model::parse(&ack) else {
                    unreachable!()
                };
                assert_eq!(
                    h.dp.conntrack_get(&parsed.flow).map(|e| e.second_hop()),
                    Some(4)
                );
                assert_eq!(out.len(), ack.len() + 40, "two IPv4 headers");
                let (outer, middle) = (&out[14..34], &out[34..54]);
                assert_eq!(outer[9], 4, "outer carries IPv4");
                assert_eq!(
                    u16::from_be_bytes([outer[2], outer[3]]) as usize,
                    ack.len() - 14 + 40
                );
                let first: [u8; 4] = outer[16..20].try_into().unwrap();
                assert!([[10, 50, 0, 1], [10, 50, 0, 2], [10, 50, 0, 3]].contains(&first));
                assert_eq!(ipv4_checksum(middle), 0, "middle header checksum valid");
                assert_eq!(middle[9], 4, "middle carries the client's IPv4 packet");
                assert_eq!(
                    &middle[16..20],
                    &[10, 50, 0, 4],
                    "second hop: the old owner"
                );
                assert_eq!(&middle[12..14], &[172, 16], "middle source as any outer's");
                assert_eq!(&out[54..], &ack[14..], "client packet unchanged");
                // Its next packet hits the entry: the same two hops.
                let next = h.send(&ack);
                assert_eq!(next.model.reasons[0], Reason::ConntrackHit);
                assert!(next.model.reasons.contains(&Reason::SecondChance));
                assert_eq!(next.kernel.packet, o.kernel.packet);
                if port % 2 == 0 {
                    recorded.push(ack);
                    continue;
                }
                // The flow's own SYN (a new connection) takes the current
                // table alone, and is recorded; its ACKs then hit.
                let syn = h.send(&tcp(VIP_TCP, 80, port, TcpKind::Syn));
                assert_eq!(syn.model.second_hop, None);
                assert!(syn.model.conntrack_write.is_some());
                let again = h.send(&ack);
                assert_eq!(again.model.second_hop, None);
                assert_eq!(again.model.reasons[0], Reason::ConntrackHit);
            }
            None => {
                plain += 1;
                assert_eq!(out.len(), ack.len() + 20);
                assert!(o.model.conntrack_write.is_some());
            }
        }
    }
    eprintln!("{nested} of 400 unknown mid-connection flows nested, {plain} plain");
    // About the quarter of the slots the fourth backend had.
    assert!((60..=140).contains(&nested), "{nested}");
    // A RST of an unknown flow is nested too (it ends the connection where it is).
    let rst = (31_000..31_400u16)
        .map(|p| h.send(&tcp(VIP_TCP, 80, p, TcpKind::Rst)))
        .filter(|o| o.model.second_hop.is_some())
        .count();
    assert!(rst > 0);
    // Another change: the previous table no longer names the fourth
    // backend, yet the recorded flows keep both of their hops.
    h.set_prev_table(1, &before[..3], 4099);
    for ack in &recorded {
        let o = h.send(ack);
        assert_eq!(o.model.reasons[0], Reason::ConntrackHit);
        assert_eq!(o.model.second_hop, Some(4));
    }
    assert!(!recorded.is_empty());
    // UDP never: its VIP has a previous table too, and no packet nests.
    h.set_prev_table(3, &[backend(21, [10, 50, 0, 21], 1)], 1009);
    for p in 32_000..32_100u16 {
        let (src, sport) = client(p);
        let o = h.send(&packets::udp(src, sport, v4(VIP_UDP), 53, 8));
        assert_eq!(o.model.second_hop, None);
        assert!(!o.model.reasons.contains(&Reason::SecondChance));
    }
}
