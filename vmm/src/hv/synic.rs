//! The synthetic interrupt controller of each virtual processor, and the
//! `vmbus` transport built on it.
//!
//! Message slots (SIMP page, 256 bytes per SINT) follow the TLFS protocol:
//! a slot is free while its `message_type` is 0; the host writes the
//! payload and then the type; a host finding the slot busy sets the slot's
//! `msg_pending` flag and waits for the guest's EOM. Event flags (SIEFP
//! page, 2048 bits per SINT) are set with an atomic OR. Both raise the
//! SINT's vector with KVM_SIGNAL_MSI unless the SINT is masked.
#![allow(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_msi;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmbus::SharedMemory;
use vmbus::event::{EventFd, Notify};
use vmbus::server::{ChannelSignals, Transport, TransportError};
use vmbus::wire::{MessageHeader, msgtype};
use zerocopy::FromBytes;

use super::regs::{
    ENABLE, EVENT_FLAGS, MAX_PAYLOAD, PAGE_RESERVED, SLOT_SIZE, VMBUS_SINT, msr, sint,
};
use crate::layout::{HV_SIGNAL_PORT, LAPIC_ADDR};

/// Offsets inside a message slot (`struct hv_message`).
pub mod slot {
    pub const MESSAGE_TYPE: u64 = 0;
    pub const PAYLOAD_SIZE: u64 = 4;
    pub const FLAGS: u64 = 5;
    pub const PAYLOAD: u64 = 16;
    /// `message_flags.msg_pending`.
    pub const PENDING: u8 = 1;
}

/// Message type of VMBus channel messages (both directions).
pub const VMBUS_MESSAGE_TYPE: u32 = 1;

/// A host-to-guest message waiting for its slot.
#[derive(Debug, Clone)]
struct QueuedMessage {
    kind: u32,
    len: u8,
    payload: [u8; MAX_PAYLOAD],
}

/// One virtual processor's SynIC.
#[derive(Debug)]
pub struct Synic {
    pub vp_index: u32,
    pub apic_id: u32,
    scontrol: AtomicU64,
    simp: AtomicU64,
    siefp: AtomicU64,
    sints: [AtomicU64; 16],
    queues: Mutex<[VecDeque<QueuedMessage>; 16]>,
}

/// Most messages queued per SINT before the guest is considered stuck.
const MAX_QUEUED: usize = 1024;

impl Synic {
    pub fn new(vp_index: u32, apic_id: u32) -> Self {
        Synic {
            vp_index,
            apic_id,
            scontrol: AtomicU64::new(0),
            simp: AtomicU64::new(0),
            siefp: AtomicU64::new(0),
            sints: std::array::from_fn(|_| AtomicU64::new(sint::MASKED)),
            queues: Mutex::new(std::array::from_fn(|_| VecDeque::new())),
        }
    }

    pub fn read_msr(&self, index: u32) -> Option<u64> {
        match index {
            msr::SCONTROL => Some(self.scontrol.load(Ordering::Acquire)),
            msr::SIMP => Some(self.simp.load(Ordering::Acquire)),
            msr::SIEFP => Some(self.siefp.load(Ordering::Acquire)),
            msr::SINT0..=msr::SINT15 => {
                Some(self.sints[(index - msr::SINT0) as usize].load(Ordering::Acquire))
            }
            _ => None,
        }
    }

    /// Validates and stores a SynIC MSR; `None` means #GP.
    pub fn write_msr(&self, shared: &HvShared, index: u32, value: u64) -> Option<()> {
        match index {
            msr::SCONTROL => {
                if value & !ENABLE != 0 {
                    return None;
                }
                self.scontrol.store(value, Ordering::Release);
            }
            msr::SIMP | msr::SIEFP => {
                if value & PAGE_RESERVED != 0 {
                    return None;
                }
                if value & ENABLE != 0 && !page_in_ram(&shared.mem, value & !0xfff) {
                    return None;
                }
                let reg = if index == msr::SIMP {
                    &self.simp
                } else {
                    &self.siefp
                };
                reg.store(value, Ordering::Release);
            }
            msr::SINT0..=msr::SINT15 => {
                let masked = value & sint::MASKED != 0;
                if value & !sint::WRITABLE != 0 || (!masked && value & sint::VECTOR < 16) {
                    return None;
                }
                self.sints[(index - msr::SINT0) as usize].store(value, Ordering::Release);
            }
            _ => return None,
        }
        // Enabling the SIMP (or SynIC) may free the way for queued messages.
        self.deliver_all(shared);
        Some(())
    }

    fn enabled(&self) -> bool {
        self.scontrol.load(Ordering::Acquire) & ENABLE != 0
    }

