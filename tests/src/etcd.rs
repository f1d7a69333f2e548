//! A real etcd server (Debian's etcd-server) in a namespace of its own,
//! for the fleet-configuration tests, and a client that runs inside a
//! namespace that reaches it.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use lb_userspace::fleet::{EtcdConfig, Snapshot, etcd};

use crate::netns::NetNs;

/// The etcd namespace's address (behind the testbed's router).
pub const ETCD_ADDR: &str = "10.40.0.2";
pub const ETCD_URL: &str = "http://10.40.0.2:2379";

pub struct EtcdServer {
    netns: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd in `ns` (which has `ETCD_ADDR`), its data in `dir`.
    pub fn start(ns: &NetNs, dir: PathBuf) -> EtcdServer {
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = EtcdServer {
            netns: ns.name.clone(),
            data: dir.join("data"),
            log: dir.join("etcd.log"),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(crate::etcd_binary())
            .args(["--name", "t", "--data-dir"])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                ETCD_URL,
                "--advertise-client-urls",
                ETCD_URL,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "t=http://127.0.0.1:2380",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd (`cargo xtask setup` unpacks it)");
        self.child = Some(child);
    }

    /// Kills etcd (its data stays for `start_again`).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The settings the testbed's instances use (prefix `/lbd/`).
pub fn client_config() -> EtcdConfig {
    toml::from_str(&format!("endpoints = [\"{ETCD_URL}\"]\ntimeout_ms = 2000")).unwrap()
}

/// Runs `f` against etcd from inside `ns` (on a thread of its own).
pub fn in_ns<T: Send + 'static, F>(
    ns: &NetNs,
    f: impl FnOnce(EtcdConfig) -> F + Send + 'static,
) -> T
where
    F: Future<Output = T>,
{
    let guard = ns.enter();
    let handle = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f(client_config()))
    });
    drop(guard);
    handle.join().expect("etcd client thread panicked")
}

/// The VIP keys now, read from `ns`.
pub fn read(ns: &NetNs) -> anyhow::Result<Snapshot> {
    in_ns(ns, |cfg| async move { etcd::read_once(&cfg).await })
}

/// Puts `value` at `key` unconditionally (an operator's etcdctl put).
pub fn put(ns: &NetNs, key: &str, value: &str) -> i64 {
    let (key, value) = (key.to_string(), value.to_string());
    in_ns(ns, move |cfg| async move {
        let mut c = etcd::connect(&cfg).await.expect("connect");
        c.put(key, value, None)
            .await
            .expect("put")
            .header()
            .expect("header")
            .revision()
    })
}

impl EtcdServer {
    /// Waits until etcd answers from `ns`.
    pub fn wait_ready(&self, ns: &NetNs) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let Err(e) = read(ns) else { return };
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 20 s: {e:#}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}
