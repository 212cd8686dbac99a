//! The `[[nbd]]` tables of vspa's configuration file: NBD servers, where
//! they listen and what they export.
//!
//! ```toml
//! [[nbd]]                         # one NBD server: listeners and exports
//! tcp = "127.0.0.1:10809"         # a TCP address, and/or
//! unix = "/run/vspa/nbd.sock"     # a Unix socket path
//! max_connections = 64            # clients served at once
//! tenant = "blue"                 # optional: the tenant owning the exports
//!
//! [[nbd.export]]
//! name = "disk0"                  # what clients ask for ("" = first export)
//! path = "disk.vhd"               # an image opened for this export, or
//! # lun = { controller = "scsi0", lun = 0 }   # the device of a LUN
//! format = "auto"                 # with path: auto | raw | vhd | iso
//! cache = "direct"                # with path: direct | cached | mapped
//! read_only = false
//! description = "boot disk"       # shown by NBD_OPT_LIST / NBD_INFO_DESCRIPTION
//! tenant = "blue"                 # optional; must match the server's
//! ```
//!
//! Relative paths are relative to the configuration file; a path may also
//! be an NBD URI (re-exporting another server's export). An export of a
//! LUN shares the LUN's open device, so guests and NBD clients see one
//! disk; it must belong to the LUN's tenant (when tenants exist, an export
//! without a tenant may not serve a tenant's LUN).
//!
//! Wiring is [`validate`] at load time, then [`start_all`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use vhd::{BlockDevice, CacheMode, DiskOptions, Format};

use super::{ExportConfig, Listen, Server, ServerConfig, ServerError};

/// One `[[nbd]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NbdSpec {
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    pub tenant: Option<String>,
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportSpec>,
}

fn default_max_connections() -> usize {
    64
}

/// One `[[nbd.export]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    pub name: String,
    pub path: Option<PathBuf>,
    pub lun: Option<LunRef>,
    /// None or "auto": found from the image.
    #[serde(default, deserialize_with = "crate::config::format_or_auto")]
    pub format: Option<Format>,
    pub cache: Option<CacheMode>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub description: String,
    pub tenant: Option<String>,
}

/// A LUN of a configured controller.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct LunRef {
    pub controller: String,
    pub lun: u8,
}

/// A LUN's device and owner, as the appliance knows them.
#[derive(Debug, Clone)]
pub struct LunDevice {
    pub device: Arc<dyn BlockDevice>,
    pub tenant: Option<String>,
}

/// An `[[nbd]]` table the appliance cannot run.
#[derive(Debug, thiserror::Error)]
pub enum NbdConfigError {
    #[error("nbd server {server}: {reason}")]
    Server { server: String, reason: String },
    #[error("nbd export {export:?}: {reason}")]
    Export { export: String, reason: String },
    #[error("nbd export {export:?} ({path}): {source}")]
    Image {
        export: String,
        path: PathBuf,
        source: Box<vhd::ImageError>,
    },
    #[error(transparent)]
    Start(#[from] ServerError),
}

impl NbdSpec {
    /// A name for messages: the listeners.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.tcp {
            parts.push(t.to_string());
        }
        if let Some(u) = &self.unix {
            parts.push(u.display().to_string());
        }
        if parts.is_empty() {
            "(no listener)".into()
        } else {
            parts.join(" + ")
        }
    }

    /// The tenant owning `export`.
    fn tenant_of<'a>(&'a self, export: &'a ExportSpec) -> Option<&'a str> {
        export.tenant.as_deref().or(self.tenant.as_deref())
    }
}

/// The string rules of the protocol for an export name.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.len() > vhd::nbd::wire::MAX_STRING {
        return Err(format!(
            "export name longer than {} bytes",
            vhd::nbd::wire::MAX_STRING
        ));
    }
    if name.contains('\0') {
        return Err("export name contains NUL".into());
    }
    Ok(())
}

