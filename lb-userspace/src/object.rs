//! The XDP object built by `build.rs`, embedded in the binary.

use anyhow::{Result, bail};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The compiled XDP object, or the reason this build has none.
pub fn ebpf_object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this build carries no XDP program: the eBPF toolchain was missing when it was \
             compiled. Run `cargo xtask setup`, then build again"
        );
    }
    Ok(OBJECT)
}
