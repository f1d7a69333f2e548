//! `cargo xtask bench --scale`: the control plane at fleet size on the
//! real kernel maps (loaded, not attached): lbd's reconciler writing every
//! VIP's table from empty (a cold start's work), then one backend host that
//! serves every VIP failing (every table switched), with the per-packet
//! cost of an unrelated VIP before and after, the process's RSS and the
//! maps' kernel memory. Writes target/bench/scale.json.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::Context;
use lb_common::{PROTO_TCP, maps::VipKey, settings::Settings};
use lb_tests::packets::{self, TcpKind};
use lb_userspace::{
    config::LbConfig,
    dataplane::{Dataplane, LoadOptions},
    reconcile::{BackendState, DesiredBackend, DesiredVip, Reconciler},
    sizing,
};
use serde_json::json;

/// Backend host `j`: the same hosts serve every VIP (172.16.0.0/12).
fn host(j: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        172,
        16 + (j >> 16) as u8,
        (j >> 8) as u8,
        j as u8,
    ))
}

fn vip(i: u32) -> VipKey {
    VipKey::new(
        IpAddr::V4(Ipv4Addr::new(
            10,
            1 + (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8,
        )),
        80,
        PROTO_TCP,
    )
}

/// Backend `j` of VIP `i`: host `j` (every VIP has the same pool), or with
/// `distinct` pools host 0 and 99 others of 9,973, a set no other VIP has.
fn host_of(i: u32, j: u32, distinct: bool) -> IpAddr {
    if !distinct || j == 0 {
        return host(j);
    }
    host(1 + (i * 37 + (j - 1) * 101) % 9973)
}

fn desired(
    vips: u32,
    backends: u32,
    size: u32,
    failed_host: Option<u32>,
    distinct: bool,
) -> Vec<DesiredVip> {
    let mut list: Vec<DesiredVip> = (0..vips)
        .map(|i| DesiredVip {
            key: vip(i),
            name: format!("vip{i}"),
            table_size: size,
            flags: 0,
            backends: (0..backends)
                .map(|j| DesiredBackend {
                    addr: host_of(i, j, distinct),
                    weight: 1,
                    healthy: Some(j) != failed_host,
                    state: BackendState::Active,
                    server_id: None,
                })
                .collect(),
        })
        .collect();
    // One more VIP on other hosts: its packets' cost must not move.
    list.push(DesiredVip {
        key: VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1)), 80, PROTO_TCP),
        name: "unrelated".into(),
        table_size: 65_537,
        flags: 0,
        backends: (0..10)
            .map(|j| DesiredBackend {
                addr: IpAddr::V4(Ipv4Addr::new(10, 50, 0, j as u8 + 1)),
                weight: 1,
                healthy: true,
                state: BackendState::Active,
                server_id: None,
            })
            .collect(),
    });
    list
}

/// The resident memory of process `pid`, MiB.
fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A namespace of its own for a real lbd: the veth `v0` it attaches to,
/// a directory for its config, socket and log, and a pin path, all
/// removed (the pinned state torn down) when dropped.
struct LbdHost {
    ns: lb_tests::netns::NetNs,
    dir: std::path::PathBuf,
    pin: std::path::PathBuf,
}

impl LbdHost {
    fn new(prefix: &str) -> anyhow::Result<LbdHost> {
        let ns = lb_tests::netns::NetNs::new(prefix);
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ns.ip(&["link", "set", "v0", "up"]);
        ns.ip(&["link", "set", "v1", "up"]);
        let dir = std::env::temp_dir().join(&ns.name);
        std::fs::create_dir_all(&dir)?;
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", ns.name));
        Ok(LbdHost { ns, dir, pin })
    }

    /// Writes lbd's config (XDP in skb mode on `v0`; `sizes`: the map-size
    /// lines of `[lb]`; `metrics`: its address or "") and returns the
    /// daemon, not started yet.
    fn lbd(&self, sizes: &str, metrics: &str, vips: &str) -> anyhow::Result<lb_tests::lbd::Lbd> {
        let socket = self.dir.join("lbd.sock");
        let config = self.dir.join("lbd.toml");
        std::fs::write(
            &config,
            format!(
                "[lb]\ninterfaces = [\"v0\"]\nxdp_mode = \"skb\"\n{sizes}pin_path = \"{}\"\n\
                 control_socket = \"{}\"\nmetrics_address = \"{metrics}\"\n\n{vips}",
                self.pin.display(),
                socket.display()
            ),
        )?;
        Ok(lb_tests::lbd::Lbd::unstarted(
            &self.ns, &config, &socket, &self.pin,
        ))
    }
}

