//! The daemon's metrics, read from the maps and its own state when scraped
//! (so a scrape is never older than the scrape itself).

use super::{Daemon, vip_key};
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
    "lb_config_reloads_total",
    "lb_instance_draining",
    "lb_bgp_announced",
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
        self.vip_metrics(&mut e);
        if self.config.lb.metrics_backend_series {
            self.backend_metrics(&mut e);
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

    fn vip_metrics(&self, e: &mut Exposition) {
        // (name, vip id, table size, seconds left of the second-chance window)
        let vips: Vec<(String, u32, u32, u64)> = self
            .config
            .vips
            .iter()
            .filter_map(|v| self.rec.vips.get(&vip_key(v)).map(|a| (v.name(), a)))
            .map(|(name, a)| {
                let window = a
                    .prev
                    .as_ref()
                    .filter(|p| p.region.is_some())
                    .map(|p| {
                        self.rec
                            .second_chance_window
                            .saturating_sub(p.since.elapsed())
                            .as_secs()
                    })
                    .unwrap_or(0);
                (name, a.meta.vip_id, a.meta.table_size, window)
            })
            .collect();
        let counters: Vec<_> = vips
            .iter()
            .map(|(_, id, _, _)| self.dp.vip_counter(*id))
            .collect();
        let mut f = e.counter(
            "lb_vip_packets_total",
            "Packets sent to the VIP's backends.",
        );
        for ((name, ..), c) in vips.iter().zip(&counters) {
            f.sample(&[("vip", name)], c.packets as f64);
        }
        let mut f = e.counter("lb_vip_bytes_total", "Bytes sent to the VIP's backends.");
        for ((name, ..), c) in vips.iter().zip(&counters) {
            f.sample(&[("vip", name)], c.bytes as f64);
        }
        let mut f = e.gauge(
            "lb_vip_table_size",
            "Slots of the VIP's Maglev table in the kernel.",
        );
        for (name, _, size, _) in &vips {
            f.sample(&[("vip", name)], *size as f64);
        }
        let mut f = e.gauge(
            "lb_vip_second_chance_seconds",
            "Seconds left of the VIP's second-chance window (0: no previous table).",
        );
        for (name, _, _, left) in &vips {
            f.sample(&[("vip", name)], *left as f64);
        }
    }

    fn backend_metrics(&self, e: &mut Exposition) {
        let tracked = self.flows.latest().counts;
        // (vip, backend, id, weight, healthy, slots)
        let mut rows = Vec::new();
        for v in &self.config.vips {
            let key = vip_key(v);
            let applied = self.rec.vips.get(&key);
            for b in &v.backends {
                let id = applied
                    .and_then(|a| a.backends.get(&b.address))
                    .map(|a| a.id);
                let slots = match (applied, id) {
                    (Some(a), Some(id)) => a.table.iter().filter(|&&s| s == id).count(),
                    _ => 0,
                };
                let healthy = self.health.get(&(key, b.address)).copied().unwrap_or(true);
                rows.push((key, v.name(), b.address, id, b.weight, healthy, slots));
            }
        }
        let addresses: Vec<String> = rows.iter().map(|r| r.2.to_string()).collect();
        let counters: Vec<_> = rows
            .iter()
            .map(|r| {
                r.3.map(|id| self.dp.backend_counter(id))
                    .unwrap_or_default()
            })
            .collect();
        let mut f = e.counter(
            "lb_backend_packets_total",
            "Packets sent to the backend for the VIP.",
        );
        for ((r, a), c) in rows.iter().zip(&addresses).zip(&counters) {
            f.sample(&labels(&r.1, a), c.packets as f64);
        }
        let mut f = e.counter(
            "lb_backend_bytes_total",
            "Bytes sent to the backend for the VIP.",
        );
        for ((r, a), c) in rows.iter().zip(&addresses).zip(&counters) {
            f.sample(&labels(&r.1, a), c.bytes as f64);
        }
        let mut f = e.gauge(
            "lb_backend_healthy",
            "1 while the backend passes its health checks (or has none).",
        );
        for (r, a) in rows.iter().zip(&addresses) {
            f.sample(&labels(&r.1, a), r.5 as u8 as f64);
        }
        let mut f = e.gauge(
            "lb_backend_weight",
            "Configured weight (0: draining, no new flows).",
        );
        for (r, a) in rows.iter().zip(&addresses) {
            f.sample(&labels(&r.1, a), r.4 as f64);
        }
        let mut f = e.gauge(
            "lb_backend_slots",
            "Slots the backend owns in the VIP's current Maglev table.",
        );
        for (r, a) in rows.iter().zip(&addresses) {
            f.sample(&labels(&r.1, a), r.6 as f64);
        }
        let mut f = e.gauge(
            "lb_backend_tracked_flows",
            "Connection-table entries naming the backend (counted at most once a second).",
        );
        for (r, a) in rows.iter().zip(&addresses) {
            let n = r.3.and_then(|id| tracked.get(&id)).copied().unwrap_or(0);
            f.sample(&labels(&r.1, a), n as f64);
        }
        let mut f = e.counter(
            "lb_health_probes_total",
            "Health probes of the backend by result: up, connect_failed, timeout, bad_response, tunnel_failed, local_error.",
        );
        for (r, a) in rows.iter().zip(&addresses) {
            for (result, n) in self.probes.of(r.0, r.2) {
                f.sample(
                    &[("vip", &r.1), ("backend", a), ("result", result)],
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
