//! Turning a VIP's backend list into map contents and writing them in the
//! order that keeps every packet on a valid path: backends first, then the
//! table into a fresh region, then the one VIPS update that switches to it.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    sync::{Arc, LazyLock},
};

use anyhow::{Context, Result};
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{
        Addr, BACKEND_F_VALID, Backend, VIP_KIND_ADDRESS, VIP_KIND_FRAGMENTS, VIP_KIND_PORT,
        VipKey, VipMeta,
    },
};

use crate::{dataplane::Dataplane, slot_table::PoolPositions, slots::SlotAllocator};

/// A backend of one VIP with the id its map entries use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub id: u32,
    pub addr: IpAddr,
    pub weight: u32,
}

/// An empty slot in a table of positions.
pub const NO_BACKEND: u32 = u32::MAX;

/// The Maglev table of `backends` (address, weight) as positions in that
/// list, `NO_BACKEND` for none. Identities are the backends' addresses, so
/// every instance agrees, and VIPs with the same pool share one build.
pub fn maglev_positions(
    backends: &[(IpAddr, u32)],
    size: u32,
    seed: u32,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let input: Vec<MaglevBackend> = backends
        .iter()
        .map(|(addr, weight)| MaglevBackend::new(addr.to_string(), *weight))
        .collect();
    let table = maglev::build(&input, size, seed as u64)?;
    // Identity -> position, once (a search per backend was quadratic: 70 s
    // of string formatting for 16 VIPs of 10,000 backends).
    let by_identity: std::collections::HashMap<&str, u32> = input
        .iter()
        .enumerate()
        .map(|(i, mb)| (mb.identity.as_str(), i as u32))
        .collect();
    let positions: Vec<u32> = table
        .backends
        .iter()
        .map(|mb| by_identity[mb.identity.as_str()])
        .collect();
    // In place: a table is 256 KB at M = 65,537, built thousands at once.
    let mut slots = table.slots;
    for slot in &mut slots {
        *slot = positions[*slot as usize];
    }
    Ok(slots)
}

/// The table when some backends have failed (`failed[i]` for position i):
/// every slot of a healthy backend keeps its owner (its flows do not move,
/// tracked or not), and each slot of a failed backend goes to the owner
/// that slot has in the table of the healthy backends alone. Deterministic
/// from (backends, failed set), so instances with the same health view
/// agree slot for slot. `base`, when known, is the table with none failed
/// (one Maglev build saved).
pub fn positions_with_failures(
    backends: &[(IpAddr, u32)],
    failed: &[bool],
    size: u32,
    seed: u32,
    base: Option<&[u32]>,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let base = match base {
        Some(b) => std::borrow::Cow::Borrowed(b),
        None => std::borrow::Cow::Owned(maglev_positions(backends, size, seed)?),
    };
    if !failed.contains(&true) {
        return Ok(base.into_owned());
    }
    let healthy: Vec<(IpAddr, u32)> = backends
        .iter()
        .zip(failed)
        .map(|(&(addr, weight), &down)| (addr, if down { 0 } else { weight }))
        .collect();
    let mut table = maglev_positions(&healthy, size, seed)?;
    if table.is_empty() || base.is_empty() {
        return Ok(table);
    }
    // The healthy backends' table where the base names a failed backend,
    // the base everywhere else.
    for (slot, &b) in table.iter_mut().zip(base.iter()) {
        if b == NO_BACKEND || !failed[b as usize] {
            *slot = b;
        }
    }
    Ok(table)
}

/// A table of positions turned into backend ids (`ids[position]`; 0 for
/// an empty slot).
pub fn positions_to_ids(positions: &[u32], ids: &[u32]) -> Vec<u32> {
    positions
        .iter()
        .map(|&p| ids.get(p as usize).copied().unwrap_or(0))
        .collect()
}

/// A table of ids turned back into positions in `ids`; `None` if a slot
/// names an id not in the list.
pub fn ids_to_positions(table: &[u32], ids: &[u32]) -> Option<Vec<u32>> {
    let position_of = position_lookup(ids);
    table.iter().map(|&id| position_of(id)).collect()
}

/// Each id's position in `ids` (0: `NO_BACKEND`; `None`: not listed).
pub fn position_lookup(ids: &[u32]) -> Box<dyn Fn(u32) -> Option<u32> + Send + Sync> {
    let (Some(&lo), Some(&hi)) = (ids.iter().min(), ids.iter().max()) else {
        return Box::new(|id| (id == 0).then_some(NO_BACKEND));
    };
    // Ids of one VIP are mostly handed out together: a dense map.
    let span = (hi - lo) as usize + 1;
    if span <= 8 * ids.len() + 1024 {
        let mut dense = vec![NO_BACKEND; span];
        for (i, &id) in ids.iter().enumerate() {
            dense[(id - lo) as usize] = i as u32;
        }
        Box::new(move |id| {
            if id == 0 {
                return Some(NO_BACKEND);
            }
            let p = *dense.get(id.checked_sub(lo)? as usize)?;
            (p != NO_BACKEND).then_some(p)
        })
    } else {
        let map: std::collections::HashMap<u32, u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        Box::new(move |id| {
            if id == 0 {
                return Some(NO_BACKEND);
            }
            map.get(&id).copied()
        })
    }
}

