//! The virtio-mmio fallback devices driven by the `virtio-drivers` crate:
//! its `Transport` is implemented over the device model's MMIO registers
//! (exactly what a guest's MMIO exits reach) and its `Hal` over guest
//! memory, so every descriptor, ring and buffer lives in guest RAM. The
//! net device is also tested as a port of a vspa switch, its receive path
//! run by its poll thread.

mod common;

use std::sync::Arc;

use common::virtio_driver::{Direct, GuestHal, ModelTransport, counting_interrupt, dma_memory};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::net::VirtIONet;
use vmm::devices::MmioDevice;
use vmm::virtio::block::{ImageDisk, VirtioBlock};
use vmm::virtio::mmio::VirtioMmio;
use vmm::virtio::net::{NetPoller, SwitchPort, VirtioNet, channel_pair};

fn dma() -> Arc<vm_memory::GuestMemoryMmap> {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        common::virtio_driver::set_dma_memory(
            vmm::memory::create_guest_ram(256 << 20).unwrap(),
            0x10_0000,
            256 << 20,
        )
    });
    dma_memory()
}

#[test]
fn virtio_blk_read_write_flush_through_virtio_drivers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut image: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&path, &image).unwrap();
    let disk = ImageDisk::open(&path, false).unwrap();
    let (irqs, irq) = counting_interrupt();
    let dev = Arc::new(VirtioMmio::new(
        Box::new(VirtioBlock::new(Box::new(disk), "vspa-disk0")),
        dma(),
        irq,
    ));
    let mut blk = VirtIOBlk::<GuestHal, _>::new(ModelTransport(Direct(dev.clone()))).unwrap();
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
    drop(dev); // closes the image: a reader cannot open beside its writer

    // A read-only disk refuses writes but serves reads.
    let ro = ImageDisk::open(&path, true).unwrap();
    let (_, irq) = counting_interrupt();
    let dev = Arc::new(VirtioMmio::new(
        Box::new(VirtioBlock::new(Box::new(ro), "ro")),
        dma(),
        irq,
    ));
    let mut blk = VirtIOBlk::<GuestHal, _>::new(ModelTransport(Direct(dev))).unwrap();
    assert!(blk.readonly());
    assert!(blk.write_blocks(0, &[0u8; 512]).is_err());
    let mut one = [0u8; 512];
    blk.read_blocks(60, &mut one).unwrap();
    assert_eq!(one[..], pattern[..512]);
}

/// A 4 KiB-sector VHDX through virtio-blk: the device offers BLK_SIZE
/// and TOPOLOGY with blk_size 4096; whole 4 KiB blocks move, a request that
/// is not whole blocks fails.
#[test]
fn virtio_blk_serves_a_4k_sector_vhdx() {
    use vmm::virtio::mmio::VirtioBackend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.vhdx");
    let options = vhd::vhdx::VhdxOptions {
        block_size: 1 << 20,
        logical_sector: 4096,
        ..Default::default()
    };
    vhd::vhdx::create_vhdx(&path, vhd::vhdx::VhdxKind::Dynamic, 8 << 20, &options).unwrap();
    let model = VirtioBlock::new(Box::new(ImageDisk::open(&path, false).unwrap()), "4k");
    let features = model.features();
    assert_ne!(features & vmm::virtio::block::F_BLK_SIZE, 0);
    let mut word = [0u8; 4];
    model.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 4096, "blk_size");
    let (_, irq) = counting_interrupt();
    let dev = Arc::new(VirtioMmio::new(Box::new(model), dma(), irq));
    let mut blk = VirtIOBlk::<GuestHal, _>::new(ModelTransport(Direct(dev))).unwrap();
    assert_eq!(blk.capacity(), (8 << 20) / 512);
    let pattern: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 % 253) as u8).collect();
    blk.write_blocks(8 * 10, &pattern).unwrap();
    let mut back = vec![0u8; pattern.len()];
    blk.read_blocks(8 * 10, &mut back).unwrap();
    assert_eq!(back, pattern);
    assert!(
        blk.write_blocks(3, &[1u8; 512]).is_err(),
        "not whole blocks"
    );
    assert!(
        blk.read_blocks(8, &mut [0u8; 1024]).is_err(),
        "not whole blocks"
    );
    drop(blk);
    let disk = vhd::open_by_name(&path, &vhd::DiskOptions::default().read_only(true)).unwrap();
    let mut io = vhd::BlockingIo::new().unwrap();
    let mut on_disk = vec![0u8; pattern.len()];
    io.read(&*disk, 10, &mut on_disk).unwrap();
    assert_eq!(on_disk, pattern);
}

