//! What a SIGHUP reload does to the switches: ports come and go on running
//! switches (guest NICs, the `netvsp` ports, are offered and rescinded over
//! VMBus like hot-plugged controllers; tap, internal and pcap ports join and
//! leave their switch's workers), and a changed port is replaced. Switch
//! settings and whole switches need a restart; those changes are reported,
//! not applied.
//!
//! Changes are found by comparing the `[[switch]]` tables as written (TOML
//! values), port by port, against what is running.

use std::collections::HashMap;

use switch::config::SwitchConfig;
use switch::runtime::Runtime;
use vmbus::server::{DeviceId, Registry};

/// The VMBus device of each running guest NIC, by (switch, port).
pub type NicIds = HashMap<(String, String), DeviceId>;

/// A port to add or remove; `nic` for netvsp ports.
#[derive(Debug, PartialEq)]
enum Change {
    Add {
        switch: String,
        port: String,
        nic: bool,
    },
    Remove {
        switch: String,
        port: String,
        nic: bool,
    },
}

/// The `[[switch]]` tables of a configuration, by name.
fn switch_tables(source: Option<&toml::Value>) -> Vec<(String, toml::Table)> {
    let Some(toml::Value::Array(switches)) = source else {
        return Vec::new();
    };
    switches
        .iter()
        .filter_map(|v| v.as_table())
        .map(|t| (name_of(t), t.clone()))
        .collect()
}

fn name_of(t: &toml::Table) -> String {
    t.get("name")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_string()
}

