//! The fast populate: the same table as `populate_reference`, built with
//! fewer and cheaper steps.
//!
//! - Occupancy lives in a bitmap (8 KB at M=65537: stays in L1) and the
//!   permutation is walked by addition.
//! - A turn tests a window of K positions at once and takes the first free
//!   one: no data-dependent branch per probe. K grows as the table fills,
//!   keeping about two free slots per window.
//! - With AVX2 and a turn order whose rounds give most of 16+ backends a
//!   turn (equal or close weights), a batch of turns (a window of
//!   consecutive backends) chooses together in vector lanes across
//!   backends, against the bitmap as it was before the batch, then claims
//!   in order ([`Table::fill_batched`]).
//! - Otherwise, and in the sparsest rounds, two consecutive turns search
//!   side by side in gathered windows ([`wide`]); without AVX2, one turn at
//!   a time with scalar loads.
//! - The last ~sqrt(1.5 M) turns do not probe at all: a backend's next slot
//!   is the free slot that comes first in its permutation, found by
//!   computing `(s - offset) * skip^-1 mod M` over the free slots (see
//!   [`tail`]).

use std::{vec, vec::Vec};

use super::{
    EMPTY, Permutation,
    turns::{RoundRobin, TurnOrder, Turns},
};

/// The widest window of permutation positions a turn tests at once.
const WIDEST: usize = 16;

/// Builds the table; `weights[i]` and `perms[i]` describe backend `i`.
pub fn populate(perms: &[Permutation], weights: &[u32], size: u32) -> Vec<u32> {
    populate_with(perms, weights, size, tail::simd_available())
}

/// [`populate`], with the wide windows and the tail scan in AVX2 lanes or
/// not (the same table either way).
pub(super) fn populate_with(
    perms: &[Permutation],
    weights: &[u32],
    size: u32,
    simd: bool,
) -> Vec<u32> {
    // A backend of weight 0 never takes a turn: the table is the one of the
    // others, numbered back. A failed backend has weight 0 beside equal
    // ones, and the others alone then take the round-robin loops.
    if weights.contains(&0) {
        let kept: Vec<u32> = (0..weights.len() as u32)
            .filter(|&i| weights[i as usize] != 0)
            .collect();
        if kept.is_empty() {
            return std::vec![EMPTY; size as usize];
        }
        let perms: Vec<Permutation> = kept.iter().map(|&i| perms[i as usize]).collect();
        let weights: Vec<u32> = kept.iter().map(|&i| weights[i as usize]).collect();
        let mut entry = populate_with(&perms, &weights, size, simd);
        for e in &mut entry {
            *e = kept[*e as usize];
        }
        return entry;
    }
    // Probing costs ~M/free per turn, the tail ~free: switch near their
    // crossing.
    let tail_at = ((size as f64 * 1.5).sqrt() as u32).max(8);
    let mut table = Table::new(perms, size);
    let mut turns = Turns::new(weights);
    // Equal weights (the common case) get turn loops of their own.
    if turns.is_round_robin() {
        table.take_all_turns(&mut RoundRobin::new(perms.len()), perms, tail_at, simd);
    } else {
        table.take_all_turns(&mut turns, perms, tail_at, simd);
    }
    table.entry
}

/// The state the probing turns work on.
struct Table {
    entry: Vec<u32>,
    occupied: Vec<u64>,
    /// The next permutation slot each backend tests (in batched rounds:
    /// the slot it took last, which a claim stores as is).
    cursor: Vec<u32>,
    /// `k * skip mod M` for k = 0..=WIDEST, per backend.
    strides: Vec<[u32; WIDEST + 1]>,
    /// The skips alone: the plain walk's compact copy stays in L1.
    skips: Vec<u32>,
    /// `k * skip mod M` for k = 0..=BATCHED_WIDEST + 1, by k then backend (so
    /// consecutive backends' strides load as one vector), padded like
    /// `cursor`. Laid out by `start_batches`, as are the two below.
    strides_by_step: Vec<u32>,
    /// The backends of a batch that take a turn (weighted orders).
    takers: Vec<u32>,
    /// A batch's first free slot per turn, or M plus the slot after its
    /// window when none is free.
    choices: Vec<u32>,
    size: u32,
}

/// The widest window a batch tests.
const BATCHED_WIDEST: usize = 16;
/// Turns chosen at once, at most.
const BATCH: usize = 256;

