//! `vspa run`: boot a guest in vspa's own KVM VMM. The guest reaches the
//! VSPs over VMBus (the Hyper-V synthetic interface) or, without VMBus
//! drivers, through virtio-mmio fallback devices.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use vmbus::echo::EchoDevice;
use vmbus::server::Registry;
use vmm::boot::{BootConfig, ImageFormat};
use vmm::devices::ConsoleOut;
use vmm::virtio::block::{ImageDisk, VirtioBlock};
use vmm::virtio::mmio::VirtioMmio;
use vmm::vm::{MAX_VCPUS, VirtioSlot, Vm, VmConfig, VmExit};

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
    /// Serial console: "stdout", "none" or a file path.
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
    /// A disk image (raw, or VHD fixed/dynamic/differencing) served as a
    /// virtio-blk fallback device; append ",ro" for read-only. Repeatable.
    #[arg(long, value_name = "PATH[,ro]")]
    pub virtio_disk: Vec<String>,
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

/// Exit code of a guest that triple-faulted or broke the VMM's rules.
const GUEST_FAILED: u8 = 2;

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    check_args(&args)?;
    // Blocked before any thread starts, so only the waiter below sees them.
    let signals = crate::serve::block_termination_signals();
    let memory_bytes = args.memory << 20;
    let registry = Registry::new();
    let config = match &args.config {
        Some(path) => crate::serve::load(path)?,
        None => crate::serve::ApplianceConfig::default(),
    };
    let base = args
        .config
        .as_deref()
        .and_then(std::path::Path::parent)
        .unwrap_or(std::path::Path::new("."));
    for c in storage::config::build_all(&config.controller, base)? {
        let luns = c.table().numbers();
        eprintln!("vspa: SCSI controller {} with LUNs {luns:?}", c.config.name);
        registry.add(c);
    }
    let switches = crate::serve::start_switches(&config, &registry)?;
    if args.echo {
        registry.add(Arc::new(EchoDevice::new(
            "5e4d3c2b-1a09-4f8e-9d7c-6b5a49382716"
                .parse()
                .expect("guid"),
        )));
    }
    let console = open_console(&args.serial)?;
    let disks = open_disks(&args.virtio_disk)?;
    let mut cmdline = args.cmdline.clone();
    for i in 0..disks.len() {
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
    let mut slots = Vec::new();
    let pending: Vec<_> = disks
        .into_iter()
        .map(|(disk, name)| -> anyhow::Result<_> {
            let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            Ok((disk, name, irq))
        })
        .collect::<Result<_, _>>()?;
    let vm = Vm::new_with(
        VmConfig {
            memory_bytes,
            vcpus: args.vcpus,
            boot,
            console,
            registry,
            virtio: Vec::new(),
            force_msr_filter: false,
        },
        |mem| {
            for (disk, name, irq) in pending {
                let trigger = irq.try_clone().expect("eventfd clone");
                let device = VirtioMmio::new(
                    Box::new(VirtioBlock::new(Box::new(disk), &name)),
                    mem.clone(),
                    Arc::new(move || {
                        let _ = trigger.write(1);
                    }),
                );
                slots.push(VirtioSlot {
                    device: Arc::new(device),
                    irq,
                });
            }
            std::mem::take(&mut slots)
        },
    )
    .context("cannot start the VM")?;
    let running = vm.start().context("cannot start vCPUs")?;
    let control = running.control();
    std::thread::spawn(move || {
        let sig = crate::serve::wait_for_signal(&signals);
        eprintln!("vspa: signal {sig}, stopping the VM");
        control.request_exit(VmExit::Stopped);
    });
    let exit = running.wait();
    drop(switches);
    Ok(report(exit))
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

fn report(exit: VmExit) -> ExitCode {
    match exit {
        VmExit::Reset | VmExit::PowerOff | VmExit::Stopped => ExitCode::SUCCESS,
        VmExit::TripleFault { vcpu } => {
            eprintln!("vspa: guest triple-faulted on vCPU {vcpu}; VM stopped");
            ExitCode::from(GUEST_FAILED)
        }
        VmExit::Error(e) => {
            eprintln!("vspa: VM stopped: {e}");
            ExitCode::from(GUEST_FAILED)
        }
    }
}
