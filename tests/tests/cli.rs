//! `lbctl` as an operator uses it, against a real lbd: every subcommand's
//! text and `--json` shapes, the views (rates, flows, config dump), runtime
//! changes and what a reload does to them, and errors as JSON for scripts.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
};

use lb_tests::{
    have_root,
    lbd::{Bed, backends_toml, lbd_binary, wait_for},
    netns::NetNs,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const NAME: &str = "10.0.0.10:53/udp";

fn send_flows(client: &NetNs, first_port: u16, n: u16) {
    let _guard = client.enter();
    for i in 0..n {
        let s = UdpSocket::bind(SocketAddr::new(
            "10.200.0.2".parse().unwrap(),
            first_port + i,
        ))
        .unwrap();
        s.send_to(b"ping", SocketAddr::new(IpAddr::V4(VIP), 53))
            .unwrap();
    }
}

struct Ctl<'a>(&'a Bed);

impl Ctl<'_> {
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(lbd_binary().with_file_name("lbctl"))
            .arg("--socket")
            .arg(self.0.socket())
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// Text output of a command that must succeed.
    fn text(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "lbctl {args:?}: {text}");
        text
    }

    /// `--json` output: one JSON document on stdout, success or not.
    fn json(&self, args: &[&str]) -> (bool, Value) {
        let out = Command::new(lbd_binary().with_file_name("lbctl"))
            .arg("--socket")
            .arg(self.0.socket())
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lbctl --json {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (out.status.success(), v)
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let (ok, v) = self.json(args);
        assert!(ok, "lbctl --json {args:?}: {v}");
        v
    }
}

