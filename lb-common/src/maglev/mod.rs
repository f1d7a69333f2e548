//! The Maglev consistent-hash table (Maglev, NSDI 2016, section 3.4), with
//! relative weights.
//!
//! Every instance that shares a VIP must build the same table slot for slot,
//! so the table depends only on the set of (identity, weight), the size `M`
//! and the seed: backends are sorted by identity before populating, and the
//! permutation hashes are SipHash-1-3 with keys derived from the seed.
//!
//! Weights are relative: in round `r` a backend of weight `w` takes a turn
//! when `r * w` reaches its running threshold, which grows by the largest
//! weight at each turn. A backend of the largest weight takes a turn every
//! round, one of half that weight every other round, so its share of slots
//! is proportional to its weight. With equal weights this is exactly the
//! paper's algorithm. Weight 0 takes no slot (draining).
//!
//! Two implementations produce identical tables: [`populate_reference`],
//! the straightforward loop kept as the test oracle, and [`populate`]
//! (module `populate`), which tests windows of permutation positions
//! against an occupancy bitmap and finishes the sparse last rounds by
//! computing where each permutation next meets a free slot (modular inverse
//! of its skip) instead of probing slot by slot.

use std::{fmt, vec, vec::Vec};

use siphasher::sip::SipHasher13;

mod populate;
mod turns;
pub use populate::populate;
use turns::{TurnOrder, Turns};

/// The paper's default table size.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// The largest table size accepted (a prime).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
/// A table must have at least this many slots per backend; the balance
/// guarantee (within one slot of M/N) wants 100 or more.
pub const MIN_SLOTS_PER_BACKEND: u64 = 10;

/// Marks an empty slot while populating.
const EMPTY: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaglevError {
    NotPrime {
        size: u32,
    },
    TooSmall {
        size: u32,
        backends: usize,
        minimum: u64,
    },
    TooLarge {
        size: u32,
    },
    DuplicateBackend {
        identity: String,
    },
}

use std::string::String;

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevError::NotPrime { size } => {
                let (below, above) = nearest_primes(*size);
                match below {
                    Some(b) => write!(
                        f,
                        "table size {size} is not prime (the nearest primes: {b} and {above})"
                    ),
                    None => write!(
                        f,
                        "table size {size} is not prime (the nearest prime: {above})"
                    ),
                }
            }
            MaglevError::TooSmall {
                size,
                backends,
                minimum,
            } => write!(
                f,
                "table size {size} is too small for {backends} backends (need at least {minimum}, \
                 {MIN_SLOTS_PER_BACKEND} slots per backend; 100 per backend for even balance)"
            ),
            MaglevError::TooLarge { size } => {
                write!(
                    f,
                    "table size {size} is larger than the maximum {MAX_TABLE_SIZE}"
                )
            }
            MaglevError::DuplicateBackend { identity } => {
                write!(f, "backend {identity} is listed twice")
            }
        }
    }
}

impl std::error::Error for MaglevError {}

/// One backend as the table sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Stable identity shared by every instance (the backend's address).
    pub identity: String,
    pub weight: u32,
}

impl MaglevBackend {
    pub fn new(identity: impl Into<String>, weight: u32) -> Self {
        MaglevBackend {
            identity: identity.into(),
            weight,
        }
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The primes just below and just above `size` (none below 2).
pub fn nearest_primes(size: u32) -> (Option<u32>, u32) {
    let below = (2..size).rev().find(|&n| is_prime(n));
    let above = (size.saturating_add(1)..)
        .find(|&n| is_prime(n))
        .unwrap_or(u32::MAX);
    (below, above)
}

/// Checks that `size` can hold a table for `backends` backends.
pub fn validate_table_size(size: u32, backends: usize) -> Result<(), MaglevError> {
    if size > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge { size });
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime { size });
    }
    let minimum = (backends as u64 * MIN_SLOTS_PER_BACKEND).max(2);
    if (size as u64) < minimum {
        return Err(MaglevError::TooSmall {
            size,
            backends,
            minimum,
        });
    }
    Ok(())
}

/// Backend `i`'s permutation: slot `j` of its preference list is
/// `(offset + j * skip) mod M`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permutation {
    pub offset: u32,
    pub skip: u32,
}

fn sip(seed: u64, lane: u64, identity: &str) -> u64 {
    use core::hash::Hasher;
    let mut h = SipHasher13::new_with_keys(seed, lane);
    h.write(identity.as_bytes());
    h.finish()
}

pub fn permutation(identity: &str, size: u32, seed: u64) -> Permutation {
    let m = size as u64;
    Permutation {
        offset: (sip(seed, 0x6f66_6673_6574, identity) % m) as u32,
        skip: (sip(seed, 0x736b_6970, identity) % (m - 1) + 1) as u32,
    }
}

