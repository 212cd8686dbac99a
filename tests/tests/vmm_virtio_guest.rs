//! The virtio-mmio fallback devices inside a VM: `virtio-drivers` drives
//! them with every register access made by the test guest (a real MMIO
//! exit into the VMM) and every ring and buffer in the VM's memory.

mod common;

use std::sync::{Arc, Mutex};

use common::virtio_driver::{GuestHal, ModelTransport, Registers, set_dma_memory};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::net::VirtIONet;
use vmm::testguest::{GuestOptions, TestGuest};
use vmm::virtio::block::{ImageDisk, VirtioBlock};
use vmm::virtio::mmio::VirtioMmio;
use vmm::virtio::net::{VirtioNet, channel_pair};
use vmm::vm::VirtioSlot;

/// Register accesses made by the guest: 32-bit loads and stores to the
/// device's MMIO window.
struct GuestRegisters {
    guest: Arc<Mutex<TestGuest>>,
    base: u64,
}

impl Registers for GuestRegisters {
    fn read(&self, off: u64) -> u32 {
        self.guest.lock().unwrap().read32(self.base + off).unwrap()
    }
    fn write(&self, off: u64, v: u32) {
        self.guest
            .lock()
            .unwrap()
            .write32(self.base + off, v)
            .unwrap()
    }
}

fn irq_slot(device: Arc<VirtioMmio>, irq: vmm_sys_util::eventfd::EventFd) -> VirtioSlot {
    VirtioSlot { device, irq }
}

#[test]
fn virtio_drivers_drive_the_devices_through_guest_mmio_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &image).unwrap();
    let disk = ImageDisk::open(&path, false).unwrap();
    let mac = [0x02, 0x56, 0x53, 0x50, 0x41, 0x02];
    let (net_backend, peer) = channel_pair(mac);
    let net_device: Arc<Mutex<Option<Arc<VirtioMmio>>>> = Arc::default();
    let net_slot = net_device.clone();
    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 64,
        virtio_with: Some(Box::new(move |mem| {
            let mut slots = Vec::new();
            for (i, backend) in [
                Box::new(VirtioBlock::new(Box::new(disk), "vspa-guest-disk"))
                    as Box<dyn vmm::virtio::mmio::VirtioBackend>,
                Box::new(VirtioNet::new(Box::new(net_backend))),
            ]
            .into_iter()
            .enumerate()
            {
                let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
                let trigger = irq.try_clone().unwrap();
                let dev = Arc::new(VirtioMmio::new(
                    backend,
                    mem.clone(),
                    Arc::new(move || {
                        let _ = trigger.write(1);
                    }),
                ));
                if i == 1 {
                    *net_slot.lock().unwrap() = Some(dev.clone());
                }
                slots.push(irq_slot(dev, irq));
            }
            slots
        })),
        ..Default::default()
    })
    .unwrap();
    set_dma_memory(guest.memory().clone(), 8 << 20, 64 << 20);
    let guest = Arc::new(Mutex::new(guest));
    let regs = |base| GuestRegisters {
        guest: guest.clone(),
        base,
    };

    // Block: identify, read, write across sectors, read back, flush.
    let mut blk = VirtIOBlk::<GuestHal, _>::new(ModelTransport(regs(0xd000_0000))).unwrap();
    assert_eq!(blk.capacity(), (1 << 20) / 512);
    let mut buf = vec![0u8; 4 * 512];
    blk.read_blocks(7, &mut buf).unwrap();
    assert_eq!(buf, image[7 * 512..11 * 512]);
    let pattern: Vec<u8> = (0..24 * 512).map(|i| (i * 13 % 241) as u8).collect();
    blk.write_blocks(100, &pattern).unwrap();
    let mut back = vec![0u8; pattern.len()];
    blk.read_blocks(100, &mut back).unwrap();
    assert_eq!(back, pattern);
    blk.flush().unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk[100 * 512..124 * 512], pattern[..]);
    assert_eq!(on_disk[..100 * 512], image[..100 * 512]);

    // Net: send two frames, receive two.
    let mut net =
        VirtIONet::<GuestHal, _, 8>::new(ModelTransport(regs(0xd000_1000)), 2048).unwrap();
    assert_eq!(net.mac_address(), mac);
    for len in [64usize, 1400] {
        let frame: Vec<u8> = (0..len).map(|i| (i + len) as u8).collect();
        let mut tx = net.new_tx_buffer(len);
        tx.packet_mut().copy_from_slice(&frame);
        net.send(tx).unwrap();
        assert_eq!(peer.from_device.try_recv().unwrap(), frame);
    }
    let device = net_device.lock().unwrap().clone().unwrap();
    let frames: Vec<Vec<u8>> = (0..2usize)
        .map(|n| vec![0xa0 + n as u8; 100 + n * 400])
        .collect();
    for f in &frames {
        peer.to_device.send(f.clone()).unwrap();
    }
    device.poll();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while got.len() < frames.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "received {}",
            got.len()
        );
        match net.receive() {
            Ok(rx) => {
                got.push(rx.packet().to_vec());
                net.recycle_rx_buffer(rx).unwrap();
            }
            Err(_) => device.poll(),
        }
    }
    assert_eq!(got, frames);
    drop(blk);
    drop(net);
}