impl Table {
    /// Every cursor and stride is below M (checked here once instead of at
    /// every index), so every probed slot, a cursor plus a stride reduced
    /// by `wrap`, is below M: inside `occupied` and `entry`. A backend index
    /// from a `TurnOrder` is below the backend count: inside `cursor`,
    /// `strides` and `skips`.
    fn new(perms: &[Permutation], size: u32) -> Self {
        assert!(perms.iter().all(|p| p.offset < size && p.skip < size));
        let strides: Vec<[u32; WIDEST + 1]> = perms
            .iter()
            .map(|p| {
                let mut row = [0u32; WIDEST + 1];
                for k in 1..=WIDEST {
                    row[k] = wrap(row[k - 1] + p.skip, size);
                }
                row
            })
            .collect();
        // Eight lanes loaded from any backend stay inside the padding.
        let padded = perms.len().next_multiple_of(8) + 8;
        let mut cursor: Vec<u32> = perms.iter().map(|p| p.offset).collect();
        cursor.resize(padded, 0);
        Table {
            entry: vec![EMPTY; size as usize],
            occupied: vec![0u64; (size as usize).div_ceil(64)],
            cursor,
            skips: strides.iter().map(|row| row[1]).collect(),
            strides,
            strides_by_step: Vec::new(),
            choices: Vec::new(),
            takers: Vec::new(),
            size,
        }
    }

    /// Every turn: probing in windows that widen as the table fills, then
    /// the tail.
    fn take_all_turns<T: TurnOrder>(
        &mut self,
        turns: &mut T,
        perms: &[Permutation],
        tail_at: u32,
        simd: bool,
    ) {
        assert_eq!(turns.backends(), self.skips.len());
        let size = self.size;
        // Window width by fill: about two free slots expected per window.
        // With AVX2 and long runs of distinct backends in the turn order
        // (equal or close weights), turns choose their slots a batch at a
        // time; the sparsest rounds then search two turns at a time.
        let batched = simd && turns.long_runs();
        let mut free = size;
        if batched {
            self.start_batches();
        }
        for (phase, until) in [size / 2, size / 4, size / 8, size / 24, 0]
            .into_iter()
            .enumerate()
        {
            if phase == 4 && batched {
                self.step_cursors(true);
            }
            let until = until.max(tail_at);
            if free <= until {
                continue;
            }
            let count = free - until;
            match (phase, batched) {
                // SAFETY (all `unsafe` here): `simd`, so `batched`, is only
                // true when AVX2 was detected.
                #[cfg(target_arch = "x86_64")]
                (0, true) => unsafe { self.fill_batched::<2, T>(turns, count) },
                (0, _) => self.fill::<1, T>(turns, count),
                #[cfg(target_arch = "x86_64")]
                (1, true) => unsafe { self.fill_batched::<6, T>(turns, count) },
                (1, _) => self.fill::<4, T>(turns, count),
                #[cfg(target_arch = "x86_64")]
                (2, true) => unsafe { self.fill_batched::<8, T>(turns, count) },
                #[cfg(target_arch = "x86_64")]
                (2, _) if simd && turns.distinct_neighbours() => unsafe {
                    wide::fill::<1, T>(self, turns, count)
                },
                (2, _) => self.fill::<8, T>(turns, count),
                #[cfg(target_arch = "x86_64")]
                (3, true) => unsafe { self.fill_batched::<16, T>(turns, count) },
                #[cfg(target_arch = "x86_64")]
                _ if simd => unsafe { wide::fill::<2, T>(self, turns, count) },
                _ => self.fill::<WIDEST, T>(turns, count),
            }
            free = until;
        }
        let mut last = tail::Tail::new(&self.occupied, size, perms, simd);
        for _ in 0..free {
            let i = turns.next_backend();
            self.entry[last.take_first(&perms[i], i, size) as usize] = i as u32;
        }
    }

