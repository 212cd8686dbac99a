//! The sandbox of `vspa serve` and `vspa run`: what the process may still
//! do once its devices exist.
//!
//! # Layers, in the order they go in
//! ```text
//!  prepare()  before Appliance::start, while the main thread is alone
//!    ├─ SIGSYS handler            a denied call: message, exit 148
//!    ├─ no_new_privs              inherited by every later thread
//!    ├─ Landlock                  only the Paths (images' directories,
//!    │                            config, socket dirs, devices); inherited
//!    ├─ io_uring                  rings created restricted from now on,
//!    │                            on the ring thread only
//!    ├─ process filter            union of every kind + setup; inherited
//!    └─ installer                 vspa_threads::enter(kind) installs the
//!                                 kind's filter in each new thread
//!  Appliance::start, HostedServer::start   (threads enter their kinds)
//!  finish()   after setup
//!    ├─ user drop                 setgroups, setresgid, setresuid (glibc
//!    │                            applies them to every thread)
//!    └─ main's own filter         reloads, signals, shutdown
//! ```
//! Landlock and no_new_privs bind a thread and the threads it starts
//! later, so they go in before the first thread; seccomp filters too (a
//! thread cannot take a filter from another), which is why each thread
//! installs its own kind's filter through the hook, first thing, and the
//! process filter carried by all of them is the safety net for any thread
//! that would not.
//!
//! [`Mode::Strict`] refuses to run without every layer; the default
//! [`Mode::BestEffort`] runs with what the kernel offers and says what is
//! missing; [`Mode::Off`] installs nothing. At start vspa prints the
//! [`Layers`] in force.

mod landlock;
mod paths;
pub(crate) mod rules;
mod seccomp;
mod user;

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use seccompiler::BpfProgram;
pub use vspa_threads::ThreadKind;

pub use paths::Paths;
pub use seccomp::EXIT_DENIED_SYSCALL;

use crate::config::ValidConfig;

/// How much of the sandbox must be in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every layer, or vspa does not start.
    Strict,
    /// Every layer the kernel offers; what is missing is reported.
    #[default]
    BestEffort,
    /// None.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Mode::Strict),
            "best-effort" => Ok(Mode::BestEffort),
            "off" => Ok(Mode::Off),
            _ => Err(format!("{s:?}: expected strict, best-effort or off")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Strict => "strict",
            Mode::BestEffort => "best-effort",
            Mode::Off => "off",
        })
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub mode: Mode,
    /// User to run as after setup (name or number); None keeps the user.
    pub user: Option<String>,
    /// Group to run as after setup; None: the user's primary group.
    pub group: Option<String>,
}

/// Why the sandbox could not be set up (strict mode, or a bad setting).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {0}")]
    User(String),
    #[error("sandbox (strict): {0}")]
    Missing(String),
    #[error("sandbox: building the seccomp filters: {0}")]
    Filter(String),
    #[error("sandbox: {0}")]
    Refused(#[from] Refused),
}

/// What a configuration names that the sandbox cannot allow.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// A file outside the allowed directories.
    #[error(
        "{} is outside the directories the sandbox allows; refused (allow its directory at start, e.g. --sandbox-dir)",
        .0.display()
    )]
    Outside(std::path::PathBuf),
    /// An NBD server named by host name: resolving it needs files and
    /// sockets no sandboxed thread may use.
    #[error(
        "NBD server {0:?}: the sandbox resolves no host names; refused (name the server by IP address or Unix socket)"
    )]
    HostName(String),
}

/// The layers in force, printed at start.
#[derive(Debug, Clone)]
pub struct Layers {
    pub mode: Mode,
    /// The ids the process runs as after the drop (None: unchanged).
    pub user: Option<(u32, u32)>,
    pub no_new_privs: bool,
    /// Landlock: (kernel ABI, rules), or why not.
    pub landlock: Result<(i32, usize), String>,
    pub seccomp: bool,
    pub io_uring: Result<(), String>,
}

