//! The backend side under differential fuzzing: frames from the
//! balancer's generator, sent as they are, encapsulated once, or nested
//! (with a second hop among backends this host reaches, reaches without a
//! neighbour entry, is, or has no route to), over IPIP or GUE, either
//! family, then cut short or with a header field damaged. Each runs through
//! the real `decap` program in a backend's namespace (a listener on port
//! 80, no connections) and through the decap model; action, output bytes
//! and counters must agree.

use std::{
    collections::BTreeMap,
    net::{IpAddr, TcpListener},
};

use lb_common::{
    maps::{Addr, DecapReason, FlowKey},
    model::{
        DecapNextHop, LocalSocket, ModelParse, Outer, decap_decide, encapsulate,
        encapsulate_nested, parse,
    },
    user::{addr_from_ip, ip_from_addr},
};
use lb_userspace::decap::Decap;
use rand::{Rng, SeedableRng, rngs::SmallRng};

use crate::{
    fixture::hex,
    netns::{NetNs, ifindex},
    packets::{LB_MAC, ROUTER_MAC},
};

pub const BE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x30];
pub const GUE_PORT: u16 = 6080;

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A backend in a namespace of its own: `be0` is 10.30.1.2/24 and
/// fd00:30:1::2/64 (the router, ROUTER_MAC, is .1 / ::1, permanent
/// neighbour entries, and routes to the other backends, 10.30.2.0/24 and
/// fd00:30:2::/64); 10.30.3.0/24 is routed via 10.30.1.9, which has no
/// neighbour entry; the VIPs are on `lo`.
pub fn backend_host(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    ns.ip(&[
        "link",
        "add",
        "be0",
        "address",
        &mac(BE_MAC),
        "type",
        "veth",
        "peer",
        "name",
        "rt0",
    ]);
    for cmd in [
        "link set lo up",
        "link set be0 up",
        "link set rt0 up",
        "addr add 10.30.1.2/24 dev be0",
        "addr add 10.0.0.10/32 dev lo",
        "route add 10.30.2.0/24 via 10.30.1.1 dev be0",
        "route add 10.30.3.0/24 via 10.30.1.9 dev be0",
        "-6 addr add fd00:30:1::2/64 dev be0 nodad",
        "-6 addr add fd00::10/128 dev lo nodad",
        "-6 route add fd00:30:2::/64 via fd00:30:1::1 dev be0",
    ] {
        ns.ip(&cmd.split_whitespace().collect::<Vec<_>>());
    }
    for (peer, fam) in [("10.30.1.1", "-4"), ("fd00:30:1::1", "-6")] {
        ns.ip(&[
            fam,
            "neigh",
            "replace",
            peer,
            "lladdr",
            &mac(ROUTER_MAC),
            "dev",
            "be0",
            "nud",
            "permanent",
        ]);
    }
    ns
}

/// Second hops the generator picks from, and what the namespace's FIB
/// (forwarding on) answers for each.
const SECOND_HOPS: [&str; 8] = [
    "10.30.2.2",
    "10.30.3.2",
    "10.30.1.2",
    "10.99.0.1",
    "fd00:30:2::2",
    "fd00:30:1::2",
    "fd00:99::1",
    "10.30.2.77",
];
const FIRST_HOPS: [&str; 2] = ["10.30.1.2", "fd00:30:1::2"];

fn fib(be0: u32) -> impl Fn(u8, &Addr, u16) -> DecapNextHop {
    move |v: u8, dst: &Addr, tot_len: u16| {
        let ip = ip_from_addr(dst, v).to_string();
        let local = ip == "10.30.1.2" || ip == "fd00:30:1::2";
        let routed = ip.starts_with("10.30.2.") || ip.starts_with("fd00:30:2:");
        if (routed || ip.starts_with("10.30.3.")) && !local && tot_len > 1500 {
            // Larger than be0's MTU: "fragmentation needed", to the kernel.
            DecapNextHop::Unresolved
        } else if routed {
            DecapNextHop::Resolved {
                smac: BE_MAC,
                dmac: ROUTER_MAC,
                ifindex: be0,
            }
        } else if ip.starts_with("10.30.3.") {
            DecapNextHop::Unresolved
        } else {
            // This host's addresses, and no route at all: "not forwarded".
            DecapNextHop::Local
        }
    }
}