    /// [`Table::fill`], choosing the slots of a batch of turns together
    /// (a run of distinct backends in the turn order): their windows
    /// are tested against the bitmap as it was before the batch, in AVX2
    /// lanes across backends, and the turns then claim in order. A turn's
    /// choice stands unless an earlier turn of the batch took it meanwhile
    /// (claims only take slots, so no earlier one opened); that turn, and
    /// one whose window was full, search on as in `fill`.
    ///
    /// # Safety
    /// AVX2 is available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn fill_batched<const K: usize, T: TurnOrder>(&mut self, turns: &mut T, count: u32) {
        let mut takers = core::mem::take(&mut self.takers);
        let mut left = count as usize;
        while left > 0 {
            let (run, all) = turns.take_run(left.min(BATCH), &mut takers);
            // SAFETY: as the caller promises; the run's backends exist and
            // number at most BATCH.
            unsafe { batch::choose::<K>(self, run.start, run.len()) };
            // SAFETY (both loops): `n < BATCH`; `i` from the turn order.
            if all {
                left -= run.len();
                for (n, i) in run.enumerate() {
                    unsafe { self.claim_choice::<K>(n, i) };
                }
            } else {
                left -= takers.len();
                for &i in &takers {
                    let i = i as usize;
                    unsafe { self.claim_choice::<K>(i - run.start, i) };
                }
            }
        }
        self.takers = takers;
    }

    /// Backend `i` takes its batch choice `n`, or searches on from it.
    ///
    /// # Safety
    /// `n < BATCH`, `i` is a backend, AVX2 is available.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn claim_choice<const K: usize>(&mut self, n: usize, i: usize) {
        let size = self.size;
        // SAFETY: as the caller promises; a choice is a slot, or `size`
        // plus a slot; cursors and strides are below M.
        unsafe {
            let choice = *self.choices.get_unchecked(n);
            let slot = if choice < size && taken(&self.occupied, choice) == 0 {
                choice
            } else {
                // From the position after the choice, or after a window
                // that was full.
                let from = if choice < size {
                    wrap(choice + *self.skips.get_unchecked(i), size)
                } else {
                    choice - size
                };
                if K == 16 {
                    // Sixteen scalar probes a step cost more than two
                    // gathers.
                    wide::search::<2>(self, i, from)
                } else if K == 1 {
                    walk(&self.occupied, from, *self.skips.get_unchecked(i), size)
                } else {
                    search::<K>(&self.occupied, from, self.strides.get_unchecked(i), size)
                }
            };
            // A claim whose cursor stays on the slot taken.
            *self.occupied.get_unchecked_mut((slot >> 6) as usize) |= 1 << (slot & 63);
            *self.cursor.get_unchecked_mut(i) = slot;
            *self.entry.get_unchecked_mut(slot as usize) = i as u32;
        }
    }

    /// What the batched rounds work with: the strides by step, the
    /// buffers, and cursors one step back (they keep the last slot taken).
    fn start_batches(&mut self) {
        let padded = self.cursor.len();
        let size = self.size;
        self.strides_by_step = vec![0u32; (BATCHED_WIDEST + 2) * padded];
        for (i, &skip) in self.skips.iter().enumerate() {
            let mut stride = 0;
            for k in 0..BATCHED_WIDEST + 2 {
                self.strides_by_step[k * padded + i] = stride;
                stride = wrap(stride + skip, size);
            }
        }
        self.choices = vec![0u32; BATCH + 8];
        self.takers = Vec::with_capacity(BATCH);
        self.step_cursors(false);
    }

    /// Cursors to the slot before (`forward` false: batched rounds keep the
    /// last slot claimed) or after (`forward`) where they point.
    fn step_cursors(&mut self, forward: bool) {
        let size = self.size;
        for (at, &skip) in self.cursor.iter_mut().zip(&self.skips) {
            *at = if forward {
                wrap(*at + skip, size)
            } else {
                wrap(*at + size - skip, size)
            };
        }
    }

    /// The next `count` turns, each testing `K` positions per step.
    fn fill<const K: usize, T: TurnOrder>(&mut self, turns: &mut T, count: u32) {
        for _ in 0..count {
            let i = turns.next_backend();
            // SAFETY: `i` from the turn order is a backend; cursors and
            // strides are below M (checked in `new`).
            unsafe {
                let at = *self.cursor.get_unchecked(i);
                let slot = if K == 1 {
                    walk(&self.occupied, at, *self.skips.get_unchecked(i), self.size)
                } else {
                    search::<K>(&self.occupied, at, self.strides.get_unchecked(i), self.size)
                };
                self.claim(i, slot);
            }
        }
    }

    /// Backend `i` takes `slot`; its cursor moves past it.
    ///
    /// # Safety
    /// `i` is a backend and `slot < M`.
    #[inline(always)]
    unsafe fn claim(&mut self, i: usize, slot: u32) {
        debug_assert!(i < self.cursor.len() && slot < self.size);
        // SAFETY: as the caller promises; the lengths were checked in `new`.
        unsafe {
            *self.occupied.get_unchecked_mut((slot >> 6) as usize) |= 1 << (slot & 63);
            *self.cursor.get_unchecked_mut(i) =
                wrap(slot + *self.skips.get_unchecked(i), self.size);
            *self.entry.get_unchecked_mut(slot as usize) = i as u32;
        }
    }
}

