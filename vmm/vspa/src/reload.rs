//! Reload: the subsystems' typed plans from what runs to what the new
//! configuration wants, applied change by change, with a structured report
//! of what was applied, what failed and why, and what waits for a
//! restart. A change that fails leaves what runs as it was for that
//! change, so the next reload plans it again.
//!
//! Three phases: storage (controllers and LUNs, seen by the tenants that
//! own them now), switches (ports; new NICs offered to their owners now),
//! then tenants: new tenants get a registry (and a socket), every device
//! moves to the tenants that own it in the new file (revoked from one,
//! granted to the other: a LUN leaves one view and joins another, a NIC
//! is rescinded from one registry and offered in the other), and tenants
//! that are gone are closed. A tenant's own settings (socket, peers,
//! limits, integration services) wait for a restart.
//!
//! The control API's changes ([`Appliance::change`]) are edits of what
//! runs ([`Override`]) brought about by the same apply code; a reload
//! applies the file with the overrides on top (see [`crate::overrides`]).

use std::sync::Arc;

use storage::config::{StorageChange, StorageRestart};
use switch::config::{PortChange, SwitchRestart};

use crate::appliance::{Appliance, RunningController, new_view};
use crate::config::ValidConfig;
use crate::overrides::{ChangeError, Override};
use crate::tenant::{Ownership, ValidTenant};

/// One change a reload made or tried.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Storage(StorageChange),
    Switch(PortChange),
    Tenant(TenantChange),
    /// A guest NIC's virtual cable connected or disconnected.
    Link {
        switch: String,
        port: String,
        up: bool,
    },
}

/// A change of who owns what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantChange {
    Added(String),
    Removed(String),
    /// A LUN joins tenant `tenant`'s view of `controller`.
    GrantLun {
        tenant: String,
        controller: String,
        lun: u8,
    },
    RevokeLun {
        tenant: String,
        controller: String,
        lun: u8,
    },
    GrantNic {
        tenant: String,
        switch: String,
        port: String,
    },
    RevokeNic {
        tenant: String,
        switch: String,
        port: String,
    },
}

/// A change that waits for a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    Storage(StorageRestart),
    Switch(SwitchRestart),
    /// Socket, peers, limits or integration services of a running tenant.
    TenantSettings(String),
    /// The `[[nbd]]` tables.
    Nbd,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Storage(c) => c.fmt(f),
            Change::Switch(c) => c.fmt(f),
            Change::Tenant(c) => c.fmt(f),
            Change::Link { switch, port, up } => write!(
                f,
                "NIC {switch}:{port} link {}",
                if *up { "up" } else { "down" }
            ),
        }
    }
}

impl std::fmt::Display for TenantChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TenantChange::Added(t) => write!(f, "tenant {t} added"),
            TenantChange::Removed(t) => write!(f, "tenant {t} removed"),
            TenantChange::GrantLun {
                tenant,
                controller,
                lun,
            } => write!(f, "tenant {tenant} gets {controller} LUN {lun}"),
            TenantChange::RevokeLun {
                tenant,
                controller,
                lun,
            } => write!(f, "tenant {tenant} loses {controller} LUN {lun}"),
            TenantChange::GrantNic {
                tenant,
                switch,
                port,
            } => write!(f, "tenant {tenant} gets NIC {switch}:{port}"),
            TenantChange::RevokeNic {
                tenant,
                switch,
                port,
            } => write!(f, "tenant {tenant} loses NIC {switch}:{port}"),
        }
    }
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restart::Storage(r) => r.fmt(f),
            Restart::Switch(r) => r.fmt(f),
            Restart::Nbd => write!(f, "the [[nbd]] servers changed"),
            Restart::TenantSettings(t) => write!(
                f,
                "settings of tenant {t} (socket, peers, limits, integration services) changed"
            ),
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadReport {
    pub applied: Vec<Change>,
    /// Changes that could not be made, with the reason.
    pub failed: Vec<(Change, String)>,
    pub needs_restart: Vec<Restart>,
    /// Runtime overrides that no longer fit the file, with the reason.
    pub dropped: Vec<(Override, String)>,
}

