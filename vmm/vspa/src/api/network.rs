//! Network: switches and their ports with state and counters; adding and
//! removing ports (a body is a `[[switch.port]]` table as JSON, plus an
//! optional `"tenant"` for a guest NIC, validated by
//! `switch::config::validate`), and a guest NIC's link state.

use serde_json::{Map, Value, json};
use switch::config::{PortConfig, PortKind, ValidPort, ValidSwitch};

use super::router::{Call, Ctx, Router};
use super::system::report_json;
use super::{ApiError, guid};
use crate::appliance::Appliance;
use crate::overrides::{self, Override};

pub fn routes(r: &mut Router) {
    r.add("GET", "/v1/switches", "every switch and its ports", list);
    r.add("GET", "/v1/switches/{switch}", "one switch", show);
    r.add(
        "POST",
        "/v1/switches/{switch}/ports",
        "add a port ([[switch.port]] as JSON)",
        add_port,
    );
    r.add(
        "GET",
        "/v1/switches/{switch}/ports/{port}",
        "one port",
        show_port,
    );
    r.add(
        "DELETE",
        "/v1/switches/{switch}/ports/{port}",
        "remove a port",
        remove_port,
    );
    r.add(
        "PUT",
        "/v1/switches/{switch}/ports/{port}/link",
        "connect or disconnect a guest NIC's cable",
        set_link,
    );
}

fn list(ctx: &Ctx, _: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    Ok(Value::Array(
        a.network()
            .specs()
            .iter()
            .map(|s| switch_json(&a, s))
            .collect(),
    ))
}

fn spec(a: &Appliance, name: &str) -> Result<ValidSwitch, ApiError> {
    a.network()
        .specs()
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no switch {name:?}")))
}

fn show(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    Ok(switch_json(&a, &spec(&a, c.param("switch"))?))
}

fn show_port(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let a = ctx.lock();
    let (sw, name) = (c.param("switch"), c.param("port"));
    let s = spec(&a, sw)?;
    let p = s
        .ports
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| ApiError::not_found(format!("switch {sw:?} has no port {name:?}")))?;
    Ok(port_json(&a, sw, p))
}

fn add_port(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let mut body: Value = c.json()?;
    let tenant = match body.as_object_mut().and_then(|o| o.remove("tenant")) {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t),
        Some(_) => return Err(ApiError::invalid("\"tenant\" must be a string")),
    };
    let spec: PortConfig =
        serde_json::from_value(body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let switch = c.param("switch").to_string();
    let mut a = ctx.lock();
    let port = overrides::port_from_spec(&a.running(), &switch, &spec, &a.base)?;
    Ok(report_json(&a.change(Override::AddPort {
        switch,
        port,
        tenant,
    })?))
}

fn remove_port(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    let switch = c.param("switch").to_string();
    let port = c.param("port").to_string();
    Ok(report_json(
        &ctx.lock().change(Override::RemovePort { switch, port })?,
    ))
}

fn set_link(ctx: &Ctx, c: &Call) -> Result<Value, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Link {
        up: bool,
    }
    let Link { up } = c.json()?;
    let switch = c.param("switch").to_string();
    let port = c.param("port").to_string();
    Ok(report_json(&ctx.lock().change(Override::Link {
        switch,
        port,
        up,
    })?))
}

/// Counters as a JSON object, by name.
fn counters(each: impl FnOnce(&mut dyn FnMut(&'static str, u64))) -> Value {
    let mut m = Map::new();
    each(&mut |k, v| {
        m.insert(k.to_string(), json!(v));
    });
    Value::Object(m)
}

fn switch_json(a: &Appliance, s: &ValidSwitch) -> Value {
    let live = a.switch(&s.name);
    let st = &s.settings;
    json!({
        "name": s.name,
        "settings": {
            "mac_table_size": st.mac_table_size,
            "mac_age_secs": st.mac_age_secs,
            "workers": st.workers,
            "netvsp_workers": st.netvsp_workers,
            "spin_us": st.spin_us,
            "cpus": st.cpus,
        },
        "mac_entries": live.map(|sw| sw.mac_entries()),
        "counters": live.map(|sw| { let st = sw.stats(); counters(|f| st.each(f)) }),
        "ports": s.ports.iter().map(|p| port_json(a, &s.name, p)).collect::<Vec<_>>(),
    })
}

fn port_json(a: &Appliance, sw: &str, p: &ValidPort) -> Value {
    let stats = a.switch(sw).and_then(|s| s.port_stats(&p.name));
    let nic = a.nics.iter().find(|n| n.switch == sw && n.port == p.name);
    let (kind, detail) = kind_json(&p.kind);
    let state = match nic {
        Some(n) if n.dev.is_open() && !n.dev.link_up() => "link_down",
        Some(n) if n.dev.is_open() => "forwarding",
        Some(n) if n.offered.is_some() => "offered",
        Some(_) => "not_offered",
        None if stats.is_some() => "forwarding",
        None => "stopped",
    };
    json!({
        "name": p.name,
        "kind": kind,
        "config": detail,
        "vlan": vlan_json(&p.policy.vlan),
        "mirror": p.policy.mirror,
        "state": state,
        "counters": stats.map(|s| counters(|f| s.each(f))),
        "nic": nic.map(|n| {
            let st = n.dev.stats();
            json!({
                "tenant": n.offered.as_ref().map(|(t, _)| t.clone()),
                "open": n.dev.is_open(),
                "link_up": n.dev.link_up(),
                "counters": counters(|f| st.each(f)),
            })
        }),
    })
}

/// A port's VLANs: the one untagged frames belong to, and the tagged ones
/// as ranges (`"10,20-29"`).
fn vlan_json(v: &switch::policy::VlanPolicy) -> Value {
    let mut tagged: Vec<String> = Vec::new();
    let mut run: Option<(u16, u16)> = None;
    let close = |r: (u16, u16), out: &mut Vec<String>| {
        out.push(if r.0 == r.1 {
            r.0.to_string()
        } else {
            format!("{}-{}", r.0, r.1)
        })
    };
    for id in 1..4095u16 {
        let member = v.egress(id) == switch::policy::Egress::Tagged;
        run = match (run, member) {
            (Some((a, b)), true) if b + 1 == id => Some((a, id)),
            (Some(r), true) => {
                close(r, &mut tagged);
                Some((id, id))
            }
            (None, true) => Some((id, id)),
            (Some(r), false) => {
                close(r, &mut tagged);
                None
            }
            (None, false) => None,
        };
    }
    if let Some(r) = run {
        close(r, &mut tagged);
    }
    json!({ "untagged": v.ingress_vid(None), "tagged": tagged.join(",") })
}

fn kind_json(k: &PortKind) -> (&'static str, Value) {
    match k {
        PortKind::Tap(t) => ("tap", json!({ "ifname": t.ifname, "offloads": t.offloads })),
        PortKind::Internal(i) => (
            "internal",
            json!({ "mac": i.mac.to_string(), "ip": format!("{}/{}", i.ip, i.prefix),
                    "counters_port": i.counters_port }),
        ),
        PortKind::Pcap(p) => ("pcap", json!({ "path": p.path.display().to_string() })),
        PortKind::Netvsp(n) => (
            "netvsp",
            json!({ "mac": n.mac.to_string(), "instance": guid(&n.instance), "mtu": n.mtu,
                    "channels": n.channels, "link_speed_mbps": n.link_speed_mbps }),
        ),
        PortKind::Vxlan(v) => (
            "vxlan",
            json!({ "local": v.config.local.to_string(), "vni": v.config.vni,
                    "remotes": v.config.remotes.len() }),
        ),
    }
}
