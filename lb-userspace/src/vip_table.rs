//! Turning a VIP's backend list into map contents and writing them in the
//! order that keeps every packet on a valid path: backends first, then the
//! table into a fresh region, then the one VIPS update that switches to it.

use std::net::IpAddr;

use anyhow::{Context, Result};
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{BACKEND_F_VALID, Backend, VipKey, VipMeta},
    user::addr_from_ip,
};

use crate::{dataplane::Dataplane, slots::SlotAllocator};

/// A backend of one VIP with the id its map entries use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub id: u32,
    pub addr: IpAddr,
    pub weight: u32,
}

/// The VIP's Maglev table with each slot holding a backend id. Identities
/// are the backends' addresses, so every instance agrees.
pub fn maglev_ids(
    backends: &[BackendSpec],
    size: u32,
    seed: u32,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let input: Vec<MaglevBackend> = backends
        .iter()
        .map(|b| MaglevBackend::new(b.addr.to_string(), b.weight))
        .collect();
    let table = maglev::build(&input, size, seed as u64)?;
    let ids: Vec<u32> = table
        .backends
        .iter()
        .map(|mb| {
            backends
                .iter()
                .find(|b| b.addr.to_string() == mb.identity)
                .map(|b| b.id)
                .unwrap_or(0)
        })
        .collect();
    Ok(table.slots.iter().map(|&i| ids[i as usize]).collect())
}

/// The table when some backends have failed: every slot of a healthy
/// backend keeps its owner (its flows do not move, tracked or not), and each
/// slot of a failed backend goes to the owner that slot has in the table of
/// the healthy backends alone. Deterministic from (backends, failed set), so
/// instances with the same health view agree slot for slot.
pub fn table_with_failures(
    backends: &[BackendSpec],
    failed: &[u32],
    size: u32,
    seed: u32,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let base = maglev_ids(backends, size, seed)?;
    if failed.is_empty() {
        return Ok(base);
    }
    let healthy: Vec<BackendSpec> = backends
        .iter()
        .map(|b| BackendSpec {
            weight: if failed.contains(&b.id) { 0 } else { b.weight },
            ..b.clone()
        })
        .collect();
    let alternative = maglev_ids(&healthy, size, seed)?;
    if alternative.is_empty() || base.is_empty() {
        return Ok(alternative);
    }
    Ok(base
        .iter()
        .zip(&alternative)
        .map(|(&b, &a)| if failed.contains(&b) { a } else { b })
        .collect())
}

/// Writes a VIP and its backends, switching it to a new table atomically.
/// Returns the new meta; the caller releases `previous`'s region.
pub fn install_vip(
    dp: &mut Dataplane,
    alloc: &mut SlotAllocator,
    key: VipKey,
    vip_id: u32,
    backends: &[BackendSpec],
    size: u32,
    seed: u32,
) -> Result<VipMeta> {
    let table = maglev_ids(backends, size, seed).with_context(|| format!("VIP {key:?}"))?;
    for b in backends {
        let backend = Backend {
            addr: addr_from_ip(b.addr),
            flags: BACKEND_F_VALID,
            vip_id,
        };
        dp.set_backend(b.id, backend)?;
    }
    let len = table.len() as u32;
    let offset = alloc
        .allocate(len)
        .context("MAGLEV_SLOTS is full: raise maglev_slots")?;
    dp.write_slots(offset, &table)?;
    let meta = VipMeta {
        vip_id,
        flags: 0,
        table_offset: offset,
        table_size: len,
    };
    if key.port == 0 {
        dp.set_any_port_vips(true)?;
    }
    dp.set_vip(key, meta)?;
    Ok(meta)
}

/// The VIP whose table IPv4 fragments of (address, protocol) use: the
/// port-0 VIP if there is one, else the lowest port's (fragments after the
/// first carry no ports, so one VIP per address and protocol must own them).
pub fn fragment_owners(
    keys: &[VipKey],
) -> std::collections::BTreeMap<(lb_common::maps::Addr, u8), VipKey> {
    let mut owners = std::collections::BTreeMap::new();
    for k in keys {
        let port = u16::from_be(k.port);
        owners
            .entry((k.addr, k.proto))
            .and_modify(|owner: &mut VipKey| {
                if port < u16::from_be(owner.port) {
                    *owner = *k;
                }
            })
            .or_insert(*k);
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(port: u16, proto: u8) -> VipKey {
        VipKey::new("10.0.0.1".parse().unwrap(), port, proto)
    }

    #[test]
    fn fragments_go_to_port_zero_else_lowest_port() {
        let owners = fragment_owners(&[k(443, 6), k(80, 6), k(0, 17), k(53, 17)]);
        assert_eq!(owners.len(), 2);
        assert_eq!(
            owners.values().copied().collect::<Vec<_>>(),
            [k(80, 6), k(0, 17)]
        );
    }

    #[test]
    fn maglev_ids_map_slots_to_backend_ids() {
        let b = [
            BackendSpec {
                id: 7,
                addr: "10.1.0.1".parse().unwrap(),
                weight: 1,
            },
            BackendSpec {
                id: 9,
                addr: "10.1.0.2".parse().unwrap(),
                weight: 1,
            },
        ];
        let t = maglev_ids(&b, 251, 0).unwrap();
        assert_eq!(t.len(), 251);
        assert!(t.iter().all(|&id| id == 7 || id == 9));
        assert!(t.contains(&7) && t.contains(&9));
    }
}