    /// GPA of `sint`'s message slot, if the SIMP is enabled.
    pub fn message_slot(&self, sint: usize) -> Option<u64> {
        let simp = self.simp.load(Ordering::Acquire);
        (self.enabled() && simp & ENABLE != 0).then(|| (simp & !0xfff) + sint as u64 * SLOT_SIZE)
    }

    /// GPA of `sint`'s event flags, if the SIEFP is enabled.
    pub fn event_slot(&self, sint: usize) -> Option<u64> {
        let siefp = self.siefp.load(Ordering::Acquire);
        (self.enabled() && siefp & ENABLE != 0).then(|| (siefp & !0xfff) + sint as u64 * SLOT_SIZE)
    }

    /// Queues a message for `sint` and delivers what fits. False if the
    /// queue is full (the guest stopped taking messages).
    pub fn post(&self, shared: &HvShared, sint: usize, kind: u32, payload: &[u8]) -> bool {
        let mut msg = QueuedMessage {
            kind,
            len: payload.len().min(MAX_PAYLOAD) as u8,
            payload: [0; MAX_PAYLOAD],
        };
        msg.payload[..msg.len as usize].copy_from_slice(&payload[..msg.len as usize]);
        let mut queues = self.queues.lock().expect("synic queues");
        if queues[sint].len() >= MAX_QUEUED {
            return false;
        }
        queues[sint].push_back(msg);
        self.deliver(shared, sint, &mut queues[sint]);
        true
    }

    /// The guest wrote EOM: retry every SINT with queued messages.
    pub fn end_of_message(&self, shared: &HvShared) {
        self.deliver_all(shared);
    }

    fn deliver_all(&self, shared: &HvShared) {
        let mut queues = self.queues.lock().expect("synic queues");
        for (sint, q) in queues.iter_mut().enumerate() {
            if !q.is_empty() {
                self.deliver(shared, sint, q);
            }
        }
    }

    /// Moves the head of the queue into the slot if the slot is free;
    /// otherwise flags the slot as pending so the guest sends EOM.
    fn deliver(&self, shared: &HvShared, sint: usize, queue: &mut VecDeque<QueuedMessage>) {
        let Some(gpa) = self.message_slot(sint) else {
            return;
        };
        let Some(kind_ref) = guest_atomic_u32(&shared.mem, gpa + slot::MESSAGE_TYPE) else {
            return;
        };
        let Some(flags_ref) = guest_atomic_u8(&shared.mem, gpa + slot::FLAGS) else {
            return;
        };
        let Some(msg) = queue.front() else { return };
        if kind_ref.load(Ordering::Acquire) != 0 {
            flags_ref.fetch_or(slot::PENDING, Ordering::SeqCst);
            // The guest may have emptied the slot before it saw the flag.
            if kind_ref.load(Ordering::SeqCst) != 0 {
                return;
            }
        }
        let mut bytes = [0u8; SLOT_SIZE as usize];
        bytes[slot::PAYLOAD_SIZE as usize] = msg.len;
        if queue.len() > 1 {
            bytes[slot::FLAGS as usize] = slot::PENDING;
        }
        bytes[slot::PAYLOAD as usize..][..MAX_PAYLOAD].copy_from_slice(&msg.payload);
        let kind = msg.kind;
        if write_guest(&shared.mem, gpa + 4, &bytes[4..]).is_none() {
            return;
        }
        kind_ref.store(kind, Ordering::Release);
        queue.pop_front();
        self.raise(shared, sint);
    }

    /// Sets event flag `flag` of `sint` and interrupts unless it was set.
    pub fn signal_event(&self, shared: &HvShared, sint: usize, flag: u32) {
        if flag >= EVENT_FLAGS {
            return;
        }
        let Some(base) = self.event_slot(sint) else {
            return;
        };
        let Some(byte) = guest_atomic_u8(&shared.mem, base + u64::from(flag / 8)) else {
            return;
        };
        let bit = 1u8 << (flag % 8);
        if byte.fetch_or(bit, Ordering::SeqCst) & bit == 0 {
            self.raise(shared, sint);
        }
    }

    /// Raises `sint`'s vector on this processor, unless masked or polled.
    pub fn raise(&self, shared: &HvShared, sint: usize) {
        let v = self.sints[sint].load(Ordering::Acquire);
        if v & (sint::MASKED | sint::POLLING) != 0 || v & sint::VECTOR < 16 {
            return;
        }
        shared.raise_vector(self.apic_id, (v & sint::VECTOR) as u8);
    }

    /// Messages waiting for `sint`'s slot (tests and diagnostics).
    pub fn queued(&self, sint: usize) -> usize {
        self.queues.lock().expect("synic queues")[sint].len()
    }
}