/// Whether `slot` is taken.
///
/// # Safety
/// `slot` is below the bitmap's length in bits.
#[inline(always)]
unsafe fn taken(occupied: &[u64], slot: u32) -> u32 {
    debug_assert!((slot as usize) < occupied.len() * 64);
    // SAFETY: as the caller promises.
    (unsafe { *occupied.get_unchecked((slot >> 6) as usize) } >> (slot & 63)) as u32 & 1
}

#[cfg(target_arch = "x86_64")]
mod lanes {
    //! Eight permutation positions at a time, for [`super::batch`] and
    //! [`super::wide`].

    use core::arch::x86_64::*;

    /// [`super::wrap`] in each lane: `x mod size` for `x < 2 * size`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn wrap(x: __m256i, sizes: __m256i) -> __m256i {
        _mm256_min_epu32(x, _mm256_sub_epi32(x, sizes))
    }

    /// Each position's occupancy bit, gathered from the bitmap read as
    /// 32-bit words and moved to its lane's sign bit (set: taken).
    ///
    /// # Safety
    /// Every position is below the bitmap's length in bits.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn taken_sign(occupied: &[u64], pos: __m256i) -> __m256i {
        let words = occupied.as_ptr() as *const i32;
        let low_bits = _mm256_set1_epi32(31);
        // SAFETY: as the caller promises, every word lies in the bitmap.
        let word = unsafe { _mm256_i32gather_epi32::<4>(words, _mm256_srli_epi32::<5>(pos)) };
        _mm256_sllv_epi32(
            word,
            _mm256_sub_epi32(low_bits, _mm256_and_si256(pos, low_bits)),
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod batch {
    //! The windows of consecutive backends' turns, eight backends per
    //! vector.

    use core::arch::x86_64::*;

    use super::{Table, lanes};

    /// Writes to `table.choices[..len]`, for backends `first..first + len`,
    /// the first free slot among the `K` after the one each took last, or
    /// (all taken) M plus the slot after those.
    ///
    /// # Safety
    /// AVX2 is available; `first + len` is at most the backend count and
    /// `len` at most `BATCH`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn choose<const K: usize>(table: &mut Table, first: usize, len: usize) {
        let padded = table.cursor.len();
        debug_assert!(first + len <= padded - 8 && len <= super::BATCH);
        let sizes = _mm256_set1_epi32(table.size as i32);
        for lane in (0..len).step_by(8) {
            let i = first + lane;
            // SAFETY: `i + 8 <= padded`: the padding covers the last lanes
            // (see `Table::new`), and `strides_by_step` holds padded
            // values per step; `choices` holds BATCH + 8.
            unsafe {
                let cursor = _mm256_loadu_si256(table.cursor.as_ptr().add(i) as *const __m256i);
                let step = table.strides_by_step.as_ptr().add((K + 1) * padded + i);
                let next = _mm256_add_epi32(cursor, _mm256_loadu_si256(step as *const __m256i));
                let mut choice = _mm256_add_epi32(lanes::wrap(next, sizes), sizes);
                // Last position first: the first free one is chosen last.
                for k in (1..=K).rev() {
                    let step = table.strides_by_step.as_ptr().add(k * padded + i);
                    let pos = _mm256_add_epi32(cursor, _mm256_loadu_si256(step as *const __m256i));
                    let pos = lanes::wrap(pos, sizes);
                    let bit = lanes::taken_sign(&table.occupied, pos);
                    choice = _mm256_castps_si256(_mm256_blendv_ps(
                        _mm256_castsi256_ps(pos),
                        _mm256_castsi256_ps(choice),
                        _mm256_castsi256_ps(bit),
                    ));
                }
                _mm256_storeu_si256(table.choices.as_mut_ptr().add(lane) as *mut __m256i, choice);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    //! Windows of 8 or 16 positions tested with AVX2 gathers: the positions
    //! are computed in 8 lanes and their occupancy bits gathered
    //! ([`lanes::taken_sign`]). A gather takes long to arrive, so two
    //! consecutive turns search at once: the later one's windows are
    //! gathered beside the earlier one's, and what it finds stands unless
    //! the earlier turn took that very slot. (Narrower windows, in the
    //! fuller rounds, are faster with scalar loads.)

    use core::arch::x86_64::*;

    use super::{Table, TurnOrder, lanes, wrap};

    /// One turn's search: its backend, strides and permutation slot.
    #[derive(Clone, Copy)]
    struct Lane<const V: usize> {
        i: usize,
        at: u32,
        /// `k * skip mod M` for the window's k = 0..8V.
        steps: [__m256i; V],
    }

    impl<const V: usize> Lane<V> {
        /// Backend `i`'s search from its cursor.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn start(table: &Table, i: usize) -> Self {
            let row = &table.strides[i];
            let mut steps = [_mm256_setzero_si256(); V];
            for (v, step) in steps.iter_mut().enumerate() {
                // SAFETY: a row holds WIDEST + 1 >= 8 * V + 1 values.
                *step = unsafe { _mm256_loadu_si256(row[8 * v..].as_ptr() as *const __m256i) };
            }
            Lane {
                i,
                at: table.cursor[i],
                steps,
            }
        }

        /// The window's free positions (bit k: `at + k * skip`).
        #[inline]
        #[target_feature(enable = "avx2")]
        fn free(&self, table: &Table) -> u32 {
            let sizes = _mm256_set1_epi32(table.size as i32);
            let base = _mm256_set1_epi32(self.at as i32);
            let mut taken = 0u32;
            for (v, step) in self.steps.iter().enumerate() {
                let pos = lanes::wrap(_mm256_add_epi32(base, *step), sizes);
                // SAFETY: every position is below `size` (cursors and
                // strides are), so its word lies inside the bitmap.
                let bit = unsafe { lanes::taken_sign(&table.occupied, pos) };
                taken |= (_mm256_movemask_ps(_mm256_castsi256_ps(bit)) as u32) << (8 * v);
            }
            !taken & (u32::MAX >> (32 - 8 * V))
        }

        /// The slot of the first position in `free` (non-zero).
        #[inline(always)]
        fn slot(&self, table: &Table, free: u32) -> u32 {
            wrap(
                self.at + table.strides[self.i][free.trailing_zeros() as usize],
                table.size,
            )
        }

        /// On to the next window.
        #[inline(always)]
        fn advance(&mut self, table: &Table) {
            self.at = wrap(self.at + table.strides[self.i][8 * V], table.size);
        }

        /// The first free slot from the window on, searched alone.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn find(&mut self, table: &Table) -> u32 {
            loop {
                let free = self.free(table);
                if free != 0 {
                    return self.slot(table, free);
                }
                self.advance(table);
            }
        }
    }

    /// Backend `i`'s first free slot from `at`, in windows of `8 * V`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn search<const V: usize>(table: &Table, i: usize, at: u32) -> u32 {
        let mut lane = Lane::<V>::start(table, i);
        lane.at = at;
        lane.find(table)
    }

    /// [`Table::fill`] with windows of `8 * V` positions.
    #[target_feature(enable = "avx2")]
    pub unsafe fn fill<const V: usize, T: TurnOrder>(table: &mut Table, turns: &mut T, count: u32) {
        if count == 0 {
            return;
        }
        let mut left = count - 1;
        let mut x = Lane::<V>::start(table, turns.next_backend());
        // Two turns of one backend in a row: the second starts from where
        // the first ends, so they cannot search side by side.
        if left > 0 && turns.distinct_neighbours() {
            let mut y = Lane::<V>::start(table, turns.next_backend());
            left -= 1;
            loop {
                let (fx, mut fy) = (x.free(table), y.free(table));
                if fx == 0 {
                    x.advance(table);
                    if fy == 0 {
                        y.advance(table);
                    }
                    continue;
                }
                let taken = x.slot(table, fx);
                // SAFETY: `i` from the turn order, `slot` from `wrap`.
                unsafe { table.claim(x.i, taken) };
                if fy != 0 && y.slot(table, fy) == taken {
                    fy &= fy - 1;
                }
                if fy != 0 {
                    // SAFETY: as above.
                    unsafe { table.claim(y.i, y.slot(table, fy)) };
                    if left == 0 {
                        return;
                    }
                    x = Lane::start(table, turns.next_backend());
                    left -= 1;
                } else {
                    // Every position of y's window is taken now.
                    y.advance(table);
                    x = y;
                }
                if left == 0 {
                    break;
                }
                y = Lane::start(table, turns.next_backend());
                left -= 1;
            }
        }
        loop {
            let slot = x.find(table);
            // SAFETY: as above.
            unsafe { table.claim(x.i, slot) };
            if left == 0 {
                return;
            }
            x = Lane::start(table, turns.next_backend());
            left -= 1;
        }
    }
}

