//! The daemon's side of fleet configuration (etcd): each revision of the
//! VIP keys applied as one reconcile or rejected whole (the last good one
//! keeps serving), edits sent to etcd as transactions, and what status and
//! metrics show of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Context, Result, anyhow};
use serde_json::json;
use tracing::{error, info, warn};

use super::Daemon;
use crate::{
    api::Request,
    config::{Config, VipConfig, describe_changes},
    fleet::{
        EtcdConfig, Snapshot,
        etcd::{FleetEvent, Write},
        health::{HealthView, Observation},
        merge, save, with_snapshot,
    },
    serve::Caller,
};

/// Where the snapshot an instance started with came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartedFrom {
    Etcd,
    /// etcd did not answer: the last revision this host applied.
    StateFile,
    /// Neither: the file's VIPs only until etcd answers.
    Nothing,
}

impl StartedFrom {
    pub fn name(self) -> &'static str {
        match self {
            StartedFrom::Etcd => "etcd",
            StartedFrom::StateFile => "state_file",
            StartedFrom::Nothing => "nothing",
        }
    }
}

/// What the daemon knows of the fleet configuration.
pub struct FleetState {
    pub cfg: EtcdConfig,
    /// The revision whose VIPs are in the working config.
    pub applied: Snapshot,
    /// Names of the working config's VIPs that came from etcd.
    pub names: BTreeSet<String>,
    /// The newest revision seen (applied or rejected).
    pub seen_revision: i64,
    pub connected: bool,
    pub last_error: Option<String>,
    /// The newest revision rejected and why; cleared by a good one.
    pub rejected: Option<(i64, String)>,
    pub rejected_total: u64,
    pub started_from: StartedFrom,
    /// Fleet health: the latest view of the live instances' observations.
    pub health_view: Option<HealthView>,
}

impl FleetState {
    /// The state for a start with `snap` (`None`: nothing to start from).
    pub fn new(cfg: EtcdConfig, snap: Option<Snapshot>, started_from: StartedFrom) -> Self {
        let applied = snap.unwrap_or_default();
        let names = applied
            .vips(&cfg)
            .map(|v| v.iter().map(VipConfig::name).collect())
            .unwrap_or_default();
        FleetState {
            seen_revision: applied.revision,
            connected: started_from == StartedFrom::Etcd,
            last_error: None,
            rejected: None,
            rejected_total: 0,
            cfg,
            applied,
            names,
            started_from,
            health_view: None,
        }
    }

    /// Keeps the applied revision next to the pinned state.
    fn persist(&self) {
        let path = std::path::Path::new(&self.cfg.state_file);
        if let Err(e) = save(path, &self.cfg.prefix, &self.applied) {
            warn!(file = %path.display(), "keeping the applied etcd revision: {e:#}");
        }
    }

    pub fn status(&self) -> serde_json::Value {
        json!({
            "source": "etcd",
            "endpoints": self.cfg.endpoints,
            "prefix": self.cfg.prefix,
            "instance": self.cfg.instance_name(),
            "health": self.cfg.health,
            "revision": self.applied.revision,
            "seen_revision": self.seen_revision,
            "connected": self.connected,
            // Serving a revision etcd may have moved past.
            "stale": !self.connected,
            "last_error": self.last_error,
            "rejected": self.rejected.as_ref().map(|(r, e)| json!({"revision": r, "error": e})),
            "rejected_total": self.rejected_total,
            "started_from": self.started_from.name(),
            "vips": self.names.len(),
            // Fleet health: live instances, and how many must see a backend down.
            "health_view": self.health_view.as_ref().map(|v| json!({
                "live_instances": v.live,
                "quorum": crate::fleet::health::quorum(v.live.len(), self.cfg.down_share),
                "observations": v.down.iter().map(|(i, d)| (i.clone(), d.len())).collect::<std::collections::BTreeMap<_, _>>(),
            })),
        })
    }
}