/// State shared by the partition, its transport and channel notifiers.
#[derive(Debug)]
pub struct HvShared {
    pub vm: Arc<VmFd>,
    pub mem: Arc<GuestMemoryMmap>,
    pub vps: Vec<Arc<Synic>>,
    /// VP that receives VMBus messages (INITIATE_CONTACT's target_vcpu).
    message_vp: AtomicU32,
    /// ioeventfds registered per event connection id.
    signals: Mutex<HashMap<u32, Registered>>,
}

#[derive(Debug)]
struct Registered {
    doorbell: Arc<EventFd>,
    kvm_fd: vmm_sys_util::eventfd::EventFd,
}

impl HvShared {
    pub fn new(vm: Arc<VmFd>, mem: Arc<GuestMemoryMmap>, vps: Vec<Arc<Synic>>) -> Self {
        HvShared {
            vm,
            mem,
            vps,
            message_vp: AtomicU32::new(0),
            signals: Mutex::new(HashMap::new()),
        }
    }

    /// Raises `vector` on the processor with `apic_id` (fixed delivery,
    /// physical destination, edge).
    pub fn raise_vector(&self, apic_id: u32, vector: u8) {
        let msi = kvm_msi {
            address_lo: (LAPIC_ADDR as u32) | ((apic_id & 0xff) << 12),
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            tracing::warn!(apic_id, vector, "KVM_SIGNAL_MSI failed: {e}");
        }
    }

    /// Remembers which VP asked for VMBus messages (INITIATE_CONTACT).
    pub fn note_initiate_contact(&self, payload: &[u8]) {
        let Ok((h, _)) = MessageHeader::read_from_prefix(payload) else {
            return;
        };
        if h.msgtype.get() != msgtype::INITIATE_CONTACT {
            return;
        }
        if let Ok((m, _)) = vmbus::wire::InitiateContact::read_from_prefix(payload) {
            let vp = m.target_vcpu.get();
            if (vp as usize) < self.vps.len() {
                self.message_vp.store(vp, Ordering::Relaxed);
            }
        }
    }

    /// Rings the doorbell of a connection in userspace (the slow path of
    /// HvSignalEvent). False if the connection is unknown.
    pub fn signal_connection(&self, connection_id: u32) -> bool {
        let signals = self.signals.lock().expect("signals");
        match signals.get(&connection_id) {
            Some(r) => {
                r.doorbell.signal();
                true
            }
            None => false,
        }
    }

    /// A doorbell for `connection_id` that KVM rings when the guest writes
    /// that id to the signal port. Replaces a previous registration.
    fn register_signal(&self, connection_id: u32) -> Result<Arc<EventFd>, TransportError> {
        let doorbell = Arc::new(EventFd::new()?);
        let dup = doorbell.try_clone()?.into_fd();
        // SAFETY: `dup` is a fresh eventfd we own; ownership moves into kvm_fd.
        let kvm_fd = unsafe {
            vmm_sys_util::eventfd::EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dup))
        };
        let mut signals = self.signals.lock().expect("signals");
        if let Some(old) = signals.remove(&connection_id) {
            self.unregister(connection_id, &old);
        }
        self.vm
            .register_ioevent(
                &kvm_fd,
                &IoEventAddress::Pio(u64::from(HV_SIGNAL_PORT)),
                connection_id,
            )
            .map_err(|e| TransportError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        tracing::debug!(
            connection_id,
            fd = kvm_fd.as_raw_fd(),
            "ioeventfd registered"
        );
        signals.insert(
            connection_id,
            Registered {
                doorbell: doorbell.clone(),
                kvm_fd,
            },
        );
        Ok(doorbell)
    }

    fn unregister(&self, connection_id: u32, r: &Registered) {
        let addr = IoEventAddress::Pio(u64::from(HV_SIGNAL_PORT));
        if let Err(e) = self.vm.unregister_ioevent(&r.kvm_fd, &addr, connection_id) {
            tracing::warn!(connection_id, "unregistering ioeventfd failed: {e}");
        }
    }

    pub fn unregister_all_signals(&self) {
        let mut signals = self.signals.lock().expect("signals");
        for (id, r) in signals.drain() {
            self.unregister(id, &r);
        }
    }
}

/// The SynIC as a `vmbus` transport: messages into SINT2 slots of the VP
/// that initiated contact, signals as ioeventfds and SIEFP notifiers.
#[derive(Debug)]
pub struct SynicTransport {
    shared: Arc<HvShared>,
    /// Each opened channel's notifier, by relid, for MODIFYCHANNEL.
    notifiers: HashMap<u32, Arc<SynicNotify>>,
}

impl SynicTransport {
    pub fn new(shared: Arc<HvShared>) -> Self {
        SynicTransport {
            shared,
            notifiers: HashMap::new(),
        }
    }

