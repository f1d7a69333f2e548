//! Property tests of the config parser: arbitrary and mutated files never
//! panic, and whatever is accepted satisfies the validation rules.

use lb_common::maglev::is_prime;
use lb_userspace::config::Config;
use proptest::prelude::*;

const GOOD: &str = include_str!("../../examples/lbd.toml");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = Config::parse(&text);
    }

    #[test]
    fn mutated_example_is_rejected_with_a_message_or_valid(
        at in 0usize..GOOD.len(), byte in any::<u8>(), cut in proptest::option::of(0usize..GOOD.len()),
    ) {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes[at] = byte;
        if let Some(c) = cut {
            bytes.truncate(c);
        }
        let text = String::from_utf8_lossy(&bytes);
        match Config::parse(&text) {
            Ok(c) => {
                for v in &c.vips {
                    prop_assert!(is_prime(v.table_size), "accepted a non-prime table size");
                    prop_assert!(v.protocol == "tcp" || v.protocol == "udp");
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                prop_assert!(!message.is_empty());
            }
        }
    }
}
