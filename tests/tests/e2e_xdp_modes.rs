//! The end-to-end scenarios in the other XDP modes on veth: native
//! ("driver", as on a real NIC) and the default ("auto", which must work
//! on veth as users run it). The rest of the suite runs in skb mode;
//! `LB_TEST_XDP_MODE=driver cargo xtask test` runs all of it natively.
//! Needs root.

use std::net::UdpSocket;

use lb_tests::{
    have_root,
    testbed::{Spec, Testbed, services, udp_ask},
};

/// What `ip link show eth0` says of the LB's attachment.
fn lb_mode(tb: &Testbed, i: usize) -> &'static str {
    let line = tb.lbs[i].sh("ip link show eth0");
    if line.contains("xdpgeneric") {
        "generic"
    } else if line.contains("xdp") {
        "native"
    } else {
        "none"
    }
}

/// Checksum errors the backends' TCP stacks counted.
fn backend_csum_errors(tb: &Testbed) -> u64 {
    tb.backends
        .iter()
        .map(|b| {
            let out = b.sh("cat /proc/net/snmp");
            let mut lines = out.lines().filter(|l| l.starts_with("Tcp:"));
            let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == "InCsumErrors")
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn native_mode_on_veth_carries_every_service_and_survives_ecmp_changes() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new(
        "exn",
        Spec {
            xdp_mode: "driver",
            ..Spec::default()
        },
    );
    assert_eq!((lb_mode(&tb, 0), lb_mode(&tb, 1)), ("native", "native"));
    tb.assert_every_service_answers(30);
    let answered = tb.in_client(|| {
        (0..30)
            .filter(|_| {
                let s = UdpSocket::bind("10.10.0.2:0").unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                    .unwrap();
                udp_ask(&s).is_some()
            })
            .count()
    });
    assert_eq!(answered, 30, "UDP through native XDP");
    let held = tb.hold_connections_to(&services(), 10);
    let total = services().len() * 10;
    assert_eq!(held.alive(), total);
    assert_eq!(tb.ecmp_leave_join_switch(&held), [total; 3]);
    assert_eq!(backend_csum_errors(&tb), 0, "no bad inner checksums");
}

#[test]
fn the_default_auto_mode_works_on_veth_as_users_run_it() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new(
        "exa",
        Spec {
            xdp_mode: "auto",
            ..Spec::default()
        },
    );
    // Native on a veth would black-hole locally sent TCP (partial checksums).
    assert_eq!((lb_mode(&tb, 0), lb_mode(&tb, 1)), ("generic", "generic"));
    tb.assert_every_service_answers(30);
    let held = tb.hold_connections_to(&services(), 5);
    let total = services().len() * 5;
    assert_eq!(tb.ecmp_leave_join_switch(&held), [total; 3]);
    assert_eq!(backend_csum_errors(&tb), 0, "no bad inner checksums");
}