/// The first free slot from `at`, one permutation position per step.
///
/// # Safety
/// `at` and `skip` are below `size`, and `occupied` holds `size` bits.
#[inline(always)]
unsafe fn walk(occupied: &[u64], mut at: u32, skip: u32, size: u32) -> u32 {
    loop {
        // SAFETY: `at` stays below `size` (`wrap` of two values below it).
        if unsafe { taken(occupied, at) } == 0 {
            return at;
        }
        at = wrap(at + skip, size);
    }
}

/// The first free slot from `at` in the permutation with these strides,
/// testing `K` positions per step.
///
/// # Safety
/// `at` and every stride are below `size`, and `occupied` holds `size` bits.
#[inline(always)]
unsafe fn search<const K: usize>(
    occupied: &[u64],
    mut at: u32,
    stride: &[u32; WIDEST + 1],
    size: u32,
) -> u32 {
    loop {
        let mut taken = 0u32;
        for (k, &step) in stride.iter().take(K).enumerate() {
            // SAFETY: as above.
            taken |= unsafe { self::taken(occupied, wrap(at + step, size)) } << k;
        }
        let free = !taken & (u32::MAX >> (32 - K));
        if free != 0 {
            return wrap(at + stride[free.trailing_zeros() as usize], size);
        }
        at = wrap(at + stride[K], size);
    }
}

