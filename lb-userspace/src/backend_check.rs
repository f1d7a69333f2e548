//! `lbctl check-backend`: what is wrong with a backend host's setup for
//! direct server return, the most reported trouble with balancers of this
//! kind. Reads the host's state (`ip -j`, /proc/sys) in the current network
//! namespace; the verdicts are plain functions, unit-tested.

use std::{net::IpAddr, process::Command};

use anyhow::{Context, Result};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub level: Level,
    pub message: String,
}

fn finding(level: Level, message: impl Into<String>) -> Finding {
    Finding {
        level,
        message: message.into(),
    }
}

/// Is `vip` among the addresses in `ip -j addr show dev lo` output?
pub fn vip_on_lo(addr_json: &Value, vip: IpAddr) -> Finding {
    let on_lo = addr_json
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .any(|a| a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(vip));
    if on_lo {
        finding(Level::Ok, format!("VIP {vip} is on lo"))
    } else {
        let len = if vip.is_ipv6() { 128 } else { 32 };
        finding(
            Level::Fail,
            format!(
                "VIP {vip} is not on lo: the kernel drops its packets. Fix: ip addr add {vip}/{len} dev lo"
            ),
        )
    }
}

/// Is the `decap` program attached, per `ip -j link show dev IF` output?
pub fn decap_attached(link_json: &Value, interface: &str) -> Finding {
    let prog = &link_json[0]["xdp"]["prog"];
    match prog["name"].as_str() {
        Some("decap") => finding(
            Level::Ok,
            format!(
                "decap is attached to {interface} (program id {})",
                prog["id"]
            ),
        ),
        Some(other) => finding(
            Level::Fail,
            format!(
                "{interface} runs XDP program {other:?}, not decap. Fix: lbd backend --interface {interface}"
            ),
        ),
        None => finding(
            Level::Fail,
            format!(
                "no decapsulation on {interface}: IPIP packets from the balancer are dropped. \
                 Fix: lbd backend --interface {interface} (or a kernel ipip tunnel where the module exists)"
            ),
        ),
    }
}

/// Effective reverse-path filter is the larger of `all` and the interface's.
pub fn rp_filter(all: u32, iface: u32, interface: &str) -> Finding {
    match all.max(iface) {
        1 => finding(
            Level::Fail,
            format!(
                "rp_filter is strict (1) on {interface}: decapsulated packets carry the client's address and are \
                 dropped unless the route back leaves by {interface}. Fix: sysctl -w net.ipv4.conf.all.rp_filter=2 \
                 net.ipv4.conf.{interface}.rp_filter=2"
            ),
        ),
        v => finding(
            Level::Ok,
            format!(
                "rp_filter on {interface} is {v} ({})",
                if v == 0 { "off" } else { "loose" }
            ),
        ),
    }
}

pub fn arp_settings(arp_ignore: u32, arp_announce: u32) -> Finding {
    if arp_ignore >= 1 && arp_announce >= 2 {
        finding(
            Level::Ok,
            "arp_ignore/arp_announce keep the VIP on lo from being announced",
        )
    } else {
        finding(
            Level::Warn,
            format!(
                "arp_ignore={arp_ignore}, arp_announce={arp_announce}: this host may answer ARP for the VIP on its \
                 other interfaces and steal traffic from the balancer. Fix: sysctl -w net.ipv4.conf.all.arp_ignore=1 \
                 net.ipv4.conf.all.arp_announce=2"
            ),
        )
    }
}

fn ip_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing ip -j output")
}

/// An IPv4 conf sysctl; an error names the file (a missing one means the
/// interface does not exist, not 0).
fn sysctl(path: &str) -> Result<u32> {
    let file = format!("/proc/sys/net/ipv4/conf/{path}");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{file}: {:?} is not a number", text.trim()))
}

/// Runs every check for `vips` arriving on `interface`.
pub fn check(vips: &[IpAddr], interface: &str) -> Result<Vec<Finding>> {
    let lo = ip_json(&["addr", "show", "dev", "lo"])?;
    let mut findings: Vec<Finding> = vips.iter().map(|v| vip_on_lo(&lo, *v)).collect();
    match ip_json(&["link", "show", "dev", interface]) {
        Ok(link) => findings.push(decap_attached(&link, interface)),
        Err(e) => {
            // Nothing else about it can be judged.
            findings.push(finding(
                Level::Fail,
                format!("interface {interface}: {e:#}"),
            ));
            return Ok(findings);
        }
    }
    let read = |findings: &mut Vec<Finding>, path: &str| match sysctl(path) {
        Ok(v) => Some(v),
        Err(e) => {
            findings.push(finding(Level::Fail, format!("{e:#}")));
            None
        }
    };
    let all = read(&mut findings, "all/rp_filter");
    let own = read(&mut findings, &format!("{interface}/rp_filter"));
    if let (Some(all), Some(own)) = (all, own) {
        findings.push(rp_filter(all, own, interface));
    }
    let ignore = read(&mut findings, "all/arp_ignore");
    let announce = read(&mut findings, "all/arp_announce");
    if let (Some(ignore), Some(announce)) = (ignore, announce) {
        findings.push(arp_settings(ignore, announce));
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let vip: IpAddr = "10.0.0.10".parse().unwrap();
        let lo: Value = serde_json::from_str(
            r#"[{"ifname":"lo","addr_info":[{"local":"127.0.0.1"},{"local":"10.0.0.10"}]}]"#,
        )
        .unwrap();
        assert_eq!(vip_on_lo(&lo, vip).level, Level::Ok);
        let bare: Value =
            serde_json::from_str(r#"[{"ifname":"lo","addr_info":[{"local":"127.0.0.1"}]}]"#)
                .unwrap();
        assert_eq!(vip_on_lo(&bare, vip).level, Level::Fail);
        let vip6: IpAddr = "fd00::10".parse().unwrap();
        let lo6: Value = serde_json::from_str(
            r#"[{"ifname":"lo","addr_info":[{"local":"::1"},{"local":"fd00::10"}]}]"#,
        )
        .unwrap();
        assert_eq!(vip_on_lo(&lo6, vip6).level, Level::Ok);
        let missing = vip_on_lo(&bare, vip6);
        assert_eq!(missing.level, Level::Fail);
        assert!(
            missing.message.contains("ip addr add fd00::10/128 dev lo"),
            "{}",
            missing.message
        );
        let link: Value = serde_json::from_str(
            r#"[{"ifname":"eth0","xdp":{"mode":2,"prog":{"id":7,"name":"decap"}}}]"#,
        )
        .unwrap();
        assert_eq!(decap_attached(&link, "eth0").level, Level::Ok);
        let none: Value = serde_json::from_str(r#"[{"ifname":"eth0"}]"#).unwrap();
        assert_eq!(decap_attached(&none, "eth0").level, Level::Fail);
        assert_eq!(rp_filter(0, 1, "eth0").level, Level::Fail);
        assert_eq!(
            rp_filter(2, 1, "eth0").level,
            Level::Ok,
            "the larger value wins"
        );
        assert_eq!(arp_settings(0, 0).level, Level::Warn);
    }
}