impl ReloadReport {
    /// True when the configuration already ran as it is.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
            && self.failed.is_empty()
            && self.needs_restart.is_empty()
            && self.dropped.is_empty()
    }

    /// Logs the report, a line per change.
    pub fn log(&self) {
        for c in &self.applied {
            tracing::info!("reload: {c}");
        }
        for (c, why) in &self.failed {
            tracing::error!("reload: {c} failed: {why}");
        }
        for r in &self.needs_restart {
            tracing::warn!("reload: {r}: takes effect after a restart");
        }
        for (o, why) in &self.dropped {
            tracing::warn!("reload: runtime override dropped ({o}): {why}");
        }
        tracing::info!(
            applied = self.applied.len(),
            failed = self.failed.len(),
            needs_restart = self.needs_restart.len(),
            "configuration reloaded"
        );
    }

    fn record(&mut self, change: Change, result: Result<(), String>) {
        match result {
            Ok(()) => self.applied.push(change),
            Err(why) => self.failed.push((change, why)),
        }
    }
}

impl Appliance {
    /// Makes `file` the desired state and brings the appliance to it with
    /// the runtime overrides on top: controllers and guest NICs offered
    /// and rescinded over VMBus, LUNs hot-added and removed, DVD media
    /// changed, switch ports added and removed, devices moved between
    /// tenants, tenants added and removed. Settings of running controllers,
    /// switches and tenants wait for a restart; overrides that no longer
    /// fit the file are dropped.
    pub fn reload(&mut self, file: &ValidConfig) -> ReloadReport {
        self.file = file.clone();
        self.follow_file()
    }

    /// Makes one change through the reload's plans and apply code and
    /// records it as a runtime override. Nothing changes on error: a
    /// change that fails while being applied is rolled back.
    pub fn change(&mut self, change: Override) -> Result<ReloadReport, ChangeError> {
        let before = self.running();
        let mut target = before.clone();
        change.apply_to(&mut target)?;
        if let Override::Link { .. } = change {
            self.overrides.record(change);
            let mut report = ReloadReport::default();
            self.sync_links(&mut report);
            return Ok(report);
        }
        let report = self.apply(&target);
        if !report.failed.is_empty() {
            let why: Vec<String> = report.failed.iter().map(|(_, w)| w.clone()).collect();
            let undo = self.apply(&before);
            for (c, w) in &undo.failed {
                tracing::error!("rolling back a failed API change: {c} failed: {w}");
            }
            return Err(ChangeError::Failed(why.join("; ")));
        }
        self.overrides.record(change);
        Ok(report)
    }

    /// Drops runtime override `id` (all of them: None) and brings the
    /// appliance back to the file with the remaining overrides.
    pub fn drop_overrides(&mut self, id: Option<u64>) -> Result<ReloadReport, ChangeError> {
        match id {
            Some(id) => {
                self.overrides
                    .remove(id)
                    .ok_or_else(|| ChangeError::NotFound(format!("no override {id}")))?;
            }
            None => self.overrides.clear(),
        }
        Ok(self.follow_file())
    }

    /// The runtime overrides in force.
    pub fn overrides(&self) -> &[crate::overrides::Entry] {
        self.overrides.list()
    }

    /// Applies the file with the overrides that still fit on top.
    fn follow_file(&mut self) -> ReloadReport {
        let (target, dropped) = self.overrides.overlay(&self.file);
        let mut report = self.apply(&target);
        report.dropped = dropped.into_iter().map(|(e, w)| (e.change, w)).collect();
        report
    }

    /// Every guest NIC's link as its override says (up without one).
    fn sync_links(&mut self, report: &mut ReloadReport) {
        for n in &self.nics {
            let up = self
                .overrides
                .links()
                .find(|(s, p, _)| *s == n.switch && *p == n.port)
                .is_none_or(|(_, _, up)| up);
            if n.dev.link_up() != up {
                n.dev.set_link(up);
                report.applied.push(Change::Link {
                    switch: n.switch.clone(),
                    port: n.port.clone(),
                    up,
                });
            }
        }
    }

