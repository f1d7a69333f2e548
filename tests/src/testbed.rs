//! The end-to-end testbed, as users run the balancer: a client namespace,
//! a router namespace with a multipath route for the VIP over N LB
//! namespaces (L4 hashing, `fib_multipath_hash_policy=1`), each LB running
//! the real `lbd` with XDP on its router-facing veth, and M backend
//! namespaces running the decapsulation program, the VIP on `lo`, and real
//! TCP and UDP servers that answer with their name. Replies go straight back
//! to the client (direct server return). Names are unique per testbed and
//! everything is removed on drop, also when a test panics. All addresses
//! live only inside these namespaces.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_userspace::api::{Request, Response};

use crate::{
    lbd::{Lbd, lbd_binary},
    netns::NetNs,
};

pub const VIP: &str = "10.0.0.10";
/// The IPv6 VIP (every address here is unique-local, inside the namespaces).
pub const VIP6: &str = "fd00::10";
/// Services beyond `VIP:80` (IPv4 backends) and `VIP:53/udp`: port 80 of
/// `VIP6` goes to IPv6 backends (IP6IP6), port 8080 crosses families (4in6
/// for `VIP`, 6in4 for `VIP6`), port 8443 is GUE (IPv4 in IPv4, IPv6 in IPv6).
pub const PORT_CROSS_FAMILY: u16 = 8080;
pub const PORT_GUE: u16 = 8443;
/// Every TCP service as (address, port).
pub fn services() -> Vec<SocketAddr> {
    [VIP, VIP6]
        .into_iter()
        .flat_map(|a| {
            [80, PORT_CROSS_FAMILY, PORT_GUE].map(|p| SocketAddr::new(a.parse().unwrap(), p))
        })
        .collect()
}

pub struct Spec {
    pub lbs: usize,
    /// Weight of each backend.
    pub weights: Vec<u32>,
    /// TCP health check every `interval_ms`, `fall` failures to go down.
    pub health_interval_ms: u64,
    pub health_fall: u32,
    /// The router learns the VIP over BGP from a BIRD beside each lbd
    /// (instead of a static multipath route).
    pub bgp: bool,
    /// lbd's `xdp_mode` ("skb", "driver" or "auto"). Native ("driver") on a
    /// veth needs what a real NIC gives: complete checksums from the client
    /// (its TX checksum offload off) and an XDP program on the router's
    /// side of each LB link (the peer of an XDP_TX), both set up here.
    /// The backends' decapsulation runs in the same mode.
    pub xdp_mode: &'static str,
    /// A QUIC VIP (`VIP:443/udp`) served by quinn on every backend.
    pub quic: Option<QuicVip>,
    /// An etcd server in its own namespace; `VIP:80/tcp` lives in it (the
    /// other VIPs in each instance's file), and every instance follows it.
    pub etcd: bool,
    /// `[etcd] health` ("local" or "fleet").
    pub fleet_health: &'static str,
}

/// `VIP:443/udp` with QUIC-LB parameters `QuicLbConfig::default()`; each
/// backend's server issues connection IDs carrying server id `n` (be`n`).
#[derive(Clone, Copy)]
pub struct QuicVip {
    /// `quic = true` (routing by server id) or a plain UDP VIP.
    pub routing: bool,
    /// How many of the backends (the first ones) the VIP lists at start.
    pub backends: usize,
}

/// The QUIC VIP's port.
pub const PORT_QUIC: u16 = 443;

impl Default for Spec {
    fn default() -> Self {
        Spec {
            lbs: 2,
            weights: vec![1, 1, 1],
            health_interval_ms: 200,
            health_fall: 2,
            bgp: false,
            xdp_mode: default_xdp_mode(),
            quic: None,
            etcd: false,
            fleet_health: "local",
        }
    }
}

/// "skb", or the mode named by `LB_TEST_XDP_MODE` (driver, auto), so the
/// whole suite can run in another mode.
fn default_xdp_mode() -> &'static str {
    match std::env::var("LB_TEST_XDP_MODE").as_deref() {
        Ok("driver") | Ok("native") => "driver",
        Ok("auto") => "auto",
        _ => "skb",
    }
}

