//! Switch configuration: the `[[switch]]` tables of the appliance's TOML file.
//!
//! The file is shared with the other subsystems (`[[controller]]` tables of
//! the storage VSP live beside `[[switch]]`), so this module only defines the
//! switch's part; the binary owns the top-level table. Every table rejects
//! unknown keys, and [`validate`] checks what serde cannot (names unique,
//! mirror targets exist, VLAN ids in range, exactly one port kind).
//!
//! ```toml
//! [[switch]]
//! name = "sw0"
//! mac_table_size = 4096      # entries, bounded
//! mac_age_secs = 300
//! workers = 1                # threads for this switch's taps/internal/pcap ports
//! netvsp_workers = 1         # threads for its netvsp ports (guest NICs)
//! spin_us = 50               # poll this long after the last frame before sleeping
//!
//! [[switch.port]]
//! name = "vm1"
//! tap = { ifname = "vspa-vm1", offloads = true }
//! vlan = { mode = "access", id = 10 }
//! mac_spoof_guard = true
//! allowed_macs = ["02:00:00:00:00:01"]
//! dhcp_guard = true
//! ra_guard = true
//! storm_limit_pps = 1000        # broadcast + multicast frames/s from the port
//! ingress_limit_mbps = 1000     # from the port into the switch
//! egress_limit_mbps = 1000      # from the switch to the port
//! mirror = "capture"            # copy both directions to that port
//! acl = [{ direction = "outbound", action = "deny", dst_ip = "10.0.0.0/8" }]
//!
//! [[switch.port]]
//! name = "uplink"
//! tap = { ifname = "vspa-up" }
//! vlan = { mode = "trunk", allowed = [10, 20], native = 1 }
//!
//! [[switch.port]]
//! name = "mgmt"
//! internal = { mac = "02:00:00:00:00:fe", ip = "10.0.0.254/24", counters_port = 9100 }
//!
//! [[switch.port]]
//! name = "capture"
//! pcap = { path = "/var/tmp/sw0.pcap" }
//!
//! [[switch.port]]
//! name = "vm2"                  # a netvsc NIC offered over VMBus
//! netvsp = { mac = "02:00:00:00:00:02", mtu = 1500, channels = 4 }
//! vlan = { mode = "access", id = 10 }
//! ```
//!
//! A `netvsp` port is a VMBus network device (its `instance` GUID defaults
//! to one derived from the switch and port names); it joins the switch while
//! a guest has it open.

use crate::internal::InternalSpec;
pub use crate::policy::{AclRule, Action, Direction, IpNet, VlanMode};
use crate::policy::{PortPolicy, VlanPolicy};
use crate::wire::MacAddr;
use serde::{Deserialize, Deserializer};
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

mod plan;
pub use plan::{PortChange, SwitchPlan, SwitchRestart, plan};

/// One `[[switch]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    pub name: String,
    /// Bound of the MAC learning table, in entries.
    #[serde(default = "default_table_size")]
    pub mac_table_size: usize,
    /// Seconds after which an unrefreshed MAC entry is forgotten.
    #[serde(default = "default_age")]
    pub mac_age_secs: u32,
    /// Worker threads for the switch's own ports (taps, internal, pcap);
    /// ports are spread over them round-robin.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Threads running the switch's netvsp ports (guest NICs); NICs are
    /// spread over them.
    #[serde(default = "default_workers")]
    pub netvsp_workers: usize,
    /// Microseconds a worker keeps polling after its last frame before it
    /// sleeps (0: sleep at once).
    #[serde(default = "default_spin")]
    pub spin_us: u32,
    /// CPUs the switch's threads are bound to: worker N on
    /// `cpus[N % len]`, then the netvsp threads continuing the count.
    /// Empty (the default): the scheduler places them. Binding keeps a
    /// worker's caches warm and stops the scheduler from pulling it onto
    /// the CPU of the sender it was woken by.
    #[serde(default)]
    pub cpus: Vec<usize>,
    #[serde(default, rename = "port")]
    pub ports: Vec<PortConfig>,
}

fn default_table_size() -> usize {
    4096
}
fn default_age() -> u32 {
    300
}
fn default_workers() -> usize {
    1
}
fn default_spin() -> u32 {
    50
}
fn default_queue_len() -> usize {
    1024
}
fn default_true() -> bool {
    true
}

