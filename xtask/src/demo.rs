//! `cargo xtask demo`: a small topology in network namespaces with real
//! traffic: 1 client, 1 ECMP router, 2 LB instances running `lbd`, 3 DSR
//! backends running the decapsulation program and a TCP server. Shows which
//! backend serves how many connections, then takes an LB instance out of
//! the router's ECMP set and puts it back while long-lived connections keep
//! talking to their backends. Everything is torn down at the end (also on
//! error); traffic stays inside the namespaces.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cargo, run};

const VIP: &str = "10.0.0.10";
const LBS: usize = 2;
const BACKENDS: usize = 3;
const LONG_LIVED: usize = 60;
const SHORT: usize = 300;

struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    daemons: Vec<Child>,
    dir: PathBuf,
    /// bpffs directories the LB instances pin their data plane in.
    pins: Vec<PathBuf>,
}

impl Topology {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> Result<String> {
        let full = self.ns(name);
        run(Command::new("ip").args(["netns", "add", &full]))?;
        self.namespaces.push(full.clone());
        ip(&full, "link set lo up")?;
        Ok(full)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            // SAFETY: sending SIGTERM to our own child.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
        }
        for d in &mut self.daemons {
            let _ = d.wait();
        }
        // lbd leaves a pinned data plane forwarding on exit: remove it.
        for pin in &self.pins {
            let _ = std::fs::remove_dir_all(pin);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(ns: &str, args: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns]).args(args.split_whitespace());
    run(cmd.stdout(Stdio::null()))
}

fn sysctl(ns: &str, setting: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", setting]))
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<thread::JoinHandle<T>> {
    let file = File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    Ok(thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd, for this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        f()
    }))
}

