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
unsafe impl aya::Pod for crate::maps::PrevTable {}
unsafe impl aya::Pod for crate::maps::VipById {}
unsafe impl aya::Pod for crate::maps::CaptureFilter {}
unsafe impl aya::Pod for crate::maps::QuicServerKey {}
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

/// `FAMILY_IPV4` or `FAMILY_IPV6`.
pub fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        crate::maps::FAMILY_IPV4
    } else {
        crate::maps::FAMILY_IPV6
    }
}

/// The address a map entry holds, read back with its family.
pub fn ip_from_addr(addr: &Addr, family: u8) -> IpAddr {
    if family == crate::maps::FAMILY_IPV6 {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::V4(ipv4_from_addr(addr))
    }
}

pub fn ipv4_from_addr(addr: &Addr) -> Ipv4Addr {
    Ipv4Addr::from(addr[0].to_ne_bytes())
}

impl Backend {
    /// The entry for a backend at `addr`: `BACKEND_F_IPV6` follows the
    /// address, `flags` adds the rest (validity).
    pub fn new(addr: IpAddr, flags: u32, vip_id: u32) -> Self {
        let family = if addr.is_ipv6() {
            crate::maps::BACKEND_F_IPV6
        } else {
            0
        };
        Backend {
            addr: addr_from_ip(addr),
            flags: flags | family,
            vip_id,
        }
    }

    /// The backend's address, read back with its family.
    pub fn ip(&self) -> IpAddr {
        let family = if self.flags & crate::maps::BACKEND_F_IPV6 != 0 {
            crate::maps::FAMILY_IPV6
        } else {
            crate::maps::FAMILY_IPV4
        };
        ip_from_addr(&self.addr, family)
    }
}

impl VipKey {
    pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
        VipKey {
            addr: addr_from_ip(addr),
            port: port.to_be(),
            proto,
            kind: crate::maps::VIP_KIND_PORT,
            family: family_of(addr),
            _pad: [0; 3],
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
            family: family_of(src),
            _pad: [0; 2],
        }
    }
}
