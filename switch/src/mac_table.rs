//! The MAC learning table: bounded, aging, and safe to read and update from
//! every worker thread without locks.
//!
//! Design: a fixed array of slots (capacity rounded up to a power of two),
//! open addressing with a short probe window. Each slot is a tiny seqlock: a
//! sequence counter plus two 64-bit atomics, `key` = valid bit | VLAN id |
//! MAC and `val` = port reference | last-seen second. Readers never write:
//! they read the sequence, the two words, and the sequence again, and treat a
//! slot being written as a miss (the frame floods once; no reader ever
//! blocks). Writers take the slot with a compare-and-swap on the sequence and
//! give up rather than wait when another writer holds it (the next frame from
//! that MAC learns it). A station already learned on the same port is only
//! rewritten when its second changes, so steady traffic reads the table and
//! leaves its cache lines shared between workers.
//!
//! The table is bounded: when all slots of a probe window hold live entries
//! the new station is not learned (its frames keep flooding) and the caller
//! counts it. Entries older than the aging time are ignored by lookups and
//! reused by learning.

use crate::wire::MacAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// Slots probed from a key's home slot.
const PROBE: usize = 8;
const VALID: u64 = 1 << 63;

#[derive(Debug, Default)]
struct Slot {
    seq: AtomicU32,
    key: AtomicU64,
    val: AtomicU64,
}

impl Slot {
    /// A consistent (key, val) snapshot, or None while a writer holds the slot.
    fn read(&self) -> Option<(u64, u64)> {
        for _ in 0..2 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                continue;
            }
            let key = self.key.load(Ordering::Relaxed);
            let val = self.val.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return Some((key, val));
            }
        }
        None
    }

    /// Replaces the slot's contents if it still holds `expect_key`; false if
    /// another writer holds the slot or changed it first.
    fn write(&self, expect_key: u64, key: u64, val: u64) -> bool {
        let s = self.seq.load(Ordering::Relaxed);
        if s & 1 == 1
            || self
                .seq
                .compare_exchange(s, s.wrapping_add(1), Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        fence(Ordering::Release);
        let ok = self.key.load(Ordering::Relaxed) == expect_key;
        if ok {
            self.key.store(key, Ordering::Relaxed);
            self.val.store(val, Ordering::Relaxed);
        }
        self.seq.store(s.wrapping_add(2), Ordering::Release);
        ok
    }
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Already known on this port.
    Known,
    /// A new entry, or a stale one reused.
    New,
    /// The station moved from another port.
    Moved,
    /// Not learned: the probe window is full of live entries, or another
    /// writer held the slot.
    Full,
}

/// The learning table.
#[derive(Debug)]
pub struct MacTable {
    slots: Box<[Slot]>,
    mask: usize,
    age_secs: u32,
}

fn key_of(vid: u16, mac: MacAddr) -> u64 {
    VALID | (u64::from(vid & 0x0fff) << 48) | mac.to_u64()
}

fn val_of(port: u32, now: u32) -> u64 {
    (u64::from(port) << 32) | u64::from(now)
}

fn split_val(val: u64) -> (u32, u32) {
    ((val >> 32) as u32, val as u32)
}

impl MacTable {
    /// A table of at least `capacity` entries (rounded up to a power of two,
    /// at least `PROBE`) whose entries expire after `age_secs`.
    pub fn new(capacity: usize, age_secs: u32) -> Self {
        let cap = capacity.max(PROBE).next_power_of_two();
        MacTable {
            slots: (0..cap).map(|_| Slot::default()).collect(),
            mask: cap - 1,
            age_secs,
        }
    }

    fn window(&self, key: u64) -> impl Iterator<Item = &Slot> {
        let home = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize;
        (0..PROBE).map(move |i| &self.slots[(home + i) & self.mask])
    }

    fn live(&self, val: u64, now: u32) -> bool {
        now.wrapping_sub(split_val(val).1) <= self.age_secs
    }

    /// The port reference `mac` was learned on in VLAN `vid`, if live.
    pub fn lookup(&self, vid: u16, mac: MacAddr, now: u32) -> Option<u32> {
        let key = key_of(vid, mac);
        self.window(key).find_map(|slot| match slot.read() {
            Some((k, v)) if k == key && self.live(v, now) => Some(split_val(v).0),
            _ => None,
        })
    }

