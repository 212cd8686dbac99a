//! Builds running switches from configuration: one switch per `[[switch]]`
//! table, its worker threads owning its tap, internal and pcap ports, and
//! for its `netvsp` ports a [`Pool`] of NIC threads and one [`Netvsp`]
//! device per port, which the caller registers with the VMBus server
//! ([`Runtime::netvsp_devices`]). Internal ports serve the netvsp counters
//! too.

use crate::config::{self, ConfigError, PortConfig, SwitchConfig};
use crate::core::{PortSpec, Switch, SwitchError};
use crate::internal::{CounterSource, CounterSources, InternalPort, InternalSpec};
use crate::netvsp::{Netvsp, NetvspConfig, Pool};
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

/// A worker thread of a switch.
#[derive(Debug)]
struct SwitchWorker {
    switch: String,
    thread: WorkerThread,
}

/// A guest NIC: its switch, its device, and the device as a counter source
/// of the internal ports (the `Arc` to remove from them).
#[derive(Debug)]
struct GuestNic {
    switch: String,
    dev: Netvsp,
    counters: Arc<dyn CounterSource>,
}

impl GuestNic {
    fn new(switch: &str, dev: Netvsp) -> Self {
        GuestNic {
            switch: switch.to_string(),
            counters: Arc::new(dev.clone()),
            dev,
        }
    }

    fn is(&self, switch: &str, port: &str) -> bool {
        self.switch == switch && self.dev.config().name == port
    }
}

/// A tap, internal or pcap port and the index of its worker.
#[derive(Debug)]
struct OwnPort {
    switch: String,
    port: String,
    worker: usize,
}

/// Running switches and their workers; dropping it stops the workers.
#[derive(Debug)]
pub struct Runtime {
    /// The configuration the switches started with.
    configs: Vec<SwitchConfig>,
    switches: Vec<Arc<Switch>>,
    workers: Vec<SwitchWorker>,
    /// Tap, internal and pcap ports, and the worker that runs each.
    own_ports: Vec<OwnPort>,
    nics: Vec<GuestNic>,
    /// What the internal ports serve.
    sources: CounterSources,
    /// NIC thread pools by switch name.
    pools: Vec<(String, Arc<Pool>)>,
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

    /// The guest NICs, to register as VMBus devices.
    pub fn netvsp_devices(&self) -> impl ExactSizeIterator<Item = &Netvsp> {
        self.nics.iter().map(|n| &n.dev)
    }

    /// The guest NICs with the names of their switches.
    pub fn guest_nics(&self) -> impl Iterator<Item = (&str, &Netvsp)> {
        self.nics.iter().map(|n| (n.switch.as_str(), &n.dev))
    }

    /// Adds a guest NIC for netvsp port `port` of the running switch
    /// `switch` (a configuration change picked up at run time); the caller
    /// offers it over VMBus. The port must not exist yet.
    pub fn add_netvsp(&mut self, switch: &str, port: &PortConfig) -> Result<Netvsp, RuntimeError> {
        let bad = |msg: &str| {
            RuntimeError::Config(ConfigError::Port {
                switch: switch.to_string(),
                port: port.name.clone(),
                msg: msg.to_string(),
            })
        };
        let i = self
            .switches
            .iter()
            .position(|s| s.name() == switch)
            .ok_or_else(|| bad("no such switch"))?;
        if port.netvsp.is_none() {
            return Err(bad("not a netvsp port"));
        }
        if self.nics.iter().any(|n| n.is(switch, &port.name)) {
            return Err(bad("already present"));
        }
        let cfg = &self.configs[i];
        let pool = match self.pools.iter().find(|(name, _)| name == switch) {
            Some((_, pool)) => pool.clone(),
            None => {
                let pool = start_pool(cfg)?;
                self.pools.push((switch.to_string(), pool.clone()));
                pool
            }
        };
        let dev = netvsp_device(cfg, port, &self.switches[i], pool)?;
        let nic = GuestNic::new(switch, dev.clone());
        self.sources.push(nic.counters.clone());
        self.nics.push(nic);
        Ok(dev)
    }

