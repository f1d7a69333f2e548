//! The daemon's configuration file (TOML) and its validation. Errors name
//! the field and the VIP or backend at fault; a bad file never replaces a
//! running configuration.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    maglev::{DEFAULT_TABLE_SIZE, validate_table_size},
    maps::{VIP_F_GUE, VIP_F_QUIC},
    quic_lb::{QuicLbParams, allocated_server_id},
    settings::{SETTINGS_F_GATEWAY_MAC, Settings},
    user::addr_from_ip,
};
use serde::{Deserialize, Serialize};

use crate::health::HealthCheck;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub lb: LbConfig,
    /// Announce VIPs over BGP through BIRD (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::announce::BgpConfig>,
    /// Take VIPs from etcd too, at one revision for the whole fleet (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<crate::fleet::EtcdConfig>,
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    /// The interface(s) facing the routers.
    pub interfaces: Vec<String>,
    /// "auto", "driver" (native) or "skb" (generic).
    #[serde(default = "default_mode")]
    pub xdp_mode: String,
    /// Seed of the flow hash and of Maglev permutations: the same on every instance.
    #[serde(default)]
    pub hash_seed: u32,
    #[serde(default = "default_conntrack")]
    pub conntrack_entries: u32,
    /// VIPs this instance can hold (sizes the per-VIP maps at load time).
    #[serde(default = "default_max_vips")]
    pub max_vips: u32,
    /// Backend ids: one per (VIP, backend) pair, plus those of removed
    /// backends kept for the second-chance window (sizes the per-backend
    /// maps at load time).
    #[serde(default = "default_max_backends")]
    pub max_backends: u32,
    /// Capacity for all VIPs' tables; each VIP needs twice its size during a swap.
    #[serde(default = "default_slots")]
    pub maglev_slots: u32,
    /// Outer source addresses are taken from this prefix, varied by flow.
    #[serde(default = "default_prefix")]
    pub encap_source_prefix: String,
    /// Outer IPv6 source addresses (toward IPv6 backends): this /96 with
    /// the flow hash in the last 32 bits.
    #[serde(default = "default_prefix6")]
    pub encap_source_prefix6: String,
    /// "ipip" (IP-in-IP: IPIP, IP6IP6, 4in6, 6in4) or "gue" (the same
    /// inside UDP to `gue_port`); a VIP may override it.
    #[serde(default = "default_encap")]
    pub encap: String,
    /// GUE destination port (the backends' decap listens on it).
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
    /// Largest packet that may leave toward a backend once encapsulated;
    /// larger ones are answered with "fragmentation needed"/"packet too
    /// big". 0 = only the egress interface's MTU applies.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Next-hop MAC used when the kernel's FIB has no route to a backend.
    pub gateway_mac: Option<String>,
    #[serde(default = "default_udp_timeout")]
    pub udp_idle_timeout_secs: u64,
    /// Second-chance forwarding: how long a VIP keeps its previous table
    /// after a change (0 = off). Within it, a mid-connection TCP packet
    /// this instance has no entry for, whose slot changed owner, goes to
    /// the new owner with the old one as a second hop.
    #[serde(default = "default_second_chance")]
    pub second_chance_window_secs: u64,
    /// New flows each CPU records per second (SYN flood guard); 0 = no limit.
    #[serde(default = "default_new_flows")]
    pub max_new_flows_per_sec: u32,
    /// bpffs directory for pinned maps and links ("" = pin nothing: the
    /// data plane then stops with the daemon).
    #[serde(default = "default_pin_path")]
    pub pin_path: String,
    /// Unix socket for `lbctl` (root only).
    #[serde(default = "default_socket")]
    pub control_socket: String,
    /// Prometheus endpoint ("" = off). Loopback by default.
    #[serde(default = "default_metrics")]
    pub metrics_address: String,
    /// Per-backend series (VIPs x backends of them); false keeps the
    /// scrape to per-VIP and global families at thousands of backends.
    #[serde(default = "default_true")]
    pub metrics_backend_series: bool,
}

fn default_true() -> bool {
    true
}
fn default_max_vips() -> u32 {
    lb_common::maps::MAX_VIPS
}
fn default_max_backends() -> u32 {
    lb_common::maps::MAX_BACKENDS
}
/// Bounds of `max_vips` and `max_backends` (the per-CPU counters of a
/// million backends already take 16 MiB per CPU).
pub const MAX_VIPS_LIMIT: u32 = 65_536;
pub const MAX_BACKENDS_LIMIT: u32 = 1 << 20;