impl std::fmt::Display for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mode == Mode::Off {
            return f.write_str("sandbox off");
        }
        write!(f, "sandbox {}: ", self.mode)?;
        match self.user {
            Some((u, g)) => write!(f, "user {u} group {g}")?,
            None => f.write_str("user unchanged")?,
        }
        if self.no_new_privs {
            f.write_str(", no_new_privs")?;
        }
        match &self.landlock {
            Ok((abi, rules)) => write!(f, ", landlock ABI {abi} ({rules} paths)")?,
            Err(why) => write!(f, ", no landlock ({why})")?,
        }
        if self.seccomp {
            f.write_str(", seccomp per thread kind (")?;
            let kinds: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
            write!(f, "{})", kinds.join(" "))?;
        } else {
            f.write_str(", no seccomp")?;
        }
        match &self.io_uring {
            Ok(()) => f.write_str(", io_uring rings restricted"),
            Err(why) => write!(f, ", io_uring rings unrestricted ({why})"),
        }
    }
}

/// The compiled filters, per kind, and what installing them needs.
struct Armed {
    strict: bool,
    kinds: Vec<BpfProgram>,
    no_open: BpfProgram,
    paths: Paths,
}

static ARMED: OnceLock<Armed> = OnceLock::new();
/// Threads that installed their kind's filter, per kind.
static INSTALLED: [AtomicU32; ThreadKind::ALL.len()] =
    [const { AtomicU32::new(0) }; ThreadKind::ALL.len()];

/// The sandbox between [`prepare`] and [`Prepared::finish`].
#[derive(Debug)]
pub struct Prepared {
    layers: Layers,
}

/// Puts the layers that must precede every thread in place. Call it on
/// the main thread before it starts any thread (before `Appliance::start`),
/// with every path the appliance may open later.
pub fn prepare(settings: &Settings, paths: &Paths) -> Result<Prepared, SandboxError> {
    // Before any filter: the data path may not call rt_sigaction later.
    vhd::trycopy::install();
    let mut layers = Layers {
        mode: settings.mode,
        user: None,
        no_new_privs: false,
        landlock: Err("off".into()),
        seccomp: false,
        io_uring: Err("off".into()),
    };
    if settings.mode == Mode::Off {
        return Ok(Prepared { layers });
    }
    if let Some(host) = paths.host_names().first() {
        return Err(Refused::HostName(host.clone()).into());
    }
    let strict = settings.mode == Mode::Strict;
    let need = |ok: bool, what: &str| -> Result<(), SandboxError> {
        if ok || !strict {
            Ok(())
        } else {
            Err(SandboxError::Missing(what.to_string()))
        }
    };
    layers.user = user::resolve(settings.user.as_deref(), settings.group.as_deref())?;
    let facts = rules::Facts { ids: layers.user };
    let compiled = compile_all(facts)?;
    seccomp::remember_thread(ThreadKind::Main);
    seccomp::install_handler()
        .map_err(|e| SandboxError::Missing(format!("SIGSYS handler: {e}")))?;
    // SAFETY: prctl with integer arguments only.
    layers.no_new_privs = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0;
    need(layers.no_new_privs, "no_new_privs could not be set")?;
    layers.landlock = match landlock::restrict(paths) {
        landlock::Status::Enforced { rules, .. } => Ok((landlock::kernel_abi(), rules)),
        landlock::Status::NotEnforced(why) => Err(why),
    };
    need(layers.landlock.is_ok(), "Landlock is not available")?;
    layers.io_uring = vhd::restricted_rings_available().map_err(|e| e.to_string());
    need(
        layers.io_uring.is_ok(),
        "io_uring restrictions are not available",
    )?;
    if layers.io_uring.is_ok() {
        vhd::restrict_new_rings(true);
    }
    let Compiled {
        process,
        no_clone3,
        no_open,
        kinds,
    } = compiled;
    layers.seccomp = seccomp::install(&no_clone3)
        .and_then(|()| seccomp::install(&process))
        .is_ok();
    need(layers.seccomp, "seccomp filters could not be installed")?;
    let _ = ARMED.set(Armed {
        strict,
        kinds: if layers.seccomp { kinds } else { Vec::new() },
        no_open,
        paths: paths.clone(),
    });
    if layers.seccomp {
        vspa_threads::set_installer(install_kind);
    }
    if layers.seccomp {
        // Every ring is created there, restricted or (best effort without
        // restrictions) not: no other thread may call io_uring_setup.
        vspa_threads::start_ring_thread()
            .map_err(|e| SandboxError::Missing(format!("ring thread: {e}")))?;
    }
    Ok(Prepared { layers })
}

