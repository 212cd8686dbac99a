//! The appliance as a whole: `GET /v1` (what runs and every endpoint) and
//! the runtime overrides (`/v1/overrides`).

use serde_json::{Value, json};

use super::router::{Call, Ctx, Router};
use super::{ApiError, unix_ms};
use crate::overrides::{Entry, Override};
use crate::reload::ReloadReport;

pub fn routes(r: &mut Router) {
    r.add("GET", "/v1", "what runs, and every endpoint", status);
    r.add(
        "GET",
        "/v1/overrides",
        "the runtime overrides",
        list_overrides,
    );
    r.add(
        "DELETE",
        "/v1/overrides",
        "drop every override: back to the file",
        drop_all,
    );
    r.add(
        "DELETE",
        "/v1/overrides/{id}",
        "drop one override",
        drop_one,
    );
}

fn status(ctx: &Ctx, _: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    let s = a.summary();
    let endpoints: Vec<String> = super::router()
        .endpoints()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "tenants": s.tenants,
        "controllers": s.controllers,
        "switches": s.switches,
        "nics": s.nics,
        "overrides": a.overrides().len(),
        "endpoints": endpoints,
    }))
}

fn list_overrides(ctx: &Ctx, _: &Call) -> Result<Value, ApiError> {
    Ok(Value::Array(
        ctx.lock().overrides().iter().map(entry_json).collect(),
    ))
}

fn drop_all(ctx: &Ctx, _: &Call) -> Result<Value, ApiError> {
    Ok(report_json(&ctx.lock().drop_overrides(None)?))
}

fn drop_one(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let id = c.number("id")?;
    Ok(report_json(&ctx.lock().drop_overrides(Some(id))?))
}

fn entry_json(e: &Entry) -> Value {
    let mut v = override_json(&e.change);
    v["id"] = json!(e.id);
    v["since_unix_ms"] = json!(unix_ms(e.since));
    v
}

/// An override: its kind, what it is about and a sentence.
pub(super) fn override_json(o: &Override) -> Value {
    let (kind, about) = match o {
        Override::AddController { spec, tenant } => (
            "add_controller",
            json!({ "controller": spec.name, "tenant": tenant }),
        ),
        Override::RemoveController { name } => ("remove_controller", json!({ "controller": name })),
        Override::AddLun {
            controller,
            lun,
            tenant,
        } => (
            "add_lun",
            json!({ "controller": controller, "lun": lun.lun, "tenant": tenant }),
        ),
        Override::RemoveLun { controller, lun } => (
            "remove_lun",
            json!({ "controller": controller, "lun": lun }),
        ),
        Override::Media {
            controller,
            lun,
            media,
        } => (
            "media",
            json!({ "controller": controller, "lun": lun,
                    "path": media.as_ref().map(|m| m.path.display().to_string()) }),
        ),
        Override::AddPort {
            switch,
            port,
            tenant,
        } => (
            "add_port",
            json!({ "switch": switch, "port": port.name, "tenant": tenant }),
        ),
        Override::RemovePort { switch, port } => {
            ("remove_port", json!({ "switch": switch, "port": port }))
        }
        Override::Link { switch, port, up } => {
            ("link", json!({ "switch": switch, "port": port, "up": up }))
        }
    };
    let mut v = json!({ "kind": kind, "change": o.to_string() });
    if let (Value::Object(v), Value::Object(about)) = (&mut v, about) {
        v.extend(about);
    }
    v
}

/// What a change (or dropping overrides) did.
pub(super) fn report_json(r: &ReloadReport) -> Value {
    let text = |v: &[String]| json!(v);
    json!({
        "applied": text(&r.applied.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "failed": r.failed.iter().map(|(c, w)| json!({"change": c.to_string(), "error": w})).collect::<Vec<_>>(),
        "needs_restart": text(&r.needs_restart.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "dropped": r.dropped.iter().map(|(o, w)| json!({"override": o.to_string(), "reason": w})).collect::<Vec<_>>(),
    })
}