fn ports_of(switch: &toml::Table) -> Vec<(String, toml::Table)> {
    match switch.get("port") {
        Some(toml::Value::Array(ports)) => ports
            .iter()
            .filter_map(|v| v.as_table())
            .map(|t| (name_of(t), t.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

fn without_ports(t: &toml::Table) -> toml::Table {
    let mut t = t.clone();
    t.remove("port");
    t
}

/// Ports to add and remove, and the changes that need a restart.
fn diff(old: Option<&toml::Value>, new: Option<&toml::Value>) -> (Vec<Change>, Vec<String>) {
    let (old, new) = (switch_tables(old), switch_tables(new));
    let mut changes = Vec::new();
    let mut restart = Vec::new();
    let find = |v: &[(String, toml::Table)], name: &str| {
        v.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone())
    };
    let mut names: Vec<&String> = old.iter().chain(&new).map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    for name in names {
        let (Some(o), Some(n)) = (find(&old, name), find(&new, name)) else {
            restart.push(format!("switch {name} added or removed"));
            continue;
        };
        if without_ports(&o) != without_ports(&n) {
            restart.push(format!("settings of switch {name}"));
            continue;
        }
        let (op, np) = (ports_of(&o), ports_of(&n));
        let mut ports: Vec<&String> = op.iter().chain(&np).map(|(p, _)| p).collect();
        ports.sort();
        ports.dedup();
        for port in ports {
            let (a, b) = (find(&op, port), find(&np, port));
            if a == b {
                continue;
            }
            let (switch, port) = (name.clone(), port.clone());
            if let Some(t) = &a {
                let (switch, port, nic) = (switch.clone(), port.clone(), t.contains_key("netvsp"));
                changes.push(Change::Remove { switch, port, nic });
            }
            if let Some(t) = &b {
                let nic = t.contains_key("netvsp");
                changes.push(Change::Add { switch, port, nic });
            }
        }
    }
    (changes, restart)
}

/// Rewrites `source` (the running switch tables) with one port's table
/// from `new` (or without it).
fn apply_to_source(source: &mut Option<toml::Value>, new: Option<&toml::Value>, c: &Change) {
    let (Change::Add { switch, port, .. } | Change::Remove { switch, port, .. }) = c;
    let replacement = switch_tables(new)
        .into_iter()
        .find(|(n, _)| n == switch)
        .and_then(|(_, t)| ports_of(&t).into_iter().find(|(p, _)| p == port))
        .map(|(_, t)| t);
    let Some(toml::Value::Array(switches)) = source else {
        return;
    };
    let Some(sw) = switches
        .iter_mut()
        .filter_map(|v| v.as_table_mut())
        .find(|t| name_of(t) == *switch)
    else {
        return;
    };
    let ports = sw
        .entry("port")
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    let Some(ports) = ports.as_array_mut() else {
        return;
    };
    ports.retain(|p| p.as_table().is_none_or(|t| name_of(t) != *port));
    if let (Change::Add { .. }, Some(t)) = (c, replacement) {
        ports.push(toml::Value::Table(t));
    }
}

fn remove(
    switch: &str,
    port: &str,
    nic: bool,
    runtime: &mut Runtime,
    registry: &Registry,
    nics: &mut NicIds,
) {
    if nic {
        runtime.remove_netvsp(switch, port);
        if let Some(id) = nics.remove(&(switch.to_string(), port.to_string())) {
            registry.remove(id);
        }
    } else {
        runtime.remove_port(switch, port);
    }
    eprintln!("vspa: port {port} removed from switch {switch}");
}

fn add(
    switch: &str,
    cfg: &switch::config::PortConfig,
    nic: bool,
    runtime: &mut Runtime,
    registry: &Registry,
    nics: &mut NicIds,
) -> Result<(), switch::runtime::RuntimeError> {
    let port = &cfg.name;
    if !nic {
        runtime.add_port(switch, cfg)?;
        eprintln!("vspa: port {port} added to switch {switch}");
        return Ok(());
    }
    let dev = runtime.add_netvsp(switch, cfg)?;
    let c = dev.config();
    eprintln!(
        "vspa: NIC {port} added to switch {switch} (MAC {}, instance {})",
        c.mac, c.instance
    );
    let id = registry.add(std::sync::Arc::new(dev));
    nics.insert((switch.to_string(), port.clone()), id);
    Ok(())
}

/// Applies a reloaded configuration's port changes to the running switches
/// and reports the rest. `source` is what runs; it follows the
/// changes applied.
pub fn reload(
    new: &[SwitchConfig],
    new_source: Option<&toml::Value>,
    source: &mut Option<toml::Value>,
    runtime: &mut Runtime,
    registry: &Registry,
    nics: &mut NicIds,
) {
    if new_source == source.as_ref() {
        return;
    }
    if let Err(e) = switch::config::validate(new) {
        eprintln!("vspa: switch changes refused: {e}");
        return;
    }
    let (changes, restart) = diff(source.as_ref(), new_source);
    for c in &changes {
        let applied = match c {
            Change::Remove { switch, port, nic } => {
                remove(switch, port, *nic, runtime, registry, nics);
                true
            }
            Change::Add { switch, port, nic } => {
                let cfg = new
                    .iter()
                    .find(|s| s.name == *switch)
                    .and_then(|s| s.ports.iter().find(|p| p.name == *port));
                match cfg.map(|cfg| add(switch, cfg, *nic, runtime, registry, nics)) {
                    Some(Ok(())) => true,
                    Some(Err(e)) => {
                        eprintln!("vspa: port {port} of switch {switch}: {e}");
                        false
                    }
                    None => false,
                }
            }
        };
        if applied {
            apply_to_source(source, new_source, c);
        }
    }
    if !restart.is_empty() {
        eprintln!(
            "vspa: these switch changes take effect after a restart: {}",
            restart.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Option<toml::Value> {
        let t: toml::Table = toml::from_str(text).unwrap();
        t.get("switch").cloned()
    }

    const NIC_A: &str = "[[switch.port]]\nname = \"a\"\nnetvsp = {}\n";
    const NIC_B: &str = "[[switch.port]]\nname = \"b\"\nnetvsp = { mtu = 9000 }\n";
    const TAP: &str = "[[switch.port]]\nname = \"t\"\ntap = { ifname = \"t0\" }\n";

    fn sw(body: &str) -> String {
        format!("[[switch]]\nname = \"s\"\n{body}")
    }

    #[test]
    fn ports_come_and_go_and_switch_settings_need_a_restart() {
        let base = source(&sw(&format!("{NIC_A}{TAP}")));
        let add = |p: &str, nic: bool| Change::Add {
            switch: "s".into(),
            port: p.into(),
            nic,
        };
        let remove = |p: &str, nic: bool| Change::Remove {
            switch: "s".into(),
            port: p.into(),
            nic,
        };
        let d = |text: &str| diff(base.as_ref(), source(text).as_ref());
        assert_eq!(d(&sw(&format!("{NIC_A}{TAP}"))), (vec![], vec![]));
        assert_eq!(
            d(&sw(&format!("{NIC_A}{TAP}{NIC_B}"))),
            (vec![add("b", true)], vec![])
        );
        assert_eq!(d(&sw(TAP)), (vec![remove("a", true)], vec![]));
        assert_eq!(d(&sw(NIC_A)), (vec![remove("t", false)], vec![]));
        let changed_a = "[[switch.port]]\nname = \"a\"\nnetvsp = { mtu = 4000 }\n";
        assert_eq!(
            d(&sw(&format!("{changed_a}{TAP}"))),
            (vec![remove("a", true), add("a", true)], vec![])
        );
        // A NIC that becomes a tap port under the same name.
        let a_tap = "[[switch.port]]\nname = \"a\"\ntap = { ifname = \"a0\" }\n";
        assert_eq!(
            d(&sw(&format!("{a_tap}{TAP}"))),
            (vec![remove("a", true), add("a", false)], vec![])
        );
        let (c, r) = d(&format!(
            "[[switch]]\nname = \"s\"\nspin_us = 9\n{NIC_A}{TAP}"
        ));
        assert!(c.is_empty());
        assert_eq!(r, vec!["settings of switch s"]);
        let (_, r) = d(&format!(
            "{}\n[[switch]]\nname = \"x\"\n",
            sw(&format!("{NIC_A}{TAP}"))
        ));
        assert_eq!(r, vec!["switch x added or removed"]);
    }

    #[test]
    fn the_running_source_follows_applied_changes() {
        let mut running = source(&sw(&format!("{NIC_A}{TAP}")));
        let new = source(&sw(&format!("{TAP}{NIC_B}")));
        let (changes, restart) = diff(running.as_ref(), new.as_ref());
        assert!(restart.is_empty());
        for c in &changes {
            apply_to_source(&mut running, new.as_ref(), c);
        }
        assert_eq!(diff(running.as_ref(), new.as_ref()), (vec![], vec![]));
    }
}
