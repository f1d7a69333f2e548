//! `cargo xtask bench`: data-path cost per packet through BPF_PROG_TEST_RUN
//! (one call per packet, net of an empty program timed the same way), Maglev
//! table builds, and the time for a table change to be live in the kernel.
//! Prints a table and writes target/bench/report.json.

use anyhow::Context;
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb_common::{
    PROTO_TCP, PROTO_UDP,
    maglev::{self, MaglevBackend},
    maps::{VIP_F_QUIC, VipKey},
    quic_lb::{QuicLbParams, encode_cid},
    settings::Settings,
};
use lb_tests::{
    fixture::{Harness, backend, backend6, vip_meta},
    packets::{self, TcpKind},
    pin_to_cpu,
};
use lb_userspace::vip_table::{BackendSpec, install_vip};

const RUNS: usize = 5;

struct Stat {
    name: String,
    min: f64,
    median: f64,
    unit: &'static str,
    note: String,
}

fn summarize(name: &str, mut runs: Vec<f64>, unit: &'static str, note: String) -> Stat {
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stat {
        name: name.into(),
        min: runs[0],
        median: runs[runs.len() / 2],
        unit,
        note,
    }
}

/// Kernel-measured ns per call over `calls` calls of `f` (one packet each):
/// the interquartile mean, so that calls an interrupt or the host's other
/// guests stretched (the VM's noise comes in such bursts) do not move it,
/// while it keeps sub-ns resolution the kernel's whole-ns figures lack.
fn per_call(calls: u32, mut f: impl FnMut(u32) -> Duration) -> f64 {
    let mut ns: Vec<u64> = (0..calls).map(|i| f(i).as_nanos() as u64).collect();
    interquartile_mean(&mut ns)
}

/// The mean of the middle half of `v` (sorted in place).
fn interquartile_mean(v: &mut [u64]) -> f64 {
    v.sort_unstable();
    let (lo, hi) = (v.len() / 4, v.len() - v.len() / 4);
    let middle = &v[lo..hi.max(lo + 1).min(v.len())];
    middle.iter().sum::<u64>() as f64 / middle.len() as f64
}

