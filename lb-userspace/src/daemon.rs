//! The daemon: owns the data plane and the reconciler (the only writer of
//! maps), and serializes everything that changes them (health events, API
//! requests, reloads) through one loop.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use lb_common::{
    flow_hash::flow_hash,
    maps::{BACKEND_F_RETIRED, BACKEND_F_VALID, FlowKey, Reason, VIP_KIND_PORT, VipKey},
    user::ip_from_addr,
};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    announce::Announcer,
    api::{Request, Response},
    config::{BackendConfig, Config, VipConfig, describe_changes},
    dataplane::{Dataplane, LoadOptions, remove_pinned},
    flow_count::FlowCounter,
    health::{HealthCheck, HealthEvent, ProbeKey, ProbeTally, Prober},
    reconcile::{
        AppliedBackend, AppliedVip, BackendState, DesiredBackend, DesiredVip, PrevState, Reconciler,
    },
    serve::Caller,
    tunnel_probe::TunnelSpec,
    vip_table::TableDigest,
};

/// The longest capture, and how long past its end lbd waits for the
/// reader to stop it before stopping it itself.
const MAX_CAPTURE_SECS: u32 = 3600;
const CAPTURE_GRACE: Duration = Duration::from_secs(5);

/// Freed backend ids wait this long before reuse (tracked flows naming them
/// have re-hashed or expired by then).
const ID_QUARANTINE: Duration = Duration::from_secs(600);

mod fleet;
pub mod metrics;
mod view;

pub use fleet::{FleetState, StartedFrom, fleet_at_start};

/// The answer to a change: `{"message": ...}`.
fn message(text: &str) -> serde_json::Value {
    json!({ "message": text })
}

/// Changes to more VIPs than this at once are logged as one line.
const LOG_EACH_UP_TO: usize = 32;

/// Each checked (VIP, backend): its check and the direct probe it follows.
type Checkers = BTreeMap<(VipKey, IpAddr), (HealthCheck, ProbeKey)>;

pub struct Daemon {
    config_path: PathBuf,
    /// The file's config plus runtime changes made through the API.
    config: Config,
    /// The VIPs as the file had them at the last (re)load: what differs in
    /// `config` are runtime changes, which a reload drops.
    file_vips: Vec<VipConfig>,
    dp: Dataplane,
    rec: Reconciler,
    health: BTreeMap<(VipKey, IpAddr), bool>,
    checkers: Checkers,
    /// One direct probe per distinct (address, port, check), shared by
    /// the checkers of every VIP that has the backend.
    probers: BTreeMap<ProbeKey, Prober>,
    events: mpsc::UnboundedSender<HealthEvent>,
    /// Health probe outcomes, for the metrics.
    probes: ProbeTally,
    /// Reloads of the file that were applied / rejected.
    reloads: [u64; 2],
    announcer: Option<Announcer>,
    /// Instance drained: nothing announced whatever the backends' state.
    draining: bool,
    /// The program is attached (announce nothing before that).
    attached: bool,
    /// Tracked flows per backend, counted on a thread of its own.
    flows: FlowCounter,
    /// Health probes that failed on this host (EMFILE, no route, ...):
    /// never counted against a backend.
    local_probe_errors: u64,
    /// A running capture ends by then at the latest.
    capture_until: Option<std::time::Instant>,
    /// `capture_lost` when the running capture started.
    capture_lost_before: u64,
    /// The last attach error per interface (logged once, not every retry).
    link_errors: BTreeMap<String, String>,
    /// VIPs from etcd (`[etcd]`), when configured.
    fleet: Option<FleetState>,
    /// Fleet health: the backends a quorum of live instances sees down,
    /// by VIP name (`None`: this instance decides alone, as without it or
    /// while etcd is unreachable).
    fleet_down: Option<BTreeMap<String, BTreeSet<IpAddr>>>,
    /// Fleet health: where this instance's own observations go.
    local_down: Option<tokio::sync::watch::Sender<BTreeSet<crate::fleet::health::Observation>>>,
}

/// How the tunnel probe reaches `backend` of `v`: as the data path does.
fn tunnel_spec(config: &Config, v: &VipConfig, backend: IpAddr) -> TunnelSpec {
    let s = config.settings();
    let mut v4 = s.encap_src_prefix.to_ne_bytes();
    v4[3] |= 1;
    let mut v6 = s.encap_src6_prefix;
    v6[3] = 1u32.to_be();
    TunnelSpec {
        vip: v.address,
        port: v.health.port.unwrap_or(v.port),
        backend,
        gue: v.flags(&config.lb) & lb_common::maps::VIP_F_GUE != 0,
        gue_port: config.lb.gue_port,
        outer_src4: IpAddr::from(v4),
        outer_src6: ip_from_addr(&v6, lb_common::maps::FAMILY_IPV6),
    }
}

pub fn vip_key(v: &VipConfig) -> VipKey {
    VipKey::new(v.address, v.port, v.proto())
}

