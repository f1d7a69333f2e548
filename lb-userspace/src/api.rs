//! The control socket's protocol: one JSON request per line, one JSON
//! response per line. The socket is created mode 0600 (root only).

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Stats,
    Reload,
    AddVip {
        address: String,
        port: u16,
        protocol: String,
        table_size: Option<u32>,
        /// Its backends' health check (default: a TCP connect to the VIP's
        /// port, as `[vip.health] kind = "tcp"`; `kind = "none"`: none).
        #[serde(default)]
        health: Option<crate::health::HealthCheck>,
        /// A QUIC VIP (UDP) with the default QUIC-LB parameters.
        #[serde(default)]
        quic: bool,
    },
    RemoveVip {
        vip: String,
    },
    AddBackend {
        vip: String,
        address: String,
        weight: u32,
        /// "active" (default), "adding" or "removing".
        #[serde(default)]
        state: Option<String>,
        /// QUIC VIPs: the backend's server id (default: derived from its address).
        #[serde(default)]
        server_id: Option<u32>,
    },
    /// A backend's part in a change: "active", "adding" or "removing"
    /// (second-chance forwarding derives the previous table from them).
    SetState {
        vip: String,
        address: String,
        state: String,
    },
    RemoveBackend {
        vip: String,
        address: String,
    },
    /// Weight 0: no new flows, tracked flows continue.
    Drain {
        vip: String,
        address: String,
    },
    SetWeight {
        vip: String,
        address: String,
        weight: u32,
    },
    Trace {
        src: String,
        dst: String,
        protocol: String,
        /// QUIC VIPs: a destination connection ID (hex): which server a
        /// short-header packet carrying it goes to.
        #[serde(default)]
        quic_cid: Option<String>,
    },
    /// Tracked connections (bounded: `limit`, default 100).
    Flows {
        #[serde(default)]
        vip: Option<String>,
        #[serde(default)]
        backend: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// The running configuration (file plus runtime changes) as TOML.
    ConfigDump,
    /// Start capturing forwarded packets (of one VIP / backend, or all)
    /// for at most `seconds`; the answer names the ring to read.
    CaptureStart {
        #[serde(default)]
        vip: Option<String>,
        #[serde(default)]
        backend: Option<String>,
        seconds: u32,
    },
    /// Stop capturing.
    CaptureStop,
    /// Withdraw every VIP from the routers (BGP) and stop announcing.
    DrainInstance,
    /// Announce again what this instance can serve.
    ResumeInstance,
}

impl Request {
    /// Whether the request changes anything (and so goes to the audit log).
    pub fn is_change(&self) -> bool {
        !matches!(
            self,
            Request::Status | Request::Stats | Request::Trace { .. }
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
        }
    }
}

/// A VIP as `lbctl status` names it: `10.0.0.10:80/tcp`,
/// `[fd00::10]:80/udp`. Returns (address, port, protocol).
pub fn parse_vip_name(name: &str) -> Result<(std::net::IpAddr, u16, String)> {
    let (addr, proto) = name.rsplit_once('/').with_context(|| {
        format!(
            "{name:?}: expected ADDRESS:PORT/PROTOCOL, e.g. 10.0.0.10:80/tcp or [fd00::10]:80/tcp"
        )
    })?;
    if proto != "tcp" && proto != "udp" {
        anyhow::bail!("{name:?}: protocol {proto:?} is not tcp or udp");
    }
    let sa: std::net::SocketAddr = addr.parse().with_context(|| {
        format!("{name:?}: {addr:?} is not ADDRESS:PORT (IPv6 in brackets: [fd00::10]:80)")
    })?;
    Ok((sa.ip(), sa.port(), proto.to_string()))
}

/// Sends one request to the daemon (blocking; used by `lbctl`).
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is lbd running? are you root?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).context("malformed reply from lbd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_names_parse_as_status_prints_them() {
        let (a, p, proto) = parse_vip_name("10.0.0.10:80/tcp").unwrap();
        assert_eq!(
            (a.to_string(), p, proto.as_str()),
            ("10.0.0.10".into(), 80, "tcp")
        );
        let (a, p, proto) = parse_vip_name("[fd00::10]:53/udp").unwrap();
        assert_eq!(
            (a.to_string(), p, proto.as_str()),
            ("fd00::10".into(), 53, "udp")
        );
        assert!(parse_vip_name("10.0.0.10:80").is_err());
        assert!(parse_vip_name("10.0.0.10:80/sctp").is_err());
        assert!(parse_vip_name("fd00::10:80/tcp").is_err());
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::Drain {
            vip: "10.0.0.10:80/tcp".into(),
            address: "10.30.1.2".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"drain","vip":"10.0.0.10:80/tcp","address":"10.30.1.2"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }
}