/// Adds an IPv6 address without duplicate address detection (usable at once).
fn add6(ns: &NetNs, dev: &str, addr: &str) {
    ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
}

/// A dual-stack link from the router to `ns`: the router is `.1` of
/// `<net4>.0/24` and `<net6>::1/64`, `ns` is `.2` / `::2` with its default
/// routes of both families via the router.
fn uplink(router: &NetNs, router_if: &str, ns: &NetNs, ns_if: &str, net4: &str, net6: &str) {
    router.link(
        router_if,
        &format!("{net4}.1/24"),
        ns,
        ns_if,
        &format!("{net4}.2/24"),
    );
    add6(router, router_if, &format!("{net6}::1/64"));
    add6(ns, ns_if, &format!("{net6}::2/64"));
    ns.ip(&["route", "add", "default", "via", &format!("{net4}.1")]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("{net6}::1"),
    ]);
}

/// BGP hold time in the testbed's BIRD configs (seconds).
pub const BGP_HOLD_TIME: u64 = 3;

fn start_bird(ns: &NetNs, config: &Path, socket: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(config)
            .arg("-s")
            .arg(socket)
            .arg("-P")
            .arg(socket.with_extension("pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting bird (apt-get install bird2)"),
    )
}

/// A backend's servers; `stop` closes the listener and every connection.
struct Servers {
    stop: Arc<AtomicBool>,
}

pub struct Testbed {
    pub client: NetNs,
    pub router: NetNs,
    pub lbs: Vec<NetNs>,
    pub backends: Vec<NetNs>,
    pub lbds: Vec<Lbd>,
    decaps: Vec<KillOnDrop>,
    /// The backends' pinned decap directories (removed on drop).
    _pins: PinnedDirs,
    /// BIRD daemons: the router's first, then one per LB (BGP testbeds).
    birds: Vec<KillOnDrop>,
    servers: Vec<Servers>,
    dir: PathBuf,
    pub spec: Spec,
    /// Native mode: the pass program on the router's LB links.
    peer_xdp: Option<lb_userspace::dataplane::Dataplane>,
    /// The QUIC servers' certificate (clients trust it).
    pub quic_cert: Option<crate::quic::TestCert>,
    /// etcd's namespace and server (`Spec::etcd`).
    pub etcd: Option<(NetNs, crate::etcd::EtcdServer)>,
}

/// Writes the VIP of a `[[vip]]` section to etcd (through `router`, which
/// reaches it), as an operator would.
fn put_vip(router: &NetNs, section: &str) {
    let config = format!("[lb]\ninterfaces = [\"eth0\"]\n{section}");
    let config = lb_userspace::config::Config::parse(&config).expect("a valid VIP");
    let vip = &config.vips[0];
    crate::etcd::put(
        router,
        &crate::etcd::client_config().vip_key(&vip.name()),
        &lb_userspace::fleet::vip_value(vip),
    );
}

fn nexthops(active: &[usize]) -> String {
    active
        .iter()
        .map(|i| format!(" nexthop via 10.20.{}.2", i + 1))
        .collect()
}

/// Serves TCP (answers each line with "<name> <line>") on ports 80, 8080
/// and 8443 of both families and UDP (answers each datagram with "<name>")
/// on the VIP inside the current namespace.
/// Open connections by number, so that `stop` can reset them; each one
/// leaves when it closes (health checks open several a second).
type OpenConns = Arc<Mutex<BTreeMap<u64, TcpStream>>>;

