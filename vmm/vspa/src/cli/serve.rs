//! `vspa serve`: hosted mode. The configuration file's SCSI controllers and
//! switches come up, and VMBus devices are offered to client processes that
//! connect to a Unix socket and act as guests. SIGHUP reloads the file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use vspa::appliance::ECHO_INSTANCE;
use vspa::signals::Signals;
use vspa::tenant::DEFAULT_TENANT;
use vspa::{Appliance, Options};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Unix socket to listen on.
    #[arg(long, default_value = "/run/vspa.sock")]
    pub socket: PathBuf,
    /// Appliance configuration file (TOML with `[[controller]]` and
    /// `[[switch]]` tables).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also offer the echo test device.
    #[arg(long)]
    pub echo: bool,
    /// Reset an echo channel whose client leaves replies unread this long.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub echo_stall_ms: u64,
    #[command(flatten)]
    pub sandbox: super::sandbox::SandboxArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let signals = Signals::block();
    let config = vspa::config::load_or_default(args.config.as_deref())?;
    let options = Options {
        echo: args
            .echo
            .then(|| (ECHO_INSTANCE, Duration::from_millis(args.echo_stall_ms))),
        serve: Some(args.socket.clone()),
    };
    if config
        .tenants
        .iter()
        .any(|t| t.name == DEFAULT_TENANT && t.socket.is_none())
    {
        tracing::warn!(
            "no [[tenant]] tables: every client of {} gets every device",
            args.socket.display()
        );
    }
    let mut paths = args.sandbox.paths(args.config.as_deref(), &config);
    let sandbox = args.sandbox.prepare(paths.socket(&args.socket))?;
    let mut appliance = Appliance::start(&config, &options)?;
    sandbox.finish()?;
    let s = appliance.summary();
    let sockets: Vec<String> = appliance
        .sockets()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    // Readiness line for supervisors and tests: every device and port exists.
    println!(
        "vspa: ready, listening on {} ({} tenants, {} controllers, {} switches, {} NICs)",
        sockets.join(", "),
        s.tenants,
        s.controllers,
        s.switches,
        s.nics
    );
    std::io::stdout().flush()?;
    loop {
        let signal = signals.wait();
        if signal != libc::SIGHUP {
            tracing::info!("signal {signal}, shutting down");
            break;
        }
        match &args.config {
            Some(path) => reload(path, &mut appliance),
            None => tracing::warn!("SIGHUP without --config: nothing to reload"),
        }
    }
    appliance.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// Re-reads the configuration and applies it; a file with errors changes
/// nothing and is reported.
fn reload(path: &Path, appliance: &mut Appliance) {
    match vspa::config::load(path) {
        Ok(config) => appliance.reload(&config).log(),
        Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
    }
}