/// `x mod size` for `x < 2 * size`, without a branch.
#[inline(always)]
fn wrap(x: u32, size: u32) -> u32 {
    x.min(x.wrapping_sub(size))
}

pub(super) mod tail {
    //! The last turns: with few slots free, a backend's next slot is the
    //! free slot whose position in its permutation,
    //! `(s - offset) * skip^-1 mod M`, is smallest. No free slot lies before
    //! its cursor (it has tested them all), so this is the slot it would
    //! have probed its way to.

    use std::vec::Vec;

    use super::super::Permutation;

    pub struct Tail {
        /// Free slots as f64: exact (< 2^21), and the scan runs in f64 lanes.
        free: Vec<f64>,
        /// `skip^-1 mod M` per backend.
        inverse: Vec<u32>,
        simd: bool,
    }

    impl Tail {
        pub fn new(occupied: &[u64], size: u32, perms: &[Permutation], simd: bool) -> Self {
            let mut free = Vec::new();
            for (w, &word) in occupied.iter().enumerate() {
                let mut holes = !word;
                while holes != 0 {
                    let slot = w as u32 * 64 + holes.trailing_zeros();
                    if slot < size {
                        free.push(slot as f64);
                    }
                    holes &= holes - 1;
                }
            }
            Tail {
                free,
                inverse: inverses(perms.iter().map(|p| p.skip), size),
                simd,
            }
        }

        /// Removes and returns backend `i`'s next slot.
        pub fn take_first(&mut self, perm: &Permutation, i: usize, size: u32) -> u32 {
            let k = first_in_permutation(&self.free, perm.offset, self.inverse[i], size, self.simd);
            self.free.swap_remove(k) as u32
        }
    }

