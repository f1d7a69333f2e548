//! `cargo xtask simulate`: the fleet simulator (lb_userspace::fleet_sim)
//! on the default scenario; writes target/sim/report.json and report.svg.

use std::{fmt::Write as _, path::PathBuf};

use lb_userspace::fleet_sim::{Event, Report, STRATEGIES, Sim, SimConfig};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const COLOURS: [&str; 5] = ["#999999", "#d95f02", "#7570b3", "#1b9e77", "#000000"];

/// A grouped bar chart: per event, the share broken by each strategy and
/// the minimum (a black tick), on a square-root scale so small shares show.
fn svg(report: &Report) -> String {
    let (w, h, left, top, bottom, right) = (1250.0, 540.0, 70.0, 50.0, 170.0, 150.0);
    let plot_h = h - top - bottom;
    let group = (w - left - right) / report.events.len() as f64;
    let bar = group / 5.5;
    let y = |share: f64| top + plot_h * (1.0 - share.max(0.0).sqrt());
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="15">Established flows broken per event ({} instances, {} VIPs x {} backends, {} flows, M = {}, seed {})</text>
"#,
        report.config.instances,
        report.config.vips,
        report.config.backends_per_vip,
        report.config.flows,
        report.config.table_size,
        report.config.seed
    );
    for tick in [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0] {
        let ty = y(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{}%</text>"##,
            w - right,
            left - 6.0,
            ty + 4.0,
            tick * 100.0
        );
    }
    for (i, e) in report.events.iter().enumerate() {
        let x0 = left + i as f64 * group + bar * 0.5;
        for (s, name) in STRATEGIES.iter().enumerate() {
            let share = e.broken[name];
            let (bx, by) = (x0 + s as f64 * bar, y(share));
            let _ = writeln!(
                out,
                r#"<rect x="{bx:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{name}: {:.3}%</title></rect>"#,
                bar * 0.9,
                top + plot_h - by,
                COLOURS[s],
                share * 100.0
            );
        }
        let my = y(e.minimum);
        let _ = writeln!(
            out,
            r#"<line x1="{x0:.1}" x2="{:.1}" y1="{my:.1}" y2="{my:.1}" stroke="black" stroke-width="2"/>"#,
            x0 + 4.0 * bar
        );
        let (lx, ly) = (x0 + 2.0 * bar, top + plot_h + 12.0);
        let _ = writeln!(
            out,
            r#"<text x="{lx:.1}" y="{ly:.1}" transform="rotate(35 {lx:.1} {ly:.1})">{}</text>"#,
            e.event
        );
    }
    let legend: Vec<&str> = STRATEGIES
        .iter()
        .copied()
        .chain(["minimum (line)"])
        .collect();
    for (s, name) in legend.iter().enumerate() {
        let lx = left + s as f64 * 235.0;
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
            h - 24.0,
            COLOURS[s],
            lx + 16.0,
            h - 14.0
        );
    }
    out + "</svg>\n"
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let d = SimConfig::default();
    let cfg = SimConfig {
        seed: arg(&args, "--seed", d.seed),
        instances: arg(&args, "--instances", d.instances).clamp(2, 100),
        vips: arg(&args, "--vips", d.vips).clamp(7, 100),
        backends_per_vip: arg(&args, "--backends", d.backends_per_vip).clamp(2, 1000),
        flows: arg(&args, "--flows", d.flows).max(100),
        table_size: arg(&args, "--table-size", d.table_size),
    };
    let out_dir = PathBuf::from(arg(&args, "--out", "target/sim".to_string()));
    let started = std::time::Instant::now();
    let report = Sim::new(cfg).scenario(&Event::scenario());
    println!(
        "{:<38} {:>11} {:>9} {:>11} {:>9} {:>11} {:>13}",
        "event", "established", "minimum", "hash mod n", "maglev", "+conntrack", "+second chance"
    );
    for e in &report.events {
        let pct = |v: f64| format!("{:.3}%", v * 100.0);
        println!(
            "{:<38} {:>11} {:>9} {:>11} {:>9} {:>11} {:>13}",
            e.event,
            e.established,
            pct(e.minimum),
            pct(e.broken["hash_mod_n"]),
            pct(e.broken["maglev"]),
            pct(e.broken["maglev_conntrack"]),
            pct(e.broken["maglev_conntrack_second_chance"])
        );
    }
    std::fs::create_dir_all(&out_dir).expect("creating the output directory");
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("writing report.json");
    std::fs::write(out_dir.join("report.svg"), svg(&report)).expect("writing report.svg");
    println!(
        "wrote {0}/report.json and {0}/report.svg in {1:.1} s",
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
}