/// One `[[switch.port]]` table: exactly one of `tap`, `internal`, `pcap`,
/// `netvsp`, `vxlan` plus policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    pub tap: Option<TapConfig>,
    pub internal: Option<InternalConfig>,
    pub pcap: Option<PcapConfig>,
    pub netvsp: Option<NetvspPortConfig>,
    /// A VXLAN tunnel port (see [`crate::vxlan`]).
    pub vxlan: Option<crate::vxlan::VxlanConfig>,
    #[serde(default)]
    pub vlan: VlanMode,
    /// Drop frames whose source MAC is not in `allowed_macs`.
    #[serde(default)]
    pub mac_spoof_guard: bool,
    #[serde(default)]
    pub allowed_macs: Vec<MacAddr>,
    /// Drop DHCP server messages coming from this port.
    #[serde(default)]
    pub dhcp_guard: bool,
    /// Drop router advertisements and redirects coming from this port.
    #[serde(default)]
    pub ra_guard: bool,
    #[serde(default)]
    pub acl: Vec<AclRule>,
    /// Name of a port in the same switch that gets a copy of every frame this
    /// port sends or receives.
    pub mirror: Option<String>,
    /// Broadcast and multicast frames per second accepted from the port.
    pub storm_limit_pps: Option<u32>,
    /// Megabits per second accepted from the port.
    pub ingress_limit_mbps: Option<u32>,
    /// Megabits per second sent to the port.
    pub egress_limit_mbps: Option<u32>,
    /// Frames the port's delivery queue holds before the switch drops.
    #[serde(default = "default_queue_len")]
    pub queue_len: usize,
}

/// A host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapConfig {
    /// Interface name (created if missing, at most 15 bytes).
    pub ifname: String,
    /// Negotiate checksum and TSO offloads with the kernel.
    #[serde(default = "default_true")]
    pub offloads: bool,
}

/// The appliance's own interface (a smoltcp stack).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalConfig {
    pub mac: MacAddr,
    /// Address and prefix, e.g. "10.0.0.254/24" (IPv4).
    pub ip: IpNet,
    /// TCP port of the counters service (plain text, one line per counter).
    pub counters_port: u16,
}

/// A pcap file sink: a mirror destination that is in no VLAN, so it holds
/// exactly the mirrored frames.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcapConfig {
    pub path: PathBuf,
}

/// A guest NIC: a netvsc-compatible VMBus network device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetvspPortConfig {
    /// Permanent MAC address (default: derived from the switch and port names).
    pub mac: Option<MacAddr>,
    /// VMBus instance GUID (default: derived from the switch and port names).
    pub instance: Option<String>,
    /// MTU reported to the guest.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Channels the guest may use (1 + sub-channels).
    #[serde(default = "default_channels")]
    pub channels: u16,
    /// Link speed reported to the guest, in Mbit/s.
    #[serde(default = "default_link_speed")]
    pub link_speed_mbps: u32,
}

fn default_mtu() -> u32 {
    1500
}
fn default_channels() -> u16 {
    4
}
fn default_link_speed() -> u32 {
    10_000
}

/// A locally administered unicast MAC address derived from a switch and
/// port name (stable across restarts): the default of guest NICs.
pub fn derived_mac(switch: &str, port: &str) -> MacAddr {
    let h = fnv(&[switch, port, "mac"], 0xcbf2_9ce4_8422_2325).to_be_bytes();
    MacAddr([0x02, h[1], h[2], h[3], h[4], h[5]])
}

