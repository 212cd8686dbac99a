//! Runtime overrides: changes made through the control API, kept on top of
//! the configuration file.
//!
//! The rule: the file is the desired state; every change made through the
//! API is an override of it, listed as such (`GET /v1/overrides`). A
//! SIGHUP reload reads the new file and applies the overrides on top of it
//! again, in the order they were made; an override that no longer fits the
//! new file (its controller or switch is gone, the file now defines the
//! same LUN or port itself) is dropped and reported. Dropping overrides
//! (`DELETE /v1/overrides[/ID]`) brings the appliance back to the file.
//!
//! An override is a typed edit of a [`ValidConfig`]: [`Override::apply_to`]
//! turns what runs into what is wanted, and the appliance gets there with
//! the same plans and the same apply code as a reload
//! (`storage::config::plan`, `switch::config::plan`). A link state is not
//! in the file; its override is applied to the NIC after each plan.
//!
//! Removing an override's own addition cancels the addition rather than
//! recording a removal, so the list says what differs from the file.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::SystemTime;

use storage::config::{ControllerSpec, ImageSpec, LunKind, LunSpec, ValidController, ValidLun};
use switch::config::{PortConfig, PortKind, SwitchConfig, ValidPort};

use crate::config::ValidConfig;
use crate::tenant::{LunRef, NicRef, ValidTenant};

/// One change of what runs, as the API asked for it (validated).
#[derive(Debug, Clone, PartialEq)]
pub enum Override {
    /// A controller with its LUNs, owned whole by `tenant`.
    AddController {
        spec: ValidController,
        tenant: Option<String>,
    },
    RemoveController {
        name: String,
    },
    /// A LUN; `tenant` is granted it unless it owns the controller whole.
    AddLun {
        controller: String,
        lun: ValidLun,
        tenant: Option<String>,
    },
    RemoveLun {
        controller: String,
        lun: u8,
    },
    /// DVD media inserted (Some) or ejected (None).
    Media {
        controller: String,
        lun: u8,
        media: Option<ImageSpec>,
    },
    /// A port; a guest NIC is offered to `tenant`.
    AddPort {
        switch: String,
        port: ValidPort,
        tenant: Option<String>,
    },
    RemovePort {
        switch: String,
        port: String,
    },
    /// A guest NIC's virtual cable.
    Link {
        switch: String,
        port: String,
        up: bool,
    },
}

/// Why a change cannot be made; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    NotFound(String),
    /// Conflicts with what runs (a name or number in use, a device in use).
    #[error("{0}")]
    Conflict(String),
    /// A value that does not validate.
    #[error("{0}")]
    Invalid(String),
    /// Validated, but applying it failed (an image that cannot be opened,
    /// a tap that cannot be created); what ran before still runs.
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, ChangeError>;

fn not_found(what: String) -> ChangeError {
    ChangeError::NotFound(what)
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owner = |t: &Option<String>| t.as_ref().map(|t| format!(" for tenant {t}"));
        match self {
            Override::AddController { spec, tenant } => write!(
                f,
                "controller {} added{}",
                spec.name,
                owner(tenant).unwrap_or_default()
            ),
            Override::RemoveController { name } => write!(f, "controller {name} removed"),
            Override::AddLun {
                controller,
                lun,
                tenant,
            } => write!(
                f,
                "{controller}: LUN {} added{}",
                lun.lun,
                owner(tenant).unwrap_or_default()
            ),
            Override::RemoveLun { controller, lun } => write!(f, "{controller}: LUN {lun} removed"),
            Override::Media {
                controller,
                lun,
                media: Some(m),
            } => write!(f, "{controller}: LUN {lun} media {}", m.path.display()),
            Override::Media {
                controller,
                lun,
                media: None,
            } => write!(f, "{controller}: LUN {lun} media ejected"),
            Override::AddPort {
                switch,
                port,
                tenant,
            } => write!(
                f,
                "port {} added to switch {switch}{}",
                port.name,
                owner(tenant).unwrap_or_default()
            ),
            Override::RemovePort { switch, port } => {
                write!(f, "port {port} removed from switch {switch}")
            }
            Override::Link { switch, port, up } => write!(
                f,
                "NIC {switch}:{port} link {}",
                if *up { "up" } else { "down" }
            ),
        }
    }
}

