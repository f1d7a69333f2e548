//! `cargo xtask bench`: runs the benchmark binary (root: it loads XDP
//! programs; the health-failure figure runs the real `lbd`, built first).

use anyhow::Result;

use crate::{cargo, run, run_tests_binary};

pub fn bench(calls: u32) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
    run_tests_binary("lb-bench", &[&calls.to_string()])
}
