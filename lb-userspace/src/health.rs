//! Active health checks: TCP connect or HTTP GET, each with interval,
//! timeout, rise and fall. Checkers only send events; the daemon's
//! reconciler decides and writes maps.
//!
//! The service probe goes straight to the backend's address; with `tunnel`
//! (the default) a second probe takes the way client packets take
//! (`tunnel_probe`): encapsulated to the backend, answered from the VIP.
//! A backend is up only while both succeed.
//!
//! The direct probe depends only on (address, port, check): one prober per
//! distinct `ProbeKey` runs however many VIPs share the backend, and each
//! (VIP, backend) checker hears its results (then runs its own tunnel
//! probe, which depends on the VIP, and its own rise/fall).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_common::maps::VipKey;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

/// How a VIP's backends are checked (`[vip.health]` in the config).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// "tcp" (connect), "syn" (half-open: SYN, SYN-ACK, reset; the
    /// cheapest at thousands of backends), "http" or "none".
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Port to probe; defaults to the VIP's port.
    pub port: Option<u16>,
    /// HTTP path.
    #[serde(default = "default_path")]
    pub path: String,
    /// Expected HTTP status; 0 = any 2xx.
    #[serde(default)]
    pub expect_status: u16,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a failed backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a backend out.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Also probe through the tunnel: a TCP SYN to the VIP encapsulated as
    /// client traffic is, which only a working decap, the VIP on `lo` and
    /// the way back can answer. Needs CAP_NET_RAW; off for backends that
    /// are not reached through the balancer's encapsulation.
    #[serde(default = "default_tunnel")]
    pub tunnel: bool,
}

fn default_tunnel() -> bool {
    true
}

fn default_kind() -> String {
    "none".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_interval() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: default_kind(),
            port: None,
            path: default_path(),
            expect_status: 0,
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            tunnel: default_tunnel(),
        }
    }
}

/// Rise/fall hysteresis: one lost probe does not flap a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    pub healthy: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Hysteresis {
    /// Starts healthy: a restarted daemon must not pull working backends
    /// out of the table while its first probes are in flight.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self::starting(true, rise, fall)
    }

    /// Starts in `healthy` (a backend added at runtime starts down).
    pub fn starting(healthy: bool, rise: u32, fall: u32) -> Self {
        Hysteresis {
            healthy,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Records one probe result; returns the new state on a transition.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { self.fall } else { self.rise };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// A backend changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub vip: VipKey,
    pub backend: IpAddr,
    pub healthy: bool,
    /// A probe failed on this host; `healthy` is the unchanged state.
    pub local_error: bool,
}

/// A checker logs its local probe failures at most this often.
const LOCAL_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// One probe's outcome. `Local` is a failure of this host (no descriptor,
/// no buffer, no route, no local port): it says nothing about the backend,
/// so it never counts toward taking one out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Up,
    Down(Failure),
    Local(i32),
}

/// Probe outcomes per (VIP, backend, result), for the metrics; shared by
/// every prober. A checker counts in its own entry of its probe's
/// subscriber list, beside its rise/fall state: no atomic and no pointer
/// to follow per outcome (with a counter of its own on the heap, 16 VIPs
/// on one backend were 16 cache misses a round). The tally finds those
/// counts when read, and keeps the counts of checkers that were replaced,
/// so totals only grow.
#[derive(Clone, Default)]
pub struct ProbeTally(Arc<Mutex<TallyMap>>);

/// One checker's counts, by `Probe::RESULTS` index.
pub type ProbeCounts = [u64; Probe::RESULTS.len()];

#[derive(Default)]
struct TallyEntry {
    /// Counted by checkers of this (VIP, backend) that are gone.
    retired: ProbeCounts,
    /// The subscriber list of the probe the current checker follows.
    live: Option<std::sync::Weak<Mutex<Followers>>>,
}

type TallyMap = HashMap<(VipKey, IpAddr), TallyEntry>;

impl std::fmt::Debug for ProbeTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        write!(f, "ProbeTally({n} checkers)")
    }
}

