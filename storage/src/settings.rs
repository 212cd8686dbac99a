//! A controller's settings: what the configuration decides for a SCSI
//! controller and what its channel workers read (the QUERY_PROPERTIES
//! answer, queue depth, spin time, CPUs). A module of its own so that the
//! workers depend on the settings and not on the controller.

use crate::limit::RateLimit;
use vmbus::guid::Guid;

/// Largest transfer advertised to guests (QUERY_PROPERTIES, VPD B0).
pub const DEFAULT_MAX_TRANSFER: u32 = 256 * 1024;
/// Most request slots (queue depth) a channel may have.
pub const MAX_QUEUE_DEPTH: u32 = 4096;

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
    /// Cap on each LUN's reads and writes, shared by all channels (a
    /// tenant's `lun_iops` / `lun_mbps`; see [`crate::limit`]).
    pub lun_limit: RateLimit,
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
            lun_limit: RateLimit::default(),
        }
    }
}