    /// Records that `mac` in VLAN `vid` was seen on port reference `port` at
    /// second `now`.
    pub fn learn(&self, vid: u16, mac: MacAddr, port: u32, now: u32) -> Learned {
        let key = key_of(vid, mac);
        let val = val_of(port, now);
        let mut free: Option<(&Slot, u64, bool)> = None;
        for slot in self.window(key) {
            let Some((k, v)) = slot.read() else { continue };
            if k == key {
                let (old_port, seen) = split_val(v);
                if old_port == port && seen == now {
                    return Learned::Known;
                }
                if !slot.write(key, key, val) {
                    return Learned::Full;
                }
                return match (self.live(v, now), old_port == port) {
                    (false, _) => Learned::New,
                    (true, true) => Learned::Known,
                    (true, false) => Learned::Moved,
                };
            }
            if free.is_none() && (k == 0 || !self.live(v, now)) {
                free = Some((slot, k, k == 0));
            }
        }
        match free {
            Some((slot, old, _)) if slot.write(old, key, val) => Learned::New,
            _ => Learned::Full,
        }
    }

    /// Live entries (a scan; for counters and tests).
    pub fn len(&self, now: u32) -> usize {
        self.slots
            .iter()
            .filter_map(Slot::read)
            .filter(|&(k, v)| k != 0 && self.live(v, now))
            .count()
    }

    /// Forgets every entry pointing at port reference `port` (the port went
    /// away).
    pub fn forget_port(&self, port: u32) {
        for slot in self.slots.iter() {
            if let Some((k, v)) = slot.read()
                && k != 0
                && split_val(v).0 == port
            {
                slot.write(k, 0, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([2, 0, b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn learns_moves_and_ages() {
        let t = MacTable::new(64, 10);
        assert_eq!(t.lookup(1, mac(1), 0), None);
        assert_eq!(t.learn(1, mac(1), 3, 0), Learned::New);
        assert_eq!(t.learn(1, mac(1), 3, 0), Learned::Known);
        assert_eq!(t.lookup(1, mac(1), 5), Some(3));
        assert_eq!(t.lookup(2, mac(1), 5), None, "VLANs are separate");
        assert_eq!(t.learn(1, mac(1), 4, 6), Learned::Moved);
        assert_eq!(t.lookup(1, mac(1), 6), Some(4));
        assert_eq!(t.lookup(1, mac(1), 16), Some(4));
        assert_eq!(t.lookup(1, mac(1), 17), None, "aged out");
        assert_eq!(t.len(17), 0);
        assert_eq!(
            t.learn(1, mac(1), 4, 17),
            Learned::New,
            "stale entry reused"
        );
        t.forget_port(4);
        assert_eq!(t.lookup(1, mac(1), 17), None);
    }

    #[test]
    fn bounded_table_refuses_when_full() {
        let t = MacTable::new(16, 300);
        let mut full = 0;
        for n in 0..100 {
            if t.learn(1, mac(n), 1, 0) == Learned::Full {
                full += 1;
            }
        }
        assert_eq!(t.len(0), 16, "every slot used, never more");
        assert_eq!(full, 84);
        // Once entries age out, new stations are learned again.
        assert_eq!(t.learn(1, mac(1000), 2, 400), Learned::New);
        assert_eq!(t.lookup(1, mac(1000), 400), Some(2));
    }

    #[test]
    fn concurrent_learners_and_readers_see_consistent_entries() {
        let t = Arc::new(MacTable::new(1024, 300));
        let threads: Vec<_> = (0..4u32)
            .map(|w| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for round in 0..2000u32 {
                        let n = round % 200;
                        // The port number encodes the MAC, so a torn read shows.
                        t.learn(1, mac(n), n * 4 + w % 4, round / 100);
                        if let Some(p) = t.lookup(1, mac((n + 7) % 200), round / 100) {
                            assert_eq!(p / 4, (n + 7) % 200, "entry belongs to its key");
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert!(t.len(20) <= 1024);
    }
}