impl Override {
    /// Edits `cfg` (what runs, or the file) into what this override wants;
    /// `cfg` is unchanged on error.
    pub fn apply_to(&self, cfg: &mut ValidConfig) -> Result<()> {
        let mut next = cfg.clone();
        self.edit(&mut next)?;
        crate::tenant::check_exclusive(&next.tenants, &next.controllers)
            .map_err(|e| ChangeError::Conflict(e.to_string()))?;
        *cfg = next;
        Ok(())
    }

    fn edit(&self, cfg: &mut ValidConfig) -> Result<()> {
        match self {
            Override::AddController { spec, tenant } => add_controller(cfg, spec, tenant),
            Override::RemoveController { name } => remove_controller(cfg, name),
            Override::AddLun {
                controller,
                lun,
                tenant,
            } => add_lun(cfg, controller, lun, tenant),
            Override::RemoveLun { controller, lun } => remove_lun(cfg, controller, *lun),
            Override::Media {
                controller,
                lun,
                media,
            } => {
                let l = find_lun(cfg, controller, *lun)?;
                if !matches!(l.kind, LunKind::Dvd(_)) {
                    return Err(ChangeError::Conflict(format!(
                        "controller {controller:?} LUN {lun} is not a DVD drive"
                    )));
                }
                l.kind = LunKind::Dvd(media.clone());
                Ok(())
            }
            Override::AddPort {
                switch,
                port,
                tenant,
            } => add_port(cfg, switch, port, tenant),
            Override::RemovePort { switch, port } => remove_port(cfg, switch, port),
            Override::Link { switch, port, .. } => {
                let p = find_port(cfg, switch, port)?;
                if !p.is_nic() {
                    return Err(ChangeError::Conflict(format!(
                        "port {port:?} of switch {switch:?} is not a guest NIC"
                    )));
                }
                Ok(())
            }
        }
    }

    /// What the override is about, for cancelling and replacing.
    fn subject(&self) -> Subject {
        match self {
            Override::AddController { spec, .. } => Subject::Controller(spec.name.clone()),
            Override::RemoveController { name } => Subject::Controller(name.clone()),
            Override::AddLun {
                controller, lun, ..
            } => Subject::Lun(controller.clone(), lun.lun),
            Override::RemoveLun { controller, lun }
            | Override::Media {
                controller, lun, ..
            } => Subject::Lun(controller.clone(), *lun),
            Override::AddPort { switch, port, .. } => {
                Subject::Port(switch.clone(), port.name.clone())
            }
            Override::RemovePort { switch, port } | Override::Link { switch, port, .. } => {
                Subject::Port(switch.clone(), port.clone())
            }
        }
    }

