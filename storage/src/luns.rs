//! A controller's LUNs, and how its channel workers see them.
//!
//! The table is read by every channel worker on every command and changed
//! by the control plane (hot add, hot remove). A change builds a new
//! [`LunTable`], swaps it in under a lock and bumps a generation counter;
//! workers keep a [`LunCache`] and compare the generation per command (one
//! atomic load), taking the lock only after a change. Primary-channel
//! workers are kicked (an eventfd) on a change and tell their guest to
//! rescan (an unsolicited ENUMERATE_BUS or REMOVE_DEVICE).
//!
//! Only once the guest has sent its first command on any channel: before
//! that it has not scanned yet, and its first scan sees the current table.
//! Linux needs this: `storvsc_probe` allocates the work queue its rescan
//! handler queues on (`handle_error_wq`) only after the channel is
//! initialised, so a rescan notice in between dereferences a NULL queue;
//! its first command comes later (`scsi_scan_host`).

use crate::controller::LunError;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vhd::BlockDevice;
use vmbus::event::EventFd;
use vmbus::worker::lock;

use crate::scsi::MediaInfo;
use crate::scsi::disk::DiskTarget;
use crate::scsi::dvd::DvdDrive;

/// A shared block device.
pub type Disk = Arc<dyn BlockDevice>;

/// What sits at a LUN.
#[derive(Debug)]
pub enum Lun {
    Disk { target: DiskTarget, device: Disk },
    Dvd { drive: DvdDrive<Disk> },
}

impl Lun {
    /// A disk LUN over `device`.
    pub fn disk(device: Disk, max_transfer: u32) -> Lun {
        let media = media_info(&device);
        Lun::Disk {
            target: DiskTarget::new(media, max_transfer),
            device,
        }
    }

    /// A DVD drive, with or without media.
    pub fn dvd(media: Option<Disk>) -> Lun {
        Lun::Dvd {
            drive: DvdDrive::new(media.map(|d| {
                let info = media_info(&d);
                (d, info)
            })),
        }
    }

    /// Inserts media into this DVD drive (`number` names it in errors).
    pub fn insert_media(&self, number: u8, media: Disk) -> Result<(), LunError> {
        let Lun::Dvd { drive } = self else {
            return Err(LunError::NotDvd(number));
        };
        let info = media_info(&media);
        drive.insert(media, info);
        Ok(())
    }

    /// Ejects this DVD drive's media (`force` overrides the guest's lock).
    pub fn eject_media(&self, number: u8, force: bool) -> Result<(), LunError> {
        let Lun::Dvd { drive } = self else {
            return Err(LunError::NotDvd(number));
        };
        drive.eject(force).map_err(|_| LunError::Locked(number))
    }
}

/// The SCSI view of a block device.
pub fn media_info(device: &Disk) -> MediaInfo {
    let info = device.info();
    MediaInfo {
        block_size: info.block_size,
        physical_block_size: device.physical_block_size(),
        blocks: info.blocks,
        read_only: info.read_only,
        supports_discard: info.supports_discard,
        thin: matches!(
            info.kind,
            vhd::DeviceKind::VhdDynamic
                | vhd::DeviceKind::VhdDifferencing
                | vhd::DeviceKind::VhdxDynamic
                | vhd::DeviceKind::VhdxDifferencing
        ),
        unique_id: info.unique_id,
    }
}

/// The LUNs of a controller at one moment.
#[derive(Debug, Default, Clone)]
pub struct LunTable {
    pub(crate) luns: BTreeMap<u8, Arc<Lun>>,
}

impl LunTable {
    pub fn get(&self, lun: u8) -> Option<&Arc<Lun>> {
        self.luns.get(&lun)
    }

    pub fn numbers(&self) -> Vec<u8> {
        self.luns.keys().copied().collect()
    }
}

/// A change of the LUN table, as primary workers report it to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusChange {
    Added,
    Removed,
}

