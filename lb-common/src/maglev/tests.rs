use std::{format, string::ToString, vec::Vec};

use proptest::prelude::*;

use super::*;

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend::new(format!("10.1.{}.{}", i / 250, i % 250 + 1), 1))
        .collect()
}

#[test]
fn validates_table_size() {
    assert_eq!(
        validate_table_size(65_536, 3),
        Err(MaglevError::NotPrime { size: 65_536 })
    );
    assert!(matches!(
        validate_table_size(251, 100),
        Err(MaglevError::TooSmall { .. })
    ));
    assert_eq!(
        validate_table_size(2_000_003, 1),
        Err(MaglevError::TooLarge { size: 2_000_003 })
    );
    assert!(validate_table_size(MAX_TABLE_SIZE, 1000).is_ok());
    assert!(validate_table_size(DEFAULT_TABLE_SIZE, 100).is_ok());
    let msg = MaglevError::NotPrime { size: 10 }.to_string();
    assert!(msg.contains("not prime"), "{msg}");
    // The suggestion is where the operator was heading, not a fixed list.
    let msg = MaglevError::NotPrime { size: 4000 }.to_string();
    assert!(msg.contains("3989 and 4001"), "{msg}");
    assert_eq!(super::nearest_primes(65_536), (Some(65_521), 65_537));
    assert_eq!(super::nearest_primes(1), (None, 2));
}

#[test]
fn duplicate_backend_is_an_error() {
    let mut b = backends(3);
    b.push(b[0].clone());
    assert_eq!(
        build(&b, 251, 0),
        Err(MaglevError::DuplicateBackend {
            identity: "10.1.0.1".to_string()
        })
    );
}

#[test]
fn no_weighted_backend_gives_an_empty_table() {
    let b = [MaglevBackend::new("a", 0), MaglevBackend::new("b", 0)];
    assert!(build(&b, 251, 0).unwrap().slots.is_empty());
    assert!(build(&[], 251, 0).unwrap().slots.is_empty());
}

#[test]
fn equal_weights_balance_within_one_slot() {
    for (n, m) in [(3, 251), (10, 65_537), (100, 65_537), (1000, 655_373)] {
        let t = build(&backends(n), m, 7).unwrap();
        let (lo, hi) = (m / n as u32, m.div_ceil(n as u32));
        for c in t.slot_counts() {
            assert!(c == lo || c == hi, "n={n} m={m}: a backend holds {c} slots");
        }
    }
}

#[test]
fn shares_follow_relative_weights() {
    let weights = [1u32, 2, 3, 4, 10, 0, 5];
    let b: Vec<_> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| MaglevBackend::new(format!("b{i}"), w))
        .collect();
    let m = 65_537;
    let t = build(&b, m, 1).unwrap();
    let total: u32 = weights.iter().sum();
    let counts = t.slot_counts();
    for (backend, count) in t.backends.iter().zip(counts) {
        let ideal = backend.weight as f64 / total as f64;
        let share = count as f64 / m as f64;
        assert!(
            (share - ideal).abs() < 0.01,
            "{}: share {share:.4}, ideal {ideal:.4}",
            backend.identity
        );
        if backend.weight == 0 {
            assert_eq!(count, 0);
        }
    }
}

#[test]
fn order_of_backends_does_not_matter() {
    let b = backends(40);
    let mut reversed = b.clone();
    reversed.reverse();
    let mut rotated = b.clone();
    rotated.rotate_left(17);
    let t = build(&b, 4099, 3).unwrap();
    assert_eq!(t, build(&reversed, 4099, 3).unwrap());
    assert_eq!(t, build(&rotated, 4099, 3).unwrap());
}

#[test]
fn seed_changes_the_table() {
    let b = backends(10);
    assert_ne!(
        build(&b, 4099, 1).unwrap().slots,
        build(&b, 4099, 2).unwrap().slots
    );
}