    /// Brings the appliance from what runs to `new` (the body of a reload
    /// and of an API change).
    fn apply(&mut self, new: &ValidConfig) -> ReloadReport {
        let mut report = ReloadReport::default();
        let running = self.running();
        let gone = self.begin_tenants(&new.tenants, &mut report);
        let storage = storage::config::plan(&running.controllers, &new.controllers);
        for change in storage.changes {
            let result = self.apply_storage(&change);
            report.record(Change::Storage(change), result);
        }
        let switches = switch::config::plan(&running.switches, &new.switches);
        for change in switches.ports {
            let result = self.apply_port(&change);
            report.record(Change::Switch(change), result);
        }
        report
            .needs_restart
            .extend(storage.restart.into_iter().map(Restart::Storage));
        report
            .needs_restart
            .extend(switches.restart.into_iter().map(Restart::Switch));
        self.reconcile_luns(&mut report);
        self.reconcile_nics(&mut report);
        if new.nbd != self.nbd_specs {
            report.needs_restart.push(Restart::Nbd);
        }
        for name in gone {
            self.close_tenant(&name);
            report
                .applied
                .push(Change::Tenant(TenantChange::Removed(name)));
        }
        if let Err(e) = self.start_servers() {
            report.failed.push((
                Change::Tenant(TenantChange::Added("(sockets)".into())),
                e.to_string(),
            ));
        }
        self.sync_links(&mut report);
        report
    }

    fn apply_storage(&mut self, change: &StorageChange) -> Result<(), String> {
        match change {
            StorageChange::AddController(spec) => {
                self.add_controller(spec).map_err(|e| e.to_string())
            }
            StorageChange::RemoveController(name) => {
                let i = self.controller_index(name)?;
                let rc = self.controllers.remove(i);
                for v in rc.views {
                    self.unoffer(&v.tenant, v.id);
                }
                Ok(())
            }
            _ => {
                let i = self.controller_index(change.controller())?;
                let owners = self.owners();
                let rc = &mut self.controllers[i];
                apply_lun_change(rc, change, &owners)?;
                follow(&mut rc.spec, change);
                Ok(())
            }
        }
    }

    fn controller_index(&self, name: &str) -> Result<usize, String> {
        self.controllers
            .iter()
            .position(|c| c.spec.name == name)
            .ok_or_else(|| format!("no running controller {name:?}"))
    }

    fn unoffer(&self, tenant: &str, id: vmbus::server::DeviceId) {
        if let Some(t) = self.tenant(tenant) {
            t.registry.remove(id);
        }
    }

    fn apply_port(&mut self, change: &PortChange) -> Result<(), String> {
        match change {
            PortChange::Remove { switch, port, .. } => {
                if self.remove_port(switch, port) {
                    Ok(())
                } else {
                    Err(format!("switch {switch:?} has no port {port:?}"))
                }
            }
            PortChange::Add { switch, port } => {
                let added = self
                    .runtime_mut()
                    .add_port(switch, port)
                    .map_err(|e| format!("{e}: {}", error_chain(&e)))?;
                if let Some(nic) = added {
                    self.add_nic(switch, nic);
                }
                Ok(())
            }
        }
    }

    /// Before the devices change: new tenants get their registry, every
    /// tenant takes its new ownership (applied to devices as they change,
    /// then to the rest by the reconcile steps), and tenants that are gone
    /// own nothing. Returns the gone tenants, closed at the end.
    fn begin_tenants(&mut self, wanted: &[ValidTenant], report: &mut ReloadReport) -> Vec<String> {
        for w in wanted {
            match self.tenants.iter().find(|t| t.spec.name == w.name) {
                Some(t) if settings_differ(&t.spec, w) => report
                    .needs_restart
                    .push(Restart::TenantSettings(w.name.clone())),
                Some(_) => {}
                None => {
                    let change = Change::Tenant(TenantChange::Added(w.name.clone()));
                    let result = self.add_tenant(w).map_err(|e| e.to_string());
                    report.record(change, result);
                }
            }
        }
        let mut gone = Vec::new();
        for t in &mut self.tenants {
            match wanted.iter().find(|w| w.name == t.spec.name) {
                Some(w) => t.spec.owns = w.owns.clone(),
                None => {
                    t.spec.owns = Default::default();
                    gone.push(t.spec.name.clone());
                }
            }
        }
        gone
    }

