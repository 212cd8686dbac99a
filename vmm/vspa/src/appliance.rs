//! The running appliance: per tenant a VMBus [`Registry`] (and, for
//! `vspa serve`, a hosted-mode socket), the storage controllers and
//! switches behind them, and what they run (so a reload can plan against
//! it).
//!
//! Storage is held in two layers: each configured controller's LUNs are
//! opened once ([`RunningController::luns`]), and every tenant that owns
//! some of them gets its own controller device (a view) holding the LUNs it
//! owns. Tenants never share a device object, so a tenant's guest can only
//! reach what is in its own registry; read-only LUNs may sit in several
//! views.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use storage::config::ValidController;
use storage::{Controller, Lun};
use switch::Switch;
use switch::netvsp::Netvsp;
use switch::runtime::{RemovedPort, Runtime, RuntimeError};
use vmbus::echo::EchoDevice;
use vmbus::guid::Guid;
use vmbus::hosted::{Admission, AdmissionCounters, HostedServer};
use vmbus::server::{DeviceId, Registry};

use crate::config::ValidConfig;
use crate::overrides::Overrides;
use crate::tenant::{DEFAULT_TENANT, ValidTenant};

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
    /// The echo test device, offered to every tenant, with this instance
    /// and stall timeout.
    pub echo: Option<(Guid, Duration)>,
    /// Serve each tenant over hosted mode: its socket, or this one for the
    /// implicit tenant of a file without `[[tenant]]` tables.
    pub serve: Option<PathBuf>,
}

/// Why the appliance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] storage::config::ConfigError),
    #[error(transparent)]
    Switch(#[from] RuntimeError),
    #[error("tenant {tenant:?}: cannot listen on {path}: {source}")]
    Listen {
        tenant: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tenant {0:?} has no socket")]
    NoSocket(String),
    #[error("tenant {0:?}: integration services: {1}")]
    Ic(String, ic::IcSetError),
    #[error(transparent)]
    Nbd(#[from] storage::nbd::config::NbdConfigError),
}

/// A controller device one tenant sees.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) tenant: String,
    pub(crate) controller: Arc<Controller>,
    pub(crate) id: DeviceId,
}

/// A configured controller: its opened LUNs and the tenants' views of it.
#[derive(Debug)]
pub(crate) struct RunningController {
    pub(crate) spec: ValidController,
    pub(crate) luns: BTreeMap<u8, Arc<Lun>>,
    pub(crate) views: Vec<View>,
}

/// A guest NIC and, when a tenant owns it, its VMBus device there.
#[derive(Debug)]
pub(crate) struct NicDevice {
    pub(crate) switch: String,
    pub(crate) port: String,
    pub(crate) dev: Netvsp,
    pub(crate) offered: Option<(String, DeviceId)>,
}

/// One tenant as running.
#[derive(Debug)]
pub(crate) struct TenantRt {
    pub(crate) spec: ValidTenant,
    pub(crate) registry: Registry,
    pub(crate) counters: Arc<AdmissionCounters>,
    pub(crate) server: Option<HostedServer>,
    pub(crate) ic: Option<(ic::IcHandle, Vec<DeviceId>)>,
}

/// Counts for the readiness line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub tenants: usize,
    pub controllers: usize,
    pub switches: usize,
    pub nics: usize,
}

/// The running appliance; [`Appliance::shutdown`] (or drop) stops it.
#[derive(Debug)]
pub struct Appliance {
    pub(crate) options: Options,
    pub(crate) tenants: Vec<TenantRt>,
    pub(crate) controllers: Vec<RunningController>,
    pub(crate) switches: Option<Runtime>,
    pub(crate) nics: Vec<NicDevice>,
    /// NBD servers and the tables they run.
    pub(crate) nbd: Vec<storage::nbd::Server>,
    pub(crate) nbd_specs: Vec<storage::nbd::config::NbdSpec>,
    /// The configuration's directory.
    pub(crate) base: PathBuf,
    /// The configuration file as last loaded: the desired state.
    pub(crate) file: ValidConfig,
    /// Changes made through the control API, on top of `file`.
    pub(crate) overrides: Overrides,
}

impl Appliance {
    /// Opens every image, starts every switch, gives each tenant its
    /// devices and, with [`Options::serve`], its socket.
    pub fn start(config: &ValidConfig, options: &Options) -> Result<Appliance, StartError> {
        let mut appliance = Appliance {
            options: options.clone(),
            tenants: Vec::new(),
            controllers: Vec::new(),
            switches: None,
            nics: Vec::new(),
            nbd: Vec::new(),
            nbd_specs: config.nbd.clone(),
            base: config.base.clone(),
            file: config.clone(),
            overrides: Overrides::default(),
        };
        for t in &config.tenants {
            appliance.add_tenant(t)?;
        }
        for spec in &config.controllers {
            appliance.add_controller(spec)?;
        }
        let switches = switch::runtime::start(&config.switches, &[])?;
        let nics: Vec<(String, Netvsp)> = switches
            .guest_nics()
            .map(|(s, n)| (s.to_string(), n.clone()))
            .collect();
        appliance.switches = Some(switches);
        for (sw, nic) in nics {
            appliance.add_nic(&sw, nic);
        }
        for what in crate::tenant::unowned(&config.tenants, &config.controllers, &config.switches) {
            tracing::warn!("{what} belongs to no tenant: it is not offered");
        }
        appliance.start_servers()?;
        appliance.nbd = storage::nbd::config::start_all(&config.nbd, &config.base, &|l| {
            appliance.lun_device(&l.controller, l.lun)
        })?;
        Ok(appliance)
    }

