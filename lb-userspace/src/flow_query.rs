//! `lbctl flows`: the tracked connections, like `ipvsadm -Lnc`. The walk
//! runs on a blocking thread over its own handle of the connection table
//! (a million entries take about a second), and its output is bounded.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use aya::maps::{HashMap, MapData};
use lb_common::{
    PROTO_TCP,
    maps::{ConnEntry, FlowKey, VipKey},
    user::ip_from_addr,
};
use serde::Serialize;

/// Rows shown when the caller names no limit, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 100_000;

/// One tracked connection.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    pub protocol: &'static str,
    pub client: String,
    pub vip: String,
    pub backend: String,
    /// Seconds since the entry was written (TCP) or last refreshed (UDP,
    /// refreshed at most once a second).
    pub since_secs: u64,
    /// Recorded on a second chance: the backend each packet goes on to
    /// when `backend` does not have the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_hop: Option<String>,
}

/// The answer: the rows, how many entries matched and were looked at.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowList {
    pub flows: Vec<FlowRow>,
    /// Entries that matched the filters (all of them, shown or not).
    pub matched: u64,
    /// Entries in the table when walked.
    pub scanned: u64,
    /// More matched than `limit`: only the first `limit` are listed.
    pub truncated: bool,
}

/// What the walk needs from the daemon, taken on its loop.
pub struct FlowQuery {
    pub table: HashMap<MapData, FlowKey, ConnEntry>,
    /// VIPs to list (all when `None`): key -> name.
    pub vips: Option<Vec<VipKey>>,
    /// Backend ids to list (all when `None`).
    pub backend_ids: Option<Vec<u32>>,
    /// Backend id -> address.
    pub addresses: BTreeMap<u32, IpAddr>,
    /// VIP key -> name, for the rows.
    pub vip_names: BTreeMap<VipKey, String>,
    pub limit: usize,
}

/// The VIP a flow belongs to: its exact key, else the every-port one.
fn vip_of(flow: &FlowKey, names: &BTreeMap<VipKey, String>) -> Option<VipKey> {
    let dst = ip_from_addr(&flow.dst, flow.family);
    let exact = VipKey::new(dst, u16::from_be(flow.dport), flow.proto);
    let any = VipKey::new(dst, 0, flow.proto);
    [exact, any].into_iter().find(|k| names.contains_key(k))
}

impl FlowQuery {
    pub fn run(self) -> FlowList {
        // The clock the data path stamps entries with.
        let now = crate::capture::clock_ns(libc::CLOCK_MONOTONIC);
        let mut out = FlowList {
            flows: Vec::new(),
            matched: 0,
            scanned: 0,
            truncated: false,
        };
        for (flow, entry) in self.table.iter().filter_map(|r| r.ok()) {
            out.scanned += 1;
            let Some(vip) = vip_of(&flow, &self.vip_names) else {
                continue;
            };
            if self.vips.as_ref().is_some_and(|v| !v.contains(&vip))
                || self
                    .backend_ids
                    .as_ref()
                    .is_some_and(|b| !b.contains(&entry.backend_id))
            {
                continue;
            }
            out.matched += 1;
            if out.flows.len() >= self.limit {
                out.truncated = true;
                continue;
            }
            let client = SocketAddr::new(
                ip_from_addr(&flow.src, flow.family),
                u16::from_be(flow.sport),
            );
            out.flows.push(FlowRow {
                protocol: if flow.proto == PROTO_TCP {
                    "tcp"
                } else {
                    "udp"
                },
                client: client.to_string(),
                vip: self.vip_names[&vip].clone(),
                backend: self
                    .addresses
                    .get(&entry.backend_id)
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| format!("id {}", entry.backend_id)),
                since_secs: now.saturating_sub(entry.time_ns()) / 1_000_000_000,
                second_hop: Some(entry.second_hop()).filter(|&s| s != 0).map(|s| {
                    self.addresses
                        .get(&s)
                        .map_or_else(|| format!("id {s}"), |a| a.to_string())
                }),
            });
        }
        out
    }
}