fn default_prefix6() -> String {
    "fd00:172:16::/96".into()
}
fn default_encap() -> String {
    "ipip".into()
}
fn default_gue_port() -> u16 {
    lb_common::settings::DEFAULT_GUE_PORT
}
fn default_mtu() -> u16 {
    1500
}
fn default_new_flows() -> u32 {
    125_000
}
fn default_pin_path() -> String {
    "/sys/fs/bpf/lbd".into()
}
/// The control socket's default directory: systemd's RuntimeDirectory=lbd,
/// created by lbd itself when it runs outside the unit.
pub const DEFAULT_SOCKET_DIR: &str = "/run/lbd";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lbd/lbd.sock";

fn default_socket() -> String {
    DEFAULT_CONTROL_SOCKET.into()
}
fn default_metrics() -> String {
    "127.0.0.1:9641".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub address: IpAddr,
    /// 0 = every port.
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// How backends are checked; none by default.
    #[serde(default)]
    pub health: HealthCheck,
    /// "ipip" or "gue"; default: `lb.encap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encap: Option<String>,
    /// A QUIC VIP (UDP): short-header packets go to the backend whose
    /// server id their connection ID carries (QUIC-LB), whatever the
    /// client's address and port.
    #[serde(default, skip_serializing_if = "is_false")]
    pub quic: bool,
    /// The QUIC-LB connection ID parameters (defaults when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic_lb: Option<QuicLbConfig>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `[vip.quic_lb]`: how the VIP's servers build connection IDs: first
/// octet (3 bits of `config_id`, 5 of length), `server_id_len` octets of
/// server id, `nonce_len` octets of nonce.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuicLbConfig {
    #[serde(default)]
    pub config_id: u8,
    #[serde(default = "default_server_id_len")]
    pub server_id_len: u8,
    #[serde(default = "default_nonce_len")]
    pub nonce_len: u8,
}

impl Default for QuicLbConfig {
    fn default() -> Self {
        QuicLbConfig {
            config_id: 0,
            server_id_len: default_server_id_len(),
            nonce_len: default_nonce_len(),
        }
    }
}

fn default_server_id_len() -> u8 {
    2
}
fn default_nonce_len() -> u8 {
    6
}

impl QuicLbConfig {
    pub fn params(&self) -> QuicLbParams {
        QuicLbParams {
            config_id: self.config_id,
            server_id_len: self.server_id_len,
            nonce_len: self.nonce_len,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// "active" (default), "adding" or "removing": during a change, every
    /// instance (one started after it too) derives the VIP's previous table
    /// from these states (active and removing backends) beside the current
    /// one (active and adding), for second-chance forwarding. "removing"
    /// takes no new flows; its tracked ones continue, as with weight 0.
    #[serde(default = "default_state")]
    pub state: String,
    /// QUIC VIPs: the server id this backend embeds in its connection IDs
    /// (default: derived from its address, see `lbctl status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u32>,
}

/// `BackendConfig::state` values.
pub const BACKEND_STATES: [&str; 3] = ["active", "adding", "removing"];

fn default_state() -> String {
    "active".into()
}

fn default_mode() -> String {
    "auto".into()
}
fn default_conntrack() -> u32 {
    1 << 20
}
fn default_slots() -> u32 {
    1 << 21
}
fn default_prefix() -> String {
    "172.16.0.0/16".into()
}
fn default_udp_timeout() -> u64 {
    30
}
fn default_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}
fn default_weight() -> u32 {
    1
}
fn default_second_chance() -> u64 {
    600
}

impl VipConfig {
    pub fn proto(&self) -> u8 {
        if self.protocol == "udp" {
            PROTO_UDP
        } else {
            PROTO_TCP
        }
    }