fn pairs(backends: &[BackendSpec]) -> (Vec<(IpAddr, u32)>, Vec<u32>) {
    backends.iter().map(|b| ((b.addr, b.weight), b.id)).unzip()
}

/// The VIP's Maglev table with each slot holding a backend id.
pub fn maglev_ids(
    backends: &[BackendSpec],
    size: u32,
    seed: u32,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let (pool, ids) = pairs(backends);
    Ok(positions_to_ids(
        &maglev_positions(&pool, size, seed)?,
        &ids,
    ))
}

/// `positions_with_failures` for backends with ids, `failed` naming ids.
pub fn table_with_failures(
    backends: &[BackendSpec],
    failed: &[u32],
    size: u32,
    seed: u32,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let (pool, ids) = pairs(backends);
    let failed: Vec<bool> = ids.iter().map(|id| failed.contains(id)).collect();
    let table = positions_with_failures(&pool, &failed, size, seed, None)?;
    Ok(positions_to_ids(&table, &ids))
}

/// A digest of a table by backend address (ids differ between instances):
/// two instances with the same digest send every slot to the same backend.
/// 16 hex digits of SHA-256 over the size, the addresses in order and each
/// slot's rank among them; empty slots (id 0 or unknown) count as none.
pub fn table_digest(table: &[u32], backends: impl IntoIterator<Item = (IpAddr, u32)>) -> String {
    let mut by_addr: Vec<(IpAddr, u32)> = backends.into_iter().collect();
    by_addr.sort();
    let (addrs, ids): (Vec<IpAddr>, Vec<u32>) = by_addr.into_iter().unzip();
    // Ranks through a map over this VIP's ids (a vector up to the highest
    // id was megabytes per VIP at 400,000 backend ids).
    let rank = position_lookup(&ids);
    let ranks: Vec<u32> = table
        .iter()
        .map(|&id| rank(id).unwrap_or(NO_BACKEND))
        .collect();
    positions_digest(&addrs, &ranks)
}

