//! A KVM virtual machine: memory, in-kernel irqchip and PIT, boot state,
//! the Hyper-V partition, legacy and virtio-mmio devices, and one thread
//! per vCPU running the exit loop.

#![allow(unsafe_code)]

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_UNKNOWN, kvm_enable_cap, kvm_msi, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{
    Kvm, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit,
    VcpuFd, VmFd,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmbus::server::Registry;
use vmm_sys_util::eventfd::EventFd as KvmEventFd;

use crate::boot::{self, BootConfig, BootError, BootInfo};
use crate::devices::{ConsoleOut, LegacyDevices, MmioDevice, ResetLine};
use crate::hv::{self, Partition, regs::msr};
use crate::layout;

/// Everything `Vm::new` needs.
pub struct VmConfig {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub boot: BootConfig,
    /// Serial console output (COM1).
    pub console: ConsoleOut,
    /// VMBus devices offered to the guest.
    pub registry: Registry,
    /// virtio-mmio devices, placed at `layout::virtio_mmio_addr(i)` with
    /// IOAPIC pin `VIRTIO_IRQ_BASE + i`.
    pub virtio: Vec<VirtioSlot>,
    /// Install the MSR filter even where the kernel has no Hyper-V
    /// emulation of its own (tests use this to cover both paths).
    pub force_msr_filter: bool,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("memory_bytes", &self.memory_bytes)
            .field("vcpus", &self.vcpus)
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

/// A virtio-mmio device and the eventfd it raises its interrupt with.
#[derive(Debug)]
pub struct VirtioSlot {
    pub device: Arc<dyn MmioDevice>,
    /// Registered as the irqfd of the device's IOAPIC pin.
    pub irq: KvmEventFd,
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 or 0xcf9): a clean exit.
    Reset,
    /// The guest powered the machine off.
    PowerOff,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u32 },
    /// The host stopped the VM.
    Stopped,
    /// Something the VMM cannot continue from (details in the text).
    Error(String),
}

/// Errors creating or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("KVM lacks {0}")]
    MissingCap(&'static str),
    #[error("{0} vCPUs requested; 1 to {1} are supported")]
    BadVcpus(u32, u32),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Hv(#[from] hv::HvError),
    #[error("ACPI tables: {0}")]
    Acpi(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(&'static str),
    #[error("CPUID: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

/// Largest vCPU count (xAPIC ids and the MADT's u8 ids).
pub const MAX_VCPUS: u32 = 64;

/// A created, not yet running VM.
#[derive(Debug)]
pub struct Vm {
    vm: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    partition: Arc<Partition>,
    vcpus: Vec<VcpuFd>,
    devices: Arc<Devices>,
    control: Arc<Control>,
    boot: BootInfo,
}

/// The devices vCPU threads dispatch exits to.
#[derive(Debug)]
struct Devices {
    legacy: LegacyDevices,
    mmio: Vec<(u64, Arc<dyn MmioDevice>)>,
    /// Keeps irqfds alive for the VM's lifetime.
    _irqs: Vec<KvmEventFd>,
}

impl Vm {
    /// Creates the VM and loads the guest; nothing runs yet.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        Self::new_with(cfg, |_| Vec::new())
    }

    /// Like [`Vm::new`], with virtio devices built once guest memory
    /// exists (device models need it); they follow `cfg.virtio`.
    pub fn new_with(
        mut cfg: VmConfig,
        virtio: impl FnOnce(&Arc<GuestMemoryMmap>) -> Vec<VirtioSlot>,
    ) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::BadVcpus(cfg.vcpus, MAX_VCPUS));
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
        let mem = crate::memory::create_guest_ram(cfg.memory_bytes)?;
        cfg.virtio.extend(virtio(&mem));
        register_memory(&vm, &mem)?;
        create_platform(&vm)?;
        enable_userspace_msrs(&vm, cfg.force_msr_filter)?;
        let boot = boot::load(&mem, cfg.memory_bytes, &cfg.boot)?;
        crate::acpi::write_tables(&mem, cfg.vcpus, cfg.virtio.len())
            .map_err(|e| VmError::Acpi(e.to_string()))?;
        let partition = Partition::new(vm.clone(), mem.clone(), cfg.vcpus, cfg.registry)?;
        let control = Arc::new(Control::default());
        let devices = Arc::new(create_devices(&vm, cfg.console, cfg.virtio, &control)?);
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_page = kvm.check_extension(kvm_ioctls::Cap::GetTscKhz);
        let vcpus = (0..cfg.vcpus)
            .map(|id| create_vcpu(&vm, &supported, id, cfg.vcpus, tsc_page, &boot))
            .collect::<Result<Vec<_>, _>>()?;
        if tsc_page {
            partition.set_clock(measure_clock(&vcpus[0])?);
        }
        Ok(Vm {
            vm,
            mem,
            partition,
            vcpus,
            devices,
            control,
            boot,
        })
    }

    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    pub fn boot_info(&self) -> BootInfo {
        self.boot
    }

    /// Starts one thread per vCPU and one for the VMBus control requests.
    pub fn start(self) -> Result<RunningVm, VmError> {
        install_kick_handler();
        let mut threads = Vec::new();
        for (id, vcpu) in self.vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u32,
                partition: self.partition.clone(),
                devices: self.devices.clone(),
                control: self.control.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(vcpu, ctx))?;
            threads.push(t);
        }
        let server = spawn_server_thread(self.partition.clone(), self.control.clone())?;
        Ok(RunningVm {
            vm: self.vm,
            mem: self.mem,
            partition: self.partition,
            devices: self.devices,
            control: self.control,
            threads,
            server: Some(server),
        })
    }
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory(crate::memory::MemoryError::Map(e.to_string())))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped as long as the VM: `mem` is
        // owned by the Vm/RunningVm and dropped after the VM fd.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }
    Ok(())
}

