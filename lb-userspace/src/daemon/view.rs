//! One reading of every configured VIP and its backends (maps, health,
//! tracked flows), which `lbctl status` and the metrics both present.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use lb_common::maps::{Counter, VipKey};

use super::{Daemon, vip_key};

/// A backend of a configured VIP.
pub struct BackendView<'a> {
    pub address: IpAddr,
    /// Its id once applied.
    pub id: Option<u32>,
    pub weight: u32,
    pub state: &'a str,
    pub healthy: bool,
    /// Slots it owns in the VIP's current table.
    pub slots: usize,
    pub counter: Counter,
    pub new_flows: u64,
    pub tracked: u64,
    /// QUIC VIPs: the server id its connection IDs carry.
    pub server_id: Option<u32>,
}

/// The previous table second-chance forwarding uses, while its window lasts.
pub struct SecondChance {
    /// Derived from the backends' states (else: the last table change).
    pub from_states: bool,
    pub secs_left: u64,
}

/// A configured VIP.
pub struct VipView<'a> {
    pub key: VipKey,
    pub name: String,
    pub health_check: &'a str,
    pub tunnel_check: bool,
    /// Whether the reconciler has written it (table and counters exist).
    pub applied: bool,
    pub table_size: u32,
    /// `table_digest` of the applied table.
    pub digest: Option<&'a str>,
    /// From etcd (else the file or a runtime change).
    pub from_etcd: bool,
    pub counter: Counter,
    pub second_chance: Option<SecondChance>,
    /// QUIC VIPs: their connection ID parameters.
    pub quic: Option<lb_common::quic_lb::QuicLbParams>,
    pub backends: Vec<BackendView<'a>>,
}

impl VipView<'_> {
    /// New flows of all its backends.
    pub fn new_flows(&self) -> u64 {
        self.backends.iter().map(|b| b.new_flows).sum()
    }
}

impl Daemon {
    /// Every configured VIP as it stands; `tracked` is the latest count of
    /// tracked flows per backend id. Without `with_backends` the backends
    /// are left out (metrics without per-backend series).
    pub(super) fn views(
        &self,
        tracked: &BTreeMap<u32, u64>,
        with_backends: bool,
    ) -> Vec<VipView<'_>> {
        self.config
            .vips
            .iter()
            .map(|v| {
                let key = vip_key(v);
                let healthy = self.healthy_in(v);
                let applied = self.rec.vips.get(&key);
                // Slots per backend in one pass over the table (a scan per
                // backend was table size x backends per VIP).
                let mut slots: HashMap<u32, usize> = HashMap::new();
                if let Some(a) = applied.filter(|_| with_backends) {
                    for id in a.table.iter() {
                        *slots.entry(id).or_default() += 1;
                    }
                }
                let backends = v
                    .backends
                    .iter()
                    .filter(|_| with_backends)
                    .map(|b| {
                        let id = applied
                            .and_then(|a| a.backends.get(&b.address))
                            .map(|a| a.id);
                        BackendView {
                            address: b.address,
                            id,
                            weight: b.weight,
                            state: &b.state,
                            healthy: healthy(b.address),
                            slots: id.and_then(|i| slots.get(&i)).copied().unwrap_or(0),
                            counter: id.map(|i| self.dp.backend_counter(i)).unwrap_or_default(),
                            new_flows: id.map_or(0, |i| self.dp.backend_new_flows(i).packets),
                            tracked: id.and_then(|i| tracked.get(&i)).copied().unwrap_or(0),
                            server_id: v.server_id(b),
                        }
                    })
                    .collect();
                VipView {
                    key,
                    name: v.name(),
                    health_check: &v.health.kind,
                    tunnel_check: v.health.kind != "none" && v.health.tunnel,
                    applied: applied.is_some(),
                    table_size: applied.map_or(0, |a| a.meta.table_size),
                    digest: applied.map(|a| a.digest.as_str()),
                    from_etcd: self.from_etcd(&v.name()),
                    counter: applied
                        .map(|a| self.dp.vip_counter(a.meta.vip_id))
                        .unwrap_or_default(),
                    second_chance: applied
                        .and_then(|a| a.prev.as_ref())
                        .filter(|p| p.region.is_some())
                        .map(|p| SecondChance {
                            from_states: p.explicit,
                            secs_left: self
                                .rec
                                .second_chance_window
                                .saturating_sub(p.since.elapsed())
                                .as_secs(),
                        }),
                    quic: v.quic_params(),
                    backends,
                }
            })
            .collect()
    }
}
