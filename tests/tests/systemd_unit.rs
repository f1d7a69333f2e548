//! The shipped systemd unit: `systemd-analyze verify` accepts it (with and
//! without the BGP drop-in) and `systemd-analyze security --offline=yes`
//! rates its exposure 4.0 or better.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The unit with its binaries pointed at this build (verify wants them to
/// exist), written into a fresh directory as `name`.
fn unit_copy(name: &str, with_bgp: bool) -> PathBuf {
    let mut text = std::fs::read_to_string(root().join("examples/lbd.service")).unwrap();
    if with_bgp {
        // A drop-in's [Service] lines belong to the unit's [Service].
        let dropin =
            std::fs::read_to_string(root().join("examples/lbd.service.d/bgp.conf")).unwrap();
        let lines: String = dropin
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('[') && !l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        text = text.replace("[Install]", &format!("{lines}\n[Install]"));
    }
    let bin = lb_tests::lbd::lbd_binary();
    let bin_dir = bin.parent().unwrap().display().to_string();
    let text = text.replace("/usr/local/bin", &bin_dir);
    let dir = std::env::temp_dir().join(format!("lbd-unit-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_unit_verifies() {
    for (name, bgp) in [("lbd.service", false), ("lbd-bgp.service", true)] {
        let unit = unit_copy(name, bgp);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("systemd-analyze (package systemd)");
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        // Without systemd as PID 1 verify may note that it cannot connect
        // to a bus; anything about the unit itself is a failure.
        let complaints: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(name) || l.contains("Unknown") || l.contains("not executable"))
            .collect();
        assert!(
            out.status.success() && complaints.is_empty(),
            "{name}: {text}"
        );
        let _ = std::fs::remove_dir_all(unit.parent().unwrap());
    }
}

#[test]
fn the_unit_is_hardened_to_an_exposure_of_4_or_better() {
    let unit = unit_copy("lbd.service", false);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (package systemd)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for lbd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level <= 4.0, "exposure {level}:\n{text}");
    let _ = std::fs::remove_dir_all(unit.parent().unwrap());
}
