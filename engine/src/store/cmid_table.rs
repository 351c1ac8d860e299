//! The cmid window's hash table: 64-bit keys to log positions, in one anonymous mapping
//! advised for huge pages.
//!
//! Every append looks a key up and inserts one, and the window evicts one: three random
//! accesses into a table of millions of entries. With 4 KiB pages each is a TLB miss whose page
//! walk misses the caches too; with 2 MiB pages the walk stays cached and only the slot's own
//! cache miss is left (measured: see `docs/benchmarks.md`). The load factor stays at most 1/2,
//! so probes stay short. The table grows (doubling) as keys come and shrinks (halving) when
//! fewer than 1/8 of its slots are used: a partition's window is as large as its share of the
//! shard's budget, which moves to the partitions that write (`logic`, the cmid budget). A
//! rehash touches every key once; a table of N keys costs about 32·N bytes at most, and the
//! largest stall is one rehash of the shard's whole budget (about 10 ms for 500,000 keys).
//!
//! Open addressing with linear probing; key 0 marks an empty slot (a real key 0 is stored as
//! 1: keys only point at a record the caller then checks, so two keys sharing a slot value
//! costs nothing but that check). Removal shifts the following entries back, so there are no
//! tombstones.

use std::io;

use memmap2::{Advice, MmapMut};

use super::error::Position;

const SLOT_BYTES: usize = 16;

/// A map from 64-bit keys to positions.
pub struct CmidTable {
    slots: MmapMut,
    mask: usize,
    len: usize,
}

/// Slots of the smallest table (256 B).
const MIN_SLOTS: usize = 16;

impl std::fmt::Debug for CmidTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmidTable")
            .field("slots", &(self.mask + 1))
            .field("len", &self.len)
            .finish()
    }
}

impl CmidTable {
    /// A table for `entries` keys before it first grows.
    pub fn with_capacity(entries: usize) -> io::Result<CmidTable> {
        let slots = entries
            .saturating_add(1)
            .saturating_mul(2)
            .max(MIN_SLOTS)
            .checked_next_power_of_two()
            .ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(CmidTable {
            slots: map_slots(slots)?,
            mask: slots - 1,
            len: 0,
        })
    }

    /// Slots of the table (twice the keys it holds before it grows).
    #[cfg(test)]
    pub fn slots(&self) -> usize {
        self.mask + 1
    }

    /// Moves every key into a table of `slots` slots (a power of two above twice the keys).
    /// If that memory cannot be had, the table stays as it is: a full one then refuses to
    /// grow past its last free slot (see [`CmidTable::insert`]).
    fn rehash(&mut self, slots: usize) {
        debug_assert!(slots.is_power_of_two() && slots > 2 * self.len);
        let Ok(map) = map_slots(slots) else {
            return;
        };
        let old = std::mem::replace(&mut self.slots, map);
        let old_slots = self.mask + 1;
        self.mask = slots - 1;
        for i in 0..old_slots {
            let (k, pos) = slot_of(&old, i);
            if k != 0 {
                let mut j = k as usize & self.mask;
                while self.slot(j).0 != 0 {
                    j = (j + 1) & self.mask;
                }
                self.set(j, k, pos);
            }
        }
    }

