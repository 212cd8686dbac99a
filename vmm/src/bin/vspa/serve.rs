//! `vspa serve`: hosted mode.

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Unix socket to listen on.
    #[arg(long, default_value = "/run/vspa.sock")]
    pub socket: PathBuf,
    /// Appliance configuration file (TOML with `[[switch]]` tables).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The appliance's configuration file: one table array per subsystem, each
/// defined by its crate; unknown keys are errors.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplianceConfig {
    #[serde(default)]
    switch: Vec<switch::config::SwitchConfig>,
}

fn load(path: &Path) -> anyhow::Result<ApplianceConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = &args.config else {
        anyhow::bail!("serve: the hosted-mode socket is not wired yet; pass --config F")
    };
    let config = load(path)?;
    let runtime = switch::runtime::start(&config.switch, &[])?;
    // Readiness line for supervisors and tests: every port exists now.
    println!("vspa: ready ({} switches)", runtime.switches().len());
    std::io::stdout().flush()?;
    // The workers run until the process is stopped; pcap files are flushed
    // after every batch, so a signal loses nothing.
    loop {
        std::thread::park();
    }
}
