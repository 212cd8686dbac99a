//! Tenants: who may reach which devices.
//!
//! A `[[tenant]]` table names a guest (one hosted-mode socket, or the VM of
//! `vspa run`): its socket and who may connect to it, the devices it owns
//! and its limits. Each tenant gets its own VMBus registry, so its clients
//! are offered only its devices and a relid of another tenant's device is,
//! for them, a relid that does not exist (the same answer, no existence
//! oracle). Deny by default: a device no tenant owns is never offered.
//! A writable device belongs to one tenant at most; read-only LUNs (DVD
//! drives, `read_only` disks) may be shared.
//!
//! ```toml
//! [[tenant]]
//! name = "web"
//! socket = "/run/vspa/web/vspa.sock"   # relative paths: to the file
//! socket_mode = "0660"                 # default 0600
//! socket_owner = "0:1001"              # uid:gid of the socket file
//! allow_uids = [1001]                  # SO_PEERCRED at accept (default: any)
//! allow_gids = []
//! controllers = ["scsi0"]              # every LUN of these controllers
//! luns = [{ controller = "media", lun = 0 }]
//! nics = [{ switch = "sw0", port = "web" }]
//! [tenant.limits]
//! connections = 1                      # at once (default: unlimited)
//! memory_bytes = 1073741824            # guest memory a connection shares
//! lun_iops = 50000                     # per LUN
//! lun_mbps = 400                       # per LUN, MB/s
//! [tenant.ic]                          # integration services (all on)
//! heartbeat = true
//! ```
//!
//! A file without `[[tenant]]` tables has one implicit tenant that owns
//! every device, on the socket given on the command line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use storage::config::{LunKind, ValidController};
use switch::config::ValidSwitch;

/// The name of the implicit tenant of a file without `[[tenant]]` tables.
pub const DEFAULT_TENANT: &str = "default";

/// A `[[tenant]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    pub socket: Option<PathBuf>,
    /// Octal, e.g. "0660".
    pub socket_mode: Option<String>,
    /// "UID:GID".
    pub socket_owner: Option<String>,
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    #[serde(default)]
    pub controllers: Vec<String>,
    #[serde(default)]
    pub luns: Vec<LunRef>,
    #[serde(default)]
    pub nics: Vec<NicRef>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub ic: ic::IcConfig,
}

/// One LUN of a controller.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunRef {
    pub controller: String,
    pub lun: u8,
}

/// A guest NIC: a netvsp port of a switch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicRef {
    pub switch: String,
    pub port: String,
}

/// What a tenant may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections at once.
    pub connections: Option<usize>,
    /// Guest memory one connection may share, in bytes.
    pub memory_bytes: Option<u64>,
    /// Requests in flight per LUN channel (caps the controller's
    /// queue_depth for this tenant).
    pub inflight: Option<u32>,
    /// I/O operations per second per LUN.
    pub lun_iops: Option<u32>,
    /// Megabytes (10^6 bytes) per second per LUN.
    pub lun_mbps: Option<u32>,
}

impl Limits {
    /// Every limit given is at least 1 (0 would stop the tenant, not
    /// limit it).
    fn validate(&self) -> Result<(), String> {
        let zero = [
            ("connections", self.connections == Some(0)),
            ("memory_bytes", self.memory_bytes == Some(0)),
            ("inflight", self.inflight == Some(0)),
            ("lun_iops", self.lun_iops == Some(0)),
            ("lun_mbps", self.lun_mbps == Some(0)),
        ];
        match zero.iter().find(|(_, z)| *z) {
            Some((name, _)) => Err(format!("limits.{name} must be at least 1")),
            None => Ok(()),
        }
    }

    /// The per-LUN cap the tenant's controllers enforce.
    pub fn rate_limit(&self) -> storage::limit::RateLimit {
        storage::limit::RateLimit {
            iops: self.lun_iops,
            bytes_per_sec: self
                .lun_mbps
                .map(|mb| u64::from(mb) * storage::limit::MEGABYTE),
        }
    }
}

/// A tenant as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTenant {
    pub name: String,
    /// None for `vspa run` (the VM is the tenant) or the implicit tenant
    /// (the command line gives the socket).
    pub socket: Option<PathBuf>,
    pub socket_mode: u32,
    pub socket_owner: Option<(u32, u32)>,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub owns: Ownership,
    pub limits: Limits,
    pub ic: ic::IcConfig,
}

/// The devices a tenant owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Controllers owned whole: every LUN, now and later.
    pub controllers: BTreeSet<String>,
    pub luns: BTreeSet<LunRef>,
    pub nics: BTreeSet<NicRef>,
}

impl Ownership {
    /// Whether LUN `lun` of controller `controller` is this tenant's.
    pub fn owns_lun(&self, controller: &str, lun: u8) -> bool {
        self.controllers.contains(controller)
            || self.luns.contains(&LunRef {
                controller: controller.to_string(),
                lun,
            })
    }

