//! Fleet configuration from etcd: every instance takes its VIPs, backends
//! and their weights/states from one key prefix, at one revision, so every
//! instance builds the same tables. The local file keeps what is per host
//! (`[lb]`, `[bgp]`) and may add VIPs of its own.
//!
//! Keys (under `[etcd] prefix`, default `/lbd/`):
//! - `vips/<VIP name>` (`vips/10.0.0.10:80/tcp`): the VIP as JSON, the
//!   schema of a `[[vip]]` section (`lbctl` writes them).
//! - `health/<instance>/<VIP name>/<backend>`: fleet health mode, what an
//!   instance sees down (on the instance's lease).
//! - `instances/<instance>`: live instances (on their leases).
//!
//! This module is the pure part (keys, parsing, merging, the persisted
//! last revision); `etcd` talks to the store.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::VipConfig;

pub mod etcd;
pub mod health;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// etcd client URLs (`http://10.1.0.5:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet's configuration (ends with `/`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The last applied revision is kept here, so a restart while etcd is
    /// unreachable serves it (not on bpffs: that holds only BPF objects).
    #[serde(default = "default_state_file")]
    pub state_file: String,
    /// How long one request to etcd may take (connect, read, write).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// This instance's name in the fleet (default: the host name).
    #[serde(default)]
    pub instance: Option<String>,
    /// "local": each instance decides its backends' health alone (a fault
    /// only one instance sees makes its table differ); "fleet": instances
    /// publish what they see down, and a backend leaves every table when
    /// `down_share` of the live instances see it down.
    #[serde(default = "default_health")]
    pub health: String,
    #[serde(default = "default_down_share")]
    pub down_share: f64,
}

fn default_prefix() -> String {
    "/lbd/".into()
}
fn default_state_file() -> String {
    "/var/lib/lbd/etcd-state.json".into()
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_health() -> String {
    "local".into()
}
fn default_down_share() -> f64 {
    0.5
}

impl EtcdConfig {
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            bail!("etcd.endpoints: name at least one etcd client URL");
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("etcd.endpoints: {e:?} is not a URL (http://host:2379)");
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            bail!(
                "etcd.prefix: {:?} must start and end with '/' (\"/lbd/\")",
                self.prefix
            );
        }
        if self.state_file.is_empty() || !self.state_file.starts_with('/') {
            bail!("etcd.state_file: must be an absolute path");
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            bail!("etcd.timeout_ms: {} is not in 100..=60000", self.timeout_ms);
        }
        if !["local", "fleet"].contains(&self.health.as_str()) {
            bail!("etcd.health: {:?} is not one of local, fleet", self.health);
        }
        if !(self.down_share > 0.0 && self.down_share <= 1.0) {
            bail!(
                "etcd.down_share: {} must be above 0 and at most 1",
                self.down_share
            );
        }
        if let Some(name) = &self.instance
            && (name.is_empty() || name.contains('/'))
        {
            bail!("etcd.instance: {name:?} must be non-empty and without '/'");
        }
        Ok(())
    }

    /// This instance's name: configured, else the host name.
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "lbd".into())
        })
    }

    pub fn vips_prefix(&self) -> String {
        format!("{}vips/", self.prefix)
    }

    /// The key of the VIP named `name`.
    pub fn vip_key(&self, name: &str) -> String {
        format!("{}{name}", self.vips_prefix())
    }

    pub fn fleet_health(&self) -> bool {
        self.health == "fleet"
    }
}

/// One key's value and the revision that last changed it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    pub mod_revision: i64,
}

/// The VIP keys at one revision of the store.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    /// The etcd revision of the newest change to the VIP keys it reflects.
    pub revision: i64,
    /// Key (whole, with the prefix) -> value.
    pub entries: BTreeMap<String, Entry>,
}

impl Snapshot {
    /// The VIPs it holds, each checked against its key. An error names the
    /// key at fault.
    pub fn vips(&self, cfg: &EtcdConfig) -> Result<Vec<VipConfig>> {
        let prefix = cfg.vips_prefix();
        self.entries
            .iter()
            .map(|(key, entry)| {
                let vip = parse_vip(&entry.value).with_context(|| format!("etcd key {key}"))?;
                let want = cfg.vip_key(&vip.name());
                if *key != want {
                    bail!(
                        "etcd key {key}: holds VIP {} (its key is {want}); keys under {prefix} are named by their VIP",
                        vip.name()
                    );
                }
                Ok(vip)
            })
            .collect()
    }
}

/// `config` (the file's VIPs) with `snap`'s VIPs after them, checked as a
/// whole, as lbd would run it.
pub fn with_snapshot(
    config: &crate::config::Config,
    cfg: &EtcdConfig,
    snap: &Snapshot,
) -> Result<crate::config::Config> {
    let mut c = config.clone();
    c.vips = merge(&config.vips, snap.vips(cfg)?)?;
    c.validate()?;
    Ok(c)
}

/// A VIP as etcd holds it (JSON, the schema of a `[[vip]]` section).
pub fn parse_vip(text: &str) -> Result<VipConfig> {
    serde_json::from_str(text).context("not a VIP (JSON of a [[vip]] section)")
}

/// A VIP as `lbctl` writes it to etcd.
pub fn vip_value(v: &VipConfig) -> String {
    serde_json::to_string_pretty(v).expect("a VIP serializes")
}