impl Daemon {
    /// What the etcd follower reports.
    pub fn on_fleet(&mut self, ev: FleetEvent) {
        let Some(f) = self.fleet.as_mut() else { return };
        match ev {
            FleetEvent::Connected => {
                if !f.connected {
                    info!(endpoints = ?f.cfg.endpoints, prefix = %f.cfg.prefix, "etcd reachable: following the fleet configuration");
                }
                f.connected = true;
                f.last_error = None;
            }
            FleetEvent::Lost(e) => {
                if f.connected || f.last_error.as_deref() != Some(&e) {
                    warn!(
                        revision = f.applied.revision,
                        "etcd unreachable, serving the last applied revision: {e}"
                    );
                }
                f.connected = false;
                f.last_error = Some(e);
            }
            FleetEvent::Snapshot(snap) => self.apply_fleet(snap),
            FleetEvent::Health(view) => self.on_fleet_health(Some(view)),
            FleetEvent::HealthLost(e) => {
                if self.fleet_down.is_some() {
                    warn!("fleet health: {e}");
                }
                self.on_fleet_health(None);
            }
        }
    }

    /// Applies one revision of the VIP keys as one reconcile, or rejects it
    /// whole and keeps serving the last good one.
    fn apply_fleet(&mut self, snap: Snapshot) {
        let Some(f) = self.fleet.as_mut() else { return };
        f.seen_revision = f.seen_revision.max(snap.revision);
        if snap.entries == f.applied.entries {
            // Nothing of ours changed (a restart's first read, say).
            if f.rejected.take().is_some() {
                info!(
                    revision = snap.revision,
                    "etcd is back at the applied configuration"
                );
            }
            if snap.revision > f.applied.revision {
                f.applied.revision = snap.revision;
                f.persist();
            }
            return;
        }
        let revision = snap.revision;
        match self.try_apply_fleet(snap) {
            Ok(changes) => {
                let f = self.fleet.as_mut().expect("fleet");
                f.rejected = None;
                f.persist();
                info!(revision, changes = %changes.join("; "), "etcd revision applied");
            }
            Err(e) => {
                let f = self.fleet.as_mut().expect("fleet");
                let applied = f.applied.revision;
                error!(
                    revision,
                    applied, "etcd revision rejected; the applied one keeps serving: {e:#}"
                );
                f.rejected = Some((revision, format!("{e:#}")));
                f.rejected_total += 1;
            }
        }
    }

    fn try_apply_fleet(&mut self, snap: Snapshot) -> Result<Vec<String>> {
        let f = self.fleet.as_ref().expect("fleet");
        let fleet_vips = snap.vips(&f.cfg)?;
        let names: BTreeSet<String> = fleet_vips.iter().map(VipConfig::name).collect();
        let mut candidate = self.config.clone();
        candidate.vips = merge(&self.local_vips(), fleet_vips)?;
        let changes = describe_changes(&self.config.vips, &candidate.vips);
        self.replace_config(candidate)?;
        let f = self.fleet.as_mut().expect("fleet");
        f.names = names;
        f.applied = snap;
        Ok(changes)
    }

    /// The file's VIPs for a reload: merged with etcd's, when there is one.
    pub(super) fn with_fleet_vips(&self, file: Config) -> Result<Config> {
        let Some(f) = &self.fleet else {
            return Ok(file);
        };
        let mut c = file;
        c.vips = merge(&c.vips, f.applied.vips(&f.cfg)?)?;
        Ok(c)
    }

    /// The working VIPs that came from the file (and runtime changes).
    pub(super) fn local_vips(&self) -> Vec<VipConfig> {
        let names = self.fleet.as_ref().map(|f| &f.names);
        self.config
            .vips
            .iter()
            .filter(|v| names.is_none_or(|n| !n.contains(&v.name())))
            .cloned()
            .collect()
    }

    pub fn from_etcd(&self, vip: &str) -> bool {
        self.fleet.as_ref().is_some_and(|f| f.names.contains(vip))
    }

