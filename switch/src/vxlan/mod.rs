//! VXLAN tunnel ports (RFC 7348): the switch's way off the machine to other
//! appliances, the Linux kernel's `vxlan` devices, Open vSwitch and
//! hardware VTEPs, over an IPv4 or IPv6 underlay.
//!
//! Place in the data path: a [`VxlanPort`] is a [`Port`](crate::Port) run
//! by a switch worker like a tap. Frames the switch queues to it are
//! encapsulated (`08 00 00 00 | VNI | 00` after a UDP header, exactly what
//! the kernel accepts) and sent from UDP sockets of its own to the remote
//! VTEP that the inner destination MAC was learned behind, or to every
//! configured remote for floods (head-end replication: broadcast,
//! multicast and unknown unicast). Received datagrams are checked
//! ([`wire::decap`]), their inner source MAC learned behind the outer
//! source IP ([`fdb`]) and the inner frames handed to the switch.
//!
//! Segments: each VNI of the port is mapped to a VLAN of the switch. With
//! one `vni`, the port is an access port of its `vlan` (frames cross
//! untagged); with `vnis = [{ vni, vlan }, ...]` it is a trunk of those
//! VLANs: a frame from VNI N enters the switch tagged with N's VLAN, a
//! frame of VLAN V leaves in V's VNI without its tag.
//!
//! Batching and offloads: datagrams are received with `recvmmsg` and, where
//! the kernel offers it, UDP GRO (many datagrams of one flow per buffer);
//! sent with `sendmmsg` and UDP GSO. A TCP GSO frame from a guest or tap
//! (the port takes TSO and partial checksums) leaves as one UDP GSO
//! "super-datagram" of VXLAN packets: vspa writes one header block per
//! segment (inner IP and TCP headers fixed up, checksums complete) and
//! points the kernel at the payload slices, and the kernel cuts the UDP
//! datagram at the segment boundaries. A partial inner checksum of a
//! non-GSO frame is completed on the way out.
//!
//! With `gso_tap = "NAME"` (Linux 6.17+) a TCP GSO frame for one remote
//! instead leaves whole, as a UDP-tunnel GSO packet written to tap NAME in
//! the underlay namespace, which the kernel forwards like its own VXLAN
//! device's super-packets and segments only where it leaves the host
//! ([`gso_tap`]; the namespace must forward, and over IPv4 have
//! `rp_filter` off). Other frames and floods keep the socket path; a frame
//! for the tap first sends the datagrams built before it, so frames leave
//! in order.
//!
//! MTU: `mtu` is the underlay's IP MTU. An inner frame (without FCS or
//! VLAN tag) may be `mtu - 36` bytes over IPv4 and `mtu - 56` over IPv6, so
//! the guests' IP MTU must be at most `mtu - 50` (IPv4 underlay) or
//! `mtu - 70` (IPv6): 1450 on a 1500-byte underlay (`ip link set dev X
//! mtu 1450` on a tap's peer; `mtu = 1450` on a netvsp port), or raise the
//! underlay MTU to 1550. Packets go out with DF set (never fragmented);
//! larger frames are dropped and counted (`tx_too_big`).
//!
//! Checksums: `udp_csum` is explicit, like the kernel's `udpcsum` /
//! `noudpcsum` (over IPv6, `false` is the kernel's `udp6zerocsumtx` and
//! `udp6zerocsumrx`). Received non-zero checksums are verified by the
//! kernel's UDP layer before vspa sees the datagram. UDP GSO needs
//! checksums, so a port with `udp_csum = false` sends one datagram per
//! segment. A peer on the same host behind a veth must checksum in software
//! (`ethtool -K DEV tx off`): a veth never completes a checksum its sender
//! left partial, and a UDP socket cannot tell such a datagram from others.
//!
//! Sources: datagrams from addresses that are neither a remote nor behind
//! a static entry are dropped and counted (`rx_unknown_source`) unless
//! `learn_unknown` is set. The UDP source port comes from a hash of the
//! inner flow: the port sends from `tx_sockets` sockets bound to ephemeral
//! ports (the kernel's `ip_local_port_range`, where the kernel's own VXLAN
//! picks its source ports), one chosen per flow.
//!
//! ```toml
//! [[switch.port]]
//! name = "dc2"
//! vxlan = { local = "10.200.0.2:4789", vnis = [{ vni = 100, vlan = 10 }, { vni = 200, vlan = 20 }], remotes = ["10.200.0.1", "10.200.0.3:4789"], static = [{ mac = "02:00:00:00:00:09", remote = "10.200.0.3" }], udp_csum = true, mtu = 1500, gso_tap = "vtep0" }
//! ```

