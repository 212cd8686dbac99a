//! Per-port policy in the form the data path reads: VLAN membership as a
//! bitmap, guards as flags, ACL rules, and token buckets for rate limits and
//! storm control. Built once from the configuration; immutable afterwards
//! except for the buckets, which only the thread that owns the port touches.

use crate::frame::FrameInfo;
use crate::wire::MacAddr;
use serde::{Deserialize, Deserializer};
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Instant;

/// VLAN mode of a port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum VlanMode {
    /// Untagged frames belong to VLAN `id`; tagged frames other than
    /// priority-tagged (VLAN 0) ones are dropped.
    Access { id: u16 },
    /// Tagged frames of the `allowed` VLANs; untagged frames belong to
    /// `native` (dropped when there is none) and leave untagged.
    Trunk {
        allowed: Vec<u16>,
        native: Option<u16>,
    },
}

impl Default for VlanMode {
    fn default() -> Self {
        VlanMode::Access { id: 1 }
    }
}

/// Direction of an ACL rule, seen from the port's owner (as Hyper-V does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Frames the switch delivers to the port.
    Inbound,
    /// Frames the port sends into the switch.
    Outbound,
    Both,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One ACL rule: every field given must match; the first matching rule of a
/// port decides; frames no rule matches are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub direction: Direction,
    pub action: Action,
    pub src_mac: Option<MacAddr>,
    pub dst_mac: Option<MacAddr>,
    pub src_ip: Option<IpNet>,
    pub dst_ip: Option<IpNet>,
}

/// An IP prefix, "10.0.0.0/8" or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("invalid IP address in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?} (0..={max})"))?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// VLAN membership of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanPolicy {
    /// Access VLAN (untagged on the wire); None for a trunk.
    access: Option<u16>,
    /// Trunk: VLANs carried tagged (bit per VLAN id).
    allowed: Box<[u64; 64]>,
    /// Trunk: VLAN of untagged frames, sent untagged.
    native: Option<u16>,
}

/// How a frame leaves a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// The port is not in the frame's VLAN.
    NotMember,
    Untagged,
    Tagged,
}

impl VlanPolicy {
    pub fn access(id: u16) -> Self {
        VlanPolicy {
            access: Some(id),
            allowed: Box::new([0; 64]),
            native: None,
        }
    }

    /// In no VLAN: the port gets only mirror copies (a capture sink).
    pub fn none() -> Self {
        VlanPolicy::trunk(&[], None)
    }

    pub fn trunk(allowed: &[u16], native: Option<u16>) -> Self {
        let mut bits = Box::new([0u64; 64]);
        for &v in allowed {
            let v = usize::from(v & 0x0fff);
            bits[v / 64] |= 1 << (v % 64);
        }
        VlanPolicy {
            access: None,
            allowed: bits,
            native,
        }
    }

    fn allows(&self, vid: u16) -> bool {
        let v = usize::from(vid & 0x0fff);
        self.allowed[v / 64] & (1 << (v % 64)) != 0
    }

    /// The VLAN a frame received with tag VLAN id `tag` belongs to, or None if
    /// the port does not accept it. VLAN 0 (priority tag) counts as untagged.
    pub fn ingress_vid(&self, tag: Option<u16>) -> Option<u16> {
        let untagged = matches!(tag, None | Some(0));
        match (self.access, untagged) {
            (Some(id), true) => Some(id),
            (Some(_), false) => None,
            (None, true) => self.native,
            (None, false) => tag.filter(|&v| self.allows(v)),
        }
    }

    /// How a frame of VLAN `vid` leaves this port.
    pub fn egress(&self, vid: u16) -> Egress {
        match self.access {
            Some(id) if id == vid => Egress::Untagged,
            Some(_) => Egress::NotMember,
            None if self.native == Some(vid) => Egress::Untagged,
            None if self.allows(vid) => Egress::Tagged,
            None => Egress::NotMember,
        }
    }
}

impl From<&VlanMode> for VlanPolicy {
    fn from(mode: &VlanMode) -> Self {
        match mode {
            VlanMode::Access { id } => VlanPolicy::access(*id),
            VlanMode::Trunk { allowed, native } => VlanPolicy::trunk(allowed, *native),
        }
    }
}