    /// Whether the tenant sees controller `controller` at all (whole, or
    /// some of its LUNs).
    pub fn sees_controller(&self, controller: &str) -> bool {
        self.controllers.contains(controller)
            || self.luns.iter().any(|l| l.controller == controller)
    }

    pub fn owns_nic(&self, switch: &str, port: &str) -> bool {
        self.nics.contains(&NicRef {
            switch: switch.to_string(),
            port: port.to_string(),
        })
    }
}

/// Why the tenants cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantError {
    #[error("tenant {0:?}: {1}")]
    Tenant(String, String),
    #[error("controller {controller:?} LUN {lun} is writable and owned by tenants {a:?} and {b:?}")]
    SharedWritable {
        controller: String,
        lun: u8,
        a: String,
        b: String,
    },
    #[error("NIC {switch}:{port} is owned by tenants {a:?} and {b:?}")]
    SharedNic {
        switch: String,
        port: String,
        a: String,
        b: String,
    },
}

/// Validates the tenants against the devices of the configuration.
/// Without tenants: one implicit tenant that owns everything.
pub fn validate(
    specs: &[TenantSpec],
    base: &Path,
    controllers: &[ValidController],
    switches: &[ValidSwitch],
) -> Result<Vec<ValidTenant>, TenantError> {
    if specs.is_empty() {
        return Ok(vec![implicit(controllers, switches)]);
    }
    let mut tenants = Vec::new();
    for s in specs {
        let t = validate_one(s, base, controllers, switches)?;
        if tenants.iter().any(|o: &ValidTenant| o.name == t.name) {
            return Err(TenantError::Tenant(t.name, "name used twice".into()));
        }
        if t.socket.is_some() && tenants.iter().any(|o| o.socket == t.socket) {
            return Err(TenantError::Tenant(
                t.name,
                "socket used by another tenant".into(),
            ));
        }
        tenants.push(t);
    }
    check_exclusive(&tenants, controllers)?;
    Ok(tenants)
}

/// The tenant of a file without `[[tenant]]` tables: every device.
fn implicit(controllers: &[ValidController], switches: &[ValidSwitch]) -> ValidTenant {
    let nics = switches
        .iter()
        .flat_map(|s| {
            s.ports.iter().filter(|p| p.is_nic()).map(|p| NicRef {
                switch: s.name.clone(),
                port: p.name.clone(),
            })
        })
        .collect();
    ValidTenant {
        name: DEFAULT_TENANT.to_string(),
        socket: None,
        socket_mode: 0o600,
        socket_owner: None,
        allow_uids: Vec::new(),
        allow_gids: Vec::new(),
        owns: Ownership {
            controllers: controllers.iter().map(|c| c.name.clone()).collect(),
            luns: BTreeSet::new(),
            nics,
        },
        limits: Limits::default(),
        ic: ic::IcConfig::default(),
    }
}

fn validate_one(
    s: &TenantSpec,
    base: &Path,
    controllers: &[ValidController],
    switches: &[ValidSwitch],
) -> Result<ValidTenant, TenantError> {
    let err = |m: String| TenantError::Tenant(s.name.clone(), m);
    if s.name.is_empty() || s.name.contains(['/', ' ']) {
        return Err(err("name must be a non-empty word".into()));
    }
    let socket_mode = match &s.socket_mode {
        None => 0o600,
        Some(m) => {
            parse_mode(m).ok_or_else(|| err(format!("socket_mode {m:?} is not an octal mode")))?
        }
    };
    let socket_owner = s
        .socket_owner
        .as_deref()
        .map(|o| parse_owner(o).ok_or_else(|| err(format!("socket_owner {o:?} is not UID:GID"))))
        .transpose()?;
    for c in &s.controllers {
        if !controllers.iter().any(|v| &v.name == c) {
            return Err(err(format!("no controller {c:?}")));
        }
    }
    for l in &s.luns {
        let found = controllers
            .iter()
            .find(|v| v.name == l.controller)
            .is_some_and(|v| v.luns.iter().any(|x| x.lun == l.lun));
        if !found {
            return Err(err(format!(
                "no LUN {} on controller {:?}",
                l.lun, l.controller
            )));
        }
    }
    for n in &s.nics {
        let found = switches
            .iter()
            .find(|v| v.name == n.switch)
            .and_then(|v| v.ports.iter().find(|p| p.name == n.port))
            .is_some_and(|p| p.is_nic());
        if !found {
            return Err(err(format!(
                "no netvsp port {:?} on switch {:?}",
                n.port, n.switch
            )));
        }
    }
    s.ic.validate().map_err(|e| err(format!("ic: {e}")))?;
    s.limits.validate().map_err(err)?;
    Ok(ValidTenant {
        name: s.name.clone(),
        socket: s.socket.as_ref().map(|p| base.join(p)),
        socket_mode,
        socket_owner,
        allow_uids: s.allow_uids.clone(),
        allow_gids: s.allow_gids.clone(),
        owns: Ownership {
            controllers: s.controllers.iter().cloned().collect(),
            luns: s.luns.iter().cloned().collect(),
            nics: s.nics.iter().cloned().collect(),
        },
        limits: s.limits.clone(),
        ic: s.ic.clone(),
    })
}

