//! `cargo xtask demo`: builds, then runs the demo binary (which uses the
//! tests' namespace testbed, so the demo and the end-to-end tests exercise
//! the same topology).

use anyhow::Result;

use crate::{cargo, run, run_tests_binary};

pub fn demo(etcd: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
    run_tests_binary(if etcd { "lb-demo-etcd" } else { "lb-demo" }, &[])
}
