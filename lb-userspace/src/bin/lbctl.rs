//! lbctl: talks to a running lbd over its control socket.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    api::{Request, call},
    render,
};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Control a running lbd")]
struct Cli {
    /// lbd's control socket.
    #[arg(long, default_value = lb_userspace::config::DEFAULT_CONTROL_SOCKET, global = true)]
    socket: PathBuf,
    /// Print the daemon's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// VIPs, backends, health, weights, slots, tracked flows, runtime changes.
    Status {
        /// Only this VIP (10.0.0.10:80/tcp): bounded output with many VIPs.
        #[arg(long)]
        vip: Option<String>,
    },
    /// Packet counters by reason (what the data path did).
    Stats,
    /// Packets/s, bits/s and new flows/s per VIP and backend, over an interval.
    Rates {
        /// Seconds between the two samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Tracked connections (the connection table), like ipvsadm -Lnc.
    Flows {
        /// Only this VIP's (10.0.0.10:80/tcp).
        #[arg(long)]
        vip: Option<String>,
        /// Only those sent to this backend address.
        #[arg(long)]
        backend: Option<String>,
        /// Rows to list at most (the counts cover all of them).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Write forwarded packets to a pcap file (tcpdump -r, Wireshark):
    /// each as it arrived and as it left, encapsulated. Needs a pinned
    /// data plane (lb.pin_path) and the bpffs this lbd uses.
    Capture {
        /// Only this VIP's packets (10.0.0.10:80/tcp).
        #[arg(long)]
        vip: Option<String>,
        /// Only packets sent to this backend address.
        #[arg(long)]
        backend: Option<String>,
        /// Stop after this many packets written (two per forwarded packet;
        /// the last pair is completed).
        #[arg(long, short = 'c', default_value_t = 100)]
        count: u64,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
        /// The pcap file to write.
        #[arg(short = 'w', long = "write")]
        file: PathBuf,
    },
    /// Re-read the configuration file (also: SIGHUP to lbd). Runtime
    /// changes not in the file are dropped; the answer lists them.
    Reload,
    /// The running configuration (`config dump`).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Which backend a flow maps to, by the kernel's hash.
    Trace {
        /// Client ADDRESS:PORT.
        src: String,
        /// VIP ADDRESS:PORT.
        dst: String,
        /// tcp or udp.
        proto: String,
        /// QUIC VIPs: a destination connection ID in hex (as a server
        /// issued it): which backend its short-header packets go to.
        #[arg(long)]
        cid: Option<String>,
    },
    /// Run on a backend host: is it set up to receive from the balancer
    /// (VIP on lo, decapsulation attached, rp_filter, ARP)? Exit 1 on a failure.
    CheckBackend {
        /// A VIP this backend serves (repeat for several).
        #[arg(long = "vip", required = true)]
        vips: Vec<std::net::IpAddr>,
        /// The interface encapsulated packets arrive on.
        #[arg(long)]
        interface: String,
    },
    /// Withdraw this instance's VIPs from the routers (BGP), then with
    /// --wait return once traffic has stopped arriving.
    Drain {
        /// Return only once no packet has arrived for a second (at most 60 s).
        #[arg(long)]
        wait: bool,
    },
    /// Announce this instance's VIPs again after a drain.
    Resume,
    /// Add or remove VIPs (runtime changes: see `lbctl reload`).
    #[command(subcommand)]
    Vip(VipCmd),
    /// Add, remove, drain, weigh backends or set their state.
    #[command(subcommand)]
    Backend(BackendCmd),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the running configuration (the file plus runtime changes) as
    /// a config file: `lbctl config dump > /etc/lbd/lbd.toml` keeps them.
    Dump,
}

#[derive(Subcommand)]
enum VipCmd {
    /// Adds a VIP (runtime change: a reload of the file drops it).
    Add {
        /// The VIP as `lbctl status` names it: 10.0.0.11:443/tcp,
        /// [fd00::11]:443/tcp (the older `ADDRESS PORT PROTOCOL` form works too).
        vip: String,
        #[arg(hide = true)]
        port: Option<u16>,
        #[arg(hide = true)]
        protocol: Option<String>,
        /// Maglev table size (a prime); default 65537.
        #[arg(long)]
        table_size: Option<u32>,
        /// Health check of its backends: tcp (default), http or none.
        #[arg(long, default_value = "tcp")]
        health: String,
        /// Port probed (default: the VIP's).
        #[arg(long)]
        health_port: Option<u16>,
        /// HTTP path probed (with --health http).
        #[arg(long, default_value = "/")]
        health_path: String,
        /// A QUIC VIP (UDP): route short-header packets by the server id
        /// in their connection ID (default QUIC-LB parameters: config 0,
        /// 2-octet server ids, 6-octet nonces).
        #[arg(long)]
        quic: bool,
    },
    /// Removes a VIP.
    Remove {
        /// The VIP, as in `lbctl status`: 10.0.0.10:80/tcp.
        vip: String,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Adds a backend to a VIP (use --state adding on every instance for
    /// second-chance forwarding of the flows it takes over).
    Add {
        /// The VIP, as in `lbctl status` (10.0.0.10:80/tcp, [fd00::10]:80/tcp).
        vip: String,
        /// The backend's address.
        address: String,
        /// Its weight, relative to the VIP's other backends.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// active, adding or removing (see `backend state`).
        #[arg(long)]
        state: Option<String>,
        /// QUIC VIPs: the server id it embeds in its connection IDs
        /// (default: derived from its address; `lbctl status` shows it).
        #[arg(long)]
        server_id: Option<u32>,
    },
    /// A backend's part in a change: `adding` (in the current table only)
    /// or `removing` (in the previous table only, no new flows); `active`
    /// when the change is done. Instances derive the previous table from
    /// these, for second-chance forwarding.
    State {
        /// The VIP, as in `lbctl status` (10.0.0.10:80/tcp, [fd00::10]:80/tcp).
        vip: String,
        /// The backend's address.
        address: String,
        /// active, adding or removing.
        state: String,
    },
    /// Removes a backend from a VIP: its tracked flows re-hash to the others.
    Remove {
        /// The VIP, as in `lbctl status` (10.0.0.10:80/tcp, [fd00::10]:80/tcp).
        vip: String,
        /// The backend's address.
        address: String,
    },
    /// Weight 0: no new flows; tracked flows continue.
    Drain {
        /// The VIP, as in `lbctl status` (10.0.0.10:80/tcp, [fd00::10]:80/tcp).
        vip: String,
        /// The backend's address.
        address: String,
    },
    /// Sets a backend's weight (relative to the VIP's other backends).
    Weight {
        /// The VIP, as in `lbctl status` (10.0.0.10:80/tcp, [fd00::10]:80/tcp).
        vip: String,
        /// The backend's address.
        address: String,
        /// The new weight (0 drains).
        weight: u32,
    },
}

/// Polls the forwarded-packet counter until a second passes with none
/// (or 60 s): traffic has moved to the other instances. Returns the seconds
/// it took.
fn wait_for_quiet(socket: &std::path::Path) -> Result<u64> {
    let forwarded = || -> Result<u64> {
        Ok(ask(socket, &Request::Stats)?["forwarded"]
            .as_u64()
            .unwrap_or(0))
    };
    let start = std::time::Instant::now();
    let deadline = start + std::time::Duration::from_secs(60);
    let mut last = forwarded()?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = forwarded()?;
        if now == last {
            return Ok(start.elapsed().as_secs());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "traffic still arriving after 60 s ({} packets in the last second)",
                now - last
            );
        }
        last = now;
    }
}

fn main() {
    // A closed output pipe (`lbctl stats | head -5`) ends lbctl quietly, as
    // it does any Unix filter; Rust's default (SIGPIPE ignored) made every
    // println! panic with a backtrace instead.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if let Err(e) = real_main() {
        eprintln!("lbctl: {e:#}");
        std::process::exit(1);
    }
}

/// What a subcommand prints: the daemon's `data` as JSON with `--json`,
/// else text made from it.
enum Output {
    Json(Value),
    Text(String),
}

fn ask(socket: &std::path::Path, request: &Request) -> Result<Value> {
    let response = call(socket, request)?;
    if !response.ok {
        bail!("{}", response.error.unwrap_or_default());
    }
    Ok(response.data)
}

/// The `message` of a change's answer.
fn message(v: &Value) -> String {
    v["message"].as_str().unwrap_or_default().to_string()
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(out) => print_output(out)?,
        Err(e) if json => {
            // Scripts read one JSON document on stdout, error or not.
            println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            std::process::exit(1);
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn run(cli: Cli) -> Result<Output> {
    let socket = cli.socket.as_path();
    let json = cli.json;
    // Every subcommand: the data, and how to show it as text.
    let (data, text): (Value, fn(&Value) -> String) = match cli.command {
        Cmd::CheckBackend { vips, interface } => {
            use lb_userspace::backend_check::{Level, check};
            let findings = check(&vips, &interface)?;
            let failed = findings.iter().any(|f| f.level == Level::Fail);
            let data = serde_json::json!({ "ok": !failed, "findings": findings });
            let out = if json {
                Output::Json(data)
            } else {
                Output::Text(
                    findings
                        .iter()
                        .map(|f| {
                            let tag = match f.level {
                                Level::Ok => "ok  ",
                                Level::Warn => "warn",
                                Level::Fail => "FAIL",
                            };
                            format!("{tag}  {}\n", f.message)
                        })
                        .collect(),
                )
            };
            if failed {
                print_output(out)?;
                std::process::exit(1);
            }
            return Ok(out);
        }
        Cmd::Drain { wait } => {
            let mut data = ask(socket, &Request::DrainInstance)?;
            if wait {
                if !json {
                    println!("{}", message(&data));
                }
                let secs = wait_for_quiet(socket)?;
                data["quiet_after_secs"] = secs.into();
                if !json {
                    return Ok(Output::Text("no traffic for 1 s: safe to stop".into()));
                }
            }
            (data, message)
        }
        Cmd::Capture {
            vip,
            backend,
            count,
            seconds,
            file,
        } => (
            capture(socket, vip, backend, count, seconds, &file)?,
            message,
        ),
        Cmd::Rates { interval } => {
            if !(0.1..=3600.0).contains(&interval) {
                bail!("--interval must be between 0.1 and 3600 seconds");
            }
            let before = ask(socket, &Request::Status)?;
            let t0 = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_secs_f64(interval));
            let after = ask(socket, &Request::Status)?;
            let secs = t0.elapsed().as_secs_f64();
            (render::rates(&before, &after, secs), render::rates_text)
        }
        Cmd::Flows {
            vip,
            backend,
            limit,
        } => (
            ask(
                socket,
                &Request::Flows {
                    vip,
                    backend,
                    limit: Some(limit),
                },
            )?,
            render::flows,
        ),
        Cmd::Config(ConfigCmd::Dump) => (ask(socket, &Request::ConfigDump)?, |v| {
            let mut out =
                String::from("# Running configuration of lbd (file plus runtime changes).\n");
            for c in v["runtime_changes"].as_array().into_iter().flatten() {
                out += &format!("# runtime change: {}\n", c.as_str().unwrap_or_default());
            }
            out + v["toml"].as_str().unwrap_or_default()
        }),
        Cmd::Resume => (ask(socket, &Request::ResumeInstance)?, message),
        Cmd::Status { vip } => {
            let mut data = ask(socket, &Request::Status)?;
            if let Some(name) = vip {
                let vips = data["vips"].as_array_mut().expect("status lists VIPs");
                vips.retain(|v| v["vip"] == name.as_str());
                if vips.is_empty() {
                    bail!("no VIP {name} (names look like 10.0.0.10:80/tcp)");
                }
            }
            (data, render::status)
        }
        Cmd::Stats => (ask(socket, &Request::Stats)?, render::stats),
        Cmd::Reload => (ask(socket, &Request::Reload)?, message),
        Cmd::Trace {
            src,
            dst,
            proto,
            cid,
        } => (
            ask(
                socket,
                &Request::Trace {
                    src,
                    dst,
                    protocol: proto,
                    quic_cid: cid,
                },
            )?,
            render::trace,
        ),
        Cmd::Vip(VipCmd::Add {
            vip,
            port,
            protocol,
            table_size,
            health,
            health_port,
            health_path,
            quic,
        }) => {
            let (address, port, protocol) = match (port, protocol) {
                (Some(port), Some(protocol)) => (vip, port, protocol),
                (None, None) => {
                    let (a, p, proto) = lb_userspace::api::parse_vip_name(&vip)?;
                    (a.to_string(), p, proto)
                }
                _ => bail!("give the VIP as ADDRESS:PORT/PROTOCOL, e.g. 10.0.0.11:443/tcp"),
            };
            if port == 0 && health != "none" && health_port.is_none() {
                bail!(
                    "an every-port VIP has no port of its own to probe: give --health-port PORT or --health none"
                );
            }
            let health = lb_userspace::health::HealthCheck {
                kind: health,
                port: health_port,
                path: health_path,
                ..Default::default()
            };
            let request = Request::AddVip {
                address,
                port,
                protocol,
                table_size,
                health: Some(health),
                quic,
            };
            (ask(socket, &request)?, message)
        }
        Cmd::Vip(VipCmd::Remove { vip }) => (ask(socket, &Request::RemoveVip { vip })?, message),
        Cmd::Backend(cmd) => {
            let request = match cmd {
                BackendCmd::Add {
                    vip,
                    address,
                    weight,
                    state,
                    server_id,
                } => Request::AddBackend {
                    vip,
                    address,
                    weight,
                    state,
                    server_id,
                },
                BackendCmd::State {
                    vip,
                    address,
                    state,
                } => Request::SetState {
                    vip,
                    address,
                    state,
                },
                BackendCmd::Remove { vip, address } => Request::RemoveBackend { vip, address },
                BackendCmd::Drain { vip, address } => Request::Drain { vip, address },
                BackendCmd::Weight {
                    vip,
                    address,
                    weight,
                } => Request::SetWeight {
                    vip,
                    address,
                    weight,
                },
            };
            (ask(socket, &request)?, message)
        }
    };
    Ok(if json {
        Output::Json(data)
    } else {
        Output::Text(text(&data))
    })
}

/// Set by SIGINT: a capture ends cleanly (its file complete, lbd told).
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn capture(
    socket: &std::path::Path,
    vip: Option<String>,
    backend: Option<String>,
    count: u64,
    seconds: u32,
    file: &std::path::Path,
) -> Result<Value> {
    let out = std::fs::File::create(file)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", file.display()))?;
    let started = ask(
        socket,
        &Request::CaptureStart {
            vip,
            backend,
            seconds,
        },
    )?;
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let ring = PathBuf::from(started["ring"].as_str().unwrap_or_default());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds as u64);
    let result =
        lb_userspace::capture::capture_to(&ring, std::io::BufWriter::new(out), count, until, &STOP);
    // Stop whatever happened to the reading.
    let stopped = ask(socket, &Request::CaptureStop);
    let summary = result?;
    let lost = stopped?["lost"].as_u64().unwrap_or(0);
    Ok(serde_json::json!({
        "message": format!(
            "{} packets written to {} ({} as they arrived, {} as they left); {lost} lost to a full ring",
            summary.inbound + summary.outbound,
            file.display(),
            summary.inbound,
            summary.outbound
        ),
        "file": file.display().to_string(),
        "inbound": summary.inbound,
        "outbound": summary.outbound,
        "lost": lost,
    }))
}

fn print_output(out: Output) -> Result<()> {
    match out {
        Output::Json(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Text(t) if t.ends_with('\n') => print!("{t}"),
        Output::Text(t) => println!("{t}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_and_argument_has_help() {
        Cli::command().debug_assert();
        lb_userspace::cli_help::assert_documented(&Cli::command(), "lbctl");
    }
}
