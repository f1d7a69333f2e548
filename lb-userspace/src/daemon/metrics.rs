//! The daemon's metrics, read from the maps and its own state when scraped
//! (so a scrape is never older than the scrape itself).

use super::{
    Daemon,
    view::{BackendView, VipView},
};
use crate::metrics::Exposition;

/// Every family `metrics_text` can write (the dashboard and the tests check
/// against it). `lb_bgp_announced` only with `[bgp]`;
/// `lb_conntrack_count_age_seconds` once the table was counted.
pub const FAMILIES: &[&str] = &[
    "lb_build_info",
    "lb_packets_total",
    "lb_bytes_total",
    "lb_vip_packets_total",
    "lb_vip_bytes_total",
    "lb_vip_table_size",
    "lb_vip_second_chance_seconds",
    "lb_vip_table_info",
    "lb_backend_packets_total",
    "lb_backend_bytes_total",
    "lb_backend_healthy",
    "lb_backend_weight",
    "lb_backend_slots",
    "lb_backend_tracked_flows",
    "lb_health_probes_total",
    "lb_conntrack_entries",
    "lb_conntrack_capacity",
    "lb_conntrack_count_age_seconds",
    "lb_table_generation",
    "lb_health_probe_local_errors_total",
    "lb_health_probers",
    "lb_config_reloads_total",
    "lb_instance_draining",
    "lb_bgp_announced",
    "lb_fleet_revision",
    "lb_fleet_connected",
    "lb_fleet_rejected_revisions_total",
];

fn labels<'a>(vip: &'a str, backend: &'a str) -> [(&'static str, &'a str); 2] {
    [("vip", vip), ("backend", backend)]
}

impl Daemon {
    /// The text exposition of everything an operator graphs.
    pub fn metrics_text(&self) -> String {
        let mut e = Exposition::default();
        e.gauge(
            "lb_build_info",
            "Always 1; the labels name the running build.",
        )
        .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        self.packet_metrics(&mut e);
        let with_backends = self.config.lb.metrics_backend_series;
        let tracked = if with_backends {
            self.flows.latest().counts
        } else {
            Default::default()
        };
        let views = self.views(&tracked, with_backends);
        vip_metrics(&mut e, &views);
        if with_backends {
            self.backend_metrics(&mut e, &views);
        }
        self.state_metrics(&mut e);
        e.render()
    }

    fn packet_metrics(&self, e: &mut Exposition) {
        let counters = self.dp.reason_counters();
        let mut packets = e.counter(
            "lb_packets_total",
            "Packets seen by the XDP program, by what it did with them (reason).",
        );
        for (r, c) in &counters {
            packets.sample(&[("reason", r.name())], c.packets as f64);
        }
        let mut bytes = e.counter(
            "lb_bytes_total",
            "Bytes seen by the XDP program, by reason.",
        );
        for (r, c) in &counters {
            bytes.sample(&[("reason", r.name())], c.bytes as f64);
        }
    }

