//! Local faults and bad input against the real daemon (issue 17): a second
//! daemon, teardown under a running one, a failed start, descriptor
//! exhaustion, a slowloris on the metrics endpoint, config files that
//! cannot be right, backends added at runtime, a closed output pipe.
//! Each of these failed before the fix. Needs root.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_common::{PROTO_TCP, maps::VipKey};
use lb_tests::{
    have_root,
    lbd::{Bed, HealthTarget, backends_toml, lbctl_binary, lbd_once, wait_for},
};
use lb_userspace::api::Request;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

fn key() -> VipKey {
    VipKey::new(IpAddr::V4(VIP), 80, PROTO_TCP)
}

/// A VIP on port 80 with the bed's three backends, TCP-checked on 8080
/// every `interval_ms` (fall 2, rise 2).
fn checked_vip(interval_ms: u64) -> String {
    format!(
        "[[vip]]\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 4099\n\
         [vip.health]\nkind = \"tcp\"\ntunnel = false\nport = 8080\ninterval_ms = {interval_ms}\ntimeout_ms = {}\nrise = 2\nfall = 2\n{}",
        interval_ms / 2,
        backends_toml()
    )
}

fn health_targets(b: &Bed) -> Vec<HealthTarget> {
    ["10.50.0.1:8080", "10.50.0.2:8080", "10.50.0.3:8080"]
        .iter()
        .map(|a| HealthTarget::start(&b.backend, a))
        .collect()
}

