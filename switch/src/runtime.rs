//! Builds running switches from validated configuration
//! ([`ValidSwitch`]): one switch per `[[switch]]` table, its worker threads
//! owning its tap, internal, pcap and VXLAN ports, and for its `netvsp`
//! ports a [`Pool`] of NIC threads and one [`Netvsp`] device per port, which
//! the caller registers with the VMBus server ([`Runtime::netvsp_devices`]).
//! Ports join and leave running switches ([`Runtime::add_port`],
//! [`Runtime::remove_port`]); [`Runtime::specs`] says what runs, so a
//! reload can plan against it ([`crate::config::plan`]). Internal ports
//! serve the netvsp and VXLAN counters too.

use crate::config::{ConfigError, NicSpec, PortKind, ValidPort, ValidSwitch};
use crate::core::{PortSpec, Switch, SwitchError};
use crate::internal::{CounterSource, CounterSources, InternalPort};
use crate::netvsp::{Netvsp, NetvspConfig, Pool};
use crate::pcap::PcapPort;
use crate::port::{Port, Worker, WorkerThread};
use crate::tap::TapPort;
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Why the switches could not start, or a port could not join.
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

/// A guest NIC: its device, and the device as a counter source of the
/// internal ports (the `Arc` to remove from them).
#[derive(Debug)]
struct GuestNic {
    dev: Netvsp,
    counters: Arc<dyn CounterSource>,
}

/// A port a worker runs (tap, internal, pcap or VXLAN), by name.
#[derive(Debug)]
struct OwnPort {
    name: String,
    worker: usize,
}

/// One running switch: what it runs, its threads and its ports.
#[derive(Debug)]
struct RunningSwitch {
    /// The configuration it runs, following port changes.
    spec: ValidSwitch,
    switch: Arc<Switch>,
    workers: Vec<WorkerThread>,
    own_ports: Vec<OwnPort>,
    nics: Vec<GuestNic>,
    /// The NIC threads, started with the first guest NIC.
    pool: Option<Arc<Pool>>,
}

/// A port that left a switch.
#[derive(Debug)]
pub enum RemovedPort {
    /// A guest NIC: its device, whose VMBus offer the caller rescinds (the
    /// port leaves the switch when the guest closes the channel).
    Nic(Netvsp),
    /// A port a worker ran; its device is closed.
    Own,
}

/// Running switches and their workers; dropping it stops the workers.
#[derive(Debug)]
pub struct Runtime {
    switches: Vec<RunningSwitch>,
    /// What the internal ports serve.
    sources: CounterSources,
}

impl Runtime {
    /// The switches, in configuration order.
    pub fn switches(&self) -> impl ExactSizeIterator<Item = &Arc<Switch>> {
        self.switches.iter().map(|s| &s.switch)
    }

    /// The switch named `name`.
    pub fn switch(&self, name: &str) -> Option<&Arc<Switch>> {
        self.running(name).map(|s| &s.switch)
    }

    /// What runs now: the switches' configurations with the ports they
    /// have.
    pub fn specs(&self) -> Vec<ValidSwitch> {
        self.switches.iter().map(|s| s.spec.clone()).collect()
    }

    /// The guest NICs, to register as VMBus devices.
    pub fn netvsp_devices(&self) -> impl Iterator<Item = &Netvsp> {
        self.guest_nics().map(|(_, n)| n)
    }

    /// The guest NICs with the names of their switches.
    pub fn guest_nics(&self) -> impl Iterator<Item = (&str, &Netvsp)> {
        self.switches
            .iter()
            .flat_map(|s| s.nics.iter().map(|n| (s.spec.name.as_str(), &n.dev)))
    }

    fn running(&self, name: &str) -> Option<&RunningSwitch> {
        self.switches.iter().find(|s| s.spec.name == name)
    }

    /// Adds `port` to the running switch `switch`: a tap, internal or pcap
    /// port joins its least loaded worker; a guest NIC is created and
    /// returned for the caller to offer over VMBus. The port must not exist.
    pub fn add_port(
        &mut self,
        switch: &str,
        port: &ValidPort,
    ) -> Result<Option<Netvsp>, RuntimeError> {
        let bad = |msg: &str| {
            RuntimeError::Config(ConfigError::Port {
                switch: switch.to_string(),
                port: port.name.clone(),
                msg: msg.to_string(),
            })
        };
        let sources = self.sources.clone();
        let rs = self
            .switches
            .iter_mut()
            .find(|s| s.spec.name == switch)
            .ok_or_else(|| bad("no such switch"))?;
        if rs.spec.ports.iter().any(|p| p.name == port.name) {
            return Err(bad("already present"));
        }
        let added = match &port.kind {
            PortKind::Netvsp(nic) => {
                let dev = rs.add_nic(port, nic)?;
                sources.push(rs.nics.last().expect("just added").counters.clone());
                Some(dev)
            }
            _ => {
                rs.add_own(port, &sources)?;
                None
            }
        };
        rs.spec.ports.push(port.clone());
        Ok(added)
    }

