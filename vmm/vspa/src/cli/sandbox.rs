//! The sandbox options of `vspa serve` and `vspa run` (see
//! `vspa::sandbox`), and the paths each subcommand may open later.

use std::path::{Path, PathBuf};

use vspa::ValidConfig;
use vspa::metrics::MetricsAddr;
use vspa::sandbox::{Mode, Paths, Prepared, Settings};

#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// strict: every layer or no start; best-effort: the layers the kernel
    /// offers (missing ones are reported); off: none.
    #[arg(long, default_value = "best-effort", value_name = "MODE")]
    pub sandbox: Mode,
    /// Run as this user (name or uid) once set up.
    #[arg(long)]
    pub user: Option<String>,
    /// Run as this group (name or gid) once set up; default: the user's.
    #[arg(long)]
    pub group: Option<String>,
    /// A directory of images a later reload may name (the configuration's
    /// directory and its images' directories are allowed already).
    /// Repeatable.
    #[arg(long, value_name = "DIR")]
    pub sandbox_dir: Vec<PathBuf>,
}

impl SandboxArgs {
    /// The paths every appliance may open: the configuration, its images,
    /// the extra directories, and tap devices.
    pub fn paths(&self, config_file: Option<&Path>, config: &ValidConfig) -> Paths {
        let mut paths = Paths::new();
        if let Some(file) = config_file {
            paths.config_file(file);
        }
        paths.config(config);
        for dir in &self.sandbox_dir {
            paths.image_dir(dir);
        }
        paths.device(Path::new("/dev/net/tun"));
        // A VXLAN port's gso_tap (added now or by a reload) checks and sets
        // its namespace's forwarding sysctls.
        paths.settings(Path::new("/proc/sys/net"));
        paths
    }

    /// Puts the sandbox's first layers in place (before any thread).
    pub fn prepare(&self, paths: &Paths) -> anyhow::Result<Prepared> {
        let settings = Settings {
            mode: self.sandbox,
            user: self.user.clone(),
            group: self.group.clone(),
        };
        Ok(vspa::sandbox::prepare(&settings, paths)?)
    }
}

/// The control endpoints' sockets: the API socket's directory, the metrics
/// endpoint's socket directory or TCP port.
pub fn control_paths(paths: &mut Paths, api: &super::api::ApiArgs, metrics: Option<&MetricsAddr>) {
    if let Some(path) = &api.api_socket {
        paths.socket(path);
    }
    match metrics {
        Some(MetricsAddr::Unix(path)) => {
            paths.socket(path);
        }
        Some(MetricsAddr::Tcp(addr)) => {
            paths.tcp(addr.port(), true);
        }
        None => {}
    }
}