fn create_platform(vm: &VmFd) -> Result<(), VmError> {
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("set identity map"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    Ok(())
}

/// Routes every access to 0x4000_0000..0x4000_00ff to userspace.
///
/// A kernel with in-kernel Hyper-V emulation (KVM_CAP_HYPERV) would claim
/// those MSRs itself, so there an MSR filter denies them to the kernel. A
/// kernel without it does not know them: they exit as "unknown" MSRs, and
/// the filter (whose installation waits for an SRCU grace period, over
/// 10 ms of start-up) is skipped. Other unknown MSRs get the #GP KVM would
/// have injected.
fn enable_userspace_msrs(vm: &VmFd, force_filter: bool) -> Result<(), VmError> {
    if !vm.check_extension(kvm_ioctls::Cap::X86UserSpaceMsr) {
        return Err(VmError::MissingCap("KVM_CAP_X86_USER_SPACE_MSR"));
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [
            u64::from(KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(kvm_err("enable userspace MSRs"))?;
    if !force_filter && !vm.check_extension(kvm_ioctls::Cap::Hyperv) {
        return Ok(());
    }
    let deny = [0u8; (msr::RANGE_COUNT / 8) as usize];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: msr::RANGE_BASE,
        msr_count: msr::RANGE_COUNT,
        bitmap: &deny,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        .map_err(kvm_err("set MSR filter"))
}

fn create_devices(
    vm: &VmFd,
    console: ConsoleOut,
    virtio: Vec<VirtioSlot>,
    control: &Arc<Control>,
) -> Result<Devices, VmError> {
    let serial_irq = KvmEventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(kvm_err("serial irqfd"))?;
    let c = control.clone();
    let reset = ResetLine(Arc::new(move || c.request_exit(VmExit::Reset)));
    let legacy = LegacyDevices::new(serial_irq.try_clone()?, console, reset);
    let mut irqs = vec![serial_irq];
    let mut mmio = Vec::new();
    for (i, slot) in virtio.into_iter().enumerate() {
        vm.register_irqfd(&slot.irq, layout::VIRTIO_IRQ_BASE + i as u32)
            .map_err(kvm_err("virtio irqfd"))?;
        mmio.push((layout::virtio_mmio_addr(i), slot.device));
        irqs.push(slot.irq);
    }
    Ok(Devices {
        legacy,
        mmio,
        _irqs: irqs,
    })
}

const IA32_TSC: u32 = 0x10;

fn tsc_msr() -> Result<kvm_bindings::Msrs, VmError> {
    kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }])
    .map_err(|_| VmError::Setup("MSR list"))
}

/// The guest's TSC rate and its offset from ours, read on `vcpu` (KVM
/// keeps every vCPU's TSC in step): the reference clock and TSC page.
fn measure_clock(vcpu: &VcpuFd) -> Result<hv::clock::RefClock, VmError> {
    let khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
    let mut msrs = tsc_msr()?;
    // The guest TSC read between two host reads: take the midpoint.
    let before = hv::clock::host_tsc();
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(kvm_err("read the guest TSC"))?;
    let after = hv::clock::host_tsc();
    if read != 1 {
        return Err(VmError::Setup("KVM did not return the guest TSC"));
    }
    let guest = msrs.as_slice()[0].data;
    let host = before + after.wrapping_sub(before) / 2;
    hv::clock::RefClock::new(khz, guest, host).ok_or(VmError::Setup("guest TSC below 10 MHz"))
}

fn create_vcpu(
    vm: &VmFd,
    supported: &kvm_bindings::CpuId,
    id: u32,
    count: u32,
    tsc_page: bool,
    boot: &BootInfo,
) -> Result<VcpuFd, VmError> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(kvm_err("create vCPU"))?;
    let cpuid = crate::cpuid::vcpu_cpuid(supported, id, count, tsc_page).map_err(VmError::Cpuid)?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
    let regs = boot::long_mode_registers(boot, &mut sregs);
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
    vcpu.set_fpu(&boot::initial_fpu())
        .map_err(kvm_err("set FPU"))?;
    set_lint(&vcpu)?;
    if id != 0 {
        // Application processors wait for INIT/SIPI from the BSP.
        let mp = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        };
        vcpu.set_mp_state(mp).map_err(kvm_err("set MP state"))?;
    }
    Ok(vcpu)
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> Result<(), VmError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get LAPIC"))?;
    let mut set = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    set(LVT_LINT0, 0x7);
    set(LVT_LINT1, 0x4);
    vcpu.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))
}

