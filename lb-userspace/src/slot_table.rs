//! A VIP's Maglev table of backend ids, held as its pool's table of
//! positions (one copy for every VIP with the same backends) and this
//! VIP's id for each position: a host failing under 4,096 VIPs of one pool
//! then builds one table, not 4,096 copies of a gigabyte in all.

use std::{fmt, net::IpAddr, sync::Arc};

use crate::vip_table::{ids_to_positions, position_lookup, positions_digest, table_digest};

/// Some slots of a table given other positions, by slot (sorted).
#[derive(Debug, PartialEq, Eq)]
pub struct SlotPatch {
    slots: Vec<u32>,
    values: Vec<u32>,
}

impl SlotPatch {
    /// `slots` must be sorted, with a value each.
    pub fn new(slots: Vec<u32>, values: Vec<u32>) -> Self {
        assert!(slots.len() == values.len() && slots.is_sorted());
        SlotPatch { slots, values }
    }

    /// Changed slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// A pool's table of positions: a built table, shared, or a built table
/// with a patch (a failure's table over the healthy one, built ahead: a
/// host failing under 4,096 distinct pools then copies no table).
#[derive(Clone, Debug, Default)]
pub struct PoolPositions {
    base: Arc<Vec<u32>>,
    patch: Option<Arc<SlotPatch>>,
}

impl PoolPositions {
    pub fn whole(table: Arc<Vec<u32>>) -> Self {
        PoolPositions {
            base: table,
            patch: None,
        }
    }

    /// `base` with `patch` over it (slots inside `base`).
    pub fn patched(base: Arc<Vec<u32>>, patch: Arc<SlotPatch>) -> Self {
        assert!(
            patch
                .slots
                .last()
                .is_none_or(|&s| (s as usize) < base.len())
        );
        PoolPositions {
            base,
            patch: Some(patch),
        }
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// The table as one shared vector, when it has no patch.
    pub fn as_whole(&self) -> Option<&Arc<Vec<u32>>> {
        self.patch.is_none().then_some(&self.base)
    }

    /// Whether both are the same table by construction.
    pub fn same_as(&self, other: &PoolPositions) -> bool {
        Arc::ptr_eq(&self.base, &other.base)
            && match (&self.patch, &other.patch) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    pub fn get(&self, slot: usize) -> u32 {
        if let Some(patch) = &self.patch
            && let Ok(k) = patch.slots.binary_search(&(slot as u32))
        {
            return patch.values[k];
        }
        self.base[slot]
    }

    /// The positions of slots `from..`, in order.
    pub fn iter_from(&self, from: usize) -> impl Iterator<Item = u32> + '_ {
        let (slots, values): (&[u32], &[u32]) = match &self.patch {
            Some(p) => (&p.slots, &p.values),
            None => (&[], &[]),
        };
        let mut next = slots.partition_point(|&s| (s as usize) < from);
        self.base[from..].iter().enumerate().map(move |(i, &p)| {
            if slots.get(next) == Some(&((from + i) as u32)) {
                next += 1;
                values[next - 1]
            } else {
                p
            }
        })
    }

    pub fn to_vec(&self) -> Vec<u32> {
        match self.as_whole() {
            Some(whole) => whole.to_vec(),
            None => self.iter_from(0).collect(),
        }
    }

    /// The table as one slice (copied when patched).
    pub fn as_slice(&self) -> std::borrow::Cow<'_, [u32]> {
        match self.as_whole() {
            Some(whole) => std::borrow::Cow::Borrowed(whole),
            None => std::borrow::Cow::Owned(self.to_vec()),
        }
    }
}

#[derive(Clone, Default)]
pub struct SlotTable {
    positions: PoolPositions,
    ids: Arc<Vec<u32>>,
}

impl SlotTable {
    /// `positions` (into `ids`, `NO_BACKEND` for an empty slot), shared.
    pub fn new(positions: Arc<Vec<u32>>, ids: Vec<u32>) -> Self {
        Self::of_pool(PoolPositions::whole(positions), ids)
    }

    /// A pool's table with this VIP's `ids`.
    pub fn of_pool(positions: PoolPositions, ids: Vec<u32>) -> Self {
        SlotTable {
            positions,
            ids: Arc::new(ids),
        }
    }

    /// A table given slot by slot whose ids are expected to be `ids` (a
    /// VIP's backends, read back from the kernel); other ids are listed too.
    pub fn from_ids_in(table: impl Iterator<Item = u32> + Clone, ids: Vec<u32>) -> Self {
        let position_of = position_lookup(&ids);
        match table.clone().map(position_of).collect::<Option<Vec<u32>>>() {
            Some(positions) => SlotTable::new(Arc::new(positions), ids),
            None => SlotTable::from_ids(&table.collect::<Vec<u32>>()),
        }
    }

    /// `table_digest` of this table, whose backends are `addrs` (sorted)
    /// with `ids`.
    pub fn digest_by_address(&self, addrs: &[IpAddr], ids: &[u32]) -> String {
        match self.positions_in(ids) {
            Some(positions) => positions_digest(addrs, &positions),
            None => table_digest(
                &self.to_vec(),
                addrs.iter().copied().zip(ids.iter().copied()),
            ),
        }
    }