    /// The disk at LUN `lun` of `controller` and the tenant owning it, for
    /// an NBD export of the LUN.
    fn lun_device(&self, controller: &str, lun: u8) -> Option<storage::nbd::config::LunDevice> {
        let rc = self
            .controllers
            .iter()
            .find(|c| c.spec.name == controller)?;
        let storage::Lun::Disk { device, .. } = &**rc.luns.get(&lun)? else {
            return None;
        };
        let tenant = self
            .tenants
            .iter()
            .find(|t| t.spec.owns.owns_lun(controller, lun))
            .map(|t| t.spec.name.clone());
        Some(storage::nbd::config::LunDevice {
            device: device.clone(),
            tenant,
        })
    }

    /// The running NBD servers.
    pub fn nbd_servers(&self) -> &[storage::nbd::Server] {
        &self.nbd
    }

    /// Starts the hosted-mode sockets of tenants that have none yet.
    pub(crate) fn start_servers(&mut self) -> Result<(), StartError> {
        let Some(default_socket) = self.options.serve.clone() else {
            return Ok(());
        };
        for t in self.tenants.iter_mut().filter(|t| t.server.is_none()) {
            let path = match &t.spec.socket {
                Some(p) => p.clone(),
                None if t.spec.name == DEFAULT_TENANT => default_socket.clone(),
                None => return Err(StartError::NoSocket(t.spec.name.clone())),
            };
            let server = HostedServer::start_with(&path, t.registry.clone(), admission(t))
                .map_err(|source| StartError::Listen {
                    tenant: t.spec.name.clone(),
                    path: path.clone(),
                    source,
                })?;
            tracing::info!("tenant {}: listening on {}", t.spec.name, path.display());
            t.server = Some(server);
        }
        Ok(())
    }