/// The file's VIPs followed by etcd's; a VIP in both is an error (which of
/// the two should win is not for lbd to guess).
pub fn merge(file: &[VipConfig], fleet: Vec<VipConfig>) -> Result<Vec<VipConfig>> {
    let mut out = file.to_vec();
    for v in fleet {
        if file.iter().any(|f| f.name() == v.name()) {
            bail!(
                "VIP {} is both in the file and in etcd: remove one",
                v.name()
            );
        }
        out.push(v);
    }
    Ok(out)
}

/// The last applied snapshot, as kept in `state_file`.
#[derive(Debug, Deserialize, Serialize)]
struct Saved {
    prefix: String,
    snapshot: Snapshot,
}

/// Keeps `snap` (applied) in `path`: written aside, synced, renamed, so a
/// crash leaves the old file or the new one.
pub fn save(path: &Path, prefix: &str, snap: &Snapshot) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let text = serde_json::to_vec(&Saved {
        prefix: prefix.into(),
        snapshot: snap.clone(),
    })?;
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The snapshot kept in `path` for `prefix` (`None`: no file, or one of
/// another prefix).
pub fn load(path: &Path, prefix: &str) -> Result<Option<Snapshot>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let saved: Saved =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok((saved.prefix == prefix).then_some(saved.snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EtcdConfig {
        toml::from_str("endpoints = [\"http://127.0.0.1:2379\"]").unwrap()
    }

    fn vip(addr: &str, port: u16) -> VipConfig {
        toml::from_str(&format!(
            "address = \"{addr}\"\nport = {port}\nprotocol = \"tcp\"\n[[backend]]\naddress = \"10.30.1.2\"\n"
        ))
        .unwrap()
    }

    fn snapshot(vips: &[VipConfig]) -> Snapshot {
        let c = cfg();
        Snapshot {
            revision: 7,
            entries: vips
                .iter()
                .map(|v| {
                    (
                        c.vip_key(&v.name()),
                        Entry {
                            value: vip_value(v),
                            mod_revision: 3,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn vips_read_back_from_their_keys() {
        let vips = vec![vip("10.0.0.10", 80), vip("fd00::10", 443)];
        let snap = snapshot(&vips);
        assert!(snap.entries.contains_key("/lbd/vips/10.0.0.10:80/tcp"));
        assert!(snap.entries.contains_key("/lbd/vips/[fd00::10]:443/tcp"));
        let mut back = snap.vips(&cfg()).unwrap();
        back.sort_by_key(|v| v.name());
        assert_eq!(back, vips);
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut snap = snapshot(&[vip("10.0.0.10", 80)]);
        snap.entries.insert(
            "/lbd/vips/10.0.0.11:80/tcp".into(),
            Entry {
                value: "{\"address\": 12}".into(),
                mod_revision: 5,
            },
        );
        let e = format!("{:#}", snap.vips(&cfg()).unwrap_err());
        assert!(e.contains("etcd key /lbd/vips/10.0.0.11:80/tcp"), "{e}");
        // A value under another VIP's key.
        let mut snap = snapshot(&[]);
        snap.entries.insert(
            "/lbd/vips/10.0.0.12:80/tcp".into(),
            Entry {
                value: vip_value(&vip("10.0.0.10", 80)),
                mod_revision: 5,
            },
        );
        let e = format!("{:#}", snap.vips(&cfg()).unwrap_err());
        assert!(e.contains("holds VIP 10.0.0.10:80/tcp"), "{e}");
    }

    #[test]
    fn a_vip_in_file_and_etcd_is_refused() {
        let file = vec![vip("10.0.0.10", 80)];
        assert_eq!(merge(&file, vec![vip("10.0.0.10", 53)]).unwrap().len(), 2);
        let e = merge(&file, vec![vip("10.0.0.10", 80)]).unwrap_err();
        assert!(
            e.to_string().contains("both in the file and in etcd"),
            "{e}"
        );
    }

    #[test]
    fn settings_are_checked() {
        let ok = cfg();
        ok.validate().unwrap();
        assert_eq!(ok.prefix, "/lbd/");
        assert_eq!(ok.health, "local");
        for (field, change) in [
            ("etcd.endpoints", "endpoints = []"),
            ("etcd.endpoints", "endpoints = [\"10.0.0.1:2379\"]"),
            (
                "etcd.prefix",
                "endpoints = [\"http://a:1\"]\nprefix = \"lbd\"",
            ),
            (
                "etcd.health",
                "endpoints = [\"http://a:1\"]\nhealth = \"vote\"",
            ),
            (
                "etcd.down_share",
                "endpoints = [\"http://a:1\"]\ndown_share = 0.0",
            ),
            (
                "etcd.state_file",
                "endpoints = [\"http://a:1\"]\nstate_file = \"rel\"",
            ),
            (
                "etcd.instance",
                "endpoints = [\"http://a:1\"]\ninstance = \"a/b\"",
            ),
        ] {
            let c: EtcdConfig = toml::from_str(change).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(field), "{change}: {e}");
        }
    }

    #[test]
    fn the_applied_snapshot_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("lbd-fleet-test-{}", std::process::id()));
        let path = dir.join("state.json");
        let snap = snapshot(&[vip("10.0.0.10", 80)]);
        save(&path, "/lbd/", &snap).unwrap();
        assert_eq!(load(&path, "/lbd/").unwrap(), Some(snap));
        // Another fleet's file is not this one's state.
        assert_eq!(load(&path, "/other/").unwrap(), None);
        assert_eq!(load(&dir.join("none.json"), "/lbd/").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
