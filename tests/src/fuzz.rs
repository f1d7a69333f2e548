//! Differential fuzzing: a seeded generator of valid, mutated and malformed
//! frames, each run through the real program and the reference model by
//! `Harness::send_batched`, which asserts action, output bytes and the
//! connection table agree; counters are compared every `COUNTER_CHECK_EVERY`
//! packets. A mismatch panics with a reproducer (seed, index, frame hex).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    PROTO_TCP, PROTO_UDP,
    maps::{VIP_F_GUE, VIP_F_QUIC, VipKey},
    model::ipv4_checksum,
    quic_lb::{QuicLbParams, encode_cid},
    settings::Settings,
};
use rand::{Rng, SeedableRng, rngs::SmallRng};

use crate::{
    fixture::{Harness, backend, backend6, hex},
    packets::{self, Ext, TcpKind},
};

pub const COUNTER_CHECK_EVERY: u64 = 256;

const VIPS: [[u8; 4]; 4] = [
    [10, 0, 0, 10],
    [10, 0, 0, 11],
    [10, 0, 0, 12],
    [10, 0, 0, 13],
];

fn setup(h: &mut Harness) {
    let k = |a: [u8; 4], port, proto| VipKey::new(IpAddr::V4(Ipv4Addr::from(a)), port, proto);
    let tcp_backends: Vec<_> = (0..8)
        .map(|i| backend(1 + i, [10, 50, 0, 1 + i as u8], 1 + i % 3))
        .collect();
    h.add_vip(k(VIPS[0], 80, PROTO_TCP), 1, &tcp_backends, 1009);
    h.add_vip(k(VIPS[0], 443, PROTO_TCP), 2, &tcp_backends[..3], 251);
    h.add_vip(
        k(VIPS[1], 0, PROTO_TCP),
        3,
        &[
            backend(21, [10, 60, 0, 1], 1),
            backend(22, [10, 60, 0, 2], 2),
        ],
        251,
    );
    h.add_vip(
        k(VIPS[2], 53, PROTO_UDP),
        4,
        &[
            backend(31, [10, 50, 0, 31], 1),
            backend(32, [10, 70, 0, 1], 1),
        ],
        251,
    );
    h.add_vip(k(VIPS[3], 80, PROTO_TCP), 5, &[], 251);
    h.add_vip(
        k(VIPS[3], 81, PROTO_TCP),
        6,
        &[backend(41, [10, 80, 0, 1], 1)],
        251,
    );
    // IPv4 -> IPv6 backends, over GUE on one port.
    let v6_backends = [backend6(51, 0x50, 1, 1), backend6(52, 0x60, 2, 1)];
    h.add_vip(k(VIPS[3], 8080, PROTO_TCP), 7, &v6_backends, 251);
    h.add_vip_with_flags(k(VIPS[3], 8443, PROTO_TCP), 8, VIP_F_GUE, &v6_backends, 251);
    // IPv6 VIPs: to IPv6 backends (one behind no neighbour), to IPv4 ones, GUE.
    let k6 = |i: usize, port, proto| VipKey::new(IpAddr::V6(VIPS6[i]), port, proto);
    h.add_vip(
        k6(0, 80, PROTO_TCP),
        9,
        &[
            backend6(61, 0x50, 0x61, 1),
            backend6(62, 0x50, 0x62, 2),
            backend6(63, 0x70, 0x63, 1),
        ],
        251,
    );
    h.add_vip(
        k6(0, 53, PROTO_UDP),
        10,
        &[
            backend(71, [10, 50, 0, 71], 1),
            backend(72, [10, 60, 0, 72], 1),
        ],
        251,
    );
    h.add_vip_with_flags(
        k6(1, 0, PROTO_TCP),
        11,
        VIP_F_GUE,
        &[backend6(81, 0x60, 0x81, 1), backend(82, [10, 50, 0, 82], 1)],
        251,
    );
    // Second chance: previous tables with a backend fewer (one being
    // added), one more (a removed one, retired), across families, on GUE,
    // and on a UDP VIP (where it must never apply).
    let mut prev80 = tcp_backends[..6].to_vec();
    prev80.push(backend(9, [10, 50, 0, 9], 1));
    h.set_prev_table(1, &prev80, 1009);
    h.set_prev_table(4, &[backend(31, [10, 50, 0, 31], 1)], 251);
    h.set_prev_table(
        7,
        &[backend6(51, 0x50, 1, 1), backend(53, [10, 60, 0, 53], 1)],
        251,
    );
    h.set_prev_table(
        9,
        &[backend6(61, 0x50, 0x61, 1), backend6(62, 0x50, 0x62, 2)],
        251,
    );
    h.set_prev_table(
        11,
        &[backend6(81, 0x60, 0x81, 1), backend(83, [10, 50, 0, 83], 1)],
        251,
    );
    setup_quic(h);
}

