//! lbd: the load balancer daemon.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use lb_common::maps::DecapReason;
use lb_userspace::{
    api::{Request, Response},
    config::Config,
    daemon::{Daemon, fleet_at_start, notify, preflight},
    dataplane::teardown,
    decap::Decap,
    fleet::etcd::{FleetEvent, follow, write},
    instance_lock::InstanceLock,
    serve::{Scrape, bind_control_socket, bind_metrics, serve_metrics, serve_socket},
};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "lbd", version, about = "Maglev XDP load balancer daemon")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load (or adopt) the XDP program, attach it and serve the configured VIPs.
    Run {
        /// The configuration file (commented example: examples/lbd.toml).
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds between statistics log lines (0: none).
        #[arg(long, default_value_t = 30)]
        stats_interval: u64,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The configuration file to check.
        file: PathBuf,
        /// With [etcd]: also read etcd's VIPs now and check them with the
        /// file's (fails when etcd does not answer; without it, only the
        /// file is checked, so a start never waits on etcd).
        #[arg(long)]
        etcd: bool,
    },
    /// Remove the pinned data plane: detaches the program, frees the maps.
    /// Refused while an lbd runs on it.
    Teardown {
        /// The instance's configuration file: its lb.pin_path is removed
        /// (safer than naming the directory when several instances run).
        #[arg(long, short, conflicts_with = "pin_path")]
        config: Option<PathBuf>,
        /// The bpffs directory to remove (an lbd's lb.pin_path, or an `lbd
        /// backend --pin-path`).
        #[arg(long, default_value = "/sys/fs/bpf/lbd")]
        pin_path: PathBuf,
    },
    /// Backend side: attach the decapsulation program (IP-in-IP in any
    /// IPv4/IPv6 mix, and GUE) to an interface.
    Backend {
        /// The interface the balancers' encapsulated packets arrive on.
        #[arg(long)]
        interface: String,
        /// auto (native, but generic on a veth), driver (native) or skb (generic).
        #[arg(long, default_value = "auto")]
        xdp_mode: String,
        /// UDP port of GUE packets to decapsulate (the balancer's lb.gue_port).
        #[arg(long, default_value_t = lb_common::settings::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// bpffs directory for the decap link and counters, so
        /// decapsulation goes on if this process dies. `lbd teardown
        /// --pin-path DIR` removes it.
        #[arg(long, default_value = "/sys/fs/bpf/lbd-backend")]
        pin_path: PathBuf,
        /// Pin nothing: decap is detached when this process exits.
        #[arg(long)]
        no_pin: bool,
    },
}

