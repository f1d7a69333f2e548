//! The backend-side `decap` program under `BPF_PROG_TEST_RUN`: every
//! encapsulation the balancer produces (built by the reference model's
//! encapsulation) comes out as exactly the inner frame; anything else is
//! passed unchanged and counted. Needs root.

use std::net::IpAddr;

use lb_common::{
    maps::{DecapReason, FlowKey},
    model::{
        Action, DecapNextHop, LocalSocket, ModelParse, Outer, decap_decide, encapsulate,
        encapsulate_nested, parse,
    },
    user::addr_from_ip,
};
use lb_tests::{
    decap_fuzz::{BE_MAC, backend_host},
    have_root,
    netns::ifindex,
    packets::{self, LB_MAC, ROUTER_MAC, TcpKind},
};
use lb_userspace::decap::Decap;

const XDP_PASS: u32 = 2;
const GUE_PORT: u16 = 6080;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn outer_to(backend: &str, gue: bool) -> Outer {
    let backend = ip(backend);
    let v6 = backend.is_ipv6();
    Outer {
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
    }
}

fn parsed(inner: &[u8]) -> lb_common::model::ParsedIp {
    let ModelParse::Ip(p) = parse(inner) else {
        panic!("not an IP frame")
    };
    p
}

/// `inner` (an Ethernet frame) encapsulated toward `backend` as the balancer would.
fn wrap(inner: &[u8], backend: &str, gue: bool) -> Vec<u8> {
    encapsulate(
        inner,
        &parsed(inner),
        &outer_to(backend, gue),
        ROUTER_MAC,
        LB_MAC,
    )
}