/// QUIC VIPs: (port, parameters, server ids of backends 91.., 95.. or 99..).
const QUIC4: (u16, QuicLbParams) = (
    443,
    QuicLbParams {
        config_id: 1,
        server_id_len: 2,
        nonce_len: 6,
    },
);
const QUIC4_WIDE: (u16, QuicLbParams) = (
    4433,
    QuicLbParams {
        config_id: 3,
        server_id_len: 4,
        nonce_len: 8,
    },
);
const QUIC6: (u16, QuicLbParams) = (
    443,
    QuicLbParams {
        config_id: 0,
        server_id_len: 1,
        nonce_len: 4,
    },
);
/// Server ids in use (each VIP has some of these, masked to its length).
const SERVER_IDS: [u32; 4] = [0x11, 0x2222, 0x0333_3333, 0x44];

fn setup_quic(h: &mut Harness) {
    let k = |a: [u8; 4], port| VipKey::new(IpAddr::V4(Ipv4Addr::from(a)), port, PROTO_UDP);
    let k6 = |port| VipKey::new(IpAddr::V6(VIPS6[0]), port, PROTO_UDP);
    let vips = [
        (k(VIPS[2], QUIC4.0), 12, QUIC4.1, 91u32),
        (k(VIPS[2], QUIC4_WIDE.0), 13, QUIC4_WIDE.1, 95),
        (k6(QUIC6.0), 14, QUIC6.1, 99),
    ];
    for (key, vip_id, params, first) in vips {
        let backends: Vec<_> = (0..3)
            .map(|i| backend(first + i, [10, 50, 1, (first + i) as u8], 1))
            .collect();
        h.add_vip_with_flags(key, vip_id, VIP_F_QUIC | params.flag_bits(), &backends, 251);
        for (i, sid) in SERVER_IDS[..3].iter().enumerate() {
            h.set_quic_server(vip_id, sid & params.max_server_id(), first + i as u32);
        }
        // A stale entry: the id names a backend of another VIP (not valid here).
        h.set_quic_server(vip_id, SERVER_IDS[3] & params.max_server_id(), 1);
    }
}

/// The QUIC parameters of a (destination, port), if a QUIC VIP's.
fn quic_params(dst: IpAddr, port: u16) -> Option<QuicLbParams> {
    match (dst, port) {
        (IpAddr::V4(a), p) if a.octets() == VIPS[2] && p == QUIC4.0 => Some(QUIC4.1),
        (IpAddr::V4(a), p) if a.octets() == VIPS[2] && p == QUIC4_WIDE.0 => Some(QUIC4_WIDE.1),
        (IpAddr::V6(a), p) if a == VIPS6[0] && p == QUIC6.0 => Some(QUIC6.1),
        _ => None,
    }
}

/// A UDP payload: to a QUIC VIP mostly QUIC (short headers naming known,
/// unknown or foreign servers, cut short; long headers), else bytes.
fn udp_body(rng: &mut SmallRng, dst: IpAddr, dport: u16, len: usize) -> Vec<u8> {
    let Some(p) = quic_params(dst, dport).filter(|_| rng.random_bool(0.8)) else {
        return (0..len).map(|i| (i * 7) as u8).collect();
    };
    let sid = SERVER_IDS[rng.random_range(0..4)] & p.max_server_id();
    let sid = if rng.random_bool(0.1) {
        rng.random()
    } else {
        sid
    };
    let nonce: [u8; 18] = rng.random();
    let mut cid = encode_cid(&p, sid & p.max_server_id(), &nonce);
    if rng.random_bool(0.1) {
        cid[0] = (cid[0] & 0x1F) | rng.random_range(0..8u8) << 5;
    }
    let mut body = if rng.random_bool(0.2) {
        packets::quic_initial(&cid, len.min(1200))
    } else {
        packets::quic_short(&cid, len.min(1200))
    };
    if rng.random_bool(0.1) {
        body.truncate(rng.random_range(0..body.len()));
    }
    body
}

