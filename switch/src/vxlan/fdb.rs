//! The forwarding database of a VXLAN port: which remote VTEP an inner MAC
//! address lives behind, per VNI.
//!
//! Entries come from the configuration (static, never aged, never
//! overwritten) or are learned from received packets: inner source MAC ->
//! outer source IP, as the Linux kernel's VXLAN device learns (the remote's
//! UDP port is the port's configured destination port, never the sender's
//! source port). Learned entries age out and their number is bounded; a
//! packet whose source MAC is a static entry behind another VTEP is
//! dropped, as Linux does.
//!
//! The table belongs to the worker thread that runs the port: no locks.
//! It never grows past the capacity reserved at creation, so learning
//! allocates nothing.

use crate::wire::MacAddr;
use std::collections::HashMap;

/// Index of a remote in the port's remote table.
pub type RemoteId = u16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    remote: RemoteId,
    /// Seconds (port clock) of the last packet seen; unused when static.
    seen: u32,
    is_static: bool,
}

/// What learning a source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// A new entry, or a refreshed one.
    New,
    Refreshed,
    /// The MAC moved from another remote.
    Moved,
    /// The table is full of live learned entries.
    Full,
    /// The MAC is static behind another remote: drop the packet.
    StaticConflict,
    /// Matches a static entry.
    Static,
}

/// The FDB of one port.
#[derive(Debug)]
pub struct Fdb {
    map: HashMap<(u32, MacAddr), Entry>,
    learned: usize,
    max_learned: usize,
    age_secs: u32,
}

impl Fdb {
    /// A table holding `statics` and at most `max_learned` learned entries
    /// that age after `age_secs` seconds.
    pub fn new(statics: &[(u32, MacAddr, RemoteId)], max_learned: usize, age_secs: u32) -> Self {
        let mut map = HashMap::with_capacity(statics.len() + max_learned);
        for &(vni, mac, remote) in statics {
            map.insert(
                (vni, mac),
                Entry {
                    remote,
                    seen: 0,
                    is_static: true,
                },
            );
        }
        Fdb {
            map,
            learned: 0,
            max_learned,
            age_secs,
        }
    }

    fn live(&self, e: &Entry, now: u32) -> bool {
        e.is_static || now.saturating_sub(e.seen) < self.age_secs
    }

    /// The remote `mac` lives behind in `vni`, if known and not aged.
    pub fn lookup(&self, vni: u32, mac: MacAddr, now: u32) -> Option<RemoteId> {
        let e = self.map.get(&(vni, mac))?;
        self.live(e, now).then_some(e.remote)
    }

    /// Records that `mac` sent from `remote` in `vni` at `now`.
    pub fn learn(&mut self, vni: u32, mac: MacAddr, remote: RemoteId, now: u32) -> Learn {
        let age = self.age_secs;
        if let Some(e) = self.map.get_mut(&(vni, mac)) {
            if e.is_static {
                return if e.remote == remote {
                    Learn::Static
                } else {
                    Learn::StaticConflict
                };
            }
            let alive = now.saturating_sub(e.seen) < age;
            let moved = e.remote != remote;
            e.remote = remote;
            e.seen = now;
            return match (alive, moved) {
                (true, true) => Learn::Moved,
                (true, false) => Learn::Refreshed,
                (false, _) => Learn::New,
            };
        }
        if self.learned >= self.max_learned {
            self.expire(now);
            if self.learned >= self.max_learned {
                return Learn::Full;
            }
        }
        self.map.insert(
            (vni, mac),
            Entry {
                remote,
                seen: now,
                is_static: false,
            },
        );
        self.learned += 1;
        Learn::New
    }

    /// Drops aged learned entries.
    pub fn expire(&mut self, now: u32) {
        let age = self.age_secs;
        let before = self.map.len();
        self.map
            .retain(|_, e| e.is_static || now.saturating_sub(e.seen) < age);
        self.learned -= before - self.map.len();
    }

    /// Live learned entries.
    pub fn learned(&self, now: u32) -> usize {
        self.map
            .values()
            .filter(|e| !e.is_static && self.live(e, now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M1: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const M2: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
    const M3: MacAddr = MacAddr([2, 0, 0, 0, 0, 3]);

    #[test]
    fn learns_moves_and_ages() {
        let mut f = Fdb::new(&[], 8, 300);
        assert_eq!(f.lookup(42, M1, 0), None);
        assert_eq!(f.learn(42, M1, 0, 10), Learn::New);
        assert_eq!(f.lookup(42, M1, 10), Some(0));
        assert_eq!(f.lookup(43, M1, 10), None, "per VNI");
        assert_eq!(f.learn(42, M1, 0, 20), Learn::Refreshed);
        assert_eq!(f.learn(42, M1, 1, 30), Learn::Moved);
        assert_eq!(f.lookup(42, M1, 30), Some(1));
        assert_eq!(f.lookup(42, M1, 329), Some(1));
        assert_eq!(f.lookup(42, M1, 330), None, "aged");
        assert_eq!(f.learned(330), 0);
        assert_eq!(f.learn(42, M1, 0, 400), Learn::New, "relearned after aging");
    }

    #[test]
    fn static_entries_are_never_overwritten_or_aged() {
        let mut f = Fdb::new(&[(42, M1, 3)], 8, 300);
        assert_eq!(f.lookup(42, M1, 1_000_000), Some(3));
        assert_eq!(f.learn(42, M1, 0, 5), Learn::StaticConflict);
        assert_eq!(f.learn(42, M1, 3, 5), Learn::Static);
        assert_eq!(f.lookup(42, M1, 5), Some(3));
        f.expire(1_000_000);
        assert_eq!(f.lookup(42, M1, 1_000_000), Some(3));
        assert_eq!(f.learned(0), 0);
    }

    #[test]
    fn the_learned_count_is_bounded() {
        let mut f = Fdb::new(&[(1, M3, 0)], 2, 100);
        assert_eq!(f.learn(1, M1, 0, 0), Learn::New);
        assert_eq!(f.learn(1, M2, 0, 0), Learn::New);
        assert_eq!(f.learn(2, M1, 0, 50), Learn::Full);
        assert_eq!(f.lookup(2, M1, 50), None);
        // Refreshing a known entry still works when full.
        assert_eq!(f.learn(1, M1, 0, 60), Learn::Refreshed);
        // Once M2 ages, there is room again.
        assert_eq!(f.learn(2, M1, 0, 120), Learn::New);
        assert_eq!(f.lookup(1, M2, 120), None);
        assert_eq!(f.learned(120), 2);
        assert_eq!(f.lookup(1, M3, 120), Some(0));
    }
}
