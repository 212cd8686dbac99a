//! `vspa serve`: hosted mode.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Unix socket to listen on.
    #[arg(long, default_value = "/run/vspa.sock")]
    pub socket: PathBuf,
}

pub fn run(_args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("serve: not wired yet")
}