const VIPS6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10),
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11),
];

/// A client of the family of `dst`, from a small pool (flows repeat).
fn client_for(rng: &mut SmallRng, dst: IpAddr) -> IpAddr {
    let n = rng.random_range(1..40u8);
    match dst {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n as u16)),
    }
}

/// A (destination, port, is UDP) among the configured services of both
/// families, sometimes anything.
fn service(rng: &mut SmallRng, v6: bool) -> (IpAddr, u16, bool) {
    const SERVICES4: [([u8; 4], u16, bool); 10] = [
        (VIPS[0], 80, false),
        (VIPS[0], 443, false),
        (VIPS[1], 0, false),
        (VIPS[2], 53, true),
        (VIPS[3], 80, false),
        (VIPS[3], 81, false),
        (VIPS[3], 8080, false),
        (VIPS[3], 8443, false),
        (VIPS[2], QUIC4.0, true),
        (VIPS[2], QUIC4_WIDE.0, true),
    ];
    const SERVICES6: [(usize, u16, bool); 4] = [
        (0, 80, false),
        (0, 53, true),
        (1, 0, false),
        (0, QUIC6.0, true),
    ];
    let (dst, mut dport, mut udp) = if v6 {
        let (i, port, udp) = SERVICES6[rng.random_range(0..SERVICES6.len())];
        (IpAddr::V6(VIPS6[i]), port, udp)
    } else {
        let (a, port, udp) = SERVICES4[rng.random_range(0..SERVICES4.len())];
        (IpAddr::V4(Ipv4Addr::from(a)), port, udp)
    };
    if dport == 0 {
        dport = rng.random();
    }
    if rng.random_bool(0.15) {
        dport = *[80u16, 443, 53, 81, 22, 0, rng.random()]
            .get(rng.random_range(0..7))
            .unwrap();
        udp = rng.random_bool(0.3);
    }
    (dst, dport, udp)
}

fn tcp_kind(rng: &mut SmallRng) -> TcpKind {
    [
        TcpKind::Syn,
        TcpKind::SynAck,
        TcpKind::Ack,
        TcpKind::Ack,
        TcpKind::Rst,
        TcpKind::Fin,
    ][rng.random_range(0..6)]
}

/// ICMP: echo requests (to VIPs and not), and errors from a router quoting
/// a VIP's answer to a client (sometimes a foreign or cut quote).
fn icmp_frame(rng: &mut SmallRng, v6: bool) -> Vec<u8> {
    let (vip, port, udp) = service(rng, v6);
    let client = client_for(rng, vip);
    if rng.random_bool(0.4) {
        let dst = if rng.random_bool(0.8) { vip } else { client };
        return packets::echo_request(
            client,
            dst,
            rng.random(),
            rng.random(),
            rng.random_range(0..64),
        );
    }
    let sport = rng.random_range(1000..1040);
    let mut quoted = if udp {
        packets::udp_ip(vip, port, client, sport, rng.random_range(0..200))
    } else {
        packets::tcp_ip(
            vip,
            port,
            client,
            sport,
            tcp_kind(rng),
            rng.random_range(0..200),
        )
    }
    .split_off(14);
    if rng.random_bool(0.2) {
        quoted.truncate(rng.random_range(0..quoted.len()));
    }
    let router = if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))
    };
    let to = if rng.random_bool(0.9) { vip } else { client };
    let mut f = packets::icmp_too_big_error(router, to, rng.random_range(500..1500), &quoted);
    if rng.random_bool(0.3) {
        // Other error (and non-error) types.
        let l4 = if v6 { 14 + 40 } else { 14 + 20 };
        f[l4] = *[1u8, 2, 3, 4, 11, 12, 128, 129, 0, 8, rng.random()]
            .get(rng.random_range(0..11))
            .unwrap();
    }
    f
}

