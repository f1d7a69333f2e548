//! lbd: the load balancer daemon.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand};
use lb_common::maps::{DecapReason, VIP_KIND_FRAGMENTS, VipKey, VipMeta};
use lb_userspace::{
    config::Config,
    dataplane::{Dataplane, LoadOptions},
    decap::Decap,
    slots::SlotAllocator,
    vip_table::{BackendSpec, fragment_owners, install_vip},
};
use tracing::info;

#[derive(Parser)]
#[command(about = "Maglev XDP load balancer daemon")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the XDP program, attach it and serve the configured VIPs.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds between statistics lines (0: none).
        #[arg(long, default_value_t = 5)]
        stats_interval: u64,
    },
    /// Validate a configuration file and exit.
    CheckConfig { file: PathBuf },
    /// Backend side: attach the IPIP decapsulation program to an interface.
    Backend {
        #[arg(long)]
        interface: String,
        #[arg(long, default_value = "auto")]
        xdp_mode: String,
    },
}

fn xdp_mode(name: &str) -> Result<XdpMode> {
    Ok(match name {
        "auto" => XdpMode::Default,
        "driver" => XdpMode::Driver,
        "skb" => XdpMode::Skb,
        other => bail!("xdp mode {other:?} is not one of auto, driver, skb"),
    })
}

fn preflight(interfaces: &[String]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "lbd needs root (CAP_BPF and CAP_NET_ADMIN): run it as root or from the systemd unit"
        );
    }
    for name in interfaces {
        if !std::path::Path::new(&format!("/sys/class/net/{name}")).exists()
            && std::process::Command::new("ip")
                .args(["link", "show", name])
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
        {
            bail!("interface {name} does not exist: fix lb.interfaces in the config");
        }
    }
    Ok(())
}

/// An installed VIP: its name, meta and (backend address, id) pairs.
struct InstalledVip {
    name: String,
    meta: VipMeta,
    backends: Vec<(String, u32)>,
}

fn install(dp: &mut Dataplane, config: &Config) -> Result<Vec<InstalledVip>> {
    let mut alloc = SlotAllocator::new(dp.slot_capacity());
    let mut next_backend_id = 1u32;
    let mut installed = Vec::new();
    let mut keys = Vec::new();
    for (i, vip) in config.vips.iter().enumerate() {
        let key = VipKey::new(vip.address, vip.port, vip.proto());
        let backends: Vec<BackendSpec> = vip
            .backends
            .iter()
            .map(|b| {
                let spec = BackendSpec {
                    id: next_backend_id,
                    addr: b.address,
                    weight: b.weight,
                };
                next_backend_id += 1;
                spec
            })
            .collect();
        let meta = install_vip(
            dp,
            &mut alloc,
            key,
            i as u32 + 1,
            &backends,
            vip.table_size,
            config.lb.hash_seed,
        )?;
        info!(vip = %vip.name(), backends = backends.len(), table_size = meta.table_size, "VIP installed");
        installed.push(InstalledVip {
            name: vip.name(),
            meta,
            backends: backends
                .iter()
                .map(|b| (b.addr.to_string(), b.id))
                .collect(),
        });
        keys.push((key, meta));
    }
    let plain: Vec<VipKey> = keys.iter().map(|(k, _)| *k).collect();
    for ((addr, proto), owner) in fragment_owners(&plain) {
        let meta = keys
            .iter()
            .find(|(k, _)| *k == owner)
            .map(|(_, m)| *m)
            .expect("owner is a key");
        dp.set_vip(
            VipKey {
                addr,
                port: 0,
                proto,
                kind: VIP_KIND_FRAGMENTS,
            },
            meta,
        )?;
    }
    Ok(installed)
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    Ok(())
}

async fn run(config_path: PathBuf, stats_interval: u64) -> Result<()> {
    let config = Config::load(&config_path)?;
    preflight(&config.lb.interfaces)?;
    let mode = xdp_mode(&config.lb.xdp_mode)?;
    let opts = LoadOptions {
        settings: config.settings(),
        maglev_slots: config.lb.maglev_slots,
        conntrack_entries: config.lb.conntrack_entries,
    };
    let mut dp = Dataplane::load(&opts)?;
    let installed = install(&mut dp, &config)?;
    for iface in &config.lb.interfaces {
        dp.attach(iface, mode)?;
        info!(interface = %iface, mode = %config.lb.xdp_mode, "XDP attached");
    }
    let stats = async {
        if stats_interval == 0 {
            return std::future::pending::<()>().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(stats_interval));
        loop {
            tick.tick().await;
            for InstalledVip {
                name,
                meta,
                backends,
            } in &installed
            {
                let c = dp.vip_counter(meta.vip_id);
                let per: Vec<String> = backends
                    .iter()
                    .map(|(a, id)| format!("{a}={}", dp.backend_counter(*id).packets))
                    .collect();
                info!(vip = %name, packets = c.packets, bytes = c.bytes, backends = %per.join(" "), "stats");
            }
        }
    };
    tokio::select! {
        r = wait_for_signal() => r?,
        _ = stats => {},
    }
    info!("signal received: detaching and exiting");
    Ok(())
}

async fn backend(interface: String, mode: String) -> Result<()> {
    let decap = Decap::attach(&interface, xdp_mode(&mode)?)?;
    info!(interface = %interface, "decap attached");
    let report = async {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let c = decap.counter(DecapReason::Decapsulated);
            info!(decapsulated = c.packets, "decap stats");
        }
    };
    tokio::select! {
        r = wait_for_signal() => r?,
        _ = report => {},
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
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
        Cmd::CheckConfig { file } => {
            Config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Cmd::Backend {
            interface,
            xdp_mode,
        } => rt.block_on(backend(interface, xdp_mode)),
    }
    .context("lbd")
}