    /// Takes port `port` out of switch `switch`; None if there is no such
    /// port.
    pub fn remove_port(&mut self, switch: &str, port: &str) -> Option<RemovedPort> {
        let rs = self.switches.iter_mut().find(|s| s.spec.name == switch)?;
        let at = rs.spec.ports.iter().position(|p| p.name == port)?;
        rs.spec.ports.remove(at);
        if let Some(i) = rs.nics.iter().position(|n| n.dev.config().name == port) {
            let nic = rs.nics.remove(i);
            self.sources.remove(&nic.counters);
            return Some(RemovedPort::Nic(nic.dev));
        }
        let i = rs.own_ports.iter().position(|p| p.name == port)?;
        let p = rs.own_ports.swap_remove(i);
        rs.workers[p.worker].remove_port(port);
        Some(RemovedPort::Own)
    }

    /// Stops every worker and waits for them.
    pub fn stop(self) -> io::Result<()> {
        for s in self.switches {
            for w in s.workers {
                w.stop()?;
            }
        }
        Ok(())
    }
}

impl RunningSwitch {
    /// Starts switch `spec` with its worker threads and ports.
    fn start(spec: &ValidSwitch, sources: &CounterSources) -> Result<Self, RuntimeError> {
        let s = &spec.settings;
        let switch = Switch::new(&spec.name, s.mac_table_size, s.mac_age_secs);
        sources.push(Arc::clone(&switch) as Arc<dyn CounterSource>);
        let mut rs = RunningSwitch {
            spec: ValidSwitch {
                ports: Vec::new(),
                ..spec.clone()
            },
            switch,
            workers: Vec::new(),
            own_ports: Vec::new(),
            nics: Vec::new(),
            pool: None,
        };
        let spin = rs.spin();
        let mut pool: Vec<Worker> = (0..s.workers)
            .map(|i| Worker::new(spin).pinned(rs.thread_cpu(i)))
            .collect();
        let own = spec.ports.iter().filter(|p| !p.is_nic());
        for (i, p) in own.enumerate() {
            let (port, handle) = rs.open_own(p, sources)?;
            pool[i % s.workers].add(port, handle);
            rs.own_ports.push(OwnPort {
                name: p.name.clone(),
                worker: i % s.workers,
            });
        }
        for p in &spec.ports {
            if let PortKind::Netvsp(nic) = &p.kind {
                rs.add_nic(p, nic)?;
                sources.push(rs.nics.last().expect("just added").counters.clone());
            }
        }
        for (i, worker) in pool.into_iter().enumerate() {
            let thread = worker
                .spawn(&format!("sw-{}-{i}", spec.name))
                .map_err(|source| rs.worker_error(source))?;
            rs.workers.push(thread);
        }
        rs.spec.ports = spec.ports.clone();
        Ok(rs)
    }

    fn spin(&self) -> Duration {
        Duration::from_micros(u64::from(self.spec.settings.spin_us))
    }

    /// The CPU of thread `n` of this switch (its workers first, then its
    /// NIC threads), if the switch binds them.
    fn thread_cpu(&self, n: usize) -> Option<usize> {
        vmbus::cpu::nth(&self.spec.settings.cpus, n)
    }

    fn worker_error(&self, source: io::Error) -> RuntimeError {
        RuntimeError::Worker {
            switch: self.spec.name.clone(),
            source,
        }
    }

    /// The NIC threads, started on first use.
    fn pool(&mut self) -> Result<Arc<Pool>, RuntimeError> {
        if let Some(p) = &self.pool {
            return Ok(p.clone());
        }
        let s = &self.spec.settings;
        let cpus: Vec<usize> = (0..s.netvsp_workers)
            .filter_map(|i| self.thread_cpu(s.workers + i))
            .collect();
        let name = format!("nv-{}", self.spec.name);
        let pool = Pool::pinned(&name, s.netvsp_workers, self.spin(), &cpus)
            .map_err(|source| self.worker_error(source))?;
        self.pool = Some(pool.clone());
        Ok(pool)
    }

    /// Creates the guest NIC of port `p`.
    fn add_nic(&mut self, p: &ValidPort, nic: &NicSpec) -> Result<Netvsp, RuntimeError> {
        let pool = self.pool()?;
        let mut nc = NetvspConfig::new(&p.name, nic.instance, nic.mac);
        nc.mtu = nic.mtu;
        nc.channels = nic.channels;
        nc.link_speed_mbps = nic.link_speed_mbps;
        let spec = PortSpec {
            name: p.name.clone(),
            policy: p.policy.clone(),
            caps: crate::netvsp::CAPS,
            queue_len: p.queue_len,
        };
        let dev = Netvsp::new(nc, self.switch.clone(), spec, pool);
        self.nics.push(GuestNic {
            counters: Arc::new(dev.clone()),
            dev: dev.clone(),
        });
        Ok(dev)
    }

