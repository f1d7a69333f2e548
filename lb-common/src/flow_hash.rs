//! The seeded flow hash. The XDP program and userspace (`lbctl trace`, the
//! reference model) call this same function, so they pick the same Maglev slot.

use crate::maps::FlowKey;

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline(always)]
fn absorb(state: u64, word: u64) -> u64 {
    let x = (state ^ word).wrapping_mul(MUL);
    x ^ (x >> 29)
}

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
#[inline(always)]
fn finalize(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

/// Hash of a flow's 5-tuple (addresses and ports as they are on the wire).
/// Fragments hash with both ports zero so every fragment of a datagram agrees.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = (seed as u64) ^ MUL;
    h = absorb(h, key.src[0] as u64 | (key.src[1] as u64) << 32);
    h = absorb(h, key.src[2] as u64 | (key.src[3] as u64) << 32);
    h = absorb(h, key.dst[0] as u64 | (key.dst[1] as u64) << 32);
    h = absorb(h, key.dst[2] as u64 | (key.dst[3] as u64) << 32);
    h = absorb(
        h,
        key.sport as u64 | (key.dport as u64) << 16 | (key.proto as u64) << 32,
    );
    let h = finalize(h);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [src, 0, 0, 0],
            dst: [0x0a00_0001, 0, 0, 0],
            sport,
            dport: 80,
            proto: 6,
            family: crate::maps::FAMILY_IPV4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn golden_values_do_not_change() {
        // Changing the hash moves every flow on every running instance:
        // these values pin it across releases.
        assert_eq!(flow_hash(&key(1, 1000), 0), 3_886_617_930);
        assert_eq!(flow_hash(&key(1, 1000), 7), 3_417_573_532);
    }

    #[test]
    fn seed_and_every_field_change_the_hash() {
        let base = flow_hash(&key(1, 1000), 0);
        assert_ne!(base, flow_hash(&key(1, 1000), 1));
        assert_ne!(base, flow_hash(&key(2, 1000), 0));
        assert_ne!(base, flow_hash(&key(1, 1001), 0));
        let mut k = key(1, 1000);
        k.proto = 17;
        assert_ne!(base, flow_hash(&k, 0));
    }

    #[test]
    fn spreads_evenly_over_slots() {
        let buckets = 97usize;
        let mut counts = [0u32; 97];
        let n = 97_000u32;
        for i in 0..n {
            let h = flow_hash(&key(0x0a01_0000 + (i >> 8), (i & 0xff) as u16 + 1024), 42);
            counts[h as usize % buckets] += 1;
        }
        let expected = n / buckets as u32;
        for c in counts {
            assert!(
                c.abs_diff(expected) < expected / 5,
                "bucket count {c}, expected ~{expected}"
            );
        }
    }
}
