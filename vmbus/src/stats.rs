//! Counters of one open channel: packets and bytes through its two rings,
//! signals each way, and how often its worker woke for it.
//!
//! Cost on the data path: the rings count packets and bytes in plain
//! fields of their own (no atomics per packet); [`Channel::flush`]
//! publishes those totals here once per poll-loop pass, and signals and
//! wake-ups are counted where they happen (a few per pass at most). Only
//! the thread that owns the channel writes a [`ChannelStats`], so every
//! update is a relaxed load and store, never a locked read-modify-write,
//! and the counters sit on cache lines of their own, away from other
//! channels' counters and from the data the worker touches per packet.
//! Readers (metrics) take [`ChannelStats::snapshot`] from any thread.
//!
//! The channel server creates the counters of each channel it opens and
//! lists them in the device's [`Registry`](crate::server::Registry), which
//! is how the appliance finds them ([`Registry::channel_stats`]).
//!
//! [`Channel::flush`]: crate::channel::Channel::flush
//! [`Registry::channel_stats`]: crate::server::Registry::channel_stats

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Which channel counters belong to, for labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The device's name (its offer's).
    pub device: String,
    /// The peer (connection) that opened the channel.
    pub peer: u64,
    pub relid: u32,
    /// 0 for the primary channel.
    pub subchannel_index: u16,
}

/// The counters proper, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    signals_in: AtomicU64,
    signals_out: AtomicU64,
    wakeups: AtomicU64,
}

/// Counters of one channel, written by its owner thread only.
#[derive(Debug, Default)]
pub struct ChannelStats {
    info: ChannelInfo,
    counters: Counters,
}

/// A reading of [`ChannelStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelSnapshot {
    /// Packets read from the peer-to-host ring.
    pub packets_in: u64,
    /// Ring bytes (descriptors, payloads, padding, trailers) read.
    pub bytes_in: u64,
    /// Packets written to the host-to-peer ring.
    pub packets_out: u64,
    /// Ring bytes written.
    pub bytes_out: u64,
    /// Signals from the peer (doorbell rings) the worker consumed.
    pub signals_in: u64,
    /// Signals (interrupts) sent to the peer.
    pub signals_out: u64,
    /// Times the worker woke from sleep with this channel's doorbell rung.
    pub wakeups: u64,
}

/// Adds `n` to a counter only one thread writes (no locked instruction):
/// the one way the workspace's per-worker counters count.
pub fn add_owned(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl ChannelStats {
    pub fn new(info: ChannelInfo) -> Self {
        ChannelStats {
            info,
            counters: Counters::default(),
        }
    }

    pub fn info(&self) -> &ChannelInfo {
        &self.info
    }

    /// Publishes the rings' running totals: (packets, bytes) read and
    /// written.
    pub(crate) fn publish_rings(&self, incoming: (u64, u64), outgoing: (u64, u64)) {
        let c = &self.counters;
        let r = Ordering::Relaxed;
        c.packets_in.store(incoming.0, r);
        c.bytes_in.store(incoming.1, r);
        c.packets_out.store(outgoing.0, r);
        c.bytes_out.store(outgoing.1, r);
    }

    pub(crate) fn signalled_peer(&self) {
        add_owned(&self.counters.signals_out, 1);
    }

    /// The worker consumed `signals` doorbell rings after a sleep.
    pub(crate) fn woke(&self, signals: u64) {
        if signals > 0 {
            add_owned(&self.counters.signals_in, signals);
            add_owned(&self.counters.wakeups, 1);
        }
    }

    pub fn snapshot(&self) -> ChannelSnapshot {
        let c = &self.counters;
        let r = Ordering::Relaxed;
        ChannelSnapshot {
            packets_in: c.packets_in.load(r),
            bytes_in: c.bytes_in.load(r),
            packets_out: c.packets_out.load(r),
            bytes_out: c.bytes_out.load(r),
            signals_in: c.signals_in.load(r),
            signals_out: c.signals_out.load(r),
            wakeups: c.wakeups.load(r),
        }
    }
}

/// The counters of the open channels of one registry's devices. Closed
/// channels drop out (their counters go with their worker).
#[derive(Debug, Default)]
pub(crate) struct ChannelStatsList {
    open: Vec<Weak<ChannelStats>>,
    /// Channel resets (protocol violations) per device name.
    resets: BTreeMap<String, u64>,
}

impl ChannelStatsList {
    /// Counters for a channel being opened, listed here.
    pub fn track(&mut self, info: ChannelInfo) -> Arc<ChannelStats> {
        self.open.retain(|w| w.strong_count() > 0);
        let stats = Arc::new(ChannelStats::new(info));
        self.open.push(Arc::downgrade(&stats));
        stats
    }

    /// Every open channel's counters.
    pub fn live(&self) -> Vec<Arc<ChannelStats>> {
        self.open.iter().filter_map(Weak::upgrade).collect()
    }

    /// A channel of device `device` was reset.
    pub fn reset(&mut self, device: &str) {
        *self.resets.entry(device.to_string()).or_default() += 1;
    }

    /// Resets per device name.
    pub fn resets(&self) -> BTreeMap<String, u64> {
        self.resets.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_publish_and_list_while_open() {
        let mut list = ChannelStatsList::default();
        let info = ChannelInfo {
            device: "scsi0".into(),
            peer: 3,
            relid: 7,
            subchannel_index: 1,
        };
        let s = list.track(info.clone());
        s.publish_rings((2, 128), (1, 64));
        s.signalled_peer();
        s.woke(0);
        s.woke(3);
        let snap = s.snapshot();
        assert_eq!(
            snap,
            ChannelSnapshot {
                packets_in: 2,
                bytes_in: 128,
                packets_out: 1,
                bytes_out: 64,
                signals_in: 3,
                signals_out: 1,
                wakeups: 1,
            }
        );
        assert_eq!(list.live().len(), 1);
        assert_eq!(list.live()[0].info(), &info);
        drop(s);
        assert!(list.live().is_empty(), "closed channels drop out");
        assert!(std::mem::align_of::<Counters>() >= 128);
        list.reset("scsi0");
        list.reset("scsi0");
        assert_eq!(list.resets()["scsi0"], 2);
    }
}
