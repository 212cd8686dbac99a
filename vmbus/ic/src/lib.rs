//! Hyper-V integration services (ICs) for vspa's guests: Shutdown, Time
//! Sync, Heartbeat, KVP (data exchange) and VSS (backup), the five util
//! devices Linux's `hv_utils` binds.
//!
//! # Where it sits
//!
//! ```text
//!  appliance / management API
//!        │ IcHandle: shutdown, heartbeat, KVP, time, VSS; IcSnapshot
//!        ▼
//!  IcSet ── one vmbus::server::Device per service ──▶ Registry ──▶ offers
//!        │                                                          │ guest opens
//!        ▼                                                          ▼
//!  worker per channel (control plane: one request at a time, timers)
//!        │ in-band packets: pipe header + IC header + body
//!        ▼
//!  guest: Linux hv_utils, or [`guest`] (the same answers, for tests)
//! ```
//!
//! ICs are control traffic (a few small messages a second at most): each
//! channel's worker owns its rings and sleeps through the ring's
//! interrupt-mask protocol like every vspa worker, but it may allocate
//! and lock; none of it touches the storage or network data path.
//!
//! The host sends first: NEGOTIATE right after the guest opens a channel,
//! offering versions Linux 6.1 accepts, and judges the answer by the two
//! counts (not the status). Every reply is checked against its request
//! (length, pipe header, flags TRANSACTION|RESPONSE, both transaction ids,
//! icmsgsize, then the service's body: UTF-16 byte counts, echoed fields).
//! A guest that answers wrongly, late or never leaves a clear state
//! ([`ChannelStatus`], per-service health, protocol error counts) and a
//! timed-out caller; it never stalls a channel or panics the host. The
//! protocol facts behind all this (GUIDs, layouts, what Linux accepts) are
//! in the team's IC fact sheet; [`protocol`] has the layouts with tests.
//!
//! # What the appliance calls
//!
//! The configuration is one table: a tenant (or `vspa run`'s config) gets a
//! field `#[serde(default)] ic: ic::IcConfig`, so an absent `[tenant.ic]`
//! means every service on.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # fn demo(registry: &vmbus::server::Registry) -> Result<(), ic::IcSetError> {
//! let config: ic::IcConfig = Default::default();   // the tenant's [tenant.ic]
//! let set = ic::IcSet::new("tenant-a", &config)?;   // validates the config
//! let ids = set.add_to(registry);                   // offered to the guest
//! let handle = set.handle();                        // keep; clone freely
//! // vspa run, once the VM exists: time samples carry its reference counter.
//! // handle.set_reference_clock(Arc::new(move || partition.reference_time()));
//!
//! // SIGTERM: ask the guest, then give it a grace period to stop.
//! match handle.shutdown(ic::ShutdownKind::PowerOff, Duration::from_secs(5)) {
//!     ic::ShutdownOutcome::Acknowledged => { /* wait up to the grace period for the VM to exit */ }
//!     ic::ShutdownOutcome::Refused(_status) => { /* the guest said no: stop the VM now */ }
//!     ic::ShutdownOutcome::TimedOut => { /* no answer: stop the VM now */ }
//!     ic::ShutdownOutcome::NotConnected(_why) => { /* no IC driver (yet): stop now */ }
//!     ic::ShutdownOutcome::Failed(_why) => { /* busy or a bad reply: stop now */ }
//! }
//! let report = serde_json::to_string(&handle.snapshot());  // IcSnapshot: Serialize
//! // Reload that drops the tenant: rescind its devices.
//! for id in ids {
//!     registry.remove(id);
//! }
//! # let _ = report; Ok(()) }
//! ```
//!
//! Until offers are filtered per tenant, every set on a shared registry is
//! offered to every connection: build all but one with
//! [`IcSet::with_instance_salt`] so their instance GUIDs differ (a guest
//! can open a set's channels only while no other connection has them open).
//! After a rescind the handle answers `NotConnected`.
//!
//! # Modules
//! - [`protocol`]: wire structs, GUIDs and version lists.
//! - [`message`]: building requests, validating replies, negotiation (the
//!   fuzz target's parser).
//! - [`shutdown`], [`timesync`], [`heartbeat`], [`kvp`], [`vss`]: each
//!   service's requests, answer checks, state and handler.
//! - [`handle`]: [`IcHandle`], outcomes, [`IcSnapshot`].
//! - [`guest`]: the guest side over `vmbus::vsc`, answering as Linux's
//!   hv_utils does, with hooks to misbehave.
//! - [`harness`]: a device on private rings with a raw guest end, for
//!   conformance tests and the fuzz harness ([`fuzz`]).

#![forbid(unsafe_code)]

pub mod config;
pub mod fuzz;
pub mod guest;
pub mod handle;
pub mod harness;
pub mod heartbeat;
pub mod kvp;
pub mod message;
pub mod protocol;
pub mod shutdown;
pub mod timesync;
pub mod utf16;
pub mod vss;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmbus::Guid;
use vmbus::server::{Device, DeviceId, Registry};

pub use config::{ConfigError, IcConfig};
pub use handle::{IcError, IcHandle, IcSnapshot, ServiceReport, ShutdownOutcome};
pub use heartbeat::{Health, HeartbeatState};
pub use kvp::{KvpEntry, KvpState, Pool};
pub use message::Negotiated;
pub use protocol::{Service, Version};
pub use shutdown::{ShutdownKind, ShutdownState};
pub use timesync::{RefClock, TimeSample, TimeSyncState};
pub use vss::{VssPhase, VssState};
pub use worker::{ChannelInfo, ChannelStatus};

use handle::{Service1, SetState};
use worker::{Core, HandlerFactory, IcDevice};