impl Drop for LbdHost {
    fn drop(&mut self) {
        let _ = lb_userspace::dataplane::teardown(&self.pin);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Median ns of a tracked ACK to the unrelated VIP, one call per packet.
fn ack_cost(dp: &mut Dataplane) -> f64 {
    let dst = Ipv4Addr::new(10, 250, 0, 1);
    let src = Ipv4Addr::new(192, 0, 2, 9);
    let syn = packets::tcp(src, 40_000, dst, 80, TcpKind::Syn, 0);
    let ack = packets::tcp(src, 40_000, dst, 80, TcpKind::Ack, 0);
    let _ = dp.test_run(&syn, 0);
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let mut total = Duration::ZERO;
            for _ in 0..20_000 {
                total += dp.test_run(&ack, 0).map(|o| o.duration).unwrap_or_default();
            }
            total.as_nanos() as f64 / 20_000.0
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

/// `standby`: as lbd does, the tables a host failure needs are built
/// ahead in the background (timed apart); else the failure builds them.
fn case(
    vips: u32,
    backends: u32,
    size: u32,
    distinct: bool,
    standby: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut lb: LbConfig = lb_userspace::config::Config::parse("[lb]\ninterfaces = [\"lo\"]\n")?.lb;
    lb.max_vips = vips + 16;
    lb.max_backends = vips * backends + 64;
    lb.maglev_slots = (vips as u64 * size as u64 * 2 + 4 * 65_537) as u32;
    let cpus = sizing::possible_cpus();
    let plan = sizing::plan(&lb, cpus);
    let kernel_bytes: u64 = plan.iter().map(|m| m.bytes).sum();
    let started = Instant::now();
    let mut dp = Dataplane::load(&LoadOptions {
        settings: Settings::DEFAULT,
        maglev_slots: lb.maglev_slots,
        conntrack_entries: lb.conntrack_entries,
        max_vips: lb.max_vips,
        max_backends: lb.max_backends,
        pin_path: None,
        object: None,
    })?;
    let load = started.elapsed();
    let mut rec = Reconciler::with_capacity(
        0,
        dp.slot_capacity(),
        (dp.vip_capacity, dp.backend_capacity),
        Duration::from_secs(600),
    );
    let all = desired(vips, backends, size, None, distinct);
    let t = Instant::now();
    rec.apply(&all, &mut dp)?;
    let cold = t.elapsed();
    let rss = rss_of(std::process::id());
    let t = Instant::now();
    if standby {
        rec.build_ahead_for_failures();
        rec.standby().wait_idle(Duration::from_secs(600));
    }
    let standby_s = t.elapsed().as_secs_f64();
    let (standby_tables, standby_values) = rec.standby().ready();
    let used_before = rec.standby().used();
    let before = ack_cost(&mut dp);
    let failed = desired(vips, backends, size, Some(0), distinct);
    let t = Instant::now();
    let report = rec.apply(&failed, &mut dp)?;
    let switch = t.elapsed();
    let from_standby = rec.standby().used() - used_before;
    let after = ack_cost(&mut dp);
    // The host comes back: every table switches again (the memory the
    // first switch freed is reused: the steady state).
    let t = Instant::now();
    let back = rec.apply(&all, &mut dp)?;
    let recovery = t.elapsed();
    let pools = if distinct {
        ", each its own set of hosts"
    } else {
        ", one pool of hosts"
    };
    let name = format!("{vips} VIPs x {backends} backends, M = {size}{pools}");
    println!(
        "{name}: maps loaded in {:.0} ms; every table written from empty in {:.0} ms; \
         standby tables {standby_tables} ({:.1} MiB) ready in {standby_s:.2} s; \
         one host of every VIP failed: {} tables switched in {:.0} ms ({from_standby} from standby), and back in {:.0} ms; tracked ACK of an \
         unrelated VIP {before:.0} -> {after:.0} ns (gross); lbd-side RSS {rss:.0} MiB; maps {:.0} MiB",
        load.as_secs_f64() * 1e3,
        cold.as_secs_f64() * 1e3,
        standby_values as f64 * 4.0 / (1 << 20) as f64,
        report.tables_switched.len(),
        switch.as_secs_f64() * 1e3,
        recovery.as_secs_f64() * 1e3,
        kernel_bytes as f64 / (1 << 20) as f64
    );
    Ok(json!({
        "case": name,
        "vips": vips,
        "backends_per_vip": backends,
        "table_size": size,
        "distinct_pools": distinct,
        "load_ms": load.as_secs_f64() * 1e3,
        "cold_apply_ms": cold.as_secs_f64() * 1e3,
        "standby_ready_s": standby_s,
        "standby_tables": standby_tables,
        "standby_bytes": standby_values * 4,
        "host_failure_switch_ms": switch.as_secs_f64() * 1e3,
        "tables_from_standby": from_standby,
        "tables_switched": report.tables_switched.len(),
        "host_recovery_switch_ms": recovery.as_secs_f64() * 1e3,
        "tables_switched_back": back.tables_switched.len(),
        "unrelated_ack_ns_before": before,
        "unrelated_ack_ns_after": after,
        "rss_mib": rss,
        "kernel_map_bytes": kernel_bytes,
        "maps": plan.iter().map(|m| json!({"map": m.name, "entries": m.entries, "bytes": m.bytes})).collect::<Vec<_>>(),
        "cpus": cpus,
    }))
}

/// lbd's CPU time over `secs` seconds, in % of one core: (user, system)
/// from the clock-tick counts, and the total from every thread's exact
/// run time (`schedstat`, ns: ticks alone vary by a tenth between runs at
/// a few percent of a core).
fn cpu_percent(pid: u32, secs: u64) -> (f64, f64, f64) {
    let ticks = || -> (u64, u64) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state is field 3 of the line, utime 14, stime 15.
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0);
        (field(14), field(15))
    };
    let run_ns = || -> u64 {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (before, ran_before) = (ticks(), run_ns());
    std::thread::sleep(Duration::from_secs(secs));
    let (after, ran_after) = (ticks(), run_ns());
    let pct = |t: u64| t as f64 / hz / secs as f64 * 100.0;
    let total = ran_after.saturating_sub(ran_before) as f64 / 1e9 / secs as f64 * 100.0;
    (pct(after.0 - before.0), pct(after.1 - before.1), total)
}

/// The real lbd health-checking `vips` x `per_vip` backends every second
/// (`kind`: tcp or syn, no tunnel probe) in a namespace of its own, the backend
/// addresses on its `lo` with one listener: with `shared`, every VIP has
/// the same `per_vip` hosts (one probe each however many VIPs), else each
/// VIP its own. Reports lbd's CPU, the probes and checkers it runs, how
/// many backends are up, and how long `lbctl status` and a metrics scrape
/// take at this size.
/// `remote`: the backends live in a namespace of their own behind a veth,
/// their receive work steered to CPU 1 (RPS) and lbd pinned to CPU 0, as
/// backends on other hosts would be; else on lbd's namespace's `lo`, where
/// the backends' TCP work runs in lbd's context and counts as its CPU.
fn health_case(
    vips: u32,
    per_vip: u32,
    shared: bool,
    kind: &str,
    remote: bool,
) -> anyhow::Result<serde_json::Value> {
    use lb_userspace::api::Request;
    let host_ns = LbdHost::new("lbscale-h")?;
    let (ns, dir) = (&host_ns.ns, &host_ns.dir);
    let backend_ns = remote.then(|| lb_tests::netns::NetNs::new("lbscale-b"));
    if let Some(be) = &backend_ns {
        ns.link("hv", "192.168.77.1/30", be, "bv", "192.168.77.2/30");
        ns.ip(&["route", "add", "172.16.0.0/12", "via", "192.168.77.2"]);
        be.sh("echo 2 > /sys/class/net/bv/queues/rx-0/rps_cpus");
        ns.sh("echo 1 > /sys/class/net/hv/queues/rx-0/rps_cpus");
    }
    let backends_in = backend_ns.as_ref().unwrap_or(ns);
    let hosts = if shared { per_vip } else { vips * per_vip };
    let batch: String = (0..hosts)
        .map(|j| format!("addr add {}/32 dev lo\n", host(j)))
        .collect();
    std::fs::write(dir.join("addrs"), batch)?;
    backends_in.sh(&format!("ip -batch {}", dir.join("addrs").display()));
    // One listener for every address: accepts and closes.
    let guard = backends_in.enter();
    let listener = std::net::TcpListener::bind("0.0.0.0:80")?;
    drop(guard);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let size: u32 = if per_vip > 1000 { 131_071 } else { 1009 };
    let vip_toml: String = (0..vips)
        .map(|i| {
            let addr = Ipv4Addr::new(10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            let backends: String = (0..per_vip)
                .map(|j| {
                    let h = if shared { j } else { i * per_vip + j };
                    format!("[[vip.backend]]\naddress = \"{}\"\n", host(h))
                })
                .collect();
            format!(
                "[[vip]]\naddress = \"{addr}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {size}\n\
                 [vip.health]\nkind = \"{kind}\"\ninterval_ms = 1000\ntimeout_ms = 500\ntunnel = false\n{backends}\n"
            )
        })
        .collect();
    let pairs = vips * per_vip;
    let sizes = format!(
        "conntrack_entries = 65536\nmaglev_slots = {}\nmax_vips = {}\nmax_backends = {}\n",
        (2 * vips * size).next_power_of_two(),
        vips.max(16),
        (2 * pairs).next_power_of_two(),
    );
    let mut lbd = host_ns.lbd(&sizes, "127.0.0.1:9641", &vip_toml)?;
    let started = Instant::now();
    lbd.restart();
    let ready = started.elapsed();
    // Every backend starts up (first start); let the probes settle.
    std::thread::sleep(Duration::from_secs(5));
    let pid = lbd.pid().context("lbd's pid")?;
    if remote {
        let pinned = std::process::Command::new("taskset")
            .args(["-a", "-p", "1", &pid.to_string()])
            .output()?;
        anyhow::ensure!(pinned.status.success(), "taskset failed");
        std::thread::sleep(Duration::from_secs(2));
    }
    let cpu = cpu_percent(pid, 30);
    let t = Instant::now();
    let status = lbd.call(Request::Status);
    let status_ms = t.elapsed().as_secs_f64() * 1e3;
    let status_bytes = serde_json::to_string(&status.data)?.len();
    let up: usize = status.data["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|v| v["backends"].as_array().into_iter().flatten())
        .filter(|b| b["healthy"].as_bool() == Some(true))
        .count();
    let scrape = || -> anyhow::Result<(f64, usize)> {
        let _g = ns.enter();
        use std::io::{Read, Write};
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect("127.0.0.1:9641")?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        Ok((t.elapsed().as_secs_f64() * 1e3, body.len()))
    };
    let (scrape_ms, scrape_bytes) = scrape()?;
    let r = json!({
        "case": format!("health ({kind}): {vips} VIPs x {per_vip} backends{}{}", if shared { ", the same hosts" } else { ", distinct hosts" }, if remote { ", backends behind a veth on the other CPU" } else { "" }),
        "backends_remote": remote,
        "backend_hosts": hosts,
        "probes": status.data["health_probes"],
        "checkers": status.data["health_checkers"],
        "backends_up": up,
        "lbd_ready_s": ready.as_secs_f64(),
        "lbd_cpu_percent_of_one_core": cpu.2,
        "lbd_cpu_user_percent": cpu.0,
        "lbd_cpu_system_percent": cpu.1,
        "status_ms": status_ms,
        "status_bytes": status_bytes,
        "scrape_ms": scrape_ms,
        "scrape_bytes": scrape_bytes,
    });
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(r)
}

/// The real lbd with `vips` x `per_vip` backends (M = `size`, no health
/// checks): cold start to ready and its RSS; then `flows` entries written
/// into the pinned connection table, lbd killed (SIGKILL) and started
/// again: time until it answers having adopted the pinned state, every
/// tracked flow still there, the tables unchanged.
fn restart_case(
    vips: u32,
    per_vip: u32,
    size: u32,
    flows: u32,
) -> anyhow::Result<serde_json::Value> {
    use aya::maps::{HashMap, Map, MapData};
    use lb_common::maps::{ConnEntry, FlowKey};
    let host_ns = LbdHost::new("lbscale-r")?;
    let pin = &host_ns.pin;
    let backends: String = (0..per_vip)
        .map(|j| format!("[[vip.backend]]\naddress = \"{}\"\n", host(j)))
        .collect();
    let vip_toml: String = (0..vips)
        .map(|i| {
            let addr = Ipv4Addr::new(10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            format!(
                "[[vip]]\naddress = \"{addr}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {size}\n{backends}\n"
            )
        })
        .collect();
    let sizes = format!(
        "conntrack_entries = {}\nmaglev_slots = {}\nmax_vips = {vips}\nmax_backends = {}\n",
        flows.next_power_of_two(),
        2 * vips as u64 * size as u64,
        (2 * vips * per_vip).next_power_of_two().min(1 << 20),
    );
    let mut lbd = host_ns.lbd(&sizes, "", &vip_toml)?;
    lbd.start_timeout = Duration::from_secs(300);
    let t = Instant::now();
    lbd.restart();
    let cold = t.elapsed().as_secs_f64();
    let rss_cold = rss_of(lbd.pid().context("pid")?);
    // A million tracked flows, written as the data path would: from both
    // CPUs (each CPU's LRU list holds its share of the table).
    let t = Instant::now();
    let cpus = lb_userspace::sizing::possible_cpus().max(1);
    std::thread::scope(|s| {
        for cpu in 0..cpus {
            let path = pin.join("CONNTRACK");
            s.spawn(move || {
                lb_tests::pin_to_cpu(cpu as usize);
                let mut conntrack: HashMap<MapData, FlowKey, ConnEntry> =
                    HashMap::try_from(Map::LruHashMap(MapData::from_pin(path).unwrap())).unwrap();
                for f in (cpu..flows).step_by(cpus as usize) {
                    let client = IpAddr::V4(Ipv4Addr::from(0xC000_0000u32 + f));
                    let v = vip(f % vips);
                    let dst = lb_common::user::ip_from_addr(&v.addr, v.family);
                    let key = FlowKey::new(client, 40_000, dst, 80, PROTO_TCP);
                    let entry = ConnEntry {
                        backend_id: 1 + f % per_vip,
                        hash: 0,
                        atime_ns: 1,
                    };
                    conntrack.insert(key, entry, 0).unwrap();
                }
            });
        }
    });
    let fill = t.elapsed().as_secs_f64();
    let conntrack: HashMap<MapData, FlowKey, ConnEntry> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(pin.join("CONNTRACK"))?))?;
    let tracked = conntrack.keys().filter(|k| k.is_ok()).count();
    let table_before = lbd.kernel_table(&vip(vips / 2));
    lbd.stop(libc::SIGKILL);
    let t = Instant::now();
    lbd.restart();
    let adopt = t.elapsed().as_secs_f64();
    let rss_adopted = rss_of(lbd.pid().context("pid")?);
    let kept = conntrack.keys().filter(|k| k.is_ok()).count();
    let table_kept = lbd.kernel_table(&vip(vips / 2)) == table_before;
    let r = json!({
        "case": format!("restart: {vips} VIPs x {per_vip} backends, M = {size}, {flows} tracked flows"),
        "cold_start_to_ready_s": cold,
        "lbd_rss_mib_cold": rss_cold,
        "flows_written_s": fill,
        "sigkill_restart_to_ready_s": adopt,
        "lbd_rss_mib_adopted": rss_adopted,
        "tracked_flows_before": tracked,
        "tracked_flows_kept": kept,
        "table_unchanged": table_kept,
    });
    println!("{}", serde_json::to_string_pretty(&r)?);
    eprintln!("lbd's log:\n{}", lbd.log());
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    // As lbd does: tables come from the heap, not a fresh mapping each.
    lb_userspace::daemon::keep_tables_on_the_heap();
    let args: Vec<String> = std::env::args().collect();
    let size: u32 = args
        .iter()
        .position(|a| a == "--table-size")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(65_537);
    let only = args
        .iter()
        .position(|a| a == "--case")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_default();
    let mut results = Vec::new();
    // `--no-standby`: the failure builds its tables (no background builds).
    let standby = !args.iter().any(|a| a == "--no-standby");
    if only.is_empty() || only == "many" {
        results.push(case(4096, 100, size, false, standby)?);
    }
    if only.is_empty() || only == "many-distinct" {
        results.push(case(4096, 100, size, true, standby)?);
    }
    if only.is_empty() || only == "wide" {
        results.push(case(16, 10_000, 1_048_573, false, standby)?);
    }
    if only.is_empty() || only == "restart" {
        results.push(restart_case(4096, 100, size, 1_000_000)?);
    }
    if only.is_empty() || only == "health" {
        // Connect probes, then half-open ones, on the same setups
        // (`--kind tcp|syn`: one of them).
        let kind = args
            .iter()
            .position(|a| a == "--kind")
            .and_then(|i| args.get(i + 1).cloned());
        for kind in ["tcp", "syn"]
            .into_iter()
            .filter(|k| kind.as_deref().is_none_or(|want| want == *k))
        {
            // `--remote`: the backends behind a veth, their work on the
            // other CPU.
            let remote = args.iter().any(|a| a == "--remote");
            results.push(health_case(100, 100, false, kind, remote)?);
            results.push(health_case(16, 10_000, true, kind, remote)?);
        }
    }
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/scale.json",
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("wrote target/bench/scale.json");
    Ok(())
}