    fn backend_metrics(&self, e: &mut Exposition, views: &[VipView]) {
        // Label values, made once.
        let rows: Vec<(&VipView, &BackendView, String)> = views
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(move |b| (v, b, b.address.to_string()))
            })
            .collect();
        let mut family =
            |kind: Kind, name: &str, help: &str, value: &dyn Fn(&BackendView) -> f64| {
                let mut f = match kind {
                    Kind::Counter => e.counter(name, help),
                    Kind::Gauge => e.gauge(name, help),
                };
                for (v, b, address) in &rows {
                    f.sample(&labels(&v.name, address), value(b));
                }
            };
        family(
            Kind::Counter,
            "lb_backend_packets_total",
            "Packets sent to the backend for the VIP.",
            &|b| b.counter.packets as f64,
        );
        family(
            Kind::Counter,
            "lb_backend_bytes_total",
            "Bytes sent to the backend for the VIP.",
            &|b| b.counter.bytes as f64,
        );
        family(
            Kind::Gauge,
            "lb_backend_healthy",
            "1 while the backend passes its health checks (or has none).",
            &|b| b.healthy as u8 as f64,
        );
        family(
            Kind::Gauge,
            "lb_backend_weight",
            "Configured weight (0: draining, no new flows).",
            &|b| b.weight as f64,
        );
        family(
            Kind::Gauge,
            "lb_backend_slots",
            "Slots the backend owns in the VIP's current Maglev table.",
            &|b| b.slots as f64,
        );
        family(
            Kind::Gauge,
            "lb_backend_tracked_flows",
            "Connection-table entries naming the backend (counted at most once a second).",
            &|b| b.tracked as f64,
        );
        let mut f = e.counter(
            "lb_health_probes_total",
            "Health probes of the backend by result: up, connect_failed, timeout, bad_response, tunnel_failed, local_error.",
        );
        for (v, b, address) in &rows {
            for (result, n) in self.probes.of(v.key, b.address) {
                f.sample(
                    &[("vip", &v.name), ("backend", address), ("result", result)],
                    n as f64,
                );
            }
        }
    }

    fn state_metrics(&self, e: &mut Exposition) {
        let snapshot = self.flows.latest();
        e.gauge(
            "lb_conntrack_entries",
            "Entries in the connection table (counted at most once a second).",
        )
        .value(snapshot.counts.values().sum::<u64>() as f64);
        e.gauge(
            "lb_conntrack_capacity",
            "Entries the connection table holds; when full, the least recently used are evicted.",
        )
        .value(self.config.lb.conntrack_entries as f64);
        if let Some(taken) = snapshot.taken {
            e.gauge(
                "lb_conntrack_count_age_seconds",
                "Age of the connection-table count.",
            )
            .value(taken.elapsed().as_secs_f64());
        }
        e.gauge(
            "lb_table_generation",
            "Maglev table switches since the pinned state was created (kept across restarts).",
        )
        .value(self.rec.generation as f64);
        e.counter(
            "lb_health_probe_local_errors_total",
            "Health probes that failed on this host (not counted against backends).",
        )
        .value(self.local_probe_errors as f64);
        let (probers, checkers) = self.probe_counts();
        e.gauge(
            "lb_health_probers",
            "Distinct direct health probes running (one per backend address, port and check, \
             shared by every VIP that has it), and the (VIP, backend) checkers that follow them.",
        )
        .sample(&[("kind", "probes")], probers as f64)
        .sample(&[("kind", "checkers")], checkers as f64);
        e.counter(
            "lb_config_reloads_total",
            "Reloads of the configuration file, by result.",
        )
        .sample(&[("result", "applied")], self.reloads[0] as f64)
        .sample(&[("result", "rejected")], self.reloads[1] as f64);
        e.gauge(
            "lb_instance_draining",
            "1 while the instance is drained (lbctl drain): it announces nothing.",
        )
        .value(self.draining as u8 as f64);
        if let Some(f) = &self.fleet {
            e.gauge(
                "lb_fleet_revision",
                "The etcd revision whose VIPs this instance serves.",
            )
            .value(f.applied.revision as f64);
            e.gauge(
                "lb_fleet_connected",
                "1 while etcd answers; 0: serving the last applied revision.",
            )
            .value(f.connected as u8 as f64);
            e.counter(
                "lb_fleet_rejected_revisions_total",
                "etcd revisions not applied because they did not validate.",
            )
            .value(f.rejected_total as f64);
        }
        if let Some(a) = &self.announcer {
            let announced = a.announced();
            let mut f = e.gauge(
                "lb_bgp_announced",
                "1 while the VIP address is announced to the routers.",
            );
            let addresses: std::collections::BTreeSet<_> =
                self.config.vips.iter().map(|v| v.address).collect();
            for addr in addresses {
                f.sample(
                    &[("address", &addr.to_string())],
                    announced.contains(&addr) as u8 as f64,
                );
            }
        }
    }
}

enum Kind {
    Counter,
    Gauge,
}

/// A per-VIP family: its type, name, help and value.
type VipFamily = (Kind, &'static str, &'static str, fn(&VipView) -> f64);

/// The per-VIP families, for the VIPs the reconciler has written.
fn vip_metrics(e: &mut Exposition, views: &[VipView]) {
    let applied: Vec<&VipView> = views.iter().filter(|v| v.applied).collect();
    let families: [VipFamily; 4] = [
        (
            Kind::Counter,
            "lb_vip_packets_total",
            "Packets sent to the VIP's backends.",
            |v| v.counter.packets as f64,
        ),
        (
            Kind::Counter,
            "lb_vip_bytes_total",
            "Bytes sent to the VIP's backends.",
            |v| v.counter.bytes as f64,
        ),
        (
            Kind::Gauge,
            "lb_vip_table_size",
            "Slots of the VIP's Maglev table in the kernel.",
            |v| v.table_size as f64,
        ),
        (
            Kind::Gauge,
            "lb_vip_second_chance_seconds",
            "Seconds left of the VIP's second-chance window (0: no previous table).",
            |v| v.second_chance.as_ref().map_or(0.0, |s| s.secs_left as f64),
        ),
    ];
    for (kind, name, help, value) in families {
        let mut f = match kind {
            Kind::Counter => e.counter(name, help),
            Kind::Gauge => e.gauge(name, help),
        };
        for v in &applied {
            f.sample(&[("vip", &v.name)], value(v));
        }
    }
    let mut f = e.gauge(
        "lb_vip_table_info",
        "Always 1; digest names the VIP's Maglev table by backend address: \
         instances with equal digests send every slot to the same backend.",
    );
    for v in &applied {
        f.sample(&[("vip", &v.name), ("digest", v.digest.unwrap_or(""))], 1.0);
    }
}