impl ProbeTally {
    /// The checker of `backend` for `vip` now counts in `followers`.
    fn follow(&self, vip: VipKey, backend: IpAddr, followers: &Subscribers) {
        if let Ok(mut m) = self.0.lock() {
            m.entry((vip, backend)).or_default().live = Some(Arc::downgrade(followers));
        }
    }

    /// The checker of `backend` for `vip` stopped, having counted `counts`.
    fn retire(&self, vip: VipKey, backend: IpAddr, counts: &ProbeCounts) {
        if let Ok(mut m) = self.0.lock() {
            let e = m.entry((vip, backend)).or_default();
            for (total, n) in e.retired.iter_mut().zip(counts) {
                *total += n;
            }
            e.live = None;
        }
    }

    /// Counts by result for one backend of one VIP (results seen so far).
    pub fn of(&self, vip: VipKey, backend: IpAddr) -> Vec<(&'static str, u64)> {
        let Some((mut counts, live)) = self.0.lock().ok().and_then(|m| {
            m.get(&(vip, backend))
                .map(|e| (e.retired, e.live.as_ref().and_then(|w| w.upgrade())))
        }) else {
            return Vec::new();
        };
        if let Some(followers) = live
            && let Ok(f) = followers.lock()
            && let Some(now) = f.counts(&vip)
        {
            for (total, n) in counts.iter_mut().zip(now) {
                *total += n;
            }
        }
        Probe::RESULTS
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
            .collect()
    }

    /// Drops the counts of checkers that no longer exist.
    pub fn retain(&self, keep: impl Fn(&(VipKey, IpAddr)) -> bool) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|k, _| keep(k));
        }
    }
}

/// Why a probe counted against the backend (the metrics' `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// Refused, reset or unreachable at the backend.
    Connect,
    /// No answer within the probe's timeout.
    Timeout,
    /// An HTTP answer that was not the expected status (or not HTTP).
    BadResponse,
    /// Direct probe fine, but no SYN-ACK through the tunnel path.
    Tunnel,
}

impl Probe {
    /// Every `result` label of `lb_health_probes_total`, in index order.
    pub const RESULTS: [&'static str; 6] = [
        "up",
        "connect_failed",
        "timeout",
        "bad_response",
        "tunnel_failed",
        "local_error",
    ];

    /// Adds this outcome to a checker's counts.
    pub fn count(&self, counts: &mut ProbeCounts) {
        counts[self.result_index()] = counts[self.result_index()].wrapping_add(1);
    }

    /// Up or down; `None` for a local error (no verdict on the backend).
    fn verdict(&self) -> Option<bool> {
        match self {
            Probe::Up => Some(true),
            Probe::Down(_) => Some(false),
            Probe::Local(_) => None,
        }
    }

    fn result_index(&self) -> usize {
        match self {
            Probe::Up => 0,
            Probe::Down(Failure::Connect) => 1,
            Probe::Down(Failure::Timeout) => 2,
            Probe::Down(Failure::BadResponse) => 3,
            Probe::Down(Failure::Tunnel) => 4,
            Probe::Local(_) => 5,
        }
    }
}

impl Probe {
    fn from_bool(ok: bool) -> Probe {
        if ok {
            Probe::Up
        } else {
            Probe::Down(Failure::BadResponse)
        }
    }
}

/// Errors that come from this host, not from the backend.
pub fn is_local_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::ENETUNREACH
                | libc::EPERM
                | libc::EACCES
        )
    )
}

/// Connects to the backend; a local failure is `Err(Probe::Local)`.
async fn connect(addr: IpAddr, port: u16) -> Result<TcpStream, Probe> {
    let local = |e: std::io::Error| {
        if is_local_error(&e) {
            Probe::Local(e.raw_os_error().unwrap_or(0))
        } else {
            Probe::Down(Failure::Connect)
        }
    };
    let socket = match addr {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| Probe::Local(e.raw_os_error().unwrap_or(0)))?;
    socket.connect((addr, port).into()).await.map_err(local)
}

