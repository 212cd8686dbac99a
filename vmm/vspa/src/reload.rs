//! Reload: the subsystems' typed plans from what runs to what the new
//! configuration wants, applied change by change, with a structured report
//! of what was applied, what failed and why, and what waits for a
//! restart. A change that fails leaves what runs as it was for that
//! change, so the next reload plans it again.

use std::sync::Arc;

use storage::config::{StorageChange, StorageRestart};
use switch::config::{PortChange, SwitchRestart};

use crate::appliance::{Appliance, RunningController};
use crate::config::ValidConfig;

/// One change a reload made or tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Storage(StorageChange),
    Switch(PortChange),
}

/// A change that waits for a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    Storage(StorageRestart),
    Switch(SwitchRestart),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Storage(c) => c.fmt(f),
            Change::Switch(c) => c.fmt(f),
        }
    }
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restart::Storage(r) => r.fmt(f),
            Restart::Switch(r) => r.fmt(f),
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub applied: Vec<Change>,
    /// Changes that could not be made, with the reason.
    pub failed: Vec<(Change, String)>,
    pub needs_restart: Vec<Restart>,
}

impl ReloadReport {
    /// True when the configuration already ran as it is.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.failed.is_empty() && self.needs_restart.is_empty()
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
    /// Brings the appliance from what runs to `new`: controllers and guest
    /// NICs offered and rescinded over VMBus, LUNs hot-added and removed,
    /// DVD media changed, switch ports added and removed. Settings of
    /// running controllers and switches wait for a restart.
    pub fn reload(&mut self, new: &ValidConfig) -> ReloadReport {
        let mut report = ReloadReport::default();
        let running = self.running();
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
        report
    }

    fn apply_storage(&mut self, change: &StorageChange) -> Result<(), String> {
        match change {
            StorageChange::AddController(spec) => {
                let controller = Arc::new(storage::config::build(spec).map_err(|e| e.to_string())?);
                let id = self.registry.add(controller.clone());
                self.controllers.push(RunningController {
                    spec: spec.clone(),
                    controller,
                    id,
                });
                Ok(())
            }
            StorageChange::RemoveController(name) => {
                let i = self.controller_index(name)?;
                let c = self.controllers.remove(i);
                self.registry.remove(c.id);
                Ok(())
            }
            _ => {
                let i = self.controller_index(change.controller())?;
                let rc = &mut self.controllers[i];
                storage::config::apply(&rc.spec.name, &rc.controller, change)
                    .map_err(|e| e.to_string())?;
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
                    self.offer_nic(switch, nic);
                }
                Ok(())
            }
        }
    }
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
