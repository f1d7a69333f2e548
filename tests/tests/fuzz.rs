//! A short differential fuzzing run in the test suite (the long one is
//! `cargo xtask fuzz --count N`). Needs root.

use lb_tests::{decap_fuzz, fuzz, have_root};

#[test]
fn kernel_matches_reference_model_on_fuzzed_frames() {
    if !have_root() {
        return;
    }
    for seed in [1, 2, 3] {
        let counters = fuzz::run(seed, 10_000);
        // The generator must reach every path worth checking.
        for (reason, c) in counters {
            use lb_common::maps::Reason::*;
            let rare = match reason {
                // No flow budget in these runs (the model has no clock).
                DropEncapFailed | ConntrackInsertSkipped => true,
                FibFallbackGateway => seed % 2 == 0,
                DropNoRoute => seed % 2 == 1,
                _ => false,
            };
            assert!(
                rare || c.packets > 0,
                "seed {seed}: no frame took the {} path",
                reason.name()
            );
        }
    }
}

#[test]
fn decap_matches_its_model_on_fuzzed_frames() {
    if !have_root() {
        return;
    }
    for seed in [1, 2] {
        let counts = decap_fuzz::run(seed, 20_000);
        eprintln!("seed {seed}: {counts:?}");
        for reason in lb_common::maps::DecapReason::ALL {
            assert!(
                counts.get(reason.name()).copied().unwrap_or(0) > 0,
                "seed {seed}: no frame took the {} path",
                reason.name()
            );
        }
    }
}
