//! Live checkpoints of disk LUNs ([`crate::checkpoint`]) over the API:
//! create, merge, revert and status. Create and revert switch the LUN under
//! the appliance lock and record the switch (`Appliance::sync_lun`) under
//! the same lock. A merge runs on a thread of its own: the copy without the
//! lock (it may take minutes; its progress shows in `GET .../checkpoint`),
//! then the switch under it. One merge per LUN at a time; while a merge
//! copies, other checkpoint requests get 409 rather than waiting for it
//! with the lock held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use serde_json::{Value, json};
use storage::controller::LunError;

use super::ApiError;
use super::router::{Call, Ctx, Router};
use crate::Appliance;
use crate::checkpoint::{self, CheckpointError, Progress};

pub fn routes(r: &mut Router) {
    r.add(
        "GET",
        "/v1/controllers/{controller}/luns/{lun}/checkpoint",
        "a disk LUN's checkpoint and merge progress",
        show,
    );
    r.add(
        "POST",
        "/v1/controllers/{controller}/luns/{lun}/checkpoint",
        "create a live checkpoint (a differencing child)",
        create,
    );
    r.add_with_status(
        "POST",
        "/v1/controllers/{controller}/luns/{lun}/checkpoint/merge",
        "start merging the checkpoint into its image (202)",
        202,
        merge,
    );
    r.add(
        "POST",
        "/v1/controllers/{controller}/luns/{lun}/checkpoint/revert",
        "drop the checkpoint: back to the image as it was",
        revert,
    );
}

/// Where a merge started through the API is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Copying,
    Done,
    Failed(String),
}

#[derive(Debug, Clone)]
struct Merge {
    phase: Phase,
    progress: Progress,
}

/// The merges started through the API, by (controller, LUN); a finished
/// one stays until the next starts, so a client polling sees its end.
#[derive(Debug, Default)]
pub struct Merges(Mutex<HashMap<(String, u8), Merge>>);

impl Merges {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u8), Merge>> {
        vmbus::worker::lock(&self.0)
    }

    fn set(&self, key: &(String, u8), f: impl FnOnce(&mut Merge)) {
        if let Some(m) = self.lock().get_mut(key) {
            f(m);
        }
    }

    /// 409 while any merge copies: checkpoint operations take turns, and
    /// waiting for a copy with the appliance locked would stall the API.
    fn refuse_while_copying(&self) -> Result<(), ApiError> {
        match self.lock().iter().find(|(_, m)| m.phase == Phase::Copying) {
            Some(((c, l), _)) => Err(ApiError::conflict(format!(
                "a merge of controller {c:?} LUN {l} is running; try again when it is done"
            ))),
            None => Ok(()),
        }
    }
}

/// The controller name and LUN of a call.
fn target(c: &Call) -> Result<(String, u8), ApiError> {
    Ok((c.param("controller").to_string(), c.number("lun")?))
}

/// The controller view serving the LUN (404 when there is none).
fn view(a: &Appliance, name: &str, lun: u8) -> Result<Arc<storage::Controller>, ApiError> {
    if !a.controllers.iter().any(|c| c.spec.name == name) {
        return Err(ApiError::not_found(format!("no controller {name:?}")));
    }
    a.lun_controller(name, lun)
        .ok_or_else(|| ApiError::not_found(format!("controller {name:?} has no LUN {lun}")))
}

impl From<CheckpointError> for ApiError {
    fn from(e: CheckpointError) -> Self {
        use CheckpointError as E;
        let m = e.to_string();
        match e {
            E::Lun(LunError::Missing(_)) => ApiError::not_found(m),
            E::NotVhd(_) | E::Lun(_) => ApiError::invalid(m),
            E::Exists(_) | E::NoCheckpoint(_) | E::Merging(_) | E::NotCopied(_) => {
                ApiError::conflict(m)
            }
            E::Image(_) => ApiError::new(422, "apply_failed", m),
        }
    }
}

fn show(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let key = target(c)?;
    let controller = view(&ctx.lock(), &key.0, key.1)?;
    let status = checkpoint::status(&controller, key.1)?;
    let merge = ctx.merges.lock().get(&key).cloned();
    let mut body = json!({
        "controller": key.0,
        "lun": key.1,
        "image": status.image,
        "checkpoint": status.child,
        "merging": status.merging,
    });
    if let Some(m) = merge {
        let (state, error) = match m.phase {
            Phase::Copying => ("copying", None),
            Phase::Done => ("done", None),
            Phase::Failed(e) => ("failed", Some(e)),
        };
        body["merge"] = json!({
            "state": state,
            "done": m.progress.done,
            "total": m.progress.total,
            "error": error,
        });
    }
    Ok(body)
}

