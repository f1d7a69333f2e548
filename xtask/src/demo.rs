//! `cargo xtask demo`: builds, then runs the demo binary (which uses the
//! tests' namespace testbed, so the demo and the end-to-end tests exercise
//! the same topology).

use anyhow::Result;

use crate::{cargo, run};

pub fn demo() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
    run(cargo().args(["run", "--release", "-p", "lb-tests", "--bin", "lb-demo"]))
}