    pub fn simd_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The inverses mod prime `m` of values in `1..m`, with one extended
    /// Euclid and three multiplications each (Montgomery's batch trick:
    /// invert the product, then peel the factors off).
    pub fn inverses(values: impl Iterator<Item = u32> + Clone, m: u32) -> Vec<u32> {
        let mut prefix: Vec<u32> = Vec::new();
        let mut product = 1u32;
        for v in values.clone() {
            prefix.push(product);
            product = mul_mod(product, v, m);
        }
        let mut inverse_of_rest = inverse_mod(product, m);
        let values: Vec<u32> = values.collect();
        let mut out = std::vec![0u32; values.len()];
        for k in (0..values.len()).rev() {
            out[k] = mul_mod(inverse_of_rest, prefix[k], m);
            inverse_of_rest = mul_mod(inverse_of_rest, values[k], m);
        }
        out
    }

    fn mul_mod(a: u32, b: u32, m: u32) -> u32 {
        (a as u64 * b as u64 % m as u64) as u32
    }

    /// `a^-1 mod m` for prime `m` and `0 < a < m` (extended Euclid).
    pub fn inverse_mod(a: u32, m: u32) -> u32 {
        let (mut r0, mut r1) = (m as i64, a as i64);
        let (mut t0, mut t1) = (0i64, 1i64);
        while r1 != 0 {
            let q = r0 / r1;
            (r0, r1) = (r1, r0 - q * r1);
            (t0, t1) = (t1, t0 - q * t1);
        }
        t0.rem_euclid(m as i64) as u32
    }

    /// Index in `free` of the slot first in the permutation `(offset,
    /// skip = inverse^-1)`. Every candidate gets the exact key
    /// `position * 2^21 + index` (< 2^41, exact in f64), so the vector and
    /// scalar scans agree bit for bit.
    pub fn first_in_permutation(
        free: &[f64],
        offset: u32,
        inverse: u32,
        size: u32,
        simd: bool,
    ) -> usize {
        let (offset, inverse, m) = (offset as f64, inverse as f64, size as f64);
        let mut best = f64::MAX;
        let mut start = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when AVX2 and FMA were detected.
            best = unsafe { avx2::min_key(free, offset, inverse, m) };
            start = free.len() / 4 * 4;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        for (k, &slot) in free.iter().enumerate().skip(start) {
            best = best.min(key(slot, k as f64, offset, inverse, m));
        }
        (best as u64 & INDEX_MASK) as usize
    }

    const INDEX_BITS: u32 = 21;
    const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

    /// `(slot - offset) * inverse mod m` (both products are exact in f64:
    /// |p| < m^2 < 2^40), as the key `position * 2^21 + index`.
    #[inline(always)]
    fn key(slot: f64, index: f64, offset: f64, inverse: f64, m: f64) -> f64 {
        let p = (slot - offset) * inverse;
        // p / m is within 2^-32 of the true quotient, which is an integer
        // or at least 1/m away from one: the floor is exact.
        let r = p - (p / m).floor() * m;
        r * (1u64 << INDEX_BITS) as f64 + index
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use core::arch::x86_64::*;

        /// The smallest key over `free`'s whole groups of four.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn min_key(free: &[f64], offset: f64, inverse: f64, m: f64) -> f64 {
            let mv = _mm256_set1_pd(m);
            let recip = _mm256_set1_pd(1.0 / m);
            let off = _mm256_set1_pd(offset);
            let inv = _mm256_set1_pd(inverse);
            let scale = _mm256_set1_pd((1u64 << super::INDEX_BITS) as f64);
            let four = _mm256_set1_pd(4.0);
            let mut index = _mm256_setr_pd(0.0, 1.0, 2.0, 3.0);
            let mut best = _mm256_set1_pd(f64::MAX);
            for group in free.chunks_exact(4) {
                // SAFETY: `group` holds four f64.
                let s = unsafe { _mm256_loadu_pd(group.as_ptr()) };
                let p = _mm256_mul_pd(_mm256_sub_pd(s, off), inv);
                // Through the rounded 1/m the quotient can only come out one
                // low, when p is an exact multiple of m: then r = m, not 0.
                let q = _mm256_floor_pd(_mm256_mul_pd(p, recip));
                let r = _mm256_fnmadd_pd(q, mv, p);
                let r = _mm256_sub_pd(r, _mm256_and_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(r, mv), mv));
                best = _mm256_min_pd(best, _mm256_fmadd_pd(r, scale, index));
                index = _mm256_add_pd(index, four);
            }
            let mut lanes = [0f64; 4];
            // SAFETY: `lanes` holds four f64.
            unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), best) };
            lanes.into_iter().fold(f64::MAX, f64::min)
        }
    }
}
