//! The virtio-mmio fallback devices driven by the `virtio-drivers` crate:
//! its `Transport` is implemented over the device model's MMIO registers
//! (exactly what a guest's MMIO exits reach) and its `Hal` over guest
//! memory, so every descriptor, ring and buffer lives in guest RAM.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::devices::MmioDevice;
use vmm::virtio::block::{FileDisk, VirtioBlock};
use vmm::virtio::mmio::{VirtioMmio, reg};
use vmm::virtio::net::{VirtioNet, channel_pair};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Guest memory shared by all tests in this binary, with a bump allocator
/// (the Hal trait is static).
struct Dma {
    mem: Arc<GuestMemoryMmap>,
    next: Mutex<u64>,
}

fn dma() -> &'static Dma {
    static DMA: OnceLock<Dma> = OnceLock::new();
    DMA.get_or_init(|| Dma {
        mem: vmm::memory::create_guest_ram(256 << 20).unwrap(),
        next: Mutex::new(0x10_0000),
    })
}

fn alloc(bytes: usize) -> (u64, NonNull<u8>) {
    let d = dma();
    let pages = bytes.div_ceil(4096).max(1) as u64;
    let mut next = d.next.lock().unwrap();
    let gpa = *next;
    *next += pages * 4096;
    assert!(*next < 256 << 20, "test DMA memory exhausted");
    let host = d.mem.get_host_address(GuestAddress(gpa)).unwrap();
    // SAFETY: the pages were just carved out of guest RAM for this caller.
    unsafe { std::ptr::write_bytes(host, 0, (pages * 4096) as usize) };
    (gpa, NonNull::new(host).unwrap())
}

struct GuestHal;

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
            let host = dma().mem.get_host_address(GuestAddress(paddr)).unwrap();
            // SAFETY: as in share, in the other direction.
            unsafe {
                std::ptr::copy_nonoverlapping(host, buffer.as_ptr().cast::<u8>(), buffer.len())
            };
        }
    }
}

/// virtio-drivers' Transport over the device model's registers.
struct ModelTransport(Arc<VirtioMmio>);

impl ModelTransport {
    fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.0.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&self, off: u64, v: u32) {
        self.0.mmio_write(off, &v.to_le_bytes());
    }
}

impl Transport for ModelTransport {
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
        let mut v = T::new_zeroed();
        self.0
            .mmio_read(reg::CONFIG + offset as u64, v.as_mut_bytes());
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

fn interrupts() -> (
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

#[test]
fn virtio_blk_read_write_flush_through_virtio_drivers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut image: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&path, &image).unwrap();
    let disk = FileDisk::open(&path, false).unwrap();
    let (irqs, irq) = interrupts();
    let dev = Arc::new(VirtioMmio::new(
        Box::new(VirtioBlock::new(Box::new(disk), "vspa-disk0")),
        dma().mem.clone(),
        irq,
    ));
    let mut blk = VirtIOBlk::<GuestHal, _>::new(ModelTransport(dev.clone())).unwrap();
    assert_eq!(blk.capacity(), (4 << 20) / 512);
    assert!(!blk.readonly());
    let mut id = [0u8; 20];
    let n = blk.device_id(&mut id).unwrap();
    assert_eq!(&id[..n], b"vspa-disk0");
    // Read what the image holds.
    let mut buf = vec![0u8; 8 * 512];
    blk.read_blocks(100, &mut buf).unwrap();
    assert_eq!(buf, image[100 * 512..108 * 512]);
    // Write a pattern across a 64 KiB chunk boundary, read it back.
    let pattern: Vec<u8> = (0..160 * 512).map(|i| (i * 31 % 251) as u8).collect();
    blk.write_blocks(60, &pattern).unwrap();
    let mut back = vec![0u8; pattern.len()];
    blk.read_blocks(60, &mut back).unwrap();
    assert_eq!(back, pattern);
    blk.flush().unwrap();
    image[60 * 512..220 * 512].copy_from_slice(&pattern);
    assert!(
        std::fs::read(&path).unwrap() == image,
        "the file holds exactly the writes"
    );
    // Past the end: an I/O error for the driver, nothing written.
    let mut tail = vec![0u8; 1024];
    assert!(blk.read_blocks(8191, &mut tail).is_err());
    assert!(blk.write_blocks(8191, &tail).is_err());
    assert!(
        irqs.load(std::sync::atomic::Ordering::SeqCst) >= 6,
        "used-buffer interrupts"
    );
    drop(blk);

