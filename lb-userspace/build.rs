//! Builds `lb-ebpf` for the BPF target and leaves it in OUT_DIR for
//! `include_bytes!`. Where the eBPF toolchain (the `debian` rustup toolchain
//! with its precompiled bpf `core`, and bpf-linker) is missing, it leaves an
//! empty stub instead so `cargo check`, clippy and the pure tests still work;
//! the daemon then refuses to start and says to run `cargo xtask setup`.

use std::{env, fs, path::PathBuf, process::Command};

const TOOLCHAIN: &str = "debian";

fn ebpf_toolchain_missing() -> Option<String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Some("bpf-linker is not on PATH".into());
    }
    let libdir = Command::new("rustup")
        .args([
            "run",
            TOOLCHAIN,
            "rustc",
            "--print",
            "target-libdir",
            "--target",
            "bpfel-unknown-none",
        ])
        .output();
    match libdir {
        Ok(o) if o.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            let has_core = fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
                })
                .unwrap_or(false);
            (!has_core).then(|| format!("no precompiled bpf `core` in {}", dir.display()))
        }
        _ => Some(format!("rustup toolchain `{TOOLCHAIN}` is not linked")),
    }
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LB_EBPF_STUB");
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("lb-ebpf");
    let forced_stub = env::var_os("LB_EBPF_STUB").is_some_and(|v| v == "1");
    let missing = if forced_stub {
        Some("LB_EBPF_STUB=1".to_string())
    } else {
        ebpf_toolchain_missing()
    };
    if let Some(why) = missing {
        println!("cargo:warning=building without the XDP program ({why}); run `cargo xtask setup`");
        println!("cargo:rerun-if-changed=../lb-ebpf/src");
        fs::write(&object, [])?;
        return Ok(());
    }
    let root = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{root}/../lb-ebpf");
    println!("cargo:rerun-if-changed={root}/../lb-common/src");
    println!("cargo:rerun-if-changed={ebpf_dir}");
    build_ebpf(&ebpf_dir, &out_dir, &object)
}

/// Builds lb-ebpf with the `debian` toolchain, as aya-build does, but
/// quietly: cargo's output is shown only when the build fails (aya-build
/// relays every line as a `warning:`).
fn build_ebpf(
    ebpf_dir: &str,
    out_dir: &std::path::Path,
    object: &std::path::Path,
) -> anyhow::Result<()> {
    let arch = match env::var("CARGO_CFG_TARGET_ARCH")?.as_str() {
        "riscv64" => "riscv64".to_string(),
        "powerpc64" => "powerpc".to_string(),
        other => other.to_string(),
    };
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        TOOLCHAIN,
        "cargo",
        "build",
        "--package",
        "lb-ebpf",
        "--bins",
        "--release",
    ])
    .args(["--target", "bpfel-unknown-none", "--target-dir"])
    .arg(&target_dir)
    .current_dir(ebpf_dir)
    // Unstable features only for aya_ebpf (the debian toolchain ships a
    // precompiled bpf `core`: no -Z build-std).
    .env("RUSTC_BOOTSTRAP", "aya_ebpf")
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Clink-arg=--disable-expand-memcpy-in-order"),
    );
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "CARGO_TARGET_DIR"] {
        cmd.env_remove(key);
    }
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("running rustup: {e}"))?;
    if !out.status.success() {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo:warning={line}");
        }
        anyhow::bail!("building lb-ebpf failed (its output is above)");
    }
    fs::copy(
        target_dir.join("bpfel-unknown-none/release/lb-ebpf"),
        object,
    )?;
    Ok(())
}