    pub fn name(&self) -> String {
        match self.address {
            IpAddr::V4(a) => format!("{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => format!("[{a}]:{}/{}", self.port, self.protocol),
        }
    }

    /// `VipMeta::flags` for this VIP under `lb`'s defaults (validated).
    pub fn flags(&self, lb: &LbConfig) -> u32 {
        let encap = encap_flags(self.encap.as_deref().unwrap_or(&lb.encap)).expect("validated");
        match self.quic_params() {
            Some(p) => encap | VIP_F_QUIC | p.flag_bits(),
            None => encap,
        }
    }

    /// The QUIC-LB parameters of a QUIC VIP.
    pub fn quic_params(&self) -> Option<QuicLbParams> {
        self.quic.then(|| self.quic_lb.unwrap_or_default().params())
    }

    /// The server id of `b` (one of this VIP's backends), if a QUIC VIP:
    /// configured, or derived from its address.
    pub fn server_id(&self, b: &BackendConfig) -> Option<u32> {
        let p = self.quic_params()?;
        Some(
            b.server_id
                .unwrap_or_else(|| allocated_server_id(b.address, &p)),
        )
    }
}

/// `VipMeta::flags` of an encapsulation name; `None` if it is not one.
fn encap_flags(name: &str) -> Option<u32> {
    match name {
        "ipip" => Some(0),
        "gue" => Some(VIP_F_GUE),
        _ => None,
    }
}

/// Parses "a:b::/96" into the four address words (network byte order).
fn parse_prefix6(s: &str) -> Result<[u32; 4]> {
    let (addr, len) = s.split_once('/').context("expected ADDRESS/96")?;
    let addr: std::net::Ipv6Addr = addr.parse().context("not an IPv6 address")?;
    if len != "96" {
        bail!("prefix length must be 96 (the flow hash fills the last 32 bits)");
    }
    let mut words = addr_from_ip(IpAddr::V6(addr));
    words[3] = 0;
    Ok(words)
}

/// Parses "a.b.c.d/len" into (prefix, mask), both network byte order.
fn parse_prefix(s: &str) -> Result<(u32, u32)> {
    let (addr, len) = s.split_once('/').context("expected ADDRESS/LENGTH")?;
    let addr: std::net::Ipv4Addr = addr.parse().context("not an IPv4 address")?;
    let len: u32 = len.parse().context("bad prefix length")?;
    if !(8..=30).contains(&len) {
        bail!("prefix length {len} must be between 8 and 30");
    }
    let mask = u32::MAX << (32 - len);
    Ok(((u32::from(addr) & mask).to_be(), mask.to_be()))
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .context("expected six hex bytes separated by ':'")?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected six bytes"))
}

/// Config files larger than this are refused: a fleet's file with 16 VIPs
/// x 10,000 backends is about 7 MB; a much larger file is a mistake.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// Reads a config file without ever blocking on it: opened non-blocking
/// (a FIFO would otherwise wait for a writer), refused unless it is a
/// regular file of at most `MAX_CONFIG_BYTES`.
pub fn read_config_file(path: &Path) -> Result<String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > MAX_CONFIG_BYTES {
        bail!(
            "{} is {} bytes; a config file may be at most {MAX_CONFIG_BYTES}",
            path.display(),
            meta.len()
        );
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        bail!("{} grew past {MAX_CONFIG_BYTES} bytes", path.display());
    }
    Ok(text)
}

/// The control socket may replace a stale socket, never another file, and
/// its directory must exist.
pub fn check_socket_path(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().is_empty() {
        bail!("must name a path");
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => bail!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ),
        Err(_) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() && dir != Path::new(DEFAULT_SOCKET_DIR) {
                bail!("directory {} does not exist", dir.display());
            }
        }
    }
    Ok(())
}