fn all_healthy(lbd: &lb_tests::lbd::Lbd) -> bool {
    lbd.call(Request::Status).data["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["healthy"] == true)
}

#[test]
fn a_second_daemon_and_a_teardown_under_a_running_one_are_refused() {
    if !have_root() {
        return;
    }
    let b = Bed::new("two");
    let cfg = b.config(65536, &checked_vip(100));
    let _targets = health_targets(&b);
    let mut lbd = b.start_lbd(&cfg);
    let table = lbd.kernel_table(&key());
    let pid = lbd.pid().unwrap();

    let (status, err) = lbd_once(&b.lb, &["run", "--config", cfg.to_str().unwrap()]);
    assert!(!status.success(), "a second lbd on the same pin path ran");
    assert!(
        err.contains("another lbd") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    // Its socket was not taken over: the first daemon still answers.
    assert!(lbd.call(Request::Status).ok);

    let (status, err) = lbd_once(&b.lb, &["teardown", "--pin-path", b.pin.to_str().unwrap()]);
    assert!(!status.success(), "teardown under a running lbd succeeded");
    assert!(err.contains("another lbd"), "{err}");
    assert!(b.pin.join("VIPS").exists(), "pinned maps still there");
    assert_eq!(lbd.kernel_table(&key()), table);
    assert!(lbd.running());

    // Once the daemon is gone, teardown works; naming the instance by its
    // config file removes exactly its pin path.
    lbd.stop(libc::SIGTERM);
    let (status, err) = lbd_once(&b.lb, &["teardown", "--config", cfg.to_str().unwrap()]);
    assert!(status.success(), "{err}");
    assert!(!b.pin.exists());
}

#[test]
fn a_failed_start_leaves_nothing_pinned() {
    if !have_root() {
        return;
    }
    let b = Bed::new("fail");
    // An interface that exists at the preflight but takes no XDP program
    // in driver mode here: `lo` in native mode fails to attach.
    let cfg = b.config(65536, &checked_vip(100));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("interfaces = [\"l0\"]", "interfaces = [\"l0\", \"lo\"]")
        .replace("xdp_mode = \"skb\"", "xdp_mode = \"driver\"");
    std::fs::write(&cfg, text).unwrap();
    let (status, err) = lbd_once(&b.lb, &["run", "--config", cfg.to_str().unwrap()]);
    assert!(!status.success(), "lbd started on lo in driver mode?");
    assert!(err.contains("lo"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&b.pin)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pinned objects left behind: {left:?}");
    assert!(
        !b.lb.sh("ip link show l0").contains("xdp"),
        "program left attached to l0"
    );
}

#[test]
fn descriptor_exhaustion_takes_no_backend_down_and_the_socket_recovers() {
    if !have_root() {
        return;
    }
    let b = Bed::new("fd");
    let cfg = b.config(65536, &checked_vip(100));
    let _targets = health_targets(&b);
    let lbd = b.start_lbd_limited(&cfg, 128);
    let table = lbd.kernel_table(&key());
    // Far more idle control connections than descriptors.
    let mut idle = Vec::new();
    for _ in 0..400 {
        match UnixStream::connect(&lbd.socket) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect failed: {e}"),
        }
    }
    // Ten health intervals (fall 2) while they are held.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        lbd.kernel_table(&key()),
        table,
        "the table changed while lbd had no descriptors to spare"
    );
    drop(idle);
    // The accept loop is alive: a normal request is answered.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match lb_userspace::api::call(&lbd.socket, &Request::Status) {
            Ok(r) if r.ok => break,
            other => assert!(
                Instant::now() < deadline,
                "control socket dead after the flood: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(all_healthy(&lbd), "a local error marked a backend down");
    assert_eq!(lbd.kernel_table(&key()), table);
}

#[test]
fn control_requests_are_size_capped() {
    if !have_root() {
        return;
    }
    let b = Bed::new("big");
    let cfg = b.config(65536, &checked_vip(100));
    let _targets = health_targets(&b);
    let lbd = b.start_lbd(&cfg);
    let mut s = UnixStream::connect(&lbd.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // 4 MB without a newline: refused after 1 MiB, not buffered whole.
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    for _ in 0..64 {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.contains("longer than"),
        "after {sent} bytes: {answer:?}"
    );
    assert!(lbd.call(Request::Status).ok);
}

#[test]
fn the_metrics_endpoint_survives_a_slowloris() {
    if !have_root() {
        return;
    }
    let b = Bed::new("slow");
    // Bed configs serve metrics on the LB namespace's loopback.
    let cfg = b.config(65536, &checked_vip(100));
    let _targets = health_targets(&b);
    let lbd = b.start_lbd_limited(&cfg, 128);
    let table = lbd.kernel_table(&key());
    let scrape = || -> Option<String> {
        let _g = b.lb.enter();
        let mut s = std::net::TcpStream::connect(lb_tests::lbd::METRICS).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.contains("lb_table_generation").then_some(body)
    };
    assert!(scrape().is_some(), "scrape before the attack");
    let slow: Vec<std::net::TcpStream> = {
        let _g = b.lb.enter();
        (0..400)
            .filter_map(|_| {
                let mut s = std::net::TcpStream::connect(lb_tests::lbd::METRICS).ok()?;
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                Some(s)
            })
            .collect()
    };
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        lbd.call(Request::Status).ok,
        "control socket during the attack"
    );
    assert_eq!(lbd.kernel_table(&key()), table, "health unaffected");
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(15);
    while scrape().is_none() {
        assert!(
            Instant::now() < deadline,
            "metrics endpoint dead after the slowloris"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_socket_paths_are_refused_and_reloads_never_block() {
    if !have_root() {
        return;
    }
    let b = Bed::new("cfg");
    let cfg = b.config(65536, &checked_vip(100));
    let good = std::fs::read_to_string(&cfg).unwrap();
    // A control socket over a regular file: refused, the file intact.
    let precious = b.dir.join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let sock = b.socket();
    std::fs::write(
        &cfg,
        good.replace(sock.to_str().unwrap(), precious.to_str().unwrap()),
    )
    .unwrap();
    let (status, err) = lbd_once(&b.lb, &["check-config", cfg.to_str().unwrap()]);
    assert!(!status.success() && err.contains("not a socket"), "{err}");
    let (status, err) = lbd_once(&b.lb, &["run", "--config", cfg.to_str().unwrap()]);
    assert!(!status.success() && err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    // A socket in a missing directory: refused at start.
    let missing = b.dir.join("no/such/dir/lbd.sock");
    std::fs::write(
        &cfg,
        good.replace(sock.to_str().unwrap(), missing.to_str().unwrap()),
    )
    .unwrap();
    let (status, err) = lbd_once(&b.lb, &["run", "--config", cfg.to_str().unwrap()]);
    assert!(!status.success() && err.contains("does not exist"), "{err}");
    assert!(
        !b.pin.join("VIPS").exists(),
        "nothing pinned by a refused start"
    );

    // Running: a reload that changes [lb] says it needs a restart.
    std::fs::write(&cfg, &good).unwrap();
    let _targets = health_targets(&b);
    let lbd = b.start_lbd(&cfg);
    std::fs::write(
        &cfg,
        good.replace("xdp_mode = \"skb\"", "xdp_mode = \"driver\""),
    )
    .unwrap();
    let r = lbd.call(Request::Reload);
    assert!(r.ok, "{r:?}");
    let text = r.data["message"].as_str().unwrap();
    assert!(text.contains("lb.xdp_mode"), "{text}");
    // A FIFO in place of the file: refused at once, the loop not blocked.
    std::fs::remove_file(&cfg).unwrap();
    let c = std::ffi::CString::new(cfg.to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let started = Instant::now();
    let r = lbd.call(Request::Reload);
    assert!(
        !r.ok && r.error.as_deref().unwrap().contains("not a regular file"),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(lbd.call(Request::Status).ok);
    std::fs::remove_file(&cfg).unwrap();
}

#[test]
fn a_backend_added_at_runtime_gets_no_slots_before_its_checks_pass() {
    if !have_root() {
        return;
    }
    let b = Bed::new("new");
    let cfg = b.config(65536, &checked_vip(100));
    let _targets = health_targets(&b);
    let lbd = b.start_lbd(&cfg);
    let vip = "10.0.0.10:80/tcp".to_string();
    // Nothing answers at 10.50.0.9: it must never get a slot.
    b.backend.ip(&["addr", "add", "10.50.0.9/24", "dev", "b0"]);
    let r = lbd.call(Request::AddBackend {
        vip: vip.clone(),
        address: "10.50.0.9".into(),
        weight: 1,
        state: None,
        server_id: None,
    });
    assert!(r.ok, "{r:?}");
    let dead: IpAddr = "10.50.0.9".parse().unwrap();
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        let t = lbd.kernel_table(&key());
        assert!(!t.contains(&Some(dead)), "an unchecked backend got slots");
        assert!(
            !t.is_empty() && t.iter().all(|s| s.is_some()),
            "the running backends lost slots when one was added"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One that answers comes in after `rise` (2) probes.
    let _t4 = HealthTarget::start(&b.backend, "10.50.0.9:8080");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lbd.kernel_table(&key()).contains(&Some(dead)) {
        assert!(Instant::now() < deadline, "checked backend never came in");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lbctl_ends_quietly_when_its_output_pipe_closes() {
    if !have_root() {
        return;
    }
    let b = Bed::new("pipe");
    let cfg = b.config(65536, &checked_vip(100));
    let _targets = health_targets(&b);
    let _lbd = b.start_lbd(&cfg);
    // `lbctl stats | head -c1`, by hand: the reader is gone before lbctl writes.
    let mut child = Command::new(lbctl_binary())
        .args(["--socket", b.socket().to_str().unwrap(), "stats"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "a panic's exit code");
}

/// Sends one datagram from each of `n` source ports to the UDP VIP.
fn send_udp_flows(b: &Bed, n: u16) {
    let _guard = b.client.enter();
    for i in 0..n {
        let s = std::net::UdpSocket::bind(("10.200.0.2", 21_000 + i)).unwrap();
        s.send_to(b"ping", (VIP, 53)).unwrap();
    }
}

fn udp_vip() -> String {
    format!(
        "[[vip]]\naddress = \"{VIP}\"\nport = 53\nprotocol = \"udp\"\ntable_size = 4099\n{}",
        backends_toml()
    )
}

/// `ip link show DEV`'s XDP attachment: "xdpgeneric", "xdp" or "".
fn xdp_shown(b: &Bed, dev: &str) -> &'static str {
    let line = b.lb.sh(&format!("ip link show {dev}"));
    if line.contains("xdpgeneric") {
        "xdpgeneric"
    } else if line.contains("xdp") {
        "xdp"
    } else {
        ""
    }
}

#[test]
fn a_changed_xdp_mode_is_applied_at_restart_and_flows_are_kept() {
    if !have_root() {
        return;
    }
    let b = Bed::new("mode");
    let cfg = b.config(65536, &udp_vip());
    let mut lbd = b.start_lbd(&cfg);
    assert_eq!(xdp_shown(&b, "l0"), "xdpgeneric");
    send_udp_flows(&b, 40);
    wait_for("40 tracked flows", || lbd.kernel_conntrack().len() >= 40);
    let flows = lbd.kernel_conntrack();
    lbd.stop(libc::SIGTERM);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("xdp_mode = \"skb\"", "xdp_mode = \"driver\"");
    std::fs::write(&cfg, text).unwrap();
    lbd.restart();
    assert_eq!(xdp_shown(&b, "l0"), "xdp", "native mode after the restart");
    let now = lbd.kernel_conntrack();
    for (flow, entry) in &flows {
        assert!(
            now.iter()
                .any(|(f, e)| f == flow && e.backend_id == entry.backend_id),
            "tracked flow lost across the mode change"
        );
    }
    // And back, with `auto`: a veth gets generic mode.
    lbd.stop(libc::SIGTERM);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("xdp_mode = \"driver\"", "xdp_mode = \"auto\"");
    std::fs::write(&cfg, text).unwrap();
    lbd.restart();
    assert_eq!(xdp_shown(&b, "l0"), "xdpgeneric", "auto on a veth is skb");
}

#[test]
fn a_deleted_interface_gets_the_program_back_when_it_returns() {
    if !have_root() {
        return;
    }
    let b = Bed::new("del");
    let cfg = b.config(65536, &udp_vip());
    let mut lbd = b.start_lbd(&cfg);
    send_udp_flows(&b, 20);
    wait_for("20 tracked flows", || lbd.kernel_conntrack().len() >= 20);
    let recreate = || {
        b.lb.ip(&["link", "del", "l0"]);
        std::thread::sleep(Duration::from_millis(300));
        b.lb.link("l0", "10.200.0.1/24", &b.client, "c0", "10.200.0.2/24");
        b.client
            .ip(&["route", "add", "default", "via", "10.200.0.1"]);
    };
    // While lbd runs: it sees the link come back and attaches again.
    recreate();
    wait_for("XDP on the new l0", || !xdp_shown(&b, "l0").is_empty());
    assert!(lbd.running());
    let before = lbd.forwarded();
    send_udp_flows(&b, 20);
    wait_for("forwarding on the new l0", || {
        lbd.forwarded() >= before + 20
    });
    assert!(lbd.kernel_conntrack().len() >= 20, "connection table kept");
    // While lbd is stopped: the pinned link is severed; a start recovers.
    lbd.stop(libc::SIGTERM);
    recreate();
    lbd.restart();
    wait_for("XDP on the newer l0", || !xdp_shown(&b, "l0").is_empty());
    let before = lbd.forwarded();
    send_udp_flows(&b, 20);
    wait_for("forwarding after the start", || {
        lbd.forwarded() >= before + 20
    });
    assert!(lbd.kernel_conntrack().len() >= 20, "connection table kept");
}

/// `ip netns exec` gives its command a /sys without the host's bpffs: lbd
/// says so and names what works, instead of suggesting a mount.
#[test]
fn lbd_under_ip_netns_exec_names_the_cause() {
    if !have_root() {
        return;
    }
    let b = Bed::new("nsx");
    let cfg = b.config(65536, &checked_vip(100));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &b.lb.name])
        .arg(lb_tests::lbd::lbd_binary())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ip netns exec")
            && err.contains(&format!("nsenter --net=/var/run/netns/{}", b.lb.name)),
        "{err}"
    );
}