/// A built table: `slots[i]` is an index into `backends`, which are the
/// input's backends sorted by identity (the canonical order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backends: Vec<MaglevBackend>,
    pub slots: Vec<u32>,
}

impl MaglevTable {
    /// The identity owning slot `i`.
    pub fn identity_at(&self, i: usize) -> &str {
        &self.backends[self.slots[i] as usize].identity
    }

    /// How many slots each backend (canonical order) holds.
    pub fn slot_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.backends.len()];
        for &s in &self.slots {
            counts[s as usize] += 1;
        }
        counts
    }

    /// SHA-256 of the slots as identities, for golden vectors and for
    /// comparing tables across instances.
    pub fn digest_hex(&self) -> String {
        use sha2::{Digest, Sha256};
        use std::fmt::Write;
        let mut hasher = Sha256::new();
        for &s in &self.slots {
            hasher.update(self.backends[s as usize].identity.as_bytes());
            hasher.update(b"\n");
        }
        let mut out = String::new();
        for byte in hasher.finalize() {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

/// Builds the table for `backends` (any order) with `size` slots.
/// With no backend of non-zero weight the table has no slots: the VIP then
/// drops its packets (counted), rather than keep sending to a stale table.
pub fn build(backends: &[MaglevBackend], size: u32, seed: u64) -> Result<MaglevTable, MaglevError> {
    build_with(backends, size, seed, populate)
}

/// [`build`] with the straightforward populate loop (the test oracle).
pub fn build_reference(
    backends: &[MaglevBackend],
    size: u32,
    seed: u64,
) -> Result<MaglevTable, MaglevError> {
    build_with(backends, size, seed, populate_reference)
}

fn build_with(
    backends: &[MaglevBackend],
    size: u32,
    seed: u64,
    fill: fn(&[Permutation], &[u32], u32) -> Vec<u32>,
) -> Result<MaglevTable, MaglevError> {
    let mut sorted = backends.to_vec();
    // Unstable is fine: equal identities are an error below.
    sorted.sort_unstable_by(|a, b| a.identity.cmp(&b.identity));
    if let Some(pair) = sorted.windows(2).find(|w| w[0].identity == w[1].identity) {
        return Err(MaglevError::DuplicateBackend {
            identity: pair[0].identity.clone(),
        });
    }
    validate_table_size(size, sorted.len())?;
    let weights: Vec<u32> = sorted.iter().map(|b| b.weight).collect();
    if weights.iter().all(|&w| w == 0) {
        return Ok(MaglevTable {
            backends: sorted,
            slots: Vec::new(),
        });
    }
    let perms: Vec<Permutation> = sorted
        .iter()
        .map(|b| permutation(&b.identity, size, seed))
        .collect();
    let slots = fill(&perms, &weights, size);
    Ok(MaglevTable {
        backends: sorted,
        slots,
    })
}

/// The straightforward algorithm: each turn walks the backend's permutation
/// until it finds an empty slot.
pub fn populate_reference(perms: &[Permutation], weights: &[u32], size: u32) -> Vec<u32> {
    let m = size as u64;
    let mut entry = vec![EMPTY; size as usize];
    let mut next = vec![0u64; perms.len()];
    let mut turns = Turns::new(weights);
    for _ in 0..size {
        let i = turns.next_backend();
        let p = perms[i];
        loop {
            let c = ((p.offset as u64 + next[i] * p.skip as u64) % m) as usize;
            next[i] += 1;
            if entry[c] == EMPTY {
                entry[c] = i as u32;
                break;
            }
        }
    }
    entry
}

/// A slot whose owner changes between two tables of the same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotChange {
    pub slot: u32,
    pub backend: u32,
}

/// The slots to rewrite to turn `old` into `new` (both mapped to the
/// caller's backend ids). Tables of different sizes differ everywhere.
pub fn diff(old: &[u32], new: &[u32]) -> Vec<SlotChange> {
    if old.len() != new.len() {
        return new
            .iter()
            .enumerate()
            .map(|(i, &b)| SlotChange {
                slot: i as u32,
                backend: b,
            })
            .collect();
    }
    // Compare whole chunks first (vectorised); a change touches few slots.
    const CHUNK: usize = 32;
    let mut changes = Vec::new();
    for (c, (o, n)) in old.chunks(CHUNK).zip(new.chunks(CHUNK)).enumerate() {
        if o == n {
            continue;
        }
        for (k, (a, &b)) in o.iter().zip(n).enumerate() {
            if *a != b {
                changes.push(SlotChange {
                    slot: (c * CHUNK + k) as u32,
                    backend: b,
                });
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests;