    /// Each tenant's ownership, by name.
    fn owners(&self) -> Vec<(String, Ownership)> {
        self.tenants
            .iter()
            .map(|t| (t.spec.name.clone(), t.spec.owns.clone()))
            .collect()
    }

    /// Every LUN in exactly the views of the tenants that own it now.
    fn reconcile_luns(&mut self, report: &mut ReloadReport) {
        let owners = self.owners();
        for ci in 0..self.controllers.len() {
            for (tenant, owns) in &owners {
                self.reconcile_view(ci, tenant, owns, report);
            }
        }
    }

    fn reconcile_view(
        &mut self,
        ci: usize,
        tenant: &str,
        owns: &Ownership,
        report: &mut ReloadReport,
    ) {
        let name = self.controllers[ci].spec.name.clone();
        let sees = owns.sees_controller(&name);
        let has_view = self.controllers[ci]
            .views
            .iter()
            .any(|v| v.tenant == tenant);
        if sees && !has_view {
            let t = self.tenant(tenant).expect("a running tenant");
            let view = new_view(&self.controllers[ci], t);
            let luns: Vec<u8> = view.controller.table().numbers();
            self.controllers[ci].views.push(view);
            for lun in luns {
                report.applied.push(Change::Tenant(TenantChange::GrantLun {
                    tenant: tenant.to_string(),
                    controller: name.clone(),
                    lun,
                }));
            }
            return;
        }
        let Some(vi) = self.controllers[ci]
            .views
            .iter()
            .position(|v| v.tenant == tenant)
        else {
            return;
        };
        let rc = &self.controllers[ci];
        let view = &rc.views[vi].controller;
        let present = view.table().numbers();
        for (n, lun) in &rc.luns {
            let want = owns.owns_lun(&name, *n);
            let change = |grant: bool| {
                let (tenant, controller, lun) = (tenant.to_string(), name.clone(), *n);
                Change::Tenant(if grant {
                    TenantChange::GrantLun {
                        tenant,
                        controller,
                        lun,
                    }
                } else {
                    TenantChange::RevokeLun {
                        tenant,
                        controller,
                        lun,
                    }
                })
            };
            if want && !present.contains(n) {
                let r = view
                    .add_shared_lun(*n, lun.clone())
                    .map_err(|e| e.to_string());
                report.record(change(true), r);
            } else if !want && present.contains(n) {
                let r = view.remove_lun(*n).map_err(|e| e.to_string());
                report.record(change(false), r);
            }
        }
        if !sees {
            let v = self.controllers[ci].views.remove(vi);
            self.unoffer(tenant, v.id);
        }
    }

    /// Every NIC offered to the tenant that owns it now, and to no other.
    fn reconcile_nics(&mut self, report: &mut ReloadReport) {
        for i in 0..self.nics.len() {
            let (sw, port) = (self.nics[i].switch.clone(), self.nics[i].port.clone());
            let owner = self
                .tenants
                .iter()
                .find(|t| t.spec.owns.owns_nic(&sw, &port))
                .map(|t| t.spec.name.clone());
            let current = self.nics[i].offered.as_ref().map(|(t, _)| t.clone());
            if owner == current {
                continue;
            }
            if let Some(old) = current {
                self.withdraw_nic(&self.nics[i]);
                self.nics[i].offered = None;
                report.applied.push(Change::Tenant(TenantChange::RevokeNic {
                    tenant: old,
                    switch: sw.clone(),
                    port: port.clone(),
                }));
            }
            if let Some(new) = owner {
                let t = self.tenant(&new).expect("a running tenant");
                let id = t.registry.add(Arc::new(self.nics[i].dev.clone()));
                self.nics[i].offered = Some((new.clone(), id));
                report.applied.push(Change::Tenant(TenantChange::GrantNic {
                    tenant: new,
                    switch: sw,
                    port,
                }));
            }
        }
    }

    /// Closes a tenant that owns nothing any more: its socket stops
    /// accepting, its integration services are rescinded.
    fn close_tenant(&mut self, name: &str) {
        let Some(i) = self.tenants.iter().position(|t| t.spec.name == name) else {
            return;
        };
        let mut t = self.tenants.remove(i);
        if let Some(s) = t.server.take() {
            s.stop();
        }
        if let Some((_, ids)) = t.ic.take() {
            for id in ids {
                t.registry.remove(id);
            }
        }
    }
}

