//! Helpers for the root tests: network namespaces that clean up after
//! themselves, and packet builders.

pub mod fixture;
pub mod fuzz;
pub mod lbd;
pub mod netns;
pub mod packets;
pub mod testbed;

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