pub async fn probe_tcp(addr: IpAddr, port: u16, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, connect(addr, port)).await {
        Ok(Ok(stream)) => {
            // Closed with a reset: four packets instead of a FIN exchange
            // (and no TIME_WAIT here) per probe, on both hosts.
            let _ = stream.set_zero_linger();
            Probe::Up
        }
        Ok(Err(p)) => p,
        Err(_) => Probe::Down(Failure::Timeout),
    }
}

/// GET `path` over HTTP/1.0; healthy if the status matches (any 2xx when
/// `expect` is 0). Only the status line is read.
pub async fn probe_http(
    addr: IpAddr,
    port: u16,
    path: &str,
    expect: u16,
    timeout: Duration,
) -> Probe {
    let attempt = async {
        let mut s = connect(addr, port).await?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lbd-health\r\nConnection: close\r\n\r\n",
            host_header(addr)
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|_| Probe::Down(Failure::Connect))?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = s
                .read(&mut buf[n..])
                .await
                .map_err(|_| Probe::Down(Failure::Connect))?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = String::from_utf8_lossy(&buf[..n]);
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(Probe::Down(Failure::BadResponse))?;
        Ok::<u16, Probe>(status)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(status)) => Probe::from_bool(if expect == 0 {
            (200..300).contains(&status)
        } else {
            status == expect
        }),
        Ok(Err(p)) => p,
        Err(_) => Probe::Down(Failure::Timeout),
    }
}

