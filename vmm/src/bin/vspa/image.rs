//! `vspa image`: the qemu-img of vhd (filled in by the vhd issue).

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {}

pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}