#[test]
fn virtio_net_send_and_receive_through_virtio_drivers() {
    let mac = [0x02, 0x56, 0x53, 0x50, 0x41, 0x01];
    let (backend, peer) = channel_pair(mac);
    let (irqs, irq) = counting_interrupt();
    let dev = Arc::new(VirtioMmio::new(
        Box::new(VirtioNet::new(Box::new(backend))),
        dma(),
        irq,
    ));
    let mut net =
        VirtIONet::<GuestHal, _, 16>::new(ModelTransport(Direct(dev.clone())), 2048).unwrap();
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
    let g = TestGuest::boot(GuestOptions {
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

#[test]
fn virtio_blk_serves_a_dynamic_vhd_checked_by_qemu_img() {
    vspa_tests::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let vhd_path = dir.path().join("disk.vhd");
    vhd::create::create_dynamic(&vhd_path, 8 << 20, 2 << 20).unwrap();
    let disk = ImageDisk::open(&vhd_path, false).unwrap();
    let (_, irq) = counting_interrupt();
    let dev = Arc::new(VirtioMmio::new(
        Box::new(VirtioBlock::new(Box::new(disk), "vspa-vhd")),
        dma(),
        irq,
    ));
    let mut blk = VirtIOBlk::<GuestHal, _>::new(ModelTransport(Direct(dev.clone()))).unwrap();
    assert_eq!(blk.capacity(), (8 << 20) / 512);
    // Unallocated blocks read zeros; a write spanning two 2 MiB VHD blocks
    // allocates both.
    let mut buf = vec![0xffu8; 4096];
    blk.read_blocks(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let pattern: Vec<u8> = (0..128 * 512).map(|i| (i * 7 % 253) as u8).collect();
    let lba = (2 << 20) / 512 - 64;
    blk.write_blocks(lba, &pattern).unwrap();
    blk.flush().unwrap();
    let mut back = vec![0u8; pattern.len()];
    blk.read_blocks(lba, &mut back).unwrap();
    assert_eq!(back, pattern);
    drop(blk);
    drop(dev);
    // qemu-img sees the same bytes in the VHD.
    let mut expected = vec![0u8; 8 << 20];
    expected[lba * 512..lba * 512 + pattern.len()].copy_from_slice(&pattern);
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(&vhd_path)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Receives frames until `want` returns true for one (others are kept in
/// `other`), recycling buffers; the poll thread fills them.
fn receive_until<T: virtio_drivers::transport::Transport, const N: usize>(
    net: &mut VirtIONet<GuestHal, T, N>,
    what: &str,
    mut want: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        assert!(std::time::Instant::now() < deadline, "no {what}");
        match net.receive() {
            Ok(rx) => {
                let f = rx.packet().to_vec();
                net.recycle_rx_buffer(rx).unwrap();
                if want(&f) {
                    return f;
                }
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
        }
    }
}

#[test]
fn virtio_net_on_a_switch_port_talks_to_the_internal_port_and_a_peer_port() {
    use switch::netvsp::client::packets::{arp, eth, icmp_echo, ipv4};
    use switch::offload::{fold, ones_sum};
    use switch::wire::MacAddr;
    use switch::{Frame, OffloadCaps, PortSpec};
    let config = vspa::ValidConfig::from_toml(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "mgmt"
internal = { mac = "02:00:00:00:07:fe", ip = "10.207.0.254/24", counters_port = 9100 }
"#,
        std::path::Path::new("."),
    )
    .unwrap();
    let appliance = vspa::Appliance::start(&config, &vspa::Options::default()).unwrap();
    let sw = appliance.switch("sw").unwrap().clone();
    let mac = MacAddr([0x02, 0, 0, 0, 0x07, 0x02]);
    let mut model = VirtioNet::new(Box::new(SwitchPort::attach(&sw, "vnet", mac.0).unwrap()));
    let wakers = model.poller_wakers().unwrap();
    let (irqs, irq) = counting_interrupt();
    let dev = Arc::new(VirtioMmio::new(Box::new(model), dma(), irq));
    let poller = NetPoller::spawn("test-virtio-net", dev.clone(), wakers).unwrap();
    let mut net =
        VirtIONet::<GuestHal, _, 16>::new(ModelTransport(Direct(dev.clone())), 2048).unwrap();
    assert_eq!(net.mac_address(), mac.0);
    let send = |net: &mut VirtIONet<GuestHal, _, 16>, f: &[u8]| {
        let mut tx = net.new_tx_buffer(f.len());
        tx.packet_mut().copy_from_slice(f);
        net.send(tx).unwrap();
    };

    // The appliance's own interface (smoltcp) answers ARP and pings.
    let (me, mgmt_ip) = ([10, 207, 0, 2], [10, 207, 0, 254]);
    send(&mut net, &arp(1, mac, me, MacAddr::default(), mgmt_ip));
    let reply = receive_until(&mut net, "ARP reply", |f| {
        f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == mgmt_ip
    });
    let mgmt = MacAddr(reply[22..28].try_into().unwrap());
    assert_eq!(mgmt.to_string(), "02:00:00:00:07:fe");
    assert_eq!(reply[..6], mac.0, "the reply is addressed to the NIC");
    for seq in 0..3u16 {
        let payload: Vec<u8> = (0..200).map(|i| (i as u8) ^ (seq as u8)).collect();
        let req = icmp_echo(0x55, seq, &payload);
        send(
            &mut net,
            &eth(mgmt, mac, 0x0800, &ipv4(me, mgmt_ip, 1, &req)),
        );
        let r = receive_until(&mut net, "echo reply", |f| {
            f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0
        });
        assert_eq!(r[40..42], seq.to_be_bytes());
        assert_eq!(fold(ones_sum(&r[34..], 0)), 0xffff, "ICMP checksum");
        assert_eq!(r[42..], payload[..], "echo {seq} payload");
    }

    // A peer port: frames both ways, checked byte for byte and in order.
    // The peer sends 300 frames at once: more than the driver's 16
    // receive buffers, so the poll thread waits for recycled buffers.
    let mut peer = sw
        .add_port(PortSpec::new("peer", OffloadCaps::ALL))
        .unwrap();
    let peer_mac = MacAddr([0x02, 0, 0, 0, 0x07, 0x03]);
    let frame = |dst: MacAddr, src: MacAddr, i: usize| {
        let body: Vec<u8> = (0..46 + i * 7 % 1400).map(|b| (b * 13 + i) as u8).collect();
        eth(dst, src, 0x88b5, &body)
    };
    peer.ingress(&mut vec![Frame::new(
        frame(MacAddr::BROADCAST, peer_mac, 0).into(),
    )]);
    receive_until(&mut net, "the peer's broadcast", |f| f[6..12] == peer_mac.0);
    let to_peer: Vec<Vec<u8>> = (0..50).map(|i| frame(peer_mac, mac, i)).collect();
    for f in &to_peer {
        send(&mut net, f);
    }
    let mut got = Vec::new();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while got.len() < to_peer.len() && std::time::Instant::now() < deadline {
        out.clear();
        peer.drain(&mut out, 64);
        got.extend(
            out.iter()
                .map(|d| d.contiguous().to_vec())
                .filter(|f| f[12..14] == [0x88, 0xb5]),
        );
    }
    assert!(got == to_peer, "the peer got {} of 50 frames", got.len());
    let irqs_before = irqs.load(std::sync::atomic::Ordering::SeqCst);
    let to_nic: Vec<Vec<u8>> = (0..300).map(|i| frame(mac, peer_mac, i)).collect();
    let mut batch: Vec<Frame> = to_nic
        .iter()
        .map(|f| Frame::new(f.clone().into()))
        .collect();
    peer.ingress(&mut batch);
    for (i, f) in to_nic.iter().enumerate() {
        let r = receive_until(&mut net, "a frame from the peer", |r| {
            r[12..14] == [0x88, 0xb5]
        });
        assert!(r == *f, "frame {i} from the peer");
    }
    assert!(irqs.load(std::sync::atomic::Ordering::SeqCst) > irqs_before);
    let stats = sw.port_stats("vnet").unwrap();
    assert_eq!(stats.drop_queue_full + stats.tx_errors, 0, "{stats:?}");
    assert!(stats.tx_frames >= 305 && stats.rx_frames >= 54, "{stats:?}");
    drop(net);
    drop(poller);
    drop(dev);
    assert!(
        sw.port_stats("vnet").is_none(),
        "the port left with the device"
    );
}
