//! `cargo xtask bench`: runs the benchmark binary (root: it loads XDP programs).

use anyhow::Result;

use crate::{cargo, run};

pub fn bench(calls: u32) -> Result<()> {
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "lb-tests",
            "--bin",
            "lb-bench",
            "--",
        ])
        .arg(calls.to_string()))
}