#[test]
fn every_subcommand_prints_a_table_or_json() {
    if !have_root() {
        return;
    }
    let b = Bed::new("cli");
    let vips = format!(
        "[[vip]]\naddress = \"{VIP}\"\nport = 53\nprotocol = \"udp\"\ntable_size = 4099\n{}",
        backends_toml()
    );
    let cfg = b.config(65536, &vips);
    let lbd = b.start_lbd(&cfg);
    let ctl = Ctl(&b);
    send_flows(&b.client, 30_000, 60);
    wait_for("60 tracked flows", || lbd.kernel_conntrack().len() >= 60);

    // status
    let text = ctl.text(&["status"]);
    assert!(text.contains(NAME) && text.contains("tracked"), "{text}");
    let status = ctl.ok_json(&["status"]);
    let backends = status["vips"][0]["backends"].as_array().unwrap().clone();
    assert_eq!(backends.len(), 3);
    assert_eq!(status["vips"][0]["new_flows"], 60, "{status}");
    let new_flows: u64 = backends
        .iter()
        .map(|b| b["new_flows"].as_u64().unwrap())
        .sum();
    assert_eq!(new_flows, 60);

    // status of one VIP (bounded output), and an unknown one refused
    let one = ctl.ok_json(&["status", "--vip", NAME]);
    assert_eq!(one["vips"].as_array().unwrap().len(), 1);
    let (ok, v) = ctl.json(&["status", "--vip", "10.9.9.9:1/tcp"]);
    assert!(
        !ok && v["error"].as_str().unwrap().contains("no VIP"),
        "{v}"
    );

    // stats
    assert!(ctl.text(&["stats"]).contains("conntrack_miss"));
    let stats = ctl.ok_json(&["stats"]);
    assert_eq!(stats["reasons"]["conntrack_miss"]["packets"], 60);

    // rates: 40 new flows and 40 packets during the interval.
    let rates = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(200));
            send_flows(&b.client, 31_000, 40);
        });
        ctl.ok_json(&["rates", "--interval", "1"])
    });
    let secs = rates["interval_secs"].as_f64().unwrap();
    let new_per_sec = rates["vips"][0]["new_flows_per_sec"].as_f64().unwrap();
    assert!(
        (new_per_sec * secs - 40.0).abs() < 1.0,
        "40 new flows in {secs} s: {rates}"
    );
    let per_backend: f64 = rates["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["packets_per_sec"].as_f64().unwrap())
        .sum();
    assert!((per_backend * secs - 40.0).abs() < 1.0, "{rates}");
    let text = ctl.text(&["rates", "--interval", "0.2"]);
    assert!(
        text.contains("new flows/s") && text.contains("-> 10.50.0.1"),
        "{text}"
    );

    // flows: bounded, filtered, counted.
    let flows = ctl.ok_json(&["flows", "--vip", NAME, "--limit", "5"]);
    assert_eq!(flows["flows"].as_array().unwrap().len(), 5);
    assert_eq!(flows["matched"], 100);
    assert_eq!(flows["truncated"], true);
    let row = &flows["flows"][0];
    assert_eq!(row["vip"], NAME);
    assert_eq!(row["protocol"], "udp");
    assert!(row["client"].as_str().unwrap().starts_with("10.200.0.2:"));
    let status = ctl.ok_json(&["status"]);
    for backend in status["vips"][0]["backends"].as_array().unwrap() {
        let addr = backend["address"].as_str().unwrap();
        let only = ctl.ok_json(&["flows", "--backend", addr, "--limit", "1000"]);
        assert_eq!(only["matched"], backend["tracked_flows"], "{addr}");
        assert!(
            only["flows"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["backend"] == addr)
        );
    }
    let text = ctl.text(&["flows", "--limit", "3"]);
    assert!(
        text.contains("3 shown of 100 matching") && text.contains("--limit N"),
        "{text}"
    );

    // trace
    let trace = ctl.ok_json(&["trace", "10.200.0.2:30000", "10.0.0.10:53", "udp"]);
    assert_eq!(trace["vip"], NAME);
    assert_eq!(trace["tracked_backend"], trace["table_backend"]);
    assert!(
        ctl.text(&["trace", "10.200.0.2:30000", "10.0.0.10:53", "udp"])
            .contains("table says")
    );

    // Runtime changes: shown in status, in the dump, dropped by a reload.
    let r = ctl.ok_json(&["backend", "weight", NAME, "10.50.0.1", "3"]);
    assert_eq!(r["message"], "weight set");
    let r = ctl.ok_json(&["vip", "add", "10.0.0.11:443/tcp", "--table-size", "4099"]);
    assert_eq!(r["message"], "added");
    ctl.text(&["backend", "add", "10.0.0.11:443/tcp", "10.50.0.2"]);
    let status = ctl.ok_json(&["status"]);
    let added = &status["vips"][1];
    assert_eq!(added["vip"], "10.0.0.11:443/tcp");
    assert_eq!(added["health_check"], "tcp", "a runtime VIP is checked");
    assert_eq!(
        added["backends"][0]["healthy"], false,
        "nothing listens on 10.50.0.2:443: it stays out"
    );
    let changes = status["runtime_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(
        ctl.text(&["status"])
            .contains("runtime changes not in the config file")
    );
    let dump = ctl.text(&["config", "dump"]);
    assert!(
        dump.contains("# runtime change: VIP 10.0.0.11:443/tcp added"),
        "{dump}"
    );
    let parsed = lb_userspace::config::Config::parse(&dump).expect("the dump is a valid config");
    assert_eq!(parsed.vips.len(), 2);
    assert_eq!(parsed.vips[0].backends[0].weight, 3);
    assert_eq!(parsed.vips[1].health.kind, "tcp");
    let dumped = ctl.ok_json(&["config", "dump"]);
    assert!(dumped["toml"].as_str().unwrap().contains("[[vip.backend]]"));
    let reload = ctl.ok_json(&["reload"]);
    assert_eq!(
        reload["dropped_runtime_changes"].as_array().unwrap().len(),
        2,
        "{reload}"
    );
    assert!(reload["message"].as_str().unwrap().contains("dropped"));
    let status = ctl.ok_json(&["status"]);
    assert_eq!(status["vips"].as_array().unwrap().len(), 1);
    assert!(status["runtime_changes"].as_array().unwrap().is_empty());

    // Errors: text on stderr, or one JSON document for scripts; exit 1.
    let (ok, text) = ctl.run(&["backend", "weight", NAME, "10.9.9.9", "1"]);
    assert!(!ok && text.contains("no backend 10.9.9.9"), "{text}");
    let (ok, v) = ctl.json(&["backend", "weight", NAME, "10.9.9.9", "1"]);
    assert!(
        !ok && v["error"].as_str().unwrap().contains("no backend"),
        "{v}"
    );
    let (ok, v) = ctl.json(&["drain"]);
    assert!(!ok && v["error"].as_str().unwrap().contains("[bgp]"), "{v}");
    let r = ctl.ok_json(&["resume"]);
    assert!(r["message"].is_string());

    // check-backend on the backend host: JSON findings, and a missing
    // interface is a failure, not "ok".
    let check = |args: &[&str]| {
        let _g = b.backend.enter();
        Command::new(lbd_binary().with_file_name("lbctl"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = check(&[
        "--json",
        "check-backend",
        "--vip",
        "10.0.0.10",
        "--interface",
        "nope0",
    ]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let findings = v["findings"].as_array().unwrap();
    assert!(
        findings
            .iter()
            .any(|f| f["level"] == "fail" && f["message"].as_str().unwrap().contains("nope0")),
        "{v}"
    );
    assert!(
        !findings.iter().any(|f| f["message"]
            .as_str()
            .unwrap()
            .contains("rp_filter on nope0")),
        "nothing judged about a missing interface: {v}"
    );
    let out = check(&["check-backend", "--vip", "10.0.0.10", "--interface", "b0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL") && text.contains("not on lo"),
        "{text}"
    );
}