/// Checks every `[[nbd]]` table on its own and against the others.
pub fn validate(specs: &[NbdSpec]) -> Result<(), NbdConfigError> {
    let mut tcp = std::collections::HashSet::new();
    let mut unix = std::collections::HashSet::new();
    for spec in specs {
        let server = |reason: &str| NbdConfigError::Server {
            server: spec.label(),
            reason: reason.to_string(),
        };
        if spec.tcp.is_none() && spec.unix.is_none() {
            return Err(server("needs tcp and/or unix"));
        }
        if spec.tcp.is_some_and(|a| a.port() != 0 && !tcp.insert(a)) {
            return Err(server("TCP address used by two servers"));
        }
        if spec.unix.as_ref().is_some_and(|p| !unix.insert(p.clone())) {
            return Err(server("socket path used by two servers"));
        }
        if spec.exports.is_empty() {
            return Err(server("exports nothing (add [[nbd.export]] tables)"));
        }
        let mut names = std::collections::HashSet::new();
        for e in &spec.exports {
            let bad = |reason: String| NbdConfigError::Export {
                export: e.name.clone(),
                reason,
            };
            check_name(&e.name).map_err(bad)?;
            if !names.insert(e.name.as_str()) {
                return Err(bad("name used twice in one server".into()));
            }
            match (&e.path, &e.lun) {
                (Some(_), None) => {}
                (None, Some(_)) if e.format.is_some() || e.cache.is_some() => {
                    return Err(bad(
                        "format and cache belong to the LUN, not its export".into()
                    ));
                }
                (None, Some(_)) => {}
                _ => return Err(bad("needs exactly one of path and lun".into())),
            }
            if let (Some(a), Some(b)) = (&spec.tenant, &e.tenant)
                && a != b
            {
                return Err(bad(format!("tenant {b:?} differs from its server's {a:?}")));
            }
        }
    }
    Ok(())
}

/// Validates `specs` and starts one server per table. `luns` finds the
/// device (and tenant) of a LUN an export names.
pub fn start_all(
    specs: &[NbdSpec],
    base: &Path,
    luns: &dyn Fn(&LunRef) -> Option<LunDevice>,
) -> Result<Vec<Server>, NbdConfigError> {
    validate(specs)?;
    specs.iter().map(|s| start(s, base, luns)).collect()
}

/// Opens the exports of one `[[nbd]]` table and starts its server.
pub fn start(
    spec: &NbdSpec,
    base: &Path,
    luns: &dyn Fn(&LunRef) -> Option<LunDevice>,
) -> Result<Server, NbdConfigError> {
    let mut exports = Vec::new();
    for e in &spec.exports {
        let device = match (&e.path, &e.lun) {
            (Some(path), _) => open_image(e, path, base)?,
            (None, Some(lun)) => lun_device(spec, e, lun, luns)?,
            (None, None) => {
                return Err(NbdConfigError::Export {
                    export: e.name.clone(),
                    reason: "needs a path or a lun".into(),
                });
            }
        };
        exports.push(ExportConfig {
            name: e.name.clone(),
            device,
            read_only: e.read_only,
            description: e.description.clone(),
        });
    }
    let listen = spec
        .tcp
        .map(Listen::Tcp)
        .into_iter()
        .chain(spec.unix.clone().map(Listen::Unix))
        .collect();
    let config = ServerConfig {
        max_connections: spec.max_connections,
        handshake_timeout: Duration::from_secs(30),
        ..ServerConfig::new(exports, listen)
    };
    Ok(Server::start(config)?)
}

