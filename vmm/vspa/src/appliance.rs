//! The running appliance: its devices in a VMBus [`Registry`], the storage
//! controllers and switches behind them, and what they run (so a reload
//! can plan against it).

use std::sync::Arc;
use std::time::Duration;

use storage::Controller;
use storage::config::ValidController;
use switch::Switch;
use switch::runtime::{RemovedPort, Runtime, RuntimeError};
use vmbus::echo::EchoDevice;
use vmbus::guid::Guid;
use vmbus::server::{DeviceId, Registry};

use crate::config::ValidConfig;

/// Instance GUID of the echo test device of `vspa serve --echo` and
/// `vspa run --echo`.
pub const ECHO_INSTANCE: Guid = Guid::from_fields(
    0x5e4d_3c2b,
    0x1a09,
    0x4f8e,
    [0x9d, 0x7c, 0x6b, 0x5a, 0x49, 0x38, 0x27, 0x16],
);

/// What the appliance offers besides its configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The echo test device, with this instance and stall timeout.
    pub echo: Option<(Guid, Duration)>,
}

/// Why the appliance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] storage::config::ConfigError),
    #[error(transparent)]
    Switch(#[from] RuntimeError),
}

/// A controller as running: what it runs, and its VMBus device.
#[derive(Debug)]
pub(crate) struct RunningController {
    pub(crate) spec: ValidController,
    pub(crate) controller: Arc<Controller>,
    pub(crate) id: DeviceId,
}

/// A guest NIC's VMBus device, by switch and port.
#[derive(Debug)]
pub(crate) struct NicDevice {
    pub(crate) switch: String,
    pub(crate) port: String,
    pub(crate) id: DeviceId,
}

/// Counts for the readiness line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub controllers: usize,
    pub switches: usize,
    pub nics: usize,
}

/// The running appliance; [`Appliance::shutdown`] (or drop) stops it.
#[derive(Debug)]
pub struct Appliance {
    pub(crate) registry: Registry,
    pub(crate) controllers: Vec<RunningController>,
    pub(crate) switches: Option<Runtime>,
    pub(crate) nics: Vec<NicDevice>,
}

impl Appliance {
    /// Opens every image, starts every switch and registers every device.
    pub fn start(config: &ValidConfig, options: &Options) -> Result<Appliance, StartError> {
        let registry = Registry::new();
        let mut controllers = Vec::new();
        for spec in &config.controllers {
            let controller = Arc::new(storage::config::build(spec)?);
            let id = registry.add(controller.clone());
            tracing::info!(
                "SCSI controller {} with LUNs {:?}",
                spec.name,
                controller.table().numbers()
            );
            controllers.push(RunningController {
                spec: spec.clone(),
                controller,
                id,
            });
        }
        let switches = switch::runtime::start(&config.switches, &[])?;
        let mut appliance = Appliance {
            registry,
            controllers,
            switches: None,
            nics: Vec::new(),
        };
        for (sw, nic) in switches.guest_nics() {
            appliance.offer_nic(sw, nic.clone());
        }
        appliance.switches = Some(switches);
        if let Some((instance, stall)) = options.echo {
            let mut echo = EchoDevice::new(instance);
            echo.stall_timeout = stall;
            appliance.registry.add(Arc::new(echo));
        }
        Ok(appliance)
    }

    /// The VMBus devices, for hosted mode or a VM.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The running switch named `name`.
    pub fn switch(&self, name: &str) -> Option<&Arc<Switch>> {
        self.runtime().switch(name)
    }

    /// The running controller named `name`.
    pub fn controller(&self, name: &str) -> Option<&Arc<Controller>> {
        self.controllers
            .iter()
            .find(|c| c.spec.name == name)
            .map(|c| &c.controller)
    }

    /// What runs now, as a configuration (controllers' LUNs and switches'
    /// ports as they are after every applied change).
    pub fn running(&self) -> ValidConfig {
        ValidConfig {
            controllers: self.controllers.iter().map(|c| c.spec.clone()).collect(),
            switches: self.runtime().specs(),
        }
    }

    pub fn summary(&self) -> Summary {
        Summary {
            controllers: self.controllers.len(),
            switches: self.runtime().switches().len(),
            nics: self.nics.len(),
        }
    }

    /// The running switches and their guest NICs.
    pub fn network(&self) -> &Runtime {
        self.runtime()
    }

    pub(crate) fn runtime(&self) -> &Runtime {
        self.switches.as_ref().expect("switches run until shutdown")
    }

    pub(crate) fn runtime_mut(&mut self) -> &mut Runtime {
        self.switches.as_mut().expect("switches run until shutdown")
    }

    /// Offers guest NIC `nic` of switch `sw` over VMBus.
    pub(crate) fn offer_nic(&mut self, sw: &str, nic: switch::netvsp::Netvsp) {
        let c = nic.config();
        tracing::info!(
            "netvsp NIC {} on switch {sw} (MAC {}, instance {})",
            c.name,
            c.mac,
            c.instance
        );
        let port = c.name.clone();
        let id = self.registry.add(Arc::new(nic));
        self.nics.push(NicDevice {
            switch: sw.to_string(),
            port,
            id,
        });
    }

    /// Rescinds the offer of the guest NIC of port `port` of `sw`.
    pub(crate) fn rescind_nic(&mut self, sw: &str, port: &str) {
        if let Some(i) = self
            .nics
            .iter()
            .position(|n| n.switch == sw && n.port == port)
        {
            let nic = self.nics.swap_remove(i);
            self.registry.remove(nic.id);
        }
    }

    /// Takes port `port` out of switch `sw`, rescinding it if it is a NIC.
    pub(crate) fn remove_port(&mut self, sw: &str, port: &str) -> bool {
        match self.runtime_mut().remove_port(sw, port) {
            Some(RemovedPort::Nic(_)) => {
                self.rescind_nic(sw, port);
                true
            }
            Some(RemovedPort::Own) => true,
            None => false,
        }
    }

    /// Rescinds every device and stops the switches' threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for c in self.controllers.drain(..) {
            self.registry.remove(c.id);
        }
        for n in self.nics.drain(..) {
            self.registry.remove(n.id);
        }
        if let Some(rt) = self.switches.take()
            && let Err(e) = rt.stop()
        {
            tracing::warn!("stopping the switches: {e}");
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.stop();
    }
}
