//! Helpers shared by the VMM end-to-end tests.
pub mod virtio_driver;
