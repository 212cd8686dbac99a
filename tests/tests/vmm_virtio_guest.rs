//! The virtio-mmio fallback devices inside a VM: `virtio-drivers` drives
//! them with every register access made by the test guest (a real MMIO
//! exit into the VMM) and every ring and buffer in the VM's memory. One
//! NIC is a port of a vspa switch, its receive path run by its poll thread
//! and its interrupts delivered through the VM's irqfd.

mod common;

use std::sync::{Arc, Mutex};

use common::virtio_driver::{GuestHal, ModelTransport, Registers, set_dma_memory};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::net::VirtIONet;
use vmm::testguest::{GuestOptions, TestGuest};
use vmm::virtio::block::{ImageDisk, VirtioBlock};
use vmm::virtio::mmio::VirtioMmio;
use vmm::virtio::net::{NetPoller, SwitchPort, VirtioNet, channel_pair};
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
    // The third device: a NIC on a switch, next to a peer port.
    let sw = switch::Switch::new("sw", 64, 300);
    let mut sw_peer = sw
        .add_port(switch::PortSpec::new("peer", switch::OffloadCaps::ALL))
        .unwrap();
    let sw_mac = [0x02, 0x56, 0x53, 0x50, 0x41, 0x03];
    let mut sw_nic = VirtioNet::new(Box::new(SwitchPort::attach(&sw, "vm", sw_mac).unwrap()));
    let wakers = sw_nic.poller_wakers().unwrap();
    let sw_device: Arc<Mutex<Option<Arc<VirtioMmio>>>> = Arc::default();
    let sw_slot = sw_device.clone();
    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 64,
        virtio_with: Some(Box::new(move |mem| {
            let mut slots = Vec::new();
            for (i, backend) in [
                Box::new(VirtioBlock::new(Box::new(disk), "vspa-guest-disk"))
                    as Box<dyn vmm::virtio::mmio::VirtioBackend>,
                Box::new(VirtioNet::new(Box::new(net_backend))),
                Box::new(sw_nic),
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
                match i {
                    1 => *net_slot.lock().unwrap() = Some(dev.clone()),
                    2 => *sw_slot.lock().unwrap() = Some(dev.clone()),
                    _ => {}
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

    // The NIC on the switch: frames to the peer port, and 40 frames from
    // it (more than the driver's 8 receive buffers) that the poll thread
    // moves into the guest's buffers as the driver recycles them.
    let sw_device = sw_device.lock().unwrap().clone().unwrap();
    let poller = NetPoller::spawn("virtio-net-sw", sw_device, wakers).unwrap();
    let mut nic =
        VirtIONet::<GuestHal, _, 8>::new(ModelTransport(regs(0xd000_2000)), 2048).unwrap();
    assert_eq!(nic.mac_address(), sw_mac);
    let peer_mac = [0x02, 0x56, 0x53, 0x50, 0x41, 0x04];
    let frame = |dst: [u8; 6], src: [u8; 6], n: usize| {
        let mut f = [dst, src].concat();
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend((0..60 + n * 31).map(|i| (i * 7 + n) as u8));
        f
    };
    let to_peer: Vec<Vec<u8>> = (0..3).map(|n| frame(peer_mac, sw_mac, n)).collect();
    for f in &to_peer {
        let mut tx = nic.new_tx_buffer(f.len());
        tx.packet_mut().copy_from_slice(f);
        nic.send(tx).unwrap();
    }
    let mut out = Vec::new();
    sw_peer.drain(&mut out, 16);
    let seen: Vec<Vec<u8>> = out.iter().map(|d| d.contiguous().to_vec()).collect();
    assert!(seen == to_peer, "the peer port got the guest's frames");
    let to_nic: Vec<Vec<u8>> = (0..40).map(|n| frame(sw_mac, peer_mac, n)).collect();
    let mut batch: Vec<switch::Frame> = to_nic
        .iter()
        .map(|f| switch::Frame::new(f.clone().into()))
        .collect();
    sw_peer.ingress(&mut batch);
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while got.len() < to_nic.len() {
        assert!(std::time::Instant::now() < deadline, "got {}", got.len());
        match nic.receive() {
            Ok(rx) => {
                got.push(rx.packet().to_vec());
                nic.recycle_rx_buffer(rx).unwrap();
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
        }
    }
    assert!(got == to_nic, "the guest got the peer's frames in order");
    let stats = sw.port_stats("vm").unwrap();
    assert_eq!((stats.rx_frames, stats.tx_frames), (3, 40));
    assert_eq!(stats.drop_queue_full + stats.tx_errors, 0);
    drop(poller);
    drop(blk);
    drop(net);
    drop(nic);
}
