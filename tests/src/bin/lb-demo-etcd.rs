//! `cargo xtask demo --etcd`: three LB instances following one etcd. The
//! testbed of `cargo xtask demo` with an etcd-server in a namespace of its
//! own; `VIP:80/tcp` lives in etcd, each instance's file keeps only what
//! is per host. One `lbctl` change reaches every instance's kernel with
//! identical table digests; etcd stops and the fleet keeps serving its
//! last revision; etcd returns and the fleet follows it again.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    lbd::{lbctl_binary, wait_for},
    testbed::{Spec, Testbed},
};
use lb_userspace::api::Request;
use serde_json::Value;

const VIP80: &str = "10.0.0.10:80/tcp";
const LONG_LIVED: usize = 90;

fn status(tb: &Testbed, i: usize) -> Value {
    tb.lbctl(i, Request::Status).data
}

/// One line per instance: revision, connection to etcd, VIP80's digest.
fn show_fleet(tb: &Testbed) -> Vec<String> {
    (0..tb.lbds.len())
        .map(|i| {
            let s = status(tb, i);
            let f = &s["fleet"];
            let digest = s["vips"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["vip"] == VIP80))
                .map(|v| v["table_digest"].as_str().unwrap_or("").to_string())
                .unwrap_or_default();
            println!(
                "   lb{}: revision {:<3} etcd {:<13} {VIP80} table digest {digest}",
                i + 1,
                f["revision"],
                if f["connected"] == true {
                    "connected"
                } else {
                    "UNREACHABLE"
                },
            );
            digest
        })
        .collect()
}

fn same(digests: &[String]) -> bool {
    digests.iter().all(|d| *d == digests[0])
}

/// Runs `lbctl` on instance `i` as an operator would, printing both.
fn lbctl(tb: &Testbed, i: usize, args: &[&str]) -> bool {
    println!("   $ lbctl {}   (on lb{})", args.join(" "), i + 1);
    let out = Command::new(lbctl_binary())
        .arg("--socket")
        .arg(&tb.lbds[i].socket)
        .args(args)
        .output()
        .expect("lbctl");
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("     {line}");
    }
    out.status.success()
}

/// An `lbctl` change on instance `i`, then every instance at its revision.
fn change(tb: &Testbed, i: usize, args: &[&str]) -> bool {
    let before = status(tb, 0)["fleet"]["revision"].as_i64().unwrap_or(0);
    let ok = lbctl(tb, i, args);
    for j in 0..tb.lbds.len() {
        wait_for("every instance at the new revision", || {
            status(tb, j)["fleet"]["revision"].as_i64() > Some(before)
        });
    }
    ok
}

fn main() {
    let started = Instant::now();
    println!(
        "== building: client -- router (ECMP) -- 3 LB instances (lbd, XDP) -- 4 backends, and etcd"
    );
    let mut tb = Testbed::new(
        "lbdemoetcd",
        Spec {
            lbs: 3,
            weights: vec![1, 1, 1, 0],
            etcd: true,
            fleet_health: "fleet",
            ..Spec::default()
        },
    );
    println!(
        "== up in {:.1} s; {VIP80} is in etcd (/lbd/vips/{VIP80}), every instance follows it",
        started.elapsed().as_secs_f64()
    );
    let mut ok = same(&show_fleet(&tb));
    let held = tb.hold_connections(LONG_LIVED);
    println!("   {LONG_LIVED} long-lived connections open");

    println!("\n== one change, made once: be4 gets weight 1");
    ok &= change(&tb, 0, &["backend", "weight", VIP80, "10.30.4.2", "1"]);
    let digests = show_fleet(&tb);
    ok &= same(&digests);
    for active in [&[0][..], &[1], &[2], &[0, 1, 2]] {
        tb.set_ecmp(active);
    }
    let n = held.alive();
    println!("   the router moved every flow through each instance: {n}/{LONG_LIVED} answer");
    ok &= n == LONG_LIVED;

    println!("\n== etcd stops for 10 s");
    tb.etcd.as_mut().unwrap().1.stop();
    for i in 0..3 {
        wait_for("instances to notice", || {
            status(&tb, i)["fleet"]["connected"] == false
        });
    }
    ok &= show_fleet(&tb) == digests;
    ok &= !lbctl(&tb, 1, &["backend", "drain", VIP80, "10.30.1.2"]);
    println!("   (refused: edits need etcd; the last revision keeps serving)");
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(10) {
        tb.set_ecmp(&[(down.elapsed().as_secs() % 3) as usize]);
        std::thread::sleep(Duration::from_millis(500));
    }
    tb.set_ecmp(&[0, 1, 2]);
    let n = held.alive();
    println!("   flows moved between instances while etcd was down: {n}/{LONG_LIVED} answer");
    ok &= n == LONG_LIVED;

    println!("\n== etcd is back");
    tb.etcd.as_mut().unwrap().1.start_again();
    for i in 0..3 {
        wait_for("instances to reconnect", || {
            status(&tb, i)["fleet"]["connected"] == true
        });
    }
    ok &= change(&tb, 2, &["backend", "weight", VIP80, "10.30.1.2", "2"]);
    ok &= same(&show_fleet(&tb));
    let n = held.alive();
    println!("   {n}/{LONG_LIVED} answer");
    ok &= n == LONG_LIVED;

    drop(held);
    drop(tb);
    println!(
        "\n== torn down; {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    if ok {
        println!(
            "demo passed: one change reached every instance with identical tables, and etcd's \
             outage cost no connection (docs/operations.md: \"Fleet configuration with etcd\")"
        );
    } else {
        println!("demo FAILED: see above");
        std::process::exit(1);
    }
}