/// `table_digest` of a table of positions in `addrs`, sorted by address.
pub fn positions_digest(addrs: &[IpAddr], positions: &[u32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((positions.len() as u64).to_le_bytes());
    h.update((addrs.len() as u64).to_le_bytes());
    for addr in addrs {
        let octets = match addr {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        h.update(octets);
    }
    h.update(bytemuck::cast_slice::<u32, u8>(positions));
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A table's digest, computed when first read: hashing 4,096 tables of
/// 65,537 slots is a gigabyte of SHA-256, which a host failing under them
/// should not wait for before the tables switch (status and metrics read it
/// later, once per table).
#[derive(Clone)]
pub struct TableDigest(Arc<LazyLock<String, Box<dyn FnOnce() -> String + Send>>>);

impl TableDigest {
    /// The digest `compute` gives, computed on first read.
    pub fn later(compute: impl FnOnce() -> String + Send + 'static) -> Self {
        TableDigest(Arc::new(LazyLock::new(Box::new(compute))))
    }

    /// `positions_digest` of a pool's table of positions.
    pub fn of_positions(addrs: Vec<IpAddr>, positions: PoolPositions) -> Self {
        Self::later(move || positions_digest(&addrs, &positions.as_slice()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TableDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for TableDigest {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.as_str() == other.as_str()
    }
}

impl Eq for TableDigest {}

/// Writes a VIP and its backends, switching it to a new table atomically.
/// `vip` gives the id and flags; returns the meta with the new table's
/// region (the caller releases the previous one).
pub fn install_vip(
    dp: &mut Dataplane,
    alloc: &mut SlotAllocator,
    key: VipKey,
    vip: VipMeta,
    backends: &[BackendSpec],
    size: u32,
    seed: u32,
) -> Result<VipMeta> {
    let vip_id = vip.vip_id;
    let table = maglev_ids(backends, size, seed).with_context(|| format!("VIP {key:?}"))?;
    for b in backends {
        dp.set_backend(b.id, Backend::new(b.addr, BACKEND_F_VALID, vip_id))?;
    }
    let len = table.len() as u32;
    let offset = alloc
        .allocate(len)
        .context("MAGLEV_SLOTS is full: raise maglev_slots")?;
    dp.write_slots(offset, &table)?;
    let meta = VipMeta {
        table_offset: offset,
        table_size: len,
        ..vip
    };
    if key.port == 0 {
        dp.set_any_port_vips(true)?;
    }
    dp.set_vip(key, meta)?;
    Ok(meta)
}

/// The VIP whose table fragments of (address, protocol) use: the port-0
/// VIP if there is one, else the lowest port's (fragments after the first
/// carry no ports, so one VIP per address and protocol must own them).
/// Keyed by (address, family, protocol).
pub fn fragment_owners(keys: &[VipKey]) -> BTreeMap<(Addr, u8, u8), VipKey> {
    let mut owners = BTreeMap::new();
    for k in keys.iter().filter(|k| k.kind == VIP_KIND_PORT) {
        let port = u16::from_be(k.port);
        owners
            .entry((k.addr, k.family, k.proto))
            .and_modify(|owner: &mut VipKey| {
                if port < u16::from_be(owner.port) {
                    *owner = *k;
                }
            })
            .or_insert(*k);
    }
    owners
}

/// The keys derived from the VIPs' own keys, each with the VIP whose meta
/// it carries: one fragment key per (address, protocol), and one address
/// key per address (echo requests; owned by the lowest protocol's fragment
/// owner).
pub fn derived_keys(keys: &[VipKey]) -> BTreeMap<VipKey, VipKey> {
    let mut derived = BTreeMap::new();
    for ((addr, family, proto), owner) in fragment_owners(keys) {
        let fragments = VipKey {
            addr,
            port: 0,
            proto,
            kind: VIP_KIND_FRAGMENTS,
            family,
            _pad: [0; 3],
        };
        derived.insert(fragments, owner);
        let address = VipKey {
            proto: 0,
            kind: VIP_KIND_ADDRESS,
            ..fragments
        };
        derived.entry(address).or_insert(owner);
    }
    derived
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_follow_addresses_not_ids() {
        let a: IpAddr = "10.30.1.2".parse().unwrap();
        let b: IpAddr = "10.30.2.2".parse().unwrap();
        let d = table_digest(&[1, 2, 2, 1, 0], [(a, 1), (b, 2)]);
        assert_eq!(d.len(), 16);
        // Another instance gave the same backends other ids.
        assert_eq!(d, table_digest(&[7, 3, 3, 7, 0], [(b, 3), (a, 7)]));
        // One slot to the other backend, or the addresses swapped: differs.
        assert_ne!(d, table_digest(&[1, 2, 1, 1, 0], [(a, 1), (b, 2)]));
        assert_ne!(d, table_digest(&[1, 2, 2, 1, 0], [(b, 1), (a, 2)]));
        assert_ne!(d, table_digest(&[1, 2, 2, 1], [(a, 1), (b, 2)]));
    }

    fn k(port: u16, proto: u8) -> VipKey {
        VipKey::new("10.0.0.1".parse().unwrap(), port, proto)
    }

    #[test]
    fn address_keys_follow_the_lowest_protocols_fragment_owner() {
        let v6 = VipKey::new("fd00::10".parse().unwrap(), 80, 6);
        let d = derived_keys(&[k(443, 6), k(53, 17), v6]);
        let derived = |vip: VipKey, kind: u8, proto: u8| VipKey {
            port: 0,
            proto,
            kind,
            ..vip
        };
        assert_eq!(d.len(), 5);
        assert_eq!(d[&derived(k(443, 6), VIP_KIND_FRAGMENTS, 6)], k(443, 6));
        assert_eq!(d[&derived(k(53, 17), VIP_KIND_FRAGMENTS, 17)], k(53, 17));
        assert_eq!(d[&derived(k(443, 6), VIP_KIND_ADDRESS, 0)], k(443, 6));
        assert_eq!(d[&derived(v6, VIP_KIND_FRAGMENTS, 6)], v6);
        assert_eq!(d[&derived(v6, VIP_KIND_ADDRESS, 0)], v6);
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
    fn ids_and_positions_convert_both_ways_dense_or_sparse() {
        for ids in [vec![40, 41, 43], vec![7, 900_000, 3]] {
            let table = vec![ids[2], 0, ids[0], ids[1], ids[0]];
            let positions = ids_to_positions(&table, &ids).unwrap();
            assert_eq!(positions, [2, NO_BACKEND, 0, 1, 0]);
            assert_eq!(positions_to_ids(&positions, &ids), table);
            assert_eq!(ids_to_positions(&[ids[0], 12], &ids), None);
        }
    }

    #[test]
    fn failed_slots_go_to_the_healthy_tables_owner_and_no_other_moves() {
        let pool: Vec<(IpAddr, u32)> = (1..=9u8)
            .map(|i| (IpAddr::from([10, 1, 0, i]), 1))
            .collect();
        let mut failed = vec![false; 9];
        failed[4] = true;
        let base = maglev_positions(&pool, 251, 3).unwrap();
        let table = positions_with_failures(&pool, &failed, 251, 3, None).unwrap();
        assert_eq!(
            table,
            positions_with_failures(&pool, &failed, 251, 3, Some(&base)).unwrap()
        );
        let mut healthy = pool.clone();
        healthy[4].1 = 0;
        let alternative = maglev_positions(&healthy, 251, 3).unwrap();
        for s in 0..251 {
            let want = if base[s] == 4 {
                alternative[s]
            } else {
                base[s]
            };
            assert_eq!(table[s], want, "slot {s}");
        }
        assert!(!table.contains(&4));
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