    fn is_addition(&self) -> bool {
        matches!(
            self,
            Override::AddController { .. } | Override::AddLun { .. } | Override::AddPort { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    Controller(String),
    Lun(String, u8),
    Port(String, String),
}

impl Subject {
    /// Whether `self` is `other` or part of it (a LUN of a controller).
    fn within(&self, other: &Subject) -> bool {
        match (self, other) {
            (Subject::Lun(c, _), Subject::Controller(o)) => c == o,
            _ => self == other,
        }
    }
}

/// One recorded override.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: u64,
    pub since: SystemTime,
    pub change: Override,
}

/// The overrides in force, oldest first.
#[derive(Debug, Default)]
pub struct Overrides {
    next: u64,
    entries: Vec<Entry>,
}

impl Overrides {
    pub fn list(&self) -> &[Entry] {
        &self.entries
    }

    /// Records an override that was applied. A removal of something an
    /// override added cancels that addition (and what followed it on the
    /// same device); a media or link change replaces the previous one.
    pub fn record(&mut self, change: Override) {
        let subject = change.subject();
        let removal = matches!(
            change,
            Override::RemoveController { .. }
                | Override::RemoveLun { .. }
                | Override::RemovePort { .. }
        );
        if removal {
            let added = self
                .entries
                .iter()
                .any(|e| e.change.is_addition() && e.change.subject() == subject);
            self.entries
                .retain(|e| !e.change.subject().within(&subject));
            if added {
                return;
            }
        } else if matches!(change, Override::Media { .. } | Override::Link { .. }) {
            self.entries.retain(|e| {
                std::mem::discriminant(&e.change) != std::mem::discriminant(&change)
                    || e.change.subject() != subject
            });
        }
        self.next += 1;
        self.entries.push(Entry {
            id: self.next,
            since: SystemTime::now(),
            change,
        });
    }

    /// Takes override `id` out of the list.
    pub fn remove(&mut self, id: u64) -> Option<Entry> {
        let i = self.entries.iter().position(|e| e.id == id)?;
        Some(self.entries.remove(i))
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// `file` with every override applied in order. Overrides that no
    /// longer fit are taken out of the list and returned with the reason.
    pub fn overlay(&mut self, file: &ValidConfig) -> (ValidConfig, Vec<(Entry, String)>) {
        let mut cfg = file.clone();
        let mut dropped = Vec::new();
        let mut kept = Vec::new();
        for e in self.entries.drain(..) {
            match e.change.apply_to(&mut cfg) {
                Ok(()) => kept.push(e),
                Err(why) => dropped.push((e, why.to_string())),
            }
        }
        self.entries = kept;
        (cfg, dropped)
    }

    /// The link overrides, to apply after a plan.
    pub fn links(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.entries.iter().filter_map(|e| match &e.change {
            Override::Link { switch, port, up } => Some((switch.as_str(), port.as_str(), *up)),
            _ => None,
        })
    }
}

/// A `[[controller]]` table from the API, validated like the file's.
pub fn controller_from_spec(spec: &ControllerSpec, base: &Path) -> Result<ValidController> {
    let mut v = storage::config::validate(std::slice::from_ref(spec), base)
        .map_err(|e| ChangeError::Invalid(e.to_string()))?;
    Ok(v.remove(0))
}

/// A `[[controller.lun]]` table from the API for controller `controller`,
/// validated like the file's.
pub fn lun_from_spec(controller: &str, spec: &LunSpec, base: &Path) -> Result<ValidLun> {
    let c = ControllerSpec {
        name: controller.to_string(),
        instance: None,
        subchannels: 0,
        queue_depth: 1,
        cpus: Vec::new(),
        luns: vec![spec.clone()],
    };
    Ok(controller_from_spec(&c, base)?.luns.remove(0))
}

/// A `[[switch.port]]` table from the API for running switch `switch` of
/// `cfg`, validated by `switch::config::validate` as part of that switch
/// (the switch's other ports stand in as names, for mirror targets).
pub fn port_from_spec(
    cfg: &ValidConfig,
    switch: &str,
    spec: &PortConfig,
    base: &Path,
) -> Result<ValidPort> {
    let sw = find_switch(cfg, switch)?;
    if sw.ports.iter().any(|p| p.name == spec.name) {
        return Err(ChangeError::Conflict(format!(
            "switch {switch:?} already has a port {:?}",
            spec.name
        )));
    }
    let mut ports: Vec<PortConfig> = sw
        .ports
        .iter()
        .map(|p| stand_in(&p.name))
        .collect::<Result<_>>()?;
    ports.push(spec.clone());
    let table = serde_json::json!({ "name": switch });
    let mut config: SwitchConfig =
        serde_json::from_value(table).map_err(|e| ChangeError::Failed(e.to_string()))?;
    config.ports = ports;
    let mut valid = switch::config::validate(&[config], base)
        .map_err(|e| ChangeError::Invalid(e.to_string()))?;
    let port = valid.remove(0).ports.pop().expect("the new port is last");
    check_unique_port(cfg, &port)?;
    Ok(port)
}

/// A port that only carries a name (a pcap sink passes every check).
fn stand_in(name: &str) -> Result<PortConfig> {
    serde_json::from_value(serde_json::json!({ "name": name, "pcap": { "path": "/dev/null" } }))
        .map_err(|e| ChangeError::Failed(e.to_string()))
}

/// Taps and NIC instances are unique across switches.
fn check_unique_port(cfg: &ValidConfig, port: &ValidPort) -> Result<()> {
    for s in &cfg.switches {
        for p in &s.ports {
            let clash = match (&p.kind, &port.kind) {
                (PortKind::Tap(a), PortKind::Tap(b)) => a.ifname == b.ifname,
                (PortKind::Netvsp(a), PortKind::Netvsp(b)) => a.instance == b.instance,
                _ => false,
            };
            if clash {
                return Err(ChangeError::Conflict(format!(
                    "port {:?} of switch {:?} already uses that {}",
                    p.name,
                    s.name,
                    if port.is_nic() { "instance" } else { "tap" }
                )));
            }
        }
    }
    Ok(())
}

fn find_controller<'a>(cfg: &'a mut ValidConfig, name: &str) -> Result<&'a mut ValidController> {
    cfg.controllers
        .iter_mut()
        .find(|c| c.name == name)
        .ok_or_else(|| not_found(format!("no controller {name:?}")))
}

fn find_lun<'a>(cfg: &'a mut ValidConfig, controller: &str, lun: u8) -> Result<&'a mut ValidLun> {
    find_controller(cfg, controller)?
        .luns
        .iter_mut()
        .find(|l| l.lun == lun)
        .ok_or_else(|| not_found(format!("controller {controller:?} has no LUN {lun}")))
}