/// A listener on port 80 (both families), nothing else.
fn sockets(f: &FlowKey) -> LocalSocket {
    if u16::from_be(f.dport) == 80 {
        LocalSocket::Listening {
            cookie_valid: false,
        }
    } else {
        LocalSocket::None
    }
}

fn outer(rng: &mut SmallRng, to: &str, gue: bool) -> Outer {
    let dst: IpAddr = to.parse().unwrap();
    let v6 = dst.is_ipv6();
    let src: IpAddr = if v6 {
        "fd00:172:16::9".parse().unwrap()
    } else {
        "172.16.0.9".parse().unwrap()
    };
    Outer {
        v6,
        gue,
        src: addr_from_ip(src),
        dst: addr_from_ip(dst),
        ttl: 64,
        hash: rng.random(),
        gue_port: GUE_PORT.to_be(),
    }
}

/// One frame for the backend: plain, encapsulated, or with a second hop,
/// sometimes damaged.
pub fn frame(rng: &mut SmallRng) -> Vec<u8> {
    let inner = crate::fuzz::frame(rng);
    let ModelParse::Ip(p) = parse(&inner) else {
        return inner;
    };
    let gue = rng.random_bool(0.3);
    let to = FIRST_HOPS[rng.random_range(0..2)];
    let first = outer(rng, to, gue);
    // Where the fields the decision reads are: each layer's version
    // nibble and protocol, and the GUE port (addresses stay out of reach:
    // the namespace's FIB is modelled for the addresses above only).
    let mut fields = Vec::new();
    let layer = |at: usize, o: &Outer, fields: &mut Vec<usize>| -> usize {
        fields.extend([at, at + if o.v6 { 6 } else { 9 }]);
        let ip = if o.v6 { 40 } else { 20 };
        if o.gue {
            fields.extend([at + ip + 2, at + ip + 3]);
        }
        at + o.overhead() as usize
    };
    let mut f = match rng.random_range(0..10) {
        0 => return inner,
        1..=3 => {
            let at = layer(14, &first, &mut fields);
            fields.push(at);
            encapsulate(&inner, &p, &first, LB_MAC, ROUTER_MAC)
        }
        _ => {
            let to = SECOND_HOPS[rng.random_range(0..8)];
            let second = outer(rng, to, gue);
            let at = layer(14, &first, &mut fields);
            let at = layer(at, &second, &mut fields);
            fields.extend([at, at + if p.v6 { 6 } else { 9 }]);
            encapsulate_nested(&inner, &p, &first, Some(&second), LB_MAC, ROUTER_MAC)
        }
    };
    match rng.random_range(0..10) {
        0 => {
            // BPF_PROG_TEST_RUN wants at least an Ethernet header.
            let cut = rng.random_range(14..f.len());
            f.truncate(cut);
        }
        1 => {
            let at = fields[rng.random_range(0..fields.len())].min(f.len() - 1);
            f[at] = rng.random();
        }
        _ => {}
    }
    f
}

/// Runs `count` frames from `seed`; returns packets per decap reason.
pub fn run(seed: u64, count: u64) -> BTreeMap<&'static str, u64> {
    let ns = backend_host("dcfz");
    ns.sh("sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv6.conf.all.forwarding=1");
    let _in = ns.enter();
    let _listener = TcpListener::bind("[::]:80").unwrap();
    let be0 = ifindex("be0");
    let mut decap = Decap::load(GUE_PORT).expect("load decap");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let next_hop = fib(be0);
    for i in 0..count {
        let f = frame(&mut rng);
        let model = decap_decide(&f, GUE_PORT, be0, sockets, &next_hop);
        let run = decap.test_run_on(&f, be0).expect("test run");
        let ctx = || format!("seed {seed}, frame {i}: {}\nmodel {model:?}", hex(&f));
        assert_eq!(run.action, model.action.xdp_code(), "action\n{}", ctx());
        assert_eq!(run.packet, model.output, "output bytes\n{}", ctx());
        *expected.entry(model.reason.name()).or_default() += 1;
    }
    for r in DecapReason::ALL {
        assert_eq!(
            decap.counter(r).packets,
            expected.get(r.name()).copied().unwrap_or(0),
            "counter {}",
            r.name()
        );
    }
    expected
}