/// Why `ip` can be neither a backend's address nor a VIP, if it cannot.
fn unusable_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address (this host, not a backend)"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("a loopback address (this host, not a backend)"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address (write the IPv4 address)")
        }
        _ => None,
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = read_config_file(path)?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// What `check-config` can know beyond the file itself: the control
    /// socket's path on this host.
    pub fn check_host(&self) -> Result<()> {
        check_socket_path(Path::new(&self.lb.control_socket)).context("lb.control_socket")
    }

    /// Fields of `self` (the running config) that differ in `other` and
    /// take effect only at a restart: everything under `[lb]`, `[bgp]`, `[etcd]`.
    pub fn restart_only_changes(&self, other: &Config) -> Vec<String> {
        let mut changed = Vec::new();
        let ours = serde_json::to_value(&self.lb).ok();
        let theirs = serde_json::to_value(&other.lb).ok();
        if let (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) =
            (ours, theirs)
        {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            changed.extend(
                keys.into_iter()
                    .filter(|k| a.get(*k) != b.get(*k))
                    .map(|k| format!("lb.{k}")),
            );
        }
        if self.bgp != other.bgp {
            changed.push("bgp".into());
        }
        if self.etcd != other.etcd {
            changed.push("etcd".into());
        }
        changed
    }

    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.lb.interfaces.is_empty() {
            bail!("lb.interfaces: name at least one interface");
        }
        let mut interfaces = BTreeSet::new();
        for name in &self.lb.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                bail!("lb.interfaces: {name:?} is not an interface name");
            }
            if !interfaces.insert(name) {
                bail!("lb.interfaces: {name} is listed twice");
            }
        }
        if self.lb.control_socket.is_empty() {
            bail!("lb.control_socket: must name a path (lbctl talks to it)");
        }
        if let Some(etcd) = &self.etcd {
            etcd.validate()?;
        }
        if !["auto", "driver", "skb"].contains(&self.lb.xdp_mode.as_str()) {
            bail!(
                "lb.xdp_mode: {:?} is not one of auto, driver, skb",
                self.lb.xdp_mode
            );
        }
        parse_prefix(&self.lb.encap_source_prefix).context("lb.encap_source_prefix")?;
        parse_prefix6(&self.lb.encap_source_prefix6).context("lb.encap_source_prefix6")?;
        if encap_flags(&self.lb.encap).is_none() {
            bail!("lb.encap: {:?} is not one of ipip, gue", self.lb.encap);
        }
        if self.lb.gue_port == 0 {
            bail!("lb.gue_port must not be 0");
        }
        let any_v6 = self
            .vips
            .iter()
            .any(|v| v.address.is_ipv6() || v.backends.iter().any(|b| b.address.is_ipv6()));
        let min_mtu = if any_v6 { 1280 + 48 } else { 576 };
        if self.lb.mtu != 0 && self.lb.mtu < min_mtu {
            bail!(
                "lb.mtu: {} is below {min_mtu} (0 turns the check off){}",
                self.lb.mtu,
                if any_v6 {
                    ": IPv6 needs 1280 plus the encapsulation"
                } else {
                    ""
                }
            );
        }
        if let Some(mac) = &self.lb.gateway_mac {
            parse_mac(mac).context("lb.gateway_mac")?;
        }
        if !self.lb.metrics_address.is_empty() {
            self.lb
                .metrics_address
                .parse::<std::net::SocketAddr>()
                .context("lb.metrics_address: expected ADDRESS:PORT")?;
        }
        if self.lb.conntrack_entries == 0 {
            bail!("lb.conntrack_entries must be positive");
        }
        if !(1..=MAX_VIPS_LIMIT).contains(&self.lb.max_vips) {
            bail!(
                "lb.max_vips: {} is not in 1..={MAX_VIPS_LIMIT}",
                self.lb.max_vips
            );
        }
        if !(2..=MAX_BACKENDS_LIMIT).contains(&self.lb.max_backends) {
            bail!(
                "lb.max_backends: {} is not in 2..={MAX_BACKENDS_LIMIT}",
                self.lb.max_backends
            );
        }
        if self.vips.len() > self.lb.max_vips as usize {
            bail!(
                "lb.max_vips: {} is fewer than the {} VIPs configured",
                self.lb.max_vips,
                self.vips.len()
            );
        }
        // Id 0 is never used; removed backends keep theirs for a while.
        let pairs: usize = self.vips.iter().map(|v| v.backends.len()).sum();
        if pairs >= self.lb.max_backends as usize {
            bail!(
                "lb.max_backends: {} is too few for the {pairs} (VIP, backend) pairs configured \
                 (leave room for removed backends, whose ids wait out the second-chance window)",
                self.lb.max_backends
            );
        }
        let mut seen = BTreeSet::new();
        let mut needed_slots = 0u64;
        for (i, vip) in self.vips.iter().enumerate() {
            let at = format!("vip[{i}] ({})", vip.name());
            if let Some(encap) = &vip.encap
                && encap_flags(encap).is_none()
            {
                bail!("{at}.encap: {encap:?} is not one of ipip, gue");
            }
            if vip.protocol != "tcp" && vip.protocol != "udp" {
                bail!("{at}.protocol: {:?} is not tcp or udp", vip.protocol);
            }
            if !seen.insert((vip.address, vip.port, vip.proto())) {
                bail!("{at}: listed twice");
            }
            if let Some(why) = unusable_address(vip.address) {
                bail!("{at}.address: {} is {why}", vip.address);
            }
            validate_table_size(vip.table_size, vip.backends.len())
                .with_context(|| format!("{at}.table_size"))?;
            let h = &vip.health;
            if !["none", "tcp", "syn", "http"].contains(&h.kind.as_str()) {
                bail!(
                    "{at}.health.kind: {:?} is not one of none, tcp, syn, http",
                    h.kind
                );
            }
            if h.kind != "none" && vip.port == 0 && h.port.is_none() {
                bail!("{at}.health.port: an every-port VIP needs a port to probe");
            }
            if h.kind != "none" && vip.protocol == "udp" && h.port.is_none() {
                bail!(
                    "{at}.health.port: a {} check of a UDP VIP probes over TCP: name the TCP port to probe",
                    h.kind
                );
            }
            if h.interval_ms < 10 || h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
                bail!("{at}.health: need interval_ms >= 10 and 0 < timeout_ms <= interval_ms");
            }
            if h.rise == 0 || h.fall == 0 {
                bail!("{at}.health: rise and fall must be at least 1");
            }
            validate_quic(vip, &at)?;
            needed_slots += 2 * vip.table_size as u64;
            let mut addrs = BTreeSet::new();
            for (j, b) in vip.backends.iter().enumerate() {
                let bat = format!("{at}.backend[{j}] ({})", b.address);
                if !addrs.insert(b.address) {
                    bail!("{bat}: listed twice");
                }
                if let Some(why) = unusable_address(b.address) {
                    bail!("{bat}.address: {} is {why}", b.address);
                }
                if b.weight > 65_535 {
                    bail!("{bat}.weight: {} is above 65535", b.weight);
                }
                if !BACKEND_STATES.contains(&b.state.as_str()) {
                    bail!(
                        "{bat}.state: {:?} is not one of active, adding, removing",
                        b.state
                    );
                }
            }
        }
        if needed_slots > self.lb.maglev_slots as u64 {
            bail!(
                "lb.maglev_slots: {} is too small: the VIPs need {needed_slots} (twice each table size, for swaps)",
                self.lb.maglev_slots
            );
        }
        Ok(())
    }

    /// The XDP program's load-time settings.
    pub fn settings(&self) -> Settings {
        let (prefix, mask) = parse_prefix(&self.lb.encap_source_prefix).expect("validated");
        let mut s = Settings {
            hash_seed: self.lb.hash_seed,
            encap_src_prefix: prefix,
            encap_src_mask: mask,
            encap_src6_prefix: parse_prefix6(&self.lb.encap_source_prefix6).expect("validated"),
            gue_port: self.lb.gue_port.to_be(),
            mtu: self.lb.mtu,
            udp_idle_timeout_ns: self.lb.udp_idle_timeout_secs * 1_000_000_000,
            max_new_flows_per_sec: self.lb.max_new_flows_per_sec,
            ..Settings::DEFAULT
        };
        if let Some(mac) = &self.lb.gateway_mac {
            s.gateway_mac = parse_mac(mac).expect("validated");
            s.flags |= SETTINGS_F_GATEWAY_MAC;
        }
        s
    }
}

