//! The `virtio-drivers` crate as the driver of vspa's virtio-mmio device
//! models: its `Transport` over register accesses (made directly on the
//! model, or by the test guest through real MMIO exits) and its `Hal` over
//! guest memory, so descriptors, rings and buffers all live in guest RAM.
#![allow(unsafe_code, dead_code)]

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::devices::MmioDevice;
use vmm::virtio::mmio::{VirtioMmio, reg};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Guest memory the Hal allocates from: one region per test binary (the
/// Hal trait is static).
struct Dma {
    mem: Arc<GuestMemoryMmap>,
    next: Mutex<u64>,
    end: u64,
}

static DMA: OnceLock<Dma> = OnceLock::new();

/// Makes `[start, end)` of `mem` the Hal's memory (first call wins).
pub fn set_dma_memory(mem: Arc<GuestMemoryMmap>, start: u64, end: u64) {
    let _ = DMA.set(Dma {
        mem,
        next: Mutex::new(start),
        end,
    });
}

pub fn dma_memory() -> Arc<GuestMemoryMmap> {
    DMA.get().expect("set_dma_memory first").mem.clone()
}

fn alloc(bytes: usize) -> (u64, NonNull<u8>) {
    let d = DMA.get().expect("set_dma_memory first");
    let pages = bytes.div_ceil(4096).max(1) as u64;
    let mut next = d.next.lock().unwrap();
    let gpa = *next;
    *next += pages * 4096;
    assert!(*next <= d.end, "test DMA memory exhausted");
    let host = d.mem.get_host_address(GuestAddress(gpa)).unwrap();
    // SAFETY: the pages were just carved out of guest RAM for this caller.
    unsafe { std::ptr::write_bytes(host, 0, (pages * 4096) as usize) };
    (gpa, NonNull::new(host).unwrap())
}

pub struct GuestHal;

// SAFETY: dma_alloc hands out distinct, zeroed, page-aligned guest pages
// that stay mapped for the process; share/unshare bounce through them.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        alloc(pages * 4096)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0 // bump allocator: test memory is released with the process
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the model transport has no BARs")
    }

    unsafe fn share(buffer: NonNull<[u8]>, dir: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        let (gpa, host) = alloc(len);
        if dir != BufferDirection::DeviceToDriver {
            // SAFETY: the caller's buffer is valid for len bytes; the bounce
            // pages are ours.
            unsafe {
                std::ptr::copy_nonoverlapping(buffer.as_ptr().cast::<u8>(), host.as_ptr(), len)
            };
        }
        gpa
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, dir: BufferDirection) {
        if dir != BufferDirection::DriverToDevice {
            let host = dma_memory().get_host_address(GuestAddress(paddr)).unwrap();
            // SAFETY: as in share, in the other direction.
            unsafe {
                std::ptr::copy_nonoverlapping(host, buffer.as_ptr().cast::<u8>(), buffer.len())
            };
        }
    }
}

/// 32-bit register access to a virtio-mmio window.
pub trait Registers {
    fn read(&self, off: u64) -> u32;
    fn write(&self, off: u64, v: u32);
}

/// Accesses straight into the device model (what an MMIO exit handler does).
pub struct Direct(pub Arc<VirtioMmio>);

impl Registers for Direct {
    fn read(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.0.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn write(&self, off: u64, v: u32) {
        self.0.mmio_write(off, &v.to_le_bytes());
    }
}

/// virtio-drivers' Transport over a register window.
pub struct ModelTransport<R: Registers>(pub R);

impl<R: Registers> ModelTransport<R> {
    fn r(&self, off: u64) -> u32 {
        self.0.read(off)
    }
    fn w(&self, off: u64, v: u32) {
        self.0.write(off, v)
    }
}

impl<R: Registers> Transport for ModelTransport<R> {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(self.r(reg::DEVICE_ID)).unwrap()
    }
    fn read_device_features(&mut self) -> u64 {
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(reg::DEVICE_FEATURES);
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        u64::from(lo) | u64::from(self.r(reg::DEVICE_FEATURES)) << 32
    }
    fn write_driver_features(&mut self, f: u64) {
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, f as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (f >> 32) as u32);
    }
    fn max_queue_size(&mut self, q: u16) -> u32 {
        self.w(reg::QUEUE_SEL, q.into());
        self.r(reg::QUEUE_NUM_MAX)
    }
    fn notify(&mut self, q: u16) {
        self.w(reg::QUEUE_NOTIFY, q.into());
    }
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.r(reg::STATUS))
    }
    fn set_status(&mut self, s: DeviceStatus) {
        self.w(reg::STATUS, s.bits());
    }
    fn set_guest_page_size(&mut self, _: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(&mut self, q: u16, size: u32, desc: PhysAddr, driver: PhysAddr, device: PhysAddr) {
        self.w(reg::QUEUE_SEL, q.into());
        self.w(reg::QUEUE_NUM, size);
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, driver),
            (reg::QUEUE_DEVICE_LOW, device),
        ] {
            self.w(lo, addr as u32);
            self.w(lo + 4, (addr >> 32) as u32);
        }
        self.w(reg::QUEUE_READY, 1);
    }
    fn queue_unset(&mut self, q: u16) {
        self.w(reg::QUEUE_SEL, q.into());
        self.w(reg::QUEUE_READY, 0);
    }
    fn queue_used(&mut self, q: u16) -> bool {
        self.w(reg::QUEUE_SEL, q.into());
        self.r(reg::QUEUE_READY) != 0
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        let s = self.r(reg::INTERRUPT_STATUS);
        self.w(reg::INTERRUPT_ACK, s);
        InterruptStatus::from_bits_truncate(s)
    }
    fn read_config_generation(&self) -> u32 {
        self.r(reg::CONFIG_GENERATION)
    }
    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        // Whole dwords around the field, as a guest's 32-bit loads would.
        let start = offset & !3;
        let end = (offset + size_of::<T>()).next_multiple_of(4);
        let bytes: Vec<u8> = (start..end)
            .step_by(4)
            .flat_map(|o| self.r(reg::CONFIG + o as u64).to_le_bytes())
            .collect();
        let mut v = T::new_zeroed();
        v.as_mut_bytes()
            .copy_from_slice(&bytes[offset - start..offset - start + size_of::<T>()]);
        Ok(v)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _: usize,
        _: T,
    ) -> virtio_drivers::Result<()> {
        Err(virtio_drivers::Error::Unsupported)
    }
}

/// An interrupt callback that counts.
pub fn counting_interrupt() -> (
    Arc<std::sync::atomic::AtomicU32>,
    vmm::virtio::mmio::InterruptFn,
) {
    let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = n.clone();
    (
        n,
        Arc::new(move || {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }),
    )
}
