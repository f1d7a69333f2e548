//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use aya_ebpf::maps::PerCpuArray;
use lb_common::maps::{Counter, Reason};

use crate::maps::{BACKEND_NEW_FLOWS, BACKEND_STATS, REASON_STATS, VIP_STATS};

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    bump(&REASON_STATS, reason as u32, bytes);
}

#[inline(always)]
pub fn count_vip(vip_id: u32, bytes: u64) {
    bump(&VIP_STATS, vip_id, bytes);
}

#[inline(always)]
pub fn count_backend(backend_id: u32, bytes: u64) {
    bump(&BACKEND_STATS, backend_id, bytes);
}

/// A new flow balanced to `backend_id` (miss path only).
#[inline(always)]
pub fn count_new_flow(backend_id: u32, bytes: u64) {
    bump(&BACKEND_NEW_FLOWS, backend_id, bytes);
}