/// A QUIC VIP's parameters and server ids (unique within the VIP, each
/// fitting its length); no server ids elsewhere.
fn validate_quic(vip: &VipConfig, at: &str) -> Result<()> {
    let Some(params) = vip.quic_params() else {
        if vip.quic_lb.is_some() {
            bail!("{at}.quic_lb: only a QUIC VIP uses it: set quic = true");
        }
        if let Some((j, b)) = vip
            .backends
            .iter()
            .enumerate()
            .find(|(_, b)| b.server_id.is_some())
        {
            bail!(
                "{at}.backend[{j}] ({}).server_id: only a QUIC VIP (quic = true) uses server ids",
                b.address
            );
        }
        return Ok(());
    };
    if vip.protocol != "udp" {
        bail!("{at}.quic: QUIC runs over UDP: set protocol = \"udp\"");
    }
    if let Some(why) = params.invalid() {
        bail!("{at}.quic_lb: {why}");
    }
    let mut taken: std::collections::BTreeMap<u32, (usize, IpAddr)> = Default::default();
    for (j, b) in vip.backends.iter().enumerate() {
        let bat = format!("{at}.backend[{j}] ({})", b.address);
        if let Some(id) = b.server_id
            && id > params.max_server_id()
        {
            bail!(
                "{bat}.server_id: {id} does not fit server_id_len = {} octets (at most {})",
                params.server_id_len,
                params.max_server_id()
            );
        }
        let id = vip.server_id(b).expect("a QUIC VIP");
        if let Some((k, other)) = taken.insert(id, (j, b.address)) {
            let how = if b.server_id.is_some() {
                "given"
            } else {
                "derived from its address"
            };
            bail!(
                "{bat}.server_id: {id} ({how}) is also backend[{k}] ({other})'s: give each \
                 backend its own server_id"
            );
        }
    }
    Ok(())
}

