//! The appliance's configuration file: one table array per subsystem, each
//! defined and validated by its crate; unknown keys are errors, relative
//! paths are relative to the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use storage::config::{ControllerSpec, ValidController};
use switch::config::{SwitchConfig, ValidSwitch};

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    #[serde(default)]
    pub controller: Vec<ControllerSpec>,
    #[serde(default)]
    pub switch: Vec<SwitchConfig>,
}

/// A configuration every subsystem accepted: what the appliance runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidConfig {
    pub controllers: Vec<ValidController>,
    pub switches: Vec<ValidSwitch>,
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
        let valid = ValidConfig {
            controllers: storage::config::validate(&self.controller, base)?,
            switches: switch::config::validate(&self.switch, base)?,
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