    /// Keys stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The position stored for `key`.
    pub fn get(&self, key: u64) -> Option<Position> {
        let key = stored(key);
        let mut i = key as usize & self.mask;
        loop {
            let (k, pos) = self.slot(i);
            if k == key {
                return Some(pos);
            }
            if k == 0 {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Stores `pos` for `key`, replacing what was there; grows the table first if that would
    /// fill more than half of it. (Should growing fail for want of memory, it fills up until
    /// one slot is left, then stores no new key: a forgotten cmid, never a wrong answer.)
    pub fn insert(&mut self, key: u64, pos: Position) {
        if 2 * (self.len + 1) > self.mask + 1 {
            self.rehash((self.mask + 1) * 2);
        }
        let key = stored(key);
        let mut i = key as usize & self.mask;
        loop {
            let (k, _) = self.slot(i);
            if k == key {
                self.set(i, key, pos);
                return;
            }
            if k == 0 {
                // The last free slot stays free: lookups end at an empty slot.
                if self.len + 1 < self.mask + 1 {
                    self.set(i, key, pos);
                    self.len += 1;
                }
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Removes `key` if it still maps to `pos` (a newer message with the same key may own it).
    pub fn remove_if(&mut self, key: u64, pos: Position) {
        let key = stored(key);
        let mut hole = key as usize & self.mask;
        loop {
            let (k, p) = self.slot(hole);
            if k == 0 {
                return;
            }
            if k == key {
                if p != pos {
                    return;
                }
                break;
            }
            hole = (hole + 1) & self.mask;
        }
        // Shift back every following entry whose probe path passes the hole.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let (k, p) = self.slot(j);
            if k == 0 {
                break;
            }
            let ideal = k as usize & self.mask;
            if hole.wrapping_sub(ideal) & self.mask < j.wrapping_sub(ideal) & self.mask {
                self.set(hole, k, p);
                hole = j;
            }
        }
        self.set(hole, 0, 0);
        self.len -= 1;
        let slots = self.mask + 1;
        if slots > MIN_SLOTS && self.len * 8 < slots {
            self.rehash(slots / 2);
        }
    }

    /// Removes every key, keeping the table's size.
    pub fn clear(&mut self) {
        if self.len > 0 {
            self.slots.fill(0);
            self.len = 0;
        }
    }

    fn slot(&self, i: usize) -> (u64, Position) {
        slot_of(&self.slots, i)
    }

    fn set(&mut self, i: usize, key: u64, pos: Position) {
        let at = i * SLOT_BYTES;
        self.slots[at..at + 8].copy_from_slice(&key.to_ne_bytes());
        self.slots[at + 8..at + SLOT_BYTES].copy_from_slice(&pos.to_ne_bytes());
    }
}

/// Key 0 marks an empty slot.
fn stored(key: u64) -> u64 {
    key.max(1)
}

/// Zeroed memory for `slots` slots, advised for huge pages.
fn map_slots(slots: usize) -> io::Result<MmapMut> {
    let bytes = slots
        .checked_mul(SLOT_BYTES)
        .ok_or(io::ErrorKind::OutOfMemory)?;
    let map = MmapMut::map_anon(bytes)?;
    // Only a hint: without transparent huge pages the table works the same, slower.
    let _ = map.advise(Advice::HugePage);
    Ok(map)
}

/// Slot `i` of `slots`: its key and position.
fn slot_of(slots: &[u8], i: usize) -> (u64, Position) {
    let at = i * SLOT_BYTES;
    let b = &slots[at..at + SLOT_BYTES];
    let mut k = [0u8; 8];
    let mut p = [0u8; 8];
    k.copy_from_slice(&b[..8]);
    p.copy_from_slice(&b[8..]);
    (u64::from_ne_bytes(k), u64::from_ne_bytes(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
    }

    proptest! {
        /// Agrees with a `HashMap` under inserts and removals, with keys crowded into few
        /// slots so that probe chains wrap around the table's end.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec(
            prop_oneof![
                (0u64..40, 1u64..5).prop_map(|(k, p)| Op::Insert(k * 31, p)),
                (0u64..40, 1u64..5).prop_map(|(k, p)| Op::Remove(k * 31, p)),
            ], 1..300)) {
            // Starts at the smallest size: the ops grow and shrink it.
            let mut table = CmidTable::with_capacity(1).unwrap();
            let mut model = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, p) => {
                        table.insert(k, p);
                        model.insert(k.max(1), p);
                    }
                    Op::Remove(k, p) => {
                        table.remove_if(k, p);
                        if model.get(&k.max(1)) == Some(&p) {
                            model.remove(&k.max(1));
                        }
                    }
                }
                prop_assert_eq!(table.len(), model.len());
            }
            for k in 0..40u64 {
                prop_assert_eq!(table.get(k * 31), model.get(&(k * 31).max(1)).copied());
            }
        }
    }

    #[test]
    fn grows_with_its_keys_and_shrinks_when_they_go() {
        let mut table = CmidTable::with_capacity(1).unwrap();
        assert_eq!(table.slots(), MIN_SLOTS);
        for k in 1..=10_000u64 {
            table.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k);
        }
        assert_eq!(table.len(), 10_000);
        assert!(
            table.slots() >= 20_000 && table.slots() <= 32_768,
            "{}",
            table.slots()
        );
        for k in 1..=10_000u64 {
            assert_eq!(table.get(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)), Some(k));
        }
        for k in 1..=9_990u64 {
            table.remove_if(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k);
        }
        assert_eq!(table.len(), 10);
        assert!(table.slots() <= 128, "shrunk: {}", table.slots());
        for k in 9_991..=10_000u64 {
            assert_eq!(table.get(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)), Some(k));
        }
    }

    #[test]
    fn clear_empties_the_table() {
        let mut table = CmidTable::with_capacity(10).unwrap();
        for k in 0..10 {
            table.insert(k, k + 100);
        }
        assert_eq!(table.get(5), Some(105));
        table.clear();
        assert_eq!((table.len(), table.get(5)), (0, None));
    }
}