/// A running tenant's settings that a reload does not change.
fn settings_differ(a: &ValidTenant, b: &ValidTenant) -> bool {
    (
        &a.socket,
        a.socket_mode,
        a.socket_owner,
        &a.allow_uids,
        &a.allow_gids,
        &a.limits,
        &a.ic,
    ) != (
        &b.socket,
        b.socket_mode,
        b.socket_owner,
        &b.allow_uids,
        &b.allow_gids,
        &b.limits,
        &b.ic,
    )
}

/// Applies a LUN change to a running controller: its opened LUNs and the
/// views of the tenants that hold (or own) the LUN.
fn apply_lun_change(
    rc: &mut RunningController,
    change: &StorageChange,
    owners: &[(String, Ownership)],
) -> Result<(), String> {
    let name = rc.spec.name.clone();
    match change {
        StorageChange::AddLun { lun, .. } => {
            let opened =
                Arc::new(storage::config::open_lun(&name, lun).map_err(|e| e.to_string())?);
            rc.luns.insert(lun.lun, opened.clone());
            for v in &rc.views {
                let owned = owners
                    .iter()
                    .any(|(t, o)| *t == v.tenant && o.owns_lun(&name, lun.lun));
                if owned {
                    v.controller
                        .add_shared_lun(lun.lun, opened.clone())
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }
        StorageChange::RemoveLun { lun, .. } => {
            remove_from_views(rc, *lun);
            rc.luns.remove(lun);
            Ok(())
        }
        StorageChange::ReplaceLun { lun, .. } => {
            // Remove first: the old image's lock goes once workers drop it,
            // and the new open waits for that.
            let holders = remove_from_views(rc, lun.lun);
            rc.luns.remove(&lun.lun);
            let opened =
                Arc::new(storage::config::open_lun(&name, lun).map_err(|e| e.to_string())?);
            rc.luns.insert(lun.lun, opened.clone());
            for vi in holders {
                rc.views[vi]
                    .controller
                    .add_shared_lun(lun.lun, opened.clone())
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        StorageChange::ChangeMedia { lun, media, .. } => {
            let drive = rc
                .luns
                .get(lun)
                .ok_or_else(|| format!("no running LUN {lun}"))?;
            let disk = media
                .as_ref()
                .map(|m| storage::config::open_media(&name, *lun, m))
                .transpose()
                .map_err(|e| e.to_string())?;
            drive.eject_media(*lun, true).map_err(|e| e.to_string())?;
            match disk {
                Some(d) => drive.insert_media(*lun, d).map_err(|e| e.to_string()),
                None => Ok(()),
            }
        }
        StorageChange::AddController(_) | StorageChange::RemoveController(_) => Ok(()),
    }
}

/// Removes LUN `lun` from every view that holds it; returns their indexes.
fn remove_from_views(rc: &RunningController, lun: u8) -> Vec<usize> {
    let mut holders = Vec::new();
    for (i, v) in rc.views.iter().enumerate() {
        if v.controller.remove_lun(lun).is_ok() {
            holders.push(i);
        }
    }
    holders
}

/// The running specification after LUN change `change` was applied.
fn follow(spec: &mut storage::config::ValidController, change: &StorageChange) {
    use storage::config::LunKind;
    match change {
        StorageChange::AddLun { lun, .. } | StorageChange::ReplaceLun { lun, .. } => {
            spec.luns.retain(|l| l.lun != lun.lun);
            spec.luns.push(lun.clone());
            spec.luns.sort_by_key(|l| l.lun);
        }
        StorageChange::RemoveLun { lun, .. } => spec.luns.retain(|l| l.lun != *lun),
        StorageChange::ChangeMedia { lun, media, .. } => {
            if let Some(l) = spec.luns.iter_mut().find(|l| l.lun == *lun) {
                l.kind = LunKind::Dvd(media.clone());
            }
        }
        StorageChange::AddController(_) | StorageChange::RemoveController(_) => {}
    }
}

/// The sources of an error, joined (the context `{e}` alone omits).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut next = e.source();
    while let Some(s) = next {
        out.push(s.to_string());
        next = s.source();
    }
    out.join(": ")
}
