//! `lbctl`'s text output: tables made from the daemon's JSON answers (the
//! same data `--json` prints), and the rates computed from two status
//! samples. Plain functions of JSON values, unit-tested.

use serde_json::{Value, json};

/// A JSON value as a table cell (`-` for null).
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Rows padded to their columns' widths: first column left-aligned, the
/// others right-aligned (numbers).
pub fn table(header: &[&str], rows: &[Vec<String>], indent: &str) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::from(indent);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                out += &format!("{c:<w$}");
            } else {
                out += &format!("  {c:>w$}");
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out += &line(row.clone());
    }
    out
}

/// `lbctl status`.
pub fn status(v: &Value) -> String {
    let mut out = format!("table generation {}", cell(&v["generation"]));
    if v["draining"].as_bool() == Some(true) {
        out += "  DRAINED (announcing nothing; `lbctl resume`)";
    }
    if let Some(announced) = v["announced"].as_array() {
        let list: Vec<String> = announced.iter().map(cell).collect();
        out += &format!(
            "  announced: {}",
            if list.is_empty() {
                "none".into()
            } else {
                list.join(" ")
            }
        );
    }
    if v["capturing"].as_bool() == Some(true) {
        out += "  CAPTURING (lbctl capture)";
    }
    if let Some(age) = v["tracked_flows_age_ms"].as_u64() {
        out += &format!("  tracked flows counted {age} ms ago");
    }
    out += "\n";
    if let Some(f) = v["fleet"].as_object() {
        out += &format!(
            "fleet (etcd {}): revision {}  {}  {} VIPs from etcd  health {}",
            cell(&f["prefix"]),
            cell(&f["revision"]),
            if f["connected"].as_bool() == Some(true) {
                "connected".to_string()
            } else {
                format!(
                    "UNREACHABLE, serving the last applied revision ({})",
                    cell(&f["last_error"])
                )
            },
            cell(&f["vips"]),
            cell(&f["health"]),
        );
        if let Some(r) = f["rejected"].as_object() {
            out += &format!(
                "\n  REJECTED revision {}: {}",
                cell(&r["revision"]),
                cell(&r["error"])
            );
        }
        out += "\n";
    }
    let changes: Vec<String> = v["runtime_changes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(cell)
        .collect();
    if !changes.is_empty() {
        out += "runtime changes not in the config file (a reload drops them; `lbctl config dump` prints the running config):\n";
        for c in changes {
            out += &format!("  {c}\n");
        }
    }
    for vip in v["vips"].as_array().into_iter().flatten() {
        let tunnel = if vip["tunnel_check"].as_bool().unwrap_or(false) {
            " + tunnel"
        } else {
            ""
        };
        out += &format!(
            "\n{}  table {} (digest {})  packets {}  new flows {}  health check {}{tunnel}{}\n",
            cell(&vip["vip"]),
            cell(&vip["table_size"]),
            cell(&vip["table_digest"]),
            cell(&vip["packets"]),
            cell(&vip["new_flows"]),
            cell(&vip["health_check"]),
            if vip["source"] == "etcd" {
                "  from etcd"
            } else {
                ""
            },
        );
        if let Some(sc) = vip["second_chance"].as_object() {
            let from = if sc["from_states"].as_bool().unwrap_or(false) {
                "the backends' states"
            } else {
                "the last table change"
            };
            out += &format!(
                "  second chance: previous table from {from}, window ends in {} s\n",
                cell(&sc["ends_in_secs"])
            );
        }
        let quic = vip["quic"].as_object();
        if let Some(q) = quic {
            out += &format!(
                "  QUIC: short headers routed by server id (connection IDs of {} octets: config {}, {}-octet server id, {}-octet nonce)\n",
                cell(&q["cid_len"]),
                cell(&q["config_id"]),
                cell(&q["server_id_len"]),
                cell(&q["nonce_len"]),
            );
        }
        let rows: Vec<Vec<String>> = vip["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                let health = if b["healthy"].as_bool().unwrap_or(false) {
                    "up"
                } else {
                    "DOWN"
                };
                let mut row = vec![
                    cell(&b["address"]),
                    cell(&b["weight"]),
                    cell(&b["state"]),
                    health.into(),
                    cell(&b["slots"]),
                    cell(&b["tracked_flows"]),
                    cell(&b["packets"]),
                ];
                if quic.is_some() {
                    row.push(cell(&b["server_id"]));
                }
                row
            })
            .collect();
        let mut header = vec![
            "backend", "weight", "state", "health", "slots", "tracked", "packets",
        ];
        if quic.is_some() {
            header.push("server id");
        }
        out += &table(&header, &rows, "  ");
    }
    out
}

