//! The backend-side `decap` program under `BPF_PROG_TEST_RUN`: every
//! encapsulation the balancer produces (built by the reference model's
//! encapsulation) comes out as exactly the inner frame; anything else is
//! passed unchanged and counted. Needs root.

use std::net::IpAddr;

use lb_common::{
    maps::DecapReason,
    model::{ModelParse, Outer, encapsulate, parse},
    user::addr_from_ip,
};
use lb_tests::{
    have_root,
    packets::{self, LB_MAC, ROUTER_MAC, TcpKind},
};
use lb_userspace::decap::Decap;

const XDP_PASS: u32 = 2;
const GUE_PORT: u16 = 6080;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `inner` (an Ethernet frame) encapsulated toward `backend` as the balancer would.
fn wrap(inner: &[u8], backend: &str, gue: bool) -> Vec<u8> {
    let ModelParse::Ip(p) = parse(inner) else {
        panic!("not an IP frame")
    };
    let backend = ip(backend);
    let v6 = backend.is_ipv6();
    let outer = Outer {
        v6,
        gue,
        src: addr_from_ip(if v6 {
            ip("fd00:172:16::1")
        } else {
            ip("172.16.0.1")
        }),
        dst: addr_from_ip(backend),
        ttl: 64,
        hash: 0x1234_5678,
        gue_port: GUE_PORT.to_be(),
    };
    encapsulate(inner, &p, &outer, ROUTER_MAC, LB_MAC)
}

#[test]
fn every_encapsulation_comes_out_as_the_inner_frame() {
    if !have_root() {
        return;
    }
    let mut decap = Decap::load(GUE_PORT).expect("load decap");
    let inner4 = packets::tcp_ip(
        ip("192.0.2.7"),
        40_000,
        ip("10.0.0.10"),
        80,
        TcpKind::Ack,
        100,
    );
    let inner6 = packets::tcp_ip(
        ip("2001:db8::7"),
        40_000,
        ip("fd00::10"),
        80,
        TcpKind::Ack,
        100,
    );
    let mut decapsulated = 0;
    for (name, inner, backend, gue) in [
        ("IPIP", &inner4, "10.30.1.2", false),
        ("6in4", &inner6, "10.30.1.2", false),
        ("4in6", &inner4, "fd00:30:1::2", false),
        ("IP6IP6", &inner6, "fd00:30:1::2", false),
        ("GUE, IPv4 in IPv4", &inner4, "10.30.1.2", true),
        ("GUE, IPv6 in IPv4", &inner6, "10.30.1.2", true),
        ("GUE, IPv4 in IPv6", &inner4, "fd00:30:1::2", true),
        ("GUE, IPv6 in IPv6", &inner6, "fd00:30:1::2", true),
    ] {
        let frame = wrap(inner, backend, gue);
        let run = decap.test_run(&frame).unwrap();
        let (action, out) = (run.action, run.packet);
        assert_eq!(action, XDP_PASS, "{name}");
        // The outer frame's MACs stay; the rest is the inner frame.
        assert_eq!(&out[..12], &frame[..12], "{name}: MACs kept");
        assert_eq!(&out[12..], &inner[12..], "{name}: exactly the inner packet");
        decapsulated += 1;
        assert_eq!(
            decap.counter(DecapReason::Decapsulated).packets,
            decapsulated,
            "{name}"
        );
    }

    // Not for us, or broken: passed unchanged, counted.
    let mut other_port = wrap(&inner4, "10.30.1.2", true);
    other_port[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&4789u16.to_be_bytes());
    let mut wrong_version = wrap(&inner6, "10.30.1.2", false);
    wrong_version[14 + 9] = 4; // says IPv4 inside, carries IPv6
    let cut = wrap(&inner4, "fd00:30:1::2", false)[..14 + 40].to_vec();
    for (name, frame, reason) in [
        (
            "plain TCP",
            inner4.clone(),
            DecapReason::PassNotEncapsulated,
        ),
        (
            "UDP to another port",
            other_port,
            DecapReason::PassNotEncapsulated,
        ),
        ("ARP", packets::arp(), DecapReason::PassNotEncapsulated),
        (
            "inner version differs from the protocol",
            wrong_version,
            DecapReason::PassMalformed,
        ),
        (
            "cut after the outer header",
            cut,
            DecapReason::PassMalformed,
        ),
    ] {
        let before = decap.counter(reason).packets;
        let run = decap.test_run(&frame).unwrap();
        assert_eq!(run.action, XDP_PASS, "{name}");
        assert_eq!(run.packet, frame, "{name}: unchanged");
        assert_eq!(decap.counter(reason).packets, before + 1, "{name}: counted");
    }
}
