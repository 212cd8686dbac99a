//! The appliance's configuration file: one table array per subsystem, each
//! defined and validated by its crate; unknown keys are errors, relative
//! paths are relative to the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use storage::config::{ControllerSpec, ValidController};
use storage::nbd::config::NbdSpec;
use switch::config::{SwitchConfig, ValidSwitch};

use crate::tenant::{TenantSpec, ValidTenant};

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    #[serde(default)]
    pub controller: Vec<ControllerSpec>,
    #[serde(default)]
    pub switch: Vec<SwitchConfig>,
    #[serde(default)]
    pub tenant: Vec<TenantSpec>,
    #[serde(default)]
    pub nbd: Vec<NbdSpec>,
}

/// A configuration every subsystem accepted: what the appliance runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConfig {
    pub controllers: Vec<ValidController>,
    pub switches: Vec<ValidSwitch>,
    /// Never empty: without `[[tenant]]` tables, the implicit tenant.
    pub tenants: Vec<ValidTenant>,
    /// NBD servers (checked by `storage::nbd::config::validate`); their
    /// relative paths are relative to `base`.
    pub nbd: Vec<NbdSpec>,
    pub base: PathBuf,
}

impl Default for ValidConfig {
    fn default() -> Self {
        ValidConfig {
            controllers: Vec::new(),
            switches: Vec::new(),
            tenants: crate::tenant::validate(&[], Path::new("."), &[], &[])
                .expect("the implicit tenant"),
            nbd: Vec::new(),
            base: PathBuf::from("."),
        }
    }
}

/// A configuration that cannot be read or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error(transparent)]
    Storage(#[from] storage::config::ConfigError),
    #[error(transparent)]
    Switch(#[from] switch::config::ConfigError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Refused),
    #[error(transparent)]
    Tenant(#[from] crate::tenant::TenantError),
    #[error(transparent)]
    Nbd(#[from] storage::nbd::config::NbdConfigError),
    #[error("nbd server {0}: no tenant {1:?}")]
    NbdTenant(String, String),
}

impl ApplianceConfig {
    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Validates every subsystem's tables; relative paths are resolved
    /// against `base`.
    pub fn validate(&self, base: &Path) -> Result<ValidConfig, ConfigError> {
        let mut controllers = storage::config::validate(&self.controller, base)?;
        let switches = switch::config::validate(&self.switch, base)?;
        let tenants = crate::tenant::validate(&self.tenant, base, &controllers, &switches)?;
        crate::tenant::deny_foreign_parents(&mut controllers, &tenants);
        storage::nbd::config::validate(&self.nbd)?;
        for spec in &self.nbd {
            let named = spec
                .tenant
                .iter()
                .chain(spec.exports.iter().filter_map(|e| e.tenant.as_ref()));
            for t in named {
                if !tenants.iter().any(|v| &v.name == t) {
                    return Err(ConfigError::NbdTenant(spec.label(), t.clone()));
                }
            }
        }
        let valid = ValidConfig {
            controllers,
            switches,
            tenants,
            nbd: self.nbd.clone(),
            base: base.to_path_buf(),
        };
        crate::sandbox::check(&valid)?;
        Ok(valid)
    }
}

impl ValidConfig {
    /// Parses and validates configuration text; relative paths are
    /// resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<ValidConfig, ConfigError> {
        ApplianceConfig::parse(text, Path::new("(text)"))?.validate(base)
    }
}

/// The configuration file at `path`, or the empty configuration.
pub fn load_or_default(path: Option<&Path>) -> Result<ValidConfig, ConfigError> {
    path.map_or_else(|| Ok(ValidConfig::default()), load)
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    ApplianceConfig::parse(&text, path)?.validate(base_of(path))
}

/// The directory relative paths in `path` are relative to.
pub fn base_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
