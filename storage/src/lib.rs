//! The storage VSP: a storvsc-compatible SCSI controller served over VMBus.
//!
//! Place in the data path: a VSC (a guest's storvsc driver, or a hosted client
//! process) posts `vstor_packet`s on a VMBus channel; this crate decodes them,
//! runs the SCSI disk or DVD command set against a `vhd` block device, and has
//! io_uring move data straight between the image and the VSC's pages.
#![forbid(unsafe_code)]

pub mod protocol;
pub mod scsi;