/// An IPv6 frame: TCP/UDP to a service, sometimes behind extension
/// headers or fragmented.
fn ipv6_frame(rng: &mut SmallRng) -> Vec<u8> {
    let (dst, dport, udp) = service(rng, true);
    let dst = if rng.random_bool(0.05) {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            0,
            rng.random_range(0..20),
        ))
    } else {
        dst
    };
    let src = client_for(rng, dst);
    let sport = rng.random_range(1000..1040);
    let payload = *[0usize, 1, 40, 600, 1400, 1440]
        .get(rng.random_range(0..6))
        .unwrap();
    let mut f = if udp {
        let body = udp_body(rng, dst, dport, payload);
        packets::udp_with(src, sport, dst, dport, &body)
    } else {
        packets::tcp_ip(src, sport, dst, dport, tcp_kind(rng), payload)
    };
    if rng.random_bool(0.25) {
        let n = rng.random_range(1..=5);
        let mut exts: Vec<Ext> = (0..n)
            .map(|_| [Ext::HopByHop, Ext::Routing, Ext::DestinationOptions][rng.random_range(0..3)])
            .collect();
        if rng.random_bool(0.3) {
            let at = rng.random_range(0..exts.len());
            exts[at] = Ext::Fragment {
                offset: if rng.random() {
                    0
                } else {
                    rng.random_range(1..200)
                },
                more: rng.random(),
            };
        }
        f = packets::with_ipv6_extensions(&f, &exts);
    }
    f
}