    /// An edit that belongs in etcd (a new VIP, or a change of a VIP that
    /// came from it): checked like a local one, then returned as a
    /// transaction on that VIP's key at the revision applied here, for the
    /// caller to send. `None`: not an etcd edit (handled locally).
    pub fn fleet_write(
        &self,
        req: &Request,
        caller: Caller,
    ) -> Option<Result<(EtcdConfig, Write)>> {
        let f = self.fleet.as_ref()?;
        let name = match req {
            Request::AddVip { .. } => None,
            Request::RemoveVip { vip }
            | Request::AddBackend { vip, .. }
            | Request::RemoveBackend { vip, .. }
            | Request::Drain { vip, .. }
            | Request::SetWeight { vip, .. }
            | Request::SetState { vip, .. } => Some(vip.clone()),
            _ => return None,
        };
        if let Some(name) = &name
            && !f.names.contains(name)
        {
            return None;
        }
        let result = (|| {
            let (candidate, _) = self.edited(req)?.context("not an edit")?;
            candidate.validate()?;
            // The VIP this edit is about: the named one, or the new one.
            let name = match name {
                Some(n) => n,
                None => candidate
                    .vips
                    .last()
                    .map(VipConfig::name)
                    .context("no VIP")?,
            };
            let key = f.cfg.vip_key(&name);
            let value = candidate
                .vips
                .iter()
                .find(|v| v.name() == name)
                .map(crate::fleet::vip_value);
            let expected = f.applied.entries.get(&key).map_or(0, |e| e.mod_revision);
            if value.is_none() && expected == 0 {
                return Err(anyhow!("no VIP {name} in etcd"));
            }
            Ok((
                f.cfg.clone(),
                Write {
                    key,
                    value,
                    expected,
                },
            ))
        })();
        let request = serde_json::to_string(req).unwrap_or_default();
        match &result {
            Ok((_, w)) => {
                info!(uid = caller.uid, pid = caller.pid.unwrap_or(0), request = %request,
                key = %w.key, expected = w.expected, "control: change sent to etcd")
            }
            Err(e) => warn!(uid = caller.uid, pid = caller.pid.unwrap_or(0), request = %request,
                "control: change refused: {e:#}"),
        }
        Some(result)
    }
}

/// The fleet state lbd starts with, its VIPs merged into `config`: etcd's
/// current revision, else (etcd unreachable, or that revision invalid) the
/// last revision this host applied, else none (the file's VIPs only, until
/// etcd answers with a valid one).
pub async fn fleet_at_start(cfg: &EtcdConfig, config: &mut Config) -> FleetState {
    let saved = || match crate::fleet::load(std::path::Path::new(&cfg.state_file), &cfg.prefix) {
        Ok(s) => s,
        Err(e) => {
            warn!("the last applied etcd revision cannot be read: {e:#}");
            None
        }
    };
    let mut error = None;
    let current = match crate::fleet::etcd::read_once(cfg).await {
        Ok(s) => Some((s, StartedFrom::Etcd)),
        Err(e) => {
            warn!(state_file = %cfg.state_file, "etcd unreachable at start, serving the last revision applied here: {e:#}");
            error = Some(format!("{e:#}"));
            None
        }
    };
    let mut rejected = None;
    let mut chosen = None;
    // The state file is read only when etcd's revision is not served.
    let candidates = current.into_iter().chain(
        std::iter::once_with(saved)
            .flatten()
            .map(|s| (s, StartedFrom::StateFile)),
    );
    for (snap, from) in candidates {
        match with_snapshot(config, cfg, &snap) {
            Ok(c) => {
                *config = c;
                chosen = Some((snap, from));
                break;
            }
            Err(e) => {
                error!(
                    revision = snap.revision,
                    from = from.name(),
                    "etcd revision rejected: {e:#}"
                );
                rejected.get_or_insert((snap.revision, format!("{e:#}")));
            }
        }
    }
    let (snap, from) = chosen.map_or((None, StartedFrom::Nothing), |(s, f)| (Some(s), f));
    let mut state = FleetState::new(cfg.clone(), snap, from);
    state.last_error = error;
    state.rejected_total = rejected.is_some() as u64;
    state.rejected = rejected;
    if from == StartedFrom::Nothing {
        warn!(
            "no fleet revision to serve yet: the file's VIPs only, until etcd answers with a valid one"
        );
    } else {
        info!(
            revision = state.applied.revision,
            from = from.name(),
            vips = state.names.len(),
            "fleet configuration read"
        );
    }
    state
}

impl Daemon {
    /// Keeps the applied revision (after a start from etcd).
    pub fn persist_fleet(&self) {
        if let Some(f) = self
            .fleet
            .as_ref()
            .filter(|f| f.started_from == StartedFrom::Etcd)
        {
            f.persist();
        }
    }

    /// The `[etcd]` settings, when lbd follows etcd.
    pub fn etcd_config(&self) -> Option<&EtcdConfig> {
        self.fleet.as_ref().map(|f| &f.cfg)
    }
}

