//! Running the real `lbd` binary inside a test namespace, and reading the
//! data plane it pinned, for tests of the daemon.

use std::{
    net::{IpAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::maps::{Backend, ConnEntry, FlowKey, SlotPair, VipById, VipKey, VipMeta};
use lb_userspace::api::{Request, Response, call};

use crate::netns::NetNs;

/// `target/<profile>/lbd`: beside a binary of this crate, or one level up
/// from a test binary in `deps/`.
pub fn lbd_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("binary dir");
    let path = if dir.ends_with("deps") {
        dir.parent().expect("target dir").join("lbd")
    } else {
        dir.join("lbd")
    };
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --release -p lb-userspace --bins`; `cargo xtask test` does)",
        path.display()
    );
    path
}

/// `lbctl`, beside `lbd`.
pub fn lbctl_binary() -> PathBuf {
    lbd_binary().with_file_name("lbctl")
}

pub struct Lbd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub pin: PathBuf,
    pub config: PathBuf,
    netns: String,
    /// RLIMIT_NOFILE for the daemon (None: inherited).
    nofile: Option<u64>,
    /// Extra environment for the daemon (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
    /// How long a start may take before the test fails (15 s; more for
    /// the scale benchmarks' gigabytes of maps).
    pub start_timeout: Duration,
}

/// Polls `f` every 20 ms until it holds; fails the test after 5 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `lbd args...` in `ns` to completion (at most 20 s) and returns its
/// exit status and stderr: for starts that must be refused.
pub fn lbd_once(ns: &NetNs, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name))
        .arg(lbd_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lbd {args:?} still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

impl Lbd {
    /// Starts `lbd run` in `ns` with `config` (which must use `pin` and `socket`).
    pub fn start(ns: &NetNs, config: &Path, socket: &Path, pin: &Path) -> Lbd {
        Self::start_limited(ns, config, socket, pin, None)
    }

    /// As `start`, with the daemon's descriptor limit set to `nofile`.
    pub fn start_limited(
        ns: &NetNs,
        config: &Path,
        socket: &Path,
        pin: &Path,
        nofile: Option<u64>,
    ) -> Lbd {
        let mut lbd = Self::unstarted(ns, config, socket, pin);
        lbd.nofile = nofile;
        lbd.spawn();
        lbd
    }

    /// A daemon set up but not started (`restart` starts it), to adjust
    /// `env` first.
    pub fn unstarted(ns: &NetNs, config: &Path, socket: &Path, pin: &Path) -> Lbd {
        Lbd {
            child: None,
            socket: socket.to_path_buf(),
            pin: pin.to_path_buf(),
            config: config.to_path_buf(),
            netns: ns.name.clone(),
            nofile: None,
            env: Vec::new(),
            start_timeout: Duration::from_secs(15),
        }
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        // nsenter keeps the mount namespace (and so /sys/fs/bpf).
        let mut cmd = Command::new("nsenter");
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg(lbd_binary())
            .args(["run", "--stats-interval", "0", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("LB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .expect("starting lbd");
        self.child = Some(child);
        let deadline = Instant::now() + self.start_timeout;
        loop {
            if self.socket.exists() && call(&self.socket, &Request::Status).is_ok_and(|r| r.ok) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("lbd exited during start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "lbd did not answer on {} within {:?}",
                self.socket.display(),
                self.start_timeout
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// lbd's log (stderr, every start appended), beside its config.
    pub fn log_path(&self) -> PathBuf {
        self.config.with_extension("log")
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening lbd's log")
    }

    /// Everything lbd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn call(&self, request: Request) -> Response {
        call(&self.socket, &request).expect("talking to lbd")
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Stops the daemon with `signal` (SIGTERM or SIGKILL) and waits for it.
    pub fn stop(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    /// Starts it (again).
    pub fn restart(&mut self) {
        self.spawn();
    }

    fn map(&self, name: &str) -> MapData {
        MapData::from_pin(self.pin.join(name))
            .unwrap_or_else(|e| panic!("opening pinned {name}: {e}"))
    }

    pub fn kernel_vip(&self, key: &VipKey) -> Option<VipMeta> {
        let m: HashMap<MapData, VipKey, VipMeta> =
            HashMap::try_from(Map::HashMap(self.map("VIPS"))).unwrap();
        m.get(key, 0).ok()
    }

    /// `VIPS_BY_ID[id]` as the kernel has it.
    pub fn kernel_vip_by_id(&self, id: u32) -> VipById {
        let m: Array<MapData, VipById> =
            Array::try_from(Map::Array(self.map("VIPS_BY_ID"))).unwrap();
        m.get(&id, 0).unwrap()
    }

    /// The VIP's table as the kernel has it: slot -> backend address.
    pub fn kernel_table(&self, key: &VipKey) -> Vec<Option<IpAddr>> {
        let meta = self.kernel_vip(key).expect("VIP in the kernel");
        let slots: Array<MapData, SlotPair> =
            Array::try_from(Map::Array(self.map("MAGLEV_SLOTS"))).unwrap();
        let backends: Array<MapData, Backend> =
            Array::try_from(Map::Array(self.map("BACKENDS"))).unwrap();
        let mut names = std::collections::BTreeMap::new();
        (meta.table_offset..meta.table_offset + meta.table_size)
            .map(|s| {
                let id = slots.get(&(s / 2), 0).unwrap()[(s % 2) as usize];
                *names.entry(id).or_insert_with(|| {
                    let b = backends.get(&id, 0).unwrap();
                    (b.flags & lb_common::maps::BACKEND_F_VALID != 0).then(|| b.ip())
                })
            })
            .collect()
    }

    /// Replaces the pinned `MAGLEV_SLOTS` with a map in the layout of an
    /// lbd from before slots were packed two to an element (one u32 per
    /// element), `key`'s table copied into it: what an upgrade finds.
    pub fn repin_slots_one_per_element(&self, key: &VipKey) {
        /// `BPF_F_MMAPABLE`: the old lbd's map was mmapped too.
        const MMAPABLE: u32 = 1 << 10;
        let meta = self.kernel_vip(key).expect("VIP in the kernel");
        let packed: Array<MapData, SlotPair> =
            Array::try_from(Map::Array(self.map("MAGLEV_SLOTS"))).unwrap();
        let mut old = Array::<MapData, u32>::create(packed.len() * 2, MMAPABLE).unwrap();
        for s in meta.table_offset..meta.table_offset + meta.table_size {
            let id = packed.get(&(s / 2), 0).unwrap()[(s % 2) as usize];
            old.set(s, id, 0).unwrap();
        }
        let path = self.pin.join("MAGLEV_SLOTS");
        std::fs::remove_file(&path).unwrap();
        old.pin(&path).unwrap();
    }

    /// Bytes per element of the pinned map `name`.
    pub fn value_size(&self, name: &str) -> u32 {
        self.map(name).info().unwrap().value_size()
    }

    pub fn kernel_conntrack(&self) -> Vec<(FlowKey, ConnEntry)> {
        let m: HashMap<MapData, FlowKey, ConnEntry> =
            HashMap::try_from(Map::LruHashMap(self.map("CONNTRACK"))).unwrap();
        m.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn forwarded(&self) -> u64 {
        let m: aya::maps::PerCpuArray<MapData, lb_common::maps::Counter> =
            aya::maps::PerCpuArray::try_from(Map::PerCpuArray(self.map("REASON_STATS"))).unwrap();
        lb_common::maps::Reason::FORWARDED
            .iter()
            .map(|r| lb_userspace::dataplane::sum_cpus(&m, *r as u32).packets)
            .sum()
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of lbd's log ({}):",
                self.log_path().display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.pin);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A TCP listener for health checks that can be stopped and restarted.
pub struct HealthTarget {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthTarget {
    /// Listens on `addr` inside `ns`, accepting and closing connections.
    pub fn start(ns: &NetNs, addr: &str) -> HealthTarget {
        let _guard = ns.enter();
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HealthTarget {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HealthTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A small bed for daemon tests and benchmarks: client (10.200.0.2) -- l0
/// Where a `Bed`'s lbd serves metrics (in the LB namespace).
pub const METRICS: &str = "127.0.0.1:9641";

/// [lb, lbd's XDP] l1 -- backend (10.50.0.1-3, one namespace).
pub struct Bed {
    pub client: NetNs,
    pub lb: NetNs,
    pub backend: NetNs,
    pub dir: PathBuf,
    pub pin: PathBuf,
}

impl Bed {
    pub fn new(tag: &str) -> Bed {
        let client = NetNs::new(&format!("lbd{tag}-c"));
        let lb = NetNs::new(&format!("lbd{tag}-lb"));
        let backend = NetNs::new(&format!("lbd{tag}-be"));
        lb.link("l0", "10.200.0.1/24", &client, "c0", "10.200.0.2/24");
        lb.link("l1", "10.50.0.254/24", &backend, "b0", "10.50.0.1/24");
        for a in ["10.50.0.2/24", "10.50.0.3/24"] {
            backend.ip(&["addr", "add", a, "dev", "b0"]);
        }
        client.ip(&["route", "add", "default", "via", "10.200.0.1"]);
        lb.sh("sysctl -qw net.ipv4.conf.all.forwarding=1");
        let dir = std::env::temp_dir().join(&lb.name);
        std::fs::create_dir_all(&dir).unwrap();
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", lb.name));
        Bed {
            client,
            lb,
            backend,
            dir,
            pin,
        }
    }

    /// Writes lbd's config (XDP on `l0`, metrics on the LB namespace's
    /// loopback, `METRICS`) with `vips` and returns its path.
    pub fn config(&self, maglev_slots: u32, vips: &str) -> PathBuf {
        let text = format!(
            "[lb]\ninterfaces = [\"l0\"]\nxdp_mode = \"skb\"\nconntrack_entries = 65536\nmaglev_slots = {maglev_slots}\n\
             pin_path = \"{}\"\ncontrol_socket = \"{}\"\nmetrics_address = \"{METRICS}\"\n\n{vips}",
            self.pin.display(),
            self.socket().display()
        );
        let path = self.dir.join("lbd.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("lbd.sock")
    }

    /// One scrape of lbd's metrics: the whole HTTP answer.
    pub fn scrape(&self) -> String {
        let _g = self.lb.enter();
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(METRICS).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    /// Starts lbd in the LB namespace with `config`.
    pub fn start_lbd(&self, config: &Path) -> Lbd {
        Lbd::start(&self.lb, config, &self.socket(), &self.pin)
    }

    /// As `start_lbd`, with at most `nofile` descriptors for the daemon.
    pub fn start_lbd_limited(&self, config: &Path, nofile: u64) -> Lbd {
        Lbd::start_limited(&self.lb, config, &self.socket(), &self.pin, Some(nofile))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bed's three backends as `[[vip.backend]]` entries.
pub fn backends_toml() -> String {
    ["10.50.0.1", "10.50.0.2", "10.50.0.3"]
        .iter()
        .map(|a| format!("[[vip.backend]]\naddress = \"{a}\"\n"))
        .collect()
}
