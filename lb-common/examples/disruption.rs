//! Prints how many slots of untouched backends move when backends are
//! removed or added (compare with the Maglev paper, figure 12):
//! `cargo run --release -p lb-common --features user --example disruption`.

use lb_common::maglev::{self, MaglevBackend};

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend::new(format!("10.{}.{}.1", i / 250, i % 250), 1))
        .collect()
}

/// Share of the slots of backends in both tables that moved to another
/// backend in both tables: the disruption beyond what the change requires
/// (a removed backend's slots must move; a new backend must take some).
fn collateral(old: &maglev::MaglevTable, new: &maglev::MaglevTable) -> f64 {
    let ids = |t: &maglev::MaglevTable| -> std::collections::HashSet<String> {
        t.backends.iter().map(|b| b.identity.clone()).collect()
    };
    let (in_old, in_new) = (ids(old), ids(new));
    let (mut kept, mut moved) = (0usize, 0usize);
    for i in 0..old.slots.len() {
        let (before, after) = (old.identity_at(i), new.identity_at(i));
        if in_new.contains(before) {
            kept += 1;
            moved += (after != before && in_old.contains(after)) as usize;
        }
    }
    100.0 * moved as f64 / kept as f64
}

fn main() {
    for (m, n) in [(65_537u32, 100usize), (65_537, 1000), (655_373, 1000)] {
        let all = backends(n);
        let before = maglev::build(&all, m, 0).unwrap();
        for pct in [1usize, 2, 3] {
            let k = n * pct / 100;
            let after = maglev::build(&all[k..], m, 0).unwrap();
            println!(
                "M={m} N={n}: remove {pct}% ({k}): {:.2}% of other slots move",
                collateral(&before, &after)
            );
        }
        let fewer = maglev::build(&all[1..], m, 0).unwrap();
        println!(
            "M={m} N={n}: add 1 backend: {:.2}% of other slots move",
            collateral(&fewer, &before)
        );
    }
}