fn open_image(
    e: &ExportSpec,
    path: &Path,
    base: &Path,
) -> Result<Arc<dyn BlockDevice>, NbdConfigError> {
    let path = if path.is_absolute() || vhd::nbd::is_uri(path) {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    let options = DiskOptions::default()
        .read_only(e.read_only)
        .cache(e.cache.unwrap_or_default());
    let opened = match e.format {
        None => vhd::open_by_name(&path, &options),
        Some(f) => vhd::open_as(&path, f, &options),
    };
    opened.map_err(|source| NbdConfigError::Image {
        export: e.name.clone(),
        path,
        source: Box::new(source),
    })
}

fn lun_device(
    spec: &NbdSpec,
    e: &ExportSpec,
    lun: &LunRef,
    luns: &dyn Fn(&LunRef) -> Option<LunDevice>,
) -> Result<Arc<dyn BlockDevice>, NbdConfigError> {
    let bad = |reason: String| NbdConfigError::Export {
        export: e.name.clone(),
        reason,
    };
    let found = luns(lun).ok_or_else(|| {
        bad(format!(
            "controller {:?} has no disk at LUN {}",
            lun.controller, lun.lun
        ))
    })?;
    let owner = spec.tenant_of(e);
    if found.tenant.is_some() && found.tenant.as_deref() != owner {
        return Err(bad(format!(
            "LUN {} of {:?} belongs to tenant {:?}, the export to {:?}",
            lun.lun,
            lun.controller,
            found.tenant.unwrap_or_default(),
            owner.unwrap_or("nobody")
        )));
    }
    Ok(found.device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        nbd: Vec<NbdSpec>,
    }

    fn parse(text: &str) -> Result<Vec<NbdSpec>, toml::de::Error> {
        toml::from_str::<File>(text).map(|f| f.nbd)
    }

    #[test]
    fn the_documented_table_parses() {
        let specs = parse(
            r#"
            [[nbd]]
            tcp = "127.0.0.1:10809"
            unix = "/run/vspa/nbd.sock"
            tenant = "blue"

            [[nbd.export]]
            name = "disk0"
            path = "disk.vhd"
            format = "vhd"
            cache = "cached"
            read_only = true
            description = "boot disk"

            [[nbd.export]]
            name = "data"
            lun = { controller = "scsi0", lun = 1 }
            "#,
        )
        .unwrap();
        assert_eq!(specs.len(), 1);
        let s = &specs[0];
        assert_eq!(s.tcp, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(s.max_connections, 64);
        assert_eq!(s.exports[0].format, Some(Format::Vhd));
        assert_eq!(
            s.exports[1].lun,
            Some(LunRef {
                controller: "scsi0".into(),
                lun: 1
            })
        );
        validate(&specs).unwrap();
    }

    #[test]
    fn mistakes_are_reported() {
        assert!(parse("[[nbd]]\ntcp = \"127.0.0.1:1\"\nbogus = 1\n").is_err());
        assert!(parse("[[nbd]]\ntcp = \"not an address\"\n").is_err());
        let cases = [
            "[[nbd]]\n[[nbd.export]]\nname = \"a\"\npath = \"x\"\n",
            "[[nbd]]\ntcp = \"127.0.0.1:1\"\n",
            "[[nbd]]\ntcp = \"127.0.0.1:1\"\n[[nbd.export]]\nname = \"a\"\n",
            "[[nbd]]\ntcp = \"127.0.0.1:1\"\n[[nbd.export]]\nname = \"a\"\npath = \"x\"\nlun = { controller = \"c\", lun = 0 }\n",
            "[[nbd]]\ntcp = \"127.0.0.1:1\"\n[[nbd.export]]\nname = \"a\"\npath = \"x\"\n[[nbd.export]]\nname = \"a\"\npath = \"y\"\n",
            "[[nbd]]\ntcp = \"127.0.0.1:1\"\ntenant = \"a\"\n[[nbd.export]]\nname = \"a\"\npath = \"x\"\ntenant = \"b\"\n",
            "[[nbd]]\ntcp = \"127.0.0.1:1\"\n[[nbd.export]]\nname = \"a\"\nlun = { controller = \"c\", lun = 0 }\nformat = \"raw\"\n",
            "[[nbd]]\nunix = \"/s\"\n[[nbd.export]]\nname = \"a\"\npath = \"x\"\n[[nbd]]\nunix = \"/s\"\n[[nbd.export]]\nname = \"b\"\npath = \"x\"\n",
        ];
        for text in cases {
            let specs = parse(text).unwrap();
            assert!(validate(&specs).is_err(), "accepted:\n{text}");
        }
    }

    #[test]
    fn a_lun_export_must_belong_to_the_luns_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.img");
        vhd::create::create_raw(&image, 1 << 20).unwrap();
        let device = vhd::open_by_name(&image, &DiskOptions::default()).unwrap();
        let specs = parse(&format!(
            "[[nbd]]\nunix = \"{}\"\n[[nbd.export]]\nname = \"a\"\nlun = {{ controller = \"c\", lun = 0 }}\n",
            dir.path().join("s.sock").display()
        ))
        .unwrap();
        let lun = |tenant: Option<&str>| {
            let device = Arc::clone(&device);
            let tenant = tenant.map(str::to_string);
            move |_: &LunRef| {
                Some(LunDevice {
                    device: Arc::clone(&device),
                    tenant: tenant.clone(),
                })
            }
        };
        let err = start_all(&specs, dir.path(), &lun(Some("red"))).unwrap_err();
        assert!(err.to_string().contains("belongs to tenant"), "{err}");
        let servers = start_all(&specs, dir.path(), &lun(None)).unwrap();
        assert_eq!(servers.len(), 1);
        let missing = start_all(&specs, dir.path(), &|_: &LunRef| None).err();
        drop(servers);
        assert!(missing.is_some());
    }
}
