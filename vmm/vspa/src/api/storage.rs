//! Storage: SCSI controllers and their LUNs; adding and removing both, and
//! DVD media. Bodies are the file's tables as JSON (`[[controller]]`,
//! `[[controller.lun]]`) plus an optional `"tenant"`, validated by
//! `storage::config`; changes go through [`crate::Appliance::change`].

use serde_json::{Value, json};
use storage::config::{ControllerSpec, LunKind, LunSpec, ValidLun};

use super::router::{Call, Ctx, Router};
use super::system::report_json;
use super::{ApiError, guid};
use crate::appliance::{Appliance, RunningController};
use crate::overrides::{self, Override};

pub fn routes(r: &mut Router) {
    r.add(
        "GET",
        "/v1/controllers",
        "every controller and its LUNs",
        list,
    );
    r.add(
        "POST",
        "/v1/controllers",
        "add a controller ([[controller]] as JSON)",
        add_controller,
    );
    r.add(
        "GET",
        "/v1/controllers/{controller}",
        "one controller",
        show,
    );
    r.add(
        "DELETE",
        "/v1/controllers/{controller}",
        "remove a controller",
        remove_controller,
    );
    r.add(
        "POST",
        "/v1/controllers/{controller}/luns",
        "hot-add a LUN ([[controller.lun]] as JSON)",
        add_lun,
    );
    r.add(
        "GET",
        "/v1/controllers/{controller}/luns/{lun}",
        "one LUN",
        show_lun,
    );
    r.add(
        "DELETE",
        "/v1/controllers/{controller}/luns/{lun}",
        "hot-remove a LUN",
        remove_lun,
    );
    r.add(
        "PUT",
        "/v1/controllers/{controller}/luns/{lun}/media",
        "insert DVD media",
        insert_media,
    );
    r.add(
        "DELETE",
        "/v1/controllers/{controller}/luns/{lun}/media",
        "eject DVD media",
        eject_media,
    );
}

fn list(ctx: &Ctx, _: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    Ok(Value::Array(
        a.controllers
            .iter()
            .map(|c| controller_json(&a, c))
            .collect(),
    ))
}

fn running<'a>(a: &'a Appliance, name: &str) -> Result<&'a RunningController, ApiError> {
    a.controllers
        .iter()
        .find(|c| c.spec.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no controller {name:?}")))
}

fn show(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    Ok(controller_json(&a, running(&a, c.param("controller"))?))
}

fn show_lun(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    let name = c.param("controller");
    let rc = running(&a, name)?;
    let n: u8 = c.number("lun")?;
    let l = rc
        .spec
        .luns
        .iter()
        .find(|l| l.lun == n)
        .ok_or_else(|| ApiError::not_found(format!("controller {name:?} has no LUN {n}")))?;
    Ok(lun_json(&a, rc, l))
}

/// Splits `"tenant"` off a JSON object body; the rest must be `T`.
fn with_tenant<T: serde::de::DeserializeOwned>(c: &Call) -> Result<(T, Option<String>), ApiError> {
    let mut body: Value = c.json()?;
    let tenant = match body.as_object_mut().and_then(|o| o.remove("tenant")) {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t),
        Some(_) => return Err(ApiError::invalid("\"tenant\" must be a string")),
    };
    let spec = serde_json::from_value(body).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok((spec, tenant))
}

fn add_controller(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let (spec, tenant): (ControllerSpec, _) = with_tenant(c)?;
    let mut a = ctx.lock();
    let spec = overrides::controller_from_spec(&spec, &a.base)?;
    Ok(report_json(
        &a.change(Override::AddController { spec, tenant })?,
    ))
}

fn remove_controller(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let name = c.param("controller").to_string();
    Ok(report_json(
        &ctx.lock().change(Override::RemoveController { name })?,
    ))
}

fn add_lun(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let (spec, tenant): (LunSpec, _) = with_tenant(c)?;
    let controller = c.param("controller").to_string();
    let mut a = ctx.lock();
    running(&a, &controller)?;
    let lun = overrides::lun_from_spec(&controller, &spec, &a.base)?;
    Ok(report_json(&a.change(Override::AddLun {
        controller,
        lun,
        tenant,
    })?))
}

fn remove_lun(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let controller = c.param("controller").to_string();
    let lun = c.number("lun")?;
    Ok(report_json(
        &ctx.lock().change(Override::RemoveLun { controller, lun })?,
    ))
}

/// `{"path": "...", "format": "iso"}`: media, validated as a DVD LUN's.
fn insert_media(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let controller = c.param("controller").to_string();
    let lun: u8 = c.number("lun")?;
    let mut body: Value = c.json()?;
    let Some(o) = body.as_object_mut() else {
        return Err(ApiError::invalid(
            "the body must be an object with \"path\"",
        ));
    };
    if !o.contains_key("path") {
        return Err(ApiError::invalid("missing field `path`"));
    }
    o.insert("lun".into(), json!(lun));
    o.insert("dvd".into(), json!(true));
    let spec: LunSpec =
        serde_json::from_value(body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut a = ctx.lock();
    let ValidLun {
        kind: LunKind::Dvd(media),
        ..
    } = overrides::lun_from_spec(&controller, &spec, &a.base)?
    else {
        return Err(ApiError::internal("a DVD LUN validated as a disk"));
    };
    Ok(report_json(&a.change(Override::Media {
        controller,
        lun,
        media,
    })?))
}

fn eject_media(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let controller = c.param("controller").to_string();
    let lun = c.number("lun")?;
    Ok(report_json(&ctx.lock().change(Override::Media {
        controller,
        lun,
        media: None,
    })?))
}

fn controller_json(a: &Appliance, rc: &RunningController) -> Value {
    let s = &rc.spec.settings;
    json!({
        "name": rc.spec.name,
        "instance": guid(&s.instance),
        "subchannels": s.subchannels,
        "queue_depth": s.queue_depth,
        "cpus": s.cpus,
        "tenants": rc.views.iter().map(|v| v.tenant.clone()).collect::<Vec<_>>(),
        "luns": rc.spec.luns.iter().map(|l| lun_json(a, rc, l)).collect::<Vec<_>>(),
    })
}

fn lun_json(a: &Appliance, rc: &RunningController, l: &ValidLun) -> Value {
    let image = match &l.kind {
        LunKind::Disk(i) => Some(i),
        LunKind::Dvd(m) => m.as_ref(),
    };
    let device = rc.luns.get(&l.lun).map(|lun| match &**lun {
        storage::Lun::Disk { device, .. } => {
            let i = device.info();
            json!({ "size_bytes": i.blocks * u64::from(i.block_size), "block_size": i.block_size })
        }
        storage::Lun::Dvd { drive } => json!({ "media_present": drive.has_media() }),
    });
    let owners: Vec<&str> = a
        .tenants
        .iter()
        .filter(|t| t.spec.owns.owns_lun(&rc.spec.name, l.lun))
        .map(|t| t.spec.name.as_str())
        .collect();
    json!({
        "lun": l.lun,
        "kind": if matches!(l.kind, LunKind::Dvd(_)) { "dvd" } else { "disk" },
        "path": image.map(|i| i.path.display().to_string()),
        "format": image.and_then(|i| i.format).map(|f| f.name()),
        "read_only": image.is_none_or(|i| i.read_only),
        "cache": image.map(|i| format!("{:?}", i.cache).to_lowercase()),
        "tenants": owners,
        "device": device,
    })
}