fn fix_checksum(f: &mut [u8], l3: usize) {
    if f.len() < l3 + 20 {
        return;
    }
    let ihl = ((f[l3] & 0x0F) as usize * 4).clamp(20, 60);
    if f.len() < l3 + ihl {
        return;
    }
    f[l3 + 10] = 0;
    f[l3 + 11] = 0;
    let c = ipv4_checksum(&f[l3..l3 + ihl]);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// One frame: mostly well-formed traffic to VIPs from a small pool of
/// clients (so flows repeat and hit the connection table), plus every kind
/// of damage the parser must survive.
pub fn frame(rng: &mut SmallRng) -> Vec<u8> {
    let mut f = match rng.random_range(0..20) {
        0..=5 => ipv6_frame(rng),
        6 => icmp_frame(rng, false),
        7 => icmp_frame(rng, true),
        _ => ipv4_frame(rng),
    };
    let v6 = f[12..14] == [0x86, 0xdd];
    let mut l3 = 14;
    for _ in 0..rng
        .random_range(0..3)
        .min(if rng.random_bool(0.15) { 2 } else { 0 })
    {
        f = packets::with_vlan(&f, rng.random_range(0..4096));
        if rng.random_bool(0.3) {
            f[12..14].copy_from_slice(&0x88A8u16.to_be_bytes());
        }
        l3 += 4;
    }
    match rng.random_range(0..20) {
        0 => f.truncate(rng.random_range(14..f.len().max(15))),
        1 => {
            let n = rng.random_range(1..4);
            for _ in 0..n {
                let at = rng.random_range(0..f.len().min(80));
                f[at] = rng.random();
            }
        }
        2 if v6 && f.len() > l3 + 6 => {
            let len: u16 = rng.random_range(0..1600);
            f[l3 + 4..l3 + 6].copy_from_slice(&len.to_be_bytes());
        }
        2 if f.len() > l3 + 4 => {
            let len: u16 = rng.random_range(0..1600);
            f[l3 + 2..l3 + 4].copy_from_slice(&len.to_be_bytes());
            fix_checksum(&mut f, l3);
        }
        3 if f.len() > l3 => {
            f[l3] = (rng.random_range(0..16u8) << 4) | rng.random_range(0..16u8);
            if !v6 {
                fix_checksum(&mut f, l3);
            }
        }
        4 if v6 && f.len() > l3 + 6 => {
            f[l3 + 6] = *[0u8, 4, 6, 17, 41, 43, 44, 50, 58, 59, 60, rng.random()]
                .get(rng.random_range(0..12))
                .unwrap();
        }
        4 if f.len() > l3 + 9 => {
            f[l3 + 9] = *[1u8, 4, 47, 50, 132, rng.random()]
                .get(rng.random_range(0..6))
                .unwrap();
            fix_checksum(&mut f, l3);
        }
        5 => f.extend((0..rng.random_range(1..30)).map(|_| rng.random::<u8>())),
        // Lengths inside the transport header: a TCP data offset below 5
        // or past the end, a UDP length below 8 or past the end (or fine).
        6 => {
            let l4 = if v6 {
                l3 + 40
            } else {
                l3 + (f.get(l3).map_or(5, |b| b & 0x0F) as usize * 4)
            };
            let proto = if v6 { f.get(l3 + 6) } else { f.get(l3 + 9) };
            match proto {
                Some(&PROTO_TCP) if f.len() > l4 + 12 => {
                    f[l4 + 12] = rng.random_range(0..16u8) << 4;
                }
                Some(&PROTO_UDP) if f.len() > l4 + 6 => {
                    let len: u16 = *[0u16, 7, 8, 9, 1500, rng.random()]
                        .get(rng.random_range(0..6))
                        .unwrap();
                    f[l4 + 4..l4 + 6].copy_from_slice(&len.to_be_bytes());
                }
                _ => {}
            }
        }
        // An IPv4 header checksum off by one bit.
        7 if !v6 && f.len() > l3 + 11 => {
            f[l3 + 10 + rng.random_range(0..2)] ^= 1 << rng.random_range(0..8)
        }
        _ => {}
    }
    f
}

fn ipv4_frame(rng: &mut SmallRng) -> Vec<u8> {
    let src = Ipv4Addr::new(192, 0, 2, rng.random_range(1..40));
    // Mostly a configured (VIP, port, protocol); sometimes anything.
    let (dst, dport, udp) = service(rng, false);
    let IpAddr::V4(mut dst) = dst else {
        unreachable!()
    };
    if rng.random_bool(0.05) {
        dst = Ipv4Addr::new(10, rng.random_range(0..3), 0, rng.random_range(0..20));
    }
    let sport = rng.random_range(1000..1040);
    let payload = *[0usize, 1, 40, 600, 1400, 1460]
        .get(rng.random_range(0..6))
        .unwrap();
    let mut f = match udp {
        true => {
            let body = udp_body(rng, IpAddr::V4(dst), dport, payload);
            packets::udp_with(IpAddr::V4(src), sport, IpAddr::V4(dst), dport, &body)
        }
        false => packets::tcp(src, sport, dst, dport, tcp_kind(rng), payload),
    };
    if rng.random_bool(0.1) {
        let n = rng.random_range(1..=10) * 4;
        let opts: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        f = packets::with_ip_options(&f, &opts);
    }
    if rng.random_bool(0.1) {
        f = packets::as_fragment(
            &f,
            rng.random(),
            if rng.random() {
                0
            } else {
                rng.random_range(1..200)
            },
        );
    }
    if rng.random_bool(0.05) {
        // A random TCP flag byte.
        let at = 14 + (f[14] & 0x0F) as usize * 4 + 13;
        if f[23] == PROTO_TCP && at < f.len() {
            f[at] = rng.random();
        }
    }
    f
}

/// Runs `count` frames from `seed`; every `change_every` frames a backend
/// is failed or restored (tracked flows must then re-hash identically).
pub fn run(seed: u64, count: u64) -> Vec<(lb_common::maps::Reason, lb_common::maps::Counter)> {
    // Odd seeds run with a gateway MAC (no-route fallback), even ones without.
    // UDP entries never expire here: the model has no clock, and a run of
    // millions of frames outlives the 30 s default (expiry has its own
    // fixture test).
    let mut settings = Settings {
        hash_seed: seed as u32,
        udp_idle_timeout_ns: u64::MAX / 2,
        ..Settings::DEFAULT
    };
    if seed % 2 == 1 {
        settings.flags |= lb_common::settings::SETTINGS_F_GATEWAY_MAC;
        settings.gateway_mac = [0x02, 0, 0, 0, 0, 0x99];
    }
    let mut h = Harness::with_conntrack(settings, 1 << 16);
    setup(&mut h);
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..count {
        if i % 997 == 996 {
            let id = match rng.random_range(0..4) {
                0 => rng.random_range(1..=8),
                1 => rng.random_range(61..=63),
                2 => *[91, 92, 96, 99].get(rng.random_range(0..4)).unwrap(),
                _ => 51,
            };
            h.set_backend_valid(id, rng.random_bool(0.5));
        }
        let f = frame(&mut rng);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.send_batched(&f);
            if i % COUNTER_CHECK_EVERY == COUNTER_CHECK_EVERY - 1 {
                h.assert_counters();
            }
        }));
        if let Err(e) = result {
            eprintln!(
                "MISMATCH: reproduce with seed {seed}, frame index {i}\nframe: {}",
                hex(&f)
            );
            std::panic::resume_unwind(e);
        }
    }
    h.assert_counters();
    h.dp.reason_counters()
}
