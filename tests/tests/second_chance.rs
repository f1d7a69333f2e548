//! Second-chance forwarding end to end: three lbd instances behind the
//! ECMP router, four backends, 300 long-lived TCP connections. A backend
//! is added (or removed) on every instance; then a fresh instance, which
//! never saw a packet of those connections and knows only its config
//! file, joins the ECMP set and then takes all traffic. Flows whose Maglev
//! slot changed owner reach the new owner with the old one as a second
//! hop; the new owner's decap has no socket for them and sends them on.
//! Needs root.

use std::time::{Duration, Instant};

use lb_tests::{
    have_root,
    lbd::wait_for,
    testbed::{Spec, Testbed, spread},
};
use lb_userspace::api::Request;

const CONNECTIONS: usize = 300;
const BE4: &str = "[[vip.backend]]\naddress = \"10.30.4.2\"\nweight = 1\n";

fn testbed(tag: &str) -> Testbed {
    let tb = Testbed::new(
        tag,
        Spec {
            lbs: 4,
            weights: vec![1, 1, 1, 1],
            ..Spec::default()
        },
    );
    // The fourth instance is the fresh one: out of the ECMP set until it joins.
    tb.set_ecmp(&[0, 1, 2]);
    tb
}

/// Edits every instance's config with `f` and reloads the first three (the
/// fourth is restarted fresh by the test).
fn change_everywhere(tb: &Testbed, f: impl Fn(&str) -> String) {
    for i in 0..4 {
        tb.edit_config(i, &f);
    }
    for i in 0..3 {
        let r = tb.lbctl(i, Request::Reload);
        assert!(r.ok, "lb{i} reload: {:?}", r.error);
    }
}

/// The fresh instance joins, then takes all traffic: every connection
/// must answer after each step; returns what the fresh instance counted.
fn fresh_instance_joins_then_takes_all(tb: &mut Testbed, held: &lb_tests::testbed::LongLived) {
    tb.restart_fresh(3);
    wait_for("the fresh instance sees every backend up", || {
        tb.backend_healthy(3, "10.30.1.2") == Some(true)
    });
    let before = tb.lbctl(3, Request::Stats).data["reasons"]["second_chance"]["packets"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(before, 0, "a fresh instance");
    tb.set_ecmp(&[0, 1, 2, 3]);
    let joined = held.alive();
    tb.set_ecmp(&[3]);
    let switched = held.alive();
    let nested = tb.lbctl(3, Request::Stats).data["reasons"]["second_chance"]["packets"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "fresh instance joins: {joined}/{CONNECTIONS} alive; takes all: {switched}/{CONNECTIONS}; \
         packets it sent with a second hop: {nested}"
    );
    assert_eq!(joined, CONNECTIONS, "every connection survives the join");
    assert_eq!(
        switched, CONNECTIONS,
        "every connection survives the switch"
    );
    assert!(nested > 0, "moved flows took the second hop");
    // And the backends sent them on.
    let forwarded: u64 = (0..4)
        .map(|j| tb.decap_counters(j)["second_hop_forwarded"])
        .sum();
    eprintln!("backends sent {forwarded} packets on to their second hop");
    assert!(forwarded > 0);
    // New connections take the current table alone.
    let fresh = tb.in_client(|| spread(100));
    assert_eq!(fresh.values().sum::<usize>(), 100, "{fresh:?}");
}

#[test]
fn connections_survive_a_backend_addition_then_a_fresh_instance() {
    if !have_root() {
        return;
    }
    let mut tb = testbed("sca");
    // Three backends to start with.
    change_everywhere(&tb, |c| c.replace(BE4, ""));
    let held = tb.hold_connections(CONNECTIONS);
    assert!(
        !held.check().contains_key("be4"),
        "be4 is not in the tables yet"
    );
    // be4 joins every instance's VIP, marked as being added.
    change_everywhere(&tb, |c| {
        c.replace(
            "[[vip.backend]]\naddress = \"10.30.3.2\"\nweight = 1\n",
            "[[vip.backend]]\naddress = \"10.30.3.2\"\nweight = 1\n\
             [[vip.backend]]\naddress = \"10.30.4.2\"\nweight = 1\nstate = \"adding\"\n",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..3 {
        while tb.backend_healthy(i, "10.30.4.2") != Some(true) {
            assert!(Instant::now() < deadline, "lb{i}: be4 never up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(held.alive(), CONNECTIONS, "tracked flows stay put");
    fresh_instance_joins_then_takes_all(&mut tb, &held);
    // Some new connections reach be4: it is in the current table.
    let fresh = tb.in_client(|| spread(200));
    assert!(fresh.get("be4").copied().unwrap_or(0) > 0, "{fresh:?}");
}

#[test]
fn connections_survive_a_backend_removal_then_a_fresh_instance() {
    if !have_root() {
        return;
    }
    let mut tb = testbed("scr");
    let held = tb.hold_connections(CONNECTIONS);
    let on_be4 = held.check().get("be4").map_or(0, |v| v.1);
    assert!(
        on_be4 > 30,
        "be4 holds a share of the connections: {on_be4}"
    );
    // be4 is being removed: no new flows, out of the current table, in the
    // previous one.
    change_everywhere(&tb, |c| {
        c.replace(BE4, &format!("{BE4}state = \"removing\"\n"))
    });
    assert_eq!(held.alive(), CONNECTIONS, "tracked flows stay put");
    let fresh = tb.in_client(|| spread(100));
    assert!(!fresh.contains_key("be4"), "no new flows on be4: {fresh:?}");
    fresh_instance_joins_then_takes_all(&mut tb, &held);
}