fn find_switch<'a>(cfg: &'a ValidConfig, name: &str) -> Result<&'a switch::config::ValidSwitch> {
    cfg.switches
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| not_found(format!("no switch {name:?}")))
}

fn find_port<'a>(cfg: &'a ValidConfig, switch: &str, port: &str) -> Result<&'a ValidPort> {
    find_switch(cfg, switch)?
        .ports
        .iter()
        .find(|p| p.name == port)
        .ok_or_else(|| not_found(format!("switch {switch:?} has no port {port:?}")))
}

fn tenant_mut<'a>(cfg: &'a mut ValidConfig, name: &str) -> Result<&'a mut ValidTenant> {
    cfg.tenants
        .iter_mut()
        .find(|t| t.name == name)
        .ok_or_else(|| not_found(format!("no tenant {name:?}")))
}

/// The tenant a new device goes to: the one named, or the only one.
fn owner(cfg: &ValidConfig, named: &Option<String>) -> Result<String> {
    match named {
        Some(t) if cfg.tenants.iter().any(|x| &x.name == t) => Ok(t.clone()),
        Some(t) => Err(not_found(format!("no tenant {t:?}"))),
        None if cfg.tenants.len() == 1 => Ok(cfg.tenants[0].name.clone()),
        None => Err(ChangeError::Invalid(
            "the appliance has several tenants: name one with \"tenant\"".into(),
        )),
    }
}

/// Whether an NBD export serves LUN `lun` of `controller` (any LUN: None).
fn exported(cfg: &ValidConfig, controller: &str, lun: Option<u8>) -> Option<String> {
    cfg.nbd.iter().find_map(|s| {
        s.exports.iter().find_map(|e| {
            let l = e.lun.as_ref()?;
            (l.controller == controller && lun.is_none_or(|n| n == l.lun))
                .then(|| format!("NBD export {:?} serves it", e.name))
        })
    })
}

fn add_controller(
    cfg: &mut ValidConfig,
    spec: &ValidController,
    tenant: &Option<String>,
) -> Result<()> {
    if cfg.controllers.iter().any(|c| c.name == spec.name) {
        return Err(ChangeError::Conflict(format!(
            "controller {:?} already exists",
            spec.name
        )));
    }
    if let Some(c) = cfg
        .controllers
        .iter()
        .find(|c| c.settings.instance == spec.settings.instance)
    {
        return Err(ChangeError::Conflict(format!(
            "controller {:?} already uses instance {}",
            c.name, spec.settings.instance
        )));
    }
    let owner = owner(cfg, tenant)?;
    cfg.controllers.push(spec.clone());
    tenant_mut(cfg, &owner)?
        .owns
        .controllers
        .insert(spec.name.clone());
    let luns: Vec<u8> = spec.luns.iter().map(|l| l.lun).collect();
    deny_foreign(cfg, &spec.name, &luns);
    Ok(())
}

fn remove_controller(cfg: &mut ValidConfig, name: &str) -> Result<()> {
    find_controller(cfg, name)?;
    if let Some(why) = exported(cfg, name, None) {
        return Err(ChangeError::Conflict(format!(
            "controller {name:?} is in use: {why}"
        )));
    }
    cfg.controllers.retain(|c| c.name != name);
    for t in &mut cfg.tenants {
        t.owns.controllers.remove(name);
        t.owns.luns.retain(|l| l.controller != name);
    }
    Ok(())
}

