//! The Hyper-V synthetic interface, emulated in userspace.
//!
//! KVM here offers no in-kernel Hyper-V emulation (and elsewhere vspa does
//! not depend on it), so the VMM provides what a Linux guest's
//! `hv_vmbus` needs itself:
//!
//! - CPUID leaves 0x4000_0000.. ([`crate::cpuid`]) announce "Microsoft Hv".
//! - The synthetic MSRs reach [`Partition::read_msr`] / [`Partition::write_msr`]
//!   through KVM's userspace MSR exits (an MSR filter denies 0x4000_00xx to
//!   the kernel, so every access exits to us).
//! - The reference clock ([`clock`]): TIME_REF_COUNT and the reference TSC
//!   page, both from the guest TSC, so guests read time without exits.
//! - The hypercall page ([`hypercall`]) traps to the VMM with port I/O
//!   instead of `vmcall`. HvSignalEvent writes the connection id to a port
//!   that has one ioeventfd per open channel: the guest-to-host doorbell
//!   stays in the kernel, no userspace exit on the data path.
//! - HvPostMessage hands the message to the unchanged `vmbus` channel
//!   server; its replies come back through [`synic::SynicTransport`], which
//!   writes SIMP slots with the pending/EOM protocol and raises the SINT
//!   vector with KVM_SIGNAL_MSI.
//! - Host-to-guest channel interrupts ([`synic::SynicNotify`]) set the
//!   channel's bit in the SIEFP page of the channel's target VP and raise
//!   the vector: an atomic OR and one ioctl from the VSP worker, no lock.
//!   MODIFYCHANNEL moves a channel's target VP (an atomic store).
//!
//! Everything the guest hands us (MSR values, hypercall inputs, pointers,
//! sizes, connection ids) is validated; bad input gets a #GP or an error
//! status, never a host panic.

pub mod clock;
pub mod hypercall;
pub mod regs;
pub mod synic;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmbus::server::{ChannelServer, Registry};

use self::clock::RefClock;
use self::regs::{ENABLE, HYPERCALL_LOCKED, PAGE_RESERVED, msr};
use self::synic::{HvShared, Synic, SynicTransport};

/// An MSR access the guest must see fail (KVM injects #GP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("#GP on MSR {index:#x}")]
pub struct MsrFault {
    pub index: u32,
}

/// The partition-wide synthetic state plus one SynIC per virtual processor.
pub struct Partition {
    shared: Arc<HvShared>,
    server: Mutex<ChannelServer>,
    guest_os_id: AtomicU64,
    hypercall_msr: Mutex<u64>,
    started: Instant,
    /// The TSC-based reference clock, once measured on the first vCPU.
    clock: OnceLock<RefClock>,
    /// REFERENCE_TSC MSR (page number and enable bit).
    tsc_page_msr: Mutex<u64>,
    /// Signals that took the userspace path (not an ioeventfd).
    slow_signals: AtomicU64,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("vps", &self.shared.vps.len())
            .finish()
    }
}

/// Errors setting up the synthetic interface.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("cannot create the VMBus channel server: {0}")]
    Server(std::io::Error),
}

impl Partition {
    /// State for `vcpus` processors (VP index = APIC id = vCPU number),
    /// with a channel server offering the devices in `registry`.
    pub fn new(
        vm: Arc<VmFd>,
        mem: Arc<GuestMemoryMmap>,
        vcpus: u32,
        registry: Registry,
    ) -> Result<Arc<Self>, HvError> {
        let vps = (0..vcpus).map(|i| Arc::new(Synic::new(i, i))).collect();
        let shared = Arc::new(HvShared::new(vm, mem, vps));
        let transport = SynicTransport::new(shared.clone());
        let server = ChannelServer::new(Box::new(transport), registry).map_err(HvError::Server)?;
        Ok(Arc::new(Partition {
            shared,
            server: Mutex::new(server),
            guest_os_id: AtomicU64::new(0),
            hypercall_msr: Mutex::new(0),
            started: Instant::now(),
            clock: OnceLock::new(),
            tsc_page_msr: Mutex::new(0),
            slow_signals: AtomicU64::new(0),
        }))
    }

    pub fn vp_count(&self) -> u32 {
        self.shared.vps.len() as u32
    }

