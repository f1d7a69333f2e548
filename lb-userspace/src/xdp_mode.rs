//! Which XDP mode to attach in. `auto` lets the kernel use the driver's
//! native hook, except on veth: there, native XDP sees frames from a local
//! sender with only a partial L4 checksum (the sender's TX offload), which
//! no one completes once the frame is encapsulated, so the backend drops
//! every packet; and XDP_TX frames are dropped unless the peer has an XDP
//! program too. Generic (skb) mode completes the checksum first and
//! transmits as is, so `auto` picks it on veth and says so.

use std::os::fd::AsRawFd;

use anyhow::{Result, bail};
use aya::programs::XdpMode;

/// The mode to attach in, and a few words on why (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub mode: XdpMode,
    /// "native", "skb" or "auto".
    pub name: &'static str,
    pub why: &'static str,
}

/// The configured name as a mode (no interface involved).
pub fn parse(name: &str) -> Result<XdpMode> {
    Ok(match name {
        "auto" => XdpMode::Default,
        "driver" => XdpMode::Driver,
        "skb" => XdpMode::Skb,
        other => bail!("xdp mode {other:?} is not one of auto, driver, skb"),
    })
}

/// The configured mode as it is, whatever the interface.
pub fn configured(name: &str) -> Result<Chosen> {
    let mode = parse(name)?;
    Ok(match mode {
        XdpMode::Default => Chosen {
            mode,
            name: "auto",
            why: "native if the driver supports it, else generic",
        },
        XdpMode::Driver => Chosen {
            mode,
            name: "native",
            why: "configured",
        },
        _ => Chosen {
            mode,
            name: "skb",
            why: "configured",
        },
    })
}

/// The mode for `interface` under the configured `name` (the balancer's,
/// and the backends' decap, which sends second hops back out with XDP_TX).
pub fn choose(interface: &str, name: &str) -> Result<Chosen> {
    let chosen = configured(name)?;
    if driver_of(interface).as_deref() != Some("veth") {
        return Ok(chosen);
    }
    Ok(match chosen.mode {
        XdpMode::Default => Chosen {
            mode: XdpMode::Skb,
            name: "skb",
            why: "auto on a veth: native XDP would forward locally sent frames with partial \
                  checksums, and drops XDP_TX frames unless the peer runs XDP too",
        },
        XdpMode::Driver => Chosen {
            why: "configured; on a veth, senders in this host need TX checksum offload off \
                  (ethtool -K DEV tx off) and the peer an XDP program for XDP_TX",
            ..chosen
        },
        _ => chosen,
    })
}

/// The interface's driver name (ETHTOOL_GDRVINFO), e.g. "veth", "mlx5_core".
pub fn driver_of(interface: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if interface.len() >= 16 {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..interface.len()].copy_from_slice(interface.as_bytes());
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .ok()?;
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a
    // drvinfo buffer that outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_ethtool_driver_and_auto_stays_auto() {
        // `lo` answers GDRVINFO with nothing useful or an error: not veth.
        assert_ne!(driver_of("lo").as_deref(), Some("veth"));
        assert_eq!(choose("lo", "auto").unwrap().mode, XdpMode::Default);
        assert_eq!(choose("lo", "skb").unwrap().mode, XdpMode::Skb);
        assert!(choose("lo", "fast").is_err());
    }
}