fn add_lun(
    cfg: &mut ValidConfig,
    controller: &str,
    lun: &ValidLun,
    tenant: &Option<String>,
) -> Result<()> {
    let c = find_controller(cfg, controller)?;
    if c.luns.iter().any(|l| l.lun == lun.lun) {
        return Err(ChangeError::Conflict(format!(
            "controller {controller:?} already has LUN {}",
            lun.lun
        )));
    }
    let whole = cfg
        .tenants
        .iter()
        .find(|t| t.owns.controllers.contains(controller))
        .map(|t| t.name.clone());
    let owner = match (tenant, whole) {
        (None, Some(w)) => w,
        (t, _) => owner(cfg, t)?,
    };
    let c = find_controller(cfg, controller)?;
    c.luns.push(lun.clone());
    c.luns.sort_by_key(|l| l.lun);
    let t = tenant_mut(cfg, &owner)?;
    if !t.owns.controllers.contains(controller) {
        t.owns.luns.insert(LunRef {
            controller: controller.to_string(),
            lun: lun.lun,
        });
    }
    deny_foreign(cfg, controller, &[lun.lun]);
    Ok(())
}

fn remove_lun(cfg: &mut ValidConfig, controller: &str, lun: u8) -> Result<()> {
    find_lun(cfg, controller, lun)?;
    if let Some(why) = exported(cfg, controller, Some(lun)) {
        return Err(ChangeError::Conflict(format!(
            "controller {controller:?} LUN {lun} is in use: {why}"
        )));
    }
    find_controller(cfg, controller)?
        .luns
        .retain(|l| l.lun != lun);
    for t in &mut cfg.tenants {
        t.owns.luns.remove(&LunRef {
            controller: controller.to_string(),
            lun,
        });
    }
    Ok(())
}

/// Fills the parent deny-lists of LUNs `luns` of `controller` (the images
/// of every LUN their owners do not own), leaving the other LUNs as they
/// are: their parents are open already, and a changed value would replace
/// them.
fn deny_foreign(cfg: &mut ValidConfig, controller: &str, luns: &[u8]) {
    let mut all = cfg.controllers.clone();
    crate::tenant::deny_foreign_parents(&mut all, &cfg.tenants);
    let denied = all.into_iter().find(|c| c.name == controller);
    let (Some(denied), Ok(c)) = (denied, find_controller(cfg, controller)) else {
        return;
    };
    for l in c.luns.iter_mut().filter(|l| luns.contains(&l.lun)) {
        if let Some(d) = denied.luns.iter().find(|d| d.lun == l.lun) {
            *l = d.clone();
        }
    }
}

fn add_port(
    cfg: &mut ValidConfig,
    switch: &str,
    port: &ValidPort,
    tenant: &Option<String>,
) -> Result<()> {
    let sw = find_switch(cfg, switch)?;
    if sw.ports.iter().any(|p| p.name == port.name) {
        return Err(ChangeError::Conflict(format!(
            "switch {switch:?} already has a port {:?}",
            port.name
        )));
    }
    if sw.ports.len() >= switch::MAX_PORTS {
        return Err(ChangeError::Conflict(format!(
            "switch {switch:?} has {} ports already",
            switch::MAX_PORTS
        )));
    }
    check_unique_port(cfg, port)?;
    let owner = match (port.is_nic(), tenant) {
        (true, t) => Some(owner(cfg, t)?),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ChangeError::Invalid(
                "only netvsp ports (guest NICs) belong to a tenant".into(),
            ));
        }
    };
    let sw = cfg
        .switches
        .iter_mut()
        .find(|s| s.name == switch)
        .expect("found above");
    sw.ports.push(port.clone());
    if let Some(o) = owner {
        tenant_mut(cfg, &o)?.owns.nics.insert(NicRef {
            switch: switch.to_string(),
            port: port.name.clone(),
        });
    }
    Ok(())
}

