//! Shared between the XDP program (`no_std`) and the userspace control plane.
//!
//! Everything the kernel and userspace must agree on lives here: the layout of
//! every map key and value, the map names, the load-time settings, and the flow
//! hash. With the `user` feature it also carries the host-side pieces: the
//! Maglev table engine and the reference model of the packet decision.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod flow_hash;
pub mod maps;
pub mod quic_lb;
pub mod settings;

#[cfg(feature = "user")]
pub mod maglev;
#[cfg(feature = "user")]
pub mod model;
#[cfg(feature = "user")]
pub mod user;

/// IANA protocol numbers the data path cares about.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPIP: u8 = 4;
/// IPv6 encapsulated in IPv4 or IPv6 (RFC 2473 / 4213).
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Bytes of the original datagram an ICMP "fragmentation needed" quotes
/// (RFC 792 needs the header + 8; more helps the sender). The data path
/// and the reference model both use these.
pub const TOO_BIG_QUOTE_V4: usize = 128;
/// Bytes an ICMPv6 "packet too big" quotes.
pub const TOO_BIG_QUOTE_V6: usize = 256;
/// TTL / hop limit of the ICMP answers the data path sends.
pub const ICMP_REPLY_TTL: u8 = 64;
