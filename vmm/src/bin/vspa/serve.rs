//! `vspa serve`: hosted mode. The configuration file's SCSI controllers and
//! switches come up, and VMBus devices are offered to client processes that
//! connect to a Unix socket and act as guests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vmbus::echo::EchoDevice;
use vmbus::hosted::HostedServer;
use vmbus::server::Registry;

use crate::switch_reload;

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
}

/// The appliance's configuration file: one table array per subsystem, each
/// defined by its crate; unknown keys are errors.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    #[serde(default)]
    pub controller: Vec<storage::config::ControllerSpec>,
    #[serde(default)]
    pub switch: Vec<switch::config::SwitchConfig>,
    /// The `[[switch]]` tables as written, to tell whether a reload
    /// changed them.
    #[serde(skip)]
    pub switch_source: Option<toml::Value>,
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> anyhow::Result<ApplianceConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let mut config: ApplianceConfig =
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)?;
    config.switch_source = table.get("switch").cloned();
    Ok(config)
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let signals = block_termination_signals();
    let config = match &args.config {
        Some(path) => load(path)?,
        None => ApplianceConfig::default(),
    };
    let base = args
        .config
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let registry = Registry::new();
    let controllers = storage::config::build_all(&config.controller, base)?;
    let mut running = Vec::new();
    for (c, spec) in controllers.iter().zip(&config.controller) {
        let luns = c.table().numbers();
        eprintln!("vspa: SCSI controller {} with LUNs {luns:?}", c.config.name);
        let id = registry.add(c.clone());
        running.push(Running {
            spec: spec.clone(),
            controller: c.clone(),
            id,
        });
    }
    let (runtime, nics) = start_switches(&config, &registry)?;
    let mut switches = RunningSwitches {
        runtime,
        nics,
        source: config.switch_source.clone(),
    };
    if args.echo {
        let mut echo = EchoDevice::new(
            "5e4d3c2b-1a09-4f8e-9d7c-6b5a49382716"
                .parse()
                .expect("guid"),
        );
        echo.stall_timeout = Duration::from_millis(args.echo_stall_ms);
        registry.add(Arc::new(echo));
    }
    let server = HostedServer::start(&args.socket, registry.clone())
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    // Readiness line for supervisors and tests: every device and port exists.
    println!(
        "vspa: ready, listening on {} ({} controllers, {} switches, {} NICs)",
        args.socket.display(),
        controllers.len(),
        switches.runtime.switches().len(),
        switches.runtime.netvsp_devices().len()
    );
    std::io::stdout().flush()?;
    loop {
        let signal = wait_for_signal(&signals);
        if signal != libc::SIGHUP {
            eprintln!("vspa: signal {signal}, shutting down");
            break;
        }
        match &args.config {
            Some(path) => reload(path, base, &registry, &mut running, &mut switches),
            None => eprintln!("vspa: SIGHUP without --config: nothing to reload"),
        }
    }
    server.stop();
    drop(switches);
    Ok(ExitCode::SUCCESS)
}

/// A controller as configured and as running.
struct Running {
    spec: storage::config::ControllerSpec,
    controller: Arc<storage::Controller>,
    id: vmbus::server::DeviceId,
}

/// The switches as running: their workers, the VMBus devices of their
/// guest NICs, and the `[[switch]]` tables they run.
struct RunningSwitches {
    runtime: switch::runtime::Runtime,
    nics: switch_reload::NicIds,
    source: Option<toml::Value>,
}

/// Re-reads the configuration (SIGHUP) and applies controller changes:
/// controllers come and go as VMBus offers and rescinds, LUNs are hot-added
/// and removed, DVD media changes. Guest NICs (netvsp ports) come and go
/// the same way; other switch changes are reported as needing a restart. A
/// bad file changes nothing and is reported.
fn reload(
    path: &Path,
    base: &Path,
    registry: &Registry,
    running: &mut Vec<Running>,
    switches: &mut RunningSwitches,
) {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vspa: reload refused: {e:#}");
            return;
        }
    };
    switch_reload::reload(
        &config.switch,
        config.switch_source.as_ref(),
        &mut switches.source,
        &mut switches.runtime,
        registry,
        &mut switches.nics,
    );
    running.retain(|r| {
        let keep = config.controller.iter().any(|c| c.name == r.spec.name);
        if !keep {
            registry.remove(r.id);
            eprintln!("vspa: controller {} removed", r.spec.name);
        }
        keep
    });
    for spec in &config.controller {
        match running.iter_mut().find(|r| r.spec.name == spec.name) {
            Some(r) => match spec.apply_to(&r.spec, &r.controller, base) {
                Ok(changes) => {
                    changes.iter().for_each(|c| eprintln!("vspa: {c}"));
                    r.spec = r.spec.with_luns_of(spec);
                }
                Err(e) => eprintln!("vspa: reload of controller {}: {e}", spec.name),
            },
            None => match spec.build(base) {
                Ok(c) => {
                    let controller = Arc::new(c);
                    let id = registry.add(controller.clone());
                    eprintln!("vspa: controller {} added", spec.name);
                    running.push(Running {
                        spec: spec.clone(),
                        controller,
                        id,
                    });
                }
                Err(e) => eprintln!("vspa: reload: {e}"),
            },
        }
    }
    eprintln!("vspa: configuration reloaded");
}

/// Starts the configuration's switches and offers their guest NICs
/// (netvsp ports) as VMBus devices.
pub fn start_switches(
    config: &ApplianceConfig,
    registry: &Registry,
) -> anyhow::Result<(switch::runtime::Runtime, switch_reload::NicIds)> {
    let runtime = switch::runtime::start(&config.switch, &[])?;
    let mut nics = switch_reload::NicIds::new();
    for (switch, nic) in runtime.guest_nics() {
        let c = nic.config();
        eprintln!(
            "vspa: netvsp NIC {} (MAC {}, instance {})",
            c.name, c.mac, c.instance
        );
        let id = registry.add(Arc::new(nic.clone()));
        nics.insert((switch.to_string(), c.name.clone()), id);
    }
    Ok((runtime, nics))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts
/// later), so the main thread can wait for them synchronously.
#[allow(unsafe_code)]
pub(crate) fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask with
    // valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

#[allow(unsafe_code)]
pub(crate) fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait with a valid set and output pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}
