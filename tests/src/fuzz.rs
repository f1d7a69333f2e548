//! Differential fuzzing: a seeded generator of valid, mutated and malformed
//! frames, each run through the real program and the reference model by
//! `Harness::send_batched`, which asserts action, output bytes and the
//! connection table agree; counters are compared every `COUNTER_CHECK_EVERY`
//! packets. A mismatch panics with a reproducer (seed, index, frame hex).

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    PROTO_TCP, PROTO_UDP,
    maps::{BACKEND_F_VALID, VipKey},
    model::ipv4_checksum,
    settings::Settings,
};
use rand::{Rng, SeedableRng, rngs::SmallRng};

use crate::{
    fixture::{Harness, backend, hex},
    packets::{self, TcpKind},
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
    let src = Ipv4Addr::new(192, 0, 2, rng.random_range(1..40));
    // Mostly a configured (VIP, port, protocol); sometimes anything.
    const SERVICES: [([u8; 4], u16, bool); 6] = [
        (VIPS[0], 80, false),
        (VIPS[0], 443, false),
        (VIPS[1], 0, false),
        (VIPS[2], 53, true),
        (VIPS[3], 80, false),
        (VIPS[3], 81, false),
    ];
    let (dst, mut dport, mut udp) = SERVICES[rng.random_range(0..SERVICES.len())];
    let mut dst = Ipv4Addr::from(dst);
    if dport == 0 {
        dport = rng.random();
    }
    if rng.random_bool(0.15) {
        dport = *[80u16, 443, 53, 81, 22, 0, rng.random()]
            .get(rng.random_range(0..7))
            .unwrap();
        udp = rng.random_bool(0.3);
    }
    if rng.random_bool(0.05) {
        dst = Ipv4Addr::new(10, rng.random_range(0..3), 0, rng.random_range(0..20));
    }
    let sport = rng.random_range(1000..1040);
    let payload = *[0usize, 1, 40, 600, 1400, 1460]
        .get(rng.random_range(0..6))
        .unwrap();
    let mut f = match udp {
        true => packets::udp(src, sport, dst, dport, payload),
        false => {
            let kind = [
                TcpKind::Syn,
                TcpKind::SynAck,
                TcpKind::Ack,
                TcpKind::Ack,
                TcpKind::Rst,
                TcpKind::Fin,
            ][rng.random_range(0..6)];
            packets::tcp(src, sport, dst, dport, kind, payload)
        }
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
        2 if f.len() > l3 + 4 => {
            let len: u16 = rng.random_range(0..1600);
            f[l3 + 2..l3 + 4].copy_from_slice(&len.to_be_bytes());
            fix_checksum(&mut f, l3);
        }
        3 if f.len() > l3 => {
            f[l3] = (rng.random_range(0..16u8) << 4) | rng.random_range(0..16u8);
            fix_checksum(&mut f, l3);
        }
        4 if f.len() > l3 + 9 => {
            f[l3 + 9] = *[1u8, 4, 47, 50, 132, rng.random()]
                .get(rng.random_range(0..6))
                .unwrap();
            fix_checksum(&mut f, l3);
        }
        5 => f.extend((0..rng.random_range(1..30)).map(|_| rng.random::<u8>())),
        _ => {}
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
            let id = rng.random_range(1..=8);
            let flags = if rng.random_bool(0.5) {
                BACKEND_F_VALID
            } else {
                0
            };
            h.set_backend_flags(id, flags);
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