/// Runs the calling thread (and so its BPF_PROG_TEST_RUN calls) on `cpu`.
/// Frames the XDP program of `dev` has seen (veth statistics).
fn xdp_packets(dev: &str) -> u64 {
    let out = std::process::Command::new("ethtool")
        .args(["-S", dev])
        .output()
        .expect("ethtool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("xdp_packets"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
        .sum()
}

/// Time from a backend's health port closing to the backend's absence
/// from the kernel's table, with the real `lbd` (TCP checks every 100 ms,
/// fall 2): five failures and recoveries; milliseconds.
fn health_failure_removal() -> anyhow::Result<Vec<f64>> {
    use lb_tests::lbd::{Bed, HealthTarget, backends_toml};
    let bed = Bed::new("bh");
    let config = bed.config(
        262_144,
        &format!(
            "[[vip]]\naddress = \"10.0.0.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 65537\n\
             [vip.health]\nkind = \"tcp\"\ntunnel = false\nport = 8080\ninterval_ms = 100\ntimeout_ms = 50\nrise = 2\nfall = 2\n{}",
            backends_toml()
        ),
    );
    let mut targets: Vec<HealthTarget> = ["10.50.0.1:8080", "10.50.0.2:8080", "10.50.0.3:8080"]
        .iter()
        .map(|a| HealthTarget::start(&bed.backend, a))
        .collect();
    let lbd = bed.start_lbd(&config);
    let key = VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 80, PROTO_TCP);
    let failing: IpAddr = "10.50.0.2".parse()?;
    let wait = |what: &str, done: &dyn Fn(&[Option<IpAddr>]) -> bool| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&lbd.kernel_table(&key)) {
            anyhow::ensure!(Instant::now() < deadline, "{what} within 10 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    };
    wait("backend in the table", &|t| t.contains(&Some(failing)))?;
    // Reading a whole table takes 65537 syscalls: time the switch by the
    // VIP's entry (one lookup; a new table means a new region), then check
    // the new table once.
    let mut took = Vec::new();
    for _ in 0..5 {
        let before = lbd.kernel_vip(&key).context("VIP in the kernel")?;
        let failed_at = Instant::now();
        targets.remove(1);
        let deadline = failed_at + Duration::from_secs(10);
        while lbd.kernel_vip(&key) == Some(before) {
            anyhow::ensure!(Instant::now() < deadline, "no table switch within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        took.push(failed_at.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            !lbd.kernel_table(&key).contains(&Some(failing)),
            "the new table still names the failed backend"
        );
        targets.insert(1, HealthTarget::start(&bed.backend, "10.50.0.2:8080"));
        wait("recovered backend back", &|t| t.contains(&Some(failing)))?;
        // Let the checker settle into its rhythm again.
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(lbd);
    Ok(took)
}

fn client(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xC633_0000u32 + (i % 60_000)) // 198.51.x.x
}

/// The data-path cases, in report order.
const CASES: [&str; 10] = [
    "TCP SYN (inserts a flow)",
    "TCP ACK, tracked flow",
    "UDP, tracked flow",
    "non-VIP packet (pass)",
    "1400-byte TCP, tracked flow",
    "TCP ACK, 50k tracked flows round-robin",
    "TCP SYN, same flow (replaces its entry)",
    "IPv6 TCP ACK, tracked flow (IP6IP6)",
    "TCP ACK, untracked, second hop (previous table)",
    "QUIC short header, routed by server id",
];

/// One program under test with the `lb-bench` setup: 1 TCP + 1 UDP VIP
/// (IPv4) and 1 TCP VIP (IPv6), 100 backends each, M = 65537, and the
/// packets of every case, its connection table warmed.
struct DataPathBed {
    h: Harness,
    syn: Vec<Vec<u8>>,
    ack: Vec<Vec<u8>>,
    big: Vec<u8>,
    udp: Vec<u8>,
    other: Vec<u8>,
    ack6: Vec<u8>,
    /// An ACK of a flow no instance recorded whose slot had another owner
    /// in the VIP's previous table: the miss path with a second hop, every
    /// time (such packets are not recorded). Programs without second chance
    /// record it on the first call and take the tracked path after.
    second_hop: Vec<u8>,
    /// A QUIC short header to a QUIC VIP (100 servers) naming server 50;
    /// programs without QUIC routing track it as a UDP flow.
    quic: Vec<u8>,
    tcp_backends: Vec<BackendSpec>,
}

const FLOWS: u32 = 50_000;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

fn datapath_bed(mut h: Harness) -> anyhow::Result<DataPathBed> {
    let vip = VIP;
    let tcp_backends: Vec<BackendSpec> = (0..100)
        .map(|i| backend(100 + i, [10, 50, 0, i as u8 + 1], 1))
        .collect();
    let udp_backends: Vec<BackendSpec> = (0..100)
        .map(|i| backend(300 + i, [10, 50, 0, i as u8 + 101], 1))
        .collect();
    h.add_vip(
        VipKey::new(IpAddr::V4(vip), 80, PROTO_TCP),
        1,
        &tcp_backends,
        65_537,
    );
    h.add_vip(
        VipKey::new(IpAddr::V4(vip), 53, PROTO_UDP),
        2,
        &udp_backends,
        65_537,
    );
    // IPv6 VIP with 100 IPv6 backends (IP6IP6).
    let vip6: IpAddr = "fd00::10".parse().unwrap();
    let tcp6_backends: Vec<BackendSpec> = (0..100)
        .map(|i| backend6(500 + i, 0x50, i as u16 + 1, 1))
        .collect();
    h.add_vip(VipKey::new(vip6, 80, PROTO_TCP), 3, &tcp6_backends, 65_537);
    let client6: IpAddr = "2001:db8::7".parse().unwrap();
    let ack6 = packets::tcp_ip(client6, 10_000, vip6, 80, TcpKind::Ack, 0);
    // The same 50,000 flows, as SYNs (to create them) and as ACKs.
    let packets_of = |kind: TcpKind| -> Vec<Vec<u8>> {
        (0..FLOWS)
            .map(|i| packets::tcp(client(i), 10_000 + (i % 50_000) as u16, vip, 80, kind, 0))
            .collect()
    };
    let syn = packets_of(TcpKind::Syn);
    let ack = packets_of(TcpKind::Ack);
    let big = packets::tcp(client(0), 10_000, vip, 80, TcpKind::Ack, 1400 - 54);
    let udp: Vec<Vec<u8>> = (0..1000)
        .map(|i| packets::udp(client(i), 20_000 + i as u16, vip, 53, 64))
        .collect();
    let other = packets::tcp(
        client(1),
        1234,
        Ipv4Addr::new(10, 9, 9, 9),
        80,
        TcpKind::Ack,
        0,
    );
    // The TCP VIP had one more backend before its last change (the second
    // chance window is open): a previous table beside the current one.
    let mut second_hop = ack[0].clone();
    if h.dp.has_second_chance() {
        let mut before = tcp_backends.clone();
        before.push(backend(99, [10, 50, 1, 1], 1));
        h.set_prev_table(1, &before, 65_537);
        second_hop = (0..100_000u32)
            .map(|i| packets::tcp(client(i), 30_000, vip, 80, TcpKind::Ack, 0))
            .find(|p| {
                h.model
                    .decide(p, h.lb0, h.next_hop(), None)
                    .second_hop
                    .is_some()
            })
            .expect("some flow's slot changed owner");
    }
    // A QUIC VIP: 100 backends, server ids 1..=100 (2 octets).
    let params = QuicLbParams {
        config_id: 0,
        server_id_len: 2,
        nonce_len: 6,
    };
    let quic_backends: Vec<BackendSpec> = (0..100)
        .map(|i| backend(700 + i, [10, 50, 1, i as u8 + 1], 1))
        .collect();
    h.add_vip_with_flags(
        VipKey::new(IpAddr::V4(vip), 443, PROTO_UDP),
        4,
        VIP_F_QUIC | params.flag_bits(),
        &quic_backends,
        65_537,
    );
    if h.dp.has_quic_routing() {
        for (i, b) in quic_backends.iter().enumerate() {
            h.set_quic_server(4, i as u32 + 1, b.id);
        }
    }
    let mut quic_body = vec![0x43];
    quic_body.extend(encode_cid(&params, 50, &[7; 6]));
    quic_body.extend([0u8; 40]);
    let quic = packets::udp_with(
        IpAddr::V4(client(0)),
        50_000,
        IpAddr::V4(vip),
        443,
        &quic_body,
    );
    let lb0 = h.lb0;
    // Warm the connection table for the tracked cases.
    for p in syn.iter().chain(&udp).chain([&ack6, &quic]) {
        h.dp.test_run(p, lb0)?;
    }
    Ok(DataPathBed {
        h,
        syn,
        ack,
        big,
        udp: udp[0].clone(),
        other,
        ack6,
        second_hop,
        quic,
        tcp_backends,
    })
}

/// One case, once: (the empty program's ns per call, timed just before,
/// and the case's ns per packet net of it). `run` picks the fresh SYNs'
/// address range; `fresh_max` caps how many new flows one run creates, so
/// the runs together never overflow the 2^20-entry table (which would time
/// LRU evictions instead).
fn datapath_case(
    bed: &mut DataPathBed,
    case: usize,
    calls: u32,
    run: usize,
    fresh_max: u32,
) -> (f64, f64) {
    let _ns = bed.h.enter();
    let lb0 = bed.h.lb0;
    let dp = &mut bed.h.dp;
    let (syn, ack) = (&bed.syn, &bed.ack);
    let empty = per_call(calls, |i| {
        dp.test_run_empty(&ack[(i % FLOWS) as usize]).unwrap()
    });
    let mut one = |p: &[u8]| per_call(calls, |_| dp.test_run(p, lb0).unwrap().duration);
    let gross = match case {
        0 => {
            // New flows every call: a fresh source address range per run.
            let base = 0xCB00_0000u32 + (run as u32 + 1) * fresh_max;
            let fresh: Vec<Vec<u8>> = (0..calls.min(fresh_max))
                .map(|i| packets::tcp(Ipv4Addr::from(base + i), 40_000, VIP, 80, TcpKind::Syn, 0))
                .collect();
            per_call(fresh.len() as u32, |i| {
                dp.test_run(&fresh[i as usize], lb0).unwrap().duration
            })
        }
        1 => one(&ack[0]),
        2 => one(&bed.udp),
        3 => one(&bed.other),
        4 => one(&bed.big),
        5 => per_call(calls, |i| {
            dp.test_run(&ack[(i % FLOWS) as usize], lb0)
                .unwrap()
                .duration
        }),
        6 => one(&syn[0]),
        7 => one(&bed.ack6),
        8 => one(&bed.second_hop),
        _ => one(&bed.quic),
    };
    (empty, gross - empty)
}

impl DataPathBed {
    /// The packet a case sends every call (`None`: a new packet per call).
    fn fixed_packet(&self, case: usize) -> Option<&[u8]> {
        Some(match case {
            1 | 5 => &self.ack[0],
            2 => &self.udp,
            3 => &self.other,
            4 => &self.big,
            6 => &self.syn[0],
            7 => &self.ack6,
            8 => &self.second_hop,
            9 => &self.quic,
            _ => return None,
        })
    }
}

/// An A/B run compares like with like only if both programs do the same
/// with each packet: says where the arms' verdicts or output frames differ
/// (e.g. an experimental build that takes a shortcut it should not).
fn warn_if_arms_differ(
    pair: &mut [DataPathBed],
    selected: &dyn Fn(usize) -> bool,
) -> anyhow::Result<()> {
    for (case, name) in CASES.iter().enumerate().filter(|&(c, _)| selected(c)) {
        let mut outs = Vec::new();
        for bed in pair.iter_mut() {
            let Some(packet) = bed.fixed_packet(case).map(<[u8]>::to_vec) else {
                continue;
            };
            let _ns = bed.h.enter();
            let lb0 = bed.h.lb0;
            let out = bed.h.dp.test_run(&packet, lb0)?;
            if std::env::var_os("LB_BENCH_DUMP").is_some() {
                println!(
                    "{case} {} {:02x?}",
                    out.action,
                    &out.packet[..out.packet.len().min(40)]
                );
            }
            outs.push((out.action, out.packet));
        }
        if let [new, old] = &outs[..]
            && new != old
        {
            println!(
                "warning: the arms differ on {name:?}: new action {} ({} bytes out), old action {} ({} bytes out)",
                new.0,
                new.1.len(),
                old.0,
                old.1.len()
            );
        }
    }
    Ok(())
}

fn program_size(h: &mut Harness) -> [u32; 3] {
    let (x, j, v) = h.dp.program_size().unwrap_or_default();
    [x, j, v]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let calls: u32 = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    // `--baseline OBJECT`: the same cases through another build's program,
    // alternating with this one in the same process.
    let baseline = args
        .iter()
        .position(|a| a == "--baseline")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    let mut stats: Vec<Stat> = Vec::new();
    if std::env::var_os("LB_BENCH_HEALTH").is_some() {
        println!(
            "failed backend out of the kernel table: {:?} ms",
            health_failure_removal()?
        );
        return Ok(());
    }

    // Data path: 1 TCP VIP and 1 UDP VIP with 100 backends each, M = 65537.
    let settings = if std::env::var_os("LB_BENCH_NO_FIB").is_some() {
        Settings {
            flags: lb_common::settings::SETTINGS_F_NO_FIB
                | lb_common::settings::SETTINGS_F_GATEWAY_MAC,
            gateway_mac: packets::ROUTER_MAC,
            ..Settings::DEFAULT
        }
    } else {
        Settings::DEFAULT
    };
    let conntrack: u32 = std::env::var("LB_BENCH_CONNTRACK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    // `--object OBJECT`: that build's program as the new arm instead of the
    // embedded one (A/B of two experimental builds without relinking).
    let object = match args.iter().position(|a| a == "--object") {
        Some(i) => {
            let path = args.get(i + 1).context("--object needs a path")?;
            Some(lb_userspace::dataplane::load_object_file(
                std::path::Path::new(path),
            )?)
        }
        None => None,
    };
    let mut beds = vec![datapath_bed(Harness::with_object(
        settings, conntrack, object,
    ))?];
    let baseline_object = match &baseline {
        Some(path) => Some(lb_userspace::dataplane::load_object_file(path)?),
        None => None,
    };
    // Per program: the empty program's runs, and each case's runs. With a
    // baseline, every run loads both programs afresh (an instance's place
    // in memory alone moved A/A comparisons by up to 30%), beside the first
    // bed's namespace, and they take turns case by case (who goes first
    // alternates), so the VM's drift hits both alike.
    let arms = if baseline_object.is_some() { 2 } else { 1 };
    let runs = std::env::var("LB_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if arms == 2 { 8 } else { RUNS });
    let fresh_max = ((1u32 << 20) / (runs as u32 + 2)).min(200_000);
    // `LB_BENCH_CASES=1,3`: only those cases (by their place in `CASES`),
    // e.g. to profile one packet kind with `perf record`.
    let only: Option<Vec<usize>> = std::env::var("LB_BENCH_CASES")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect());
    let selected = |case: usize| only.as_ref().is_none_or(|o| o.contains(&case));
    let mut empty_runs: Vec<Vec<f64>> = vec![Vec::new(); arms];
    let mut case_runs: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); CASES.len()]; arms];
    for run in 0..runs {
        let mut pair: Vec<DataPathBed> = Vec::new();
        if let Some(baseline) = baseline_object {
            let objects = [object, Some(baseline)];
            let first = run % 2;
            let a = datapath_bed(beds[0].h.twin(objects[first]))?;
            let b = datapath_bed(beds[0].h.twin(objects[1 - first]))?;
            pair = if first == 0 { vec![a, b] } else { vec![b, a] };
            if run == 0 {
                warn_if_arms_differ(&mut pair, &selected)?;
            }
        }
        // `case` indexes the inner vectors of per-arm tables.
        #[allow(clippy::needless_range_loop)]
        for case in (0..CASES.len()).filter(|&c| selected(c)) {
            let order: Vec<usize> = if (run + case) % 2 == 0 {
                (0..arms).collect()
            } else {
                (0..arms).rev().collect()
            };
            for b in order {
                let bed = if arms == 2 {
                    &mut pair[b]
                } else {
                    &mut beds[0]
                };
                let (empty, net) = datapath_case(bed, case, calls, run, fresh_max);
                empty_runs[b].push(empty);
                case_runs[b][case].push(net);
            }
        }
        if run + 1 == runs && arms == 2 {
            beds.extend(pair);
        }
    }
    if arms == 2 {
        println!(
            "\nA/B against {} ({runs} runs of {calls} calls per case, the programs alternating; ns net of the empty program: medians over runs of each run's interquartile mean; new/old: the median of the runs' paired ratios)",
            baseline.as_ref().unwrap().display()
        );
        println!("{:<48} {:>9} {:>9} {:>9}", "case", "new", "old", "new/old");
        let mut ab_json = Vec::new();
        for (c, name) in CASES.iter().enumerate() {
            if case_runs[0][c].is_empty() {
                continue;
            }
            let new = median(case_runs[0][c].clone());
            let old = median(case_runs[1][c].clone());
            // The ratio is paired: run by run (both arms timed back to back),
            // then the median, so a slow stretch of the VM moves both sides.
            let ratio = median(
                case_runs[0][c]
                    .iter()
                    .zip(&case_runs[1][c])
                    .map(|(n, o)| n / o)
                    .collect(),
            );
            println!("{name:<48} {new:>9.1} {old:>9.1} {ratio:>9.2}");
            ab_json.push(format!(
                "  {{\"case\": {name:?}, \"new\": {new:.1}, \"old\": {old:.1}, \"ratio\": {ratio:.3}}}"
            ));
        }
        println!(
            "{:<48} {:>9.1} {:>9.1}",
            "empty program (gross, ns/call)",
            median(empty_runs[0].clone()),
            median(empty_runs[1].clone())
        );
        for (what, i) in [
            ("xlated insns", 0),
            ("jited bytes", 1),
            ("verified insns", 2),
        ] {
            let new = program_size(&mut beds[1].h)[i];
            let old = program_size(&mut beds[2].h)[i];
            println!(
                "{:<48} {new:>9} {old:>9} {:>9.2}",
                format!("program: {what}"),
                new as f64 / old as f64
            );
        }
        std::fs::create_dir_all("target/bench")?;
        std::fs::write(
            "target/bench/ab.json",
            format!("[\n{}\n]\n", ab_json.join(",\n")),
        )?;
        println!("wrote target/bench/ab.json");
    }
    // The A/B pair goes; the first bed serves the rest of the bench.
    beds.truncate(1);
    let DataPathBed {
        mut h,
        ack,
        other,
        tcp_backends,
        ..
    } = beds.pop().expect("the new program's bed");
    let _ns = h.enter();
    let lb0 = h.lb0;
    let vip = VIP;
    let empty_runs = empty_runs.swap_remove(0);
    let case_runs: Vec<(&str, Vec<f64>)> = CASES
        .iter()
        .copied()
        .zip(case_runs.swap_remove(0))
        .collect();
    let (xlated, jited, verified) = h.dp.program_size()?;
    for (name, v, unit) in [
        ("program: translated instructions", xlated, "insns"),
        ("program: JIT-compiled size", jited, "bytes"),
        ("program: instructions verified", verified, "insns"),
    ] {
        stats.push(Stat {
            name: name.into(),
            min: v as f64,
            median: v as f64,
            unit,
            note: "balancer as loaded".into(),
        });
    }
    stats.push(summarize(
        "empty XDP program (floor, subtracted)",
        empty_runs,
        "ns/call",
        format!("{calls} calls x {runs} runs"),
    ));
    for (name, runs) in case_runs.into_iter().filter(|(_, r)| !r.is_empty()) {
        stats.push(summarize(
            name,
            runs,
            "ns/packet",
            "net of the floor".into(),
        ));
    }
    if std::env::var_os("LB_BENCH_QUICK").is_some() {
        // Data path only, for quick comparisons while tuning; a warm figure
        // too (repeat mode is exact for a packet the program passes unchanged).
        let empty_warm = {
            let mut e = Vec::new();
            for _ in 0..5 {
                e.push(h.dp.test_run_repeat(&other, 1_000_000)?.as_nanos() as f64);
            }
            e.sort_by(|a, b| a.partial_cmp(b).unwrap());
            e[0]
        };
        println!("non-VIP pass, warm (repeat 1e6, best of 5): {empty_warm:.1} ns gross");
        for s in &stats {
            println!(
                "{:<48} {:>10.2} {:>10.2}  {}",
                s.name, s.min, s.median, s.unit
            );
        }
        return Ok(());
    }

    // Throughput on one core: live frames (BPF_F_TEST_XDP_LIVE_FRAMES), each
    // rewritten from a template by `bench_gen` (the kernel recycles frames
    // without restoring them) and then run through the LB (encapsulate,
    // XDP_TX) or through `pass` (the kernel's own forwarding of the same
    // frames). The far end drops what it receives (natively, which also gives
    // the veth the NAPI path XDP_TX needs) and its counters say how many
    // arrived: the rate counts delivered frames only. Generator, veth and
    // sink costs are the same in both arms, all on the same core.
    h.dp.attach_helper(
        lb_common::maps::PROGRAM_SINK,
        "rt0",
        aya::programs::XdpMode::Driver,
    )?;
    let routed = packets::tcp(
        client(7),
        1234,
        Ipv4Addr::new(10, 50, 0, 9),
        80,
        TcpKind::Ack,
        0,
    );
    let frames = 1_000_000u32;
    let mut lb_pps = Vec::new();
    let mut kernel_pps = Vec::new();
    // Frames counted by the far end's XDP: what was really forwarded (the
    // generator's own count would include frames dropped on the way).
    let mut delivered_share = Vec::new();
    for _ in 0..3 {
        for (program, frame, out) in [
            (lb_common::maps::PROGRAM_BALANCER, &ack[0], &mut lb_pps),
            (lb_common::maps::PROGRAM_PASS, &routed, &mut kernel_pps),
        ] {
            let before = xdp_packets("rt0");
            let t = h.dp.run_live_generated(program, frame, lb0, frames)?;
            // The far end drains its ring asynchronously.
            std::thread::sleep(Duration::from_millis(200));
            let delivered = xdp_packets("rt0") - before;
            delivered_share.push(delivered as f64 / frames as f64);
            out.push(delivered as f64 / t.as_secs_f64() / 1e6);
        }
    }
    let least_delivered = delivered_share.iter().copied().fold(f64::MAX, f64::min);
    anyhow::ensure!(
        least_delivered > 0.99,
        "only {least_delivered:.3} of the generated frames reached the far end"
    );
    let best_and_median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| b.partial_cmp(a).unwrap());
        (v[0], v[v.len() / 2])
    };
    let (lb_best, lb_median) = best_and_median(lb_pps);
    let (k_best, k_median) = best_and_median(kernel_pps);
    let ratio = lb_median / k_median;
    stats.push(Stat {
        name: "throughput: LB (encap + XDP_TX), one core".into(),
        min: lb_best,
        median: lb_median,
        unit: "Mpps",
        note: "delivered frames; generator and sink on the same core".into(),
    });
    stats.push(Stat {
        name: "throughput: kernel forwarding, same frames".into(),
        min: k_best,
        median: k_median,
        unit: "Mpps",
        note: format!("LB / kernel = {ratio:.2}x"),
    });

    // Table change live in the kernel: build M=65537/N=100, write, switch.
    let mut live = Vec::new();
    for round in 0..20u32 {
        let weights: Vec<BackendSpec> = tcp_backends
            .iter()
            .map(|b| BackendSpec {
                weight: 1 + (round + b.id) % 2,
                ..b.clone()
            })
            .collect();
        let key = VipKey::new(IpAddr::V4(vip), 80, PROTO_TCP);
        let old = h.dp.vip(&key).unwrap();
        let t = Instant::now();
        install_vip(
            &mut h.dp,
            &mut h.alloc,
            key,
            vip_meta(1),
            &weights,
            65_537,
            0,
        )?;
        live.push(t.elapsed().as_secs_f64() * 1e3);
        h.alloc.release(old.table_offset, old.table_size);
    }
    stats.push(summarize(
        "table change live in kernel (M=65537, N=100)",
        live,
        "ms",
        "build + write + VIP switch".into(),
    ));
    drop(h);
    stats.push(summarize(
        "failed backend out of the kernel table (lbd)",
        health_failure_removal()?,
        "ms",
        "TCP check every 100 ms, fall 2: target 250 ms".into(),
    ));

    // Connection table at scale: 2^20 entries (one LRU list per CPU, so half
    // are inserted from each CPU), then lookups with the table full.
    let mut big = Harness::with_conntrack(Settings::DEFAULT, 1 << 20);
    big.add_vip(
        VipKey::new(IpAddr::V4(vip), 80, PROTO_TCP),
        1,
        &tcp_backends,
        65_537,
    );
    let flow = |i: u32| {
        (
            Ipv4Addr::from(0x6440_0000u32 + (i >> 6)),
            1024 + (i & 63) as u16,
        )
    }; // 100.64.0.0/10
    let total = 1u32 << 20;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    let mut insert_ns = 0u128;
    for i in 0..total {
        if i % (total / cpus) == 0 {
            pin_to_cpu((i / (total / cpus)) as usize);
        }
        let (src, port) = flow(i);
        let p = packets::tcp(src, port, vip, 80, TcpKind::Syn, 0);
        insert_ns += big.dp.test_run(&p, big.lb0)?.duration.as_nanos();
    }
    let entries = big.dp.conntrack_entries().len();
    let mut lookup_ns = 0u128;
    let lookups = 200_000u32;
    for k in 0..lookups {
        let i = (k.wrapping_mul(2_654_435_761)) % total;
        let (src, port) = flow(i);
        let p = packets::tcp(src, port, vip, 80, TcpKind::Ack, 0);
        lookup_ns += big.dp.test_run(&p, big.lb0)?.duration.as_nanos();
    }
    let memlock = big.dp.conntrack_memlock().unwrap_or(0);
    let ct_empty = per_call(100_000, |_| big.dp.test_run_empty(&ack[0]).unwrap());
    stats.push(Stat {
        name: format!("conntrack: insert {total} flows (SYN), per packet"),
        min: insert_ns as f64 / total as f64 - ct_empty,
        median: insert_ns as f64 / total as f64 - ct_empty,
        unit: "ns/packet",
        note: format!(
            "{entries} entries held; {:.0} MiB kernel memory",
            memlock as f64 / (1 << 20) as f64
        ),
    });
    stats.push(Stat {
        name: "conntrack: tracked ACK, random flow of a full table".into(),
        min: lookup_ns as f64 / lookups as f64 - ct_empty,
        median: lookup_ns as f64 / lookups as f64 - ct_empty,
        unit: "ns/packet",
        note: format!("{lookups} lookups"),
    });
    drop(big);

    // Maglev builds.
    for (m, n) in [
        (65_537u32, 10usize),
        (65_537, 100),
        (65_537, 1000),
        (655_373, 1000),
    ] {
        let b: Vec<MaglevBackend> = (0..n)
            .map(|i| MaglevBackend::new(format!("10.{}.{}.1", i / 250, i % 250), 1))
            .collect();
        let reps = if m > 100_000 { 5 } else { 20 };
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(maglev::build(&b, m, 0).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let reference = {
            let t = Instant::now();
            std::hint::black_box(maglev::build_reference(&b, m, 0).unwrap());
            t.elapsed().as_secs_f64() * 1e3
        };
        stats.push(summarize(
            &format!("Maglev build M={m} N={n}"),
            times,
            "ms",
            format!("straightforward: {reference:.2} ms"),
        ));
    }

    println!(
        "\n{:<48} {:>10} {:>10}  {:<10} note",
        "benchmark", "best", "median", "unit"
    );
    for s in &stats {
        println!(
            "{:<48} {:>10.2} {:>10.2}  {:<10} {}",
            s.name, s.min, s.median, s.unit, s.note
        );
    }
    let json: Vec<String> = stats
        .iter()
        .map(|s| {
            format!(
                "  {{\"name\": {:?}, \"min\": {:.3}, \"median\": {:.3}, \"unit\": {:?}, \"note\": {:?}}}",
                s.name, s.min, s.median, s.unit, s.note
            )
        })
        .collect();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let report = format!(
        "{{\n\"machine\": {{\"cpu\": {:?}, \"cores\": {}}},\n\"results\": [\n{}\n]\n}}\n",
        cpu,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        json.join(",\n")
    );
    std::fs::create_dir_all("target/bench")?;
    std::fs::write("target/bench/report.json", report)?;
    println!("\nwrote target/bench/report.json");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::interquartile_mean;

    #[test]
    fn interquartile_mean_ignores_the_stretched_calls() {
        // Two interrupted calls (900, 1000 ns) and one cut short (1 ns).
        let mut v = vec![100, 1000, 101, 99, 100, 900, 1, 100];
        assert_eq!(interquartile_mean(&mut v), 100.25);
        assert_eq!(interquartile_mean(&mut [7]), 7.0);
    }
}