    /// Forgets the guest NIC of port `port` of switch `switch`; the caller
    /// rescinds its VMBus offer, and the port leaves the switch when the
    /// guest closes the channel.
    pub fn remove_netvsp(&mut self, switch: &str, port: &str) -> Option<Netvsp> {
        let i = self.nics.iter().position(|n| n.is(switch, port))?;
        let nic = self.nics.remove(i);
        self.sources.remove(&nic.counters);
        Some(nic.dev)
    }

    /// Adds tap, internal or pcap port `port` to the running switch
    /// `switch`, on its least loaded worker.
    pub fn add_port(&mut self, switch: &str, port: &PortConfig) -> Result<(), RuntimeError> {
        let bad = |msg: &str| {
            RuntimeError::Config(ConfigError::Port {
                switch: switch.to_string(),
                port: port.name.clone(),
                msg: msg.to_string(),
            })
        };
        if port.netvsp.is_some() {
            return Err(bad("a netvsp port is a guest NIC (add_netvsp)"));
        }
        let i = self
            .switches
            .iter()
            .position(|s| s.name() == switch)
            .ok_or_else(|| bad("no such switch"))?;
        let load = |w: usize| self.own_ports.iter().filter(|p| p.worker == w).count();
        let worker = (0..self.workers.len())
            .filter(|&w| self.workers[w].switch == switch)
            .min_by_key(|&w| load(w))
            .ok_or_else(|| bad("the switch has no worker"))?;
        let (p, handle) =
            open_switch_port(&self.configs[i], port, &self.switches[i], &self.sources)?;
        let worker_error = |source| RuntimeError::Worker {
            switch: switch.to_string(),
            source,
        };
        self.workers[worker]
            .thread
            .add_port(p, handle)
            .map_err(worker_error)?;
        self.own_ports.push(OwnPort {
            switch: switch.to_string(),
            port: port.name.clone(),
            worker,
        });
        Ok(())
    }

    /// Takes tap, internal or pcap port `port` out of switch `switch` (its
    /// device is closed); false if there is no such port.
    pub fn remove_port(&mut self, switch: &str, port: &str) -> bool {
        let Some(i) = self
            .own_ports
            .iter()
            .position(|p| p.switch == switch && p.port == port)
        else {
            return false;
        };
        let p = self.own_ports.swap_remove(i);
        self.workers[p.worker].thread.remove_port(port)
    }