mod fdb;
pub mod fuzz;
mod gso_tap;
mod port;
mod sys;
pub mod wire;

pub use fdb::{Fdb, Learn, RemoteId};
pub use port::VxlanPort;
pub use sys::Received;

use crate::config::VlanMode;
use crate::policy::VlanPolicy;
use crate::wire::MacAddr;
use serde::{Deserialize, Deserializer};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use wire::{MAX_VNI, OUTER_V4, OUTER_V6, VXLAN_PORT};

/// Most configured remotes plus static entries of one port (remote ids
/// are 16 bits, with room for learned sources).
pub const MAX_REMOTES: usize = 4096;

/// The `vxlan = { ... }` table of a switch port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VxlanConfig {
    /// Local address and UDP port: "10.200.0.2:4789", "[fd00::2]:4789".
    pub local: SocketAddr,
    /// The one VNI of an access port (its frames are in the port's `vlan`).
    pub vni: Option<u32>,
    /// VNIs of a trunk port, each mapped to a VLAN of the switch.
    #[serde(default)]
    pub vnis: Vec<VniVlan>,
    /// Remote VTEPs: "IP" (the local port number) or "IP:PORT". Floods go
    /// to each.
    #[serde(default)]
    pub remotes: Vec<Remote>,
    /// FDB entries that are never learned over.
    #[serde(default, rename = "static")]
    pub statics: Vec<StaticEntry>,
    /// Send UDP checksums (`udpcsum`) or zero (`noudpcsum`).
    pub udp_csum: bool,
    /// Accept (and learn from) datagrams of sources not configured.
    #[serde(default)]
    pub learn_unknown: bool,
    /// IP MTU of the underlay.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Most learned FDB entries.
    #[serde(default = "default_fdb_size")]
    pub fdb_size: usize,
    /// Seconds a learned FDB entry lives without traffic.
    #[serde(default = "default_fdb_age")]
    pub fdb_age_secs: u32,
    /// Sending sockets (UDP source ports) flows are spread over.
    #[serde(default = "default_tx_sockets")]
    pub tx_sockets: usize,
    /// Use UDP GSO on send and UDP GRO on receive where the kernel has them.
    #[serde(default = "default_true")]
    pub offloads: bool,
    /// Send TCP GSO frames as UDP-tunnel GSO packets through this tap,
    /// created in the underlay's namespace (see [`gso_tap`]).
    #[serde(default)]
    pub gso_tap: Option<String>,
}

fn default_mtu() -> u32 {
    1500
}
fn default_fdb_size() -> usize {
    4096
}
fn default_fdb_age() -> u32 {
    300
}
fn default_tx_sockets() -> usize {
    4
}
fn default_true() -> bool {
    true
}

/// One VNI <-> VLAN mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VniVlan {
    pub vni: u32,
    pub vlan: u16,
}

/// A static FDB entry: `mac` lives behind `remote` (in `vni`, or in every
/// VNI of the port).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEntry {
    pub mac: MacAddr,
    pub remote: Remote,
    pub vni: Option<u32>,
}

/// A remote VTEP address, with or without a UDP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl Remote {
    /// The address to send to, with the default port where none was given.
    pub fn addr(&self, default_port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(default_port))
    }
}

