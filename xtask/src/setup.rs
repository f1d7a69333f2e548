//! Installs the eBPF toolchain (see shared toolchain notes): Debian's Rust
//! with a precompiled bpf `core`, LLVM 22, bpf-linker built against it,
//! and a mounted bpffs. Every step checks first, so a second run is quick.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::run;

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "lld-22",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "ethtool",
    // BIRD 2: the BGP daemon lbd drives (end-to-end BGP tests).
    "bird2",
    // Reads back what `lbctl capture` writes (tests).
    "tcpdump",
    // protoc: the etcd client crate builds its gRPC code with it. Its
    // well-known types (google/protobuf/*.proto) come with the -dev package,
    // which protoc only recommends (not installed here).
    "protobuf-compiler",
    "libprotobuf-dev",
    // Faults on one host's own path (tests); its service stays disabled.
    "nftables",
];

/// Where `promtool` is unpacked (from Debian's prometheus package, without
/// installing it: that would enable a Prometheus server on the host).
pub const PROMTOOL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tools/prometheus");

/// Where `etcd` is unpacked for the fleet tests and demo (from Debian's
/// etcd-server, likewise not installed: that would start an etcd on the host).
pub const ETCD_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tools/etcd");

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn cargo_bin() -> String {
    let home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    format!("{home}/bin")
}

pub fn setup() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("setup needs root (apt, bpffs mount); run it as root");
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("debian"))
    {
        eprintln!("setup: linking /usr as rustup toolchain `debian`");
        run(Command::new("rustup").args(["toolchain", "link", "debian", "/usr"]))?;
    }
    let linker = format!("{}/bpf-linker", cargo_bin());
    if !have("bpf-linker") && !Path::new(&linker).exists() {
        eprintln!("setup: building bpf-linker against LLVM 22 (a few minutes)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
    }
    unpack_promtool()?;
    unpack_etcd()?;
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        eprintln!("setup: mounting bpffs at /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf")?;
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// `promtool`, which the metrics test runs on a live scrape: unpacked from
/// the package into `PROMTOOL_DIR` unless one is on PATH.
fn unpack_promtool() -> Result<()> {
    unpack_deb("prometheus", "promtool", Path::new(PROMTOOL_DIR))
}

fn unpack_etcd() -> Result<()> {
    unpack_deb("etcd-server", "etcd", Path::new(ETCD_DIR))
}

/// Unpacks Debian's `package` into `dir` (`dir/usr/bin/<binary>`) unless
/// `binary` is on PATH or there already.
fn unpack_deb(package: &str, binary: &str, dir: &Path) -> Result<()> {
    if have(binary) || dir.join("usr/bin").join(binary).exists() {
        return Ok(());
    }
    eprintln!("setup: unpacking {binary} into {}", dir.display());
    std::fs::create_dir_all(dir)?;
    let download = || {
        run(Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir))
    };
    // Package lists may be missing when every package above was installed
    // already: fetch them once and try again.
    if download().is_err() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        download()?;
    }
    let deb = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| anyhow::anyhow!("apt-get download {package} left no .deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir))?;
    std::fs::remove_file(deb)?;
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
