//! End to end with IPv6 and GUE: IPv4 and IPv6 clients, VIPs and backends
//! in every combination (IPIP, IP6IP6, 4in6, 6in4, GUE over IPv4 and IPv6)
//! through the ECMP router, two lbd instances and DSR backends that
//! decapsulate with XDP; ICMP answers from the data path seen by the
//! client's own kernel. Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use lb_tests::{
    have_root,
    testbed::{Spec, Testbed, VIP, VIP6, services},
};
use lb_userspace::api::Request;

#[test]
fn every_family_combination_carries_connections_that_survive_ecmp_changes() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new("e6c", Spec::default());
    tb.assert_every_service_answers(60);
    let held = tb.hold_connections_to(&services(), 10);
    let total = services().len() * 10;
    assert_eq!(held.alive(), total);
    assert_eq!(tb.ecmp_leave_join_switch(&held), [total; 3]);
    // Both instances carried traffic of both families, and the backends
    // decapsulated every kind.
    for i in 0..2 {
        let stats = tb.lbctl(i, Request::Stats);
        assert!(
            stats.data["forwarded"].as_u64().unwrap() > 0,
            "lb{i} forwarded"
        );
    }
}

#[test]
fn vip_addresses_answer_pings() {
    if !have_root() {
        return;
    }
    let tb = Testbed::new("e6p", Spec::default());
    for (cmd, vip) in [("ping", VIP), ("ping", VIP6)] {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &tb.client.name,
                cmd,
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                vip,
            ])
            .output()
            .expect("ping");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ping {vip}: {text}");
        assert!(text.contains("3 received"), "ping {vip}: {text}");
    }
    let replies = tb.reason_packets("icmp_echo_reply");
    assert_eq!(replies, 6, "the data path answered every echo request");
}

/// This host's default congestion control, BBR, takes the first window's
/// losses (every full-size segment sent before the too-big answer arrives)
/// for a ~160 kbit/s path and paces a 64 KB upload for 6-10 s; with Linux's
/// stock cubic the client recovers in a few round trips. The data path's
/// part (the answers) is the same either way.
fn use_cubic(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let name = b"cubic";
    // SAFETY: a valid socket and a buffer of the given length.
    let set = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        set,
        0,
        "TCP_CONGESTION cubic: {}",
        std::io::Error::last_os_error()
    );
}

/// Sends one `len`-byte line and reads the echo back.
fn upload(addr: SocketAddr, len: usize) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    use_cubic(&s);
    let line: String = std::iter::repeat_n('x', len).collect();
    s.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    Some(answer)
}

#[test]
fn full_size_uploads_get_through_after_a_too_big_answer() {
    if !have_root() {
        return;
    }
    // Every link has MTU 1500: a full-size client segment cannot carry the
    // outer header. The data path answers "fragmentation needed" / "packet
    // too big"; the client's kernel lowers its path MTU and the upload goes.
    let tb = Testbed::new("e6m", Spec::default());
    for addr in [
        format!("{VIP}:80"),
        format!("[{VIP6}]:80"),
        format!("[{VIP6}]:8080"),
        format!("{VIP}:8443"),
    ] {
        let addr: SocketAddr = addr.parse().unwrap();
        let started = std::time::Instant::now();
        let answer = tb.in_client(move || upload(addr, 64 * 1024));
        eprintln!("{addr}: {:?}", started.elapsed());
        let answer = answer.unwrap_or_else(|| panic!("{addr}: upload stalled"));
        assert!(answer.starts_with("be"), "{addr}: {}", &answer[..10]);
        assert_eq!(answer.len(), 64 * 1024 + 5, "{addr}: whole line echoed");
    }
    let sent = tb.reason_packets("icmp_too_big_sent");
    eprintln!("too-big answers sent: {sent}");
    assert!(sent >= 4, "each service needed at least one answer: {sent}");
}

#[test]
fn downloads_get_through_a_smaller_mtu_on_the_way_back() {
    if !have_root() {
        return;
    }
    // The router's routes to the client carry 1400 bytes, every link 1500:
    // a backend's full-size answers (DSR) hit the router, which sends
    // "fragmentation needed" / "packet too big" to the VIP. The LB must hand
    // that error to the backend serving the flow, or the download stalls.
    let tb = Testbed::new("e6d", Spec::default());
    tb.router.ip(&[
        "route",
        "add",
        "10.10.0.2/32",
        "dev",
        "rc",
        "mtu",
        "lock",
        "1400",
    ]);
    tb.router.ip(&[
        "-6",
        "route",
        "add",
        "fd00:10::2/128",
        "dev",
        "rc",
        "mtu",
        "lock",
        "1400",
    ]);
    for addr in [format!("{VIP}:80"), format!("[{VIP6}]:80")] {
        let addr: SocketAddr = addr.parse().unwrap();
        // A small upload, a large echo back: only the download needs PMTU.
        let answer = tb.in_client(move || upload(addr, 64 * 1024));
        let answer = answer.unwrap_or_else(|| panic!("{addr}: download stalled"));
        assert_eq!(answer.len(), 64 * 1024 + 5, "{addr}: whole line echoed");
    }
    let forwarded = tb.reason_packets("icmp_error_forwarded");
    eprintln!("ICMP errors forwarded to backends: {forwarded}");
    assert!(forwarded >= 2, "one error per family at least: {forwarded}");
}
