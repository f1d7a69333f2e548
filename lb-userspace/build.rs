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
    // Unstable features only for aya_ebpf; this also keeps aya-build from
    // asking for -Z build-std (the debian toolchain ships a bpf `core`).
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    let root = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{root}/../lb-ebpf");
    println!("cargo:rerun-if-changed={root}/../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(TOOLCHAIN),
    )
}
