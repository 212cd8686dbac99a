//! What a configuration change means for running switches: a pure, typed
//! plan computed from the validated switches that run and the validated
//! switches wanted. Ports come and go on running switches (a changed port
//! is removed, then added again); a switch's own settings, and whole
//! switches, take effect after a restart and are listed as such.
//!
//! Plans compare validated values ([`ValidSwitch`]), so a file that
//! spells out a default, or writes the same port in another order of
//! keys, plans nothing.

use super::{ValidPort, ValidSwitch};

/// One port change, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortChange {
    /// Port `port.name` joins running switch `switch`.
    Add { switch: String, port: ValidPort },
    /// Port `port` leaves running switch `switch`; `nic` when it is a
    /// guest NIC (its VMBus offer is rescinded).
    Remove {
        switch: String,
        port: String,
        nic: bool,
    },
}

/// A change that waits for a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchRestart {
    /// A switch that is in the file but not running.
    Added(String),
    /// A running switch that is no longer in the file.
    Removed(String),
    /// A running switch whose own settings changed.
    Settings(String),
}

impl std::fmt::Display for PortChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortChange::Add { switch, port } if port.is_nic() => {
                write!(f, "guest NIC {} added to switch {switch}", port.name)
            }
            PortChange::Add { switch, port } => {
                write!(f, "port {} added to switch {switch}", port.name)
            }
            PortChange::Remove { switch, port, nic } => {
                let what = if *nic { "guest NIC" } else { "port" };
                write!(f, "{what} {port} removed from switch {switch}")
            }
        }
    }
}

impl std::fmt::Display for SwitchRestart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwitchRestart::Added(s) => write!(f, "switch {s} was added"),
            SwitchRestart::Removed(s) => write!(f, "switch {s} was removed"),
            SwitchRestart::Settings(s) => write!(f, "settings of switch {s} changed"),
        }
    }
}

/// The plan that brings `running` to `wanted`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchPlan {
    pub ports: Vec<PortChange>,
    pub restart: Vec<SwitchRestart>,
}

impl SwitchPlan {
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty() && self.restart.is_empty()
    }
}

/// Plans the port changes from `running` to `wanted`, in switch order:
/// removals of a switch's ports before its additions, so a port may move
/// its tap or name to another port in one reload.
pub fn plan(running: &[ValidSwitch], wanted: &[ValidSwitch]) -> SwitchPlan {
    let mut out = SwitchPlan::default();
    for old in running {
        if !wanted.iter().any(|w| w.name == old.name) {
            out.restart.push(SwitchRestart::Removed(old.name.clone()));
        }
    }
    for new in wanted {
        let Some(old) = running.iter().find(|r| r.name == new.name) else {
            out.restart.push(SwitchRestart::Added(new.name.clone()));
            continue;
        };
        if old.settings != new.settings {
            out.restart.push(SwitchRestart::Settings(new.name.clone()));
        }
        plan_ports(old, new, &mut out.ports);
    }
    out
}

