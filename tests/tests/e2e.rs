//! End-to-end scenarios on the namespace testbed: real TCP and UDP through
//! an ECMP router, several lbd instances and DSR backends. Needs root.

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    time::{Duration, Instant},
};

use lb_tests::{
    have_root,
    testbed::{Conn, Spec, Testbed, VIP, spread, udp_ask},
};
use lb_userspace::api::Request;

const TCP_VIP: &str = "10.0.0.10:80/tcp";

/// |share - expected| within 4 standard deviations of a binomial count.
fn assert_share(counts: &BTreeMap<String, usize>, backend: &str, expected: f64, total: usize) {
    let got = *counts.get(backend).unwrap_or(&0) as f64 / total as f64;
    let tolerance = 4.0 * (expected * (1.0 - expected) / total as f64).sqrt();
    assert!(
        (got - expected).abs() <= tolerance,
        "{backend}: {got:.3} of connections, expected {expected:.3} +/- {tolerance:.3} ({counts:?})"
    );
}

#[test]
fn spread_follows_weights() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new(
        "e2s",
        Spec {
            weights: vec![1, 2, 3],
            ..Spec::default()
        },
    );
    let n = 2000;
    let counts = tb.in_client(move || spread(n));
    eprintln!("{n} connections: {counts:?}");
    assert_eq!(
        counts.values().sum::<usize>(),
        n,
        "every connection answered"
    );
    for (backend, weight) in [("be1", 1.0), ("be2", 2.0), ("be3", 3.0)] {
        assert_share(&counts, backend, weight / 6.0, n);
    }
}

#[test]
fn connections_survive_an_lb_instance_leaving_and_joining_ecmp() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new("e2e", Spec::default());
    let held = tb.hold_connections(60);
    assert_eq!(held.alive(), 60);
    assert_eq!(tb.ecmp_leave_join_switch(&held), [60, 60, 60]);
}

#[test]
fn backend_failure_is_detected_and_only_its_connections_break() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new(
        "e2f",
        Spec {
            health_interval_ms: 100,
            health_fall: 2,
            ..Spec::default()
        },
    );
    let held = tb.hold_connections(60);
    assert!(held.check().values().all(|(ok, n)| ok == n));
    let failed_at = Instant::now();
    tb.stop_backend(2);
    // Health checks (100 ms x fall 2) take be3 out of every instance's table.
    let out = loop {
        let down = (0..tb.lbds.len()).all(|i| {
            let s = tb.lbctl(i, Request::Status);
            s.data["vips"][0]["backends"][2]["healthy"] == false
        });
        if down {
            break failed_at.elapsed();
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(5),
            "be3 not taken out within 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("be3 out of both instances' tables {out:?} after its server stopped");
    assert!(out < Duration::from_millis(200 + 1000));
    // The IPv6 VIP checks the same servers with half-open probes (`syn`).
    let v6 = |i: usize| {
        let s = tb.lbctl(i, Request::Status).data;
        let vip = s["vips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vip"] == "[fd00::10]:80/tcp")
            .unwrap()
            .clone();
        assert_eq!(vip["health_check"], "syn");
        vip["backends"][2]["healthy"].clone()
    };
    for i in 0..tb.lbds.len() {
        lb_tests::lbd::wait_for("be3 down for the IPv6 VIP too (half-open probes)", || {
            v6(i) == false
        });
    }
    for (backend, (ok, n)) in &held.check() {
        if backend != "be3" {
            assert_eq!(ok, n, "{backend}: a connection to a healthy backend broke");
        }
    }
    let fresh = tb.in_client(|| spread(100));
    assert_eq!(
        fresh.values().sum::<usize>(),
        100,
        "every new connection answered"
    );
    assert!(
        !fresh.contains_key("be3"),
        "new connections avoid the failed backend: {fresh:?}"
    );
}

#[test]
fn draining_keeps_existing_connections_and_sends_new_ones_elsewhere() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new("e2d", Spec::default());
    let held = tb.hold_connections(60);
    for i in 0..tb.lbds.len() {
        let r = tb.lbctl(
            i,
            Request::Drain {
                vip: TCP_VIP.into(),
                address: "10.30.1.2".into(),
            },
        );
        assert!(r.ok, "{r:?}");
    }
    let (ok, n) = held.check().get("be1").copied().unwrap_or_default();
    assert!(n > 0, "some connections were on be1");
    assert_eq!(ok, n, "connections on the drained backend keep working");
    // Counted off the daemon's loop, on request: wait for a fresh count.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tracked = loop {
        let tracked: u64 = (0..tb.lbds.len())
            .map(|i| {
                tb.lbctl(i, Request::Status).data["vips"][0]["backends"][0]["tracked_flows"]
                    .as_u64()
                    .unwrap()
            })
            .sum();
        if tracked > 0 || Instant::now() > deadline {
            break tracked;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        tracked > 0,
        "lbctl status shows the flows left on the drained backend"
    );
    let fresh = tb.in_client(|| spread(200));
    assert_eq!(fresh.values().sum::<usize>(), 200);
    assert!(
        !fresh.contains_key("be1"),
        "no new connection on the drained backend: {fresh:?}"
    );
}

