//! `lbctl capture`: reads the data path's capture ring (pinned by lbd) and
//! writes the packets as pcap, each forwarded packet twice: as it arrived
//! and as it left, encapsulated. lbd sets and clears the filter.

use std::{
    io::Write,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use lb_common::maps::{CAPTURE_IN, CaptureRecord};
use pcap_file::pcap::{PcapPacket, PcapWriter};

/// Bytes before a record's packet data.
const HEADER: usize = std::mem::size_of::<CaptureRecord>() - lb_common::maps::CAPTURE_SNAPLEN;

/// One record from the ring: direction, timestamp (monotonic ns), the
/// packet's length and its captured bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Captured<'a> {
    pub inbound: bool,
    pub ts_ns: u64,
    pub len: u32,
    pub data: &'a [u8],
}

/// Reads a record's fields (native byte order, as the program wrote them).
pub fn parse_record(bytes: &[u8]) -> Option<Captured<'_>> {
    if bytes.len() < HEADER {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
    let ts_ns = u64::from_ne_bytes(bytes[0..8].try_into().unwrap());
    let (len, caplen, direction) = (u32_at(8), u32_at(12), u32_at(16));
    let data = bytes.get(HEADER..HEADER + caplen as usize)?;
    Some(Captured {
        inbound: direction == CAPTURE_IN,
        ts_ns,
        len,
        data,
    })
}

/// `clock` in ns (CLOCK_MONOTONIC: what the data path stamps capture
/// records and connection-table entries with).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What a capture wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub inbound: u64,
    pub outbound: u64,
}

/// Opens the pinned ring, drops what an earlier capture left in it, then
/// writes records to `out` until `count` are written, `until` passes or
/// `stop` is set.
pub fn capture_to(
    ring: &Path,
    out: impl Write,
    count: u64,
    until: Instant,
    stop: &AtomicBool,
) -> Result<Summary> {
    let data = MapData::from_pin(ring)
        .with_context(|| format!("opening the capture ring {}", ring.display()))?;
    let mut ring = RingBuf::try_from(Map::RingBuf(data)).context("the capture ring")?;
    let mut writer = PcapWriter::new(out).context("writing the pcap header")?;
    // Wall-clock time of a monotonic stamp, for the pcap timestamps.
    let offset = clock_ns(libc::CLOCK_REALTIME).saturating_sub(clock_ns(libc::CLOCK_MONOTONIC));
    let mut summary = Summary::default();
    // Past `count`, on until each packet's second record (as it left) is
    // in too: the program writes it right after the first.
    let done = |s: &Summary| s.inbound + s.outbound >= count && s.inbound == s.outbound;
    while !done(&summary) && Instant::now() < until && !stop.load(Ordering::Relaxed) {
        let Some(item) = ring.next() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let Some(rec) = parse_record(&item) else {
            continue;
        };
        let packet = PcapPacket::new(Duration::from_nanos(rec.ts_ns + offset), rec.len, rec.data);
        writer.write_packet(&packet).context("writing a packet")?;
        if rec.inbound {
            summary.inbound += 1;
        } else {
            summary.outbound += 1;
        }
    }
    writer
        .into_writer()
        .flush()
        .context("flushing the pcap file")?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{CAPTURE_OUT, CAPTURE_SNAPLEN};

    #[test]
    fn records_parse_as_the_program_lays_them_out() {
        let mut rec = CaptureRecord {
            ts_ns: 123,
            len: 1000,
            caplen: 3,
            direction: CAPTURE_OUT,
            ifindex: 7,
            data: [0; CAPTURE_SNAPLEN],
        };
        rec.data[..3].copy_from_slice(&[1, 2, 3]);
        // SAFETY: a plain repr(C) struct viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const CaptureRecord).cast::<u8>(),
                std::mem::size_of::<CaptureRecord>(),
            )
        };
        assert_eq!(
            parse_record(bytes),
            Some(Captured {
                inbound: false,
                ts_ns: 123,
                len: 1000,
                data: &[1, 2, 3],
            })
        );
        assert_eq!(parse_record(&bytes[..10]), None);
    }
}