fn serve(name: String, stop: Arc<AtomicBool>, conns: OpenConns) {
    let mut next_id = 0u64;
    // [::] also accepts IPv4 (bindv6only is 0).
    let listeners: Vec<TcpListener> = [80, PORT_CROSS_FAMILY, PORT_GUE]
        .iter()
        .map(|p| {
            let l = TcpListener::bind(format!("[::]:{p}")).expect("bind TCP");
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let udp = UdpSocket::bind(format!("{VIP}:53")).expect("bind :53");
    udp.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listeners.iter().find_map(|l| l.accept().ok()).ok_or(()) {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                let _ = stream.set_nodelay(true);
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                next_id += 1;
                let id = next_id;
                conns.lock().unwrap().insert(id, clone);
                let name = name.clone();
                let conns = conns.clone();
                thread::spawn(move || {
                    if let Ok(mut writer) = stream.try_clone() {
                        for line in BufReader::new(stream).lines() {
                            let Ok(line) = line else { break };
                            // One write per answer (several small ones meet
                            // Nagle and delayed ACKs: 40 ms each).
                            if writer
                                .write_all(format!("{name} {line}\n").as_bytes())
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                    conns.lock().unwrap().remove(&id);
                });
            }
            Err(_) => {
                let mut buf = [0u8; 64];
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(name.as_bytes(), from);
                }
            }
        }
    }
    for (_, c) in std::mem::take(&mut *conns.lock().unwrap()) {
        let _ = c.shutdown(Shutdown::Both);
    }
}

impl Testbed {
    pub fn new(tag: &str, spec: Spec) -> Testbed {
        let client = NetNs::new(&format!("{tag}-cl"));
        let router = NetNs::new(&format!("{tag}-rt"));
        let dir = std::env::temp_dir().join(&router.name);
        std::fs::create_dir_all(&dir).unwrap();
        uplink(&router, "rc", &client, "c0", "10.10.0", "fd00:10");
        router.sh(
            "sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv4.fib_multipath_hash_policy=1 \
             net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
             net.ipv6.conf.all.forwarding=1 net.ipv6.fib_multipath_hash_policy=1",
        );
        let mut backends = Vec::new();
        // Declared before the decaps: dropped after them, also when the
        // testbed panics half-built (the decap links are pinned).
        let mut pins = PinnedDirs(Vec::new());
        let mut decaps = Vec::new();
        let mut servers = Vec::new();
        let quic_cert = spec.quic.map(|_| crate::quic::TestCert::new());
        for (j, _) in spec.weights.iter().enumerate() {
            let n = j + 1;
            let be = NetNs::new(&format!("{tag}-be{n}"));
            uplink(
                &router,
                &format!("rb{n}"),
                &be,
                "eth0",
                &format!("10.30.{n}"),
                &format!("fd00:30:{n}"),
            );
            be.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
            be.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{VIP6}/128"),
                "dev",
                "lo",
                "nodad",
            ]);
            be.sh("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0");
            pins.0
                .push(PathBuf::from(format!("/sys/fs/bpf/{}", be.name)));
            decaps.push(KillOnDrop(
                Command::new("nsenter")
                    .arg(format!("--net=/var/run/netns/{}", be.name))
                    .arg(lbd_binary())
                    .args([
                        "backend",
                        "--interface",
                        "eth0",
                        "--xdp-mode",
                        spec.xdp_mode,
                    ])
                    .arg("--pin-path")
                    .arg(format!("/sys/fs/bpf/{}", be.name))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("lbd backend"),
            ));
            let stop = Arc::new(AtomicBool::new(false));
            let conns: OpenConns = Arc::default();
            let (s, c, name) = (stop.clone(), conns, format!("be{n}"));
            let guard = be.enter();
            if let Some(cert) = &quic_cert {
                let (name, stop, cert) = (format!("be{n}"), stop.clone(), cert.clone());
                let addr = SocketAddr::new(VIP.parse().unwrap(), PORT_QUIC);
                let params = lb_userspace::config::QuicLbConfig::default().params();
                thread::spawn(move || crate::quic::serve(name, addr, params, n as u32, cert, stop));
            }
            thread::spawn(move || serve(name, s, c));
            drop(guard);
            servers.push(Servers { stop });
            backends.push(be);
        }
        let backends_of = |v6: bool| -> String {
            spec.weights
                .iter()
                .enumerate()
                .map(|(j, w)| {
                    let n = j + 1;
                    let a = if v6 {
                        format!("fd00:30:{n}::2")
                    } else {
                        format!("10.30.{n}.2")
                    };
                    format!("[[vip.backend]]\naddress = \"{a}\"\nweight = {w}\n")
                })
                .collect()
        };
        let backends_toml = backends_of(false);
        let backends6_toml = backends_of(true);
        let quic_toml = spec.quic.map_or(String::new(), |q| {
            let list: String = (1..=q.backends)
                .map(|n| {
                    let sid = if q.routing {
                        format!("server_id = {n}\n")
                    } else {
                        String::new()
                    };
                    format!("[[vip.backend]]\naddress = \"10.30.{n}.2\"\n{sid}")
                })
                .collect();
            format!(
                "\n[[vip]]\naddress = \"{VIP}\"\nport = {PORT_QUIC}\nprotocol = \"udp\"\ntable_size = 4099\nquic = {}\n{list}",
                q.routing
            )
        });
        let etcd = spec.etcd.then(|| {
            let ns = NetNs::new(&format!("{tag}-et"));
            uplink(&router, "re", &ns, "eth0", "10.40.0", "fd00:40");
            let server = crate::etcd::EtcdServer::start(&ns, dir.join("etcd"));
            server.wait_ready(&router);
            (ns, server)
        });
        let mut lbs = Vec::new();
        let mut lbds = Vec::new();
        let mut birds = Vec::new();
        if spec.bgp {
            let neighbors: String = (1..=spec.lbs)
                .map(|i| {
                    format!("protocol bgp lb{i} from lb {{ neighbor 10.20.{i}.2 as 65001; }}\n")
                })
                .collect();
            let conf = dir.join("router-bird.conf");
            std::fs::write(
                &conf,
                format!(
                    "router id 10.10.0.1;\nprotocol device {{}}\n\
                     protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
                     template bgp lb {{ local as 65000; ipv4 {{ import all; export none; }}; \
                     hold time {BGP_HOLD_TIME}; connect retry time 1; }}\n{neighbors}"
                ),
            )
            .unwrap();
            birds.push(start_bird(&router, &conf, &dir.join("router-bird.ctl")));
        }
        for i in 1..=spec.lbs {
            let lb = NetNs::new(&format!("{tag}-lb{i}"));
            uplink(
                &router,
                &format!("rl{i}"),
                &lb,
                "eth0",
                &format!("10.20.{i}"),
                &format!("fd00:20:{i}"),
            );
            // bpf_fib_lookup answers only for interfaces that forward.
            lb.sh("sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv6.conf.all.forwarding=1");
            let pin = PathBuf::from(format!("/sys/fs/bpf/{}", lb.name));
            let socket = dir.join(format!("lb{i}.sock"));
            let config = dir.join(format!("lb{i}.toml"));
            let mut bgp_toml = String::new();
            if spec.bgp {
                let routes = dir.join(format!("lb{i}-vips.conf"));
                std::fs::write(&routes, "protocol static lbd_vips { ipv4; }\n").unwrap();
                let conf = dir.join(format!("lb{i}-bird.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "router id 10.20.{i}.2;\nprotocol device {{}}\ninclude \"{}\";\n\
                         protocol bgp uplink {{ local as 65001; neighbor 10.20.{i}.1 as 65000; \
                         ipv4 {{ import none; export where proto = \"lbd_vips\"; }}; \
                         hold time {BGP_HOLD_TIME}; connect retry time 1; }}\n",
                        routes.display()
                    ),
                )
                .unwrap();
                let ctl = dir.join(format!("lb{i}-bird.ctl"));
                birds.push(start_bird(&lb, &conf, &ctl));
                bgp_toml = format!(
                    "[bgp]\nbird_socket = \"{}\"\nroutes_file = \"{}\"\n\n",
                    ctl.display(),
                    routes.display()
                );
            }
            let (interval, timeout, fall) = (
                spec.health_interval_ms,
                spec.health_interval_ms / 2,
                spec.health_fall,
            );
            let health = format!(
                "[vip.health]\nkind = \"tcp\"\ninterval_ms = {interval}\ntimeout_ms = {timeout}\nrise = 2\nfall = {fall}\n"
            );
            // The IPv6 VIP's backends get half-open probes: both kinds run
            // in every end-to-end test.
            let health_syn = health.replace("kind = \"tcp\"", "kind = \"syn\"");
            let vip80 = format!(
                "[[vip]]\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 65537\n{health}{backends_toml}\n"
            );
            // With etcd, VIP:80/tcp is the fleet's (in etcd), the others the file's.
            let (vip80_in_file, etcd_toml) = match &etcd {
                Some(_) => {
                    if i == 1 {
                        put_vip(&router, &vip80);
                    }
                    (
                        String::new(),
                        format!(
                            "[etcd]\nendpoints = [\"{}\"]\nstate_file = \"{}\"\ninstance = \"lb{i}\"\nhealth = \"{}\"\n\n",
                            crate::etcd::ETCD_URL,
                            dir.join(format!("lb{i}-etcd.json")).display(),
                            spec.fleet_health,
                        ),
                    )
                }
                None => (vip80, String::new()),
            };
            let xdp_mode = spec.xdp_mode;
            // Fleet testbeds scrape each instance (its own loopback).
            let metrics = if spec.etcd { crate::lbd::METRICS } else { "" };
            std::fs::write(
                &config,
                format!(
                    "[lb]\ninterfaces = [\"eth0\"]\nxdp_mode = \"{xdp_mode}\"\nconntrack_entries = 65536\nmaglev_slots = 524288\n\
                     pin_path = \"{}\"\ncontrol_socket = \"{}\"\nmetrics_address = \"{metrics}\"\n\n{bgp_toml}{etcd_toml}\
                     {vip80_in_file}\
                     [[vip]]\naddress = \"{VIP}\"\nport = 53\nprotocol = \"udp\"\ntable_size = 65537\n{backends_toml}\n\
                     [[vip]]\naddress = \"{VIP6}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 4099\n\
                     {health_syn}{backends6_toml}\n\
                     [[vip]]\naddress = \"{VIP}\"\nport = {PORT_CROSS_FAMILY}\nprotocol = \"tcp\"\ntable_size = 4099\n{backends6_toml}\n\
                     [[vip]]\naddress = \"{VIP6}\"\nport = {PORT_CROSS_FAMILY}\nprotocol = \"tcp\"\ntable_size = 4099\n{backends_toml}\n\
                     [[vip]]\naddress = \"{VIP}\"\nport = {PORT_GUE}\nprotocol = \"tcp\"\ntable_size = 4099\nencap = \"gue\"\n{backends_toml}\n\
                     [[vip]]\naddress = \"{VIP6}\"\nport = {PORT_GUE}\nprotocol = \"tcp\"\ntable_size = 4099\nencap = \"gue\"\n{backends6_toml}{quic_toml}",
                    pin.display(),
                    socket.display(),
                ),
            )
            .unwrap();
            lbds.push(Lbd::start(&lb, &config, &socket, &pin));
            lbs.push(lb);
        }
        let peer_xdp = (spec.xdp_mode == "driver").then(|| {
            // What a wire and a real NIC give native XDP: complete checksums
            // (veth would pass the client's partial ones), and a receiver
            // with NAPI for the frames the LB sends back with XDP_TX.
            client.sh("ethtool -K c0 tx off >/dev/null");
            // The LB hosts send TCP too (their kernels reset the SYN-ACKs
            // of tunnel-path probes, toward the VIP, through the LBs).
            for lb in &lbs {
                lb.sh("ethtool -K eth0 tx off >/dev/null");
            }
            let mut dp =
                lb_userspace::dataplane::Dataplane::load(&lb_userspace::dataplane::LoadOptions {
                    maglev_slots: 1024,
                    conntrack_entries: 1024,
                    ..Default::default()
                })
                .expect("loading the pass program");
            let _g = router.enter();
            for i in 1..=spec.lbs {
                dp.attach_pass(&format!("rl{i}"), aya::programs::XdpMode::Driver)
                    .expect("XDP pass on the router's LB links");
            }
            // Backends send second hops back out with XDP_TX too.
            for j in 1..=spec.weights.len() {
                dp.attach_pass(&format!("rb{j}"), aya::programs::XdpMode::Driver)
                    .expect("XDP pass on the router's backend links");
            }
            dp
        });
        let tb = Testbed {
            etcd,
            quic_cert,
            peer_xdp,
            client,
            router,
            lbs,
            backends,
            lbds,
            decaps,
            _pins: pins,
            birds,
            servers,
            dir,
            spec,
        };
        tb.wait_attached();
        if tb.spec.bgp {
            let all: Vec<usize> = (0..tb.spec.lbs).collect();
            tb.route6("replace", &all);
            let deadline = Instant::now() + Duration::from_secs(20);
            while tb.vip_paths().len() < tb.spec.lbs {
                assert!(
                    Instant::now() < deadline,
                    "router did not learn the VIP from every instance: {:?}",
                    tb.vip_paths()
                );
                thread::sleep(Duration::from_millis(100));
            }
        } else {
            let all: Vec<usize> = (0..tb.spec.lbs).collect();
            tb.route("add", &all);
        }
        tb
    }

    fn wait_attached(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for ns in self.backends.iter().chain(&self.lbs) {
            while !ns.sh("ip link show eth0").contains("xdp") {
                assert!(
                    Instant::now() < deadline,
                    "no XDP program on {} eth0",
                    ns.name
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn route(&self, verb: &str, active: &[usize]) {
        let route = format!("{VIP}/32{}", nexthops(active));
        let args: Vec<&str> = ["route", verb]
            .into_iter()
            .chain(route.split_whitespace())
            .collect();
        self.router.ip(&args);
        self.route6(verb, active);
    }

    /// The IPv6 VIP over the same set (static also in the BGP testbed,
    /// which announces IPv4 only).
    fn route6(&self, verb: &str, active: &[usize]) {
        let hops: String = active
            .iter()
            .map(|i| format!(" nexthop via fd00:20:{}::2", i + 1))
            .collect();
        let route = format!("{VIP6}/128{hops}");
        let verb6 = if verb == "add" { "replace" } else { verb };
        let args: Vec<&str> = ["-6", "route", verb6]
            .into_iter()
            .chain(route.split_whitespace())
            .collect();
        self.router.ip(&args);
    }

    /// The next hops the router's kernel has for the VIP.
    pub fn vip_paths(&self) -> Vec<String> {
        let out = self.router.sh(&format!("ip route show {VIP}/32"));
        out.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect()
    }

    /// Freezes LB `i`'s BIRD (SIGSTOP): its BGP session stays open but
    /// silent, as on a hung host, so the router drops it at the hold time.
    pub fn hang_bird(&mut self, i: usize) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.birds[i + 1].0.id() as i32, libc::SIGSTOP) };
    }

    /// LB `i`'s config file.
    pub fn config_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("lb{}.toml", i + 1))
    }

    /// Rewrites LB `i`'s config file with `f` (a reload or restart applies it).
    pub fn edit_config(&self, i: usize, f: impl Fn(&str) -> String) {
        let path = self.config_path(i);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, f(&text)).unwrap();
    }

    /// Stops LB `i`'s lbd, removes everything it pinned (tables, connection
    /// table, links) and starts it again: an instance that never saw a
    /// packet, knowing only its config file.
    pub fn restart_fresh(&mut self, i: usize) {
        self.lbds[i].stop(libc::SIGTERM);
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", self.lbs[i].name));
        std::fs::remove_dir_all(&pin).unwrap();
        self.lbds[i].restart();
        self.wait_attached();
    }

    /// Routes the VIP over the LB instances `active` (indexes) only.
    pub fn set_ecmp(&self, active: &[usize]) {
        self.route("replace", active);
    }

    pub fn lbctl(&self, lb: usize, request: Request) -> Response {
        self.lbds[lb].call(request)
    }

    /// `birdc <command>` against LB `i`'s BIRD (BGP testbeds).
    pub fn birdc(&self, i: usize, command: &str) -> String {
        let ctl = self.dir.join(format!("lb{}-bird.ctl", i + 1));
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&ctl)
            .args(command.split_whitespace())
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The health LB `lb` reports for backend `addr` of `VIP:80/tcp`
    /// (`None`: not one of its backends).
    pub fn backend_healthy(&self, lb: usize, addr: &str) -> Option<bool> {
        self.lbctl(lb, Request::Status).data["vips"][0]["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == addr)
            .and_then(|b| b["healthy"].as_bool())
    }

    /// Packets counted under reason `name` (`lbctl stats`), all instances.
    pub fn reason_packets(&self, name: &str) -> u64 {
        (0..self.lbds.len())
            .map(|i| {
                self.lbctl(i, Request::Stats).data["reasons"][name]["packets"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Instance 0 leaves the ECMP set, rejoins, then takes all traffic:
    /// how many of `held`'s connections answer after each step.
    pub fn ecmp_leave_join_switch(&self, held: &LongLived) -> [usize; 3] {
        let steps: [&[usize]; 3] = [&[1], &[0, 1], &[0]];
        let alive = steps.map(|active| {
            self.set_ecmp(active);
            held.alive()
        });
        eprintln!(
            "survived: leave {}, join {}, switch {}",
            alive[0], alive[1], alive[2]
        );
        alive
    }

    /// Every TCP service answers `n` new connections, spread over every
    /// backend.
    pub fn assert_every_service_answers(&self, n: usize) {
        for addr in services() {
            let counts = self.in_client(move || spread_to(addr, n));
            eprintln!("{addr}: {counts:?}");
            assert_eq!(
                counts.values().sum::<usize>(),
                n,
                "{addr}: every connection answered ({counts:?})"
            );
            assert_eq!(counts.len(), 3, "{addr}: every backend serves: {counts:?}");
        }
    }

    /// Backend `j`'s decap counters (packets per reason), read from its
    /// pinned `DECAP_STATS`.
    pub fn decap_counters(&self, j: usize) -> BTreeMap<&'static str, u64> {
        use lb_common::maps::{Counter, DecapReason};
        let path = format!("/sys/fs/bpf/{}/DECAP_STATS", self.backends[j].name);
        let map = aya::maps::MapData::from_pin(&path).expect("pinned DECAP_STATS");
        let stats: aya::maps::PerCpuArray<_, Counter> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).unwrap();
        DecapReason::ALL
            .iter()
            .map(|r| {
                let n = lb_userspace::dataplane::sum_cpus(&stats, *r as u32).packets;
                (r.name(), n)
            })
            .collect()
    }

    /// Kills backend `j`'s `lbd backend` (SIGKILL); its pinned decap stays.
    pub fn kill_decap(&mut self, j: usize) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.decaps[j].0.id() as i32, libc::SIGKILL) };
        let _ = self.decaps[j].0.wait();
    }

    /// Takes backend `j`'s decap away as an operator would: stops its
    /// `lbd backend`, then `lbd teardown --pin-path` removes the pinned
    /// program; the backend's servers keep running.
    pub fn teardown_decap(&mut self, j: usize) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.decaps[j].0.id() as i32, libc::SIGTERM) };
        let _ = self.decaps[j].0.wait();
        let pin = format!("/sys/fs/bpf/{}", self.backends[j].name);
        let (status, err) =
            crate::lbd::lbd_once(&self.backends[j], &["teardown", "--pin-path", &pin]);
        assert!(status.success(), "lbd teardown: {err}");
        assert!(
            !self.backends[j].sh("ip link show eth0").contains("xdp"),
            "decap detached from be{}",
            j + 1
        );
    }

    /// Stops backend `j`'s servers: new connections are refused, open ones reset.
    pub fn stop_backend(&self, j: usize) {
        self.servers[j].stop.store(true, Ordering::Relaxed);
    }

    /// One scrape of instance `i`'s metrics (fleet testbeds): the body.
    pub fn scrape(&self, i: usize) -> String {
        use std::io::Read;
        let _g = self.lbs[i].enter();
        let mut s = TcpStream::connect(crate::lbd::METRICS).expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let guard = self.client.enter();
        let handle = thread::spawn(f);
        drop(guard);
        handle.join().expect("client thread panicked")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for s in &self.servers {
            s.stop.store(true, Ordering::Relaxed);
        }
        self.lbds.clear();
        self.decaps.clear();
        // The decap links are pinned (they outlive `lbd backend`).
        for be in &self.backends {
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{}", be.name));
        }
        self.peer_xdp = None;
        for b in &mut self.birds {
            // SIGKILL also ends a stopped (hung) BIRD.
            let _ = b.0.kill();
        }
        self.birds.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// bpffs directories removed when dropped.
struct PinnedDirs(Vec<PathBuf>);

impl Drop for PinnedDirs {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A child process stopped (SIGTERM) and reaped when dropped, also when a
/// test panics half-way through building the testbed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A TCP connection to the VIP that asks its backend's name.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    pub backend: String,
}

impl Conn {
    /// Connects to `VIP:80` (from the calling thread's namespace) and
    /// learns the backend.
    pub fn open() -> Option<Conn> {
        Self::open_to(format!("{VIP}:80").parse().unwrap())
    }

    /// Connects to `addr` and learns the backend.
    pub fn open_to(addr: SocketAddr) -> Option<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.set_nodelay(true).ok()?;
        let reader = BufReader::new(stream.try_clone().ok()?);
        let mut c = Conn {
            stream,
            reader,
            backend: String::new(),
        };
        c.backend = c.ask("hello")?;
        Some(c)
    }

    /// One request/response; the name of the backend that answered.
    pub fn ask(&mut self, msg: &str) -> Option<String> {
        self.stream.write_all(format!("{msg}\n").as_bytes()).ok()?;
        let mut line = String::new();
        self.reader.read_line(&mut line).ok()?;
        line.split_whitespace().next().map(str::to_string)
    }

    /// True if the connection still answers from the same backend.
    pub fn alive(&mut self) -> bool {
        let b = self.backend.clone();
        self.ask("ping").as_deref() == Some(b.as_str())
    }
}

