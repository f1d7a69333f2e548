//! `cargo xtask bench`: runs the benchmark binary (root: it loads XDP programs).

use anyhow::Result;

use crate::run_tests_binary;

pub fn bench(calls: u32) -> Result<()> {
    run_tests_binary("lb-bench", &[&calls.to_string()])
}