#[test]
fn lbd_restart_and_sigkill_under_traffic_break_no_connection() {
    if !have_root() {
        return;
    }
    let mut tb = Testbed::new("e2r", Spec::default());
    let guard = tb.client.enter();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    // Traffic the whole time: every connection pings in a loop.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let mut conns: Vec<Conn> = (0..40).map(|_| Conn::open().expect("connection")).collect();
        let _ = ready_tx.send(());
        let mut rounds = 0;
        let mut broken = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            broken += conns
                .iter_mut()
                .map(|c| c.alive())
                .filter(|&ok| !ok)
                .count();
            rounds += 1;
        }
        (rounds, broken)
    });
    drop(guard);
    ready_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    for lb in 0..tb.lbds.len() {
        tb.lbds[lb].stop(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        tb.lbds[lb].restart();
        tb.lbds[lb].stop(libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(300));
        tb.lbds[lb].restart();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rounds, broken) = holder.join().unwrap();
    eprintln!("{rounds} rounds of 40 pings during restarts, {broken} failures");
    assert!(rounds > 10);
    assert_eq!(broken, 0, "no established connection broke");
}

#[test]
fn udp_flows_stay_on_one_backend() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new("e2u", Spec::default());
    let (stable, seen) = tb.in_client(|| {
        let mut stable = 0;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let s = UdpSocket::bind("10.10.0.2:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let answers: Vec<Option<String>> = (0..10).map(|_| udp_ask(&s)).collect();
            if answers[0].is_some() && answers.iter().all(|a| *a == answers[0]) {
                stable += 1;
                seen.insert(answers[0].clone().unwrap());
            }
        }
        (stable, seen)
    });
    assert_eq!(
        stable, 50,
        "every UDP flow answered by one backend throughout"
    );
    assert_eq!(seen.len(), 3, "flows spread over every backend: {seen:?}");
}

