//! The vspa appliance: the layer that turns the data-plane crates into one
//! running program.
//!
//! # Place in the system
//! ```text
//!  vspa serve | run | demo          (cli/: parse arguments, print)
//!        │
//!        ▼
//!  config::load ──▶ ValidConfig      (TOML → validated types; no file opened)
//!        │
//!        ▼
//!  Appliance::start ──▶ Registry     (storage controllers, switches and their
//!        │                            guest NICs, the echo device)
//!        ├─ reload(&ValidConfig) ──▶ ReloadReport   (typed plans, applied)
//!        ├─ change(Override)     ──▶ ReloadReport   (the control API: the
//!        │                                           same plans, kept as
//!        │                                           runtime overrides)
//!        └─ shutdown()
//! ```
//! `vspa serve` hands the [`Appliance::registry`] to hosted mode,
//! `vspa run` to its VM. Every subsystem validates its own tables
//! (`storage::config::validate`, `switch::config::validate`) and plans its
//! own changes (`storage::config::plan`, `switch::config::plan`); this
//! crate applies the plans and reports what happened.
//!
//! [`api`] serves the control API on a Unix socket (one control thread);
//! [`overrides`] says how its changes and reloads of the file combine.
//! [`metrics`] serves every counter to Prometheus (`vspa serve --metrics`)
//! from one control thread.
//!
//! The data path never sees this layer: it configures devices, then stays
//! out of the way until the next reload or shutdown.
#![deny(unsafe_code)]

pub mod api;
pub mod appliance;
pub mod checkpoint;
pub mod config;
pub mod conns;
pub mod guest_stop;
pub mod metrics;
pub mod overrides;
pub mod reload;
#[allow(unsafe_code)]
pub mod sandbox;
#[allow(unsafe_code)]
pub mod signals;
pub mod tenant;

pub use appliance::{Appliance, Options, StartError, Summary};
pub use config::{ApplianceConfig, ConfigError, ValidConfig};
pub use reload::{Change, ReloadReport, Restart, TenantChange};
