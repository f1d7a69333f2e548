//! XDP programs of the load balancer. `balancer` reads top-down:
//! parse -> VIP lookup -> connection table / Maglev table -> encapsulate ->
//! next hop -> XDP_TX or XDP_REDIRECT; `fast` does the same for the
//! common case of a tracked flow in straight-line code.
#![no_std]
#![no_main]

mod balancer;
mod bench;
mod capture;
mod decap;
mod encap;
mod fast;
mod icmp;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_md, macros::xdp, programs::XdpContext};

/// The load balancer's entry point, attached to the NIC facing the routers.
/// The two paths are separate functions (BPF subprograms) so that each has
/// its own stack frame: together they would not fit the 512-byte stack.
#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    let verdict = fast_path(ctx.ctx);
    if verdict < fast::GENERAL_HINTED {
        return verdict;
    }
    general_path(ctx.ctx, verdict == fast::GENERAL_HINTED)
}

#[inline(never)]
fn fast_path(ctx: *mut xdp_md) -> u32 {
    fast::process(&XdpContext::new(ctx))
}

#[inline(never)]
fn general_path(ctx: *mut xdp_md, hinted: bool) -> u32 {
    balancer::process(&XdpContext::new(ctx), hinted)
}

/// Backend side: strips IPIP so the kernel delivers to the VIP on `lo`.
#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    decap::process(&ctx)
}

/// Does nothing but pass: the harness floor in benchmarks, and the peer
/// program that gives a veth the native-XDP path in testbeds.
#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Drops everything: a cheap traffic sink at the far end of benchmark
/// links, so throughput figures measure the sender, not the receiver.
#[xdp]
pub fn sink(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_DROP
}

/// Benchmark only: rewrites the live frame from a template, then runs the
/// program under test (see `bench`).
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    bench::generate(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