/// The current table of a controller, shared by it and its workers.
#[derive(Debug)]
pub(crate) struct SharedLuns {
    /// The table and the change that made it.
    table: Mutex<(Arc<LunTable>, Option<BusChange>)>,
    generation: AtomicU64,
    /// The kicks of running workers (dead ones are pruned on each change).
    kicks: Mutex<Vec<Weak<EventFd>>>,
    /// The guest connected to the primary channel has sent a command.
    guest_scans: AtomicBool,
    /// The workers' I/O counters, for metrics.
    pub(crate) stats: crate::stats::ControllerStats,
}

impl SharedLuns {
    pub fn new() -> Self {
        SharedLuns {
            table: Mutex::new((Arc::new(LunTable::default()), None)),
            generation: AtomicU64::new(1),
            kicks: Mutex::new(Vec::new()),
            guest_scans: AtomicBool::new(false),
            stats: Default::default(),
        }
    }

    /// Applies `f` to a copy of the table and publishes it; kicks the
    /// workers.
    pub fn change<E>(
        &self,
        f: impl FnOnce(&mut LunTable) -> Result<BusChange, E>,
    ) -> Result<(), E> {
        let mut guard = lock(&self.table);
        let mut table = (*guard.0).clone();
        let change = f(&mut table)?;
        *guard = (Arc::new(table), Some(change));
        self.generation.fetch_add(1, Ordering::Release);
        drop(guard);
        lock(&self.kicks).retain(|k| k.upgrade().inspect(|k| k.signal()).is_some());
        Ok(())
    }

    pub fn table(&self) -> Arc<LunTable> {
        lock(&self.table).0.clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Registers a worker's kick, signalled on every change.
    pub fn register_kick(&self, kick: &Arc<EventFd>) {
        lock(&self.kicks).push(Arc::downgrade(kick));
    }

    fn snapshot(&self) -> (u64, Arc<LunTable>, Option<BusChange>) {
        let guard = lock(&self.table);
        (self.generation(), guard.0.clone(), guard.1)
    }
}

/// A worker's copy of the table: the table itself (for REPORT LUNS) and one
/// slot per LUN number, which a command borrows its LUN from (no shared
/// reference count touched per command).
#[derive(Debug)]
pub(crate) struct LunCache {
    /// This worker has seen a command, so its guest scans.
    scanning: bool,
    generation: u64,
    table: Arc<LunTable>,
    slots: Vec<Option<Arc<Lun>>>,
}

impl LunCache {
    /// The cache of a new channel's worker; a primary channel is a new
    /// guest, which has not scanned yet.
    pub fn new(source: &SharedLuns, primary: bool) -> Self {
        if primary {
            source.guest_scans.store(false, Ordering::SeqCst);
        }
        let (generation, table, _) = source.snapshot();
        LunCache {
            scanning: false,
            generation,
            slots: slots(&table),
            table,
        }
    }

    /// Picks up a change (one atomic load when there is none), before a
    /// `command` or on a kick; returns the change if the guest is to be
    /// told of it: it has already sent a command (this one does not
    /// count: it is part of the guest's scan).
    pub fn refresh(&mut self, source: &SharedLuns, command: bool) -> Option<BusChange> {
        // The flag is set before the table is read, so a change that a
        // primary worker does not report (the flag was still clear) is in
        // the table this command sees.
        let scanning = self.scanning
            || if command {
                source.guest_scans.swap(true, Ordering::SeqCst)
            } else {
                source.guest_scans.load(Ordering::SeqCst)
            };
        self.scanning |= command;
        if source.generation() == self.generation {
            return None;
        }
        let (generation, table, change) = source.snapshot();
        self.generation = generation;
        self.slots = slots(&table);
        self.table = table;
        scanning.then(|| change.unwrap_or(BusChange::Added))
    }

    pub fn numbers(&self) -> Vec<u8> {
        self.table.numbers()
    }

    /// Borrows LUN `n` for one command; give it back with [`LunCache::put`].
    pub fn take(&mut self, n: u8) -> Option<Arc<Lun>> {
        self.slots[usize::from(n)].take()
    }

    pub fn put(&mut self, n: u8, lun: Arc<Lun>) {
        self.slots[usize::from(n)] = Some(lun);
    }
}

/// One slot per possible LUN, filled from a table.
fn slots(table: &LunTable) -> Vec<Option<Arc<Lun>>> {
    (0..=255u8).map(|n| table.get(n).cloned()).collect()
}
