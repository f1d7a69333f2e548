//! Host-side conveniences: aya `Pod` impls and address conversions.

use core::net::{IpAddr, Ipv4Addr};

use crate::maps::{
    Addr, Backend, ConnEntry, Counter, FlowKey, InsertBudget, NextHopCache, VipKey, VipMeta,
};
use crate::settings::Settings;

// SAFETY: all of these are #[repr(C)] plain data with explicit padding.
unsafe impl aya::Pod for VipKey {}
unsafe impl aya::Pod for VipMeta {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for ConnEntry {}
unsafe impl aya::Pod for Counter {}
unsafe impl aya::Pod for NextHopCache {}
unsafe impl aya::Pod for InsertBudget {}
unsafe impl aya::Pod for Settings {}

/// The map representation of an address (network byte order words).
pub fn addr_from_ip(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

pub fn ipv4_from_addr(addr: &Addr) -> Ipv4Addr {
    Ipv4Addr::from(addr[0].to_ne_bytes())
}

impl VipKey {
    pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
        VipKey {
            addr: addr_from_ip(addr),
            port: port.to_be(),
            proto,
            kind: crate::maps::VIP_KIND_PORT,
        }
    }
}

impl FlowKey {
    pub fn new(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> Self {
        FlowKey {
            src: addr_from_ip(src),
            dst: addr_from_ip(dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            _pad: [0; 3],
        }
    }
}