/// Immutable policy of one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    pub vlan: VlanPolicy,
    /// Source MACs the port may use; None = any (no spoofing guard).
    pub allowed_macs: Option<Vec<MacAddr>>,
    pub dhcp_guard: bool,
    pub ra_guard: bool,
    pub acl: Vec<AclRule>,
    /// Name of the port that receives copies of this port's traffic.
    pub mirror: Option<String>,
    pub storm_limit_pps: Option<u32>,
    pub ingress_limit_mbps: Option<u32>,
    pub egress_limit_mbps: Option<u32>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        PortPolicy {
            vlan: VlanPolicy::access(1),
            allowed_macs: None,
            dhcp_guard: false,
            ra_guard: false,
            acl: Vec::new(),
            mirror: None,
            storm_limit_pps: None,
            ingress_limit_mbps: None,
            egress_limit_mbps: None,
        }
    }
}

impl PortPolicy {
    /// Whether the ACL lets a frame through in `dir` (first match decides;
    /// no match allows).
    pub fn acl_allows(&self, dir: Direction, info: &FrameInfo) -> bool {
        self.acl
            .iter()
            .find(|r| {
                (r.direction == dir || r.direction == Direction::Both) && rule_matches(r, info)
            })
            .is_none_or(|r| r.action == Action::Allow)
    }
}

fn rule_matches(r: &AclRule, info: &FrameInfo) -> bool {
    let ips = info.ip;
    r.src_mac.is_none_or(|m| m == info.src)
        && r.dst_mac.is_none_or(|m| m == info.dst)
        && r.src_ip
            .is_none_or(|net| ips.is_some_and(|(s, _)| net.contains(s)))
        && r.dst_ip
            .is_none_or(|net| ips.is_some_and(|(_, d)| net.contains(d)))
}

/// A token bucket: `rate` units per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst_nanos: u128,
    /// Tokens, in units of 1e-9 (so refills need no division).
    nanos: u128,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let burst_nanos = u128::from(burst) * 1_000_000_000;
        TokenBucket {
            rate,
            burst_nanos,
            nanos: burst_nanos,
            last: now,
        }
    }

    /// Bucket for a frames-per-second limit: one second of burst.
    pub fn frames(pps: u32, now: Instant) -> Self {
        TokenBucket::new(u64::from(pps), u64::from(pps), now)
    }

    /// Bucket for a megabit-per-second limit, in bytes: 10 ms of burst but at
    /// least two maximal GSO frames.
    pub fn bytes(mbps: u32, now: Instant) -> Self {
        let rate = u64::from(mbps) * 1_000_000 / 8;
        TokenBucket::new(rate, (rate / 100).max(2 * 65_536), now)
    }

    /// Takes `cost` tokens if there are enough.
    pub fn take(&mut self, cost: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        self.nanos = (self.nanos + elapsed * u128::from(self.rate)).min(self.burst_nanos);
        let need = u128::from(cost) * 1_000_000_000;
        if self.nanos >= need {
            self.nanos -= need;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn access_vlan_membership() {
        let p = VlanPolicy::access(10);
        assert_eq!(p.ingress_vid(None), Some(10));
        assert_eq!(p.ingress_vid(Some(0)), Some(10), "priority tag");
        assert_eq!(p.ingress_vid(Some(10)), None, "tagged frames are dropped");
        assert_eq!(p.egress(10), Egress::Untagged);
        assert_eq!(p.egress(11), Egress::NotMember);
    }

    #[test]
    fn trunk_vlan_membership() {
        let p = VlanPolicy::trunk(&[20, 30, 4094], Some(1));
        assert_eq!(p.ingress_vid(None), Some(1));
        assert_eq!(p.ingress_vid(Some(20)), Some(20));
        assert_eq!(p.ingress_vid(Some(4094)), Some(4094));
        assert_eq!(p.ingress_vid(Some(21)), None);
        assert_eq!(p.egress(1), Egress::Untagged);
        assert_eq!(p.egress(30), Egress::Tagged);
        assert_eq!(p.egress(31), Egress::NotMember);
        let no_native = VlanPolicy::trunk(&[5], None);
        assert_eq!(no_native.ingress_vid(None), None);
        let none = VlanPolicy::none();
        assert_eq!(none.ingress_vid(None), None);
        assert!((0..4096).all(|v| none.egress(v) == Egress::NotMember));
    }

    #[test]
    fn token_bucket_limits_and_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::frames(10, t0);
        let passed = (0..50).filter(|_| b.take(1, t0)).count();
        assert_eq!(passed, 10, "one second of burst");
        assert!(!b.take(1, t0 + Duration::from_millis(50)));
        assert!(
            b.take(1, t0 + Duration::from_millis(160)),
            "refilled at 10/s"
        );
        let mut bytes = TokenBucket::bytes(8, t0); // 1 MB/s, burst 128 KiB
        assert!(bytes.take(131_072, t0));
        assert!(!bytes.take(1000, t0));
        assert!(bytes.take(1000, t0 + Duration::from_millis(1)));
    }
}