    fn check_vp(&self, target_vp: u32, what: &str) -> Result<(), TransportError> {
        if (target_vp as usize) < self.shared.vps.len() {
            return Ok(());
        }
        Err(TransportError::Peer(format!(
            "{what} targets VP {target_vp}, the VM has {}",
            self.shared.vps.len()
        )))
    }
}

impl Transport for SynicTransport {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        if msg.len() > MAX_PAYLOAD {
            return Err(TransportError::Peer(format!("{}-byte message", msg.len())));
        }
        let vp = self.shared.message_vp.load(Ordering::Relaxed) as usize;
        let synic = &self.shared.vps[vp];
        if !synic.post(&self.shared, VMBUS_SINT, VMBUS_MESSAGE_TYPE, msg) {
            return Err(TransportError::Peer(
                "guest stopped taking VMBus messages".into(),
            ));
        }
        Ok(())
    }

    fn contact_memory(
        &mut self,
        _attachments: &mut Vec<std::os::fd::OwnedFd>,
    ) -> Result<SharedMemory, TransportError> {
        Ok(SharedMemory::from_guest_memory(self.shared.mem.clone()))
    }

    fn channel_signals(
        &mut self,
        relid: u32,
        connection_id: u32,
        target_vp: u32,
        _attachments: &mut Vec<std::os::fd::OwnedFd>,
    ) -> Result<ChannelSignals, TransportError> {
        self.check_vp(target_vp, "OPENCHANNEL")?;
        if relid >= EVENT_FLAGS {
            return Err(TransportError::Peer(format!(
                "relid {relid} has no event flag"
            )));
        }
        let doorbell = self.shared.register_signal(connection_id)?;
        let notify = Arc::new(SynicNotify {
            shared: self.shared.clone(),
            target_vp: AtomicU32::new(target_vp),
            relid,
        });
        self.notifiers.insert(relid, notify.clone());
        Ok(ChannelSignals { doorbell, notify })
    }

    fn retarget(&mut self, relid: u32, target_vp: u32) -> Result<(), TransportError> {
        self.check_vp(target_vp, "MODIFYCHANNEL")?;
        let Some(notify) = self.notifiers.get(&relid) else {
            return Err(TransportError::Peer(format!(
                "MODIFYCHANNEL for relid {relid}, never opened"
            )));
        };
        notify.target_vp.store(target_vp, Ordering::Release);
        Ok(())
    }
}

/// Interrupts the guest for one channel: event flag `relid` in SINT2 of
/// the channel's target VP, then its vector. MODIFYCHANNEL moves the target
/// while the worker keeps signalling; an interrupt already on its way to
/// the old VP is one Linux's ISR there handles too.
#[derive(Debug)]
pub struct SynicNotify {
    shared: Arc<HvShared>,
    /// Index into `shared.vps`, checked when stored.
    target_vp: AtomicU32,
    relid: u32,
}

impl Notify for SynicNotify {
    fn notify(&self) {
        let vp = self.target_vp.load(Ordering::Acquire) as usize;
        if let Some(synic) = self.shared.vps.get(vp) {
            synic.signal_event(&self.shared, VMBUS_SINT, self.relid);
        }
    }
}

/// True if the page at `gpa` lies in guest RAM.
pub fn page_in_ram(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    mem.get_slice(GuestAddress(gpa), 4096).is_ok()
}

fn host_ptr(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Option<*mut u8> {
    let slice = mem.get_slice(GuestAddress(gpa), len).ok()?;
    Some(slice.ptr_guard_mut().as_ptr())
}

/// An atomic view of a guest byte.
pub fn guest_atomic_u8(mem: &GuestMemoryMmap, gpa: u64) -> Option<&AtomicU8> {
    let p = host_ptr(mem, gpa, 1)?;
    // SAFETY: the byte lies inside guest RAM, which stays mapped as long as
    // `mem` is borrowed; AtomicU8 has no alignment requirement.
    Some(unsafe { AtomicU8::from_ptr(p) })
}

/// An atomic view of an aligned guest u32.
pub fn guest_atomic_u32(mem: &GuestMemoryMmap, gpa: u64) -> Option<&AtomicU32> {
    if !gpa.is_multiple_of(4) {
        return None;
    }
    let p = host_ptr(mem, gpa, 4)?;
    // SAFETY: 4 aligned bytes inside guest RAM (regions are page aligned),
    // mapped as long as `mem` is borrowed.
    Some(unsafe { AtomicU32::from_ptr(p.cast()) })
}

pub fn write_guest(mem: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> Option<()> {
    use vm_memory::Bytes;
    mem.write_slice(bytes, GuestAddress(gpa)).ok()
}
