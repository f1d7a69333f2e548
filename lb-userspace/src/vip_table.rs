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
    dp.set_vip(key, meta)?;
    Ok(meta)
}
