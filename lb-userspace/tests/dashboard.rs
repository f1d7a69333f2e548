//! The shipped Grafana dashboard asks only for metrics lbd exports, with
//! reason labels the data path has.

use std::collections::BTreeSet;

use lb_common::maps::Reason;
use lb_userspace::daemon::metrics::FAMILIES;

const DASHBOARD: &str = include_str!("../../examples/grafana-dashboard.json");

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    // Template variables' queries (not the datasource's type).
                    ("query", serde_json::Value::String(s)) if s.contains('(') => {
                        out.push(s.clone())
                    }
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Identifiers in a PromQL expression that look like lbd's metric names.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("lb_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_query_names_an_exported_metric() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 15, "the dashboard has its queries: {all:?}");
    let exported: BTreeSet<&str> = FAMILIES.iter().copied().collect();
    let mut used = BTreeSet::new();
    for expr in &all {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr}: names no lbd metric");
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "{expr}: {name} is not exported"
            );
            used.insert(name);
        }
    }
    // The dashboard covers what operators graph.
    for family in [
        "lb_packets_total",
        "lb_backend_healthy",
        "lb_backend_tracked_flows",
        "lb_conntrack_entries",
        "lb_health_probes_total",
        "lb_bgp_announced",
    ] {
        assert!(used.contains(family), "{family} not on the dashboard");
    }
}

#[test]
fn reason_labels_are_the_data_paths() {
    let names: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
    let mut all = Vec::new();
    exprs(&serde_json::from_str(DASHBOARD).unwrap(), &mut all);
    for expr in all {
        for part in expr.split("reason=\"").skip(1) {
            let value = part.split('"').next().unwrap();
            assert!(names.contains(value), "{expr}: no reason {value:?}");
        }
        for part in expr.split("reason=~\"").skip(1) {
            let pattern = part.split('"').next().unwrap();
            // Alternatives of literal names, or a prefix with `.*`.
            for alt in pattern.split('|') {
                let ok = match alt.strip_suffix(".*") {
                    Some(prefix) => names.iter().any(|n| n.starts_with(prefix)),
                    None => names.contains(alt),
                };
                assert!(ok, "{expr}: {alt:?} matches no reason");
            }
        }
    }
}