/// What differs between two VIP lists, one line per change, for people:
/// the runtime changes a reload drops, the changes it applies.
pub fn describe_changes(from: &[VipConfig], to: &[VipConfig]) -> Vec<String> {
    let mut out = Vec::new();
    let find = |list: &'_ [VipConfig], name: &str| list.iter().position(|v| v.name() == name);
    for v in from {
        if find(to, &v.name()).is_none() {
            out.push(format!("VIP {} removed", v.name()));
        }
    }
    for v in to {
        let name = v.name();
        let Some(i) = find(from, &name) else {
            out.push(format!("VIP {name} added ({} backends)", v.backends.len()));
            continue;
        };
        let old = &from[i];
        if old.health != v.health {
            out.push(format!(
                "VIP {name}: health check {} -> {}",
                old.health.kind, v.health.kind
            ));
        }
        if old.table_size != v.table_size || old.encap != v.encap {
            out.push(format!("VIP {name}: table size or encapsulation changed"));
        }
        if old.quic_params() != v.quic_params() {
            out.push(format!("VIP {name}: QUIC routing changed"));
        }
        for b in &old.backends {
            if !v.backends.iter().any(|n| n.address == b.address) {
                out.push(format!("VIP {name}: backend {} removed", b.address));
            }
        }
        for b in &v.backends {
            match old.backends.iter().find(|o| o.address == b.address) {
                None => out.push(format!(
                    "VIP {name}: backend {} added (weight {}, {})",
                    b.address, b.weight, b.state
                )),
                Some(o) => {
                    if o.weight != b.weight {
                        out.push(format!(
                            "VIP {name}: backend {} weight {} -> {}",
                            b.address, o.weight, b.weight
                        ));
                    }
                    if o.state != b.state {
                        out.push(format!(
                            "VIP {name}: backend {} state {} -> {}",
                            b.address, o.state, b.state
                        ));
                    }
                    if old.server_id(o) != v.server_id(b) {
                        out.push(format!(
                            "VIP {name}: backend {} server id changed",
                            b.address
                        ));
                    }
                }
            }
        }
    }
    out
}

impl Config {
    /// The configuration as a TOML file (`lbctl config dump`).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("writing the configuration as TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[lb]
interfaces = ["eth0"]
xdp_mode = "skb"

[[vip]]
address = "10.0.0.10"
port = 80
protocol = "tcp"
table_size = 4099
[[vip.backend]]
address = "10.30.1.2"
[[vip.backend]]
address = "10.30.2.2"
weight = 2
"#;

    fn err(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    const QUIC: &str = r#"
[lb]
interfaces = ["eth0"]

[[vip]]
address = "10.0.0.10"
port = 443
protocol = "udp"
quic = true
[[vip.backend]]
address = "10.30.1.2"
server_id = 1
[[vip.backend]]
address = "10.30.2.2"
"#;

    #[test]
    fn quic_vips_get_their_parameters_and_server_ids() {
        let c = Config::parse(QUIC).unwrap();
        let v = &c.vips[0];
        let p = v.quic_params().unwrap();
        assert_eq!((p.config_id, p.server_id_len, p.nonce_len), (0, 2, 6));
        assert_eq!(v.server_id(&v.backends[0]), Some(1));
        let derived = allocated_server_id(v.backends[1].address, &p);
        assert_eq!(v.server_id(&v.backends[1]), Some(derived));
        let flags = v.flags(&c.lb);
        assert_eq!(flags & VIP_F_QUIC, VIP_F_QUIC);
        assert_eq!(lb_common::quic_lb::flag_params(flags), (0, 2, 9));
        // Written back as read (config dump).
        let again = Config::parse(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again.vips, c.vips);
        // Other parameters.
        let text = QUIC.replace(
            "quic = true\n",
            "quic = true\n[vip.quic_lb]\nconfig_id = 3\nserver_id_len = 1\nnonce_len = 4\n",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            lb_common::quic_lb::flag_params(c.vips[0].flags(&c.lb)),
            (3, 1, 6)
        );
    }

    #[test]
    fn quic_mistakes_name_the_field() {
        let cases = [
            (
                QUIC.replace("\"udp\"", "\"tcp\""),
                "vip[0] (10.0.0.10:443/tcp).quic: QUIC runs over UDP",
            ),
            (
                QUIC.replace("server_id = 1", "server_id = 70000"),
                ".backend[0] (10.30.1.2).server_id: 70000 does not fit server_id_len = 2",
            ),
            (
                QUIC.replace("quic = true\n", ""),
                ".backend[0] (10.30.1.2).server_id: only a QUIC VIP",
            ),
            (
                QUIC.replace("quic = true\n", "[vip.quic_lb]\nnonce_len = 4\n"),
                ".quic_lb: only a QUIC VIP uses it",
            ),
            (
                QUIC.replace(
                    "quic = true\n",
                    "quic = true\n[vip.quic_lb]\nconfig_id = 7\n",
                ),
                ".quic_lb: config_id must be 0..=6",
            ),
            (
                QUIC.replace(
                    "quic = true\n",
                    "quic = true\n[vip.quic_lb]\nserver_id_len = 4\nnonce_len = 16\n",
                ),
                ".quic_lb: 1 + server_id_len + nonce_len must be at most 20",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{e}\nwanted: {want}");
        }
        // Two backends on one server id: the second is named, with the first.
        let derived = allocated_server_id(
            "10.30.2.2".parse().unwrap(),
            &QuicLbConfig::default().params(),
        );
        let e = err(&QUIC.replace("server_id = 1", &format!("server_id = {derived}")));
        assert!(
            e.contains(&format!(
                "backend[1] (10.30.2.2).server_id: {derived} (derived from its address) is also backend[0] (10.30.1.2)'s"
            )),
            "{e}"
        );
    }

    #[test]
    fn good_file_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.vips[0].backends[0].weight, 1);
        assert_eq!(c.lb.conntrack_entries, 1 << 20);
        let s = c.settings();
        assert_eq!(s.encap_src_prefix, u32::from_ne_bytes([172, 16, 0, 0]));
        assert_eq!(s.encap_src_mask, u32::from_ne_bytes([255, 255, 0, 0]));
    }

