//! Load-time settings of the XDP program, set as a read-only global so the
//! verifier sees constants and one object serves every configuration.

use core::mem::size_of;

/// `Settings::flags`: `gateway_mac` is set; use it when `bpf_fib_lookup`
/// has no route for a backend.
pub const SETTINGS_F_GATEWAY_MAC: u32 = 1;
/// `Settings::flags`: skip `bpf_fib_lookup` and always use the gateway MAC.
pub const SETTINGS_F_NO_FIB: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Seed of the flow hash; identical on every instance sharing a VIP.
    pub hash_seed: u32,
    /// Outer source = prefix | (flow hash & !mask), both network byte order,
    /// so backend NICs spread encapsulated flows across receive queues.
    pub encap_src_prefix: u32,
    pub encap_src_mask: u32,
    pub flags: u32,
    /// UDP conntrack entries idle longer than this are re-hashed.
    pub udp_idle_timeout_ns: u64,
    pub gateway_mac: [u8; 6],
    /// TTL of the outer header.
    pub outer_ttl: u8,
    /// A cached next hop is used for 2^this jiffies (`NEXTHOP_TTL_NS`
    /// rounded to a power of two of the host's ticks, 0.8-1.3 s); 0 = set
    /// from the host's tick when the program is loaded (`with_tick`).
    pub nexthop_ttl_shift: u8,
    /// New connection-table entries each CPU may create per second; beyond
    /// it new flows are still balanced (by the table) but not recorded, so a
    /// SYN flood cannot evict established flows. 0 = no limit.
    pub max_new_flows_per_sec: u32,
    /// GUE destination port (network byte order); the decap side listens on it.
    pub gue_port: u16,
    /// Largest packet (IP header included) that may leave toward a backend
    /// once encapsulated; a larger one is answered with "fragmentation
    /// needed" / "packet too big" (or dropped when that cannot be said).
    /// Host order; 0 = only the egress interface's MTU applies.
    pub mtu: u16,
    /// Outer IPv6 source: this /96 prefix with the flow hash in the last 32
    /// bits (network byte order words; word 3 is ignored).
    pub encap_src6_prefix: [u32; 4],
}

impl Settings {
    pub const DEFAULT: Settings = Settings {
        hash_seed: 0,
        // 172.16.0.0/16 in network byte order.
        encap_src_prefix: u32::from_ne_bytes([172, 16, 0, 0]),
        encap_src_mask: u32::from_ne_bytes([255, 255, 0, 0]),
        flags: 0,
        udp_idle_timeout_ns: 30_000_000_000,
        gateway_mac: [0; 6],
        outer_ttl: 64,
        nexthop_ttl_shift: 0,
        max_new_flows_per_sec: 0,
        gue_port: DEFAULT_GUE_PORT.to_be(),
        mtu: 1500,
        // fd00:172:16::/96 (a unique-local prefix, like 172.16.0.0/16 above).
        encap_src6_prefix: [
            u32::from_ne_bytes([0xfd, 0x00, 0x01, 0x72]),
            u32::from_ne_bytes([0x00, 0x16, 0, 0]),
            0,
            0,
        ],
    };

    /// These settings with `nexthop_ttl_shift` filled in, when 0, for a host
    /// whose jiffy lasts `tick_ns` (the resolution of
    /// `CLOCK_MONOTONIC_COARSE`): the power of two of jiffies nearest
    /// `NEXTHOP_TTL_NS`.
    pub fn with_tick(mut self, tick_ns: u64) -> Settings {
        if self.nexthop_ttl_shift == 0 {
            self.nexthop_ttl_shift = nexthop_ttl_shift(tick_ns);
        }
        self
    }

    /// How long a cached next hop lasts, in jiffies.
    #[inline(always)]
    pub fn nexthop_ttl(&self) -> u64 {
        1u64 << (self.nexthop_ttl_shift & 31)
    }
}

/// The power of two of `tick_ns` jiffies nearest `NEXTHOP_TTL_NS` (by ratio),
/// between 2^1 and 2^20.
pub fn nexthop_ttl_shift(tick_ns: u64) -> u8 {
    let ticks = (crate::maps::NEXTHOP_TTL_NS / tick_ns.max(1)).max(1);
    let mut shift = 63 - ticks.leading_zeros();
    // Nearer the next power when ticks > 2^shift * sqrt(2).
    if (ticks as u128) * (ticks as u128) > 1u128 << (2 * shift + 1) {
        shift += 1;
    }
    shift.clamp(1, 20) as u8
}

impl Default for Settings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// UDP port of GUE (the port IANA lists for it).
pub const DEFAULT_GUE_PORT: u16 = 6080;

const _: () = assert!(size_of::<Settings>() == 56);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hop_ttl_is_about_a_second_at_every_usual_tick() {
        // HZ = 100, 250, 300, 1000.
        for (tick_ns, shift) in [
            (10_000_000, 7),
            (4_000_000, 8),
            (3_333_333, 8),
            (1_000_000, 10),
        ] {
            assert_eq!(nexthop_ttl_shift(tick_ns), shift, "tick {tick_ns} ns");
            let ttl_ns = (1u64 << shift) * tick_ns;
            assert!((700_000_000..=1_400_000_000).contains(&ttl_ns), "{ttl_ns}");
        }
        assert_eq!(nexthop_ttl_shift(0), 20);
        assert_eq!(nexthop_ttl_shift(u64::MAX), 1);
        let set = Settings::DEFAULT.with_tick(4_000_000);
        assert_eq!(set.nexthop_ttl_shift, 8);
        assert_eq!(
            set.with_tick(1_000_000).nexthop_ttl_shift,
            8,
            "kept once set"
        );
    }
}