/// Stop state shared by the vCPU threads and the VM's owner.
#[derive(Debug, Default)]
pub struct Control {
    exit: Mutex<Option<VmExit>>,
    cv: Condvar,
    stopping: AtomicBool,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl Control {
    /// Records the first exit reason and makes every vCPU leave KVM_RUN.
    pub fn request_exit(&self, reason: VmExit) {
        let mut exit = self.exit.lock().expect("exit");
        if exit.is_none() {
            tracing::info!("VM exit: {reason:?}");
            *exit = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        drop(exit);
        self.kick();
    }

    fn kick(&self) {
        for &t in self.threads.lock().expect("threads").iter() {
            // SAFETY: the thread ids belong to vCPU threads that unregister
            // themselves before exiting; the signal has a no-op handler.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits until the VM stops, or `timeout` passes (None).
    pub fn wait_for_exit(&self, timeout: Duration) -> Option<VmExit> {
        self.wait(Some(timeout))
    }

    fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let exit = self.exit.lock().expect("exit");
        let exit = match timeout {
            None => self.cv.wait_while(exit, |e| e.is_none()).expect("exit"),
            Some(t) => {
                self.cv
                    .wait_timeout_while(exit, t, |e| e.is_none())
                    .expect("exit")
                    .0
            }
        };
        exit.clone()
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs a no-op handler for the kick signal: delivering it makes
/// KVM_RUN return EINTR without killing the process.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// A running VM.
#[derive(Debug)]
pub struct RunningVm {
    vm: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    partition: Arc<Partition>,
    devices: Arc<Devices>,
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
}

impl RunningVm {
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    /// Raises `vector` on the vCPU with `apic_id` (tests use this to kick
    /// the test guest).
    pub fn raise_msi(&self, apic_id: u32, vector: u8) {
        let msi = kvm_msi {
            address_lo: (layout::LAPIC_ADDR as u32) | (apic_id << 12),
            data: u32::from(vector),
            ..Default::default()
        };
        let _ = self.vm.signal_msi(msi);
    }

    /// The serial console's input side, for another thread to feed.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput {
            devices: self.devices.clone(),
            control: self.control.clone(),
        }
    }

    /// A handle that can stop the VM from another thread.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// The exit reason, once the VM stopped by itself.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.control.wait(Some(Duration::ZERO))
    }

    /// Waits until the VM stops by itself (or `timeout` passes: `None`).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.control.wait(Some(timeout))
    }

    /// Waits until the VM stops by itself, then tears it down.
    pub fn wait(self) -> VmExit {
        let exit = self.control.wait(None);
        self.teardown();
        exit.unwrap_or(VmExit::Stopped)
    }

    /// Stops the VM (if still running) and returns why it ended.
    pub fn stop(self) -> VmExit {
        self.control.request_exit(VmExit::Stopped);
        let exit = self.control.wait(None);
        self.teardown();
        exit.unwrap_or(VmExit::Stopped)
    }

    fn teardown(mut self) {
        self.control.request_exit(VmExit::Stopped);
        // Kick until every vCPU noticed (a kick can land just before KVM_RUN).
        while self.threads.iter().any(|t| !t.is_finished()) {
            self.control.kick();
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        self.partition.shutdown();
    }
}

/// Feeds console input to the guest's COM1 receiver.
#[derive(Debug, Clone)]
pub struct SerialInput {
    devices: Arc<Devices>,
    control: Arc<Control>,
}

impl SerialInput {
    /// Queues what the receive FIFO has room for; returns the bytes taken.
    pub fn push(&self, bytes: &[u8]) -> usize {
        self.devices.legacy.serial_input(bytes)
    }

    /// Copies `input` to the guest until EOF or the VM stops, waiting
    /// while the guest leaves the FIFO full (nothing is dropped).
    pub fn pump(&self, mut input: impl std::io::Read) -> std::io::Result<()> {
        let mut buf = [0u8; 256];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                if self.control.stopping.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let taken = self.push(rest);
                rest = &rest[taken..];
                if taken == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.request_exit(VmExit::Stopped);
            while self.threads.iter().any(|t| !t.is_finished()) {
                self.control.kick();
                std::thread::sleep(Duration::from_millis(2));
            }
            self.partition.shutdown();
        }
    }
}

/// Runs the VMBus control requests (resets, hot add, sub-channel offers).
fn spawn_server_thread(
    partition: Arc<Partition>,
    control: Arc<Control>,
) -> std::io::Result<JoinHandle<()>> {
    let wake = partition.server_wake();
    std::thread::Builder::new()
        .name("vmbus-control".into())
        .spawn(move || {
            vspa_threads::enter(vspa_threads::ThreadKind::VmControl);
            while !control.is_stopping() {
                let [ready] =
                    vmbus::event::poll_readable([wake.as_fd()], Some(Duration::from_millis(50)));
                if ready {
                    partition.handle_server_requests();
                }
            }
        })
}

struct VcpuContext {
    id: u32,
    partition: Arc<Partition>,
    devices: Arc<Devices>,
    control: Arc<Control>,
}

/// What to do after an exit, once the exit's borrow of the vCPU ended.
enum After {
    Continue,
    Hypercall,
    UnmatchedSignal(u32),
    Stop(VmExit),
}

fn run_vcpu(vcpu: VcpuFd, ctx: VcpuContext) {
    vspa_threads::enter(vspa_threads::ThreadKind::Vcpu);
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    ctx.control.threads.lock().expect("threads").push(me);
    // A bug that panics here must stop the VM, not leave its owner waiting.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu_loop(vcpu, &ctx)));
    if ran.is_err() {
        ctx.control
            .request_exit(VmExit::Error(format!("vCPU {} thread panicked", ctx.id)));
    }
    ctx.control
        .threads
        .lock()
        .expect("threads")
        .retain(|&t| t != me);
}

fn vcpu_loop(mut vcpu: VcpuFd, ctx: &VcpuContext) {
    while !ctx.control.is_stopping() {
        let after = match vcpu.run() {
            Ok(exit) => handle_exit(ctx, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => After::Continue,
            Err(e) => After::Stop(VmExit::Error(format!("vCPU {}: KVM_RUN: {e}", ctx.id))),
        };
        match after {
            After::Continue => {}
            After::Hypercall => finish_hypercall(&vcpu, ctx),
            After::UnmatchedSignal(id) => finish_signal(&vcpu, ctx, id),
            After::Stop(reason) => ctx.control.request_exit(reason),
        }
    }
}

fn handle_exit(ctx: &VcpuContext, exit: VcpuExit<'_>) -> After {
    match exit {
        VcpuExit::IoOut(port, data) => match port {
            layout::HV_HYPERCALL_PORT => After::Hypercall,
            layout::HV_SIGNAL_PORT if data.len() == 4 => {
                After::UnmatchedSignal(u32::from_le_bytes(data.try_into().expect("4 bytes")))
            }
            _ => {
                ctx.devices.legacy.pio_write(port, data);
                After::Continue
            }
        },
        VcpuExit::IoIn(port, data) => {
            ctx.devices.legacy.pio_read(port, data);
            After::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            match find_mmio(&ctx.devices, addr) {
                Some((dev, off)) => dev.mmio_read(off, data),
                None => data.fill(0xff),
            }
            After::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if let Some((dev, off)) = find_mmio(&ctx.devices, addr) {
                dev.mmio_write(off, data);
            }
            After::Continue
        }
        VcpuExit::X86Rdmsr(exit) => {
            match ctx.partition.read_msr(ctx.id, exit.index) {
                Ok(v) if synthetic_msr_exit(exit.reason, exit.index) => *exit.data = v,
                _ => {
                    tracing::debug!(vcpu = ctx.id, msr = exit.index, "rdmsr #GP");
                    *exit.error = 1;
                }
            }
            After::Continue
        }
        VcpuExit::X86Wrmsr(exit) => {
            let ok = synthetic_msr_exit(exit.reason, exit.index)
                && ctx
                    .partition
                    .write_msr(ctx.id, exit.index, exit.data)
                    .is_ok();
            if !ok {
                tracing::debug!(
                    vcpu = ctx.id,
                    msr = exit.index,
                    value = exit.data,
                    "wrmsr #GP"
                );
                *exit.error = 1;
            }
            After::Continue
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => After::Continue,
        VcpuExit::Shutdown => After::Stop(VmExit::TripleFault { vcpu: ctx.id }),
        VcpuExit::SystemEvent(kind, _) => After::Stop(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
            other => VmExit::Error(format!("vCPU {}: system event {other}", ctx.id)),
        }),
        VcpuExit::FailEntry(reason, _) => After::Stop(VmExit::Error(format!(
            "vCPU {}: entry failed (hardware reason {reason:#x})",
            ctx.id
        ))),
        VcpuExit::InternalError => After::Stop(VmExit::Error(format!(
            "vCPU {}: KVM internal error (instruction the emulator cannot run?)",
            ctx.id
        ))),
        other => After::Stop(VmExit::Error(format!(
            "vCPU {}: unexpected exit {other:?}",
            ctx.id
        ))),
    }
}

/// An MSR exit the synthetic interface handles: a Hyper-V MSR, exiting
/// through the filter or as unknown to the kernel.
fn synthetic_msr_exit(reason: MsrExitReason, index: u32) -> bool {
    let hv = (msr::RANGE_BASE..msr::RANGE_BASE + msr::RANGE_COUNT).contains(&index);
    hv && (reason == MsrExitReason::Filter || reason == MsrExitReason::Unknown)
}

fn find_mmio(devices: &Devices, addr: u64) -> Option<(&Arc<dyn MmioDevice>, u64)> {
    devices
        .mmio
        .iter()
        .find(|(base, _)| (*base..*base + layout::VIRTIO_MMIO_SIZE).contains(&addr))
        .map(|(base, dev)| (dev, addr - base))
}

/// The generic hypercall trap: RCX control, R9 input, R8 output; RAX result.
fn finish_hypercall(vcpu: &VcpuFd, ctx: &VcpuContext) {
    let Ok(mut regs) = vcpu.get_regs() else {
        ctx.control
            .request_exit(VmExit::Error("cannot read registers".into()));
        return;
    };
    let input = hv::hypercall::Input {
        control: regs.rcx,
        param1: regs.r9,
        param2: regs.r8,
    };
    regs.rax = ctx.partition.hypercall(ctx.id, input);
    if vcpu.set_regs(&regs).is_err() {
        ctx.control
            .request_exit(VmExit::Error("cannot write registers".into()));
    }
}

/// A signal-port write KVM had no ioeventfd for: answer through R9.
fn finish_signal(vcpu: &VcpuFd, ctx: &VcpuContext, connection_id: u32) {
    let Ok(mut regs) = vcpu.get_regs() else {
        ctx.control
            .request_exit(VmExit::Error("cannot read registers".into()));
        return;
    };
    regs.r9 = hv::hypercall::unmatched_signal(&ctx.partition, connection_id);
    if vcpu.set_regs(&regs).is_err() {
        ctx.control
            .request_exit(VmExit::Error("cannot write registers".into()));
    }
}