impl FromStr for Remote {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Remote {
                ip: a.ip(),
                port: Some(a.port()),
            });
        }
        s.parse::<IpAddr>()
            .map(|ip| Remote { ip, port: None })
            .map_err(|_| format!("invalid remote {s:?} (want IP or IP:PORT)"))
    }
}

impl<'de> Deserialize<'de> for Remote {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A VXLAN port as validated: its table with every remote's UDP port
/// spelled out, and its VNI <-> VLAN mappings (an access port's one VNI
/// mapped to the port's `vlan`), so two files that mean the same port give
/// equal values and a reload replaces the port only when it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub config: VxlanConfig,
    pub maps: Vec<VniVlan>,
}

impl VxlanSpec {
    /// Whether frames cross the port tagged (a trunk of several VNIs).
    pub fn trunk(&self) -> bool {
        self.config.vni.is_none()
    }

    /// The port's VLAN membership: the access VLAN of its one VNI, or a
    /// trunk of the mapped VLANs.
    pub fn vlan_policy(&self) -> VlanPolicy {
        match self.trunk() {
            true => {
                let vlans: Vec<u16> = self.maps.iter().map(|m| m.vlan).collect();
                VlanPolicy::trunk(&vlans, None)
            }
            false => VlanPolicy::access(self.maps[0].vlan),
        }
    }
}

impl VxlanConfig {
    /// Destination port of remotes given without one.
    pub fn default_port(&self) -> u16 {
        match self.local.port() {
            0 => VXLAN_PORT,
            p => p,
        }
    }

    /// Bytes in front of the inner frame on the wire.
    pub fn overhead(&self) -> usize {
        if self.local.is_ipv4() {
            OUTER_V4
        } else {
            OUTER_V6
        }
    }

    /// Largest inner frame (no FCS, no VLAN tag) that fits the MTU.
    pub fn max_inner(&self) -> usize {
        (self.mtu as usize).saturating_sub(self.overhead())
    }

    /// A `gso_tap` needs a tap name and the offloads.
    fn check_gso_tap(&self, tap: &str) -> Result<(), String> {
        crate::config::check_ifname(tap).map_err(|e| format!("gso_tap {tap:?}: {e}"))?;
        if !self.offloads {
            return Err("gso_tap sends GSO packets: it needs offloads = true".into());
        }
        Ok(())
    }

