//! `cargo xtask fuzz --count N [--seed S]`: differential fuzzing of the XDP
//! programs against the reference model: the balancer, then the backend's
//! decap, N frames each. Needs root.

fn main() {
    let mut count = 1_000_000u64;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--count" => count = args.next().and_then(|v| v.parse().ok()).expect("--count N"),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).expect("--seed S"),
            other => panic!("unknown argument {other}"),
        }
    }
    let started = std::time::Instant::now();
    let counters = lb_tests::fuzz::run(seed, count);
    for (reason, c) in counters {
        println!("  {:<22} {:>10}", reason.name(), c.packets);
    }
    println!(
        "balancer: {count} frames, seed {seed}: 0 mismatches between the kernel and the model ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let started = std::time::Instant::now();
    for (reason, n) in lb_tests::decap_fuzz::run(seed, count) {
        println!("  {reason:<22} {n:>10}");
    }
    println!(
        "decap: {count} frames, seed {seed}: 0 mismatches between the kernel and the model ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}
