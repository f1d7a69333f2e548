//! `cargo xtask demo`: the testbed with 1 client, 1 ECMP router, 2 LB
//! instances running lbd and 3 DSR backends, real TCP traffic, a live view
//! of which backend serves how many connections, then an LB instance
//! leaving and rejoining the ECMP set, a backend failing, and an lbd
//! restart, with long-lived connections checked after each. Everything is
//! torn down at the end; the exit status says whether every promise held.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use lb_tests::testbed::{Spec, Testbed, services, spread, spread_to};
use lb_userspace::api::Request;

const LONG_LIVED: usize = 60;

fn bar(counts: &BTreeMap<String, usize>, title: &str) {
    println!("\n  {title}");
    let total: usize = counts.values().sum::<usize>().max(1);
    for (backend, n) in counts {
        println!("    {backend:<5} {n:>4}  {}", "#".repeat(n * 40 / total));
    }
}

fn main() {
    let started = Instant::now();
    println!(
        "== building: client -- router (ECMP, L4 hash) -- 2 LB instances (lbd, XDP) -- 3 backends (decap, DSR)"
    );
    let mut tb = Testbed::new(
        "lbdemo",
        Spec {
            health_interval_ms: 200,
            health_fall: 2,
            ..Spec::default()
        },
    );
    println!(
        "== up in {:.1} s; VIP 10.0.0.10:80 routed over both LB instances",
        started.elapsed().as_secs_f64()
    );

    let short = tb.in_client(|| spread(300));
    bar(&short, "300 short connections, by backend:");
    let mut ok = short.values().sum::<usize>() == 300;

    println!("\n== IPv4 and IPv6, IP-in-IP and GUE: 30 connections to each service");
    for addr in services() {
        let counts = tb.in_client(move || spread_to(addr, 30));
        let encap = match (addr.port(), addr.is_ipv6()) {
            (80, false) => "IPv4 backends, IPIP",
            (80, true) => "IPv6 backends, IP6IP6",
            (8080, false) => "IPv6 backends, 4in6",
            (8080, true) => "IPv4 backends, 6in4",
            (_, false) => "IPv4 backends, GUE",
            (_, true) => "IPv6 backends, GUE",
        };
        println!("   {addr:<18} {encap:<22} {counts:?}");
        ok &= counts.values().sum::<usize>() == 30;
    }

    // Long-lived connections held on one client thread; `check` pings them all.
    let held = tb.hold_connections(LONG_LIVED);
    let check = || held.check();
    let alive = |m: &BTreeMap<String, (usize, usize)>| m.values().map(|v| v.0).sum::<usize>();
    let steady = check();
    bar(
        &steady.iter().map(|(k, v)| (k.clone(), v.1)).collect(),
        &format!("{LONG_LIVED} long-lived connections, by backend:"),
    );
    ok &= alive(&steady) == LONG_LIVED;

    println!("\n== LB instance lb1 leaves the router's ECMP set");
    tb.set_ecmp(&[1]);
    let n = alive(&check());
    println!("   {n}/{LONG_LIVED} long-lived connections still answer, each from its own backend");
    ok &= n == LONG_LIVED;
    println!("== lb1 rejoins the ECMP set");
    tb.set_ecmp(&[0, 1]);
    let n = alive(&check());
    println!("   {n}/{LONG_LIVED} long-lived connections still answer, each from its own backend");
    ok &= n == LONG_LIVED;

    println!(
        "== lbd on lb2 is killed (SIGKILL) and started again; the pinned data plane keeps forwarding"
    );
    tb.lbds[1].stop(libc::SIGKILL);
    let n = alive(&check());
    println!("   while lbd is down: {n}/{LONG_LIVED} answer");
    ok &= n == LONG_LIVED;
    tb.lbds[1].restart();
    let n = alive(&check());
    println!("   after the restart: {n}/{LONG_LIVED} answer");
    ok &= n == LONG_LIVED;

    println!(
        "== be3 is being removed (state = \"removing\" on both instances), then lb1 restarts \
         from nothing (its pinned tables and connections deleted) and takes all traffic"
    );
    const BE3: &str = "[[vip.backend]]\naddress = \"10.30.3.2\"\nweight = 1\n";
    let set_be3 = |tb: &Testbed, extra: &str| {
        for i in 0..tb.lbds.len() {
            tb.edit_config(i, |c| {
                c.replace(&format!("{BE3}state = \"removing\"\n"), BE3)
                    .replace(BE3, &format!("{BE3}{extra}"))
            });
            tb.lbctl(i, Request::Reload);
        }
    };
    set_be3(&tb, "state = \"removing\"\n");
    tb.restart_fresh(0);
    tb.set_ecmp(&[0]);
    let n = alive(&check());
    let nested = tb.lbctl(0, Request::Stats).data["reasons"]["second_chance"]["packets"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "   {n}/{LONG_LIVED} long-lived connections still answer; the fresh lb1 sent {nested} \
         packets with a second hop, which the backends passed on to where the connection is"
    );
    ok &= n == LONG_LIVED;
    set_be3(&tb, "");
    tb.set_ecmp(&[0, 1]);
    let n = alive(&check());
    println!("   be3 active again, both instances: {n}/{LONG_LIVED} answer");
    ok &= n == LONG_LIVED;

    println!("== backend be3 fails (its server stops); health checks: TCP every 200 ms, fall 2");
    let on_be3 = steady.get("be3").map(|v| v.1).unwrap_or(0);
    let failed_at = Instant::now();
    tb.stop_backend(2);
    while !(0..tb.lbds.len())
        .all(|i| tb.lbctl(i, Request::Status).data["vips"][0]["backends"][2]["healthy"] == false)
    {
        if failed_at.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "   be3 out of both instances' tables after {} ms",
        failed_at.elapsed().as_millis()
    );
    let after = check();
    let others: usize = after
        .iter()
        .filter(|(k, _)| k.as_str() != "be3")
        .map(|(_, v)| v.0)
        .sum();
    println!(
        "   {others}/{} connections on the other backends still answer ({on_be3} were on be3)",
        LONG_LIVED - on_be3
    );
    ok &= others == LONG_LIVED - on_be3;
    let fresh = tb.in_client(|| spread(100));
    bar(&fresh, "100 new connections after the failure:");
    ok &= fresh.values().sum::<usize>() == 100 && !fresh.contains_key("be3");

    println!("\n== what an operator sees: lbctl status on lb1");
    let status = std::process::Command::new(lb_tests::lbd::lbctl_binary())
        .arg("--socket")
        .arg(&tb.lbds[0].socket)
        .arg("status")
        .output();
    match status {
        Ok(out) => {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                println!("   {line}");
            }
        }
        Err(e) => println!("   (lbctl: {e})"),
    }

    drop(held);
    drop(tb);
    println!(
        "\n== torn down; {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    if ok {
        println!(
            "demo passed: every connection survived the ECMP changes, the lbd restart, a backend removal \
             seen by a fresh instance, and the backend failure"
        );
        println!(
            "\nNext: run it on your own hosts with docs/operations.md (a commented config is\n\
             examples/lbd.toml, a hardened systemd unit examples/lbd.service); watch it with\n\
             `lbctl status`, `lbctl rates`, `lbctl flows`, `lbctl capture -w f.pcap` and the\n\
             Grafana dashboard in examples/; run every test with `cargo xtask test`."
        );
    } else {
        println!("demo FAILED: see above");
        std::process::exit(1);
    }
}
