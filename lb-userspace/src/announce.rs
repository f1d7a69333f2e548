//! Announcing VIPs to routers through BIRD 2, which operators already run
//! for BGP (lbd is not a BGP speaker). lbd owns one include file that holds
//! a static protocol `lbd_vips` with a /32 route per IPv4 VIP address this
//! instance can serve and `lbd_vips6` with a /128 per IPv6 one; the
//! operator's BIRD config includes it and exports `proto = "lbd_vips"` (and
//! `"lbd_vips6"` on IPv6 channels) to its BGP peers. After each change lbd
//! runs `birdc configure`. See docs/operations.md for both sides' config.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// BIRD's control socket.
    #[serde(default = "default_socket")]
    pub bird_socket: String,
    /// The file lbd writes and BIRD includes.
    pub routes_file: String,
    /// The birdc binary.
    #[serde(default = "default_birdc")]
    pub birdc: String,
}

fn default_socket() -> String {
    "/run/bird/bird.ctl".into()
}
fn default_birdc() -> String {
    "birdc".into()
}

/// The include file announcing `vips` (empty set: protocols with no routes).
pub fn routes_file_text(vips: &BTreeSet<IpAddr>) -> String {
    let mut out = String::from("# Written by lbd: VIPs this instance can serve. Do not edit.\n");
    for (name, channel, v6, len) in [
        ("lbd_vips", "ipv4", false, 32),
        ("lbd_vips6", "ipv6", true, 128),
    ] {
        out.push_str(&format!("protocol static {name} {{\n  {channel};\n"));
        for vip in vips.iter().filter(|v| v.is_ipv6() == v6) {
            out.push_str(&format!("  route {vip}/{len} blackhole;\n"));
        }
        out.push_str("}\n");
    }
    out
}

pub struct Announcer {
    config: BgpConfig,
    announced: Option<BTreeSet<IpAddr>>,
}

impl Announcer {
    pub fn new(config: BgpConfig) -> Self {
        Announcer {
            config,
            announced: None,
        }
    }

    pub fn announced(&self) -> BTreeSet<IpAddr> {
        self.announced.clone().unwrap_or_default()
    }

    /// Makes BIRD announce exactly `vips`; does nothing if that is already so.
    pub fn set(&mut self, vips: BTreeSet<IpAddr>) -> Result<bool> {
        if self.announced.as_ref() == Some(&vips) {
            return Ok(false);
        }
        let path = PathBuf::from(&self.config.routes_file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, routes_file_text(&vips))
            .with_context(|| format!("writing {}", tmp.display()))?;
        // BIRD (user bird) reads it, whatever lbd's umask (0077 in the unit).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        let out = Command::new(&self.config.birdc)
            .args(["-s", &self.config.bird_socket, "configure"])
            .output()
            .with_context(|| format!("running {}", self.config.birdc))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success()
            || !text.contains("Reconfigured") && !text.contains("Reconfiguration in progress")
        {
            bail!(
                "birdc configure failed: {}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.announced = Some(vips);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_file_lists_each_vip_once() {
        let vips: BTreeSet<IpAddr> = [
            "10.0.0.10".parse().unwrap(),
            "10.0.0.11".parse().unwrap(),
            "fd00::10".parse().unwrap(),
        ]
        .into();
        let text = routes_file_text(&vips);
        assert!(text.contains("protocol static lbd_vips {\n  ipv4;\n"));
        assert!(
            text.contains("  route 10.0.0.10/32 blackhole;\n  route 10.0.0.11/32 blackhole;\n}")
        );
        assert!(
            text.contains(
                "protocol static lbd_vips6 {\n  ipv6;\n  route fd00::10/128 blackhole;\n}"
            )
        );
        assert_eq!(
            routes_file_text(&BTreeSet::new()).matches("route ").count(),
            0
        );
    }
}