async fn run(config_path: PathBuf, stats_interval: u64) -> Result<()> {
    let reading = std::time::Instant::now();
    let mut config = Config::load(&config_path)?;
    config.check_host()?;
    preflight(&config)?;
    info!(
        secs = format!("{:.2}", reading.elapsed().as_secs_f64()),
        vips = config.vips.len(),
        backends = config.vips.iter().map(|v| v.backends.len()).sum::<usize>(),
        "configuration read"
    );
    let pin_dir = (!config.lb.pin_path.is_empty()).then(|| PathBuf::from(&config.lb.pin_path));
    let socket = PathBuf::from(&config.lb.control_socket);
    // Before anything is touched: one daemon per pin path and socket.
    let _lock = InstanceLock::acquire(pin_dir.as_deref(), &socket)?;
    let control = bind_control_socket(&socket)?;
    let metrics_listener = if config.lb.metrics_address.is_empty() {
        None
    } else {
        Some(bind_metrics(&config.lb.metrics_address)?)
    };
    let fleet = match config.etcd.clone() {
        Some(cfg) => Some(fleet_at_start(&cfg, &mut config).await),
        None => None,
    };
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut daemon = Daemon::start(config_path, config, fleet, events_tx)?;
    daemon.persist_fleet();
    let (fleet_tx, mut fleet_events) = tokio::sync::mpsc::unbounded_channel::<FleetEvent>();
    if let Some(cfg) = daemon.etcd_config() {
        tokio::spawn(follow(cfg.clone(), fleet_tx.clone()));
    }
    if let Some((cfg, observations)) = daemon.start_fleet_health() {
        tokio::spawn(lb_userspace::fleet::health::run(
            cfg,
            observations,
            fleet_tx,
        ));
    }
    let (api_tx, mut api) = tokio::sync::mpsc::channel(64);
    tokio::spawn(serve_socket(control, api_tx));
    let (scrape_tx, mut scrapes) = tokio::sync::mpsc::channel::<Scrape>(16);
    if let Some(listener) = metrics_listener {
        tokio::spawn(serve_metrics(listener, scrape_tx));
    }
    let links = lb_userspace::link_watch::LinkWatch::new()?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seconds = 0u64;
    info!("lbd ready");
    // Type=notify: systemd counts the start done only now, with the
    // program attached and the tables written.
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving {} VIPs", daemon.config().vips.len())),
    ]);
    loop {
        tokio::select! {
            Some(ev) = events.recv() => daemon.on_health(ev),
            Some(ev) = fleet_events.recv() => daemon.on_fleet(ev),
            Some(reply) = scrapes.recv() => {
                let _ = reply.send(daemon.metrics_text());
            }
            Some((req, caller, reply)) = api.recv() => {
                if let Request::Flows { vip, backend, limit } = &req {
                    // A walk of up to the whole table: off the loop.
                    match daemon.flow_query(vip.as_deref(), backend.as_deref(), *limit) {
                        Ok(query) => {
                            tokio::task::spawn_blocking(move || {
                                let list = query.run();
                                let _ = reply.send(Response::ok(
                                    serde_json::to_value(list).unwrap_or_default(),
                                ));
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Response::err(format!("{e:#}")));
                        }
                    }
                    continue;
                }
                if let Some(routed) = daemon.fleet_write(&req, caller) {
                    // A change of the fleet's configuration: a transaction
                    // in etcd, applied here (and everywhere) from the watch.
                    match routed {
                        Ok((cfg, w)) => {
                            tokio::spawn(async move {
                                let _ = reply.send(match write(&cfg, w).await {
                                    Ok(revision) => Response::ok(serde_json::json!({
                                        "message": format!("written to etcd at revision {revision}: every instance following it applies it"),
                                        "revision": revision,
                                    })),
                                    Err(e) => Response::err(format!("{e:#}")),
                                });
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Response::err(format!("{e:#}")));
                        }
                    }
                    continue;
                }
                let response = daemon.handle(req, caller);
                let _ = reply.send(response);
            }
            _ = hup.recv() => {
                if let Err(e) = daemon.reload().map(|_| ()) {
                    error!("reload rejected, running configuration kept: {e:#}");
                }
            }
            changed = links.changed() => {
                if let Err(e) = changed {
                    error!("link notifications: {e}");
                }
                daemon.check_links();
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                // Also without a notification (one lost to ENOBUFS, say).
                daemon.check_links();
                daemon.expire_second_chance();
                daemon.expire_capture();
                seconds += 1;
                if stats_interval > 0 && seconds.is_multiple_of(stats_interval) {
                    daemon.log_stats();
                }
            }
        }
    }
    notify(&[NotifyState::Stopping]);
    // Stop attracting traffic before going away (no-op without [bgp]).
    daemon.withdraw_all();
    if daemon.pinned() {
        info!("exiting; the pinned data plane keeps forwarding (`lbd teardown` removes it)");
    } else {
        info!("exiting; detaching the XDP program");
    }
    Ok(())
}

async fn backend(
    interface: String,
    mode: String,
    gue_port: u16,
    pin_path: Option<PathBuf>,
) -> Result<()> {
    // As the balancer's: second hops leave again with XDP_TX.
    let chosen = lb_userspace::xdp_mode::choose(&interface, &mode)?;
    let decap = if let Some(dir) = pin_path {
        let (decap, how) = Decap::attach_pinned(&interface, &chosen, gue_port, &dir)?;
        info!(interface = %interface, mode = chosen.name, why = chosen.why, pin_path = %dir.display(), how = ?how, "decap attached (pinned: it stays if lbd backend exits)");
        decap
    } else {
        let decap = Decap::attach(&interface, chosen.mode, gue_port)?;
        info!(interface = %interface, "decap attached (not pinned: detached when lbd backend exits)");
        decap
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let n = |r| decap.counter(r).packets;
                info!(
                    decapsulated = n(DecapReason::Decapsulated),
                    second_hop_local = n(DecapReason::SecondHopLocal),
                    second_hop_forwarded = n(DecapReason::SecondHopForwarded),
                    second_hop_to_kernel = n(DecapReason::SecondHopToKernel),
                    "decap stats"
                );
            }
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = real_main() {
        // One line that says what is wrong and what to do.
        eprintln!("lbd: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    use std::io::IsTerminal;
    lb_userspace::daemon::keep_tables_on_the_heap();
    tracing_subscriber::fmt()
        // Colour only for a person at a terminal, not for files or journald.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Run {
            config,
            stats_interval,
        } => rt.block_on(run(config, stats_interval)),
        Cmd::CheckConfig { file, etcd } => {
            let config = Config::load(&file)?;
            config.check_host()?;
            println!("{}: ok", file.display());
            match (&config.etcd, etcd) {
                (Some(cfg), true) => {
                    let snap = rt.block_on(lb_userspace::fleet::etcd::read_once(cfg))?;
                    lb_userspace::fleet::with_snapshot(&config, cfg, &snap)?;
                    println!(
                        "etcd {} revision {}: {} VIPs ok with the file's",
                        cfg.prefix,
                        snap.revision,
                        snap.entries.len()
                    );
                }
                (Some(_), false) => {
                    println!("([etcd] present: `--etcd` also checks etcd's VIPs now)")
                }
                (None, true) => bail!("{}: no [etcd] section", file.display()),
                (None, false) => {}
            }
            let cpus = lb_userspace::sizing::possible_cpus();
            print!(
                "{}",
                lb_userspace::sizing::render(&lb_userspace::sizing::plan(&config.lb, cpus), cpus)
            );
            Ok(())
        }
        Cmd::Teardown { config, pin_path } => {
            let pin_path = match config {
                Some(file) => {
                    let c = Config::load(&file)?;
                    if c.lb.pin_path.is_empty() {
                        bail!(
                            "{}: lb.pin_path is empty: nothing is pinned",
                            file.display()
                        );
                    }
                    PathBuf::from(c.lb.pin_path)
                }
                None => pin_path,
            };
            let removed = teardown(&pin_path)?;
            println!(
                "removed {} pinned objects from {}",
                removed.len(),
                pin_path.display()
            );
            Ok(())
        }
        Cmd::Backend {
            interface,
            xdp_mode,
            gue_port,
            pin_path,
            no_pin,
        } => rt.block_on(backend(
            interface,
            xdp_mode,
            gue_port,
            (!no_pin).then_some(pin_path),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_and_argument_has_help() {
        Cli::command().debug_assert();
        lb_userspace::cli_help::assert_documented(&Cli::command(), "lbd");
    }
}
