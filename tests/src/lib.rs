//! Helpers for the root tests: network namespaces that clean up after
//! themselves, and packet builders.

pub mod decap_fuzz;
pub mod etcd;
pub mod fixture;
pub mod fuzz;
pub mod lbd;
pub mod netns;
pub mod packets;
pub mod quic;
pub mod syn_scenario;
pub mod testbed;

/// Keeps the calling thread on `cpu`: per-CPU state (the connection
/// table's LRU lists, the new-flow budget, counters) then belongs to one CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// True when the tests can load XDP programs and create namespaces. Tests
/// print "skipping test - reason" and return otherwise.
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping test - needs root (CAP_BPF, CAP_NET_ADMIN)");
    }
    root
}

/// `etcd`: on PATH, or where `cargo xtask setup` unpacks it.
pub fn etcd_binary() -> std::path::PathBuf {
    let unpacked =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/etcd/usr/bin/etcd");
    if unpacked.exists() {
        unpacked
    } else {
        "etcd".into()
    }
}

/// `promtool`: on PATH, or where `cargo xtask setup` unpacks it.
pub fn promtool() -> std::path::PathBuf {
    let unpacked = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/prometheus/usr/bin/promtool");
    if unpacked.exists() {
        unpacked
    } else {
        "promtool".into()
    }
}

/// Runs `promtool check metrics` on an exposition; its complaints, if any.
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool: {e} (cargo xtask setup unpacks it)"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
