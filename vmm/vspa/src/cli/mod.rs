//! The subcommands: each parses its arguments, drives the appliance library
//! and prints.

pub mod console;
pub mod demo;
pub mod image;
pub mod run;
pub mod sandbox;
pub mod serve;