/// Rebuilds the reconciler's view from pinned maps left by a previous daemon.
fn adopt(dp: &Dataplane, rec: &mut Reconciler) -> Result<usize> {
    let backends = dp.backend_entries();
    // Retired backends keep their ids while a previous table may name them.
    for (id, _) in backends
        .iter()
        .filter(|(_, b)| b.flags & BACKEND_F_RETIRED != 0)
    {
        rec.reserve_backend_id(*id);
    }
    // Each VIP's backends, grouped once (a scan of every backend per VIP
    // took seconds at 4,096 VIPs x 100 backends).
    let mut by_vip: std::collections::HashMap<u32, BTreeMap<IpAddr, AppliedBackend>> =
        std::collections::HashMap::new();
    for (id, b) in backends
        .iter()
        .filter(|(_, b)| b.flags & BACKEND_F_RETIRED == 0)
    {
        by_vip.entry(b.vip_id).or_default().insert(
            b.ip(),
            AppliedBackend {
                id: *id,
                weight: 0,
                healthy: b.flags & BACKEND_F_VALID != 0,
            },
        );
    }
    let mut adopted = 0;
    for (key, meta) in dp.vip_entries() {
        if key.kind != VIP_KIND_PORT {
            rec.adopt_fragment_key(key, meta);
            continue;
        }
        let owned = by_vip.remove(&meta.vip_id).unwrap_or_default();
        // Ids in address order: the order a rebuild gives them.
        let (addrs, ids): (Vec<IpAddr>, Vec<u32>) = owned.iter().map(|(a, b)| (*a, b.id)).unzip();
        let table = dp.read_table(meta.table_offset, meta.table_size, ids.clone());
        // Its window restarts now: how old it is was not recorded.
        let prev = Some(dp.prev_table(meta.vip_id))
            .filter(|p| p.size > 0)
            .map(|region| PrevState {
                table: dp.read_table(region.offset, region.size, ids.clone()),
                region: Some(region),
                since: std::time::Instant::now(),
                explicit: false,
            });
        let name = format!(
            "{}:{}/{}",
            ip_from_addr(&key.addr, key.family),
            u16::from_be(key.port),
            key.proto
        );
        let digest = {
            let table = table.clone();
            TableDigest::later(move || table.digest_by_address(&addrs, &ids))
        };
        rec.adopt(
            key,
            AppliedVip {
                name,
                meta,
                table_size: meta.table_size,
                backends: owned,
                table,
                digest,
                prev,
            },
        )?;
        adopted += 1;
    }
    rec.adopt_quic_servers(dp.quic_servers());
    Ok(adopted)
}

impl Daemon {
    /// Loads (or adopts) the data plane for `config` (read from
    /// `config_path`), applies the VIPs and attaches. The caller has run
    /// `preflight` and holds the instance lock. A start that fails after
    /// creating the pinned state removes it again; adopted state (a
    /// previous daemon's tables and connections) is left as it was.
    pub fn start(
        config_path: PathBuf,
        config: Config,
        fleet: Option<FleetState>,
        events: mpsc::UnboundedSender<HealthEvent>,
    ) -> Result<Daemon> {
        let pin_path = (!config.lb.pin_path.is_empty()).then(|| PathBuf::from(&config.lb.pin_path));
        let fresh = pin_path
            .as_ref()
            .is_some_and(|dir| !dir.join(lb_common::maps::MAP_VIPS).exists());
        let started = Self::load_and_attach(config_path, config, fleet, pin_path.clone(), events);
        if let (Err(e), true, Some(dir)) = (&started, fresh, &pin_path) {
            // Nothing of ours may outlive a failed first start.
            match remove_pinned(dir) {
                Ok(removed) if !removed.is_empty() => {
                    warn!(pin_path = %dir.display(), removed = removed.len(), "start failed: removed the pinned objects it had created: {e:#}")
                }
                Ok(_) => {}
                Err(te) => {
                    error!("start failed, and removing its pinned objects failed too: {te:#}")
                }
            }
        }
        started
    }

    /// `config` holds the file's VIPs and, with `fleet`, etcd's.
    fn load_and_attach(
        config_path: PathBuf,
        config: Config,
        fleet: Option<FleetState>,
        pin_path: Option<PathBuf>,
        events: mpsc::UnboundedSender<HealthEvent>,
    ) -> Result<Daemon> {
        let opts = LoadOptions {
            settings: config.settings(),
            maglev_slots: config.lb.maglev_slots,
            conntrack_entries: config.lb.conntrack_entries,
            max_vips: config.lb.max_vips,
            max_backends: config.lb.max_backends,
            pin_path,
            object: None,
        };
        let loading = std::time::Instant::now();
        let dp = Dataplane::load(&opts)?;
        info!(
            secs = format!("{:.2}", loading.elapsed().as_secs_f64()),
            adopted = dp.adopted,
            "data plane loaded (the kernel zeroes new maps: seconds per GiB)"
        );
        let window = Duration::from_secs(config.lb.second_chance_window_secs);
        // A freed id is not reused while a previous table may still name it.
        let quarantine = ID_QUARANTINE.max(window + Duration::from_secs(60));
        // The maps' real sizes: pinned ones keep those they were made with.
        let capacity = (dp.vip_capacity, dp.backend_capacity);
        let sized =
            |name| crate::dataplane::map_size(config.lb.max_vips, config.lb.max_backends, name);
        let wanted = (
            sized(lb_common::maps::MAP_VIP_STATS),
            sized(lb_common::maps::MAP_BACKENDS),
        );
        if (Some(capacity.0), Some(capacity.1)) != wanted {
            warn!(
                vips = capacity.0,
                backend_ids = capacity.1,
                "the pinned maps keep the sizes they were created with, not lb.max_vips / \
                 lb.max_backends (changing them needs `lbd teardown`, which drops the connection table)"
            );
        }
        let mut rec = Reconciler::with_capacity(
            config.lb.hash_seed,
            dp.slot_capacity(),
            capacity,
            quarantine,
        );
        rec.second_chance_window = window;
        rec.build_ahead_for_failures();
        if dp.adopted {
            rec.generation = dp.saved_generation();
            let n = adopt(&dp, &mut rec)?;
            info!(vips = n, pin_path = %config.lb.pin_path, "adopted pinned data plane state (connection table kept)");
        }
        let flows = FlowCounter::new(dp.conntrack_handle()?);
        let mut d = Daemon {
            flows,
            config_path,
            // The file's VIPs: set from `local_vips` below.
            file_vips: Vec::new(),
            fleet,
            fleet_down: None,
            local_down: None,
            config,
            dp,
            rec,
            health: BTreeMap::new(),
            checkers: BTreeMap::new(),
            probers: BTreeMap::new(),
            events,
            probes: ProbeTally::default(),
            reloads: [0; 2],
            announcer: None,
            draining: false,
            attached: false,
            local_probe_errors: 0,
            link_errors: BTreeMap::new(),
            capture_until: None,
            capture_lost_before: 0,
        };
        d.file_vips = d.local_vips();
        d.announcer = d.config.bgp.clone().map(Announcer::new);
        let applying = std::time::Instant::now();
        d.apply()?;
        info!(
            secs = format!("{:.2}", applying.elapsed().as_secs_f64()),
            vips = d.config.vips.len(),
            "tables applied"
        );
        for iface in d.config.lb.interfaces.clone() {
            let chosen = crate::xdp_mode::choose(&iface, &d.config.lb.xdp_mode)?;
            let how = d.dp.attach_pinned(&iface, &chosen)?;
            info!(interface = %iface, mode = chosen.name, why = chosen.why, configured = %d.config.lb.xdp_mode,
                how = ?how, "XDP attached");
        }
        d.attached = true;
        d.announce();
        Ok(d)
    }

