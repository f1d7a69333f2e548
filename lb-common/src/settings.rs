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
    pub _pad: u8,
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
        _pad: 0,
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
}

impl Default for Settings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// UDP port of GUE (the port IANA lists for it).
pub const DEFAULT_GUE_PORT: u16 = 6080;

const _: () = assert!(size_of::<Settings>() == 56);