fn create(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    switch(ctx, c, "checkpoint", checkpoint::create)
}

fn revert(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    switch(ctx, c, "removed", checkpoint::revert)
}

/// Runs a create or revert under the appliance lock and records the
/// switch under the same lock; answers `{field: the file}`.
fn switch(
    ctx: &Ctx,
    c: &Call,
    field: &str,
    op: fn(&storage::Controller, u8) -> Result<std::path::PathBuf, CheckpointError>,
) -> Result<Value, ApiError> {
    let (name, lun) = target(c)?;
    ctx.merges.refuse_while_copying()?;
    let mut a = ctx.lock();
    let controller = view(&a, &name, lun)?;
    let file = op(&controller, lun)?;
    a.sync_lun(&name, lun);
    Ok(json!({ "controller": name, "lun": lun, field: file }))
}

/// Checks that the LUN has a checkpoint, then merges it on a new thread.
fn merge(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let key = target(c)?;
    let controller = view(&ctx.lock(), &key.0, key.1)?;
    let status = checkpoint::status(&controller, key.1)?;
    if status.child.is_none() {
        return Err(CheckpointError::NoCheckpoint(key.1).into());
    }
    ctx.merges.refuse_while_copying()?;
    let started = Merge {
        phase: Phase::Copying,
        progress: Progress { done: 0, total: 0 },
    };
    ctx.merges.lock().insert(key.clone(), started);
    // The thread holds the appliance weakly: a shutdown during a copy
    // still finds it unshared.
    let appliance = Arc::downgrade(&ctx.appliance);
    let merges = ctx.merges.clone();
    let job = key.clone();
    let spawned = std::thread::Builder::new()
        .name("vspa-merge".into())
        .spawn(move || run_merge(&appliance, &merges, &job, &controller));
    if let Err(e) = spawned {
        ctx.merges.lock().remove(&key);
        return Err(ApiError::internal(format!(
            "cannot start the merge thread: {e}"
        )));
    }
    Ok(json!({ "controller": key.0, "lun": key.1, "merge": "started" }))
}

fn run_merge(
    appliance: &Weak<Mutex<Appliance>>,
    merges: &Merges,
    key: &(String, u8),
    controller: &storage::Controller,
) {
    let copied = checkpoint::merge_copy(controller, key.1, &mut |p| {
        merges.set(key, |m| m.progress = p);
    });
    let finished = copied.map_err(|e| e.to_string()).and_then(|_| {
        let Some(appliance) = appliance.upgrade() else {
            // The state file still says `merging`: the next start serves
            // the child, and a merge there finishes it.
            return Err("vspa shut down before the merge's switch".to_string());
        };
        let mut a = vmbus::worker::lock(&appliance);
        let r = checkpoint::merge_finish(controller, key.1);
        a.sync_lun(&key.0, key.1);
        r.map(drop).map_err(|e| e.to_string())
    });
    let phase = match finished {
        Ok(()) => Phase::Done,
        Err(e) => {
            tracing::warn!(controller = key.0, lun = key.1, "merge failed: {e}");
            Phase::Failed(e)
        }
    };
    merges.set(key, |m| m.phase = phase);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_errors_map_to_statuses() {
        use CheckpointError as E;
        let cases = [
            (E::Lun(LunError::Missing(3)), 404, "not_found"),
            (E::NotVhd(3), 422, "invalid"),
            (E::Lun(LunError::NotDisk(3)), 422, "invalid"),
            (E::Exists(3), 409, "conflict"),
            (E::NoCheckpoint(3), 409, "conflict"),
            (E::Merging(3), 409, "conflict"),
            (E::NotCopied(3), 409, "conflict"),
        ];
        for (e, status, code) in cases {
            let m = e.to_string();
            let a = ApiError::from(e);
            assert_eq!((a.status, a.code, a.message), (status, code, m));
        }
    }

    #[test]
    fn a_copying_merge_holds_other_operations_off() {
        let merges = Merges::default();
        merges.refuse_while_copying().unwrap();
        let key = ("scsi0".to_string(), 2);
        let copying = Merge {
            phase: Phase::Copying,
            progress: Progress { done: 1, total: 8 },
        };
        merges.lock().insert(key.clone(), copying);
        let e = merges.refuse_while_copying().unwrap_err();
        assert_eq!(e.status, 409);
        assert!(e.message.contains("\"scsi0\" LUN 2"), "{}", e.message);
        merges.set(&key, |m| m.phase = Phase::Done);
        merges.refuse_while_copying().unwrap();
    }
}