    // A read-only disk refuses writes but serves reads.
    let ro = FileDisk::open(&path, true).unwrap();
    let (_, irq) = interrupts();
    let dev = Arc::new(VirtioMmio::new(
        Box::new(VirtioBlock::new(Box::new(ro), "ro")),
        dma().mem.clone(),
        irq,
    ));
    let mut blk = VirtIOBlk::<GuestHal, _>::new(ModelTransport(dev)).unwrap();
    assert!(blk.readonly());
    assert!(blk.write_blocks(0, &[0u8; 512]).is_err());
    let mut one = [0u8; 512];
    blk.read_blocks(60, &mut one).unwrap();
    assert_eq!(one[..], pattern[..512]);
}

#[test]
fn virtio_net_send_and_receive_through_virtio_drivers() {
    let mac = [0x02, 0x56, 0x53, 0x50, 0x41, 0x01];
    let (backend, peer) = channel_pair(mac);
    let (irqs, irq) = interrupts();
    let dev = Arc::new(VirtioMmio::new(
        Box::new(VirtioNet::new(Box::new(backend))),
        dma().mem.clone(),
        irq,
    ));
    let mut net = VirtIONet::<GuestHal, _, 16>::new(ModelTransport(dev.clone()), 2048).unwrap();
    assert_eq!(net.mac_address(), mac);
    // Send: the frame reaches the backend without the virtio-net header.
    for len in [60usize, 590, 1514] {
        let frame: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        let mut tx = net.new_tx_buffer(frame.len());
        tx.packet_mut().copy_from_slice(&frame);
        net.send(tx).unwrap();
        assert_eq!(peer.from_device.try_recv().unwrap(), frame);
    }
    // Receive: frames from the network fill the driver's buffers.
    let before = irqs.load(std::sync::atomic::Ordering::SeqCst);
    let frames: Vec<Vec<u8>> = (0..20usize)
        .map(|n| (0..64 + n * 50).map(|i| (i ^ n) as u8).collect())
        .collect();
    for f in &frames {
        peer.to_device.send(f.clone()).unwrap();
    }
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while got.len() < frames.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "received {} of {}",
            got.len(),
            frames.len()
        );
        dev.poll();
        while let Ok(rx) = net.receive() {
            got.push(rx.packet().to_vec());
            net.recycle_rx_buffer(rx).unwrap();
        }
    }
    assert_eq!(got, frames);
    assert!(irqs.load(std::sync::atomic::Ordering::SeqCst) > before);
}

#[test]
fn guest_mmio_exits_reach_the_virtio_device() {
    use vmm::testguest::{GuestOptions, TestGuest};
    let irq_fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let slot = vmm::vm::VirtioSlot {
        device: Arc::new(Probe),
        irq: irq_fd,
    };
    let mut g = TestGuest::boot(GuestOptions {
        memory_mib: 16,
        virtio: vec![slot],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(g.read32(0xd000_0000).unwrap(), 0x7472_6976);
    assert_eq!(g.read32(0xd000_0008).unwrap(), 0x1234);
    g.write32(0xd000_0070, 0xabcd).unwrap();
    assert_eq!(g.read32(0xd000_0070).unwrap(), 0xabcd);
    // Nothing mapped at the next window: reads are all ones.
    assert_eq!(g.read32(0xd000_1000).unwrap(), u32::MAX);
}

/// A register file that records writes, to check MMIO dispatch.
#[derive(Debug, Default)]
struct Probe;

static PROBE_REG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl MmioDevice for Probe {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let v: u32 = match offset {
            0 => 0x7472_6976,
            8 => 0x1234,
            0x70 => PROBE_REG.load(std::sync::atomic::Ordering::SeqCst),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset == 0x70 {
            PROBE_REG.store(
                u32::from_le_bytes(data.try_into().unwrap()),
                std::sync::atomic::Ordering::SeqCst,
            );
        }
    }
}
