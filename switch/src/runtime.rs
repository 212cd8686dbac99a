//! Builds running switches from configuration: one switch per `[[switch]]`
//! table and one worker thread per switch owning its tap, internal and pcap
//! ports. Ports added later by other subsystems (netvsp) attach to the same
//! [`Switch`] objects through [`Runtime::switch`].

use crate::config::{self, ConfigError, PortConfig, SwitchConfig};
use crate::core::{PortSpec, Switch, SwitchError};
use crate::internal::{CounterSource, InternalPort, InternalSpec};
use crate::pcap::PcapPort;
use crate::policy::{PortPolicy, VlanPolicy};
use crate::port::{Port, Worker, WorkerThread};
use crate::tap::TapPort;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why the switches could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("switch {switch:?}, port {port:?}")]
    Port {
        switch: String,
        port: String,
        source: io::Error,
    },
    #[error(transparent)]
    Switch(#[from] SwitchError),
    #[error("starting the worker of switch {switch:?}")]
    Worker { switch: String, source: io::Error },
}

/// Running switches and their workers; dropping it stops the workers.
#[derive(Debug)]
pub struct Runtime {
    switches: Vec<Arc<Switch>>,
    workers: Vec<WorkerThread>,
}

impl Runtime {
    /// The switches, in configuration order.
    pub fn switches(&self) -> &[Arc<Switch>] {
        &self.switches
    }

    /// The switch named `name`.
    pub fn switch(&self, name: &str) -> Option<&Arc<Switch>> {
        self.switches.iter().find(|s| s.name() == name)
    }

    /// Stops every worker and waits for them.
    pub fn stop(self) -> io::Result<()> {
        for w in self.workers {
            w.stop()?;
        }
        Ok(())
    }
}

/// Validates `configs` and starts them. Internal ports serve the counters of
/// every switch plus `extra` sources (other subsystems of the appliance).
pub fn start(
    configs: &[SwitchConfig],
    extra: &[Arc<dyn CounterSource>],
) -> Result<Runtime, RuntimeError> {
    config::validate(configs)?;
    let switches: Vec<Arc<Switch>> = configs
        .iter()
        .map(|c| Switch::new(&c.name, c.mac_table_size, c.mac_age_secs))
        .collect();
    let mut sources: Vec<Arc<dyn CounterSource>> = switches
        .iter()
        .map(|s| Arc::clone(s) as Arc<dyn CounterSource>)
        .collect();
    sources.extend(extra.iter().cloned());
    let mut workers = Vec::new();
    for (cfg, sw) in configs.iter().zip(&switches) {
        let spin = Duration::from_micros(u64::from(cfg.spin_us));
        let mut pool: Vec<Worker> = (0..cfg.workers).map(|_| Worker::new(spin)).collect();
        for (i, p) in cfg.ports.iter().enumerate() {
            let port = open_port(p, &sources).map_err(|source| RuntimeError::Port {
                switch: cfg.name.clone(),
                port: p.name.clone(),
                source,
            })?;
            let mut policy = PortPolicy::from(p);
            if p.pcap.is_some() {
                // A capture file gets mirror copies only, never forwarded frames.
                policy.vlan = VlanPolicy::none();
            }
            let spec = PortSpec {
                name: p.name.clone(),
                policy,
                caps: port.caps(),
                queue_len: p.queue_len,
            };
            pool[i % cfg.workers].add(port, sw.add_port(spec)?);
        }
        for (i, worker) in pool.into_iter().enumerate() {
            let thread = worker
                .spawn(&format!("sw-{}-{i}", cfg.name))
                .map_err(|source| RuntimeError::Worker {
                    switch: cfg.name.clone(),
                    source,
                })?;
            workers.push(thread);
        }
    }
    Ok(Runtime { switches, workers })
}

fn open_port(p: &PortConfig, sources: &[Arc<dyn CounterSource>]) -> io::Result<Box<dyn Port>> {
    if let Some(tap) = &p.tap {
        return Ok(Box::new(TapPort::open(&tap.ifname, tap.offloads)?));
    }
    if let Some(pcap) = &p.pcap {
        return Ok(Box::new(PcapPort::create(&pcap.path)?));
    }
    if let Some(int) = &p.internal {
        let IpAddr::V4(ip) = int.ip.addr else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "internal ip must be IPv4",
            ));
        };
        let spec = InternalSpec {
            mac: int.mac,
            ip,
            prefix: int.ip.prefix,
            counters_port: int.counters_port,
        };
        return Ok(Box::new(InternalPort::new(spec, sources.to_vec())));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "port has no kind",
    ))
}
