//! Helpers for the root tests: network namespaces that clean up after
//! themselves, and packet builders.

pub mod decap_fuzz;
pub mod fixture;
pub mod fuzz;
pub mod lbd;
pub mod netns;
pub mod packets;
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