/// A TCP server that answers each line with "<name> <line>".
fn serve(name: String) -> Result<()> {
    let listener = TcpListener::bind("0.0.0.0:80")?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let mut writer = stream.try_clone().expect("clone");
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if writeln!(writer, "{name} {line}").is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// One request/response on a connection; returns the backend that answered.
fn ask(conn: &mut (TcpStream, BufReader<TcpStream>), msg: &str) -> Option<String> {
    writeln!(conn.0, "{msg}").ok()?;
    let mut line = String::new();
    conn.1.read_line(&mut line).ok()?;
    line.split_whitespace().next().map(str::to_string)
}

fn connect() -> Option<(TcpStream, BufReader<TcpStream>)> {
    let addr: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let r = BufReader::new(s.try_clone().ok()?);
    Some((s, r))
}

fn print_spread(title: &str, counts: &BTreeMap<String, usize>) {
    println!("\n  {title}");
    let total: usize = counts.values().sum();
    for (backend, n) in counts {
        let bar = "#".repeat(n * 40 / total.max(1));
        println!("    {backend:<6} {n:>4}  {bar}");
    }
}

pub fn demo() -> Result<()> {
    let started = Instant::now();
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "lbd"]))?;
    let lbd = std::env::current_dir()?.join("target/release/lbd");
    let prefix = format!("lbdemo{}", std::process::id());
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir)?;
    let mut t = Topology {
        prefix: prefix.clone(),
        namespaces: Vec::new(),
        daemons: Vec::new(),
        dir: dir.clone(),
        pins: Vec::new(),
    };

    println!(
        "== building the topology: client -- router (ECMP) -- {LBS} LB instances; {BACKENDS} backends"
    );
    let client = t.add_ns("client")?;
    let router = t.add_ns("router")?;
    ip(
        &router,
        &format!("link add rc type veth peer name c0 netns {client}"),
    )?;
    ip(&router, "addr add 10.10.0.1/24 dev rc")?;
    ip(&client, "addr add 10.10.0.2/24 dev c0")?;
    ip(&router, "link set rc up")?;
    ip(&client, "link set c0 up")?;
    ip(&client, "route add default via 10.10.0.1")?;
    sysctl(&router, "net.ipv4.conf.all.forwarding=1")?;
    sysctl(&router, "net.ipv4.fib_multipath_hash_policy=1")?;
    sysctl(&router, "net.ipv4.conf.all.rp_filter=0")?;
    let mut lbs = Vec::new();
    for i in 1..=LBS {
        let lb = t.add_ns(&format!("lb{i}"))?;
        ip(
            &router,
            &format!("link add rl{i} type veth peer name eth0 netns {lb}"),
        )?;
        ip(&router, &format!("addr add 10.20.{i}.1/24 dev rl{i}"))?;
        ip(&router, &format!("link set rl{i} up"))?;
        ip(&lb, &format!("addr add 10.20.{i}.2/24 dev eth0"))?;
        ip(&lb, "link set eth0 up")?;
        ip(&lb, &format!("route add default via 10.20.{i}.1"))?;
        sysctl(&lb, "net.ipv4.conf.all.forwarding=1")?;
        lbs.push(lb);
    }
    let mut backend_addrs = Vec::new();
    for i in 1..=BACKENDS {
        let be = t.add_ns(&format!("be{i}"))?;
        ip(
            &router,
            &format!("link add rb{i} type veth peer name eth0 netns {be}"),
        )?;
        ip(&router, &format!("addr add 10.30.{i}.1/24 dev rb{i}"))?;
        ip(&router, &format!("link set rb{i} up"))?;
        ip(&be, &format!("addr add 10.30.{i}.2/24 dev eth0"))?;
        ip(&be, "link set eth0 up")?;
        ip(&be, &format!("route add default via 10.30.{i}.1"))?;
        ip(&be, &format!("addr add {VIP}/32 dev lo"))?;
        sysctl(&be, "net.ipv4.conf.all.rp_filter=0")?;
        sysctl(&be, "net.ipv4.conf.eth0.rp_filter=0")?;
        t.daemons.push(
            Command::new("ip")
                .args(["netns", "exec", &be])
                .arg(&lbd)
                .args(["backend", "--interface", "eth0", "--xdp-mode", "skb"])
                .stderr(Stdio::null())
                .spawn()?,
        );
        let name = format!("be{i}");
        in_ns(&be, move || serve(name))?;
        backend_addrs.push(format!("10.30.{i}.2"));
    }
    let backends_toml: String = backend_addrs
        .iter()
        .map(|a| format!("\n[[vip.backend]]\naddress = \"{a}\"\nweight = 1\n"))
        .collect();
    for (i, lb) in lbs.iter().enumerate() {
        let pin = PathBuf::from(format!("/sys/fs/bpf/{prefix}-lb{}", i + 1));
        t.pins.push(pin.clone());
        let config = format!(
            "[lb]\ninterfaces = [\"eth0\"]\nxdp_mode = \"skb\"\nconntrack_entries = 65536\nmaglev_slots = 262144\n\
             pin_path = \"{}\"\ncontrol_socket = \"{}\"\n\n\
             [[vip]]\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 65537\n\
             [vip.health]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n{backends_toml}",
            pin.display(),
            dir.join(format!("lb{}.sock", i + 1)).display()
        );
        let config_path = dir.join(format!("lb{}.toml", i + 1));
        std::fs::write(&config_path, config)?;
        // nsenter switches only the network namespace: `ip netns exec`
        // would remount /sys and hide the bpffs at /sys/fs/bpf.
        t.daemons.push(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{lb}"))
                .arg(&lbd)
                .args(["run", "--config"])
                .arg(&config_path)
                .args(["--stats-interval", "0"])
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let nexthops: String = (1..=LBS)
        .map(|i| format!(" nexthop via 10.20.{i}.2"))
        .collect();
    ip(&router, &format!("route add {VIP}/32{nexthops}"))?;
    // Wait until every LB instance has its program attached.
    let deadline = Instant::now() + Duration::from_secs(10);
    for lb in &lbs {
        loop {
            let out = Command::new("ip")
                .args(["-n", lb, "link", "show", "eth0"])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).contains("xdp") {
                break;
            }
            if Instant::now() > deadline {
                bail!("lbd in {lb} did not attach within 10 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 1..=BACKENDS {
        let be = t.ns(&format!("be{i}"));
        while !String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", &be, "link", "show", "eth0"])
                .output()?
                .stdout,
        )
        .contains("xdp")
        {
            if Instant::now() > deadline {
                bail!("decap in {be} did not attach within 10 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    println!(
        "== {LBS} lbd instances and {BACKENDS} backends up; VIP {VIP}:80 routed over both LB instances"
    );

    // Short connections: how new flows spread.
    let short = in_ns(&client, || {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..SHORT {
            if let Some(mut c) = connect()
                && let Some(b) = ask(&mut c, &format!("short {i}"))
            {
                *counts.entry(b).or_default() += 1;
            }
        }
        counts
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    print_spread(&format!("{SHORT} short connections, by backend:"), &short);
    let answered: usize = short.values().sum();
    if answered != SHORT {
        bail!("only {answered} of {SHORT} short connections were answered");
    }

    // Long-lived connections, kept open on one client thread.
    let (tx, rx) = std::sync::mpsc::channel::<(String, std::sync::mpsc::Sender<usize>)>();
    let (spread_tx, spread_rx) = std::sync::mpsc::channel::<BTreeMap<String, usize>>();
    let long_thread = in_ns(&client, move || {
        let mut long = Vec::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..LONG_LIVED {
            let mut c = connect().expect("long-lived connection");
            let b = ask(&mut c, &format!("open {i}")).expect("first answer");
            *counts.entry(b.clone()).or_default() += 1;
            long.push((c, b));
        }
        print_spread(
            &format!("{LONG_LIVED} long-lived connections, by backend:"),
            &counts,
        );
        let _ = spread_tx.send(counts);
        // Each request: ping every connection, report how many answered from their backend.
        while let Ok((label, reply)) = rx.recv() {
            let mut ok = 0;
            for (c, b) in long.iter_mut() {
                if ask(c, &label).as_deref() == Some(b.as_str()) {
                    ok += 1;
                }
            }
            let _ = reply.send(ok);
        }
    })?;
    let ping = |label: &str| -> Result<usize> {
        let (rtx, rrx) = std::sync::mpsc::channel();
        tx.send((label.to_string(), rtx))?;
        Ok(rrx.recv_timeout(Duration::from_secs(30))?)
    };
    let long_spread = spread_rx.recv_timeout(Duration::from_secs(30))?;
    thread::sleep(Duration::from_millis(200));
    let ok = ping("steady")?;
    println!(
        "\n== steady state: {ok}/{LONG_LIVED} long-lived connections answer from their backend"
    );

    println!("== taking LB instance lb1 out of the router's ECMP set");
    ip(&router, &format!("route replace {VIP}/32 via 10.20.2.2"))?;
    let after_leave = ping("after-leave")?;
    println!(
        "   {after_leave}/{LONG_LIVED} long-lived connections survived, each on the same backend"
    );

    println!("== putting lb1 back into the ECMP set");
    ip(&router, &format!("route replace {VIP}/32{nexthops}"))?;
    let after_join = ping("after-join")?;
    println!(
        "   {after_join}/{LONG_LIVED} long-lived connections survived, each on the same backend"
    );

    let on_be3 = long_spread.get("be3").copied().unwrap_or(0);
    println!(
        "== failing backend be3 (its link goes down); health checks: TCP every 200 ms, fall 2"
    );
    let failed_at = Instant::now();
    ip(&t.ns("be3"), "link set eth0 down")?;
    thread::sleep(Duration::from_millis(1000));
    let after_fail = ping("after-fail")?;
    println!(
        "   {after_fail}/{} long-lived connections on the other backends kept working ({on_be3} were on be3)",
        LONG_LIVED - on_be3
    );
    let fresh = in_ns(&client, || {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..100 {
            if let Some(mut c) = connect()
                && let Some(b) = ask(&mut c, &format!("fresh {i}"))
            {
                *counts.entry(b).or_default() += 1;
            }
        }
        counts
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    print_spread(
        &format!(
            "100 new connections {:.1} s after the failure:",
            failed_at.elapsed().as_secs_f64()
        ),
        &fresh,
    );
    drop(tx);
    let _ = long_thread.join();

    println!(
        "\n== tearing down ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    drop(t);
    if after_leave != LONG_LIVED || after_join != LONG_LIVED || ok != LONG_LIVED {
        bail!("some connections broke on an ECMP change");
    }
    if after_fail != LONG_LIVED - on_be3 {
        bail!("connections to healthy backends broke when be3 failed");
    }
    if fresh.values().sum::<usize>() != 100 || fresh.contains_key("be3") {
        bail!("new connections were not all served by healthy backends after be3 failed");
    }
    println!("demo passed: every connection survived both ECMP changes and the backend failure");
    Ok(())
}
