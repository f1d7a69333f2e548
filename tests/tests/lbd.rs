//! The daemon against the real program: health failures change exactly the
//! failed backend's slots in the kernel's table, and a restart (SIGTERM or
//! SIGKILL) of lbd keeps the data plane forwarding and the connection table
//! intact. Needs root and a mounted bpffs (`cargo xtask test` sets it up).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_common::{PROTO_TCP, PROTO_UDP, maps::VipKey};
use lb_tests::{
    have_root,
    lbd::{Bed, HealthTarget, backends_toml, wait_for},
    netns::NetNs,
};
use lb_userspace::api::Request;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

/// `VIP:port/proto` (table 4099) with the bed's three backends, unchecked.
fn vip_toml(port: u16, proto: &str) -> String {
    format!(
        "[[vip]]\naddress = \"{VIP}\"\nport = {port}\nprotocol = \"{proto}\"\ntable_size = 4099\n{}",
        backends_toml()
    )
}

#[test]
fn health_failure_removes_exactly_that_backend_from_the_kernel_table() {
    if !have_root() {
        return;
    }
    let b = Bed::new("h");
    let vips = format!(
        "[[vip]]\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 4099\n\
         [vip.health]\nkind = \"tcp\"\ntunnel = false\nport = 8080\ninterval_ms = 100\ntimeout_ms = 50\nrise = 2\nfall = 2\n{}",
        backends_toml()
    );
    let cfg = b.config(65536, &vips);
    let targets: Vec<HealthTarget> = ["10.50.0.1:8080", "10.50.0.2:8080", "10.50.0.3:8080"]
        .iter()
        .map(|a| HealthTarget::start(&b.backend, a))
        .collect();
    let lbd = b.start_lbd(&cfg);
    let key = VipKey::new(IpAddr::V4(VIP), 80, PROTO_TCP);
    let failing: IpAddr = "10.50.0.2".parse().unwrap();
    let before = lbd.kernel_table(&key);
    assert!(before.iter().all(|s| s.is_some()));
    let share = before.iter().filter(|s| **s == Some(failing)).count();
    assert!(
        (1300..=1400).contains(&share),
        "10.50.0.2 holds a third of 4099 slots: {share}"
    );

    // Fail 10.50.0.2's health port.
    let mut targets = targets;
    let failed_at = Instant::now();
    targets.remove(1);
    let after = loop {
        let t = lbd.kernel_table(&key);
        if !t.contains(&Some(failing)) {
            break t;
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(5),
            "failed backend still in the kernel's table after 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = failed_at.elapsed();
    eprintln!("failed backend out of the kernel table after {took:?} (interval 100 ms x fall 2)");
    assert!(
        took < Duration::from_millis(200 + 1000),
        "removal took {took:?}"
    );
    for (i, (old, new)) in before.iter().zip(&after).enumerate() {
        if *old == Some(failing) {
            assert!(
                new.is_some() && *new != Some(failing),
                "slot {i} reassigned to a healthy backend"
            );
        } else {
            assert_eq!(old, new, "slot {i} of a healthy backend moved");
        }
    }
    let status = lbd.call(Request::Status);
    let down: Vec<_> = status.data["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["healthy"] == false)
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(down, ["10.50.0.2"]);
    // The probes behind it, by result, in the metrics.
    let probes = |backend: &str, result: &str| -> u64 {
        let prefix = format!(
            "lb_health_probes_total{{vip=\"10.0.0.10:80/tcp\",backend=\"{backend}\",result=\"{result}\"}} "
        );
        b.scrape()
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map_or(0, |v| v.parse().unwrap())
    };
    assert!(probes("10.50.0.2", "connect_failed") >= 2, "{}", b.scrape());
    assert!(probes("10.50.0.1", "up") >= 2);
    assert_eq!(probes("10.50.0.1", "connect_failed"), 0);

    // Recovery (rise 2): the original table comes back slot for slot.
    targets.insert(1, HealthTarget::start(&b.backend, "10.50.0.2:8080"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while lbd.kernel_table(&key) != before {
        assert!(
            Instant::now() < deadline,
            "recovered backend did not come back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `n` datagrams from distinct source ports to the UDP VIP.
fn send_flows(client: &NetNs, n: u16) {
    let _guard = client.enter();
    for i in 0..n {
        let s =
            UdpSocket::bind(SocketAddr::new("10.200.0.2".parse().unwrap(), 20_000 + i)).unwrap();
        s.send_to(b"ping", SocketAddr::new(IpAddr::V4(VIP), 53))
            .unwrap();
    }
}

#[test]
fn restart_and_sigkill_keep_forwarding_and_the_connection_table() {
    if !have_root() {
        return;
    }
    let b = Bed::new("r");
    let vips = vip_toml(53, "udp");
    let cfg = b.config(65536, &vips);
    let mut lbd = b.start_lbd(&cfg);
    let key = VipKey::new(IpAddr::V4(VIP), 53, PROTO_UDP);
    send_flows(&b.client, 50);
    wait_for("50 tracked flows", || lbd.kernel_conntrack().len() >= 50);
    let flows: std::collections::BTreeMap<_, _> = lbd
        .kernel_conntrack()
        .into_iter()
        .map(|(k, e)| (k, e.backend_id))
        .collect();
    let table = lbd.kernel_table(&key);
    assert_eq!(
        lbd.call(Request::Status).data["generation"].as_u64(),
        Some(1),
        "one table written at start"
    );

    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        lbd.stop(signal);
        // The pinned data plane keeps forwarding without the daemon.
        let before = lbd.forwarded();
        send_flows(&b.client, 50);
        wait_for("forwarding without lbd", || lbd.forwarded() >= before + 50);
        assert!(
            b.lb.sh("ip link show l0").contains("xdp"),
            "{name}: program still attached"
        );
        if signal == libc::SIGTERM {
            // As an lbd from before slots were packed two to an element
            // would have pinned them: the new one copies the tables over.
            lbd.repin_slots_one_per_element(&key);
            assert_eq!(lbd.value_size("MAGLEV_SLOTS"), 4);
        } else {
            // As a pinned set from an lbd before `VIPS_BY_ID` would be.
            std::fs::remove_file(b.pin.join("VIPS_BY_ID")).unwrap();
        }
        // A new daemon adopts the state: same table, no flow lost or moved.
        lbd.restart();
        assert_eq!(
            lbd.value_size("MAGLEV_SLOTS"),
            8,
            "{name}: slots pinned two to an element"
        );
        let meta = lbd.kernel_vip(&key).unwrap();
        assert_eq!(
            lbd.kernel_vip_by_id(meta.vip_id),
            lb_common::maps::VipById { key, meta },
            "{name}: VIPS_BY_ID holds the adopted VIP"
        );
        assert_eq!(
            lbd.kernel_table(&key),
            table,
            "{name}: table rewritten on restart"
        );
        let now: std::collections::BTreeMap<_, _> = lbd
            .kernel_conntrack()
            .into_iter()
            .map(|(k, e)| (k, e.backend_id))
            .collect();
        for (flow, backend) in &flows {
            assert_eq!(
                now.get(flow),
                Some(backend),
                "{name}: tracked flow lost or moved"
            );
        }
        let g = lbd.call(Request::Status).data["generation"]
            .as_u64()
            .unwrap();
        assert_eq!(
            g, 1,
            "{name}: the new daemon switched no table (it adopted the pinned one) and counts on from the saved generation"
        );
    }
    // `lbd teardown` removes everything.
    lbd.stop(libc::SIGTERM);
    let out = std::process::Command::new(lb_tests::lbd::lbd_binary())
        .args(["teardown", "--pin-path"])
        .arg(&b.pin)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!b.pin.exists());
    wait_for("XDP detached after teardown", || {
        !b.lb.sh("ip link show l0").contains("xdp")
    });
}

fn share(table: &[Option<IpAddr>], addr: &str) -> f64 {
    let a: IpAddr = addr.parse().unwrap();
    table.iter().filter(|s| **s == Some(a)).count() as f64 / table.len() as f64
}

#[test]
fn api_changes_reach_the_kernel_and_bad_input_changes_nothing() {
    if !have_root() {
        return;
    }
    let b = Bed::new("a");
    let vips = vip_toml(80, "tcp");
    let cfg = b.config(65536, &vips);
    let lbd = b.start_lbd(&cfg);
    let key = VipKey::new(IpAddr::V4(VIP), 80, PROTO_TCP);
    let vip = "10.0.0.10:80/tcp".to_string();

    // Drain: out of the table, still a valid backend.
    let r = lbd.call(Request::Drain {
        vip: vip.clone(),
        address: "10.50.0.3".into(),
    });
    assert!(r.ok, "{r:?}");
    let t = lbd.kernel_table(&key);
    assert_eq!(share(&t, "10.50.0.3"), 0.0);
    assert!(
        t.iter().all(|s| s.is_some()),
        "every slot names a valid backend"
    );

    // Weights are relative: 3:1 between the two left in the table.
    assert!(
        lbd.call(Request::SetWeight {
            vip: vip.clone(),
            address: "10.50.0.1".into(),
            weight: 3
        })
        .ok
    );
    let s1 = share(&lbd.kernel_table(&key), "10.50.0.1");
    assert!((s1 - 0.75).abs() < 0.01, "weight 3 of 4 gives {s1:.3}");

    // Remove and add backends.
    assert!(
        lbd.call(Request::RemoveBackend {
            vip: vip.clone(),
            address: "10.50.0.2".into()
        })
        .ok
    );
    assert!(
        lbd.call(Request::AddBackend {
            vip: vip.clone(),
            address: "10.50.0.4".into(),
            weight: 1,
            state: None,
            server_id: None,
        })
        .ok
    );
    let t = lbd.kernel_table(&key);
    assert_eq!(share(&t, "10.50.0.2"), 0.0);
    assert!((share(&t, "10.50.0.4") - 0.25).abs() < 0.01);

    // Trace answers what the kernel's table says for that flow.
    let r = lbd.call(Request::Trace {
        src: "192.0.2.9:4321".into(),
        dst: "10.0.0.10:80".into(),
        protocol: "tcp".into(),
        quic_cid: None,
    });
    assert!(r.ok, "{r:?}");
    let flow = lb_common::maps::FlowKey::new(
        "192.0.2.9".parse().unwrap(),
        4321,
        IpAddr::V4(VIP),
        80,
        PROTO_TCP,
    );
    let slot = lb_common::flow_hash::flow_hash(&flow, 0) % 4099;
    assert_eq!(r.data["slot"].as_u64(), Some(slot as u64));
    assert_eq!(
        r.data["table_backend"]
            .as_str()
            .map(|s| s.parse::<IpAddr>().unwrap()),
        t[slot as usize]
    );

    // VIPs come and go (added with lbctl, named as everywhere else).
    let out = std::process::Command::new(lb_tests::lbd::lbctl_binary())
        .arg("--socket")
        .arg(&lbd.socket)
        .args([
            "vip",
            "add",
            "10.0.0.11:0/tcp",
            "--table-size",
            "1009",
            "--health",
            "none",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lbctl vip add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lbd.call(Request::AddBackend {
            vip: "10.0.0.11:0/tcp".into(),
            address: "10.50.0.1".into(),
            weight: 1,
            state: None,
            server_id: None,
        })
        .ok
    );
    let any_port = VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11)), 0, PROTO_TCP);
    assert_eq!(lbd.kernel_vip(&any_port).map(|m| m.table_size), Some(1009));
    assert!(
        lbd.call(Request::RemoveVip {
            vip: "10.0.0.11:0/tcp".into()
        })
        .ok
    );
    assert!(lbd.kernel_vip(&any_port).is_none());

    // Bad input: clear errors, nothing changes.
    let before = lbd.kernel_table(&key);
    let r = lbd.call(Request::SetWeight {
        vip: vip.clone(),
        address: "10.50.0.9".into(),
        weight: 2,
    });
    assert!(
        !r.ok && r.error.as_deref().unwrap().contains("no backend 10.50.0.9"),
        "{r:?}"
    );
    let r = lbd.call(Request::AddVip {
        address: "10.0.0.12".into(),
        port: 1,
        protocol: "tcp".into(),
        table_size: Some(4098),
        health: None,
        quic: false,
    });
    assert!(
        !r.ok && r.error.as_deref().unwrap().contains("table_size"),
        "{r:?}"
    );
    // A QUIC VIP at runtime: refused on TCP (the field named), taken on
    // UDP; its backends' server ids reach QUIC_SERVERS.
    let quic_vip = |protocol: &str| Request::AddVip {
        address: "10.0.0.12".into(),
        port: 443,
        protocol: protocol.into(),
        table_size: Some(251),
        health: Some(lb_userspace::health::HealthCheck::default()),
        quic: true,
    };
    let r = lbd.call(quic_vip("tcp"));
    assert!(
        !r.ok
            && r.error
                .as_deref()
                .unwrap()
                .contains(".quic: QUIC runs over UDP"),
        "{r:?}"
    );
    let r = lbd.call(quic_vip("udp"));
    assert!(r.ok, "{r:?}");
    let r = lbd.call(Request::AddBackend {
        vip: "10.0.0.12:443/udp".into(),
        address: "10.50.0.7".into(),
        weight: 1,
        state: None,
        server_id: Some(70_000),
    });
    assert!(
        !r.ok
            && r.error
                .as_deref()
                .unwrap()
                .contains("does not fit server_id_len = 2"),
        "{r:?}"
    );
    let r = lbd.call(Request::AddBackend {
        vip: "10.0.0.12:443/udp".into(),
        address: "10.50.0.7".into(),
        weight: 1,
        state: None,
        server_id: Some(7),
    });
    assert!(r.ok, "{r:?}");
    let servers: aya::maps::HashMap<aya::maps::MapData, lb_common::maps::QuicServerKey, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(lbd.pin.join("QUIC_SERVERS")).unwrap(),
        ))
        .unwrap();
    let entries: Vec<u32> = servers
        .iter()
        .filter_map(|e| e.ok())
        .map(|(k, _)| k.server_id)
        .collect();
    assert_eq!(entries, vec![7]);
    assert!(
        lbd.call(Request::RemoveVip {
            vip: "10.0.0.12:443/udp".into()
        })
        .ok
    );
    {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&lbd.socket).unwrap();
        s.write_all(b"{\"cmd\":\"explode\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("malformed request"), "{line}");
    }
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("table_size = 4099", "table_size = 4098")).unwrap();
    let r = lbd.call(Request::Reload);
    assert!(
        !r.ok
            && r.error
                .as_deref()
                .unwrap()
                .contains("vip[0] (10.0.0.10:80/tcp).table_size"),
        "{r:?}"
    );
    assert_eq!(
        lbd.kernel_table(&key),
        before,
        "a rejected change left the kernel untouched"
    );
    // A good reload returns to the file's configuration.
    std::fs::write(&cfg, good).unwrap();
    assert!(lbd.call(Request::Reload).ok);
    let t = lbd.kernel_table(&key);
    for a in ["10.50.0.1", "10.50.0.2", "10.50.0.3"] {
        assert!(
            (share(&t, a) - 1.0 / 3.0).abs() < 0.01,
            "{a} back to a third"
        );
    }

    // The audit trail: each change, its caller's uid and pid, no colour
    // codes in a file; reads (status, stats) are not logged.
    let log = lbd.log();
    let applied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control: change applied"))
        .collect();
    assert!(
        applied.iter().any(|l| l.contains("uid=0")
            && l.contains(r#""cmd":"drain""#)
            && l.contains("10.50.0.3")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("control: change refused")
            && l.contains(r#""cmd":"add_vip""#)
            && l.contains("table_size")),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "ANSI colour in a log file");
    assert!(!log.contains(r#""cmd":"status""#));

    // Metrics on loopback inside the LB namespace.
    let body = b.scrape();
    assert!(
        body.contains("lb_backend_healthy{vip=\"10.0.0.10:80/tcp\",backend=\"10.50.0.1\"} 1"),
        "{body}"
    );
    assert!(body.contains("lb_table_generation"));
    assert!(body.contains("lb_packets_total{reason=\"pass_not_vip\"}"));
    // Read at scrape time: the rejected and the good reload are both there.
    assert!(
        body.contains("lb_config_reloads_total{result=\"rejected\"} 1"),
        "{body}"
    );
    let (head, text) = body.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    lb_tests::promtool_check(text).unwrap_or_else(|e| panic!("promtool: {e}\n{text}"));
    // Every family has its HELP and all its samples together.
    let mut seen = std::collections::BTreeSet::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            current = rest.split(' ').next().unwrap().to_string();
            assert!(seen.insert(current.clone()), "{current} twice");
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap();
            assert_eq!(name, current, "sample outside its family: {line}");
        }
    }
    // Exactly the documented families (the dashboard is checked against
    // the same list); these need BGP / a first count of the table / a
    // health check (this VIP has none).
    let listed: std::collections::BTreeSet<String> = lb_userspace::daemon::metrics::FAMILIES
        .iter()
        .map(|f| f.to_string())
        .collect();
    assert!(
        seen.is_subset(&listed),
        "unlisted: {:?}",
        seen.difference(&listed)
    );
    for family in &listed {
        let optional = [
            "lb_bgp_announced",
            "lb_conntrack_count_age_seconds",
            "lb_health_probes_total",
            // Only with [etcd] (tests/tests/etcd.rs checks them).
            "lb_fleet_revision",
            "lb_fleet_connected",
            "lb_fleet_rejected_revisions_total",
        ];
        assert!(
            seen.contains(family) || optional.contains(&family.as_str()),
            "{family} missing: {text}"
        );
    }
}

#[test]
fn a_flapping_backend_does_not_churn_the_table() {
    if !have_root() {
        return;
    }
    let b = Bed::new("f");
    let vips = format!(
        "[[vip]]\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 4099\n\
         [vip.health]\nkind = \"tcp\"\ntunnel = false\nport = 8080\ninterval_ms = 50\ntimeout_ms = 25\nrise = 2\nfall = 6\n{}",
        backends_toml()
    );
    let cfg = b.config(65536, &vips);
    let _steady: Vec<HealthTarget> = ["10.50.0.1:8080", "10.50.0.3:8080"]
        .iter()
        .map(|a| HealthTarget::start(&b.backend, a))
        .collect();
    let mut flapping = Some(HealthTarget::start(&b.backend, "10.50.0.2:8080"));
    let lbd = b.start_lbd(&cfg);
    let key = VipKey::new(IpAddr::V4(VIP), 80, PROTO_TCP);
    let table = lbd.kernel_table(&key);
    // Down ~100 ms (about 2 failed probes), up ~200 ms, ten times: never
    // `fall` (6) failures in a row, so never a transition.
    for _ in 0..10 {
        flapping = None;
        std::thread::sleep(Duration::from_millis(100));
        flapping = flapping.or_else(|| Some(HealthTarget::start(&b.backend, "10.50.0.2:8080")));
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(flapping);
    assert_eq!(
        lbd.kernel_table(&key),
        table,
        "no table change from short flaps"
    );
    let status = lbd.call(Request::Status);
    assert_eq!(
        status.data["generation"].as_u64(),
        Some(1),
        "only the initial table was written"
    );
}

/// Type=notify: lbd says READY=1 once it serves, RELOADING=1 (with the
/// monotonic time systemd wants) then READY=1 around a reload, good or
/// rejected, and STOPPING=1 on the way out; read from a socket standing in
/// for systemd's.
#[test]
fn lbd_notifies_systemd_of_ready_reloading_and_stopping() {
    if !have_root() {
        return;
    }
    let b = Bed::new("n");
    let vips = vip_toml(80, "tcp");
    let cfg = b.config(65536, &vips);
    let path = b.dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let mut lbd = lb_tests::lbd::Lbd::unstarted(&b.lb, &cfg, &b.socket(), &b.pin);
    lbd.env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    lbd.restart();
    let ready = next();
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving 1 VIPs"),
        "{ready:?}"
    );
    // Attached before READY.
    assert!(b.lb.sh("ip link show l0").contains("xdp"));
    let reload = std::process::Command::new(lb_tests::lbd::lbd_binary().with_file_name("lbctl"))
        .arg("--socket")
        .arg(b.socket())
        .arg("reload")
        .output()
        .unwrap();
    assert!(reload.status.success());
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next(), "READY=1\n");
    // A rejected file: lbctl reload fails (so does ExecReload), still READY.
    std::fs::write(&cfg, "[lb]\nbogus = 1\n").unwrap();
    let reload = std::process::Command::new(lb_tests::lbd::lbd_binary().with_file_name("lbctl"))
        .arg("--socket")
        .arg(b.socket())
        .arg("reload")
        .output()
        .unwrap();
    assert!(!reload.status.success());
    assert!(String::from_utf8_lossy(&reload.stderr).contains("bogus"));
    assert!(next().starts_with("RELOADING=1"));
    assert_eq!(next(), "READY=1\n");
    lbd.stop(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1\n");
}

/// `max_vips` / `max_backends` / `conntrack_entries` / `maglev_slots` size
/// the maps the kernel creates, and `lbd check-config`'s memory estimate is
/// the kernel's own account of them (`memlock`) within 10%.
#[test]
fn map_sizes_come_from_the_config_and_cost_what_check_config_says() {
    if !have_root() {
        return;
    }
    use std::os::fd::{AsFd, AsRawFd};
    let b = Bed::new("z");
    let vips = vip_toml(80, "tcp");
    let cfg = b.config(65536, &vips);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "conntrack_entries = 65536\n",
        "conntrack_entries = 100000\nmax_vips = 100\nmax_backends = 5000\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let _lbd = b.start_lbd(&cfg);
    let config = lb_userspace::config::Config::load(&cfg).unwrap();
    let cpus = lb_userspace::sizing::possible_cpus();
    let plan = lb_userspace::sizing::plan(&config.lb, cpus);
    let mut checked = 0;
    for m in &plan {
        let path = b.pin.join(m.name);
        if !path.exists() {
            continue; // not pinned (per-CPU scratch, the backend side's)
        }
        let data = aya::maps::MapData::from_pin(&path).unwrap();
        let info = data.info().unwrap();
        if m.kind != lb_userspace::sizing::Kind::RingBuf {
            assert_eq!(info.max_entries(), m.entries, "{}", m.name);
        }
        let fd = data.fd().as_fd().as_raw_fd();
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let memlock: u64 = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        eprintln!(
            "{:<20} {:>8} entries  estimate {:>10}  kernel {:>10}",
            m.name, m.entries, m.bytes, memlock
        );
        if m.bytes >= 64 * 1024 {
            let ratio = m.bytes as f64 / memlock as f64;
            assert!(
                (0.9..=1.1).contains(&ratio),
                "{}: estimate {} vs kernel {memlock}",
                m.name,
                m.bytes
            );
        }
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} pinned maps found");
    // At scale the scrape can leave out the per-backend series.
    assert!(b.scrape().contains("lb_backend_packets_total{"));
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "metrics_address =",
        "metrics_backend_series = false\nmetrics_address =",
    );
    std::fs::write(&cfg, text).unwrap();
    drop(_lbd);
    let _lbd = b.start_lbd(&cfg);
    let scrape = b.scrape();
    assert!(!scrape.contains("lb_backend_") && !scrape.contains("lb_health_probes_total"));
    assert!(scrape.contains("lb_vip_packets_total{"), "{scrape}");
    assert_eq!(
        plan.iter().find(|m| m.name == "CONNTRACK").unwrap().entries,
        100_000
    );
    let out = std::process::Command::new(lb_tests::lbd::lbd_binary())
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("total") && said.contains("BACKEND_STATS"),
        "{said}"
    );
}
