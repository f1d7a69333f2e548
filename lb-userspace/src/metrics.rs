//! Prometheus exposition. The daemon reads its maps and state at scrape
//! time and describes them here as families; the `prometheus` crate's text
//! encoder writes them (text format 0.0.4: one HELP and TYPE per family,
//! each family's samples together, as `promtool check metrics` wants).

use prometheus::{
    Encoder, TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

/// Content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Families collected for one scrape.
#[derive(Default)]
pub struct Exposition {
    families: Vec<MetricFamily>,
}

/// Samples of one family, added with `sample`.
pub struct FamilyWriter<'a> {
    family: &'a mut MetricFamily,
}

impl Exposition {
    /// A counter family (`name` should end in `_total`).
    pub fn counter(&mut self, name: &str, help: &str) -> FamilyWriter<'_> {
        self.family(name, help, MetricType::COUNTER)
    }

    pub fn gauge(&mut self, name: &str, help: &str) -> FamilyWriter<'_> {
        self.family(name, help, MetricType::GAUGE)
    }

    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> FamilyWriter<'_> {
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(kind);
        self.families.push(family);
        FamilyWriter {
            family: self.families.last_mut().expect("just pushed"),
        }
    }

    /// Names of the families, in order (tests, the dashboard check).
    pub fn names(&self) -> Vec<&str> {
        self.families.iter().map(|f| f.name()).collect()
    }

    /// The text exposition. Families without samples are left out (the
    /// format has no way to say "none yet").
    pub fn render(self) -> String {
        let families: Vec<MetricFamily> = self
            .families
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        let mut out = Vec::new();
        match TextEncoder::new().encode(&families, &mut out) {
            Ok(()) => String::from_utf8(out).unwrap_or_default(),
            Err(e) => format!("# encoding metrics failed: {e}\n"),
        }
    }
}

impl FamilyWriter<'_> {
    /// One sample with these labels.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let mut metric = Metric::from_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut pair = LabelPair::default();
                    pair.set_name(k.to_string());
                    pair.set_value(v.to_string());
                    pair
                })
                .collect(),
        );
        if self.family.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            metric.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            metric.set_gauge(g);
        }
        self.family.mut_metric().push(metric);
        self
    }

    /// One sample without labels.
    pub fn value(&mut self, value: f64) -> &mut Self {
        self.sample(&[], value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_grouped_with_help_and_type() {
        let mut e = Exposition::default();
        e.counter("lb_backend_packets_total", "Packets per backend.")
            .sample(&[("vip", "10.0.0.10:80/tcp"), ("backend", "10.1.0.2")], 5.0)
            .sample(&[("vip", "10.0.0.10:80/tcp"), ("backend", "10.1.0.3")], 7.0);
        e.gauge(
            "lb_backend_healthy",
            "1 while the backend passes its checks.",
        )
        .sample(&[("vip", "10.0.0.10:80/tcp"), ("backend", "10.1.0.2")], 1.0);
        e.gauge("lb_unused", "No samples: left out.");
        let text = e.render();
        assert_eq!(
            text,
            "# HELP lb_backend_packets_total Packets per backend.\n\
             # TYPE lb_backend_packets_total counter\n\
             lb_backend_packets_total{vip=\"10.0.0.10:80/tcp\",backend=\"10.1.0.2\"} 5\n\
             lb_backend_packets_total{vip=\"10.0.0.10:80/tcp\",backend=\"10.1.0.3\"} 7\n\
             # HELP lb_backend_healthy 1 while the backend passes its checks.\n\
             # TYPE lb_backend_healthy gauge\n\
             lb_backend_healthy{vip=\"10.0.0.10:80/tcp\",backend=\"10.1.0.2\"} 1\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.gauge("lb_x", "x").sample(&[("path", "a\"b\\c\nd")], 1.0);
        assert!(e.render().contains(r#"lb_x{path="a\"b\\c\nd"} 1"#));
    }
}
