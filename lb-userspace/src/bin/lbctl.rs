//! lbctl: talks to a running lbd over its control socket.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use lb_userspace::api::{Request, call};
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
    /// VIPs, backends, health, weights, slots, tracked flows.
    Status,
    /// Packet counters by reason.
    Stats,
    /// Re-read the configuration file (also: SIGHUP to lbd).
    Reload,
    /// Which backend a flow maps to, by the kernel's hash.
    Trace {
        /// Client ADDRESS:PORT.
        src: String,
        /// VIP ADDRESS:PORT.
        dst: String,
        /// tcp or udp.
        proto: String,
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
        #[arg(long)]
        wait: bool,
    },
    /// Announce this instance's VIPs again after a drain.
    Resume,
    #[command(subcommand)]
    Vip(VipCmd),
    #[command(subcommand)]
    Backend(BackendCmd),
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
    },
    /// Removes a VIP.
    Remove {
        /// e.g. 10.0.0.10:80/tcp
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
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// active, adding or removing (see `backend state`).
        #[arg(long)]
        state: Option<String>,
    },
    /// A backend's part in a change: `adding` (in the current table only)
    /// or `removing` (in the previous table only, no new flows); `active`
    /// when the change is done. Instances derive the previous table from
    /// these, for second-chance forwarding.
    State {
        vip: String,
        address: String,
        /// active, adding or removing.
        state: String,
    },
    Remove {
        vip: String,
        address: String,
    },
    /// No new flows; tracked flows continue.
    Drain {
        vip: String,
        address: String,
    },
    Weight {
        vip: String,
        address: String,
        weight: u32,
    },
}

fn print_status(v: &Value) {
    // serde_json values ignore format widths: print them as strings.
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!("table generation {}", text(&v["generation"]));
    for vip in v["vips"].as_array().into_iter().flatten() {
        let tunnel = if vip["tunnel_check"].as_bool().unwrap_or(false) {
            " + tunnel"
        } else {
            ""
        };
        println!(
            "\n{}  table {}  packets {}  health check {}{tunnel}",
            text(&vip["vip"]),
            text(&vip["table_size"]),
            text(&vip["packets"]),
            text(&vip["health_check"]),
        );
        if let Some(sc) = vip["second_chance"].as_object() {
            let from = if sc["from_states"].as_bool().unwrap_or(false) {
                "the backends' states"
            } else {
                "the last table change"
            };
            println!(
                "  second chance: previous table from {from}, window ends in {} s",
                text(&sc["ends_in_secs"])
            );
        }
        println!(
            "  {:<24} {:>6} {:>9} {:>7} {:>8} {:>8} {:>12}",
            "backend", "weight", "state", "health", "slots", "tracked", "packets"
        );
        for b in vip["backends"].as_array().into_iter().flatten() {
            let health = if b["healthy"].as_bool().unwrap_or(false) {
                "up"
            } else {
                "DOWN"
            };
            println!(
                "  {:<24} {:>6} {:>9} {:>7} {:>8} {:>8} {:>12}",
                text(&b["address"]),
                text(&b["weight"]),
                text(&b["state"]),
                health,
                text(&b["slots"]),
                text(&b["tracked_flows"]),
                text(&b["packets"])
            );
        }
    }
}

/// Polls the forwarded-packet counter until a second passes with none
/// (or 60 s): traffic has moved to the other instances.
fn wait_for_quiet(socket: &std::path::Path) -> Result<()> {
    let forwarded = || -> Result<u64> {
        Ok(call(socket, &Request::Stats)?.data["forwarded"]
            .as_u64()
            .unwrap_or(0))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = forwarded()?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = forwarded()?;
        if now == last {
            println!("no traffic for 1 s: safe to stop");
            return Ok(());
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

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::CheckBackend { vips, interface } = &cli.command {
        use lb_userspace::backend_check::{Level, check};
        let findings = check(vips, interface)?;
        for f in &findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            println!("{tag}  {}", f.message);
        }
        if findings.iter().any(|f| f.level == Level::Fail) {
            std::process::exit(1);
        }
        return Ok(());
    }
    let request = match cli.command {
        Cmd::CheckBackend { .. } => unreachable!("handled above"),
        Cmd::Drain { wait } => {
            let r = call(&cli.socket, &Request::DrainInstance)?;
            if !r.ok {
                bail!("{}", r.error.unwrap_or_default());
            }
            println!("{}", r.data.as_str().unwrap_or(""));
            if wait {
                wait_for_quiet(&cli.socket)?;
            }
            return Ok(());
        }
        Cmd::Resume => Request::ResumeInstance,
        Cmd::Status => Request::Status,
        Cmd::Stats => Request::Stats,
        Cmd::Reload => Request::Reload,
        Cmd::Trace { src, dst, proto } => Request::Trace {
            src,
            dst,
            protocol: proto,
        },
        Cmd::Vip(VipCmd::Add {
            vip,
            port,
            protocol,
            table_size,
        }) => {
            let (address, port, protocol) = match (port, protocol) {
                (Some(port), Some(protocol)) => (vip, port, protocol),
                (None, None) => {
                    let (a, p, proto) = lb_userspace::api::parse_vip_name(&vip)?;
                    (a.to_string(), p, proto)
                }
                _ => bail!("give the VIP as ADDRESS:PORT/PROTOCOL, e.g. 10.0.0.11:443/tcp"),
            };
            Request::AddVip {
                address,
                port,
                protocol,
                table_size,
            }
        }
        Cmd::Vip(VipCmd::Remove { vip }) => Request::RemoveVip { vip },
        Cmd::Backend(BackendCmd::Add {
            vip,
            address,
            weight,
            state,
        }) => Request::AddBackend {
            vip,
            address,
            weight,
            state,
        },
        Cmd::Backend(BackendCmd::State {
            vip,
            address,
            state,
        }) => Request::SetState {
            vip,
            address,
            state,
        },
        Cmd::Backend(BackendCmd::Remove { vip, address }) => {
            Request::RemoveBackend { vip, address }
        }
        Cmd::Backend(BackendCmd::Drain { vip, address }) => Request::Drain { vip, address },
        Cmd::Backend(BackendCmd::Weight {
            vip,
            address,
            weight,
        }) => Request::SetWeight {
            vip,
            address,
            weight,
        },
    };
    let is_status = matches!(request, Request::Status);
    let response = call(&cli.socket, &request)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else if !response.ok {
        bail!("{}", response.error.unwrap_or_default());
    } else if is_status {
        print_status(&response.data);
    } else if let Some(text) = response.data.as_str() {
        println!("{text}");
    } else {
        println!("{}", serde_json::to_string_pretty(&response.data)?);
    }
    if !response.ok {
        std::process::exit(1);
    }
    Ok(())
}