fn remove_port(cfg: &mut ValidConfig, switch: &str, port: &str) -> Result<()> {
    let sw = find_switch(cfg, switch)?;
    find_port(cfg, switch, port)?;
    let mirrors: BTreeSet<&str> = sw
        .ports
        .iter()
        .filter(|p| p.policy.mirror.as_deref() == Some(port))
        .map(|p| p.name.as_str())
        .collect();
    if !mirrors.is_empty() {
        return Err(ChangeError::Conflict(format!(
            "ports {mirrors:?} of switch {switch:?} mirror to {port:?}"
        )));
    }
    let sw = cfg
        .switches
        .iter_mut()
        .find(|s| s.name == switch)
        .expect("found above");
    sw.ports.retain(|p| p.name != port);
    for t in &mut cfg.tenants {
        t.owns.nics.remove(&NicRef {
            switch: switch.to_string(),
            port: port.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[[controller]]\nname = \"scsi0\"\n\n[[controller.lun]]\nlun = 0\npath = \"a.img\"\n\n\
        [[controller.lun]]\nlun = 1\ndvd = true\n\n\
        [[switch]]\nname = \"sw0\"\n\n[[switch.port]]\nname = \"p0\"\npcap = { path = \"p0.pcap\" }\n";

    fn file(text: &str) -> ValidConfig {
        ValidConfig::from_toml(text, Path::new("/srv")).unwrap()
    }

    fn add_lun(n: u8) -> Override {
        let spec: LunSpec = toml::from_str(&format!("lun = {n}\npath = \"b.img\"")).unwrap();
        Override::AddLun {
            controller: "scsi0".into(),
            lun: lun_from_spec("scsi0", &spec, Path::new("/srv")).unwrap(),
            tenant: None,
        }
    }

    fn luns(cfg: &ValidConfig) -> Vec<u8> {
        cfg.controllers[0].luns.iter().map(|l| l.lun).collect()
    }

    #[test]
    fn changes_edit_a_copy_and_refuse_clearly() {
        let mut cfg = file(FILE);
        add_lun(2).apply_to(&mut cfg).unwrap();
        assert_eq!(luns(&cfg), [0, 1, 2]);
        assert!(cfg.tenants[0].owns.owns_lun("scsi0", 2));
        let before = cfg.clone();
        let refused = [
            (add_lun(2), "already has LUN 2"),
            (
                Override::RemoveLun {
                    controller: "scsi0".into(),
                    lun: 9,
                },
                "no LUN 9",
            ),
            (
                Override::Media {
                    controller: "scsi0".into(),
                    lun: 0,
                    media: None,
                },
                "not a DVD drive",
            ),
            (
                Override::Link {
                    switch: "sw0".into(),
                    port: "p0".into(),
                    up: false,
                },
                "not a guest NIC",
            ),
            (
                Override::RemovePort {
                    switch: "sw1".into(),
                    port: "p0".into(),
                },
                "no switch",
            ),
        ];
        for (o, why) in refused {
            let e = o.apply_to(&mut cfg).unwrap_err();
            assert!(e.to_string().contains(why), "{o}: {e}");
            assert_eq!(luns(&cfg), luns(&before), "{o} changed the config");
        }
    }

    #[test]
    fn removals_cancel_additions_and_reloads_drop_what_no_longer_fits() {
        let mut o = Overrides::default();
        o.record(add_lun(2));
        o.record(add_lun(3));
        o.record(Override::RemoveLun {
            controller: "scsi0".into(),
            lun: 2,
        });
        let kinds: Vec<String> = o.list().iter().map(|e| e.change.to_string()).collect();
        assert_eq!(kinds, ["scsi0: LUN 3 added"]);
        o.record(Override::RemoveLun {
            controller: "scsi0".into(),
            lun: 0,
        });
        assert_eq!(o.list().len(), 2, "a removal from the file is an override");

        let (cfg, dropped) = o.overlay(&file(FILE));
        assert_eq!(luns(&cfg), [1, 3]);
        assert!(dropped.is_empty());
        // The new file defines LUN 3 itself and has no LUN 0: both
        // overrides no longer fit and are dropped, with the reason.
        let next = FILE.replace("lun = 0\npath = \"a.img\"", "lun = 3\npath = \"c.img\"");
        let (cfg, dropped) = o.overlay(&file(&next));
        assert_eq!(luns(&cfg), [1, 3]);
        assert_eq!(
            cfg.controllers[0].luns[1].kind,
            file(&next).controllers[0].luns[1].kind
        );
        let why: Vec<&str> = dropped.iter().map(|(_, w)| w.as_str()).collect();
        assert!(why[0].contains("already has LUN 3"), "{why:?}");
        assert!(why[1].contains("no LUN 0"), "{why:?}");
        assert!(o.list().is_empty());
    }
}