/// Per backend: (connections answering, connections).
pub type Liveness = BTreeMap<String, (usize, usize)>;

/// Long-lived connections held open on one client thread for a whole test;
/// `check` pings every one and reports who still answers.
pub struct LongLived {
    requests: Option<std::sync::mpsc::Sender<std::sync::mpsc::Sender<Liveness>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LongLived {
    /// Pings every connection; per backend, how many answered from it.
    pub fn check(&self) -> Liveness {
        let (tx, rx) = std::sync::mpsc::channel();
        self.requests
            .as_ref()
            .expect("open")
            .send(tx)
            .expect("holder thread alive");
        rx.recv_timeout(Duration::from_secs(60))
            .expect("holder thread answers")
    }

    /// How many connections answered from their backend.
    pub fn alive(&self) -> usize {
        self.check().values().map(|v| v.0).sum()
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Testbed {
    /// Opens `n` connections to `VIP:80` from the client and keeps them open.
    pub fn hold_connections(&self, n: usize) -> LongLived {
        self.hold_connections_to(&[format!("{VIP}:80").parse().unwrap()], n)
    }

    /// Opens `n` connections to each of `services` and keeps them open.
    pub fn hold_connections_to(&self, services: &[SocketAddr], n: usize) -> LongLived {
        // Clients and servers both live in this process: about five
        // descriptors per connection.
        raise_fd_limit(16 * 1024);
        let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<Liveness>>();
        let guard = self.client.enter();
        let services = services.to_vec();
        let thread = thread::spawn(move || {
            let mut conns: Vec<Conn> = services
                .iter()
                .flat_map(|a| (0..n).map(move |_| *a))
                .map(|a| Conn::open_to(a).unwrap_or_else(|| panic!("connection to {a}")))
                .collect();
            while let Ok(reply) = rx.recv() {
                let mut by_backend = Liveness::new();
                for c in conns.iter_mut() {
                    let ok = c.alive();
                    let e = by_backend.entry(c.backend.clone()).or_default();
                    e.0 += ok as usize;
                    e.1 += 1;
                }
                let _ = reply.send(by_backend);
            }
        });
        drop(guard);
        let held = LongLived {
            requests: Some(tx),
            thread: Some(thread),
        };
        held.check(); // every connection is open from here on
        held
    }
}

/// Raises this process's descriptor limit to `n` (at most the hard limit).
fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Opens `n` short connections and counts answers per backend.
pub fn spread(n: usize) -> BTreeMap<String, usize> {
    spread_to(format!("{VIP}:80").parse().unwrap(), n)
}

/// `spread` for the service at `addr`.
pub fn spread_to(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        if let Some(c) = Conn::open_to(addr) {
            *counts.entry(c.backend).or_default() += 1;
        }
    }
    counts
}

/// One UDP datagram from `sport` to the VIP; the backend that answered.
pub fn udp_ask(socket: &UdpSocket) -> Option<String> {
    socket.send_to(b"?", format!("{VIP}:53")).ok()?;
    let mut buf = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}
