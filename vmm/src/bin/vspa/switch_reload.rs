//! What a SIGHUP reload does to the switches: guest NICs (`netvsp` ports)
//! come and go on running switches, offered and rescinded over VMBus like
//! hot-plugged controllers; every other switch change needs a restart and
//! is reported, not applied.
//!
//! Changes are found by comparing the `[[switch]]` tables as written (TOML
//! values), port by port, against what is running.

use std::collections::HashMap;

use switch::config::SwitchConfig;
use switch::runtime::Runtime;
use vmbus::server::{DeviceId, Registry};

/// The VMBus device of each running guest NIC, by (switch, port).
pub type NicIds = HashMap<(String, String), DeviceId>;

/// A netvsp port to add or remove.
#[derive(Debug, PartialEq)]
enum Change {
    Add { switch: String, port: String },
    Remove { switch: String, port: String },
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

/// Netvsp ports to add and remove, and the changes that need a restart.
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
            let nic = |t: &Option<toml::Table>| t.as_ref().map(|t| t.contains_key("netvsp"));
            let (switch, port) = (name.clone(), port.clone());
            match (nic(&a), nic(&b)) {
                (None | Some(true), Some(true)) | (Some(true), None) => {
                    if a.is_some() {
                        let (switch, port) = (switch.clone(), port.clone());
                        changes.push(Change::Remove { switch, port });
                    }
                    if b.is_some() {
                        changes.push(Change::Add { switch, port });
                    }
                }
                _ => restart.push(format!("port {port} of switch {switch}")),
            }
        }
    }
    (changes, restart)
}

/// Rewrites `source` (the running switch tables) with one port's table
/// from `new` (or without it).
fn apply_to_source(source: &mut Option<toml::Value>, new: Option<&toml::Value>, c: &Change) {
    let (Change::Add { switch, port } | Change::Remove { switch, port }) = c;
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

/// Applies a reloaded configuration's guest NIC changes to the running
/// switches and reports the rest. `source` is what runs; it follows the
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
        match c {
            Change::Remove { switch, port } => {
                runtime.remove_netvsp(switch, port);
                if let Some(id) = nics.remove(&(switch.clone(), port.clone())) {
                    registry.remove(id);
                }
                eprintln!("vspa: NIC {port} removed from switch {switch}");
            }
            Change::Add { switch, port } => {
                let cfg = new
                    .iter()
                    .find(|s| s.name == *switch)
                    .and_then(|s| s.ports.iter().find(|p| p.name == *port));
                let Some(cfg) = cfg else { continue };
                match runtime.add_netvsp(switch, cfg) {
                    Ok(dev) => {
                        let c = dev.config();
                        eprintln!(
                            "vspa: NIC {port} added to switch {switch} (MAC {}, instance {})",
                            c.mac, c.instance
                        );
                        let id = registry.add(std::sync::Arc::new(dev));
                        nics.insert((switch.clone(), port.clone()), id);
                    }
                    Err(e) => {
                        eprintln!("vspa: NIC {port} of switch {switch}: {e}");
                        continue;
                    }
                }
            }
        }
        apply_to_source(source, new_source, c);
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
    fn netvsp_ports_come_and_go_and_the_rest_needs_a_restart() {
        let base = source(&sw(&format!("{NIC_A}{TAP}")));
        let add = |p: &str| Change::Add {
            switch: "s".into(),
            port: p.into(),
        };
        let remove = |p: &str| Change::Remove {
            switch: "s".into(),
            port: p.into(),
        };
        let d = |text: &str| diff(base.as_ref(), source(text).as_ref());
        assert_eq!(d(&sw(&format!("{NIC_A}{TAP}"))), (vec![], vec![]));
        assert_eq!(
            d(&sw(&format!("{NIC_A}{TAP}{NIC_B}"))),
            (vec![add("b")], vec![])
        );
        assert_eq!(d(&sw(TAP)), (vec![remove("a")], vec![]));
        let changed_a = "[[switch.port]]\nname = \"a\"\nnetvsp = { mtu = 4000 }\n";
        assert_eq!(
            d(&sw(&format!("{changed_a}{TAP}"))),
            (vec![remove("a"), add("a")], vec![])
        );
        let (c, r) = d(&sw(NIC_A));
        assert!(c.is_empty());
        assert_eq!(r, vec!["port t of switch s"]);
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