    /// Stops every worker and waits for them.
    pub fn stop(self) -> io::Result<()> {
        for w in self.workers {
            w.thread.stop()?;
        }
        drop(self.nics);
        drop(self.pools);
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
    let mut nics = Vec::new();
    let mut pools = Vec::new();
    for (cfg, sw) in configs.iter().zip(&switches) {
        let ports: Vec<_> = cfg.ports.iter().filter(|p| p.netvsp.is_some()).collect();
        if ports.is_empty() {
            continue;
        }
        let pool = start_pool(cfg)?;
        for p in ports {
            let dev = netvsp_device(cfg, p, sw, pool.clone())?;
            let nic = GuestNic::new(&cfg.name, dev);
            sources.push(nic.counters.clone());
            nics.push(nic);
        }
        pools.push((cfg.name.clone(), pool));
    }
    let sources = CounterSources::new(sources);
    let mut workers = Vec::new();
    let mut own_ports = Vec::new();
    for (cfg, sw) in configs.iter().zip(&switches) {
        let spin = Duration::from_micros(u64::from(cfg.spin_us));
        let mut pool: Vec<Worker> = (0..cfg.workers)
            .map(|i| Worker::new(spin).pinned(thread_cpu(cfg, i)))
            .collect();
        let own = cfg.ports.iter().filter(|p| p.netvsp.is_none());
        for (i, p) in own.enumerate() {
            let (port, handle) = open_switch_port(cfg, p, sw, &sources)?;
            pool[i % cfg.workers].add(port, handle);
            own_ports.push(OwnPort {
                switch: cfg.name.clone(),
                port: p.name.clone(),
                worker: workers.len() + i % cfg.workers,
            });
        }
        for (i, worker) in pool.into_iter().enumerate() {
            let thread = worker
                .spawn(&format!("sw-{}-{i}", cfg.name))
                .map_err(|source| RuntimeError::Worker {
                    switch: cfg.name.clone(),
                    source,
                })?;
            workers.push(SwitchWorker {
                switch: cfg.name.clone(),
                thread,
            });
        }
    }
    Ok(Runtime {
        configs: configs.to_vec(),
        switches,
        workers,
        own_ports,
        nics,
        sources,
        pools,
    })
}

/// The CPU of thread `n` of switch `cfg` (its workers first, then its NIC
/// threads), if the switch binds them.
fn thread_cpu(cfg: &SwitchConfig, n: usize) -> Option<usize> {
    vmbus::cpu::nth(&cfg.cpus, n)
}

/// The NIC threads of switch `cfg`.
fn start_pool(cfg: &SwitchConfig) -> Result<Arc<Pool>, RuntimeError> {
    let spin = Duration::from_micros(u64::from(cfg.spin_us));
    let cpus: Vec<usize> = (0..cfg.netvsp_workers)
        .filter_map(|i| thread_cpu(cfg, cfg.workers + i))
        .collect();
    let name = format!("nv-{}", cfg.name);
    Pool::pinned(&name, cfg.netvsp_workers, spin, &cpus).map_err(|source| RuntimeError::Worker {
        switch: cfg.name.clone(),
        source,
    })
}

/// The guest NIC of netvsp port `p` of switch `cfg`, running on `pool`.
fn netvsp_device(
    cfg: &SwitchConfig,
    p: &PortConfig,
    sw: &Arc<Switch>,
    pool: Arc<Pool>,
) -> Result<Netvsp, RuntimeError> {
    let bad = |msg: String| ConfigError::Port {
        switch: cfg.name.clone(),
        port: p.name.clone(),
        msg,
    };
    let n = p
        .netvsp
        .as_ref()
        .ok_or_else(|| bad("not a netvsp port".into()))?;
    let instance = n.instance_for(&cfg.name, &p.name).map_err(bad)?;
    let mut nc = NetvspConfig::new(&p.name, instance, n.mac_for(&cfg.name, &p.name));
    nc.mtu = n.mtu;
    nc.channels = n.channels;
    nc.link_speed_mbps = n.link_speed_mbps;
    let spec = PortSpec {
        name: p.name.clone(),
        policy: PortPolicy::from(p),
        caps: crate::netvsp::CAPS,
        queue_len: p.queue_len,
    };
    Ok(Netvsp::new(nc, sw.clone(), spec, pool))
}

/// Opens tap, internal or pcap port `p` and joins it to switch `sw`.
fn open_switch_port(
    cfg: &SwitchConfig,
    p: &PortConfig,
    sw: &Arc<Switch>,
    sources: &CounterSources,
) -> Result<(Box<dyn Port>, crate::core::PortHandle), RuntimeError> {
    let port = match &p.vxlan {
        Some(v) => crate::vxlan::open_for_switch(&cfg.name, p, v, sources),
        None => open_port(p, sources),
    };
    let port = port.map_err(|source| RuntimeError::Port {
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
    Ok((port, sw.add_port(spec)?))
}

fn open_port(p: &PortConfig, sources: &CounterSources) -> io::Result<Box<dyn Port>> {
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
        return Ok(Box::new(InternalPort::new(spec, sources.clone())));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "port has no kind",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(text: &str) -> Vec<SwitchConfig> {
        let t: toml::Table = toml::from_str(text).unwrap();
        t["switch"].clone().try_into().unwrap()
    }

    #[test]
    fn guest_nics_come_and_go_at_run_time_with_their_counters() {
        let mut rt = start(
            &configs(
                "[[switch]]\nname = \"s\"\n\
                 [[switch.port]]\nname = \"a\"\nnetvsp = {}\n\
                 [[switch.port]]\nname = \"m\"\n\
                 internal = { mac = \"02:00:00:00:00:fe\", ip = \"10.9.0.254/24\", counters_port = 9100 }\n",
            ),
            &[],
        )
        .unwrap();
        let text = |rt: &Runtime| {
            let mut t = String::new();
            rt.sources.write_all(&mut t);
            t
        };
        assert!(text(&rt).contains("netvsp.a.link_up 1"));
        let b: PortConfig = toml::from_str("name = \"b\"\nnetvsp = { mtu = 9000 }\n").unwrap();
        let dev = rt.add_netvsp("s", &b).unwrap();
        assert_eq!(dev.config().mtu, 9000);
        assert!(text(&rt).contains("netvsp.b.link_up 1"));
        assert_eq!(rt.netvsp_devices().len(), 2);
        let switches: Vec<&str> = rt.guest_nics().map(|(s, _)| s).collect();
        assert_eq!(switches, ["s", "s"]);
        // Twice, on a switch that does not exist, or not a NIC: refused.
        assert!(rt.add_netvsp("s", &b).is_err());
        assert!(rt.add_netvsp("t", &b).is_err());
        let tap: PortConfig = toml::from_str("name = \"c\"\ntap = { ifname = \"c0\" }\n").unwrap();
        assert!(rt.add_netvsp("s", &tap).is_err());
        assert_eq!(rt.remove_netvsp("s", "a").unwrap().config().name, "a");
        assert!(rt.remove_netvsp("s", "a").is_none());
        let t = text(&rt);
        assert!(!t.contains("netvsp.a.") && t.contains("netvsp.b."), "{t}");
        rt.stop().unwrap();
    }

    #[test]
    fn internal_and_pcap_ports_come_and_go_at_run_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut rt = start(&configs("[[switch]]\nname = \"s\"\nworkers = 2\n"), &[]).unwrap();
        let sw = rt.switch("s").unwrap().clone();
        let cap = dir.path().join("cap.pcap");
        let pcap: PortConfig =
            toml::from_str(&format!("name = \"cap\"\npcap = {{ path = {:?} }}\n", cap)).unwrap();
        let internal: PortConfig = toml::from_str(
            "name = \"m\"\n\
             internal = { mac = \"02:00:00:00:00:fe\", ip = \"10.9.0.254/24\", counters_port = 9100 }\n",
        )
        .unwrap();
        rt.add_port("s", &pcap).unwrap();
        rt.add_port("s", &internal).unwrap();
        assert!(sw.port_stats("cap").is_some() && sw.port_stats("m").is_some());
        assert!(cap.exists(), "the capture file was created");
        // One port per worker: the second went to the idle one.
        assert_ne!(rt.own_ports[0].worker, rt.own_ports[1].worker);
        // Twice, on a switch that does not exist: refused.
        assert!(rt.add_port("s", &pcap).is_err());
        assert!(rt.add_port("t", &internal).is_err());
        assert!(rt.remove_port("s", "cap"));
        assert!(sw.port_stats("cap").is_none(), "left the switch");
        assert!(!rt.remove_port("s", "cap"));
        assert!(sw.port_stats("m").is_some());
        rt.stop().unwrap();
    }

    /// CPUs the thread named `name` of this process may run on.
    fn thread_cpus(name: &str) -> Option<String> {
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() == name {
                let status = std::fs::read_to_string(dir.join("status")).unwrap();
                let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:"));
                return Some(
                    line.unwrap()["Cpus_allowed_list:".len()..]
                        .trim()
                        .to_string(),
                );
            }
        }
        None
    }

    #[test]
    fn threads_run_on_the_configured_cpus() {
        let allowed = vmbus::cpu::allowed_cpus().unwrap();
        let (a, b) = (allowed[0], *allowed.last().unwrap());
        let text = format!(
            "[[switch]]\nname = \"pinq\"\nworkers = 2\ncpus = [{b}, {a}]\n\
             [[switch.port]]\nname = \"n\"\nnetvsp = {{}}\n"
        );
        let rt = start(&configs(&text), &[]).unwrap();
        assert_eq!(thread_cpus("sw-pinq-0"), Some(b.to_string()));
        assert_eq!(thread_cpus("sw-pinq-1"), Some(a.to_string()));
        // The NIC thread continues the count: thread 2 of the switch.
        assert_eq!(thread_cpus("nv-pinq-0"), Some(b.to_string()));
        rt.stop().unwrap();
        // A CPU this process may not use: the switch does not start.
        let outside = (0..vmbus::cpu::MAX_CPUS)
            .find(|c| !allowed.contains(c))
            .unwrap();
        let text = format!("[[switch]]\nname = \"pinr\"\ncpus = [{outside}]\n");
        let Err(e) = start(&configs(&text), &[]) else {
            panic!("a CPU outside the allowed set was accepted");
        };
        assert!(e.to_string().contains("pinr"), "{e}");
        let chain = format!("{e} {:?}", std::error::Error::source(&e));
        assert!(chain.contains(&format!("CPU {outside}")), "{chain}");
        assert_eq!(thread_cpus("sw-pinr-0"), None, "no worker left behind");
    }
}