/// `inner` sent to `first` with `second` as the second hop.
fn wrap2(inner: &[u8], first: &str, second: &str, gue: bool) -> Vec<u8> {
    encapsulate_nested(
        inner,
        &parsed(inner),
        &outer_to(first, gue),
        Some(&outer_to(second, gue)),
        ROUTER_MAC,
        LB_MAC,
    )
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

/// Second-chance packets at a backend: delivered when this host has the
/// connection, sent on to the second backend when not (out of the interface
/// they came in on, to the router), never for SYNs or UDP; exactly as the
/// reference model says, byte for byte.
#[test]
fn a_second_hop_is_delivered_where_the_connection_is_and_forwarded_elsewhere() {
    if !have_root() {
        return;
    }
    let ns = backend_host("dc2");
    let _in = ns.enter();
    let mut decap = Decap::load(GUE_PORT).expect("load decap");
    let be0 = ifindex("be0");
    // Real connections: 192.0.2.7 -> 10.0.0.10:80 and 2001:db8::7 -> [fd00::10]:80.
    let listener = std::net::TcpListener::bind("[::]:80").unwrap();
    // From the VIP itself: the kernel picks it as the source of a local
    // connection, so the client side is (VIP, port) too.
    let connect = |to: &str| {
        let c = std::net::TcpStream::connect(to).unwrap();
        let port = c.local_addr().unwrap().port();
        (c, listener.accept().unwrap().0, port)
    };
    let (_c4, _s4, port4) = connect("10.0.0.10:80");
    let (_c6, _s6, port6) = connect("[fd00::10]:80");
    let connected = [(ip("10.0.0.10"), port4), (ip("fd00::10"), port6)];
    let socket = |f: &FlowKey| {
        let src = lb_common::user::ip_from_addr(&f.src, f.family);
        let sport = u16::from_be(f.sport);
        if connected.contains(&(src, sport)) && u16::from_be(f.dport) == 80 {
            LocalSocket::Connected
        } else if u16::from_be(f.dport) == 80 {
            LocalSocket::Listening {
                cookie_valid: false,
            }
        } else {
            LocalSocket::None
        }
    };
    let forwarding = std::cell::Cell::new(false);
    let next_hop = |_v: u8, dst: &lb_common::maps::Addr, _len: u16| -> DecapNextHop {
        if !forwarding.get() {
            return DecapNextHop::ForwardingDisabled;
        }
        let d = lb_common::user::ip_from_addr(dst, if dst[1..] == [0, 0, 0] { 4 } else { 6 });
        match d.to_string().as_str() {
            "10.30.1.2" | "fd00:30:1::2" => DecapNextHop::Local,
            a if a.starts_with("10.30.2.") || a.starts_with("fd00:30:2:") => {
                DecapNextHop::Resolved {
                    smac: BE_MAC,
                    dmac: ROUTER_MAC,
                    ifindex: be0,
                }
            }
            a if a.starts_with("10.30.3.") => DecapNextHop::Unresolved,
            // No route: the FIB says "not forwarded", as for a local address.
            _ => DecapNextHop::Local,
        }
    };
    let tcp =
        |src: &str, sport, dst: &str, kind| packets::tcp_ip(ip(src), sport, ip(dst), 80, kind, 10);
    let ack4 = tcp("10.0.0.10", port4, "10.0.0.10", TcpKind::Ack);
    let ack6 = tcp("fd00::10", port6, "fd00::10", TcpKind::Ack);
    let stranger4 = tcp("192.0.2.7", 1, "10.0.0.10", TcpKind::Ack);
    let stranger6 = tcp("2001:db8::7", 1, "fd00::10", TcpKind::Ack);
    let syn4 = tcp("192.0.2.7", 2, "10.0.0.10", TcpKind::Syn);
    let udp4 = packets::udp_ip(ip("192.0.2.7"), 3, ip("10.0.0.10"), 53, 8);
    let to_port_81 = packets::tcp_ip(ip("192.0.2.7"), 4, ip("10.0.0.10"), 81, TcpKind::Ack, 0);
    use DecapReason::{
        SecondHopForwarded as Forwarded, SecondHopLocal as Local, SecondHopToKernel as Kernel,
    };
    // (case, frame, outcome without forwarding on be0, outcome with it):
    // without, every packet that reaches the FIB goes back to the router.
    let cases: Vec<(&str, Vec<u8>, DecapReason, DecapReason)> = vec![
        (
            "IPIP, connection here",
            wrap2(&ack4, "10.30.1.2", "10.30.2.2", false),
            Local,
            Local,
        ),
        (
            "IP6IP6, connection here",
            wrap2(&ack6, "fd00:30:1::2", "fd00:30:2::2", false),
            Local,
            Local,
        ),
        (
            "GUE 4in4, connection here",
            wrap2(&ack4, "10.30.1.2", "10.30.2.2", true),
            Local,
            Local,
        ),
        (
            "GUE 6in6, connection here",
            wrap2(&ack6, "fd00:30:1::2", "fd00:30:2::2", true),
            Local,
            Local,
        ),
        (
            "IPIP, only a listener",
            wrap2(&stranger4, "10.30.1.2", "10.30.2.2", false),
            Forwarded,
            Forwarded,
        ),
        (
            "IP6IP6, only a listener",
            wrap2(&stranger6, "fd00:30:1::2", "fd00:30:2::2", false),
            Forwarded,
            Forwarded,
        ),
        (
            "GUE, only a listener",
            wrap2(&stranger4, "10.30.1.2", "10.30.2.2", true),
            Forwarded,
            Forwarded,
        ),
        (
            "4in6 then 4in4: families mixed",
            wrap2(&stranger4, "fd00:30:1::2", "10.30.2.2", false),
            Forwarded,
            Forwarded,
        ),
        (
            "no socket at all",
            wrap2(&to_port_81, "10.30.1.2", "10.30.2.2", false),
            Forwarded,
            Forwarded,
        ),
        (
            "a SYN is never sent on",
            wrap2(&syn4, "10.30.1.2", "10.30.2.2", false),
            Local,
            Local,
        ),
        (
            "UDP is never sent on",
            wrap2(&udp4, "10.30.1.2", "10.30.2.2", false),
            Local,
            Local,
        ),
        (
            "second hop is this host",
            wrap2(&stranger4, "10.30.1.2", "10.30.1.2", false),
            Forwarded,
            Local,
        ),
        (
            "no route to the second hop",
            wrap2(&stranger4, "10.30.1.2", "10.99.0.1", false),
            Forwarded,
            Local,
        ),
        (
            "second hop without a neighbour entry",
            wrap2(&stranger4, "10.30.1.2", "10.30.3.2", false),
            Forwarded,
            Kernel,
        ),
    ];
    // A backend that does not forward (the default) sends second hops back
    // to the router; one that does, where its FIB says.
    for on in [false, true] {
        forwarding.set(on);
        ns.sh(&format!(
            "sysctl -qw net.ipv4.conf.all.forwarding={0} net.ipv6.conf.all.forwarding={0}",
            on as u8
        ));
        for (name, frame, without, with) in cases.clone() {
            let reason = if on { with } else { without };
            let name = format!("{name} (forwarding {on})");
            let before = decap.counter(reason).packets;
            let run = decap.test_run_on(&frame, be0).unwrap();
            let model = decap_decide(&frame, GUE_PORT, be0, socket, next_hop);

            assert_eq!(model.reason, reason, "{name}: the model's reason");
            assert_eq!(run.action, model.action.xdp_code(), "{name}: action");
            assert_eq!(run.packet, model.output, "{name}: output bytes");
            assert_eq!(decap.counter(reason).packets, before + 1, "{name}: counted");
            match reason {
                Local => {
                    // Exactly the client's packet, the frame's MACs kept.
                    assert!(
                        frame.ends_with(&run.packet[14..]),
                        "{name}: innermost packet"
                    );
                    let ModelParse::Ip(p) = parse(&run.packet) else {
                        panic!("{name}: not IP")
                    };
                    let vip = lb_common::user::ip_from_addr(&p.flow.dst, p.flow.family);
                    assert!(["10.0.0.10", "fd00::10"].contains(&vip.to_string().as_str()));
                }
                Forwarded => {
                    assert_eq!(model.action, Action::Tx, "{name}: back out of be0");
                    if on {
                        assert_eq!(&run.packet[0..6], &ROUTER_MAC, "{name}: to the router");
                        assert_eq!(&run.packet[6..12], &BE_MAC, "{name}: from be0");
                    } else {
                        assert_eq!(
                            &run.packet[0..6],
                            &frame[6..12],
                            "{name}: back where it came from"
                        );
                        assert_eq!(&run.packet[6..12], &frame[0..6], "{name}: from be0");
                    }
                }
                _ => assert_eq!(model.action, Action::Pass),
            }
        }
    }
    drop(listener);
}

/// A handshake this backend answered with a SYN cookie (it kept no state):
/// its completing ACK, arriving with a second hop, is delivered here, not
/// sent on (`bpf_tcp_check_syncookie`); an ACK with a wrong cookie is.
#[test]
fn a_syn_cookie_ack_with_a_second_hop_is_delivered_here() {
    use std::os::fd::AsRawFd;
    if !have_root() {
        return;
    }
    let ns = backend_host("dck");
    // Cookies for every SYN; replies go back to the router.
    ns.sh("sysctl -qw net.ipv4.tcp_syncookies=2");
    ns.ip(&["route", "add", "default", "via", "10.30.1.1"]);
    let _in = ns.enter();
    let _listener = std::net::TcpListener::bind("10.0.0.10:80").unwrap();
    let mut decap = Decap::load(GUE_PORT).expect("load decap");
    let be0 = ifindex("be0");
    let wire = lb_tests::netns::capture("rt0");
    let client = [192, 0, 2, 9];
    let segment = |flags: u8, seq: u32, ack: u32| -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, BE_MAC)
            .ipv4(client, [10, 0, 0, 10], 64)
            .tcp(5555, 80, seq, 64_000);
        let b = if flags == 0x02 { b.syn() } else { b.ack(ack) };
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    };
    // The client's SYN reaches the backend's kernel through the wire.
    let syn = segment(0x02, 1000, 0);
    // SAFETY: sending a buffer on our own socket.
    let sent = unsafe { libc::send(wire.as_raw_fd(), syn.as_ptr().cast(), syn.len(), 0) };
    assert_eq!(sent, syn.len() as isize);
    // Its SYN-ACK (a cookie) comes back out of be0.
    let mut cookie = None;
    for _ in 0..20 {
        let mut buf = [0u8; 256];
        // SAFETY: receiving into a local buffer.
        let n = unsafe { libc::recv(wire.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 54 {
            continue;
        }
        let f = &buf[..n as usize];
        let tcp = 14 + (f[14] & 0x0F) as usize * 4;
        let from_vip = f[12..14] == [8, 0] && f[26..30] == [10, 0, 0, 10] && f[30..34] == client;
        if from_vip && f[tcp + 13] & 0x12 == 0x12 {
            cookie = Some(u32::from_be_bytes(f[tcp + 4..tcp + 8].try_into().unwrap()));
            break;
        }
    }
    let cookie = cookie.expect("a SYN-ACK from the VIP");
    for (name, ack, reason) in [
        (
            "the cookie's ACK",
            cookie.wrapping_add(1),
            DecapReason::SecondHopLocal,
        ),
        (
            "an ACK with a wrong cookie",
            cookie.wrapping_add(7777),
            DecapReason::SecondHopForwarded,
        ),
    ] {
        let frame = wrap2(&segment(0x10, 1001, ack), "10.30.1.2", "10.30.2.2", false);
        let before = decap.counter(reason).packets;
        decap.test_run_on(&frame, be0).unwrap();
        assert_eq!(decap.counter(reason).packets, before + 1, "{name}");
    }
}