/// Why a set could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IcSetError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create an eventfd: {0}")]
    Io(#[from] std::io::Error),
}

/// One guest's integration services: the devices to offer and the handle
/// that controls them.
#[derive(Debug)]
pub struct IcSet {
    devices: Vec<Arc<IcDevice>>,
    handle: IcHandle,
}

impl IcSet {
    /// The services `config` turns on, offered with Hyper-V's instance
    /// GUIDs. `name` names the guest in logs and, unless the configuration
    /// names it, in the KVP VirtualMachineName value.
    pub fn new(name: &str, config: &IcConfig) -> Result<IcSet, IcSetError> {
        IcSet::with_instance_salt(name, config, 0)
    }

    /// As [`IcSet::new`], with instance GUIDs made unique by `salt` (see
    /// [`instance_guid`]): for registries that offer several guests' sets
    /// to every connection (hosted mode before per-tenant offers). Linux
    /// binds ICs by interface GUID only, so any instance works.
    pub fn with_instance_salt(
        name: &str,
        config: &IcConfig,
        salt: u32,
    ) -> Result<IcSet, IcSetError> {
        config.validate()?;
        let started = Instant::now();
        let mut state = SetState::default();
        let mut devices = Vec::new();
        let host = host_values(name, config);
        for service in Service::ALL.into_iter().filter(|s| config.enabled(*s)) {
            let core = Core::new(service)?;
            let factory: HandlerFactory = match service {
                Service::Shutdown => {
                    let s = service1(&core, &mut state.shutdown);
                    let hibernate = config.hibernate;
                    Arc::new(move || Box::new(shutdown::ShutdownHandler::new(s.clone(), hibernate)))
                }
                Service::TimeSync => {
                    let s = service1(&core, &mut state.timesync);
                    let (clock, period, timeout) = (
                        state.clock.clone(),
                        config.timesync_period(),
                        config.reply_timeout(),
                    );
                    Arc::new(move || {
                        Box::new(timesync::TimeSyncHandler::new(
                            s.clone(),
                            clock.clone(),
                            started,
                            period,
                            timeout,
                        ))
                    })
                }
                Service::Heartbeat => {
                    let s = service1(&core, &mut state.heartbeat);
                    let (period, misses) = (config.heartbeat_period(), config.heartbeat_misses);
                    Arc::new(move || {
                        Box::new(heartbeat::HeartbeatHandler::new(s.clone(), period, misses))
                    })
                }
                Service::Kvp => {
                    let s = service1(&core, &mut state.kvp);
                    let (host, refresh, timeout) =
                        (host.clone(), config.kvp_refresh(), config.reply_timeout());
                    Arc::new(move || {
                        Box::new(kvp::KvpHandler::new(
                            s.clone(),
                            host.clone(),
                            refresh,
                            timeout,
                        ))
                    })
                }
                Service::Vss => {
                    let s = service1(&core, &mut state.vss);
                    let (limit, timeout) = (config.vss_freeze_limit(), config.reply_timeout());
                    Arc::new(move || Box::new(vss::VssHandler::new(s.clone(), limit, timeout)))
                }
            };
            devices.push(Arc::new(IcDevice {
                core,
                instance: instance_guid(service, salt),
                name: name.to_string(),
                reply_timeout: config.reply_timeout(),
                factory,
            }));
        }
        Ok(IcSet {
            devices,
            handle: IcHandle { state },
        })
    }

    /// The devices, one per service that is on.
    pub fn devices(&self) -> Vec<Arc<dyn Device>> {
        self.devices
            .iter()
            .map(|d| d.clone() as Arc<dyn Device>)
            .collect()
    }

    /// Adds every device to `registry` (offering them to connected peers);
    /// returns their ids for a later `Registry::remove`.
    pub fn add_to(&self, registry: &Registry) -> Vec<DeviceId> {
        self.devices()
            .into_iter()
            .map(|d| registry.add(d))
            .collect()
    }

    pub fn handle(&self) -> IcHandle {
        self.handle.clone()
    }
}

/// Registers a service's detail state in the set and returns it.
fn service1<T: Default>(core: &Arc<Core>, slot: &mut Option<Service1<T>>) -> Arc<Mutex<T>> {
    let detail = Arc::new(Mutex::new(T::default()));
    *slot = Some(Service1 {
        core: core.clone(),
        detail: detail.clone(),
    });
    detail
}

/// The instance GUID of `service` in a set with `salt`: Hyper-V's own for
/// salt 0, otherwise with the salt XORed into its last four bytes.
pub fn instance_guid(service: Service, salt: u32) -> Guid {
    let mut g = service.hyperv_instance();
    for (b, s) in g.0[12..].iter_mut().zip(salt.to_be_bytes()) {
        *b ^= s;
    }
    g
}

/// The values the KVP service publishes in the guest's host pools.
fn host_values(name: &str, config: &IcConfig) -> kvp::HostValues {
    let host = if config.host_name.is_empty() {
        this_host_name()
    } else {
        config.host_name.clone()
    };
    let vm = if config.vm_name.is_empty() {
        name
    } else {
        &config.vm_name
    };
    let mut auto_external = vec![KvpEntry::new("VirtualMachineName", vm)];
    if !host.is_empty() {
        for key in [
            "HostName",
            "PhysicalHostName",
            "PhysicalHostNameFullyQualified",
        ] {
            auto_external.push(KvpEntry::new(key, &host));
        }
    }
    kvp::HostValues {
        auto_external,
        external: config
            .kvp_external
            .iter()
            .map(|(k, v)| KvpEntry::new(k, v))
            .collect(),
    }
}

/// This machine's host name ("" if unknown).
fn this_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| kvp::check_entry("HostName", s).is_ok())
        .unwrap_or_default()
}