    /// Opens tap, internal or pcap port `p`, joins it to the switch and
    /// hands it to the least loaded worker.
    fn add_own(&mut self, p: &ValidPort, sources: &CounterSources) -> Result<(), RuntimeError> {
        let load = |w: usize| self.own_ports.iter().filter(|o| o.worker == w).count();
        let worker = (0..self.workers.len())
            .min_by_key(|&w| load(w))
            .ok_or_else(|| self.worker_error(io::Error::other("the switch has no worker")))?;
        let (port, handle) = self.open_own(p, sources)?;
        self.workers[worker]
            .add_port(port, handle)
            .map_err(|source| self.worker_error(source))?;
        self.own_ports.push(OwnPort {
            name: p.name.clone(),
            worker,
        });
        Ok(())
    }

    /// Opens tap, internal or pcap port `p` and joins it to the switch.
    fn open_own(
        &self,
        p: &ValidPort,
        sources: &CounterSources,
    ) -> Result<(Box<dyn Port>, crate::core::PortHandle), RuntimeError> {
        let port = open_port(&self.spec.name, p, sources).map_err(|source| RuntimeError::Port {
            switch: self.spec.name.clone(),
            port: p.name.clone(),
            source,
        })?;
        let spec = PortSpec {
            name: p.name.clone(),
            policy: p.policy.clone(),
            caps: port.caps(),
            queue_len: p.queue_len,
        };
        Ok((port, self.switch.add_port(spec)?))
    }
}

/// Starts validated switches. Internal ports serve the counters of every
/// switch plus `extra` sources (other subsystems of the appliance).
pub fn start(
    specs: &[ValidSwitch],
    extra: &[Arc<dyn CounterSource>],
) -> Result<Runtime, RuntimeError> {
    let sources = CounterSources::new(extra.to_vec());
    let mut switches = Vec::new();
    for spec in specs {
        switches.push(RunningSwitch::start(spec, &sources)?);
    }
    Ok(Runtime { switches, sources })
}

fn open_port(switch: &str, p: &ValidPort, sources: &CounterSources) -> io::Result<Box<dyn Port>> {
    Ok(match &p.kind {
        PortKind::Tap(tap) => Box::new(TapPort::open(&tap.ifname, tap.offloads)?),
        PortKind::Pcap(pcap) => Box::new(PcapPort::create(&pcap.path)?),
        PortKind::Internal(spec) => Box::new(InternalPort::new(spec.clone(), sources.clone())),
        PortKind::Vxlan(spec) => crate::vxlan::open_for_switch(switch, &p.name, spec, sources)?,
        PortKind::Netvsp(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a guest NIC is not run by a switch worker",
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(text: &str) -> Vec<ValidSwitch> {
        let t: toml::Table = toml::from_str(text).unwrap();
        let raw: Vec<crate::config::SwitchConfig> = t["switch"].clone().try_into().unwrap();
        crate::config::validate(&raw, std::path::Path::new("/")).unwrap()
    }

    /// One port, validated as a port of a switch.
    fn port(text: &str) -> ValidPort {
        configs(&format!(
            "[[switch]]\nname = \"x\"\n[[switch.port]]\n{text}"
        ))[0]
            .ports[0]
            .clone()
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
        let b = port("name = \"b\"\nnetvsp = { mtu = 9000 }\n");
        let dev = rt.add_port("s", &b).unwrap().expect("a guest NIC");
        assert_eq!(dev.config().mtu, 9000);
        assert!(text(&rt).contains("netvsp.b.link_up 1"));
        assert_eq!(rt.netvsp_devices().count(), 2);
        let switches: Vec<&str> = rt.guest_nics().map(|(s, _)| s).collect();
        assert_eq!(switches, ["s", "s"]);
        assert!(rt.specs()[0].ports.iter().any(|p| p.name == "b"));
        // Twice, or on a switch that does not exist: refused.
        assert!(rt.add_port("s", &b).is_err());
        assert!(rt.add_port("t", &b).is_err());
        match rt.remove_port("s", "a") {
            Some(RemovedPort::Nic(dev)) => assert_eq!(dev.config().name, "a"),
            other => panic!("{other:?}"),
        }
        assert!(rt.remove_port("s", "a").is_none());
        assert!(!rt.specs()[0].ports.iter().any(|p| p.name == "a"));
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
        let pcap = port(&format!("name = \"cap\"\npcap = {{ path = {:?} }}\n", cap));
        let internal = port(
            "name = \"m\"\n\
             internal = { mac = \"02:00:00:00:00:fe\", ip = \"10.9.0.254/24\", counters_port = 9100 }\n",
        );
        assert!(rt.add_port("s", &pcap).unwrap().is_none());
        assert!(rt.add_port("s", &internal).unwrap().is_none());
        assert!(sw.port_stats("cap").is_some() && sw.port_stats("m").is_some());
        assert!(cap.exists(), "the capture file was created");
        // One port per worker: the second went to the idle one.
        let own = &rt.switches[0].own_ports;
        assert_ne!(own[0].worker, own[1].worker);
        // Twice, on a switch that does not exist: refused.
        assert!(rt.add_port("s", &pcap).is_err());
        assert!(rt.add_port("t", &internal).is_err());
        assert!(matches!(rt.remove_port("s", "cap"), Some(RemovedPort::Own)));
        assert!(sw.port_stats("cap").is_none(), "left the switch");
        assert!(rt.remove_port("s", "cap").is_none());
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
