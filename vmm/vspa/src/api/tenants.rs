//! Tenants: their settings and what they own, the clients connected to
//! their sockets (peer credentials, connected since), the VMBus devices in
//! their registries and each client's channels.
//!
//! Channels are listed per client connection as its channel server knows
//! them (relid, device, sub-channel index, open or only offered): each
//! client's control thread publishes its list after every channel message,
//! so reading it costs the data path nothing. A VM of `vspa run` has no
//! hosted-mode clients; its tenant lists none.

use serde_json::{Value, json};
use vmbus::guid::{ECHO_INTERFACE, NETWORK_INTERFACE, SCSI_INTERFACE};
use vmbus::hosted::connections::Connection;

use super::router::{Call, Ctx, Router};
use super::{ApiError, guid, unix_ms};
use crate::appliance::TenantRt;

pub fn routes(r: &mut Router) {
    r.add("GET", "/v1/tenants", "every tenant", list);
    r.add("GET", "/v1/tenants/{tenant}", "one tenant", show);
    r.add(
        "GET",
        "/v1/tenants/{tenant}/clients",
        "clients connected to the tenant's socket",
        clients,
    );
    r.add(
        "GET",
        "/v1/tenants/{tenant}/devices",
        "VMBus devices offered to the tenant",
        devices,
    );
    r.add(
        "GET",
        "/v1/tenants/{tenant}/channels",
        "each client's channels",
        channels,
    );
}

/// Runs `f` on tenant `name` (404 if there is none).
pub(super) fn with_tenant<T>(
    ctx: &Ctx,
    name: &str,
    f: impl FnOnce(&TenantRt) -> T,
) -> Result<T, ApiError> {
    let a = ctx.lock();
    a.tenant(name)
        .map(f)
        .ok_or_else(|| ApiError::not_found(format!("no tenant {name:?}")))
}

fn list(ctx: &Ctx, _: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    Ok(Value::Array(a.tenants.iter().map(tenant_json).collect()))
}

fn show(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    with_tenant(ctx, c.param("tenant"), |t| {
        let mut v = tenant_json(t);
        v["devices"] = devices_json(t);
        v
    })
}

fn clients(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    with_tenant(ctx, c.param("tenant"), |t| {
        Value::Array(connections(t).iter().map(client_json).collect())
    })
}

fn devices(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    with_tenant(ctx, c.param("tenant"), devices_json)
}

fn channels(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    with_tenant(ctx, c.param("tenant"), |t| {
        let mut out = Vec::new();
        for conn in connections(t) {
            for ch in &conn.channels {
                out.push(json!({
                    "client": conn.id,
                    "relid": ch.relid,
                    "kind": kind(&ch.interface),
                    "name": ch.name,
                    "instance": guid(&ch.instance),
                    "subchannel": ch.subchannel_index,
                    "state": if ch.open { "open" } else { "offered" },
                }));
            }
        }
        Value::Array(out)
    })
}

fn connections(t: &TenantRt) -> Vec<Connection> {
    t.counters.connections.list()
}

fn tenant_json(t: &TenantRt) -> Value {
    let s = &t.spec;
    let c = &t.counters;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "name": s.name,
        "socket": t.server.as_ref().map(|x| x.path().display().to_string()),
        "socket_mode": format!("{:04o}", s.socket_mode),
        "socket_owner": s.socket_owner.map(|(u, g)| format!("{u}:{g}")),
        "allow_uids": s.allow_uids,
        "allow_gids": s.allow_gids,
        "connections": n(&c.connected),
        "counters": {
            "accepted": n(&c.accepted),
            "refused_credentials": n(&c.refused_credentials),
            "limit_hits": n(&c.limit_hits),
            "violations": n(&c.violations),
        },
        "owns": {
            "controllers": s.owns.controllers,
            "luns": s.owns.luns.iter().map(|l| json!({"controller": l.controller, "lun": l.lun})).collect::<Vec<_>>(),
            "nics": s.owns.nics.iter().map(|n| json!({"switch": n.switch, "port": n.port})).collect::<Vec<_>>(),
        },
        "limits": {
            "connections": s.limits.connections,
            "memory_bytes": s.limits.memory_bytes,
            "inflight": s.limits.inflight,
            "lun_iops": s.limits.lun_iops,
            "lun_mbps": s.limits.lun_mbps,
        },
        "integration_services": t.ic.is_some(),
    })
}

fn client_json(c: &Connection) -> Value {
    json!({
        "id": c.id,
        "pid": c.peer.pid,
        "uid": c.peer.uid,
        "gid": c.peer.gid,
        "since_unix_ms": unix_ms(c.since),
        "vmbus_version": c.version.map(|v| format!("{}.{}", v >> 16, v & 0xffff)),
        "channels": c.channels.len(),
        "open_channels": c.channels.iter().filter(|ch| ch.open).count(),
    })
}

fn devices_json(t: &TenantRt) -> Value {
    Value::Array(
        t.registry
            .offers()
            .into_iter()
            .map(|(id, o)| {
                json!({
                    "id": id,
                    "kind": kind(&o.interface),
                    "name": o.name,
                    "interface": guid(&o.interface),
                    "instance": guid(&o.instance),
                })
            })
            .collect(),
    )
}

/// The kind of device an interface GUID names.
pub(super) fn kind(interface: &vmbus::Guid) -> String {
    if *interface == SCSI_INTERFACE {
        "scsi".into()
    } else if *interface == NETWORK_INTERFACE {
        "netvsp".into()
    } else if *interface == ECHO_INTERFACE {
        "echo".into()
    } else if let Some(s) = ic::Service::from_interface(interface) {
        format!("ic-{}", s.name())
    } else {
        "other".into()
    }
}
