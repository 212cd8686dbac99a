//! A SCSI controller: its LUNs and the VMBus device that serves them.
//!
//! The LUN table is read by every channel worker on every command, and
//! changed by the control plane (hot add, hot remove). Workers cache an
//! `Arc` of the table and compare a generation counter per command (one
//! atomic load); only after a change do they take the lock to refresh.
//! Primary-channel workers are kicked on a change and tell their guest to
//! rescan (an unsolicited ENUMERATE_BUS or REMOVE_DEVICE).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vhd::BlockDevice;
use vmbus::channel::ChannelWorker;
use vmbus::event::EventFd;
use vmbus::guid::{Guid, SCSI_INTERFACE};
use vmbus::server::{Device, DeviceOffer, OpenError, OpenedChannel};

use crate::scsi::disk::DiskTarget;
use crate::scsi::dvd::DvdDrive;
use crate::scsi::{MediaInfo, Sense};

/// Largest transfer advertised to guests (QUERY_PROPERTIES, VPD B0).
pub const DEFAULT_MAX_TRANSFER: u32 = 256 * 1024;

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
}

impl Lun {
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
    luns: BTreeMap<u8, Arc<Lun>>,
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

/// Settings of a controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub name: String,
    pub instance: Guid,
    /// Sub-channels a guest may ask for (0: single channel).
    pub max_subchannels: u16,
    pub max_transfer: u32,
    /// Request slots (queue depth) per channel.
    pub queue_depth: u32,
    /// How long an idle worker keeps polling before it sleeps (lower
    /// latency at QD1 for some CPU).
    pub spin: std::time::Duration,
    /// CPUs the channel workers are bound to: the worker of sub-channel N
    /// (0: the primary) on `cpus[N % len]`; empty: the scheduler places them.
    pub cpus: Vec<usize>,
}

impl ControllerConfig {
    pub fn new(name: &str, instance: Guid) -> Self {
        ControllerConfig {
            name: name.to_string(),
            instance,
            max_subchannels: 4,
            max_transfer: DEFAULT_MAX_TRANSFER,
            queue_depth: 256,
            spin: std::time::Duration::from_micros(50),
            cpus: Vec::new(),
        }
    }
}

/// Why a LUN change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LunError {
    #[error("LUN {0} is already in use")]
    Busy(u8),
    #[error("no LUN {0}")]
    Missing(u8),
    #[error("LUN {0} is not a DVD drive")]
    NotDvd(u8),
    #[error("the guest has locked the tray of LUN {0}")]
    Locked(u8),
}

#[derive(Debug)]
struct Shared {
    table: Mutex<(Arc<LunTable>, Option<BusChange>)>,
    generation: AtomicU64,
    kicks: Mutex<Vec<Weak<EventFd>>>,
}

/// A storvsc-compatible SCSI controller. Register it with a
/// [`vmbus::server::Registry`]; every channel a guest opens gets a worker.
#[derive(Debug, Clone)]
pub struct Controller {
    pub config: ControllerConfig,
    shared: Arc<Shared>,
}

impl Controller {
    pub fn new(config: ControllerConfig) -> Self {
        Controller {
            config,
            shared: Arc::new(Shared {
                table: Mutex::new((Arc::new(LunTable::default()), None)),
                generation: AtomicU64::new(1),
                kicks: Mutex::new(Vec::new()),
            }),
        }
    }

    fn change(
        &self,
        f: impl FnOnce(&mut LunTable) -> Result<BusChange, LunError>,
    ) -> Result<(), LunError> {
        let mut guard = self.shared.table.lock().expect("lun table");
        let mut table = (*guard.0).clone();
        let change = f(&mut table)?;
        *guard = (Arc::new(table), Some(change));
        self.shared.generation.fetch_add(1, Ordering::Release);
        drop(guard);
        self.kick_workers();
        Ok(())
    }

    fn kick_workers(&self) {
        let mut kicks = self.shared.kicks.lock().expect("kicks");
        kicks.retain(|k| match k.upgrade() {
            Some(k) => {
                k.signal();
                true
            }
            None => false,
        });
    }

    /// Adds a LUN (hot add when guests are connected).
    pub fn add_lun(&self, number: u8, lun: Lun) -> Result<(), LunError> {
        self.add_shared_lun(number, Arc::new(lun))
    }

    /// Adds a LUN that other controllers may hold too (one controller per
    /// tenant can serve the same read-only media).
    pub fn add_shared_lun(&self, number: u8, lun: Arc<Lun>) -> Result<(), LunError> {
        self.change(|t| {
            if t.luns.contains_key(&number) {
                return Err(LunError::Busy(number));
            }
            t.luns.insert(number, lun);
            Ok(BusChange::Added)
        })
    }

    /// Removes a LUN (hot remove); in-flight I/O completes normally.
    pub fn remove_lun(&self, number: u8) -> Result<(), LunError> {
        self.change(|t| match t.luns.remove(&number) {
            Some(_) => Ok(BusChange::Removed),
            None => Err(LunError::Missing(number)),
        })
    }

    fn dvd(&self, number: u8) -> Result<Arc<Lun>, LunError> {
        let lun = self
            .table()
            .get(number)
            .cloned()
            .ok_or(LunError::Missing(number))?;
        match *lun {
            Lun::Dvd { .. } => Ok(lun),
            Lun::Disk { .. } => Err(LunError::NotDvd(number)),
        }
    }

    /// Inserts media into a DVD drive.
    pub fn insert_media(&self, number: u8, media: Disk) -> Result<(), LunError> {
        self.dvd(number)?.insert_media(number, media)
    }

    /// Ejects a DVD drive's media (`force` overrides the guest's lock).
    pub fn eject_media(&self, number: u8, force: bool) -> Result<(), LunError> {
        self.dvd(number)?.eject_media(number, force)
    }

    /// The current LUN table.
    pub fn table(&self) -> Arc<LunTable> {
        self.shared.table.lock().expect("lun table").0.clone()
    }

    /// (generation, table, last change) as a worker caches it.
    pub(crate) fn snapshot(&self) -> (u64, Arc<LunTable>, Option<BusChange>) {
        let guard = self.shared.table.lock().expect("lun table");
        (
            self.shared.generation.load(Ordering::Acquire),
            guard.0.clone(),
            guard.1,
        )
    }

    pub(crate) fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    pub(crate) fn register_kick(&self, kick: &Arc<EventFd>) {
        self.shared
            .kicks
            .lock()
            .expect("kicks")
            .push(Arc::downgrade(kick));
    }
}

impl Device for Controller {
    fn offer(&self) -> DeviceOffer {
        DeviceOffer::new(&self.config.name, SCSI_INTERFACE, self.config.instance)
    }

    fn open(&self, channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        crate::worker::start(self.clone(), channel).map_err(|e| OpenError(e.to_string()))
    }
}

/// Maps a failed block request to sense data.
pub fn block_error_sense(err: &vhd::BlockError, write: bool) -> Sense {
    use vhd::BlockError as E;
    match err {
        E::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        E::ReadOnly => Sense::WRITE_PROTECTED,
        E::LengthMismatch { .. } | E::TooLarge(_) => Sense::INVALID_FIELD_IN_CDB,
        E::DiscardUnsupported => Sense::INVALID_COMMAND,
        E::QueueFull | E::BadTag(_) => Sense::INTERNAL_TARGET_FAILURE,
        _ if write => Sense::WRITE_ERROR,
        _ => Sense::UNRECOVERED_READ_ERROR,
    }
}