    #[test]
    fn errors_name_the_field_and_the_vip() {
        assert!(
            err(&GOOD.replace("4099", "4098")).contains("vip[0] (10.0.0.10:80/tcp).table_size")
        );
        assert!(
            err(&GOOD.replace("\"tcp\"", "\"sctp\""))
                .contains("vip[0] (10.0.0.10:80/sctp).protocol")
        );
        assert!(
            err(&GOOD.replace("10.30.2.2", "10.30.1.2"))
                .contains("backend[1] (10.30.1.2): listed twice")
        );
        assert!(err(&GOOD.replace("\"skb\"", "\"fast\"")).contains("lb.xdp_mode"));
        assert!(
            err(&GOOD.replace("weight = 2", "weight = 70000"))
                .contains("backend[1] (10.30.2.2).weight")
        );
        assert!(err(&GOOD.replace("port = 80", "port = 80\ncolour = 1")).contains("colour"));
        assert!(err(&format!("{GOOD}\n[lb2]\n")).contains("lb2"));
        let bad_health = GOOD.replace(
            "table_size = 4099",
            "table_size = 4099\n[vip.health]\nkind = \"icmp\"",
        );
        assert!(err(&bad_health).contains("vip[0] (10.0.0.10:80/tcp).health.kind"));
        let slow = GOOD.replace(
            "table_size = 4099",
            "table_size = 4099\n[vip.health]\nkind = \"tcp\"\ninterval_ms = 100\ntimeout_ms = 200",
        );
        assert!(err(&slow).contains("timeout_ms"));
        let small = GOOD.replace(
            "xdp_mode = \"skb\"",
            "xdp_mode = \"skb\"\nmaglev_slots = 5000",
        );
        assert!(err(&small).contains("lb.maglev_slots"));
    }