/// FNV-1a over `parts`, for names that must stay stable across restarts.
fn fnv(parts: &[&str], seed: u64) -> u64 {
    let mut h = seed;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl NetvspPortConfig {
    /// The MAC address: given, or a locally administered one derived from
    /// the names.
    pub fn mac_for(&self, switch: &str, port: &str) -> MacAddr {
        self.mac.unwrap_or_else(|| derived_mac(switch, port))
    }

    /// The instance GUID: given, or derived from the names.
    pub fn instance_for(&self, switch: &str, port: &str) -> Result<vmbus::Guid, String> {
        match &self.instance {
            Some(s) => s
                .parse()
                .map_err(|_| format!("invalid instance GUID {s:?}")),
            None => {
                let a = fnv(&[switch, port, "netvsp"], 0xcbf2_9ce4_8422_2325);
                let b = fnv(&[switch, port, "netvsp"], 0x8422_2325_cbf2_9ce4);
                let d4 = b.to_le_bytes();
                Ok(vmbus::Guid::from_fields(
                    a as u32,
                    (a >> 32) as u16,
                    (a >> 48) as u16 & 0x0fff | 0x4000,
                    [
                        d4[0] & 0x3f | 0x80,
                        d4[1],
                        d4[2],
                        d4[3],
                        d4[4],
                        d4[5],
                        d4[6],
                        d4[7],
                    ],
                ))
            }
        }
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A configuration that parsed but does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("switch {switch:?}: {msg}")]
    Switch { switch: String, msg: String },
    #[error("switch {switch:?}, port {port:?}: {msg}")]
    Port {
        switch: String,
        port: String,
        msg: String,
    },
}

/// A switch as validated: defaults applied and every derived value (MAC
/// addresses, instance GUIDs, port policies, resolved paths) computed, so
/// two files that mean the same switch give equal values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSwitch {
    pub name: String,
    pub settings: SwitchSettings,
    pub ports: Vec<ValidPort>,
}

/// What a running switch keeps until a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchSettings {
    pub mac_table_size: usize,
    pub mac_age_secs: u32,
    pub workers: usize,
    pub netvsp_workers: usize,
    pub spin_us: u32,
    pub cpus: Vec<usize>,
}

/// A port as validated: exactly one kind, its policy in data-path form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPort {
    pub name: String,
    pub kind: PortKind,
    pub policy: PortPolicy,
    pub queue_len: usize,
}

/// What a port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortKind {
    /// A host tap device.
    Tap(TapConfig),
    /// The appliance's own interface.
    Internal(InternalSpec),
    /// A capture file (in no VLAN: it gets mirror copies only).
    Pcap(PcapConfig),
    /// A guest NIC offered over VMBus.
    Netvsp(NicSpec),
    /// A VXLAN tunnel to other VTEPs (boxed: its table is large).
    Vxlan(Box<crate::vxlan::VxlanSpec>),
}

/// A guest NIC with its derived MAC address and instance GUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub mac: MacAddr,
    pub instance: vmbus::Guid,
    pub mtu: u32,
    pub channels: u16,
    pub link_speed_mbps: u32,
}

impl ValidPort {
    /// Whether the port is a guest NIC (a VMBus device) rather than a port
    /// a switch worker runs.
    pub fn is_nic(&self) -> bool {
        matches!(self.kind, PortKind::Netvsp(_))
    }
}

/// Checks a list of switches for what serde cannot and returns them
/// validated; relative paths (pcap files) are resolved against `base`.
pub fn validate(switches: &[SwitchConfig], base: &Path) -> Result<Vec<ValidSwitch>, ConfigError> {
    let mut names = HashSet::new();
    let mut ifnames = HashSet::new();
    let mut out = Vec::new();
    for sw in switches {
        let err = |msg: String| ConfigError::Switch {
            switch: sw.name.clone(),
            msg,
        };
        if sw.name.is_empty() {
            return Err(err("name must not be empty".into()));
        }
        if !names.insert(sw.name.as_str()) {
            return Err(err("duplicate switch name".into()));
        }
        let settings = validate_settings(sw).map_err(err)?;
        if sw.ports.len() > crate::MAX_PORTS {
            return Err(err(format!("more than {} ports", crate::MAX_PORTS)));
        }
        let mut port_names = HashSet::new();
        for port in &sw.ports {
            if !port_names.insert(port.name.as_str()) {
                return Err(err(format!("duplicate port name {:?}", port.name)));
            }
        }
        let ports = sw
            .ports
            .iter()
            .map(|port| {
                validate_port(sw, port, base, &mut ifnames).map_err(|msg| ConfigError::Port {
                    switch: sw.name.clone(),
                    port: port.name.clone(),
                    msg,
                })
            })
            .collect::<Result<_, _>>()?;
        out.push(ValidSwitch {
            name: sw.name.clone(),
            settings,
            ports,
        });
    }
    Ok(out)
}

