//! Allocation of regions of `MAGLEV_SLOTS` to VIP tables. A VIP's new table
//! goes into a fresh region and the VIP is switched to it in one map update,
//! so packets see the old table or the new one, never a mix; the old region
//! is freed afterwards.

use std::collections::BTreeMap;

/// First-fit allocator over `[0, capacity)` with coalescing of free ranges.
#[derive(Clone, Debug)]
pub struct SlotAllocator {
    /// Free ranges: start -> length.
    free: BTreeMap<u32, u32>,
    capacity: u32,
}

impl SlotAllocator {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        SlotAllocator { free, capacity }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn free_slots(&self) -> u32 {
        self.free.values().sum()
    }

    /// A region of `len` slots, or `None` when no free range is big enough.
    pub fn allocate(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let (&start, &free_len) = self.free.iter().find(|&(_, &l)| l >= len)?;
        self.free.remove(&start);
        if free_len > len {
            self.free.insert(start + len, free_len - len);
        }
        Some(start)
    }

    /// Returns a region obtained from `allocate`.
    pub fn release(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        let (mut start, mut len) = (start, len);
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back()
            && prev + prev_len == start
        {
            self.free.remove(&prev);
            start = prev;
            len += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        self.free.insert(start, len);
    }

    /// Marks `[start, start+len)` as used (adopting tables already in a
    /// pinned map). Returns false if any of it is not free.
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        let Some((&fs, &fl)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if fs + fl < start + len {
            return false;
        }
        self.free.remove(&fs);
        if start > fs {
            self.free.insert(fs, start - fs);
        }
        if fs + fl > start + len {
            self.free.insert(start + len, fs + fl - start - len);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_first_fit_and_coalesces() {
        let mut a = SlotAllocator::new(100);
        let x = a.allocate(30).unwrap();
        let y = a.allocate(30).unwrap();
        let z = a.allocate(30).unwrap();
        assert_eq!((x, y, z), (0, 30, 60));
        assert_eq!(a.allocate(20), None);
        a.release(y, 30);
        assert_eq!(a.allocate(31), None);
        a.release(x, 30);
        assert_eq!(a.allocate(60), Some(0));
        a.release(0, 60);
        a.release(z, 30);
        assert_eq!(a.free_slots(), 100);
        assert_eq!(a.allocate(100), Some(0));
    }

    #[test]
    fn reserve_adopts_existing_regions() {
        let mut a = SlotAllocator::new(100);
        assert!(a.reserve(10, 20));
        assert!(!a.reserve(15, 5));
        assert_eq!(a.allocate(10), Some(0));
        assert_eq!(a.allocate(10), Some(30));
        assert_eq!(a.free_slots(), 60);
    }
}