    /// The SynIC of a virtual processor.
    pub fn synic(&self, vp: u32) -> Option<&Arc<Synic>> {
        self.shared.vps.get(vp as usize)
    }

    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.shared.mem
    }

    /// The channel server's wake event: when readable, call
    /// [`Partition::handle_server_requests`].
    pub fn server_wake(&self) -> Arc<vmbus::event::EventFd> {
        self.server.lock().expect("server").wake_event().clone()
    }

    /// Runs the channel server's queued control requests (resets,
    /// sub-channel offers, hot add/remove).
    pub fn handle_server_requests(&self) {
        if let Err(e) = self.server.lock().expect("server").handle_requests() {
            tracing::warn!("VMBus control request failed: {e}");
        }
    }

    /// Stops every channel (VM shutdown).
    pub fn shutdown(&self) {
        self.server.lock().expect("server").shutdown();
        self.shared.unregister_all_signals();
    }

    /// The negotiated VMBus version, once the guest connected.
    pub fn vmbus_version(&self) -> Option<u32> {
        self.server.lock().expect("server").version()
    }

    /// Sets the TSC-based reference clock (once; later calls are ignored).
    /// Without one, TIME_REF_COUNT follows the host's monotonic clock and
    /// the TSC page MSR faults.
    pub fn set_clock(&self, clock: RefClock) {
        let _ = self.clock.set(clock);
    }

    /// The reference clock, if the TSC page is available.
    pub fn clock(&self) -> Option<&RefClock> {
        self.clock.get()
    }

    /// The partition's reference time (100 ns units), as TIME_REF_COUNT
    /// returns it: what the time sync IC pairs with the host's clock.
    pub fn reference_time(&self) -> u64 {
        match self.clock.get() {
            Some(c) => c.now(),
            None => (self.started.elapsed().as_nanos() / 100) as u64,
        }
    }

    /// REFERENCE_TSC: enable bit and page number. Enabling writes the page
    /// (sequence, scale, offset) into guest RAM.
    fn write_tsc_page_msr(&self, value: u64) -> Option<()> {
        let clock = self.clock.get()?;
        if value & PAGE_RESERVED != 0 {
            return None;
        }
        if value & ENABLE != 0 {
            let gpa = value & !0xfff;
            if !synic::page_in_ram(&self.shared.mem, gpa) {
                return None;
            }
            synic::write_guest(&self.shared.mem, gpa, &clock.page())?;
        }
        *self.tsc_page_msr.lock().expect("tsc page msr") = value;
        Some(())
    }

    /// Guest `rdmsr` of a synthetic MSR on `vp`.
    pub fn read_msr(&self, vp: u32, index: u32) -> Result<u64, MsrFault> {
        let fault = MsrFault { index };
        let synic = self.synic(vp).ok_or(fault)?;
        match index {
            msr::GUEST_OS_ID => Ok(self.guest_os_id.load(Ordering::Relaxed)),
            msr::HYPERCALL => Ok(*self.hypercall_msr.lock().expect("hypercall msr")),
            msr::VP_INDEX => Ok(u64::from(vp)),
            msr::TIME_REF_COUNT => Ok(self.reference_time()),
            msr::REFERENCE_TSC if self.clock.get().is_some() => {
                Ok(*self.tsc_page_msr.lock().expect("tsc page msr"))
            }
            msr::SVERSION => Ok(1),
            msr::EOM => Ok(0),
            _ => synic.read_msr(index).ok_or(fault),
        }
    }

    /// Guest `wrmsr` of a synthetic MSR on `vp`.
    pub fn write_msr(&self, vp: u32, index: u32, value: u64) -> Result<(), MsrFault> {
        let fault = MsrFault { index };
        let synic = self.synic(vp).ok_or(fault)?;
        match index {
            msr::GUEST_OS_ID => {
                self.guest_os_id.store(value, Ordering::Relaxed);
                if value == 0 {
                    // Clearing the OS id disables the hypercall page.
                    *self.hypercall_msr.lock().expect("hypercall msr") &= !ENABLE;
                }
                Ok(())
            }
            msr::HYPERCALL => self.write_hypercall_msr(value).ok_or(fault),
            msr::REFERENCE_TSC => self.write_tsc_page_msr(value).ok_or(fault),
            msr::EOM => {
                synic.end_of_message(&self.shared);
                Ok(())
            }
            msr::VP_INDEX | msr::TIME_REF_COUNT | msr::SVERSION => Err(fault),
            _ => synic.write_msr(&self.shared, index, value).ok_or(fault),
        }
    }

    /// HYPERCALL MSR: enable bit, lock bit, page number. Enabling fills the
    /// page with the trapping call sequence.
    fn write_hypercall_msr(&self, value: u64) -> Option<()> {
        let mut cur = self.hypercall_msr.lock().expect("hypercall msr");
        if *cur & HYPERCALL_LOCKED != 0 {
            return Some(()); // locked: writes are ignored
        }
        if value & (PAGE_RESERVED & !HYPERCALL_LOCKED) != 0 {
            return None;
        }
        let mut value = value;
        if self.guest_os_id.load(Ordering::Relaxed) == 0 {
            value &= !ENABLE; // no hypercalls before the guest identifies itself
        }
        if value & ENABLE != 0 {
            let gpa = value & !0xfff;
            hypercall::write_page(&self.shared.mem, gpa)?;
        }
        *cur = value;
        Some(())
    }

    /// Runs a hypercall trapped by the hypercall page; returns RAX.
    pub fn hypercall(&self, vp: u32, input: hypercall::Input) -> u64 {
        hypercall::dispatch(self, vp, input)
    }

    /// HvPostMessage's payload, handed to the channel server.
    fn post_message(&self, payload: &[u8]) {
        self.shared.note_initiate_contact(payload);
        let result = self
            .server
            .lock()
            .expect("server")
            .handle_message(payload, Vec::new());
        if let Err(e) = result {
            tracing::warn!("VMBus message refused: {e}");
        }
    }

    /// HvSignalEvent on a connection; false if no such connection.
    fn signal_connection(&self, connection_id: u32) -> bool {
        self.slow_signals.fetch_add(1, Ordering::Relaxed);
        self.shared.signal_connection(connection_id)
    }

    /// HvSignalEvents that reached userspace (unknown connection ids, slow
    /// calls); an open channel's fast signals never count here.
    pub fn slow_signals(&self) -> u64 {
        self.slow_signals.load(Ordering::Relaxed)
    }
}
