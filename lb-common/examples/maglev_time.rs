//! Quick timing of table builds (min of 20): `cargo run --release -p lb-common --features user --example maglev_time`.

use lb_common::maglev::{self, MaglevBackend};

fn main() {
    for (m, n) in [(65_537u32, 100usize), (655_373, 1000)] {
        let b: Vec<MaglevBackend> = (0..n)
            .map(|i| MaglevBackend::new(format!("10.{}.{}.1", i / 250, i % 250), 1))
            .collect();
        let time = |f: &dyn Fn()| {
            (0..20)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::MAX, f64::min)
        };
        let fast = time(&|| {
            std::hint::black_box(maglev::build(&b, m, 0).unwrap());
        });
        let reference = time(&|| {
            std::hint::black_box(maglev::build_reference(&b, m, 0).unwrap());
        });
        println!("M={m} N={n}: fast {fast:.3} ms, reference {reference:.3} ms");
    }
}
