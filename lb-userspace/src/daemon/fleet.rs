//! The daemon's side of fleet configuration (etcd): each revision of the
//! VIP keys applied as one reconcile or rejected whole (the last good one
//! keeps serving), edits sent to etcd as transactions, and what status and
//! metrics show of it.

use std::collections::BTreeSet;

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
        merge, save,
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
        }
    }

    /// The working VIPs for `snap` over `local` (the file's and their
    /// runtime changes).
    pub fn vips_for(&self, local: &[VipConfig], snap: &Snapshot) -> Result<Vec<VipConfig>> {
        merge(local, snap.vips(&self.cfg)?)
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
            if snap.revision != f.applied.revision {
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
        let local: Vec<VipConfig> = self
            .config
            .vips
            .iter()
            .filter(|v| !f.names.contains(&v.name()))
            .cloned()
            .collect();
        let vips = f.vips_for(&local, &snap)?;
        let names = snap
            .vips(&f.cfg)?
            .iter()
            .map(VipConfig::name)
            .collect::<BTreeSet<_>>();
        let mut candidate = self.config.clone();
        candidate.vips = vips;
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
        c.vips = f.vips_for(&c.vips, &f.applied)?;
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
    let mut tried = Vec::new();
    let mut error = None;
    match crate::fleet::etcd::read_once(cfg).await {
        Ok(s) => tried.push((s, StartedFrom::Etcd)),
        Err(e) => {
            warn!(state_file = %cfg.state_file, "etcd unreachable at start, serving the last revision applied here: {e:#}");
            error = Some(format!("{e:#}"));
        }
    }
    let mut rejected = None;
    for (snap, from) in tried
        .into_iter()
        .chain(saved().map(|s| (s, StartedFrom::StateFile)))
    {
        let state = FleetState::new(cfg.clone(), None, from);
        let candidate = state.vips_for(&config.vips, &snap).and_then(|vips| {
            let mut c = config.clone();
            c.vips = vips;
            c.validate()?;
            Ok(c)
        });
        match candidate {
            Ok(c) => {
                *config = c;
                let mut state = FleetState::new(cfg.clone(), Some(snap), from);
                state.last_error = error;
                if let Some(r) = rejected {
                    state.rejected = Some(r);
                    state.rejected_total = 1;
                }
                info!(
                    revision = state.applied.revision,
                    from = from.name(),
                    vips = state.names.len(),
                    "fleet configuration read"
                );
                return state;
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
    let mut state = FleetState::new(cfg.clone(), None, StartedFrom::Nothing);
    state.last_error = error;
    if let Some(r) = rejected {
        state.rejected = Some(r);
        state.rejected_total = 1;
    }
    warn!(
        "no fleet revision to serve yet: the file's VIPs only, until etcd answers with a valid one"
    );
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