fn validate_settings(sw: &SwitchConfig) -> Result<SwitchSettings, String> {
    if sw.mac_table_size == 0 || sw.mac_table_size > 1 << 20 {
        return Err("mac_table_size must be 1..=1048576".into());
    }
    if sw.workers == 0 || sw.workers > 64 {
        return Err("workers must be 1..=64".into());
    }
    if sw.netvsp_workers == 0 || sw.netvsp_workers > 64 {
        return Err("netvsp_workers must be 1..=64".into());
    }
    if sw.spin_us > 1_000_000 {
        return Err("spin_us must be at most 1000000".into());
    }
    vmbus::cpu::check_list(&sw.cpus).map_err(|e| e.to_string())?;
    Ok(SwitchSettings {
        mac_table_size: sw.mac_table_size,
        mac_age_secs: sw.mac_age_secs,
        workers: sw.workers,
        netvsp_workers: sw.netvsp_workers,
        spin_us: sw.spin_us,
        cpus: sw.cpus.clone(),
    })
}

fn validate_port<'a>(
    sw: &SwitchConfig,
    port: &'a PortConfig,
    base: &Path,
    ifnames: &mut HashSet<&'a str>,
) -> Result<ValidPort, String> {
    let kinds = (
        &port.tap,
        &port.internal,
        &port.pcap,
        &port.netvsp,
        &port.vxlan,
    );
    let kind = match kinds {
        (Some(tap), None, None, None, None) => {
            validate_tap(tap, ifnames)?;
            PortKind::Tap(tap.clone())
        }
        (None, Some(int), None, None, None) => PortKind::Internal(validate_internal(int)?),
        (None, None, Some(pcap), None, None) => {
            if port.vlan != VlanMode::default() {
                return Err("a pcap port gets mirror copies only; it takes no `vlan`".into());
            }
            PortKind::Pcap(PcapConfig {
                path: base.join(&pcap.path),
            })
        }
        (None, None, None, Some(n), None) => PortKind::Netvsp(validate_nic(sw, port, n)?),
        (None, None, None, None, Some(v)) => {
            let spec = v.validate(&port.vlan)?;
            if let Some(tap) = &v.gso_tap {
                claim_ifname(tap, ifnames)?;
            }
            PortKind::Vxlan(Box::new(spec))
        }
        _ => {
            return Err("needs exactly one of `tap`, `internal`, `pcap`, `netvsp`, `vxlan`".into());
        }
    };
    let policy = validate_policy(sw, port)?;
    let policy = match &kind {
        // A capture file gets mirror copies only, never forwarded frames.
        PortKind::Pcap(_) => PortPolicy {
            vlan: VlanPolicy::none(),
            ..policy
        },
        // A tunnel is in the VLANs its VNIs are mapped to.
        PortKind::Vxlan(v) => PortPolicy {
            vlan: v.vlan_policy(),
            ..policy
        },
        _ => policy,
    };
    if port.queue_len == 0 || port.queue_len > 1 << 16 {
        return Err("queue_len must be 1..=65536".into());
    }
    Ok(ValidPort {
        name: port.name.clone(),
        kind,
        policy,
        queue_len: port.queue_len,
    })
}

fn validate_tap<'a>(tap: &'a TapConfig, ifnames: &mut HashSet<&'a str>) -> Result<(), String> {
    check_ifname(&tap.ifname).map_err(|e| format!("invalid tap ifname {:?}: {e}", tap.ifname))?;
    claim_ifname(&tap.ifname, ifnames)
}

/// The one rule for the names of the taps vspa creates (a tap port's
/// `ifname`, a VXLAN port's `gso_tap`): what the kernel accepts as a
/// device name.
pub(crate) fn check_ifname(name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if ok {
        return Ok(());
    }
    Err("not an interface name (1..=15 bytes, no '/', ':' or spaces)".into())
}

/// Records a tap name of the configuration: each may be created once.
fn claim_ifname<'a>(name: &'a str, ifnames: &mut HashSet<&'a str>) -> Result<(), String> {
    if !ifnames.insert(name) {
        return Err(format!("tap {name:?} used twice"));
    }
    Ok(())
}