/// Golden vectors: any change that alters a table across versions fails here.
/// (Instances running different versions must agree slot for slot.)
#[test]
fn golden_vectors() {
    let weighted: Vec<_> = [("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)]
        .iter()
        .map(|&(id, w)| MaglevBackend::new(id, w))
        .collect();
    let cases: [(&str, Vec<MaglevBackend>, u32, u64); 4] = [
        ("3 equal, M=251", backends(3), 251, 0),
        ("weighted 1:2:3, M=4099, seed 42", weighted, 4099, 42),
        ("100 equal, M=65537", backends(100), 65_537, 0),
        ("1000 equal, M=655373, seed 9", backends(1000), 655_373, 9),
    ];
    let golden = include_str!("golden.txt");
    let mut actual = String::new();
    for (name, b, m, seed) in cases {
        let t = build(&b, m, seed).unwrap();
        actual += &format!(
            "{name}: sha256={} slot0={} slot1={} slot{}={}\n",
            t.digest_hex(),
            t.identity_at(0),
            t.identity_at(1),
            m - 1,
            t.identity_at(m as usize - 1)
        );
    }
    if std::env::var_os("LB_UPDATE_GOLDEN").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/src/maglev/golden.txt"),
            &actual,
        )
        .unwrap();
    }
    assert_eq!(
        actual, golden,
        "Maglev tables changed: every running instance would disagree"
    );
}

/// Share of slots owned by backends present in both tables that changed owner.
fn collateral_moves(old: &MaglevTable, new: &MaglevTable) -> f64 {
    let mut moved = 0usize;
    let mut kept_slots = 0usize;
    for i in 0..old.slots.len() {
        let before = old.identity_at(i);
        if new.backends.iter().any(|b| b.identity == before) {
            kept_slots += 1;
            if new.identity_at(i) != before {
                moved += 1;
            }
        }
    }
    moved as f64 / kept_slots as f64
}

#[test]
fn removing_or_adding_one_backend_disrupts_little() {
    let all = backends(100);
    let m = 65_537;
    let before = build(&all, m, 0).unwrap();
    let after_removal = build(&all[1..], m, 0).unwrap();
    // Every slot of the removed backend moves; of the others only a few.
    let removal = collateral_moves(&before, &after_removal);
    let addition = collateral_moves(&after_removal, &before);
    assert!(
        removal < 0.02,
        "removing 1 of 100 moved {:.3}% of other slots",
        removal * 100.0
    );
    assert!(
        addition < 0.02,
        "adding 1 to 99 moved {:.3}% of other slots",
        addition * 100.0
    );
}

#[test]
fn diff_lists_exactly_the_changed_slots() {
    let old = [1, 2, 3, 4];
    let new = [1, 5, 3, 6];
    assert_eq!(
        diff(&old, &new),
        [
            SlotChange {
                slot: 1,
                backend: 5
            },
            SlotChange {
                slot: 3,
                backend: 6
            }
        ]
    );
    assert_eq!(diff(&old, &[7, 7]).len(), 2);
}

#[test]
fn diff_of_real_tables_lists_every_moved_slot() {
    let all = backends(100);
    let old = build(&all, 65_537, 3).unwrap();
    // Without the backend that sorts last, the others keep their canonical
    // index, so slot values compare across the two tables.
    let rest: Vec<_> = all
        .iter()
        .filter(|b| b.identity != "10.1.0.99")
        .cloned()
        .collect();
    let new = build(&rest, 65_537, 3).unwrap();
    assert_eq!(old.backends[..99], new.backends[..]);
    let changes = diff(&old.slots, &new.slots);
    let moved: Vec<u32> = (0..65_537u32)
        .filter(|&s| old.slots[s as usize] != new.slots[s as usize])
        .collect();
    assert_eq!(changes.iter().map(|c| c.slot).collect::<Vec<_>>(), moved);
    assert!(
        changes
            .iter()
            .all(|c| new.slots[c.slot as usize] == c.backend)
    );
    assert!(!moved.is_empty() && moved.len() < 2 * 65_537 / 99);
}

