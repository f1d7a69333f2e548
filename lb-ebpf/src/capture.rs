//! `lbctl capture`: forwarded packets copied into a ring buffer, as they
//! arrived and as they left. Off, it costs one array read per VIP packet.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::maps::{CAPTURE_ANY_VIP, CAPTURE_SNAPLEN, CaptureRecord};

use crate::maps::{CAPTURE, CAPTURE_LOST, CAPTURE_RING};

/// Whether the packet of `vip_id` sent to `backend_id` is to be captured.
#[inline(always)]
pub fn wanted(vip_id: u32, backend_id: u32) -> bool {
    match CAPTURE.get(0) {
        Some(f) if f.enabled != 0 => {
            (f.vip_id == CAPTURE_ANY_VIP || f.vip_id == vip_id)
                && (f.backend_id == 0 || f.backend_id == backend_id)
        }
        _ => false,
    }
}

/// Copies the packet as it is now into the ring (`direction`: in or out).
/// Out of line: its code and stack are not the forwarding path's.
#[inline(never)]
pub fn record(ctx: &XdpContext, direction: u32) {
    let len = ctx.data_end() - ctx.data();
    let Some(mut entry) = CAPTURE_RING.reserve::<CaptureRecord>(0) else {
        if let Some(lost) = CAPTURE_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array.
            unsafe { *lost += 1 };
        }
        return;
    };
    // Bounded for the verifier: 1..=SNAPLEN.
    let caplen = if len > CAPTURE_SNAPLEN {
        CAPTURE_SNAPLEN
    } else {
        len
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` is the reserved record; the helper copies at most
    // `caplen` (<= its data size) bytes from the packet.
    let copied = unsafe {
        (*rec).ts_ns = bpf_ktime_get_ns();
        (*rec).len = len as u32;
        (*rec).direction = direction;
        (*rec).ifindex = (*ctx.ctx).ingress_ifindex;
        if caplen == 0 {
            -1
        } else {
            bpf_xdp_load_bytes(ctx.ctx, 0, (*rec).data.as_mut_ptr().cast(), caplen as u32)
        }
    };
    // SAFETY: as above.
    unsafe { (*rec).caplen = if copied == 0 { caplen as u32 } else { 0 } };
    entry.submit(0);
}
