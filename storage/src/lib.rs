//! The storage VSP: a storvsc-compatible SCSI controller served over VMBus.
//!
//! Place in the data path: a VSC (a guest's storvsc driver, or a hosted client
//! process) posts `vstor_packet`s on a VMBus channel; this crate decodes them,
//! runs the SCSI disk or DVD command set against a `vhd` block device, and has
//! io_uring move data straight between the image and the VSC's pages.
//!
//! ```text
//!  VSC ── ring ──▶ worker (one per channel, own io_uring)
//!                    protocol  vstor_packet -> VstorRequest
//!                    init      Begin -> Version -> Properties -> End -> Ready
//!                    scsi      disk (SBC) / DVD (MMC) targets -> Outcome
//!                    vhd       BlockDevice::submit -> SQEs whose iovecs are guest pages
//!  VSC ◀─ ring ── 64-byte COMPLETE_IO (status, sense, bytes moved)
//! ```
//!
//! - [`controller`]: a SCSI controller (a VMBus device) with hot LUN
//!   add/remove and DVD media changes; [`luns`]: its LUN table and how
//!   channel workers see changes to it.
//! - [`worker`]: the per-channel poll loop (the data path).
//! - [`protocol`]: the storvsc wire structs and the typed requests packets
//!   parse into; [`init`]: the initialisation state machine that says
//!   which requests are valid when; [`scsi`]: the command sets.
//! - [`client`]: a storvsc-like client (the guest side) over hosted mode,
//!   for tests and benchmarks.
//! - [`settings`]: a controller's settings, read by its workers;
//!   [`limit`]: the per-LUN rate caps the workers charge.
//! - [`config`]: the `[[controller]]` tables of vspa's configuration file.
//! - [`nbd`]: the NBD server exporting images and LUNs to other machines.
//! - [`stats`]: per-worker, per-LUN I/O counters for metrics.
//!
//! Modules depend one way: `protocol`, `scsi`, `limit`, `settings` ← `luns` ←
//! `init` ← `worker` ← `controller` ← `config`.
#![deny(unsafe_code)]

pub mod client;
pub mod config;
pub mod controller;
pub mod fuzz;
pub mod init;
pub mod limit;
pub mod luns;
pub mod nbd;
pub mod protocol;
pub mod scsi;
pub mod settings;
pub mod stats;
mod submit;
pub mod worker;

pub use controller::{Controller, ControllerConfig, Lun};
