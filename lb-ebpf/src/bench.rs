//! Benchmark only: a traffic generator for `BPF_PROG_TEST_RUN` in live-frames
//! mode. The kernel recycles live frames without restoring their bytes, so
//! a program that rewrites packets (the balancer encapsulates) would see its
//! own output on the next round. `bench_gen` first writes the template
//! frame back, then tail-calls the program under test.

use aya_ebpf::{
    bindings::xdp_action::XDP_ABORTED,
    macros::map,
    maps::{Array, ProgramArray},
    programs::XdpContext,
};
use lb_common::maps::BENCH_FRAME_LEN;

use crate::parse::ptr_at;

/// The frame every generated packet starts as.
#[map]
pub static BENCH_FRAME: Array<[u8; BENCH_FRAME_LEN]> = Array::with_max_entries(1, 0);

/// Slot 0: the program under test.
#[map]
pub static BENCH_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[inline(always)]
pub fn generate(ctx: &XdpContext) -> u32 {
    let (Some(template), Some(frame)) =
        (BENCH_FRAME.get(0), ptr_at::<[u8; BENCH_FRAME_LEN]>(ctx, 0))
    else {
        return XDP_ABORTED;
    };
    // SAFETY: bounds checked by ptr_at; the tail call does not return on success.
    unsafe {
        *frame = *template;
        BENCH_NEXT.tail_call(ctx, 0);
    }
    XDP_ABORTED
}