#[test]
fn adding_a_backend_moves_about_one_in_n_of_new_flows() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new(
        "e2a",
        Spec {
            weights: vec![1, 1, 1, 1],
            ..Spec::default()
        },
    );
    let trace_all = |tb: &Testbed| -> Vec<String> {
        (0..2000)
            .map(|i| {
                let r = tb.lbctl(
                    0,
                    Request::Trace {
                        src: format!("10.10.{}.{}:{}", i / 250, i % 250, 10_000 + i),
                        dst: format!("{VIP}:80"),
                        protocol: "tcp".into(),
                        quic_cid: None,
                    },
                );
                r.data["table_backend"].as_str().unwrap_or("").to_string()
            })
            .collect()
    };
    // Start with 3 of the 4 backends: remove the fourth everywhere, then add it back.
    for i in 0..tb.lbds.len() {
        assert!(
            tb.lbctl(
                i,
                Request::RemoveBackend {
                    vip: TCP_VIP.into(),
                    address: "10.30.4.2".into()
                }
            )
            .ok
        );
    }
    let before = trace_all(&tb);
    for i in 0..tb.lbds.len() {
        assert!(
            tb.lbctl(
                i,
                Request::AddBackend {
                    vip: TCP_VIP.into(),
                    address: "10.30.4.2".into(),
                    weight: 1,
                    state: None,
                    server_id: None,
                }
            )
            .ok
        );
    }
    // A backend added at runtime gets slots once its checks pass (rise 2).
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..tb.lbds.len() {
        while tb.backend_healthy(i, "10.30.4.2") != Some(true) {
            assert!(Instant::now() < deadline, "lb{i}: new backend never up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let after = trace_all(&tb);
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let to_new = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| a != b && b.as_str() == "10.30.4.2")
        .count();
    let share = moved as f64 / 2000.0;
    eprintln!(
        "adding a 4th backend moved {moved}/2000 flows ({:.1}%), {to_new} of them to it",
        share * 100.0
    );
    assert!(
        (0.20..=0.30).contains(&share),
        "about 1/4 of flows move: {share:.3}"
    );
    assert!(
        to_new as f64 >= moved as f64 * 0.95,
        "flows move to the new backend, not between old ones"
    );
    // Real connections agree: the new backend takes about a quarter.
    let fresh = tb.in_client(|| spread(800));
    assert_share(&fresh, "be4", 0.25, 800);
}

#[test]
fn check_backend_reports_what_is_wrong_with_a_backend() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new(
        "e2c",
        Spec {
            lbs: 1,
            weights: vec![1],
            ..Spec::default()
        },
    );
    let be = &tb.backends[0];
    let check = || {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", be.name))
            .arg(lb_tests::lbd::lbctl_binary())
            .args(["check-backend", "--vip", VIP, "--interface", "eth0"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = check();
    assert!(ok, "a working backend passes:\n{text}");
    assert!(text.contains("decap is attached to eth0"), "{text}");
    be.sh("sysctl -qw net.ipv4.conf.eth0.rp_filter=1");
    let (ok, text) = check();
    assert!(!ok && text.contains("FAIL  rp_filter is strict"), "{text}");
    be.sh("sysctl -qw net.ipv4.conf.eth0.rp_filter=0");
    be.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
    let (ok, text) = check();
    assert!(!ok && text.contains("VIP 10.0.0.10 is not on lo"), "{text}");
}

#[test]
fn packets_to_a_vip_address_on_no_service_are_dropped_not_looped() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new("e2l", Spec::default());
    let ports = [81u16, 82, 443, 8081, 9000];
    tb.in_client(move || {
        for port in ports {
            let addr = std::net::SocketAddr::new(VIP.parse().unwrap(), port);
            // Nothing serves it: no answer, a timeout (one SYN each).
            assert!(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err()
            );
        }
    });
    // Each SYN reached an LB once and ended there. Passed (as before), it
    // went back to the router and returned until its TTL ran out.
    let dropped = tb.reason_packets("drop_not_a_service");
    assert_eq!(dropped, ports.len() as u64, "one drop per SYN");
}

#[test]
fn backends_keep_decapsulating_when_lbd_backend_dies() {
    if !have_root() {
        return;
    }
    let mut tb = Testbed::new("e2k", Spec::default());
    let held = tb.hold_connections(30);
    assert_eq!(held.alive(), 30);
    // be1's `lbd backend` is killed: its decap link is pinned, so be1 keeps
    // receiving what the balancer sends it.
    tb.kill_decap(0);
    std::thread::sleep(Duration::from_millis(300));
    let alive = held.alive();
    let fresh = tb.in_client(|| spread(90));
    eprintln!("after the kill: {alive}/30 long-lived alive; new connections {fresh:?}");
    assert_eq!(alive, 30, "every connection survives");
    assert_eq!(
        fresh.values().sum::<usize>(),
        90,
        "every new connection answered"
    );
    assert!(
        fresh.get("be1").copied().unwrap_or(0) > 0,
        "be1 still serves"
    );
    assert!(
        tb.backends[0].sh("ip link show eth0").contains("xdp"),
        "decap still attached"
    );
}

/// The tunnel-path health check: be1's decap is removed while its server
/// keeps answering on its own address (the service probe alone sees
/// nothing wrong). Only the probe that travels encapsulated, as client
/// packets do, fails: be1 goes out of every instance's table within
/// interval x fall, and every connection of the other backends survives.
#[test]
fn a_backend_without_decap_is_taken_out_by_the_tunnel_probe() {
    if !have_root() {
        return;
    }
    let mut tb = Testbed::new("e2t", Spec::default());
    let held = tb.hold_connections(90);
    let before = held.check();
    let others: usize = before
        .iter()
        .filter(|(b, _)| b.as_str() != "be1")
        .map(|(_, v)| v.1)
        .sum();
    assert!(before.get("be1").is_some_and(|v| v.1 > 0), "{before:?}");
    tb.teardown_decap(0);
    let removed = Instant::now();
    let down_everywhere = |tb: &Testbed| {
        (0..tb.lbds.len()).all(|i| tb.backend_healthy(i, "10.30.1.2") == Some(false))
    };
    while !down_everywhere(&tb) {
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "be1 never taken out"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = removed.elapsed();
    let bound = Duration::from_millis(tb.spec.health_interval_ms * tb.spec.health_fall as u64);
    eprintln!(
        "be1 out of every table {} ms after its decap went (interval x fall = {} ms)",
        took.as_millis(),
        bound.as_millis()
    );
    // Probes run every interval: the fall-th failure comes at most one
    // interval plus a timeout after the removal; a little more for the
    // status poll and a loaded machine.
    assert!(took < bound * 2 + Duration::from_millis(500), "{took:?}");
    let after = held.check();
    let alive_others: usize = after
        .iter()
        .filter(|(b, _)| b.as_str() != "be1")
        .map(|(_, v)| v.0)
        .sum();
    assert_eq!(
        alive_others, others,
        "every other backend's connection: {after:?}"
    );
    let fresh = tb.in_client(|| spread(90));
    assert_eq!(fresh.values().sum::<usize>(), 90, "{fresh:?}");
    assert!(!fresh.contains_key("be1"), "{fresh:?}");
}

/// `lbctl capture` writes what the data path saw and what it sent: tcpdump
/// reads the file and shows each client packet twice, the second time
/// inside the outer header toward the backend that answered.
#[test]
fn a_capture_shows_each_packet_as_it_arrived_and_as_it_left() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new(
        "e2p",
        Spec {
            lbs: 1,
            ..Spec::default()
        },
    );
    let file = std::env::temp_dir().join(format!("e2p-{}.pcap", std::process::id()));
    let socket = tb.lbds[0].socket.clone();
    let out_file = file.clone();
    let capture = std::thread::spawn(move || {
        std::process::Command::new(lb_tests::lbd::lbctl_binary())
            .arg("--socket")
            .arg(&socket)
            .args([
                "capture",
                "--vip",
                "10.0.0.10:80/tcp",
                "-c",
                "8",
                "--seconds",
                "20",
                "-w",
            ])
            .arg(&out_file)
            .output()
            .unwrap()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tb.lbctl(0, Request::Status).data["capturing"] != true {
        assert!(
            std::time::Instant::now() < deadline,
            "capture never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let backend = tb.in_client(|| {
        let mut c = Conn::open().expect("a connection through the LB");
        c.ask("second");
        c.backend.clone()
    });
    let out = capture.join().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "N packets written to F (A as they arrived, B as they left)": at
    // least 8, and every packet twice.
    let numbers: Vec<u64> = said
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (total, inbound, outbound) = (
        numbers[0],
        numbers[numbers.len() - 3],
        numbers[numbers.len() - 2],
    );
    assert!(
        total >= 8 && inbound == outbound && inbound + outbound == total,
        "{said}"
    );
    assert_eq!(
        tb.lbctl(0, Request::Status).data["capturing"],
        false,
        "stopped when done"
    );
    // The backend's address, from its name in lbctl status order.
    let status = tb.lbctl(0, Request::Status).data;
    let addresses: Vec<String> = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    let read = std::process::Command::new("tcpdump")
        .args(["-nn", "-S", "-r"])
        .arg(&file)
        .output()
        .expect("tcpdump (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&read.stdout).to_string();
    let _ = std::fs::remove_file(&file);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(text.lines().count() as u64, total, "{text}");
    // The LB hosts' own resets toward the VIP (their kernels answer the
    // tunnel probes' SYN-ACKs, docs/operations.md) are VIP traffic the
    // capture rightly holds, but not the client's flow.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.rsplit(" IP ")
                .next()
                .is_some_and(|inner| inner.starts_with("10.20."))
        })
        .collect();
    // Each client packet as it arrived, and the same packet inside IPIP to
    // a backend, after it (records of two CPUs may interleave).
    let mut arrived: Vec<&str> = Vec::new();
    for line in &lines {
        let parts: Vec<&str> = line.split(" IP ").collect();
        match parts.len() {
            2 => {
                let inner = parts[1];
                assert!(inner.starts_with("10.10.0.2."), "from the client: {line}");
                assert!(
                    inner.contains("> 10.0.0.10.80: Flags"),
                    "to the VIP: {line}"
                );
                arrived.push(inner);
            }
            3 => {
                assert!(
                    parts[1].starts_with("172.16."),
                    "outer source in encap_source_prefix: {line}"
                );
                let to = parts[1].split(" > ").nth(1).unwrap().trim_end_matches(':');
                assert!(
                    addresses.iter().any(|a| a == to),
                    "outer destination {to} is a backend ({addresses:?})"
                );
                let at = arrived.iter().position(|a| *a == parts[2]);
                assert!(at.is_some(), "sent only after it arrived: {line}\n{text}");
                arrived.remove(at.unwrap());
            }
            _ => panic!("neither a client packet nor an encapsulated one: {line}"),
        }
    }
    assert!(arrived.is_empty(), "every packet left: {arrived:?}");
    assert!(lines[0].contains("Flags [S]"), "the SYN first: {text}");
    eprintln!("captured a flow to {backend}:\n{text}");
}
