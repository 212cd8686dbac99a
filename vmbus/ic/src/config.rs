//! Per-guest IC configuration: the `[tenant.ic]` table (or `vspa run`'s
//! options) as one plain struct. Every field has a default, so an empty
//! table turns every service on with Hyper-V-like timing.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// Which services a guest gets and how they behave.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IcConfig {
    pub shutdown: bool,
    pub timesync: bool,
    pub heartbeat: bool,
    pub kvp: bool,
    pub vss: bool,
    /// Time between heartbeats (Hyper-V's comment in Linux says 2 s).
    pub heartbeat_period_ms: u64,
    /// Missed heartbeats in a row before the guest counts as unresponsive.
    pub heartbeat_misses: u32,
    /// Time between time samples (Linux calls a sample older than 600 s
    /// stale; Hyper-V sends one every 5 s).
    pub timesync_period_ms: u64,
    /// Whether a hibernate request may be sent at all.
    pub hibernate: bool,
    /// How long the host waits for any reply before reporting a timeout.
    pub reply_timeout_ms: u64,
    /// Time between refreshes of the guest's KVP pools (Guest and Auto,
    /// with its IP addresses); 0 refreshes only on request.
    pub kvp_refresh_ms: u64,
    /// Host name published in the AutoExternal pool ("" = this machine's).
    pub host_name: String,
    /// VM name published in the AutoExternal pool ("" = the set's name).
    pub vm_name: String,
    /// Values pushed into the External pool when the channel is ready.
    pub kvp_external: BTreeMap<String, String>,
    /// Longest time the guest's file systems may stay frozen before the
    /// host thaws them itself.
    pub vss_freeze_limit_ms: u64,
}

impl Default for IcConfig {
    fn default() -> Self {
        IcConfig {
            shutdown: true,
            timesync: true,
            heartbeat: true,
            kvp: true,
            vss: true,
            heartbeat_period_ms: 2000,
            heartbeat_misses: 3,
            timesync_period_ms: 5000,
            hibernate: false,
            reply_timeout_ms: 5000,
            kvp_refresh_ms: 30_000,
            host_name: String::new(),
            vm_name: String::new(),
            kvp_external: BTreeMap::new(),
            vss_freeze_limit_ms: 60_000,
        }
    }
}

/// A configuration value the services cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ic.{field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl IcConfig {
    /// Checks ranges and string sizes (KVP keys and values must fit the
    /// wire's 512- and 2048-byte UTF-16 fields).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| ConfigError {
            field,
            reason: reason.to_string(),
        };
        for (field, ms) in [
            ("heartbeat_period_ms", self.heartbeat_period_ms),
            ("timesync_period_ms", self.timesync_period_ms),
            ("reply_timeout_ms", self.reply_timeout_ms),
            ("vss_freeze_limit_ms", self.vss_freeze_limit_ms),
        ] {
            if ms == 0 {
                return Err(err(field, "must be more than 0"));
            }
        }
        if self.timesync_period_ms > 600_000 {
            return Err(err(
                "timesync_period_ms",
                "Linux calls samples older than 600000 ms stale",
            ));
        }
        if self.heartbeat_misses == 0 {
            return Err(err("heartbeat_misses", "must be at least 1"));
        }
        for (k, v) in &self.kvp_external {
            crate::kvp::check_entry(k, v).map_err(|e| err("kvp_external", &e.to_string()))?;
        }
        for (field, v) in [("host_name", &self.host_name), ("vm_name", &self.vm_name)] {
            crate::kvp::check_entry("VirtualMachineName", v)
                .map_err(|e| err(field, &e.to_string()))?;
        }
        Ok(())
    }

    pub fn heartbeat_period(&self) -> Duration {
        Duration::from_millis(self.heartbeat_period_ms)
    }
    pub fn timesync_period(&self) -> Duration {
        Duration::from_millis(self.timesync_period_ms)
    }
    pub fn reply_timeout(&self) -> Duration {
        Duration::from_millis(self.reply_timeout_ms)
    }
    pub fn kvp_refresh(&self) -> Option<Duration> {
        (self.kvp_refresh_ms > 0).then(|| Duration::from_millis(self.kvp_refresh_ms))
    }
    pub fn vss_freeze_limit(&self) -> Duration {
        Duration::from_millis(self.vss_freeze_limit_ms)
    }

    /// Whether `service` is on.
    pub fn enabled(&self, service: crate::Service) -> bool {
        use crate::Service::*;
        match service {
            Shutdown => self.shutdown,
            TimeSync => self.timesync,
            Heartbeat => self.heartbeat,
            Kvp => self.kvp,
            Vss => self.vss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_is_all_on() {
        let c: IcConfig = toml::from_str("").unwrap();
        assert_eq!(c, IcConfig::default());
        assert!(crate::Service::ALL.iter().all(|s| c.enabled(*s)));
        c.validate().unwrap();
    }

    #[test]
    fn parses_a_full_table() {
        let c: IcConfig = toml::from_str(
            r#"
            vss = false
            heartbeat_period_ms = 500
            heartbeat_misses = 2
            hibernate = true
            vm_name = "web-1"
            [kvp_external]
            role = "frontend"
            "#,
        )
        .unwrap();
        assert!(!c.vss && c.hibernate && c.shutdown);
        assert_eq!(c.heartbeat_period(), Duration::from_millis(500));
        assert_eq!(c.kvp_external["role"], "frontend");
        c.validate().unwrap();
    }

    #[test]
    fn refuses_unknown_fields_and_bad_values() {
        assert!(toml::from_str::<IcConfig>("heartbeat_secs = 3").is_err());
        let c = IcConfig {
            heartbeat_misses: 0,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "heartbeat_misses");
        let c = IcConfig {
            kvp_external: [("k".repeat(300), "v".into())].into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "kvp_external");
    }
}