/// The Host header's value for an address: IPv6 in brackets (RFC 7230).
pub fn host_header(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// What makes the direct probes of two checks the same probe: where it
/// goes and how (rise, fall and the tunnel probe are each checker's own).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeKey {
    pub addr: IpAddr,
    pub port: u16,
    pub kind: String,
    pub path: String,
    pub expect_status: u16,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl ProbeKey {
    /// The direct probe of `backend` under `check` for a VIP on `vip_port`.
    pub fn of(backend: IpAddr, vip_port: u16, check: &HealthCheck) -> ProbeKey {
        let http = check.kind == "http";
        ProbeKey {
            addr: backend,
            port: check.port.unwrap_or(vip_port),
            // "tcp" and "syn" probe the same thing in different ways.
            kind: match check.kind.as_str() {
                "http" => "http",
                "syn" => "syn",
                _ => "tcp",
            }
            .into(),
            // Only HTTP probes read these: TCP checks that differ in them
            // still share a probe.
            path: if http {
                check.path.clone()
            } else {
                String::new()
            },
            expect_status: if http { check.expect_status } else { 0 },
            interval_ms: check.interval_ms.max(10),
            timeout_ms: check.timeout_ms,
        }
    }
}

/// One (VIP, backend) pair following a prober: its own rise/fall state
/// and, with `tunnel`, its own probe through the tunnel to its VIP.
struct Subscriber {
    state: Hysteresis,
    /// With a tunnel probe, its own counts; without one, its counts less
    /// its probe's `Followers::rounds` (wrapping), as it sees every round's
    /// outcome as is (see `Followers::counts_of`).
    counts: ProbeCounts,
    /// Boxed: most checks have none, and the list stays small.
    tunnel: Option<Box<crate::tunnel_probe::TunnelSpec>>,
    last_local_log: Option<std::time::Instant>,
}

/// A probe's subscribers: a short list (one per VIP with the backend)
/// kept in one allocation beside the lock, since the probing thread
/// reaches it once a second per backend, from a cold cache.
#[derive(Default)]
struct Followers {
    /// A round with tunnel probes is still completing (the next one
    /// skips, as a late tick would).
    busy: bool,
    /// Every round's direct outcome, counted once for the subscribers
    /// without a tunnel probe.
    rounds: ProbeCounts,
    /// Every subscriber is settled in this state (healthy or not, no
    /// streak): a round with that outcome changes nothing but `rounds`.
    /// 16 VIPs on each of 10,000 backends: a round then touches this list's
    /// head, not 16 entries from a cold cache.
    settled: Option<bool>,
    /// Subscribers with a tunnel probe.
    tunnels: usize,
    /// By VIP.
    list: Vec<(VipKey, Subscriber)>,
}

impl Followers {
    /// Adds or replaces `vip`'s subscriber, its counts starting at its
    /// own (a replaced one's counts carry over).
    fn insert(&mut self, vip: VipKey, mut sub: Subscriber) {
        let found = self.list.binary_search_by(|(v, _)| v.cmp(&vip));
        if let Ok(i) = found {
            sub.counts = self.counts_of(&self.list[i].1);
        }
        if sub.tunnel.is_none() {
            sub.counts = wrapping_diff(&sub.counts, &self.rounds);
        }
        self.tunnels += usize::from(sub.tunnel.is_some());
        self.settled = None;
        match found {
            Ok(i) => {
                let old = std::mem::replace(&mut self.list[i].1, sub);
                self.tunnels -= usize::from(old.tunnel.is_some());
            }
            Err(i) => self.list.insert(i, (vip, sub)),
        }
    }

    /// Takes `vip`'s subscriber out, with its own counts.
    fn remove(&mut self, vip: &VipKey) -> Option<Subscriber> {
        let i = self.list.binary_search_by(|(v, _)| v.cmp(vip)).ok()?;
        let (_, mut sub) = self.list.remove(i);
        self.tunnels -= usize::from(sub.tunnel.is_some());
        sub.counts = self.counts_of(&sub);
        Some(sub)
    }

    /// `vip`'s subscriber's counts.
    fn counts(&self, vip: &VipKey) -> Option<ProbeCounts> {
        let i = self.list.binary_search_by(|(v, _)| v.cmp(vip)).ok()?;
        Some(self.counts_of(&self.list[i].1))
    }

    /// A listed subscriber's counts.
    fn counts_of(&self, sub: &Subscriber) -> ProbeCounts {
        if sub.tunnel.is_some() {
            sub.counts
        } else {
            std::array::from_fn(|k| sub.counts[k].wrapping_add(self.rounds[k]))
        }
    }

    fn any_tunnel(&self) -> bool {
        self.tunnels > 0
    }
}

/// `a - b`, slot by slot, wrapping (`b + result` gives `a` back).
fn wrapping_diff(a: &ProbeCounts, b: &ProbeCounts) -> ProbeCounts {
    std::array::from_fn(|k| a[k].wrapping_sub(b[k]))
}

type Subscribers = Arc<Mutex<Followers>>;

/// A running direct probe and the VIPs that follow it. Each round's
/// result is applied to every subscriber where the probe runs (no task per
/// VIP: 16 VIPs sharing 10,000 backends are 10,000 probes, not 160,000).
pub struct Prober {
    addr: IpAddr,
    subscribers: Subscribers,
    tally: ProbeTally,
    run: Run,
}

/// Where a probe runs: half-open probes on the shared probing thread,
/// the others in a task of their own.
enum Run {
    Task(JoinHandle<()>),
    Scheduled {
        _registration: crate::syn_probe::Registration,
    },
}

/// What a round's outcome goes to: every subscriber of one probe.
#[derive(Clone)]
struct Round {
    addr: IpAddr,
    timeout: Duration,
    subscribers: Subscribers,
    events: mpsc::UnboundedSender<HealthEvent>,
}

impl Round {
    /// The tunnel probes (each to its own VIP) a good direct probe calls
    /// for.
    fn tunnels(&self, probe: Probe) -> Vec<(VipKey, crate::tunnel_probe::TunnelSpec)> {
        if probe != Probe::Up {
            return Vec::new();
        }
        self.subscribers
            .lock()
            .map(|m| {
                m.list
                    .iter()
                    .filter_map(|(v, s)| s.tunnel.as_ref().map(|t| (*v, (**t).clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs the round's tunnel probes, all at once, then applies it.
    async fn complete(&self, probe: Probe) {
        let tunnels = self.tunnels(probe);
        let mut via_tunnel = BTreeMap::new();
        if !tunnels.is_empty() {
            let mut set = tokio::task::JoinSet::new();
            for (vip, spec) in tunnels {
                let timeout = self.timeout;
                set.spawn(
                    async move { (vip, crate::tunnel_probe::probe_tunnel(&spec, timeout).await) },
                );
            }
            while let Some(Ok((vip, p))) = set.join_next().await {
                via_tunnel.insert(vip, p);
            }
        }
        self.apply(probe, &via_tunnel);
    }

    /// Each subscriber's outcome (its tunnel probe's, if it ran one) to
    /// its rise/fall, its counts and, on a change, the events.
    fn apply(&self, probe: Probe, via_tunnel: &BTreeMap<VipKey, Probe>) {
        if let Ok(mut m) = self.subscribers.lock() {
            m.busy = false;
            self.apply_to(&mut m, probe, via_tunnel);
        }
    }

    fn apply_to(
        &self,
        followers: &mut Followers,
        probe: Probe,
        via_tunnel: &BTreeMap<VipKey, Probe>,
    ) {
        probe.count(&mut followers.rounds);
        let verdict = probe.verdict();
        // Steady state: nothing to step (a local error always reports).
        if followers.tunnels == 0 && verdict.is_some() && followers.settled == verdict {
            return;
        }
        let mut settled = verdict;
        for (vip, sub) in followers.list.iter_mut() {
            let own = match &sub.tunnel {
                Some(_) => {
                    let own = via_tunnel.get(vip).copied().unwrap_or(probe);
                    own.count(&mut sub.counts);
                    own
                }
                None => probe,
            };
            if let Some(ev) = sub.observe(*vip, self.addr, own) {
                let _ = self.events.send(ev);
            }
            if Some(sub.state.healthy) != verdict || sub.state.streak != 0 {
                settled = None;
            }
        }
        followers.settled = settled;
    }

    /// For the probing thread: applies a round at once (under one lock)
    /// when no tunnel probe follows, else completes it on `rt`; a round
    /// still completing there makes this one skip, as a late tick would.
    fn sink(self, rt: tokio::runtime::Handle) -> crate::syn_probe::Sink {
        Box::new(move |probe| {
            let Ok(mut m) = self.subscribers.lock() else {
                return;
            };
            if m.busy {
                return;
            }
            if probe != Probe::Up || !m.any_tunnel() {
                self.apply_to(&mut m, probe, &BTreeMap::new());
                return;
            }
            m.busy = true;
            drop(m);
            let round = self.clone();
            rt.spawn(async move { round.complete(probe).await });
        })
    }
}

impl Prober {
    /// Starts probing `key` every `key.interval_ms`; state changes go to
    /// `events`, every outcome to `tally`.
    pub fn spawn(
        key: ProbeKey,
        (events, tally): (mpsc::UnboundedSender<HealthEvent>, ProbeTally),
    ) -> Prober {
        let subscribers: Subscribers = Arc::default();
        let round = Round {
            addr: key.addr,
            timeout: Duration::from_millis(key.timeout_ms),
            subscribers: subscribers.clone(),
            events,
        };
        let period = Duration::from_millis(key.interval_ms);
        // Spread over the interval (a fixed offset per probe): thousands
        // of probes started together would hit the same millisecond every
        // round, a SYN burst backends and this host must absorb.
        let offset = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            Duration::from_millis(h.finish() % key.interval_ms)
        };
        let scheduled = (key.kind == "syn")
            .then(|| {
                let first = std::time::Instant::now() + offset;
                let sink = round.clone().sink(tokio::runtime::Handle::current());
                crate::syn_probe::schedule(
                    key.addr,
                    key.port,
                    (first, Some(period)),
                    round.timeout,
                    sink,
                )
            })
            .flatten();
        let addr = key.addr;
        let run = match scheduled {
            Some(registration) => Run::Scheduled {
                _registration: registration,
            },
            None => Run::Task(tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let timeout = round.timeout;
                    let probe = match key.kind.as_str() {
                        "http" => {
                            probe_http(key.addr, key.port, &key.path, key.expect_status, timeout)
                                .await
                        }
                        // "syn" without raw sockets: a connect.
                        _ => probe_tcp(key.addr, key.port, timeout).await,
                    };
                    round.complete(probe).await;
                }
            })),
        };
        Prober {
            addr,
            subscribers,
            tally,
            run,
        }
    }

    /// Starts following this probe for `vip` (replacing an earlier
    /// subscription of the same VIP).
    pub fn subscribe(
        &self,
        vip: VipKey,
        check: &HealthCheck,
        tunnel: Option<crate::tunnel_probe::TunnelSpec>,
        initially_healthy: bool,
    ) {
        if let Ok(mut m) = self.subscribers.lock() {
            m.insert(
                vip,
                Subscriber {
                    state: Hysteresis::starting(initially_healthy, check.rise, check.fall),
                    counts: ProbeCounts::default(),
                    tunnel: tunnel.map(Box::new),
                    last_local_log: None,
                },
            );
        }
        self.tally.follow(vip, self.addr, &self.subscribers);
    }

    pub fn unsubscribe(&self, vip: &VipKey) {
        let gone = self.subscribers.lock().ok().and_then(|mut m| m.remove(vip));
        if let Some(sub) = gone {
            self.tally.retire(*vip, self.addr, &sub.counts);
        }
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.lock().map_or(0, |m| m.list.len())
    }
}

impl Subscriber {
    /// Applies one outcome; the event to send, if any.
    fn observe(&mut self, vip: VipKey, backend: IpAddr, probe: Probe) -> Option<HealthEvent> {
        let ok = match probe {
            Probe::Up => true,
            Probe::Down(_) => false,
            Probe::Local(errno) => {
                // Not the backend's fault: no verdict, the state stands.
                if self
                    .last_local_log
                    .is_none_or(|t| t.elapsed() > LOCAL_ERROR_LOG_EVERY)
                {
                    self.last_local_log = Some(std::time::Instant::now());
                    tracing::warn!(%backend, error = %std::io::Error::from_raw_os_error(errno),
                        "health probe failed on this host (not counted against the backend)");
                }
                return Some(HealthEvent {
                    vip,
                    backend,
                    healthy: self.state.healthy,
                    local_error: true,
                });
            }
        };
        self.state.observe(ok).map(|healthy| HealthEvent {
            vip,
            backend,
            healthy,
            local_error: false,
        })
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        // A scheduled probe stops when its registration drops.
        if let Run::Task(task) = &self.run {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_bracket_ipv6() {
        assert_eq!(host_header("10.1.0.2".parse().unwrap()), "10.1.0.2");
        assert_eq!(host_header("fd99:3::2".parse().unwrap()), "[fd99:3::2]");
    }

    #[test]
    fn one_lost_probe_does_not_flap() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false), "third failure in a row");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None, "streak reset");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true), "second success in a row");
        assert!(h.healthy);
    }

    /// Rounds applied to a probe's subscribers: settled ones are not
    /// stepped one by one, yet every checker counts every round, changes
    /// state after exactly `fall`/`rise` rounds and reports it once; a
    /// checker with a tunnel probe counts and steps on its own outcome.
    #[test]
    fn rounds_reach_every_checker_settled_or_not() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let followers: Subscribers = Arc::default();
        let round = Round {
            addr: "10.1.0.2".parse().unwrap(),
            timeout: Duration::from_millis(100),
            subscribers: followers.clone(),
            events: tx,
        };
        let vip = |port| VipKey::new("10.0.0.10".parse().unwrap(), port, lb_common::PROTO_TCP);
        let subscriber = |tunnel: bool| Subscriber {
            state: Hysteresis::new(2, 3),
            counts: ProbeCounts::default(),
            tunnel: tunnel.then(|| {
                Box::new(crate::tunnel_probe::TunnelSpec {
                    vip: "10.0.0.10".parse().unwrap(),
                    port: 80,
                    backend: "10.1.0.2".parse().unwrap(),
                    gue: false,
                    gue_port: 0,
                    outer_src4: "10.0.0.1".parse().unwrap(),
                    outer_src6: "::1".parse().unwrap(),
                })
            }),
            last_local_log: None,
        };
        let apply = |probe: Probe, n: usize, tunnel: &BTreeMap<VipKey, Probe>| {
            for _ in 0..n {
                round.apply_to(&mut followers.lock().unwrap(), probe, tunnel);
            }
        };
        let events = |rx: &mut mpsc::UnboundedReceiver<HealthEvent>| {
            let mut got = Vec::new();
            while let Ok(e) = rx.try_recv() {
                got.push((u16::from_be(e.vip.port), e.healthy, e.local_error));
            }
            got
        };
        let counts = |port| followers.lock().unwrap().counts(&vip(port)).unwrap();
        for port in [80, 81] {
            followers
                .lock()
                .unwrap()
                .insert(vip(port), subscriber(false));
        }
        apply(Probe::Up, 5, &BTreeMap::new());
        assert_eq!(followers.lock().unwrap().settled, Some(true));
        assert!(events(&mut rx).is_empty());
        // Down: each checker goes down at the third round, once.
        apply(Probe::Down(Failure::Timeout), 2, &BTreeMap::new());
        assert!(events(&mut rx).is_empty());
        apply(Probe::Down(Failure::Timeout), 4, &BTreeMap::new());
        assert_eq!(events(&mut rx), [(80, false, false), (81, false, false)]);
        assert_eq!(followers.lock().unwrap().settled, Some(false));
        // A checker joining a settled probe is stepped (it starts up).
        followers.lock().unwrap().insert(vip(82), subscriber(false));
        apply(Probe::Down(Failure::Timeout), 3, &BTreeMap::new());
        assert_eq!(events(&mut rx), [(82, false, false)]);
        // A local error reports for each checker, changes no state.
        apply(Probe::Local(libc::ENOBUFS), 1, &BTreeMap::new());
        assert_eq!(
            events(&mut rx),
            [(80, false, true), (81, false, true), (82, false, true)]
        );
        assert_eq!(counts(80), [5, 0, 9, 0, 0, 1]);
        assert_eq!(counts(82), [0, 0, 3, 0, 0, 1]);
        // Back up after `rise` rounds; a checker with a tunnel probe that
        // fails stays down, counting its own outcome.
        followers.lock().unwrap().insert(vip(83), subscriber(true));
        let tunnel_down = BTreeMap::from([(vip(83), Probe::Down(Failure::Tunnel))]);
        apply(Probe::Up, 2, &tunnel_down);
        assert_eq!(
            events(&mut rx),
            [(80, true, false), (81, true, false), (82, true, false)]
        );
        apply(Probe::Up, 1, &tunnel_down);
        assert_eq!(events(&mut rx), [(83, false, false)]);
        assert_eq!(counts(83), [0, 0, 0, 0, 3, 0]);
        assert_eq!(counts(81), [8, 0, 9, 0, 0, 1]);
        // Its tunnel comes back: all settled up; its next tunnel failure
        // still reaches it (settled lists with a tunnel are stepped).
        let tunnel_up = BTreeMap::from([(vip(83), Probe::Up)]);
        apply(Probe::Up, 3, &tunnel_up);
        assert_eq!(events(&mut rx), [(83, true, false)]);
        assert_eq!(followers.lock().unwrap().settled, Some(true));
        apply(Probe::Up, 3, &tunnel_down);
        assert_eq!(events(&mut rx), [(83, false, false)]);
        assert_eq!(counts(83), [3, 0, 0, 0, 6, 0]);
        assert_eq!(counts(80), [14, 0, 9, 0, 0, 1]);
        // Removed: it leaves with its counts.
        let gone = followers.lock().unwrap().remove(&vip(81)).unwrap();
        assert_eq!(gone.counts, [14, 0, 9, 0, 0, 1]);
        assert_eq!(followers.lock().unwrap().tunnels, 1);
    }

    #[test]
    fn probe_counts_only_grow_across_replaced_checkers() {
        let tally = ProbeTally::default();
        let vip = VipKey::new("10.0.0.10".parse().unwrap(), 80, lb_common::PROTO_TCP);
        let backend: IpAddr = "10.1.0.2".parse().unwrap();
        let subscriber = || Subscriber {
            state: Hysteresis::new(2, 3),
            counts: ProbeCounts::default(),
            tunnel: None,
            last_local_log: None,
        };
        let count = |followers: &Subscribers, probe: Probe, n: usize| {
            let mut f = followers.lock().unwrap();
            for _ in 0..n {
                probe.count(&mut f.list[0].1.counts);
            }
        };
        // The first checker counts 3 up and 1 timeout.
        let first: Subscribers = Arc::default();
        first.lock().unwrap().insert(vip, subscriber());
        tally.follow(vip, backend, &first);
        count(&first, Probe::Up, 3);
        count(&first, Probe::Down(Failure::Timeout), 1);
        assert_eq!(tally.of(vip, backend), vec![("up", 3), ("timeout", 1)]);
        // Its check changes: it leaves that probe for another.
        let gone = first.lock().unwrap().remove(&vip).unwrap();
        tally.retire(vip, backend, &gone.counts);
        let second: Subscribers = Arc::default();
        second.lock().unwrap().insert(vip, subscriber());
        tally.follow(vip, backend, &second);
        count(&second, Probe::Up, 2);
        assert_eq!(tally.of(vip, backend), vec![("up", 5), ("timeout", 1)]);
        // Replaced in place (same probe): its counts carry over.
        second.lock().unwrap().insert(vip, subscriber());
        assert_eq!(tally.of(vip, backend), vec![("up", 5), ("timeout", 1)]);
        // Gone for good.
        tally.retain(|_| false);
        assert_eq!(tally.of(vip, backend), vec![]);
    }

    #[tokio::test]
    async fn vips_sharing_a_backend_share_its_probe() {
        // A listener that counts connections.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(s);
            }
        });
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let check = |rise| HealthCheck {
            kind: "tcp".into(),
            port: Some(port),
            interval_ms: 20,
            timeout_ms: 10,
            rise,
            tunnel: false,
            ..HealthCheck::default()
        };
        // Three VIPs (other ports, other rise): one probe key.
        let vips: Vec<VipKey> = [80u16, 443, 8080]
            .iter()
            .map(|p| VipKey::new(lo, *p, lb_common::PROTO_TCP))
            .collect();
        let keys: std::collections::BTreeSet<ProbeKey> = vips
            .iter()
            .enumerate()
            .map(|(i, v)| ProbeKey::of(lo, u16::from_be(v.port), &check(1 + i as u32)))
            .collect();
        assert_eq!(keys.len(), 1);
        let (tx, _rx) = mpsc::unbounded_channel();
        let tally = ProbeTally::default();
        let prober = Prober::spawn(keys.into_iter().next().unwrap(), (tx, tally.clone()));
        for (i, v) in vips.iter().enumerate() {
            prober.subscribe(*v, &check(1 + i as u32), None, true);
        }
        assert_eq!(prober.subscribers(), 3);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let connects = accepted.load(std::sync::atomic::Ordering::Relaxed);
        let heard: Vec<u64> = vips
            .iter()
            .map(|v| tally.of(*v, lo).iter().map(|(_, n)| n).sum())
            .collect();
        drop(prober);
        // Every VIP heard every round; the backend saw one probe per round.
        assert!(heard.iter().all(|&n| n >= 5), "{heard:?}");
        let most = *heard.iter().max().unwrap();
        assert!(
            connects <= most + 1,
            "{connects} connections for {most} rounds: the probe is not shared"
        );
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_real_listeners() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                n += 1;
                let status = if n % 2 == 1 {
                    "200 OK"
                } else {
                    "503 Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Duration::from_secs(1);
        assert_eq!(
            probe_http(lo, port, "/", 0, t).await,
            Probe::Up,
            "200 is healthy"
        );
        assert_eq!(
            probe_http(lo, port, "/", 0, t).await,
            Probe::Down(Failure::BadResponse),
            "503 is not"
        );
        assert_eq!(probe_http(lo, port, "/", 200, t).await, Probe::Up);
        assert_eq!(probe_tcp(lo, port, t).await, Probe::Up);
        // A port with nothing listening.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        assert_eq!(probe_tcp(lo, dead, t).await, Probe::Down(Failure::Connect));
        assert_eq!(
            probe_http(lo, dead, "/", 0, t).await,
            Probe::Down(Failure::Connect)
        );
    }
}
