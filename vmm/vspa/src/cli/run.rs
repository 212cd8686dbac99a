//! `vspa run`: boot a guest in vspa's own KVM VMM. The guest reaches the
//! VSPs over VMBus (the Hyper-V synthetic interface) or, without VMBus
//! drivers, through virtio-mmio fallback devices: disks served by the same
//! VHD backends, and NICs that are ports of the configuration's switches
//! (each with a poll thread that moves frames from its switch port into
//! the guest's receive buffers).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use vmm::boot::{BootConfig, ImageFormat};
use vmm::devices::ConsoleOut;
use vmm::virtio::block::{ImageDisk, VirtioBlock};
use vmm::virtio::mmio::{VirtioBackend, VirtioMmio};
use vmm::virtio::net::{NetPoller, PollerWakers, SwitchPort, VirtioNet};
use vmm::vm::{MAX_VCPUS, RunningVm, VirtioSlot, Vm, VmConfig, VmExit};

use vspa::appliance::ECHO_INSTANCE;
use vspa::guest_stop::{GuestStop, StopOutcome, exit_code};
use vspa::signals::Signals;
use vspa::{Appliance, Options};

use super::console::{EscapedInput, RawTerminal};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Kernel: a bzImage, an ELF (vmlinux or test guest) or, with
    /// --kernel-format flat, raw 64-bit code entered at 1 MiB.
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long, value_enum, default_value_t = KernelFormat::Auto)]
    pub kernel_format: KernelFormat,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (virtio-mmio devices are appended).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// Serial console: "stdout", "none" or a file path. With "stdout" the
    /// console is interactive: standard input goes to the guest's COM1 (a
    /// terminal is put in raw mode; Ctrl-A x stops the VM).
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Appliance configuration, the same file as `vspa serve --config`:
    /// its SCSI controllers and its switches' netvsp NICs are offered to
    /// the guest over VMBus, and its switches run for the life of the VM.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Offer the echo test device over VMBus.
    #[arg(long)]
    pub echo: bool,
    /// The tenant of --config whose devices the VM gets (default: the only
    /// tenant, or the implicit one of a file without `[[tenant]]` tables).
    #[arg(long)]
    pub tenant: Option<String>,
    /// On SIGTERM, how long the guest has to answer the shutdown request
    /// of its Shutdown integration service.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    pub shutdown_timeout_ms: u64,
    /// After the guest acknowledged a shutdown request, how long it has to
    /// power off before vspa stops the VM.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub shutdown_grace: u64,
    /// A disk image (raw, or VHD fixed/dynamic/differencing) served as a
    /// virtio-blk fallback device; append ",ro" for read-only. Repeatable.
    #[arg(long, value_name = "PATH[,ro]")]
    pub virtio_disk: Vec<String>,
    /// A virtio-net fallback NIC (for guests without VMBus drivers) that
    /// is port PORT (default "virtio-netN") of switch SWITCH in --config,
    /// with the default port policy and no offloads. Its MAC is derived
    /// from the switch and port names unless given. Repeatable.
    #[arg(long, value_name = "SWITCH[:PORT][,mac=MAC]")]
    pub virtio_net: Vec<String>,
    #[command(flatten)]
    pub sandbox: super::sandbox::SandboxArgs,
    #[command(flatten)]
    pub api: super::api::ApiArgs,
}

/// One `--virtio-net` option.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VirtioNic {
    switch: String,
    port: String,
    mac: Option<switch::wire::MacAddr>,
}

