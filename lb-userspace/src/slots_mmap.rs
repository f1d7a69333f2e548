//! `MAGLEV_SLOTS` mapped into our memory: a table is written with plain
//! stores (one syscall per slot would take ~100 ms for M=65537).
//!
//! The kernel lays array elements out 8 bytes apart (`round_up(value_size,
//! 8)`). This program's elements are `SlotPair`s, so slot `i` is the u32 at
//! index `i` of the mapping. Older programs held one u32 per element (slot
//! `i` at index `2i`): their objects are still loaded as benchmark
//! baselines, and an lbd upgraded over their pinned maps copies the slots
//! into the new layout (`take_unpacked_pin`).

use std::{
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    ptr::NonNull,
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use lb_common::maps::{MAP_MAGLEV_SLOTS, SLOTS_PER_ELEMENT, SlotPair};

use crate::slot_table::SlotTable;

/// Slots per element of a `MAGLEV_SLOTS` whose values are `value_size`
/// bytes: `SLOTS_PER_ELEMENT` in this program's layout, one in older
/// programs' (a u32 each).
pub fn slots_per_element(value_size: u32) -> Result<u32> {
    match value_size as usize {
        4 => Ok(1),
        v if v == size_of::<SlotPair>() => Ok(SLOTS_PER_ELEMENT),
        v => bail!("MAGLEV_SLOTS has {v}-byte values: not a table of slots"),
    }
}

pub struct SlotsMmap {
    ptr: NonNull<u32>,
    /// Slots the map holds.
    slots: usize,
    /// u32 words from one slot to the next: 1 (pairs), 2 (one per element).
    stride: usize,
    map_len: usize,
}

impl SlotsMmap {
    /// Maps the whole of `map` (a `BPF_F_MMAPABLE` array), in whichever
    /// layout it was created.
    pub fn new(map: &MapData) -> Result<Self> {
        let info = map.info().context("reading MAGLEV_SLOTS' info")?;
        let entries = info.max_entries() as usize;
        let per_element = slots_per_element(info.value_size())? as usize;
        // An element is 8 bytes, two u32 words, whichever the layout.
        let (slots, stride) = (entries * per_element, 2 / per_element);
        let page = 4096usize;
        let map_len = (entries * 8).div_ceil(page) * page;
        // SAFETY: mapping a BPF_F_MMAPABLE array of `entries` 8-byte elements by its fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of MAGLEV_SLOTS");
        }
        let ptr = NonNull::new(ptr.cast()).context("mmap returned null")?;
        Ok(SlotsMmap {
            ptr,
            slots,
            stride,
            map_len,
        })
    }

    /// Slots the map holds.
    pub fn capacity(&self) -> usize {
        self.slots
    }

    fn cells_mut(&mut self, offset: usize, len: usize) -> &mut [u32] {
        // SAFETY: the mapping is `slots * stride` u32 long (8 bytes an
        // element) and lives as long as self.
        let all =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.slots * self.stride) };
        &mut all[offset * self.stride..(offset + len) * self.stride]
    }

    /// The ids of `len` slots from `offset` on.
    pub fn ids(&self, offset: usize, len: usize) -> impl Iterator<Item = u32> + Clone + '_ {
        // SAFETY: as in `cells_mut`.
        let all =
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.slots * self.stride) };
        all[offset * self.stride..(offset + len) * self.stride]
            .iter()
            .step_by(self.stride)
            .copied()
    }

    pub fn read(&self, offset: usize, len: usize) -> Vec<u32> {
        self.ids(offset, len).collect()
    }

    pub fn write(&mut self, offset: usize, ids: &[u32]) {
        let stride = self.stride;
        let cells = self.cells_mut(offset, ids.len());
        for (cell, &id) in cells.chunks_exact_mut(stride).zip(ids) {
            cell[0] = id;
        }
    }

    pub fn write_table(&mut self, offset: usize, table: &SlotTable) {
        // One thread: the writes go at the memory's pace, and handing parts
        // of each table to other threads cost more in wake-ups than it
        // saved (4,096 tables of 65,537 slots: 0.65 s alone, 0.75-0.9 s in
        // parts on two cores).
        let stride = self.stride;
        table.write_cells(self.cells_mut(offset, table.len()), stride, 0);
    }
}

impl Drop for SlotsMmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

// SAFETY: the mapping is owned memory; access goes through &mut self.
unsafe impl Send for SlotsMmap {}

/// Slots of a `MAGLEV_SLOTS` pinned in `dir` by an lbd whose program held
/// one slot per element (this program's verifier would reject that map):
/// `None` when nothing is pinned there or it has this program's layout.
/// The pin stays until `replace_pin` puts the new map in its place, so
/// that a load that fails leaves the running program's state as it was.
pub fn read_unpacked_pin(dir: &Path) -> Result<Option<Vec<u32>>> {
    let Ok(map) = MapData::from_pin(dir.join(MAP_MAGLEV_SLOTS)) else {
        return Ok(None);
    };
    let info = map
        .info()
        .context("reading the pinned MAGLEV_SLOTS' info")?;
    if slots_per_element(info.value_size())? == SLOTS_PER_ELEMENT {
        return Ok(None);
    }
    let old = SlotsMmap::new(&map)?;
    Ok(Some(old.read(0, old.capacity())))
}

/// Pins `map` as `MAGLEV_SLOTS` in `dir` in place of the one pinned there:
/// pinned under a temporary name, then renamed over it (one step, so a
/// daemon killed meanwhile leaves one map or the other pinned).
pub fn replace_pin(map: &MapData, dir: &Path) -> Result<()> {
    let path = dir.join(MAP_MAGLEV_SLOTS);
    // (bpffs refuses names with a dot.)
    let fresh: PathBuf = dir.join(format!("{MAP_MAGLEV_SLOTS}_NEW"));
    // Left by a daemon killed between the two steps.
    let _ = std::fs::remove_file(&fresh);
    map.pin(&fresh)
        .with_context(|| format!("pinning the new MAGLEV_SLOTS at {}", fresh.display()))?;
    std::fs::rename(&fresh, &path)
        .with_context(|| format!("renaming {} over {}", fresh.display(), path.display()))
}
