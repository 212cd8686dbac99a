//! Integration services of a tenant's guest: state, heartbeat, shutdown
//! and reboot, and KVP. Calls that wait for the guest hold no lock on the
//! appliance (the handle is cloned first) and end within their timeout
//! (`timeout_ms`, 5000 by default, at most 60000).

use std::time::Duration;

use serde_json::{Value, json};

use super::ApiError;
use super::router::{Call, Ctx, Router};
use super::tenants::with_tenant;

pub fn routes(r: &mut Router) {
    r.add(
        "GET",
        "/v1/tenants/{tenant}/ic",
        "every integration service's state",
        snapshot,
    );
    r.add(
        "GET",
        "/v1/tenants/{tenant}/ic/heartbeat",
        "the guest's heartbeat",
        heartbeat,
    );
    r.add(
        "POST",
        "/v1/tenants/{tenant}/ic/shutdown",
        "ask the guest to power off, reboot or hibernate",
        shutdown,
    );
    r.add(
        "GET",
        "/v1/tenants/{tenant}/ic/kvp",
        "KVP values as last set and read",
        kvp_cached,
    );
    r.add(
        "GET",
        "/v1/tenants/{tenant}/ic/kvp/{pool}",
        "read a KVP pool from the guest",
        kvp_read,
    );
    r.add(
        "PUT",
        "/v1/tenants/{tenant}/ic/kvp/{pool}/{key}",
        "set a KVP value in a host pool",
        kvp_set,
    );
    r.add(
        "DELETE",
        "/v1/tenants/{tenant}/ic/kvp/{pool}/{key}",
        "delete a KVP value from a host pool",
        kvp_delete,
    );
}

const DEFAULT_TIMEOUT_MS: u64 = 5000;
const MAX_TIMEOUT_MS: u64 = 60_000;

fn handle(ctx: &Ctx, c: &Call) -> Result<ic::IcHandle, ApiError> {
    let name = c.param("tenant");
    with_tenant(ctx, name, |t| t.ic.as_ref().map(|(h, _)| h.clone()))?
        .ok_or_else(|| ApiError::not_found(format!("tenant {name:?} has no integration services")))
}

fn timeout(ms: Option<u64>) -> Result<Duration, ApiError> {
    match ms.unwrap_or(DEFAULT_TIMEOUT_MS) {
        ms @ 1..=MAX_TIMEOUT_MS => Ok(Duration::from_millis(ms)),
        ms => Err(ApiError::invalid(format!(
            "timeout_ms {ms} is not in 1..={MAX_TIMEOUT_MS}"
        ))),
    }
}

fn query_timeout(c: &Call) -> Result<Duration, ApiError> {
    let ms = c
        .query_param("timeout_ms")
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::invalid(format!("timeout_ms {v:?} is not a number")))
        })
        .transpose()?;
    timeout(ms)
}

fn pool(c: &Call) -> Result<ic::Pool, ApiError> {
    let p = c.param("pool");
    serde_json::from_value(json!(p)).map_err(|_| {
        ApiError::not_found(format!(
            "no KVP pool {p:?} (external, guest, auto, auto_external)"
        ))
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::internal(e.to_string()))
}

fn snapshot(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    to_json(&handle(ctx, c)?.snapshot())
}

fn heartbeat(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let h = handle(ctx, c)?;
    let state = h
        .heartbeat()
        .ok_or_else(|| ApiError::from(ic::IcError::Disabled))?;
    to_json(&state)
}

fn shutdown(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        kind: Option<ic::ShutdownKind>,
        timeout_ms: Option<u64>,
    }
    let b: Body = if c.body.is_empty() {
        Body {
            kind: None,
            timeout_ms: None,
        }
    } else {
        c.json()?
    };
    let kind = b.kind.unwrap_or(ic::ShutdownKind::PowerOff);
    let timeout = timeout(b.timeout_ms)?;
    let h = handle(ctx, c)?;
    match h.shutdown(kind, timeout) {
        ic::ShutdownOutcome::Acknowledged => Ok(json!({ "kind": kind, "outcome": "acknowledged" })),
        ic::ShutdownOutcome::Refused(s) => Err(ApiError::new(
            409,
            "guest_refused",
            format!("the guest refused with status {s:#010x}"),
        )),
        ic::ShutdownOutcome::TimedOut => Err(ic::IcError::TimedOut.into()),
        ic::ShutdownOutcome::NotConnected(e) | ic::ShutdownOutcome::Failed(e) => Err(e.into()),
    }
}

fn kvp_cached(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let h = handle(ctx, c)?;
    to_json(&h.kvp_values().ok_or(ic::IcError::Disabled)?)
}

fn kvp_read(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let pool = pool(c)?;
    let timeout = query_timeout(c)?;
    to_json(&handle(ctx, c)?.kvp_enumerate(pool, timeout)?)
}

fn kvp_set(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        value: String,
        timeout_ms: Option<u64>,
    }
    let pool = pool(c)?;
    let b: Body = c.json()?;
    let key = c.param("key");
    handle(ctx, c)?.kvp_set(pool, key, &b.value, timeout(b.timeout_ms)?)?;
    Ok(json!({ "pool": pool, "key": key, "value": b.value }))
}

fn kvp_delete(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let pool = pool(c)?;
    let key = c.param("key");
    handle(ctx, c)?.kvp_delete(pool, key, query_timeout(c)?)?;
    Ok(json!({ "pool": pool, "key": key, "deleted": true }))
}