fn validate_internal(int: &InternalConfig) -> Result<InternalSpec, String> {
    if int.mac.is_multicast() || int.mac.0 == [0; 6] {
        return Err("internal mac must be a unicast address".into());
    }
    let IpAddr::V4(ip) = int.ip.addr else {
        return Err("internal ip must be IPv4".into());
    };
    if int.counters_port == 0 {
        return Err("counters_port must not be 0".into());
    }
    Ok(InternalSpec {
        mac: int.mac,
        ip,
        prefix: int.ip.prefix,
        counters_port: int.counters_port,
    })
}

fn validate_nic(
    sw: &SwitchConfig,
    port: &PortConfig,
    n: &NetvspPortConfig,
) -> Result<NicSpec, String> {
    if !(68..=9000).contains(&n.mtu) {
        return Err(format!("netvsp mtu {} not in 68..=9000", n.mtu));
    }
    if n.channels == 0 || n.channels > crate::netvsp::MAX_CHANNELS {
        return Err(format!(
            "netvsp channels must be 1..={}",
            crate::netvsp::MAX_CHANNELS
        ));
    }
    let mac = n.mac_for(&sw.name, &port.name);
    if mac.is_multicast() || mac.0 == [0; 6] {
        return Err("netvsp mac must be a unicast address".into());
    }
    Ok(NicSpec {
        mac,
        instance: n.instance_for(&sw.name, &port.name)?,
        mtu: n.mtu,
        channels: n.channels,
        link_speed_mbps: n.link_speed_mbps,
    })
}

