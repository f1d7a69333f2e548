//! `cargo xtask bench`: runs the benchmark binary (root: it loads XDP
//! programs; the health-failure figure runs the real `lbd`, built first).

use anyhow::Result;

use crate::{cargo, run, run_tests_binary};

pub fn bench(calls: u32, baseline: Option<&std::path::Path>) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
    let calls = calls.to_string();
    let mut args = vec![calls.as_str()];
    let baseline = baseline.map(|p| p.to_string_lossy().into_owned());
    if let Some(path) = &baseline {
        args.extend(["--baseline", path.as_str()]);
    }
    run_tests_binary("lb-bench", &args)
}

/// `cargo xtask bench --scale`: the control plane at thousands of VIPs and
/// backends (lb-scale; about 5 GiB of kernel memory for the default sizes).
pub fn scale(table_size: u32) -> Result<()> {
    run_tests_binary("lb-scale", &["--table-size", &table_size.to_string()])
}
