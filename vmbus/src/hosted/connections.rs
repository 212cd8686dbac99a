//! The clients connected to a hosted-mode socket, for the management API:
//! who they are (SO_PEERCRED), since when, and their channels. Each
//! client's control thread updates its own entry after every channel
//! message it handles (control plane only; the rings never touch this).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::socket::PeerCred;
use crate::server::ChannelSummary;
use crate::worker::lock;

/// One connected client.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Unique in this process.
    pub id: u64,
    pub peer: PeerCred,
    pub since: SystemTime,
    /// The negotiated VMBus version, once it has connected.
    pub version: Option<u32>,
    pub channels: Vec<ChannelSummary>,
}

/// The clients of one socket.
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    table: Mutex<BTreeMap<u64, Connection>>,
}

impl Connections {
    /// Records a new client; returns its id.
    pub fn add(&self, peer: PeerCred) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let c = Connection {
            id,
            peer,
            since: SystemTime::now(),
            version: None,
            channels: Vec::new(),
        };
        lock(&self.table).insert(id, c);
        id
    }

    /// Records what client `id` has now.
    pub fn update(&self, id: u64, version: Option<u32>, channels: Vec<ChannelSummary>) {
        if let Some(c) = lock(&self.table).get_mut(&id) {
            c.version = version;
            c.channels = channels;
        }
    }

    pub fn remove(&self, id: u64) {
        lock(&self.table).remove(&id);
    }

    /// The clients now, oldest first.
    pub fn list(&self) -> Vec<Connection> {
        lock(&self.table).values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_come_update_and_go() {
        let t = Connections::default();
        let peer = PeerCred {
            pid: 7,
            uid: 1,
            gid: 2,
        };
        let (a, b) = (t.add(peer), t.add(peer));
        assert_ne!(a, b);
        t.update(b, Some(0x5_0003), Vec::new());
        t.remove(a);
        let l = t.list();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].id, l[0].version), (b, Some(0x5_0003)));
    }
}