/// `lbctl stats`: packets and bytes by reason, busiest first.
pub fn stats(v: &Value) -> String {
    let mut rows: Vec<(u64, Vec<String>)> = v["reasons"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, c)| {
            let packets = c["packets"].as_u64().unwrap_or(0);
            (
                packets,
                vec![name.clone(), packets.to_string(), cell(&c["bytes"])],
            )
        })
        .collect();
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1[0].cmp(&b.1[0])));
    let rows: Vec<Vec<String>> = rows.into_iter().map(|(_, r)| r).collect();
    format!(
        "forwarded {}\n{}",
        cell(&v["forwarded"]),
        table(&["reason", "packets", "bytes"], &rows, "")
    )
}

/// Per-second rates between two `status` answers `secs` apart.
pub fn rates(before: &Value, after: &Value, secs: f64) -> Value {
    let per_sec = |a: &Value, b: &Value, key: &str| -> f64 {
        let d = b[key]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(a[key].as_u64().unwrap_or(0));
        (d as f64 / secs * 10.0).round() / 10.0
    };
    let find = |list: &Value, field: &str, name: &Value| -> Value {
        list.as_array()
            .into_iter()
            .flatten()
            .find(|x| &x[field] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let vips: Vec<Value> = after["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|vip| {
            let old = find(&before["vips"], "vip", &vip["vip"]);
            let backends: Vec<Value> = vip["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    let ob = find(&old["backends"], "address", &b["address"]);
                    json!({
                        "address": b["address"],
                        "packets_per_sec": per_sec(&ob, b, "packets"),
                        "bytes_per_sec": per_sec(&ob, b, "bytes"),
                        "new_flows_per_sec": per_sec(&ob, b, "new_flows"),
                        "tracked_flows": b["tracked_flows"],
                    })
                })
                .collect();
            json!({
                "vip": vip["vip"],
                "packets_per_sec": per_sec(&old, vip, "packets"),
                "bytes_per_sec": per_sec(&old, vip, "bytes"),
                "new_flows_per_sec": per_sec(&old, vip, "new_flows"),
                "backends": backends,
            })
        })
        .collect();
    json!({ "interval_secs": secs, "vips": vips })
}

/// `lbctl rates`: one row per VIP, then its backends indented.
pub fn rates_text(v: &Value) -> String {
    let mut rows = Vec::new();
    let bits = |x: &Value| format!("{:.0}", x.as_f64().unwrap_or(0.0) * 8.0);
    for vip in v["vips"].as_array().into_iter().flatten() {
        rows.push(vec![
            cell(&vip["vip"]),
            cell(&vip["packets_per_sec"]),
            bits(&vip["bytes_per_sec"]),
            cell(&vip["new_flows_per_sec"]),
            "".into(),
        ]);
        for b in vip["backends"].as_array().into_iter().flatten() {
            rows.push(vec![
                format!("  -> {}", cell(&b["address"])),
                cell(&b["packets_per_sec"]),
                bits(&b["bytes_per_sec"]),
                cell(&b["new_flows_per_sec"]),
                cell(&b["tracked_flows"]),
            ]);
        }
    }
    format!(
        "over the last {:.2} s\n{}",
        v["interval_secs"].as_f64().unwrap_or(0.0),
        table(
            &[
                "vip / backend",
                "packets/s",
                "bits/s",
                "new flows/s",
                "tracked"
            ],
            &rows,
            ""
        )
    )
}

