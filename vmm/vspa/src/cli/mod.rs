//! The subcommands: each parses its arguments, drives the appliance library
//! and prints.

pub mod api;
pub mod console;
pub mod ctl;
pub mod demo;
pub mod image;
pub mod run;
pub mod serve;