    /// A table given slot by slot.
    pub fn from_ids(table: &[u32]) -> Self {
        let mut ids: Vec<u32> = table.iter().copied().filter(|&id| id != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        let positions = ids_to_positions(table, &ids).expect("every id is listed");
        SlotTable::new(Arc::new(positions), ids)
    }

    /// The ids positions index.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The pool's table of positions this is a view of.
    pub fn pool_positions(&self) -> &PoolPositions {
        &self.positions
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The backend id of slot `i` (0: none).
    pub fn get(&self, i: usize) -> u32 {
        self.id_at(self.positions.get(i))
    }

    fn id_at(&self, position: u32) -> u32 {
        self.ids.get(position as usize).copied().unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.positions.iter_from(0).map(|p| self.id_at(p))
    }

    /// Whether both are views of one table of positions (one build).
    pub fn shares_positions(&self, other: &SlotTable) -> bool {
        self.positions.same_as(&other.positions)
    }

    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// This table as positions in `ids` (shared when it was built with
    /// them); `None` when a slot names an id not in the list.
    pub fn positions_in(&self, ids: &[u32]) -> Option<std::borrow::Cow<'_, [u32]>> {
        if self.ids.as_slice() == ids {
            return Some(self.positions.as_slice());
        }
        ids_to_positions(&self.to_vec(), ids).map(std::borrow::Cow::Owned)
    }

    /// Writes slots from `first_slot` on into `cells`, one u32 every
    /// `stride` (2 for an array of u32, whose elements the kernel puts 8
    /// bytes apart), with streaming stores: a table is written once and
    /// read by the kernel later, so reading each line in first and filling
    /// the cache with it would be wasted (a host failing under 4,096 VIPs
    /// writes 1 GiB here).
    pub fn write_cells(&self, cells: &mut [u32], stride: usize, first_slot: usize) {
        let slots = cells.chunks_exact_mut(stride);
        for (cell, p) in slots.zip(self.positions.iter_from(first_slot)) {
            let id = self.id_at(p);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `cell[0]` is a valid, aligned u32 we hold exclusively.
            unsafe {
                core::arch::x86_64::_mm_stream_si32((&mut cell[0] as *mut u32).cast(), id as i32)
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                cell[0] = id;
            }
        }
        // Streaming stores are weakly ordered: all of them are done before
        // the caller points the VIP at this table.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is part of x86_64.
        unsafe {
            core::arch::x86_64::_mm_sfence()
        };
    }
}

impl PartialEq for SlotTable {
    fn eq(&self, other: &Self) -> bool {
        if self.positions.same_as(&other.positions) && self.ids == other.ids {
            return true;
        }
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for SlotTable {}

impl PartialEq<[u32]> for SlotTable {
    fn eq(&self, other: &[u32]) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter().copied())
    }
}

impl PartialEq<Vec<u32>> for SlotTable {
    fn eq(&self, other: &Vec<u32>) -> bool {
        *self == other[..]
    }
}

impl fmt::Debug for SlotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vip_table::NO_BACKEND;

    #[test]
    fn positions_and_ids_read_as_the_id_table() {
        let shared = Arc::new(vec![0, 1, 1, NO_BACKEND, 2]);
        let a = SlotTable::new(shared.clone(), vec![7, 9, 4]);
        let b = SlotTable::new(shared, vec![17, 19, 14]);
        assert_eq!(a.to_vec(), [7, 9, 9, 0, 4]);
        assert_eq!(b.get(1), 19);
        assert_ne!(a, b);
        assert_eq!(a, SlotTable::from_ids(&[7, 9, 9, 0, 4]));
        assert_eq!(a, vec![7, 9, 9, 0, 4]);
        assert_eq!(
            *a.positions_in(&[7, 9, 4]).unwrap(),
            [0, 1, 1, NO_BACKEND, 2]
        );
        assert_eq!(
            *a.positions_in(&[4, 7, 9]).unwrap(),
            [1, 2, 2, NO_BACKEND, 0]
        );
        assert!(a.positions_in(&[4, 7]).is_none());
        // Packed cells from slot 1 on, then one slot every other word.
        let mut cells = [u32::MAX; 3];
        a.write_cells(&mut cells, 1, 1);
        assert_eq!(cells, [9, 9, 0]);
        let mut cells = [u32::MAX; 4];
        a.write_cells(&mut cells, 2, 3);
        assert_eq!(cells, [0, u32::MAX, 4, u32::MAX]);
        assert!(SlotTable::from_ids(&[]).is_empty());
        let slots = [7, 9, 9, 0, 4];
        let read = SlotTable::from_ids_in(slots.iter().copied(), vec![9, 7, 4]);
        assert_eq!(read, a);
        assert!(
            read.positions_in(&[9, 7, 4])
                .is_some_and(|p| *p == [1, 0, 0, NO_BACKEND, 2])
        );
        assert_eq!(SlotTable::from_ids_in(slots.iter().copied(), vec![9]), a);
        let addrs: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .map(|a| a.parse().unwrap())
            .to_vec();
        let digest = table_digest(&slots, addrs.iter().copied().zip([9, 7, 4]));
        assert_eq!(read.digest_by_address(&addrs, &[9, 7, 4]), digest);
        assert_eq!(a.digest_by_address(&addrs, &[9, 7, 4]), digest);
        assert_ne!(a.digest_by_address(&addrs, &[7, 9, 4]), digest);
    }
}