impl VirtioNic {
    /// Parses `SWITCH[:PORT][,mac=MAC]`; `index` names the default port.
    fn parse(spec: &str, index: usize) -> anyhow::Result<VirtioNic> {
        let (names, mac) = match spec.split_once(',') {
            None => (spec, None),
            Some((names, opt)) => {
                let Some(mac) = opt.strip_prefix("mac=") else {
                    bail!("--virtio-net {spec}: unknown option {opt:?} (expected mac=MAC)");
                };
                let mac: switch::wire::MacAddr = mac
                    .parse()
                    .with_context(|| format!("--virtio-net {spec}"))?;
                if mac.0[0] & 1 != 0 {
                    bail!("--virtio-net {spec}: {mac} is a multicast address");
                }
                (names, Some(mac))
            }
        };
        let (switch, port) = match names.split_once(':') {
            Some((s, p)) => (s.to_string(), p.to_string()),
            None => (names.to_string(), format!("virtio-net{index}")),
        };
        if switch.is_empty() || port.is_empty() {
            bail!("--virtio-net {spec}: expected SWITCH[:PORT][,mac=MAC]");
        }
        Ok(VirtioNic { switch, port, mac })
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KernelFormat {
    Auto,
    Bzimage,
    Elf,
    Flat,
}

impl From<KernelFormat> for ImageFormat {
    fn from(f: KernelFormat) -> Self {
        match f {
            KernelFormat::Auto => ImageFormat::Auto,
            KernelFormat::Bzimage => ImageFormat::BzImage,
            KernelFormat::Elf => ImageFormat::Elf,
            KernelFormat::Flat => ImageFormat::Flat,
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    check_args(&args)?;
    // Blocked before any thread starts, so only the waiter below sees them.
    let signals = Signals::block();
    let memory_bytes = args.memory << 20;
    let config = vspa::config::load_or_default(args.config.as_deref())?;
    let api_options = args.api.options()?;
    let options = Options {
        echo: args
            .echo
            .then_some((ECHO_INSTANCE, Duration::from_secs(10))),
        serve: None,
    };
    let sandbox = args.sandbox.prepare(&run_paths(&args, &config))?;
    let appliance = Arc::new(Mutex::new(Appliance::start(&config, &options)?));
    let api = super::api::start(api_options.as_ref(), &appliance)?;
    let setup = vmbus::worker::lock(&appliance);
    let tenant = pick_tenant(&setup, args.tenant.as_deref())?;
    let ic = setup.ic(&tenant).cloned();
    let console = open_console(&args.serial)?;
    let mut backends: Vec<(Box<dyn VirtioBackend>, Option<PollerWakers>)> = Vec::new();
    for (disk, name) in open_disks(&args.virtio_disk)? {
        backends.push((Box::new(VirtioBlock::new(Box::new(disk), &name)), None));
    }
    for (i, spec) in args.virtio_net.iter().enumerate() {
        let nic = VirtioNic::parse(spec, i)?;
        let sw = setup.switch(&nic.switch).with_context(|| {
            format!(
                "--virtio-net {spec}: no switch {:?} in the configuration",
                nic.switch
            )
        })?;
        let mac = nic
            .mac
            .unwrap_or_else(|| switch::config::derived_mac(&nic.switch, &nic.port));
        let port = SwitchPort::attach(sw, &nic.port, mac.0)
            .with_context(|| format!("--virtio-net {spec}"))?;
        eprintln!(
            "vspa: virtio-net NIC {} on switch {} (MAC {mac})",
            nic.port, nic.switch
        );
        let mut net = VirtioNet::new(Box::new(port));
        let wakers = net.poller_wakers()?;
        backends.push((Box::new(net), Some(wakers)));
    }
    let mut cmdline = args.cmdline.clone();
    for i in 0..backends.len() {
        cmdline.push(' ');
        cmdline.push_str(&vmm::virtio::cmdline_entry(i));
    }
    // virtio devices need the VM's memory: create it in two steps.
    let boot = BootConfig {
        kernel: args.kernel.clone(),
        format: args.kernel_format.into(),
        initrd: args.initrd.clone(),
        cmdline,
    };
    let pending: Vec<_> = backends
        .into_iter()
        .map(|(backend, wakers)| -> anyhow::Result<_> {
            let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            Ok((backend, wakers, irq))
        })
        .collect::<Result<_, _>>()?;
    let mut nics = Vec::new();
    let vm = Vm::new_with(
        VmConfig {
            memory_bytes,
            vcpus: args.vcpus,
            boot,
            console,
            registry: setup.registry(&tenant).expect("picked").clone(),
            virtio: Vec::new(),
            force_msr_filter: false,
        },
        |mem| {
            let mut slots = Vec::new();
            for (backend, wakers, irq) in pending {
                let trigger = irq.try_clone().expect("eventfd clone");
                let device = Arc::new(VirtioMmio::new(
                    backend,
                    mem.clone(),
                    Arc::new(move || {
                        let _ = trigger.write(1);
                    }),
                ));
                if let Some(w) = wakers {
                    nics.push((device.clone(), w));
                }
                slots.push(VirtioSlot { device, irq });
            }
            slots
        },
    )
    .context("cannot start the VM")?;
    drop(setup);
    let pollers = nics
        .into_iter()
        .enumerate()
        .map(|(i, (device, wakers))| NetPoller::spawn(&format!("virtio-net{i}"), device, wakers))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot start the virtio-net poll threads")?;
    let running = vm.start().context("cannot start vCPUs")?;
    // Restores the terminal when `run` returns.
    let _terminal = if args.serial == "stdout" {
        attach_console(&running)?
    } else {
        None
    };
    sandbox.finish()?;
    if let Some(ic) = &ic {
        let partition = running.partition().clone();
        ic.set_reference_clock(Arc::new(move || partition.reference_time()));
    }
    let control = running.control();
    let stop = GuestStop {
        ic,
        ack: Duration::from_millis(args.shutdown_timeout_ms),
        grace: Duration::from_secs(args.shutdown_grace),
    };
    let signalled = std::thread::spawn(move || {
        vspa_threads::enter(vspa_threads::ThreadKind::Signals);
        let sig = signals.wait();
        eprintln!("vspa: signal {sig}, stopping the VM");
        stop.stop(&control)
    });
    let exit = running.wait();
    drop(pollers);
    drop(api);
    super::api::shutdown(appliance);
    let stopped = signalled
        .is_finished()
        .then(|| signalled.join().ok())
        .flatten();
    Ok(report(exit, stopped.as_ref()))
}

/// The tenant whose devices the VM gets.
fn pick_tenant(appliance: &Appliance, wanted: Option<&str>) -> anyhow::Result<String> {
    let names = appliance.tenant_names();
    match wanted {
        Some(t) if names.iter().any(|n| n == t) => Ok(t.to_string()),
        Some(t) => bail!("--tenant {t}: no such tenant (the configuration has {names:?})"),
        None if names.len() == 1 => Ok(names[0].clone()),
        None => bail!("the configuration has tenants {names:?}: choose one with --tenant"),
    }
}

/// What `vspa run` may open once sandboxed: the appliance's paths, the
/// VM's device, its kernel, initrd, serial file and virtio disks.
fn run_paths(args: &RunArgs, config: &vspa::ValidConfig) -> vspa::sandbox::Paths {
    let mut paths = args.sandbox.paths(args.config.as_deref(), config);
    super::sandbox::control_paths(&mut paths, &args.api, None);
    paths.device("/dev/kvm".as_ref()).read(&args.kernel);
    if let Some(initrd) = &args.initrd {
        paths.read(initrd);
    }
    if !matches!(args.serial.as_str(), "stdout" | "none") {
        paths.output(args.serial.as_ref());
    }
    for spec in &args.virtio_disk {
        let (path, ro) = match spec.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (spec.as_str(), false),
        };
        paths.image(path.as_ref(), !ro);
    }
    paths
}

fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    if args.memory < 4 || args.memory > 1 << 20 {
        bail!(
            "--memory {} MiB is out of range (4 MiB to 1 TiB)",
            args.memory
        );
    }
    if args.vcpus == 0 || args.vcpus > MAX_VCPUS {
        bail!("--vcpus {} is out of range (1 to {MAX_VCPUS})", args.vcpus);
    }
    if !args.kernel.is_file() {
        bail!("--kernel {}: no such file", args.kernel.display());
    }
    if let Some(i) = &args.initrd
        && !i.is_file()
    {
        bail!("--initrd {}: no such file", i.display());
    }
    Ok(())
}

/// Feeds standard input to the guest's COM1 from a thread (left blocked
/// in read() when the VM ends; the process exits anyway). A terminal goes
/// raw, with Ctrl-A x to stop the VM; its guard is returned.
fn attach_console(running: &RunningVm) -> anyhow::Result<Option<RawTerminal>> {
    let stdin = std::io::stdin();
    let terminal = RawTerminal::enter(&stdin).context("cannot set up the console terminal")?;
    if terminal.is_some() {
        eprintln!("vspa: console attached; Ctrl-A x stops the VM");
    }
    let input = running.serial_input();
    let control = running.control();
    let interactive = terminal.is_some();
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            vspa_threads::enter(vspa_threads::ThreadKind::Console);
            let stdin = stdin.lock();
            let done = if interactive {
                let quit = move || control.request_exit(VmExit::Stopped);
                input.pump(EscapedInput::new(stdin, quit))
            } else {
                input.pump(stdin)
            };
            if let Err(e) = done {
                eprintln!("vspa: console input: {e}");
            }
        })
        .context("cannot start the console input thread")?;
    Ok(terminal)
}