    /// Checks what serde cannot; `vlan` is the port's `vlan` setting.
    pub fn validate(&self, vlan: &VlanMode) -> Result<VxlanSpec, String> {
        let maps = match (self.vni, self.vnis.is_empty(), vlan) {
            (Some(vni), true, VlanMode::Access { id }) => vec![VniVlan { vni, vlan: *id }],
            (Some(_), true, VlanMode::Trunk { .. }) => {
                return Err(
                    "a vxlan port with one `vni` is an access port; use `vnis` to trunk".into(),
                );
            }
            (None, false, _) if *vlan != VlanMode::default() => {
                return Err(
                    "a vxlan port with `vnis` trunks the mapped VLANs; it takes no `vlan`".into(),
                );
            }
            (None, false, _) => self.vnis.clone(),
            _ => return Err("vxlan needs exactly one of `vni` and `vnis`".into()),
        };
        let trunk = self.vni.is_none();
        for (i, m) in maps.iter().enumerate() {
            if m.vni > MAX_VNI {
                return Err(format!("VNI {} is more than 24 bits", m.vni));
            }
            if trunk && !(1..=4094).contains(&m.vlan) {
                return Err(format!("VLAN {} not in 1..=4094", m.vlan));
            }
            if maps[..i].iter().any(|o| o.vni == m.vni || o.vlan == m.vlan) {
                return Err(format!("VNI {} or VLAN {} mapped twice", m.vni, m.vlan));
            }
        }
        if self.remotes.len() + self.statics.len() > MAX_REMOTES {
            return Err(format!("at most {MAX_REMOTES} remotes and static entries"));
        }
        let port = self.default_port();
        let family_ok = |ip: &IpAddr| ip.is_ipv4() == self.local.is_ipv4();
        for (i, r) in self.remotes.iter().enumerate() {
            if !family_ok(&r.ip) || r.ip.is_unspecified() || r.ip.is_multicast() {
                return Err(format!(
                    "remote {} must be a unicast address of the local address's family",
                    r.ip
                ));
            }
            if self.remotes[..i]
                .iter()
                .any(|o| o.addr(port) == r.addr(port))
            {
                return Err(format!("remote {} listed twice", r.ip));
            }
        }
        for (i, s) in self.statics.iter().enumerate() {
            if !family_ok(&s.remote.ip) || s.remote.ip.is_unspecified() {
                return Err(format!(
                    "static entry {}: bad remote {}",
                    s.mac, s.remote.ip
                ));
            }
            if s.mac.is_multicast() || s.mac.0 == [0; 6] {
                return Err(format!("static entry {}: not a unicast MAC", s.mac));
            }
            if let Some(vni) = s.vni
                && !maps.iter().any(|m| m.vni == vni)
            {
                return Err(format!(
                    "static entry {}: VNI {vni} is not on the port",
                    s.mac
                ));
            }
            let clash = |o: &StaticEntry| {
                o.mac == s.mac && (o.vni.is_none() || s.vni.is_none() || o.vni == s.vni)
            };
            if self.statics[..i].iter().any(clash) {
                return Err(format!("static entry {} given twice", s.mac));
            }
        }
        let min_mtu = self.overhead() as u32 + 68;
        if !(min_mtu..=65_535).contains(&self.mtu) {
            return Err(format!("vxlan mtu {} not in {min_mtu}..=65535", self.mtu));
        }
        if self.fdb_size == 0 || self.fdb_size > 1 << 20 {
            return Err("fdb_size must be 1..=1048576".into());
        }
        if self.fdb_age_secs == 0 {
            return Err("fdb_age_secs must be at least 1".into());
        }
        if self.tx_sockets == 0 || self.tx_sockets > 64 {
            return Err("tx_sockets must be 1..=64".into());
        }
        if let Some(tap) = &self.gso_tap {
            self.check_gso_tap(tap)?;
        }
        let resolve = |r: &Remote| Remote {
            port: Some(r.port.unwrap_or(port)),
            ..*r
        };
        let mut config = self.clone();
        config.remotes.iter_mut().for_each(|r| *r = resolve(r));
        config
            .statics
            .iter_mut()
            .for_each(|s| s.remote = resolve(&s.remote));
        Ok(VxlanSpec { config, maps })
    }
}

crate::stats::counters!(
    /// Counters of one VXLAN port.
    VxlanCounters, VxlanStats {
        /// VXLAN packets and inner bytes received and handed to the switch.
        rx_packets, rx_bytes,
        /// VXLAN packets and inner bytes sent (each copy of a flood counts).
        tx_packets, tx_bytes,
        /// Receive buffers holding several datagrams (UDP GRO).
        rx_gro_batches,
        /// UDP GSO sends (several VXLAN packets in one).
        tx_gso_sends,
        /// UDP-tunnel GSO packets written to the `gso_tap`, and frames it
        /// refused (their unsent segments took the socket path).
        tx_gso_tap_sends, tx_gso_tap_errors,
        /// Datagrams shorter than a VXLAN header, or cut by the buffer.
        drop_truncated,
        /// Flags other than I, or reserved bits set.
        drop_bad_flags,
        /// VNIs the port does not carry.
        drop_unknown_vni,
        /// Inner frames shorter than an Ethernet header.
        drop_short_inner,
        /// Inner frames longer than the MTU allows, received.
        drop_rx_too_big,
        /// Inner frames that carried their own 802.1Q tag.
        drop_inner_tag,
        /// Inner frames with a multicast or zero source MAC.
        drop_bad_source_mac,
        /// Datagrams from addresses neither remote nor static.
        drop_unknown_source,
        /// Inner source MACs that are static entries behind another VTEP.
        drop_static_conflict,
        /// Frames to send too large for the MTU once encapsulated.
        drop_tx_too_big,
        /// Frames to send in a VLAN without a VNI.
        drop_no_vni,
        /// Frames to flood with no remote configured.
        drop_no_remote,
        /// Frames whose offload state could not be carried out.
        drop_bad_offload,
        /// Datagrams the kernel refused to send.
        tx_errors,
        /// FDB entries learned, stations seen moving, learning refused (full).
        fdb_learned, fdb_moves, fdb_full,
        /// Live learned FDB entries (a gauge).
        fdb_entries,
    }
);