#[test]
fn modular_inverse() {
    use populate::tail::inverse_mod;
    for (a, m) in [
        (1u32, 65_537u32),
        (2, 65_537),
        (1000, 65_537),
        (65_536, 65_537),
    ] {
        assert_eq!(a as u64 * inverse_mod(a, m) as u64 % m as u64, 1);
    }
    for a in [1u32, 7, 123_456, 1_048_572] {
        assert_eq!(
            a as u64 * inverse_mod(a, MAX_TABLE_SIZE) as u64 % MAX_TABLE_SIZE as u64,
            1
        );
    }
}

/// The tail's scan (vector and scalar) picks the free slot that comes
/// first in the permutation, as walking the permutation would.
#[test]
fn tail_scan_finds_the_first_free_slot_in_permutation_order() {
    use populate::tail::{first_in_permutation, inverse_mod, simd_available};
    let size = MAX_TABLE_SIZE;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for len in [1usize, 3, 4, 5, 64, 887] {
        let free: Vec<f64> = (0..len).map(|_| (next() % size as u64) as f64).collect();
        let perm = Permutation {
            offset: (next() % size as u64) as u32,
            skip: (next() % (size as u64 - 1) + 1) as u32,
        };
        let position = |s: f64| {
            let d = (s as u64 + size as u64 - perm.offset as u64) % size as u64;
            d * inverse_mod(perm.skip, size) as u64 % size as u64
        };
        let want = (0..len).min_by_key(|&k| (position(free[k]), k)).unwrap();
        // The walked permutation reaches that slot first.
        let walked = (perm.offset as u64 + position(free[want]) * perm.skip as u64) % size as u64;
        assert_eq!(walked as f64, free[want]);
        for simd in [false, simd_available()] {
            assert_eq!(
                first_in_permutation(&free, perm.offset, inverse_mod(perm.skip, size), size, simd),
                want,
                "len {len} simd {simd}"
            );
        }
    }
}

#[test]
fn fast_populate_matches_reference_on_large_tables() {
    let scalar = |p: &[Permutation], w: &[u32], m: u32| populate::populate_with(p, w, m, false);
    for (n, m) in [(1, 65_537), (100, 65_537), (1000, 655_373)] {
        let b = backends(n);
        let reference = build_reference(&b, m, 5).unwrap();
        assert_eq!(build(&b, m, 5).unwrap(), reference, "n={n} m={m}");
        assert_eq!(
            build_with(&b, m, 5, scalar).unwrap(),
            reference,
            "n={n} m={m}, without AVX2"
        );
    }
    // One of 100 failed (weight 0): the others' round robin, numbered back.
    let mut b = backends(100);
    b[37].weight = 0;
    let reference = build_reference(&b, 65_537, 5).unwrap();
    assert_eq!(build(&b, 65_537, 5).unwrap(), reference);
    let failed = reference
        .backends
        .iter()
        .position(|x| x.weight == 0)
        .unwrap() as u32;
    assert!(reference.slots.iter().all(|&i| i != failed));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn fast_populate_matches_reference(
        weights in proptest::collection::vec(0u32..6, 1..40),
        equal in 0u8..3,
        size in prop::sample::select(vec![401u32, 1009, 4099, 65_537]),
        seed in any::<u64>(),
    ) {
        // Equal weights take the round-robin loops (batched from 16
        // backends, else two turns searched at once), the others the
        // weighted turn order (its scans batched too); equal weights beside
        // zeros (failed backends) the round robin over the others.
        let weight = |w: u32| match equal {
            0 => 1,
            1 => w.min(1),
            _ => w,
        };
        let b: Vec<_> = weights.iter().enumerate().map(|(i, &w)| MaglevBackend::new(format!("{i}"), weight(w))).collect();
        let reference = build_reference(&b, size, seed).unwrap();
        prop_assert_eq!(&build(&b, size, seed).unwrap(), &reference);
        let scalar = |p: &[Permutation], w: &[u32], m: u32| populate::populate_with(p, w, m, false);
        prop_assert_eq!(&build_with(&b, size, seed, scalar).unwrap(), &reference);
    }
}
