//! A SCSI controller: its LUN table (see [`crate::luns`]) and the VMBus
//! device that serves it, one worker per channel a guest opens.
//!
//! The control plane changes LUNs and DVD media here; the workers see the
//! changes through the table's generation counter and tell their guest to
//! rescan.

use std::sync::Arc;

use vmbus::channel::ChannelWorker;
use vmbus::guid::SCSI_INTERFACE;
use vmbus::server::{Device, DeviceOffer, OpenError, OpenedChannel};

use crate::limit::LunLimiter;
use crate::luns::SharedLuns;
pub use crate::luns::{BusChange, Disk, Lun, LunTable, media_info};
pub use crate::settings::{ControllerConfig, DEFAULT_MAX_TRANSFER, MAX_QUEUE_DEPTH};
use crate::worker::WorkerError;

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

/// A storvsc-compatible SCSI controller. Register it with a
/// [`vmbus::server::Registry`]; every channel a guest opens gets a worker.
#[derive(Debug, Clone)]
pub struct Controller {
    pub config: ControllerConfig,
    luns: Arc<SharedLuns>,
    /// The LUNs' rate buckets when the config caps them.
    limiter: Option<Arc<LunLimiter>>,
}

impl Controller {
    /// # Panics
    /// If `config` was not validated: a queue depth outside
    /// 1..=[`MAX_QUEUE_DEPTH`] (the configuration refuses those).
    pub fn new(config: ControllerConfig) -> Self {
        assert!(
            (1..=MAX_QUEUE_DEPTH).contains(&config.queue_depth),
            "unvalidated controller config: queue_depth {}",
            config.queue_depth
        );
        Controller {
            limiter: LunLimiter::new(config.lun_limit).map(Arc::new),
            config,
            luns: Arc::new(SharedLuns::new()),
        }
    }

    /// The I/O counters of the controller's LUNs, for metrics.
    pub fn io_stats(&self) -> &crate::stats::ControllerStats {
        &self.luns.stats
    }

    /// Adds a LUN (hot add when guests are connected).
    pub fn add_lun(&self, number: u8, lun: Lun) -> Result<(), LunError> {
        self.add_shared_lun(number, Arc::new(lun))
    }

    /// Adds a LUN that other controllers may hold too (one controller per
    /// tenant can serve the same read-only media).
    pub fn add_shared_lun(&self, number: u8, lun: Arc<Lun>) -> Result<(), LunError> {
        self.luns.change(|t| {
            if t.luns.contains_key(&number) {
                return Err(LunError::Busy(number));
            }
            t.luns.insert(number, lun);
            Ok(BusChange::Added)
        })
    }

    /// Removes a LUN (hot remove); in-flight I/O completes normally.
    pub fn remove_lun(&self, number: u8) -> Result<(), LunError> {
        self.luns.change(|t| match t.luns.remove(&number) {
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
        self.luns.table()
    }

    /// What each channel worker gets.
    fn shared(&self) -> crate::worker::Shared {
        crate::worker::Shared {
            config: self.config.clone(),
            luns: self.luns.clone(),
            limiter: self.limiter.clone(),
        }
    }

    /// Serves an opened channel on the calling thread until it has nothing
    /// left to do (every readable request answered, no I/O in flight). For
    /// harnesses that run a channel without a server and its threads.
    pub fn serve_until_idle(&self, channel: OpenedChannel) -> Result<(), WorkerError> {
        crate::worker::run_until_idle(self.shared(), channel)
    }
}

impl Device for Controller {
    fn offer(&self) -> DeviceOffer {
        DeviceOffer::new(&self.config.name, SCSI_INTERFACE, self.config.instance)
    }

    fn open(&self, channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        let worker = crate::worker::start(self.shared(), channel)?;
        Ok(worker)
    }
}