    /// The hosted-mode sockets the tenants listen on.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.tenants
            .iter()
            .filter_map(|t| t.server.as_ref().map(|s| s.path().to_path_buf()))
            .collect()
    }

    /// The VMBus devices of tenant `tenant`, for a VM or hosted mode.
    pub fn registry(&self, tenant: &str) -> Option<&Registry> {
        self.tenant(tenant).map(|t| &t.registry)
    }

    /// The names of the tenants.
    pub fn tenant_names(&self) -> Vec<String> {
        self.tenants.iter().map(|t| t.spec.name.clone()).collect()
    }

    /// The integration services of tenant `tenant`, if it has them.
    pub fn ic(&self, tenant: &str) -> Option<&ic::IcHandle> {
        self.tenant(tenant)?.ic.as_ref().map(|(h, _)| h)
    }

    /// What happened at tenant `tenant`'s socket.
    pub fn admission_counters(&self, tenant: &str) -> Option<&Arc<AdmissionCounters>> {
        self.tenant(tenant).map(|t| &t.counters)
    }

    pub(crate) fn tenant(&self, name: &str) -> Option<&TenantRt> {
        self.tenants.iter().find(|t| t.spec.name == name)
    }

    /// The running switch named `name`.
    pub fn switch(&self, name: &str) -> Option<&Arc<Switch>> {
        self.runtime().switch(name)
    }

    /// The controller device tenant `tenant` sees for `name`.
    pub fn controller(&self, tenant: &str, name: &str) -> Option<&Arc<Controller>> {
        self.controllers
            .iter()
            .find(|c| c.spec.name == name)?
            .views
            .iter()
            .find(|v| v.tenant == tenant)
            .map(|v| &v.controller)
    }

    /// What runs now, as a configuration.
    pub fn running(&self) -> ValidConfig {
        ValidConfig {
            controllers: self.controllers.iter().map(|c| c.spec.clone()).collect(),
            switches: self.runtime().specs(),
            tenants: self.tenants.iter().map(|t| t.spec.clone()).collect(),
            nbd: self.nbd_specs.clone(),
            base: self.base.clone(),
        }
    }

    pub fn summary(&self) -> Summary {
        Summary {
            tenants: self.tenants.len(),
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

    /// A new tenant: its registry, its integration services and the echo
    /// device (no devices of the configuration yet).
    pub(crate) fn add_tenant(&mut self, spec: &ValidTenant) -> Result<(), StartError> {
        let registry = Registry::new();
        let ic = if ic::Service::ALL.iter().any(|s| spec.ic.enabled(*s)) {
            let set = ic::IcSet::new(&spec.name, &spec.ic)
                .map_err(|e| StartError::Ic(spec.name.clone(), e))?;
            let ids = set.add_to(&registry);
            Some((set.handle(), ids))
        } else {
            None
        };
        if let Some((instance, stall)) = self.options.echo {
            let mut echo = EchoDevice::new(instance);
            echo.stall_timeout = stall;
            registry.add(Arc::new(echo));
        }
        self.tenants.push(TenantRt {
            spec: spec.clone(),
            registry,
            counters: Arc::new(AdmissionCounters::default()),
            server: None,
            ic,
        });
        Ok(())
    }

    /// Opens controller `spec`'s LUNs and gives each tenant its view.
    pub(crate) fn add_controller(&mut self, spec: &ValidController) -> Result<(), StartError> {
        let mut luns = BTreeMap::new();
        for l in &spec.luns {
            luns.insert(l.lun, Arc::new(storage::config::open_lun(&spec.name, l)?));
        }
        tracing::info!(
            "SCSI controller {} with LUNs {:?}",
            spec.name,
            luns.keys().collect::<Vec<_>>()
        );
        let mut rc = RunningController {
            spec: spec.clone(),
            luns,
            views: Vec::new(),
        };
        for t in &self.tenants {
            if t.spec.owns.sees_controller(&spec.name) {
                rc.views.push(new_view(&rc, t));
            }
        }
        self.controllers.push(rc);
        Ok(())
    }

    /// Takes NIC `nic` of switch `sw` in and offers it to its owner.
    pub(crate) fn add_nic(&mut self, sw: &str, nic: Netvsp) {
        let c = nic.config();
        let port = c.name.clone();
        tracing::info!(
            "netvsp NIC {port} on switch {sw} (MAC {}, instance {})",
            c.mac,
            c.instance
        );
        let owner = self
            .tenants
            .iter()
            .find(|t| t.spec.owns.owns_nic(sw, &port));
        let offered = owner.map(|t| {
            let id = t.registry.add(Arc::new(nic.clone()));
            (t.spec.name.clone(), id)
        });
        self.nics.push(NicDevice {
            switch: sw.to_string(),
            port,
            dev: nic,
            offered,
        });
    }

    /// Takes port `port` out of switch `sw`, rescinding it if it is a NIC.
    pub(crate) fn remove_port(&mut self, sw: &str, port: &str) -> bool {
        match self.runtime_mut().remove_port(sw, port) {
            Some(RemovedPort::Nic(_)) => {
                if let Some(i) = self
                    .nics
                    .iter()
                    .position(|n| n.switch == sw && n.port == port)
                {
                    let nic = self.nics.swap_remove(i);
                    self.withdraw_nic(&nic);
                }
                true
            }
            Some(RemovedPort::Own) => true,
            None => false,
        }
    }

    /// Rescinds NIC `nic` from its tenant.
    pub(crate) fn withdraw_nic(&self, nic: &NicDevice) {
        if let Some((tenant, id)) = &nic.offered
            && let Some(t) = self.tenant(tenant)
        {
            t.registry.remove(*id);
        }
    }

    /// Rescinds every device, closes the sockets and stops the switches.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for s in self.nbd.drain(..) {
            s.stop(Duration::from_secs(1));
        }
        for t in &mut self.tenants {
            if let Some(s) = t.server.take() {
                s.stop();
            }
        }
        for c in self.controllers.drain(..) {
            for v in c.views {
                if let Some(t) = self.tenants.iter().find(|t| t.spec.name == v.tenant) {
                    t.registry.remove(v.id);
                }
            }
        }
        let nics: Vec<NicDevice> = self.nics.drain(..).collect();
        for n in &nics {
            self.withdraw_nic(n);
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

/// Tenant `t`'s view of controller `rc`: a device of its own holding the
/// LUNs it owns, offered in its registry.
pub(crate) fn new_view(rc: &RunningController, t: &TenantRt) -> View {
    let mut config = storage::config::controller_config(&rc.spec);
    if let Some(max) = t.spec.limits.inflight {
        config.queue_depth = config.queue_depth.min(max.max(1));
    }
    config.lun_limit = t.spec.limits.rate_limit();
    let controller = Arc::new(Controller::new(config));
    for (n, lun) in &rc.luns {
        if t.spec.owns.owns_lun(&rc.spec.name, *n) {
            // A fresh table cannot hold the number yet.
            let _ = controller.add_shared_lun(*n, lun.clone());
        }
    }
    let id = t.registry.add(controller.clone());
    View {
        tenant: t.spec.name.clone(),
        controller,
        id,
    }
}

/// Hosted-mode admission for tenant `t`.
fn admission(t: &TenantRt) -> Admission {
    Admission {
        label: t.spec.name.clone(),
        allow_uids: t.spec.allow_uids.clone(),
        allow_gids: t.spec.allow_gids.clone(),
        max_connections: t.spec.limits.connections,
        max_memory_bytes: t.spec.limits.memory_bytes,
        socket_mode: Some(t.spec.socket_mode),
        socket_owner: t.spec.socket_owner,
        counters: t.counters.clone(),
    }
}