    fn desired(&self) -> Vec<DesiredVip> {
        self.config
            .vips
            .iter()
            .map(|v| {
                let key = vip_key(v);
                let healthy = self.healthy_in(v);
                DesiredVip {
                    key,
                    name: v.name(),
                    table_size: v.table_size,
                    flags: v.flags(&self.config.lb),
                    backends: v
                        .backends
                        .iter()
                        .map(|b| DesiredBackend {
                            addr: b.address,
                            weight: b.weight,
                            healthy: healthy(b.address),
                            state: BackendState::parse(&b.state).expect("validated"),
                            server_id: v.server_id(b),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Ends second-chance windows that have passed (called every second).
    pub fn expire_second_chance(&mut self) {
        match self
            .rec
            .expire_prev(&mut self.dp, std::time::Instant::now())
        {
            Ok(ended) => {
                for name in ended {
                    info!(vip = %name, "second-chance window over: previous table dropped");
                }
            }
            Err(e) => error!("ending a second-chance window: {e:#}"),
        }
    }

    /// Brings maps and health checkers in line with the working config.
    pub fn apply(&mut self) -> Result<()> {
        self.new_backends_start_down();
        let desired = self.desired();
        let report = self.rec.apply(&desired, &mut self.dp)?;
        if !report.tables_switched.is_empty() {
            // Kept with the pinned maps: the next daemon counts on from it.
            if let Err(e) = self.dp.save_generation(self.rec.generation) {
                warn!("saving the table generation: {e:#}");
            }
        }
        // One line per VIP, unless thousands change at once (a cold start
        // at scale): then one line with the count and the first few.
        let generation = self.rec.generation;
        for (names, what) in [
            (&report.vips_added, "VIP added"),
            (&report.vips_removed, "VIP removed"),
            (&report.tables_switched, "Maglev table switched"),
        ] {
            if names.len() <= LOG_EACH_UP_TO {
                for name in names {
                    info!(vip = %name, generation, "{what}");
                }
            } else {
                let first: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
                info!(count = names.len(), first = ?first, generation, "{what} (many)");
            }
        }
        self.sync_checkers();
        self.announce();
        Ok(())
    }

    /// VIP addresses this instance can serve now: attached, not drained,
    /// and at least one healthy backend with weight in one of its VIPs.
    fn servable(&self) -> BTreeSet<IpAddr> {
        if !self.attached || self.draining {
            return BTreeSet::new();
        }
        self.config
            .vips
            .iter()
            .filter(|v| {
                let healthy = self.healthy_in(v);
                v.backends
                    .iter()
                    .any(|b| b.weight > 0 && healthy(b.address))
            })
            .map(|v| v.address)
            .collect()
    }

    /// Brings BIRD's announcements in line with `servable()`.
    fn announce(&mut self) {
        let wanted = self.servable();
        if let Some(a) = self.announcer.as_mut() {
            match a.set(wanted.clone()) {
                Ok(true) => info!(vips = ?wanted, "BGP announcements updated"),
                Ok(false) => {}
                Err(e) => error!("updating BGP announcements: {e:#}"),
            }
        }
    }

    /// Withdraws everything (shutdown, drain).
    pub fn withdraw_all(&mut self) {
        self.draining = true;
        self.announce();
    }

    /// Compares each configured interface with the one the program was
    /// attached to: a deleted interface is logged; one that is back (or
    /// was recreated, so has a new index) gets the program again, on a new
    /// link, with the maps and connection table as they were.
    pub fn check_links(&mut self) {
        for iface in self.config.lb.interfaces.clone() {
            let now = crate::dataplane::ifindex_of(&iface);
            let was = self.dp.attached_ifindex(&iface);
            match (was, now) {
                (Some(a), Some(b)) if a == b => continue,
                (Some(_), None) => {
                    error!(interface = %iface, "interface deleted: its XDP program went with it; lbd attaches again when it returns");
                    self.dp.forget_interface(&iface);
                    continue;
                }
                (None, None) => continue,
                (_, Some(_)) => {}
            }
            let attached = crate::xdp_mode::choose(&iface, &self.config.lb.xdp_mode)
                .and_then(|chosen| self.dp.attach_pinned(&iface, &chosen).map(|h| (chosen, h)));
            match attached {
                Ok((chosen, how)) => {
                    self.link_errors.remove(&iface);
                    warn!(interface = %iface, mode = chosen.name, how = ?how, "interface back: XDP attached again (connection table kept)");
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if self.link_errors.get(&iface) != Some(&text) {
                        error!(interface = %iface, "attaching to the interface that came back failed (retried on every change): {text}");
                        self.link_errors.insert(iface.clone(), text);
                    }
                }
            }
        }
    }

    /// A checked backend that appears while lbd runs (reload, `lbctl`) gets
    /// no slots before `rise` successful probes: it may not even be set up
    /// yet. Those of the first apply (this start's config, or adopted from
    /// a running data plane) start up, so a restart never pulls working
    /// backends while its first probes are in flight.
    fn new_backends_start_down(&mut self) {
        if !self.attached {
            return;
        }
        for v in &self.config.vips {
            if v.health.kind == "none" {
                continue;
            }
            let key = vip_key(v);
            for b in &v.backends {
                let k = (key, b.address);
                // New = not checked yet. A checked backend without a health
                // entry has simply never changed state: it is up.
                if !self.checkers.contains_key(&k) {
                    self.health.entry(k).or_insert(false);
                }
            }
        }
    }

    fn sync_checkers(&mut self) {
        let mut wanted: Checkers = BTreeMap::new();
        for v in &self.config.vips {
            if v.health.kind == "none" {
                continue;
            }
            for b in &v.backends {
                let k = (vip_key(v), b.address);
                match self.checkers.remove(&k) {
                    Some((check, probe)) if check == v.health => {
                        wanted.insert(k, (check, probe));
                    }
                    old => {
                        if let Some((_, probe)) = old
                            && let Some(p) = self.probers.get(&probe)
                        {
                            p.unsubscribe(&k.0);
                        }
                        let tunnel = v
                            .health
                            .tunnel
                            .then(|| tunnel_spec(&self.config, v, b.address));
                        let probe = ProbeKey::of(b.address, v.port, &v.health);
                        let sinks = (self.events.clone(), self.probes.clone());
                        self.probers
                            .entry(probe.clone())
                            .or_insert_with(|| Prober::spawn(probe.clone(), sinks))
                            .subscribe(
                                k.0,
                                &v.health,
                                tunnel,
                                *self.health.get(&k).unwrap_or(&true),
                            );
                        wanted.insert(k, (v.health.clone(), probe));
                    }
                }
            }
        }
        for (k, (_, probe)) in std::mem::take(&mut self.checkers) {
            if let Some(p) = self.probers.get(&probe) {
                p.unsubscribe(&k.0);
            }
            self.health.remove(&k);
        }
        self.health.retain(|k, _| wanted.contains_key(k));
        self.probes.retain(|k| wanted.contains_key(k));
        // Probes no VIP follows any more stop (dropped: aborted).
        self.probers.retain(|_, p| p.subscribers() > 0);
        self.checkers = wanted;
    }

    /// Distinct direct probes running (each shared by every VIP with that
    /// backend and check), and the checkers that follow them.
    pub fn probe_counts(&self) -> (usize, usize) {
        (self.probers.len(), self.checkers.len())
    }

    pub fn on_health(&mut self, ev: HealthEvent) {
        if !self.checkers.contains_key(&(ev.vip, ev.backend)) {
            return; // a checker that was just stopped
        }
        if ev.local_error {
            self.local_probe_errors += 1;
            return;
        }
        let state = if ev.healthy { "up" } else { "down" };
        let vip = self
            .config
            .vips
            .iter()
            .find(|v| vip_key(v) == ev.vip)
            .map(|v| v.name())
            .unwrap_or_default();
        // Down is worth a look; back up is good news.
        if ev.healthy {
            info!(backend = %ev.backend, vip = %vip, state, "backend health changed");
        } else {
            warn!(backend = %ev.backend, vip = %vip, state, "backend health changed");
        }
        self.health.insert((ev.vip, ev.backend), ev.healthy);
        if self.publish_local_health() {
            // Fleet health: the fleet's view decides, once it has this.
            return;
        }
        if let Err(e) = self.apply() {
            error!("applying a health change: {e:#}");
        }
    }

    /// Replaces the working config by `candidate` if it is valid and applies;
    /// otherwise keeps the running one.
    fn replace_config(&mut self, candidate: Config) -> Result<()> {
        candidate.validate()?;
        let previous = std::mem::replace(&mut self.config, candidate);
        if let Err(e) = self.apply() {
            self.config = previous;
            self.apply().ok();
            return Err(e);
        }
        Ok(())
    }

    /// Re-reads the file and applies its VIPs. `[lb]` and `[bgp]` apply
    /// only at a restart: the running ones are kept, and the answer names
    /// every such change so nobody believes it took effect.
    pub fn reload(&mut self) -> Result<serde_json::Value> {
        // systemd shows "reloading" and waits for READY (ExecReload=lbctl
        // reload also fails when the file is rejected).
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            notify(&[sd_notify::NotifyState::Reloading, now]);
        }
        let result = self.try_reload();
        self.reloads[result.is_err() as usize] += 1;
        notify(&[sd_notify::NotifyState::Ready]);
        result
    }

    fn try_reload(&mut self) -> Result<serde_json::Value> {
        let mut candidate = Config::load(&self.config_path)?;
        let pending = self.config.restart_only_changes(&candidate);
        candidate.lb = self.config.lb.clone();
        candidate.bgp = self.config.bgp.clone();
        candidate.etcd = self.config.etcd.clone();
        // The file is the source of truth for its VIPs: changes made through
        // the control socket since the last load are replaced by what the
        // file says. etcd's VIPs stay as the applied revision has them.
        let dropped = describe_changes(&self.file_vips, &self.local_vips());
        let file_vips = candidate.vips.clone();
        let candidate = self.with_fleet_vips(candidate)?;
        let applied = describe_changes(&self.config.vips, &candidate.vips);
        self.replace_config(candidate)?;
        self.file_vips = file_vips;
        let file = self.config_path.display().to_string();
        info!(file = %file, changes = %applied.join("; "), "configuration reloaded");
        if !dropped.is_empty() {
            warn!(file = %file, dropped = %dropped.join("; "),
                "reload replaced runtime changes that were not in the file");
        }
        if !pending.is_empty() {
            warn!(file = %file, needs_restart = %pending.join(", "),
                "these changes need a restart of lbd and are not applied");
        }
        let mut message = format!("reloaded {file}: {} changes applied", applied.len());
        if !dropped.is_empty() {
            message += &format!(
                "; runtime changes not in the file were dropped: {}",
                dropped.join("; ")
            );
        }
        if !pending.is_empty() {
            message += &format!("; not applied until lbd restarts: {}", pending.join(", "));
        }
        Ok(json!({
            "message": message,
            "applied": applied,
            "dropped_runtime_changes": dropped,
            "needs_restart": pending,
        }))
    }

    fn vip_index(&self, name: &str) -> Result<usize> {
        self.config
            .vips
            .iter()
            .position(|v| v.name() == name)
            .ok_or_else(|| anyhow!("no VIP {name} (names look like 10.0.0.10:80/tcp)"))
    }

    fn backend_mut<'a>(
        c: &'a mut Config,
        vip: usize,
        address: &str,
    ) -> Result<&'a mut BackendConfig> {
        let addr: IpAddr = address.parse().context("backend address")?;
        c.vips[vip]
            .backends
            .iter_mut()
            .find(|b| b.address == addr)
            .ok_or_else(|| anyhow!("no backend {address} in that VIP"))
    }

    /// The working config a VIP or backend edit asks for, and the answer's
    /// message; `None` for other requests. Nothing is applied.
    pub(crate) fn edited(&self, req: &Request) -> Result<Option<(Config, String)>> {
        let mut c = self.config.clone();
        let answer = match req.clone() {
            Request::AddVip {
                address,
                port,
                protocol,
                table_size,
                health,
                quic,
            } => {
                let address: IpAddr = address.parse().context("VIP address")?;
                // Checked like a file VIP with [vip.health] kind = "tcp".
                let health = health.unwrap_or_else(|| HealthCheck {
                    kind: "tcp".into(),
                    ..HealthCheck::default()
                });
                c.vips.push(VipConfig {
                    address,
                    port,
                    protocol,
                    table_size: table_size.unwrap_or(lb_common::maglev::DEFAULT_TABLE_SIZE),
                    backends: Vec::new(),
                    health,
                    encap: None,
                    quic,
                    quic_lb: None,
                });
                "added"
            }
            Request::RemoveVip { vip } => {
                c.vips.remove(self.vip_index(&vip)?);
                "removed"
            }
            Request::AddBackend {
                vip,
                address,
                weight,
                state,
                server_id,
            } => {
                let i = self.vip_index(&vip)?;
                let address: IpAddr = address.parse().context("backend address")?;
                c.vips[i].backends.push(BackendConfig {
                    address,
                    weight,
                    state: state.unwrap_or_else(|| "active".into()),
                    server_id,
                });
                "added"
            }
            Request::RemoveBackend { vip, address } => {
                let i = self.vip_index(&vip)?;
                let addr: IpAddr = address.parse().context("backend address")?;
                let before = c.vips[i].backends.len();
                c.vips[i].backends.retain(|b| b.address != addr);
                if c.vips[i].backends.len() == before {
                    bail!("no backend {address} in that VIP");
                }
                "removed"
            }
            Request::Drain { vip, address }
            | Request::SetWeight {
                vip,
                address,
                weight: 0,
            } => {
                Self::backend_mut(&mut c, self.vip_index(&vip)?, &address)?.weight = 0;
                "draining: no new flows; `lbctl status` shows the tracked flows left"
            }
            Request::SetWeight {
                vip,
                address,
                weight,
            } => {
                Self::backend_mut(&mut c, self.vip_index(&vip)?, &address)?.weight = weight;
                "weight set"
            }
            Request::SetState {
                vip,
                address,
                state,
            } => {
                Self::backend_mut(&mut c, self.vip_index(&vip)?, &address)?.state = state.clone();
                return Ok(Some((c, format!("state {state}"))));
            }
            _ => return Ok(None),
        };
        Ok(Some((c, answer.into())))
    }

    /// Answers one control request. Every change is logged with the
    /// caller's uid and pid: the audit trail of who changed what.
    pub fn handle(&mut self, req: Request, caller: Caller) -> Response {
        let change = req
            .is_change()
            .then(|| serde_json::to_string(&req).unwrap_or_default());
        let result = self.try_handle(req);
        if let Some(change) = change {
            let pid = caller.pid.unwrap_or(0);
            match &result {
                Ok(_) => info!(uid = caller.uid, pid, request = %change, "control: change applied"),
                Err(e) => {
                    warn!(uid = caller.uid, pid, request = %change, "control: change refused: {e:#}")
                }
            }
        }
        match result {
            Ok(data) => Response::ok(data),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }

    fn try_handle(&mut self, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Stats => Ok(self.stats()),
            Request::Reload => self.reload(),
            Request::ConfigDump => Ok(json!({
                "toml": self.config.to_toml()?,
                "runtime_changes": describe_changes(&self.file_vips, &self.local_vips()),
            })),
            Request::Flows { .. } => bail!("flows are answered off the daemon loop"),
            Request::CaptureStart {
                vip,
                backend,
                seconds,
            } => self.start_capture(vip.as_deref(), backend.as_deref(), seconds),
            Request::CaptureStop => {
                self.stop_capture()?;
                let lost = self
                    .dp
                    .capture_lost()
                    .saturating_sub(self.capture_lost_before);
                Ok(json!({"message": "capture stopped", "lost": lost}))
            }
            Request::AddVip { .. }
            | Request::RemoveVip { .. }
            | Request::AddBackend { .. }
            | Request::RemoveBackend { .. }
            | Request::Drain { .. }
            | Request::SetWeight { .. }
            | Request::SetState { .. } => {
                let (candidate, answer) = self.edited(&req)?.expect("an edit");
                self.replace_config(candidate)?;
                Ok(message(&answer))
            }
            Request::Trace {
                src,
                dst,
                protocol,
                quic_cid,
            } => self.trace(&src, &dst, &protocol, quic_cid.as_deref()),
            Request::DrainInstance => {
                if self.announcer.is_none() {
                    bail!("no [bgp] section: this instance announces nothing to withdraw");
                }
                self.withdraw_all();
                Ok(message(
                    "withdrawn from the routers; traffic moves to the other instances",
                ))
            }
            Request::ResumeInstance => {
                self.draining = false;
                self.announce();
                let announced = self
                    .announcer
                    .as_ref()
                    .map(|a| a.announced())
                    .unwrap_or_default();
                Ok(json!({
                    "message": format!("announcing {} VIP addresses", announced.len()),
                    "announced": announced,
                }))
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let snapshot = self.flows.latest();
        let (probes, checkers) = self.probe_counts();
        let vips: Vec<serde_json::Value> = self
            .views(&snapshot.counts, true)
            .iter()
            .map(|v| {
                let backends: Vec<serde_json::Value> = v
                    .backends
                    .iter()
                    .map(|b| {
                        json!({
                            "address": b.address.to_string(),
                            "id": b.id,
                            "weight": b.weight,
                            "state": b.state,
                            "healthy": b.healthy,
                            // This instance's own checks (fleet health decides `healthy`).
                            "local_healthy": self.health.get(&(v.key, b.address)).copied().unwrap_or(true),
                            "seen_down_by": self.seen_down_by(&v.name, b.address),
                            "slots": b.slots,
                            "tracked_flows": b.tracked,
                            "packets": b.counter.packets,
                            "bytes": b.counter.bytes,
                            "new_flows": b.new_flows,
                            "server_id": b.server_id,
                        })
                    })
                    .collect();
                json!({
                    "vip": v.name,
                    "source": if v.from_etcd { "etcd" } else { "file" },
                    "table_size": v.table_size,
                    // Equal on every instance that sends each slot to the same backend.
                    "table_digest": v.digest,
                    "packets": v.counter.packets,
                    "bytes": v.counter.bytes,
                    "new_flows": v.new_flows(),
                    "health_check": v.health_check,
                    "tunnel_check": v.tunnel_check,
                    "second_chance": v.second_chance.as_ref().map(|sc| json!({
                        "from_states": sc.from_states,
                        "ends_in_secs": sc.secs_left,
                    })),
                    "quic": v.quic.map(|q| json!({
                        "config_id": q.config_id,
                        "server_id_len": q.server_id_len,
                        "nonce_len": q.nonce_len,
                        "cid_len": q.cid_len(),
                    })),
                    "backends": backends,
                })
            })
            .collect();
        json!({
            "generation": self.rec.generation,
            "draining": self.draining,
            // Age of the tracked-flow counts (walked on request, off the loop).
            "tracked_flows_age_ms": snapshot.taken.map(|t| t.elapsed().as_millis() as u64),
            "announced": self.announcer.as_ref().map(|a| a.announced()),
            // Probes that failed on this host, not counted against backends.
            "health_probe_local_errors": self.local_probe_errors,
            "health_probes": probes,
            "health_checkers": checkers,
            // What the control socket changed since the file was last read
            // (a reload replaces it with the file).
            "runtime_changes": describe_changes(&self.file_vips, &self.local_vips()),
            // VIPs from etcd: the applied revision, and whether it is current.
            "fleet": self.fleet.as_ref().map(FleetState::status),
            // `lbctl capture` running (the data path copies packets).
            "capturing": self.dp.capture().enabled != 0,
            "vips": vips,
        })
    }

    /// The key of the VIP named `name`, which must be applied.
    fn applied_key(&self, name: &str) -> Result<VipKey> {
        let key = vip_key(&self.config.vips[self.vip_index(name)?]);
        if !self.rec.vips.contains_key(&key) {
            bail!("VIP {name} is not applied");
        }
        Ok(key)
    }

    /// The ids backend `address` has in VIP `key` (`name`), or in every VIP;
    /// an error when it has none.
    fn backend_ids(
        &self,
        address: &str,
        key: Option<VipKey>,
        name: Option<&str>,
    ) -> Result<Vec<u32>> {
        let addr: IpAddr = address.parse().context("backend address")?;
        let ids: Vec<u32> = self
            .rec
            .vips
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| key == **k))
            .filter_map(|(_, a)| a.backends.get(&addr).map(|b| b.id))
            .collect();
        if ids.is_empty() {
            bail!("no backend {address} in {}", name.unwrap_or("any VIP"));
        }
        Ok(ids)
    }

    /// Turns capture on for `seconds` (plus a grace period for the reader);
    /// one capture at a time.
    fn start_capture(
        &mut self,
        vip: Option<&str>,
        backend: Option<&str>,
        seconds: u32,
    ) -> Result<serde_json::Value> {
        if !(1..=MAX_CAPTURE_SECS).contains(&seconds) {
            bail!("a capture lasts 1 to {MAX_CAPTURE_SECS} seconds");
        }
        let ring = self
            .dp
            .capture_ring_path()
            .context("capture reads the pinned ring: set lb.pin_path")?;
        if self
            .capture_until
            .is_some_and(|t| t > std::time::Instant::now())
        {
            bail!("a capture is running (one at a time); `lbctl capture` stops when done");
        }
        let key = vip.map(|name| self.applied_key(name)).transpose()?;
        let vip_id = key.map_or(lb_common::maps::CAPTURE_ANY_VIP, |k| {
            self.rec.vips[&k].meta.vip_id
        });
        let backend_id = match backend {
            None => 0,
            Some(b) => match self.backend_ids(b, key, vip)?[..] {
                [id] => id,
                _ => bail!("{b} serves several VIPs: name one with --vip"),
            },
        };
        self.dp.set_capture(lb_common::maps::CaptureFilter {
            enabled: 1,
            vip_id,
            backend_id,
            ..Default::default()
        })?;
        self.capture_until =
            Some(std::time::Instant::now() + Duration::from_secs(seconds as u64) + CAPTURE_GRACE);
        Ok(json!({
            "message": "capturing",
            "ring": ring.display().to_string(),
            "snaplen": lb_common::maps::CAPTURE_SNAPLEN,
        }))
    }

    fn stop_capture(&mut self) -> Result<()> {
        self.capture_until = None;
        self.dp
            .set_capture(lb_common::maps::CaptureFilter::default())
    }

    /// Ends a capture whose reader went away (called every second).
    pub fn expire_capture(&mut self) {
        if self
            .capture_until
            .is_some_and(|t| t <= std::time::Instant::now())
        {
            warn!("capture ended by its time limit (its reader did not stop it)");
            if let Err(e) = self.stop_capture() {
                error!("stopping a capture: {e:#}");
            }
        }
    }

    /// A walk of the connection table for `lbctl flows`, to run off the
    /// loop (`FlowQuery::run`).
    pub fn flow_query(
        &self,
        vip: Option<&str>,
        backend: Option<&str>,
        limit: Option<u32>,
    ) -> Result<crate::flow_query::FlowQuery> {
        use crate::flow_query::{DEFAULT_LIMIT, FlowQuery, MAX_LIMIT};
        let limit = limit.map_or(DEFAULT_LIMIT, |l| l as usize);
        if limit > MAX_LIMIT {
            bail!("limit {limit} is over {MAX_LIMIT}");
        }
        let key = vip.map(|name| self.applied_key(name)).transpose()?;
        let backend_ids = backend.map(|b| self.backend_ids(b, key, vip)).transpose()?;
        Ok(FlowQuery {
            table: self.dp.conntrack_handle()?,
            vips: key.map(|k| vec![k]),
            backend_ids,
            addresses: self
                .rec
                .vips
                .values()
                .flat_map(|a| a.backends.iter().map(|(addr, b)| (b.id, *addr)))
                .collect(),
            vip_names: self
                .rec
                .vips
                .iter()
                .map(|(k, a)| (*k, a.name.clone()))
                .collect(),
            limit,
        })
    }

    fn stats(&self) -> serde_json::Value {
        let forwarded = self.dp.packets_of(&Reason::FORWARDED);
        let reasons: serde_json::Map<String, serde_json::Value> = self
            .dp
            .reason_counters()
            .into_iter()
            .map(|(r, c)| {
                (
                    r.name().to_string(),
                    json!({"packets": c.packets, "bytes": c.bytes}),
                )
            })
            .collect();
        json!({ "reasons": reasons, "forwarded": forwarded })
    }

    fn trace(
        &self,
        src: &str,
        dst: &str,
        protocol: &str,
        quic_cid: Option<&str>,
    ) -> Result<serde_json::Value> {
        let src: SocketAddr = src.parse().context("SRC must be ADDRESS:PORT")?;
        let dst: SocketAddr = dst.parse().context("DST must be ADDRESS:PORT")?;
        let proto = match protocol {
            "tcp" => lb_common::PROTO_TCP,
            "udp" => lb_common::PROTO_UDP,
            other => bail!("protocol {other:?} is not tcp or udp"),
        };
        let flow = FlowKey::new(src.ip(), src.port(), dst.ip(), dst.port(), proto);
        let exact = VipKey::new(dst.ip(), dst.port(), proto);
        let any = VipKey::new(dst.ip(), 0, proto);
        let (key, vip) = [exact, any]
            .iter()
            .find_map(|k| self.rec.vips.get(k).map(|v| (*k, v)))
            .ok_or_else(|| anyhow!("{dst}/{protocol} is not a VIP: the packet would be passed"))?;
        let hash = flow_hash(&flow, self.config.lb.hash_seed);
        let addr_of = |id: u32| {
            vip.backends
                .iter()
                .find(|(_, b)| b.id == id)
                .map(|(a, _)| a.to_string())
        };
        let (slot, table_backend) = if vip.meta.table_size == 0 {
            (None, None)
        } else {
            let slot = hash % vip.meta.table_size;
            (Some(slot), addr_of(vip.table.get(slot as usize)))
        };
        let tracked = self
            .dp
            .conntrack_get(&flow)
            .map(|e| addr_of(e.backend_id).unwrap_or(format!("id {}", e.backend_id)));
        let quic = match quic_cid {
            None => serde_json::Value::Null,
            Some(hex) => {
                if vip.meta.flags & lb_common::maps::VIP_F_QUIC == 0 {
                    bail!(
                        "{} is not a QUIC VIP: connection IDs play no part",
                        vip.name
                    );
                }
                let cid = parse_hex(hex).context("--cid must be hexadecimal octets")?;
                self.trace_quic(vip, &cid, &addr_of)
            }
        };
        Ok(json!({
            "vip": vip.name,
            "hash": hash,
            "slot": slot,
            "table_backend": table_backend,
            "tracked_backend": tracked,
            "quic": quic,
            "note": if key.port == 0 { "every-port VIP" } else { "" },
        }))
    }

    /// Where a short-header packet carrying connection ID `cid` goes, as
    /// the data path decides (`lb_common::quic_lb::classify`).
    fn trace_quic(
        &self,
        vip: &crate::reconcile::AppliedVip,
        cid: &[u8],
        addr_of: &dyn Fn(u32) -> Option<String>,
    ) -> serde_json::Value {
        use lb_common::quic_lb::{QuicHeader, classify};
        let mut packet = vec![0x40];
        packet.extend_from_slice(cid);
        let server_id = match classify(&packet, vip.meta.flags) {
            QuicHeader::Short { server_id } => server_id,
            _ => {
                return json!({"server_id": null, "backend": null,
                    "why": "no routable server id (another config id, or shorter than the VIP's connection IDs): balanced as UDP"});
            }
        };
        let key = lb_common::maps::QuicServerKey {
            vip_id: vip.meta.vip_id,
            server_id,
        };
        let Some(&id) = self.rec.quic_servers().get(&key) else {
            return json!({"server_id": server_id, "backend": null,
                "why": "no backend of this VIP has that server id: balanced as UDP"});
        };
        let healthy = vip.backends.values().any(|b| b.id == id && b.healthy);
        json!({
            "server_id": server_id,
            "backend": addr_of(id),
            "why": if healthy {
                "routed by server id (connection table not used)"
            } else {
                "its backend is down: balanced as UDP"
            },
        })
    }

    pub fn log_stats(&self) {
        let tx = self.dp.packets_of(&Reason::FORWARDED);
        let dropped = self.dp.packets_of(&Reason::DROPPED);
        info!(
            forwarded = tx,
            dropped,
            generation = self.rec.generation,
            "stats"
        );
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn pinned(&self) -> bool {
        !self.config.lb.pin_path.is_empty()
    }
}

/// Makes glibc serve large allocations (Maglev tables: 256 KiB at M =
/// 65537, 4 MiB at a million slots) from its heap instead of a fresh
/// mapping each: a mapping is zeroed page by page on first touch and
/// returned on free, which made a table switch of thousands of VIPs spend
/// most of its time in page faults.
pub fn keep_tables_on_the_heap() {
    // SAFETY: mallopt only changes allocator tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        // One heap for every thread: tables built on the build threads
        // reuse what the previous switch freed on the main thread.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Tells systemd (Type=notify) about a state change; nothing without
/// NOTIFY_SOCKET, and a failure is only logged.
pub fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("notifying systemd: {e}");
    }
}

pub fn preflight(config: &Config) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "lbd needs root (CAP_BPF and CAP_NET_ADMIN): run it as root or from the systemd unit"
        );
    }
    for name in &config.lb.interfaces {
        if crate::dataplane::ifindex_of(name).is_none() {
            bail!("interface {name} does not exist: fix lb.interfaces in the config");
        }
    }
    Ok(())
}

/// "0a1b..." (colons, spaces or a 0x prefix allowed) as octets.
fn parse_hex(text: &str) -> Result<Vec<u8>> {
    let digits: String = text
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .collect();
    if digits.is_empty()
        || !digits.len().is_multiple_of(2)
        || !digits.chars().all(|c| c.is_ascii_hexdigit())
    {
        bail!("{text:?}: an even number of hex digits is needed");
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).with_context(|| format!("{text:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_hex;

    #[test]
    fn connection_ids_parse_as_hex_octets() {
        assert_eq!(parse_hex("0a1B").unwrap(), vec![0x0a, 0x1b]);
        assert_eq!(parse_hex("0x0a:1b").unwrap(), vec![0x0a, 0x1b]);
        assert!(parse_hex("0a1").is_err());
        assert!(parse_hex("zz").is_err());
        assert!(parse_hex("").is_err());
        assert!(parse_hex("é1").is_err(), "no panic on other characters");
    }
}
