//! Property tests of the host-side packet parser (the reference model's):
//! any bytes parse without panicking, and what it accepts is consistent.

#![cfg(feature = "user")]

use lb_common::{
    maps::FlowKey,
    model::{ModelMaps, ModelNextHop, ModelParse, parse},
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let ModelParse::Ip(p) = parse(&bytes) {
            prop_assert!(p.l2_len == 14 || p.l2_len == 18);
            prop_assert!(p.l2_len + p.ip_len as usize <= bytes.len(), "accepted datagram fits the frame");
            if p.is_fragment {
                prop_assert_eq!((p.flow.sport, p.flow.dport), (0, 0), "fragments carry no ports");
            }
        }
    }

    #[test]
    fn ipv4_headers_with_random_fields_never_panic(
        vihl in any::<u8>(), tot_len in any::<u16>(), frags in any::<u16>(), proto in any::<u8>(),
        tail in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        f.extend_from_slice(&[vihl, 0]);
        f.extend_from_slice(&tot_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&frags.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0, 192, 0, 2, 1, 10, 0, 0, 10]);
        f.extend_from_slice(&tail);
        let _ = parse(&f);
        // The whole decision (no VIPs configured) passes such frames unchanged.
        let d = ModelMaps::default().decide(&f, 1, |_, _| ModelNextHop::NoRoute, None);
        prop_assert_eq!(d.output, f);
        prop_assert_eq!(d.conntrack_write, None::<(FlowKey, u32)>);
    }

    #[test]
    fn ipv6_headers_with_random_extension_chains_never_panic(
        payload_len in any::<u16>(), next in prop_oneof![Just(0u8), Just(6), Just(17), Just(43), Just(44), Just(58), Just(60), any::<u8>()],
        tail in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd, 0x60, 0, 0, 0];
        f.extend_from_slice(&payload_len.to_be_bytes());
        f.extend_from_slice(&[next, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        f.extend_from_slice(&tail);
        if let ModelParse::Ip(p) = parse(&f) {
            prop_assert!(p.v6);
            prop_assert!(14 + p.ip_len as usize <= f.len(), "accepted datagram fits the frame");
        }
        let d = ModelMaps::default().decide(&f, 1, |_, _| ModelNextHop::NoRoute, None);
        prop_assert_eq!(d.output, f);
    }
}
