//! `cargo xtask <command>`: setup, build, test, bench, simulate, demo.

mod bench;
mod demo;
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the Maglev XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs (apt packages, rustup `debian` link,
    /// bpf-linker, bpffs mount). Idempotent; quick when already done.
    Setup,
    /// Build everything in release mode (the XDP object is embedded).
    Build,
    /// Set up, then run formatting and lint checks and every test
    /// (root tests run serially, each in its own namespaces).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Benchmarks: data path per packet (BPF_PROG_TEST_RUN) and Maglev builds.
    Bench {
        /// Calls per case and run for the data-path figures (five runs).
        #[arg(long, default_value_t = 1_000_000)]
        calls: u32,
        /// Another build's XDP object (e.g. saved from
        /// `target/release/build/lb-userspace-*/out/lb-ebpf` of an older
        /// commit): every data-path case runs through both programs,
        /// alternating, and the report gives new/old ratios.
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
        /// Instead: the control plane at scale (4,096 VIPs x 100 backends,
        /// 16 VIPs x 10,000): cold table writes, one host failing under
        /// every VIP, RSS, kernel memory by map.
        #[arg(long)]
        scale: bool,
        /// With --scale: the table size of the 4,096 VIPs (a prime).
        #[arg(long, default_value_t = 65_537)]
        scale_table_size: u32,
    },
    /// Set up, then run the demo topology with real traffic.
    Demo {
        /// Three instances following one etcd (fleet configuration).
        #[arg(long)]
        etcd: bool,
    },
    /// Fleet simulator (no kernel): flows broken per event of a fleet's life
    /// under hash mod N, Maglev, + connection tables, + second chance;
    /// writes target/sim/report.json and report.svg.
    Simulate {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// LB instances behind the ECMP router.
        #[arg(long, default_value_t = 64)]
        instances: usize,
        /// VIPs (at least 7: the scenario changes seven of them).
        #[arg(long, default_value_t = 8)]
        vips: usize,
        /// Backends per VIP.
        #[arg(long, default_value_t = 20)]
        backends: usize,
        /// Flows alive at any time.
        #[arg(long, default_value_t = 100_000)]
        flows: usize,
        /// Maglev table size (a prime).
        #[arg(long, default_value_t = 65_537)]
        table_size: u32,
    },
    /// Differential fuzzing: N frames through the kernel and the reference model.
    Fuzz {
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs one of the `lb-tests` binaries (bench, fuzz, demo) in release mode.
pub fn run_tests_binary(name: &str, args: &[&str]) -> Result<()> {
    run(cargo()
        .args(["run", "--release", "-p", "lb-tests", "--bin", name, "--"])
        .args(args))
}

/// cargo, with `~/.cargo/bin` (where bpf-linker lands) on PATH.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let path = format!(
        "{}:{}",
        setup::cargo_bin(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    cmd
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Build => {
            setup::setup()?;
            // The default members: lb-ebpf builds for BPF only, through
            // lb-userspace's build script.
            run(cargo().args(["build", "--release"]))
        }
        Cmd::Test { no_lint } => {
            setup::setup()?;
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--check"]))?;
                run(cargo().args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "lb-ebpf",
                    "--all-targets",
                    "--release",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
            }
            // The daemon tests run the real lbd binary.
            run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
            // Root tests share kernel state: one test at a time.
            run(cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--release",
                "--",
                "--test-threads=1",
            ]))?;
            // The end-to-end suite once more in native XDP mode (as on a
            // real NIC; the testbed gives the veths what native mode needs).
            run(cargo()
                .args([
                    "test",
                    "--release",
                    "-p",
                    "lb-tests",
                    "--test",
                    "e2e",
                    "--test",
                    "e2e_ipv6",
                    "--test",
                    "bgp",
                    "--test",
                    "second_chance",
                    "--test",
                    "e2e_quic",
                    "--",
                    "--test-threads=1",
                ])
                .env("LB_TEST_XDP_MODE", "driver"))?;
            // The Maglev engine indexes unchecked where its invariants hold;
            // its tests once more with debug assertions on.
            run(cargo().args([
                "test",
                "-p",
                "lb-common",
                "--features",
                "user",
                "--lib",
                "maglev",
            ]))
        }
        Cmd::Bench {
            calls,
            baseline,
            scale,
            scale_table_size,
        } => {
            setup::setup()?;
            if scale {
                bench::scale(scale_table_size)
            } else {
                bench::bench(calls, baseline.as_deref())
            }
        }
        Cmd::Fuzz { count, seed } => {
            setup::setup()?;
            run_tests_binary(
                "lb-fuzz",
                &["--count", &count.to_string(), "--seed", &seed.to_string()],
            )
        }
        Cmd::Simulate {
            seed,
            instances,
            vips,
            backends,
            flows,
            table_size,
        } => run_tests_binary(
            "lb-sim",
            &[
                "--seed",
                &seed.to_string(),
                "--instances",
                &instances.to_string(),
                "--vips",
                &vips.to_string(),
                "--backends",
                &backends.to_string(),
                "--flows",
                &flows.to_string(),
                "--table-size",
                &table_size.to_string(),
            ],
        ),
        Cmd::Demo { etcd } => {
            setup::setup()?;
            demo::demo(etcd)
        }
    }
}