/// Traffic with one remote VTEP.
#[derive(Debug)]
pub struct RemoteCounters {
    pub addr: SocketAddr,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
}

/// What the control plane sees of a running VXLAN port: its counters, per
/// remote too. Served by internal ports while the port runs.
#[derive(Debug)]
pub struct VxlanShared {
    pub switch: String,
    pub port: String,
    pub counters: VxlanCounters,
    /// Configured remotes and static entries' remotes, in that order.
    pub remotes: Vec<RemoteCounters>,
    /// Cleared when the port is dropped: it stops serving counters.
    live: AtomicBool,
}

impl VxlanShared {
    fn new(switch: &str, port: &str, remotes: &[SocketAddr]) -> Self {
        let remotes = remotes
            .iter()
            .map(|&addr| RemoteCounters {
                addr,
                rx_packets: AtomicU64::new(0),
                rx_bytes: AtomicU64::new(0),
                tx_packets: AtomicU64::new(0),
                tx_bytes: AtomicU64::new(0),
            })
            .collect();
        VxlanShared {
            switch: switch.to_string(),
            port: port.to_string(),
            counters: VxlanCounters::default(),
            remotes,
            live: AtomicBool::new(true),
        }
    }

    pub fn stats(&self) -> VxlanStats {
        self.counters.snapshot()
    }

    /// Counts `packets` VXLAN packets with `bytes` of inner frames sent to
    /// remote `remote` (the port's and the remote's counters).
    fn count_tx(&self, remote: RemoteId, packets: u64, bytes: u64) {
        let c = &self.counters;
        c.tx_packets.fetch_add(packets, Ordering::Relaxed);
        c.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(r) = self.remotes.get(usize::from(remote)) {
            r.tx_packets.fetch_add(packets, Ordering::Relaxed);
            r.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The counters of the remote at `ip`.
    pub fn remote(&self, ip: IpAddr) -> Option<&RemoteCounters> {
        self.remotes.iter().find(|r| r.addr.ip() == ip)
    }
}

impl crate::internal::CounterSource for VxlanShared {
    fn write_counters(&self, out: &mut String) {
        if !self.live.load(Ordering::Relaxed) {
            return;
        }
        let prefix = format!("vxlan.{}.{}", self.switch, self.port);
        self.stats().each(|k, v| {
            let _ = writeln!(out, "{prefix}.{k} {v}");
        });
        for r in &self.remotes {
            let ip = r.addr.ip();
            for (k, c) in [
                ("rx_packets", &r.rx_packets),
                ("rx_bytes", &r.rx_bytes),
                ("tx_packets", &r.tx_packets),
                ("tx_bytes", &r.tx_bytes),
            ] {
                let _ = writeln!(
                    out,
                    "{prefix}.remote.{ip}.{k} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
    }

    fn retired(&self) -> bool {
        !self.live.load(Ordering::Relaxed)
    }
}

/// Opens VXLAN port `port` of switch `switch` for the runtime; its
/// counters join `sources` while it runs.
pub fn open_for_switch(
    switch: &str,
    port: &str,
    spec: &VxlanSpec,
    sources: &crate::internal::CounterSources,
) -> std::io::Result<Box<dyn crate::Port>> {
    let port = VxlanPort::open(switch, port, spec)?;
    sources.push(port.shared());
    Ok(Box::new(port))
}

#[cfg(test)]
mod tests;