/// Every filter, compiled before anything is installed.
struct Compiled {
    process: BpfProgram,
    no_clone3: BpfProgram,
    no_open: BpfProgram,
    kinds: Vec<BpfProgram>,
}

fn compile_all(facts: rules::Facts) -> Result<Compiled, SandboxError> {
    let err = |e: seccompiler::Error| SandboxError::Filter(e.to_string());
    let kinds = ThreadKind::ALL
        .iter()
        .map(|&k| seccomp::compile(&rules::kind(k, facts)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    Ok(Compiled {
        process: seccomp::compile(&rules::process(facts)).map_err(err)?,
        no_clone3: seccomp::no_clone3().map_err(err)?,
        no_open: seccomp::no_open().map_err(err)?,
        kinds,
    })
}

impl Prepared {
    /// After setup: drops to the configured user and group, installs the
    /// main thread's own filter and prints the layers in force (stderr).
    pub fn finish(self) -> Result<Layers, SandboxError> {
        let mut layers = self.layers;
        if layers.mode != Mode::Off {
            if let Some((uid, gid)) = layers.user {
                user::drop_to(uid, gid)?;
            }
            if layers.seccomp {
                vspa_threads::enter(ThreadKind::Main);
            }
        } else {
            layers.user = None;
        }
        eprintln!("vspa: {layers}");
        Ok(layers)
    }

    /// What `prepare` put in place so far.
    pub fn layers(&self) -> &Layers {
        &self.layers
    }
}

/// The installer every thread runs through `vspa_threads::enter`.
fn install_kind(kind: ThreadKind) {
    let Some(armed) = ARMED.get() else {
        return;
    };
    let index = ThreadKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
    let Some(filter) = armed.kinds.get(index) else {
        return;
    };
    seccomp::remember_thread(kind);
    // The ENOENT filter first: installing needs prctl, which the kind's
    // own filter no longer allows.
    let no_open = if rules::opens_files(kind) {
        Ok(())
    } else {
        seccomp::install(&armed.no_open)
    };
    let installed = no_open.and_then(|()| seccomp::install(filter));
    match installed {
        Ok(()) => {
            INSTALLED[index].fetch_add(1, Ordering::Relaxed);
        }
        Err(e) if armed.strict => {
            eprintln!("vspa: sandbox (strict): cannot install the {kind} filter: {e}");
            std::process::exit(EXIT_DENIED_SYSCALL);
        }
        Err(e) => tracing::warn!("sandbox: the {kind} thread runs without its filter: {e}"),
    }
}

/// How many threads of `kind` installed their filter so far.
pub fn installed(kind: ThreadKind) -> u32 {
    let index = ThreadKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
    INSTALLED[index].load(Ordering::Relaxed)
}

/// Whether the sandbox allows opening `path` (for writing if `writable`):
/// always, when no sandbox is in force.
pub fn allows(path: &Path, writable: bool) -> Result<(), Refused> {
    match ARMED.get() {
        Some(armed) if !armed.paths.covers(path, writable) => {
            Err(Refused::Outside(path.to_path_buf()))
        }
        _ => Ok(()),
    }
}

/// [`allows`] for every file `config` names: a reload calls it before it
/// opens anything.
pub fn check(config: &ValidConfig) -> Result<(), Refused> {
    for (path, writable) in paths::config_paths(config) {
        allows(&path, writable)?;
    }
    for dir in paths::parent_dirs(config) {
        allows(&dir, false)?;
    }
    if ARMED.get().is_some()
        && let Some(host) = paths::nbd_host_names(config).into_iter().next()
    {
        return Err(Refused::HostName(host));
    }
    Ok(())
}