/// A socket file's owner, `UID:GID`.
pub fn parse_owner(s: &str) -> Option<(u32, u32)> {
    let (u, g) = s.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// A socket file's mode in octal (`0660`, `0o660`), at most 0777.
pub fn parse_mode(m: &str) -> Option<u32> {
    u32::from_str_radix(m.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
}

/// A writable LUN or a NIC belongs to one tenant at most.
pub(crate) fn check_exclusive(
    tenants: &[ValidTenant],
    controllers: &[ValidController],
) -> Result<(), TenantError> {
    let mut lun_owner: BTreeMap<(String, u8), &str> = BTreeMap::new();
    for t in tenants {
        for c in controllers {
            for l in &c.luns {
                if !t.owns.owns_lun(&c.name, l.lun) || is_read_only(&l.kind) {
                    continue;
                }
                if let Some(a) = lun_owner.insert((c.name.clone(), l.lun), &t.name) {
                    return Err(TenantError::SharedWritable {
                        controller: c.name.clone(),
                        lun: l.lun,
                        a: a.to_string(),
                        b: t.name.clone(),
                    });
                }
            }
        }
    }
    let mut nic_owner: BTreeMap<&NicRef, &str> = BTreeMap::new();
    for t in tenants {
        for n in &t.owns.nics {
            if let Some(a) = nic_owner.insert(n, &t.name) {
                return Err(TenantError::SharedNic {
                    switch: n.switch.clone(),
                    port: n.port.clone(),
                    a: a.to_string(),
                    b: t.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// DVD drives and read-only disks may be shared between tenants.
pub fn is_read_only(kind: &LunKind) -> bool {
    match kind {
        LunKind::Dvd(_) => true,
        LunKind::Disk(image) => image.read_only,
    }
}

/// Devices no tenant owns (they are never offered), for a warning.
pub fn unowned(
    tenants: &[ValidTenant],
    controllers: &[ValidController],
    switches: &[ValidSwitch],
) -> Vec<String> {
    let mut out = Vec::new();
    for c in controllers {
        for l in &c.luns {
            if !tenants.iter().any(|t| t.owns.owns_lun(&c.name, l.lun)) {
                out.push(format!("controller {} LUN {}", c.name, l.lun));
            }
        }
    }
    for s in switches {
        for p in s.ports.iter().filter(|p| p.is_nic()) {
            if !tenants.iter().any(|t| t.owns.owns_nic(&s.name, &p.name)) {
                out.push(format!("NIC {}:{}", s.name, p.name));
            }
        }
    }
    out
}

/// A differencing disk's parent can never be a disk of another tenant: for
/// every LUN image, the images of LUNs that none of its owners own go on
/// its parent deny-list (`vhd::ParentPolicy::denied`).
pub fn deny_foreign_parents(controllers: &mut [ValidController], tenants: &[ValidTenant]) {
    let owners = |c: &str, n: u8| -> BTreeSet<&str> {
        tenants
            .iter()
            .filter(|t| t.owns.owns_lun(c, n))
            .map(|t| t.name.as_str())
            .collect()
    };
    let mut images: Vec<(PathBuf, BTreeSet<String>)> = Vec::new();
    for c in controllers.iter() {
        for l in &c.luns {
            if let Some(image) = image_of(&l.kind) {
                let who = owners(&c.name, l.lun)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                images.push((image.path.clone(), who));
            }
        }
    }
    for c in controllers.iter_mut() {
        for l in &mut c.luns {
            let mine: BTreeSet<String> = tenants
                .iter()
                .filter(|t| t.owns.owns_lun(&c.name, l.lun))
                .map(|t| t.name.clone())
                .collect();
            let Some(image) = image_of_mut(&mut l.kind) else {
                continue;
            };
            image.parents.denied = images
                .iter()
                .filter(|(path, who)| *path != image.path && who.is_disjoint(&mine))
                .map(|(path, _)| path.clone())
                .collect();
        }
    }
}

fn image_of(kind: &LunKind) -> Option<&storage::config::ImageSpec> {
    match kind {
        LunKind::Disk(i) => Some(i),
        LunKind::Dvd(m) => m.as_ref(),
    }
}

fn image_of_mut(kind: &mut LunKind) -> Option<&mut storage::config::ImageSpec> {
    match kind {
        LunKind::Disk(i) => Some(i),
        LunKind::Dvd(m) => m.as_mut(),
    }
}