fn validate_policy(sw: &SwitchConfig, port: &PortConfig) -> Result<PortPolicy, String> {
    let vid_ok = |v: u16| (1..=4094).contains(&v);
    match &port.vlan {
        VlanMode::Access { id } if !vid_ok(*id) => {
            return Err(format!("VLAN {id} not in 1..=4094"));
        }
        VlanMode::Trunk { allowed, native } => {
            if let Some(v) = allowed.iter().chain(native).find(|&&v| !vid_ok(v)) {
                return Err(format!("VLAN {v} not in 1..=4094"));
            }
        }
        _ => {}
    }
    if let Some(target) = &port.mirror {
        if target == &port.name {
            return Err("a port cannot mirror to itself".into());
        }
        if !sw.ports.iter().any(|p| &p.name == target) {
            return Err(format!(
                "mirror target {target:?} is not a port of this switch"
            ));
        }
    }
    for limit in [
        port.storm_limit_pps,
        port.ingress_limit_mbps,
        port.egress_limit_mbps,
    ] {
        if limit == Some(0) {
            return Err("a limit of 0 would drop everything; leave it out for no limit".into());
        }
    }
    if port.mac_spoof_guard && port.allowed_macs.is_empty() {
        return Err("mac_spoof_guard needs allowed_macs".into());
    }
    Ok(PortPolicy {
        vlan: VlanPolicy::from(&port.vlan),
        allowed_macs: port.mac_spoof_guard.then(|| port.allowed_macs.clone()),
        dhcp_guard: port.dhcp_guard,
        ra_guard: port.ra_guard,
        acl: port.acl.clone(),
        mirror: port.mirror.clone(),
        storm_limit_pps: port.storm_limit_pps,
        ingress_limit_mbps: port.ingress_limit_mbps,
        egress_limit_mbps: port.egress_limit_mbps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        switch: Vec<SwitchConfig>,
    }

    fn parse(s: &str) -> Result<Vec<SwitchConfig>, String> {
        let f: File = toml::from_str(s).map_err(|e| e.to_string())?;
        validate(&f.switch, Path::new("/cfg")).map_err(|e| e.to_string())?;
        Ok(f.switch)
    }

    #[test]
    fn parses_the_documented_example() {
        let doc = include_str!("mod.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.strip_prefix("//! ").unwrap_or("").to_string() + "\n")
            .collect();
        let sw = parse(&example).unwrap();
        assert_eq!(sw.len(), 1);
        assert_eq!(sw[0].ports.len(), 5);
        let nv = sw[0].ports[4].netvsp.as_ref().unwrap();
        assert_eq!(nv.mac_for("sw0", "vm2").to_string(), "02:00:00:00:00:02");
        assert_eq!((nv.mtu, nv.channels), (1500, 4));
        let vm1 = &sw[0].ports[0];
        assert_eq!(vm1.vlan, VlanMode::Access { id: 10 });
        assert!(vm1.tap.as_ref().unwrap().offloads);
        assert_eq!(vm1.acl[0].action, Action::Deny);
        assert!(
            vm1.acl[0]
                .dst_ip
                .unwrap()
                .contains("10.2.3.4".parse().unwrap())
        );
        assert_eq!(
            sw[0].ports[1].vlan,
            VlanMode::Trunk {
                allowed: vec![10, 20],
                native: Some(1)
            }
        );
        assert_eq!(
            sw[0].ports[2].internal.as_ref().unwrap().counters_port,
            9100
        );
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let cases = [
            (
                "[[switch]]\nname = \"a\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"x\", speed = 1 }\n",
                "unknown field `speed`",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"x\" }\nvlan = { mode = \"access\", id = 10, native = 1 }\n",
                "unknown field `native`",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\npcap = { path = \"/x\" }\ntap = { ifname = \"x\" }\n",
                "exactly one of",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\nnetvsp = { mtu = 20000 }\n",
                "netvsp mtu",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\nnetvsp = { mac = \"03:00:00:00:00:01\" }\n",
                "unicast",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\nnetvsp = { channels = 0 }\n",
                "netvsp channels",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\nnetvsp = { instance = \"nope\" }\n",
                "invalid instance GUID",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"x\" }\nvlan = { mode = \"access\", id = 4095 }\n",
                "VLAN 4095",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"x\" }\nmirror = \"q\"\n",
                "mirror target",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"x\" }\nallowed_macs = [\"01:02\"]\n",
                "invalid MAC",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"x\" }\nacl = [{ direction = \"outbound\", action = \"deny\", src_ip = \"10.0.0.0/33\" }]\n",
                "invalid prefix",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"x\" }\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"y\" }\n",
                "duplicate port",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"averyverylongname\" }\n",
                "invalid tap ifname",
            ),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\ntap = { ifname = \"vt0\" }\n[[switch.port]]\nname = \"v\"\nvxlan = { local = \"10.0.0.2:4789\", vni = 1, udp_csum = true, gso_tap = \"vt0\" }\n",
                "tap \"vt0\" used twice",
            ),
            (
                "[[switch]]\nname = \"a\"\nmac_table_size = 0\n",
                "mac_table_size",
            ),
            (
                "[[switch]]\nname = \"a\"\ncpus = [0, 1024]\n",
                "cpu 1024 is past the last CPU number (1023)",
            ),
            ("[[switch]]\nname = \"a\"\ncpus = [-1]\n", "invalid value"),
            (
                "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\npcap = { path = \"/x\" }\nvlan = { mode = \"access\", id = 5 }\n",
                "takes no `vlan`",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}\n-> {err}\n(want {want})");
        }
    }

    #[test]
    fn netvsp_defaults_are_stable_and_distinct() {
        let sw = parse(
            "[[switch]]\nname = \"s\"\n[[switch.port]]\nname = \"a\"\nnetvsp = {}\n[[switch.port]]\nname = \"b\"\nnetvsp = {}\n",
        )
        .unwrap();
        let (a, b) = (
            sw[0].ports[0].netvsp.as_ref().unwrap(),
            sw[0].ports[1].netvsp.as_ref().unwrap(),
        );
        let ma = a.mac_for("s", "a");
        assert_eq!(ma, a.mac_for("s", "a"));
        assert_ne!(ma, b.mac_for("s", "b"));
        assert_eq!(ma.0[0], 2, "locally administered unicast");
        let ga = a.instance_for("s", "a").unwrap();
        assert_eq!(ga, a.instance_for("s", "a").unwrap());
        assert_ne!(ga, b.instance_for("s", "b").unwrap());
    }

    #[test]
    fn ip_prefixes_match() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let any: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("1.2.3.4".parse().unwrap()));
        let host: IpNet = "fe80::1".parse().unwrap();
        assert_eq!(host.prefix, 128);
        assert!(host.contains("fe80::1".parse().unwrap()));
        assert!(!host.contains("fe80::2".parse().unwrap()));
    }
}
