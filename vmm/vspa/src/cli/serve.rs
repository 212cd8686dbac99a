//! `vspa serve`: hosted mode. The configuration file's SCSI controllers and
//! switches come up, and VMBus devices are offered to client processes that
//! connect to a Unix socket and act as guests. SIGHUP reloads the file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbus::worker::lock;
use vspa::appliance::ECHO_INSTANCE;
use vspa::metrics::MetricsServer;
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
    #[command(flatten)]
    pub api: super::api::ApiArgs,
    /// Serve Prometheus metrics at `/metrics` on IP:PORT, :PORT
    /// (loopback) or a Unix socket path.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<vspa::metrics::MetricsAddr>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let signals = Signals::block();
    let config = vspa::config::load_or_default(args.config.as_deref())?;
    let api_options = args.api.options()?;
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
    paths.socket(&args.socket);
    super::sandbox::control_paths(&mut paths, &args.api, args.metrics.as_ref());
    let sandbox = args.sandbox.prepare(&paths)?;
    let appliance = Arc::new(Mutex::new(Appliance::start(&config, &options)?));
    let api = super::api::start(api_options.as_ref(), &appliance)?;
    let metrics = match &args.metrics {
        Some(addr) => Some(MetricsServer::start(addr, appliance.clone())?),
        None => None,
    };
    sandbox.finish()?;
    let appliance_ref = lock(&appliance);
    let s = appliance_ref.summary();
    let mut sockets: Vec<String> = appliance_ref
        .sockets()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    drop(appliance_ref);
    if let Some(api) = &api {
        sockets.push(format!("API {}", api.path().display()));
    }
    if let Some(m) = &metrics {
        sockets.push(format!("metrics {}", m.local()));
    }
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
            Some(path) => reload(path, &mut lock(&appliance)),
            None => tracing::warn!("SIGHUP without --config: nothing to reload"),
        }
    }
    drop(api);
    drop(metrics);
    super::api::shutdown(appliance);
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