    #[test]
    fn ipv6_vips_backends_and_encapsulation() {
        let text = GOOD
            .replace("10.30.2.2", "fd00:30::2")
            .replace("table_size = 4099", "table_size = 4099\nencap = \"gue\"")
            + "[[vip]]\naddress = \"fd00::10\"\nport = 443\nprotocol = \"tcp\"\n";
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.vips[0].flags(&c.lb), VIP_F_GUE);
        assert_eq!(c.vips[1].flags(&c.lb), 0);
        assert_eq!(c.vips[1].name(), "[fd00::10]:443/tcp");
        let s = c.settings();
        assert_eq!(s.gue_port, 6080u16.to_be());
        assert_eq!(s.mtu, 1500);
        assert_eq!(
            s.encap_src6_prefix[0],
            u32::from_ne_bytes([0xfd, 0, 1, 0x72])
        );
        assert!(
            err(&text.replace("\"gue\"", "\"vxlan\"")).contains("vip[0] (10.0.0.10:80/tcp).encap")
        );
        assert!(err(&text.replace("[lb]", "[lb]\nmtu = 1300")).contains("lb.mtu"));
        assert!(
            err(&text.replace("[lb]", "[lb]\nencap_source_prefix6 = \"fd00::/64\""))
                .contains("lb.encap_source_prefix6")
        );
    }

    #[test]
    fn addresses_that_cannot_be_right_are_refused() {
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("224.0.0.5", "multicast"),
            ("::ffff:10.30.1.2", "IPv4-mapped"),
            ("::1", "loopback"),
        ] {
            let e = err(&GOOD.replace("10.30.2.2", bad));
            assert!(e.contains("backend[1]") && e.contains(why), "{bad}: {e}");
        }
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("::ffff:10.0.0.10", "IPv4-mapped"),
        ] {
            let e = err(&GOOD.replace("10.0.0.10", bad));
            assert!(
                e.contains("vip[0]") && e.contains(".address") && e.contains(why),
                "{e}"
            );
        }
        let twice = GOOD.replace("[\"eth0\"]", "[\"eth0\", \"eth0\"]");
        assert!(err(&twice).contains("lb.interfaces: eth0 is listed twice"));
        let udp_http = GOOD.replace("\"tcp\"", "\"udp\"").replace(
            "table_size = 4099",
            "table_size = 4099\n[vip.health]\nkind = \"http\"",
        );
        assert!(err(&udp_http).contains("health.port"), "{}", err(&udp_http));
        let udp_http_port = udp_http.replace("kind = \"http\"", "kind = \"http\"\nport = 8080");
        Config::parse(&udp_http_port).expect("an HTTP check on its own port is legitimate");
    }

    #[test]
    fn control_socket_never_replaces_a_file_and_needs_its_directory() {
        let dir = std::env::temp_dir().join(format!("lbd-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("precious");
        std::fs::write(&file, "data").unwrap();
        let e = format!("{:#}", check_socket_path(&file).unwrap_err());
        assert!(e.contains("not a socket"), "{e}");
        let e = format!(
            "{:#}",
            check_socket_path(&dir.join("nope/lbd.sock")).unwrap_err()
        );
        assert!(e.contains("does not exist"), "{e}");
        check_socket_path(&dir.join("lbd.sock")).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_files_must_be_regular_and_small() {
        let dir = std::env::temp_dir().join(format!("lbd-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once (a blocking open would wait for a writer forever).
        let e = format!("{:#}", Config::load(&fifo).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = format!("{:#}", Config::load(&big).unwrap_err());
        assert!(e.contains("at most"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn restart_only_changes_are_named() {
        let a = Config::parse(GOOD).unwrap();
        let b =
            Config::parse(&GOOD.replace("xdp_mode = \"skb\"", "xdp_mode = \"driver\"\nmtu = 9000"))
                .unwrap();
        assert_eq!(a.restart_only_changes(&b), ["lb.mtu", "lb.xdp_mode"]);
        assert!(a.restart_only_changes(&a).is_empty());
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../examples/lbd.toml");
        Config::parse(text).unwrap();
    }

    #[test]
    fn a_dumped_config_reads_back_as_the_same_config() {
        let mut c = Config::parse(include_str!("../../examples/lbd.toml")).unwrap();
        c.vips[0].backends[0].weight = 7;
        c.vips[0].backends[1].state = "removing".into();
        let text = c.to_toml().unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c, "{text}");
        assert!(text.contains("[[vip.backend]]"), "{text}");
    }

    #[test]
    fn changes_are_described_one_per_line() {
        let a = Config::parse(include_str!("../../examples/lbd.toml")).unwrap();
        let mut b = a.clone();
        assert!(describe_changes(&a.vips, &b.vips).is_empty());
        let first = a.vips[0].name();
        let addr = a.vips[0].backends[0].address;
        b.vips[0].backends[0].weight = 5;
        b.vips[0].backends.remove(1);
        let mut extra = a.vips[0].clone();
        extra.port = 8443;
        b.vips.push(extra);
        let lines = describe_changes(&a.vips, &b.vips);
        let removed = a.vips[0].backends[1].address;
        assert_eq!(
            lines,
            [
                format!("VIP {first}: backend {removed} removed"),
                format!(
                    "VIP {first}: backend {addr} weight {} -> 5",
                    a.vips[0].backends[0].weight
                ),
                format!(
                    "VIP {}:8443/tcp added ({} backends)",
                    a.vips[0].address,
                    a.vips[0].backends.len()
                ),
            ]
        );
        assert_eq!(
            describe_changes(&b.vips[b.vips.len() - 1..], &[]),
            [format!("VIP {}:8443/tcp removed", a.vips[0].address)]
        );
    }
}