/// `lbctl flows`.
pub fn flows(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            vec![
                cell(&f["protocol"]),
                cell(&f["client"]),
                cell(&f["vip"]),
                // A flow recorded on a second chance: both hops.
                match f["second_hop"].as_str() {
                    Some(second) => format!("{}, then {second}", cell(&f["backend"])),
                    None => cell(&f["backend"]),
                },
                cell(&f["since_secs"]),
            ]
        })
        .collect();
    let shown = rows.len();
    let mut out = table(&["proto", "client", "vip", "backend", "since s"], &rows, "");
    out += &format!(
        "{shown} shown of {} matching ({} tracked in all)",
        cell(&v["matched"]),
        cell(&v["scanned"])
    );
    if v["truncated"].as_bool() == Some(true) {
        out += "; --limit N shows more";
    }
    out + "\n"
}

/// `lbctl trace`.
pub fn trace(v: &Value) -> String {
    let mut out = format!(
        "VIP {}  hash {}  slot {}\n  table says:   {}\n  tracked flow: {}\n",
        cell(&v["vip"]),
        cell(&v["hash"]),
        cell(&v["slot"]),
        cell(&v["table_backend"]),
        match &v["tracked_backend"] {
            Value::Null => "none (a new flow takes the table's answer)".into(),
            other => cell(other),
        }
    );
    if let Some(q) = v["quic"].as_object() {
        out += &format!(
            "  QUIC short header: server id {}, backend {}: {}\n",
            cell(&q["server_id"]),
            cell(&q["backend"]),
            cell(&q["why"])
        );
    }
    if let Some(note) = v["note"].as_str().filter(|n| !n.is_empty()) {
        out += &format!("  ({note})\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_whatever_the_widths() {
        let t = table(
            &["backend", "packets"],
            &[
                vec!["10.0.0.1".into(), "5".into()],
                vec!["fd00::1234:5678".into(), "123456".into()],
            ],
            "  ",
        );
        assert_eq!(
            t,
            "  backend          packets\n  10.0.0.1               5\n  fd00::1234:5678   123456\n"
        );
    }

    #[test]
    fn rates_are_per_second_differences() {
        let at = |p: u64, b: u64, n: u64| {
            json!({"vips": [{"vip": "10.0.0.10:80/tcp", "packets": p, "bytes": b, "new_flows": n,
                "backends": [{"address": "10.1.0.2", "packets": p, "bytes": b, "new_flows": n, "tracked_flows": 3}]}]})
        };
        let r = rates(&at(100, 1000, 10), &at(300, 5000, 30), 2.0);
        assert_eq!(r["vips"][0]["packets_per_sec"], 100.0);
        assert_eq!(r["vips"][0]["bytes_per_sec"], 2000.0);
        assert_eq!(r["vips"][0]["new_flows_per_sec"], 10.0);
        assert_eq!(r["vips"][0]["backends"][0]["packets_per_sec"], 100.0);
        let text = rates_text(&r);
        assert!(text.contains("10.0.0.10:80/tcp"), "{text}");
        assert!(text.contains("16000"), "bits/s: {text}");
        // A VIP new since the first sample counts from zero.
        let r = rates(&json!({"vips": []}), &at(50, 0, 5), 1.0);
        assert_eq!(r["vips"][0]["packets_per_sec"], 50.0);
    }

    #[test]
    fn stats_list_the_busiest_reason_first() {
        let v = json!({"forwarded": 9, "reasons": {
            "pass_not_vip": {"packets": 2, "bytes": 200},
            "tx": {"packets": 9, "bytes": 900}}});
        let text = stats(&v);
        let tx = text.find("tx").unwrap();
        let pass = text.find("pass_not_vip").unwrap();
        assert!(tx < pass, "{text}");
    }

    #[test]
    fn flows_say_when_there_are_more() {
        let v = json!({"flows": [{"protocol": "tcp", "client": "10.200.0.2:40000",
            "vip": "10.0.0.10:80/tcp", "backend": "10.50.0.1", "since_secs": 3}],
            "matched": 7, "scanned": 9, "truncated": true});
        let text = flows(&v);
        assert!(text.contains("10.200.0.2:40000"), "{text}");
        assert!(
            text.contains("1 shown of 7 matching (9 tracked in all); --limit N"),
            "{text}"
        );
    }
}
