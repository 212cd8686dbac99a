//! `--api-socket` and its access options, shared by `vspa serve` and
//! `vspa run`: where the control API listens and who may connect.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use vspa::Appliance;
use vspa::api::{ApiOptions, ApiServer};

#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// Serve the control API (HTTP/1.1, JSON; `vspa ctl`) on this Unix
    /// socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Mode of the API socket file (octal), as a tenant's `socket_mode`.
    #[arg(long, default_value = "0600", value_name = "MODE")]
    pub api_socket_mode: String,
    /// Owner of the API socket file, as a tenant's `socket_owner`.
    #[arg(long, value_name = "UID:GID")]
    pub api_socket_owner: Option<String>,
}

impl ApiArgs {
    /// The options, checked before anything starts.
    pub fn options(&self) -> anyhow::Result<Option<ApiOptions>> {
        let Some(path) = &self.api_socket else {
            return Ok(None);
        };
        let mode = vspa::tenant::parse_mode(&self.api_socket_mode).with_context(|| {
            format!(
                "--api-socket-mode {:?} is not an octal mode",
                self.api_socket_mode
            )
        })?;
        let owner = self
            .api_socket_owner
            .as_deref()
            .map(|o| {
                vspa::tenant::parse_owner(o)
                    .with_context(|| format!("--api-socket-owner {o:?} is not UID:GID"))
            })
            .transpose()?;
        Ok(Some(ApiOptions {
            path: path.clone(),
            mode,
            owner,
        }))
    }
}

/// Starts the control API on `appliance` when `options` asks for it.
pub fn start(
    options: Option<&ApiOptions>,
    appliance: &Arc<Mutex<Appliance>>,
) -> anyhow::Result<Option<ApiServer>> {
    options
        .map(|o| {
            ApiServer::start(o, appliance.clone())
                .with_context(|| format!("cannot serve the control API on {}", o.path.display()))
        })
        .transpose()
}

/// Shuts the appliance down once the control threads holding it (the API,
/// metrics) have stopped.
pub fn shutdown(appliance: Arc<Mutex<Appliance>>) {
    match Arc::try_unwrap(appliance) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()).shutdown(),
        Err(_) => tracing::warn!("the appliance is still in use: not shut down in order"),
    }
}
