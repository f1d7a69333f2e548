//! Builds one table many times (for profilers): `maglev_loop M N COUNT`.
use lb_common::maglev::{self, MaglevBackend};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (m, n, count) = (args[0] as u32, args[1] as usize, args[2]);
    let b: Vec<MaglevBackend> = (0..n)
        .map(|i| MaglevBackend::new(format!("10.{}.{}.1", i / 250, i % 250), 1))
        .collect();
    for _ in 0..count {
        std::hint::black_box(maglev::build(&b, m, 0).unwrap());
    }
}