fn plan_ports(old: &ValidSwitch, new: &ValidSwitch, out: &mut Vec<PortChange>) {
    let find = |sw: &ValidSwitch, name: &str| sw.ports.iter().find(|p| p.name == name).cloned();
    let changed = |p: &ValidPort| find(new, &p.name).is_none_or(|n| n != *p);
    for p in old.ports.iter().filter(|p| changed(p)) {
        out.push(PortChange::Remove {
            switch: old.name.clone(),
            port: p.name.clone(),
            nic: p.is_nic(),
        });
    }
    for p in &new.ports {
        if find(old, &p.name).as_ref() != Some(p) {
            out.push(PortChange::Add {
                switch: new.name.clone(),
                port: p.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SwitchConfig, validate};
    use std::path::Path;

    fn switches(text: &str) -> Vec<ValidSwitch> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            switch: Vec<SwitchConfig>,
        }
        let f: File = toml::from_str(text).unwrap();
        validate(&f.switch, Path::new("/etc/vspa")).unwrap()
    }

    const NIC_A: &str = "[[switch.port]]\nname = \"a\"\nnetvsp = {}\n";
    const NIC_B: &str = "[[switch.port]]\nname = \"b\"\nnetvsp = { mtu = 9000 }\n";
    const TAP: &str = "[[switch.port]]\nname = \"t\"\ntap = { ifname = \"t0\" }\n";

    fn sw(body: &str) -> String {
        format!("[[switch]]\nname = \"s\"\n{body}")
    }

    fn names(p: &SwitchPlan) -> Vec<String> {
        p.ports.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn equal_files_plan_nothing_even_when_written_differently() {
        let base = switches(&sw(&format!("{NIC_A}{TAP}")));
        assert!(plan(&base, &base).is_empty());
        // Every default spelled out, keys in another order, the derived
        // MAC and GUID written as what they derive to.
        let nic = match &base[0].ports[0].kind {
            crate::config::PortKind::Netvsp(n) => n.clone(),
            other => panic!("{other:?}"),
        };
        let spelled = format!(
            "[[switch]]\nname = \"s\"\nmac_table_size = 4096\nmac_age_secs = 300\nworkers = 1\n\
             netvsp_workers = 1\nspin_us = 50\ncpus = []\n\
             [[switch.port]]\nname = \"a\"\nqueue_len = 1024\nvlan = {{ mode = \"access\", id = 1 }}\n\
             netvsp = {{ channels = 4, mtu = 1500, link_speed_mbps = 10000, mac = \"{}\", instance = \"{}\" }}\n\
             mac_spoof_guard = false\nallowed_macs = [\"02:00:00:00:00:09\"]\n\
             [[switch.port]]\ntap = {{ offloads = true, ifname = \"t0\" }}\nname = \"t\"\n",
            nic.mac, nic.instance
        );
        assert_eq!(plan(&base, &switches(&spelled)), SwitchPlan::default());
    }

    #[test]
    fn ports_are_added_removed_and_replaced() {
        let base = switches(&sw(&format!("{NIC_A}{TAP}")));
        let p = plan(&base, &switches(&sw(&format!("{NIC_A}{TAP}{NIC_B}"))));
        assert_eq!(names(&p), ["guest NIC b added to switch s"]);
        assert!(p.restart.is_empty());
        let p = plan(&base, &switches(&sw(TAP)));
        assert_eq!(
            p.ports,
            [PortChange::Remove {
                switch: "s".into(),
                port: "a".into(),
                nic: true
            }]
        );
        let p = plan(&base, &switches(&sw(NIC_A)));
        assert_eq!(names(&p), ["port t removed from switch s"]);
        // A changed NIC is rescinded and offered again.
        let changed = "[[switch.port]]\nname = \"a\"\nnetvsp = { mtu = 4000 }\n";
        let p = plan(&base, &switches(&sw(&format!("{changed}{TAP}"))));
        assert_eq!(
            names(&p),
            [
                "guest NIC a removed from switch s",
                "guest NIC a added to switch s"
            ]
        );
        // A NIC that becomes a tap port under the same name.
        let a_tap = "[[switch.port]]\nname = \"a\"\ntap = { ifname = \"a0\" }\n";
        let p = plan(&base, &switches(&sw(&format!("{a_tap}{TAP}"))));
        assert_eq!(
            names(&p),
            [
                "guest NIC a removed from switch s",
                "port a added to switch s"
            ]
        );
        // A policy change replaces the port.
        let vlan = "[[switch.port]]\nname = \"t\"\ntap = { ifname = \"t0\" }\nvlan = { mode = \"access\", id = 7 }\n";
        let p = plan(&base, &switches(&sw(&format!("{NIC_A}{vlan}"))));
        assert_eq!(
            names(&p),
            ["port t removed from switch s", "port t added to switch s"]
        );
    }

    #[test]
    fn switch_settings_and_whole_switches_need_a_restart() {
        let base = switches(&sw(&format!("{NIC_A}{TAP}")));
        let p = plan(
            &base,
            &switches(&format!(
                "[[switch]]\nname = \"s\"\nspin_us = 9\n{NIC_A}{TAP}"
            )),
        );
        assert!(p.ports.is_empty());
        assert_eq!(p.restart, [SwitchRestart::Settings("s".into())]);
        let p = plan(
            &base,
            &switches(&format!(
                "{}\n[[switch]]\nname = \"x\"\n",
                sw(&format!("{NIC_A}{TAP}"))
            )),
        );
        assert_eq!(p.restart, [SwitchRestart::Added("x".into())]);
        let p = plan(&base, &[]);
        assert_eq!(p.restart, [SwitchRestart::Removed("s".into())]);
        assert!(
            p.ports.is_empty(),
            "a removed switch keeps running until a restart"
        );
    }

    #[test]
    fn relative_pcap_paths_resolve_against_the_file() {
        let a = switches(&sw(
            "[[switch.port]]\nname = \"c\"\npcap = { path = \"cap.pcap\" }\n",
        ));
        let b = switches(&sw(
            "[[switch.port]]\nname = \"c\"\npcap = { path = \"/etc/vspa/cap.pcap\" }\n",
        ));
        assert!(plan(&a, &b).is_empty());
    }
}
