//! QUIC VIPs through `BPF_PROG_TEST_RUN`: short-header packets go to the
//! backend their connection ID names, whatever the client's address and
//! port; long headers and unknown or failed server ids are balanced as any
//! UDP flow. Every packet is also checked against the reference model
//! (action, output bytes, counters, connection table). Needs root.

use std::net::IpAddr;

use lb_common::{
    PROTO_UDP,
    maps::{Reason, VIP_F_QUIC, VipKey},
    model::Action,
    quic_lb::{QuicLbParams, encode_cid},
    settings::Settings,
};
use lb_tests::{
    fixture::{Harness, backend, backend6, v4},
    have_root,
    packets::{self, quic_initial, quic_short},
};

const PARAMS: QuicLbParams = QuicLbParams {
    config_id: 1,
    server_id_len: 2,
    nonce_len: 6,
};
const VIP: [u8; 4] = [10, 0, 0, 20];
const VIP_ID: u32 = 1;
const VIP6_ID: u32 = 2;
const PLAIN_UDP_ID: u32 = 3;
/// Backend ids 51..=53 carry server ids 0x101, 0x202, 0x303.
const SERVERS: [(u32, u32); 3] = [(51, 0x101), (52, 0x202), (53, 0x303)];

fn vip6() -> IpAddr {
    "fd00::20".parse().unwrap()
}

fn client(n: u8) -> IpAddr {
    IpAddr::V4(v4([192, 0, 2, n]))
}

fn harness() -> Harness {
    let mut h = Harness::new(Settings::DEFAULT);
    let flags = VIP_F_QUIC | PARAMS.flag_bits();
    let backends = [
        backend(51, [10, 50, 0, 1], 1),
        backend(52, [10, 50, 0, 2], 1),
        backend(53, [10, 50, 0, 3], 1),
    ];
    h.add_vip_with_flags(
        VipKey::new(IpAddr::V4(v4(VIP)), 443, PROTO_UDP),
        VIP_ID,
        flags,
        &backends,
        1009,
    );
    for (id, sid) in SERVERS {
        h.set_quic_server(VIP_ID, sid, id);
    }
    h.add_vip_with_flags(
        VipKey::new(vip6(), 443, PROTO_UDP),
        VIP6_ID,
        flags,
        &[backend6(61, 0x50, 0x61, 1), backend6(62, 0x50, 0x62, 1)],
        1009,
    );
    h.set_quic_server(VIP6_ID, 0x101, 61);
    h.set_quic_server(VIP6_ID, 0x202, 62);
    // A UDP VIP without QUIC routing on the same address, another port.
    h.add_vip(
        VipKey::new(IpAddr::V4(v4(VIP)), 4433, PROTO_UDP),
        PLAIN_UDP_ID,
        &[
            backend(71, [10, 50, 0, 7], 1),
            backend(72, [10, 50, 0, 8], 1),
        ],
        1009,
    );
    h
}

fn cid(server_id: u32, nonce: u8) -> Vec<u8> {
    encode_cid(&PARAMS, server_id, &[nonce; 6])
}

fn quic_to(src: IpAddr, sport: u16, dst: IpAddr, body: &[u8]) -> Vec<u8> {
    packets::udp_with(src, sport, dst, 443, body)
}

#[test]
fn short_headers_go_to_the_named_server_from_any_address() {
    if !have_root() {
        return;
    }
    let mut h = harness();
    let _g = h.enter();
    for (id, sid) in SERVERS {
        // The same connection from 40 addresses and ports (migration, NAT
        // rebinding): always its server, never the connection table.
        for n in 0..40u16 {
            let pkt = quic_to(
                client(1 + (n % 7) as u8),
                1000 + 97 * n,
                IpAddr::V4(v4(VIP)),
                &quic_short(&cid(sid, n as u8), 30),
            );
            let o = h.send(&pkt);
            assert_eq!(o.model.backend_id, Some(id), "server id {sid:#x}");
            assert!(o.model.reasons.contains(&Reason::QuicRouted));
            assert!(!o.model.reasons.contains(&Reason::ConntrackMiss));
            assert_eq!(o.model.conntrack_write, None);
            assert_eq!(o.model.action, Action::Tx);
        }
    }
    assert_eq!(h.dp.reason_counter(Reason::QuicRouted).packets, 120);
    assert!(h.dp.conntrack_entries().is_empty(), "nothing recorded");
    // IPv6, and a VLAN tag in front.
    let pkt = quic_to(
        "fd00:99::7".parse().unwrap(),
        5000,
        vip6(),
        &quic_short(&cid(0x202, 1), 30),
    );
    assert_eq!(h.send(&pkt).model.backend_id, Some(62));
    let pkt = packets::with_vlan(
        &quic_to(
            client(9),
            5001,
            IpAddr::V4(v4(VIP)),
            &quic_short(&cid(0x303, 1), 30),
        ),
        7,
    );
    assert_eq!(h.send(&pkt).model.backend_id, Some(53));
}