fn open_console(spec: &str) -> anyhow::Result<ConsoleOut> {
    Ok(match spec {
        "stdout" => Box::new(std::io::stdout()),
        "none" => Box::new(std::io::sink()),
        path => Box::new(std::fs::File::create(path).with_context(|| format!("--serial {path}"))?),
    })
}

fn open_disks(specs: &[String]) -> anyhow::Result<Vec<(ImageDisk, String)>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let (path, ro) = match spec.strip_suffix(",ro") {
                Some(p) => (p, true),
                None => (spec.as_str(), false),
            };
            let disk = ImageDisk::open(path.as_ref(), ro)
                .with_context(|| format!("--virtio-disk {path}"))?;
            Ok((disk, format!("vspa-virtio{i}")))
        })
        .collect()
}

/// The exit status (see [`vspa::guest_stop::exit_code`]), with the reason
/// of a guest failure on stderr.
fn report(exit: VmExit, stopped: Option<&StopOutcome>) -> ExitCode {
    match &exit {
        VmExit::TripleFault { vcpu } => {
            eprintln!("vspa: guest triple-faulted on vCPU {vcpu}; VM stopped")
        }
        VmExit::Error(e) => eprintln!("vspa: VM stopped: {e}"),
        _ => {}
    }
    ExitCode::from(exit_code(&exit, stopped))
}
