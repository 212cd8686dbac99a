//! The minimal KVM VMM and the wiring of the `vspa` appliance.
//!
//! Place in the data path: none on the hot path. The VMM (filled in by the vmm
//! issue) gives a guest the Hyper-V synthetic interface, which becomes one more
//! transport for the `vmbus` channel server; the VSPs then serve the guest's
//! rings exactly as they serve hosted-mode clients. The `vspa` binary lives in
//! this crate because it wires configuration to every other crate.
#![forbid(unsafe_code)]