#[test]
fn long_headers_take_the_table_and_short_ones_follow_their_id() {
    if !have_root() {
        return;
    }
    let mut h = harness();
    let _g = h.enter();
    // The client's Initial: balanced and recorded as any UDP flow.
    let initial = quic_to(
        client(1),
        40000,
        IpAddr::V4(v4(VIP)),
        &quic_initial(&[0xAB; 8], 1100),
    );
    let o = h.send(&initial);
    assert!(o.model.reasons.contains(&Reason::QuicLongHeader));
    assert!(o.model.reasons.contains(&Reason::ConntrackMiss));
    let chosen = o.model.backend_id.unwrap();
    assert_eq!(o.model.conntrack_write.map(|(_, id)| id), Some(chosen));
    // Its next long-header packet: the connection table.
    let o = h.send(&initial);
    assert!(o.model.reasons.contains(&Reason::ConntrackHit));
    assert_eq!(o.model.backend_id, Some(chosen));
    // Once the server's connection ID is in use, it decides, even on this
    // tracked 5-tuple: the server named there is the one with the connection.
    let (other, sid) = SERVERS.into_iter().find(|(id, _)| *id != chosen).unwrap();
    let short = quic_to(
        client(1),
        40000,
        IpAddr::V4(v4(VIP)),
        &quic_short(&cid(sid, 3), 40),
    );
    let o = h.send(&short);
    assert_eq!(o.model.backend_id, Some(other));
    assert!(o.model.reasons.contains(&Reason::QuicRouted));
}

#[test]
fn unknown_foreign_short_and_failed_ids_are_balanced_as_udp() {
    if !have_root() {
        return;
    }
    let mut h = harness();
    let _g = h.enter();
    let to_vip = |sport: u16, body: &[u8]| quic_to(client(2), sport, IpAddr::V4(v4(VIP)), body);
    let mut foreign_config = cid(0x101, 1);
    foreign_config[0] = (foreign_config[0] & 0x1F) | 2 << 5;
    let mut unroutable = cid(0x101, 1);
    unroutable[0] |= 7 << 5;
    let full = quic_short(&cid(0x101, 1), 0);
    let cases: [(&str, Vec<u8>); 6] = [
        ("unknown server id", quic_short(&cid(0x999, 1), 30)),
        ("another config id", quic_short(&foreign_config, 30)),
        ("the unroutable config id", quic_short(&unroutable, 30)),
        (
            "shorter than a connection ID",
            full[..full.len() - 1].to_vec(),
        ),
        ("empty datagram", Vec::new()),
        ("one octet", vec![0x40]),
    ];
    for (i, (what, body)) in cases.iter().enumerate() {
        let o = h.send(&to_vip(2000 + i as u16, body));
        assert!(
            o.model.reasons.contains(&Reason::QuicUnknownServer),
            "{what}: {:?}",
            o.model.reasons
        );
        assert!(o.model.reasons.contains(&Reason::ConntrackMiss), "{what}");
        assert!(o.model.backend_id.is_some(), "{what}: still balanced");
    }
    assert_eq!(h.dp.reason_counter(Reason::QuicUnknownServer).packets, 6);
    // Exactly header + connection ID is enough.
    assert_eq!(h.send(&to_vip(2100, &full)).model.backend_id, Some(51));
    // A failed server: its id no longer routes; the flow is balanced over
    // the valid backends (and recorded).
    // (As the reconciler does: invalid, and out of the table.)
    h.set_backend_valid(52, false);
    h.add_vip_with_flags(
        VipKey::new(IpAddr::V4(v4(VIP)), 443, PROTO_UDP),
        VIP_ID,
        VIP_F_QUIC | PARAMS.flag_bits(),
        &[
            backend(51, [10, 50, 0, 1], 1),
            backend(53, [10, 50, 0, 3], 1),
        ],
        1009,
    );
    for n in 0..20u16 {
        let o = h.send(&to_vip(3000 + n, &quic_short(&cid(0x202, 1), 30)));
        assert!(o.model.reasons.contains(&Reason::QuicServerDown));
        assert!(matches!(o.model.backend_id, Some(51 | 53)));
        assert!(o.model.conntrack_write.is_some());
    }
    h.set_backend_valid(52, true);
    let o = h.send(&to_vip(3100, &quic_short(&cid(0x202, 1), 30)));
    assert_eq!(o.model.backend_id, Some(52));
    // An id of another VIP's server does not route here: ids are per VIP.
    h.set_quic_server(VIP6_ID, 0x404, 61);
    let o = h.send(&to_vip(3200, &quic_short(&cid(0x404, 1), 30)));
    assert!(o.model.reasons.contains(&Reason::QuicUnknownServer));
}

#[test]
fn a_plain_udp_vip_ignores_quic_headers() {
    if !have_root() {
        return;
    }
    let mut h = harness();
    let _g = h.enter();
    let pkt = packets::udp_with(
        client(3),
        7000,
        IpAddr::V4(v4(VIP)),
        4433,
        &quic_short(&cid(0x101, 1), 30),
    );
    let o = h.send(&pkt);
    assert!(
        !o.model.reasons.iter().any(|r| r.name().starts_with("quic")),
        "{:?}",
        o.model.reasons
    );
    assert!(o.model.reasons.contains(&Reason::ConntrackMiss));
    assert!(matches!(o.model.backend_id, Some(71 | 72)));
}
