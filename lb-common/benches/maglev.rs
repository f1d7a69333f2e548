//! Maglev table build and diff times: `cargo bench -p lb-common --features user`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb_common::maglev::{self, MaglevBackend};

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend::new(format!("10.{}.{}.1", i / 250, i % 250), 1))
        .collect()
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group.sample_size(20);
    for (m, n) in [
        (65_537u32, 10usize),
        (65_537, 100),
        (65_537, 1000),
        (655_373, 1000),
    ] {
        let b = backends(n);
        group.bench_with_input(BenchmarkId::new(format!("M={m}"), n), &b, |bench, b| {
            bench.iter(|| maglev::build(b, m, 0).unwrap())
        });
    }
    let b = backends(100);
    group.bench_function("reference M=65537/100", |bench| {
        bench.iter(|| maglev::build_reference(&b, 65_537, 0).unwrap())
    });
    group.finish();
}

/// The slots as ids stable across tables (the backend's place in `all`),
/// as the daemon maps them before diffing.
fn stable_ids(table: &maglev::MaglevTable, all: &[MaglevBackend]) -> Vec<u32> {
    let id_of: Vec<u32> = table
        .backends
        .iter()
        .map(|b| all.iter().position(|a| a.identity == b.identity).unwrap() as u32)
        .collect();
    table.slots.iter().map(|&s| id_of[s as usize]).collect()
}

fn diff(c: &mut Criterion) {
    // One backend of 100 removed: about 1% of the slots change.
    let all = backends(100);
    let old = stable_ids(&maglev::build(&all, 65_537, 0).unwrap(), &all);
    let new = stable_ids(&maglev::build(&all[1..], 65_537, 0).unwrap(), &all);
    c.bench_function("maglev_diff M=65537", |bench| {
        bench.iter(|| maglev::diff(&old, &new))
    });
}

criterion_group!(benches, build, diff);
criterion_main!(benches);
