//! The storage VSP: a storvsc-compatible SCSI controller served over VMBus.
//!
//! Place in the data path: a VSC (a guest's storvsc driver, or a hosted client
//! process) posts `vstor_packet`s on a VMBus channel; this crate decodes them,
//! runs the SCSI disk or DVD command set against a `vhd` block device, and has
//! io_uring move data straight between the image and the VSC's pages.
//!
//! ```text
//!  VSC ── ring ──▶ worker (one per channel, own io_uring)
//!                    protocol  vstor_packet: init, properties, sub-channels, EXECUTE_SRB
//!                    scsi      disk (SBC) / DVD (MMC) targets -> Outcome
//!                    vhd       BlockDevice::submit -> SQEs whose iovecs are guest pages
//!  VSC ◀─ ring ── 64-byte COMPLETE_IO (status, sense, bytes moved)
//! ```
//!
//! - [`controller`]: a SCSI controller (a VMBus device) and its LUN table,
//!   with hot add/remove and DVD media changes.
//! - [`worker`]: the per-channel poll loop (the data path).
//! - [`protocol`]: the storvsc wire structs; [`scsi`]: the command sets.
//! - [`client`]: a storvsc-like client (the guest side) over hosted mode,
//!   for tests and benchmarks.
//! - [`config`]: the `[[controller]]` tables of vspa's configuration file.
//! - [`nbd`]: the NBD server exporting images and LUNs to other machines.
#![deny(unsafe_code)]

pub mod client;
pub mod config;
pub mod controller;
pub mod fuzz;
pub mod nbd;
pub mod protocol;
pub mod scsi;
mod submit;
pub mod worker;

pub use controller::{Controller, ControllerConfig, Lun};