impl Daemon {
    /// Whether a backend (by address) of `v` takes traffic: the fleet's
    /// decision in fleet health mode (while etcd answers), else this
    /// instance's own checks.
    pub(super) fn healthy_in<'a>(&'a self, v: &VipConfig) -> impl Fn(IpAddr) -> bool + 'a {
        let key = super::vip_key(v);
        let fleet = self.fleet_down.as_ref().map(|d| d.get(&v.name()));
        move |addr| match fleet {
            Some(down) => !down.is_some_and(|d| d.contains(&addr)),
            None => self.health.get(&(key, addr)).copied().unwrap_or(true),
        }
    }

    /// Fleet health: how many live instances see the backend down.
    pub(super) fn seen_down_by(&self, vip: &str, addr: IpAddr) -> Option<usize> {
        let view = self.fleet.as_ref()?.health_view.as_ref()?;
        Some(view.seen_down_by(&(vip.to_string(), addr)))
    }

    /// What this instance's checks see down, by VIP name.
    fn local_observations(&self) -> BTreeSet<Observation> {
        let names: BTreeMap<_, _> = self
            .config
            .vips
            .iter()
            .map(|v| (super::vip_key(v), v.name()))
            .collect();
        self.health
            .iter()
            .filter(|(_, up)| !**up)
            .filter_map(|((k, addr), _)| Some((names.get(k)?.clone(), *addr)))
            .collect()
    }

    /// Fleet health: hands this instance's observations to the publisher;
    /// true when the fleet's view decides (so nothing is applied here).
    pub(super) fn publish_local_health(&mut self) -> bool {
        let Some(tx) = &self.local_down else {
            return false;
        };
        let observations = self.local_observations();
        tx.send_if_modified(|current| {
            let changed = *current != observations;
            *current = observations;
            changed
        });
        self.fleet_down.is_some()
    }

    /// Fleet health: starts publishing; the receiver goes to the publisher.
    pub fn start_fleet_health(
        &mut self,
    ) -> Option<(
        EtcdConfig,
        tokio::sync::watch::Receiver<BTreeSet<Observation>>,
    )> {
        let cfg = self.fleet.as_ref()?.cfg.clone();
        if !cfg.fleet_health() {
            return None;
        }
        let (tx, rx) = tokio::sync::watch::channel(self.local_observations());
        self.local_down = Some(tx);
        Some((cfg, rx))
    }

    /// The fleet's view changed (or was lost): the backends it decides
    /// down, applied when that changes the tables. Kept by VIP name, so a
    /// VIP or backend that a later revision adds is judged by it at once.
    pub(super) fn on_fleet_health(&mut self, view: Option<HealthView>) {
        let Some(f) = self.fleet.as_mut() else { return };
        let decided = view.as_ref().map(|v| {
            let mut by_vip: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
            for (vip, addr) in v.decided_down(f.cfg.down_share) {
                by_vip.entry(vip).or_default().insert(addr);
            }
            by_vip
        });
        f.health_view = view;
        if decided == self.fleet_down {
            return;
        }
        match (&self.fleet_down, &decided) {
            (None, Some(_)) => info!(
                "fleet health: backends leave the tables when a share of the live instances sees them down"
            ),
            (Some(_), None) => warn!(
                "fleet health lost (etcd unreachable): this instance decides alone until it is back"
            ),
            _ => {}
        }
        let pairs = |d: &Option<BTreeMap<String, BTreeSet<IpAddr>>>| -> BTreeSet<Observation> {
            d.iter()
                .flatten()
                .flat_map(|(vip, addrs)| addrs.iter().map(move |a| (vip.clone(), *a)))
                .collect()
        };
        let before = pairs(&std::mem::replace(&mut self.fleet_down, decided));
        let now = pairs(&self.fleet_down);
        for (vip, addr) in now.difference(&before) {
            warn!(backend = %addr, vip = %vip, "fleet health: backend down (seen by a quorum of instances)");
        }
        for (vip, addr) in before.difference(&now) {
            info!(backend = %addr, vip = %vip, "fleet health: backend up again");
        }
        if let Err(e) = self.apply() {
            error!("applying a fleet health change: {e:#}");
        }
    }
}
