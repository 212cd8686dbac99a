//! Storage over the VMM: the test guest finds the SCSI controller's offer,
//! opens its channel with the rings in guest memory, runs the storvsc
//! initialization and writes, reads back and flushes a pattern on a dynamic
//! VHD, every packet signalled through HvSignalEvent and every completion
//! through the SynIC. `qemu-img compare` checks the image afterwards
//! against the expected raw image.

use std::process::Command;

use storage::client::{Buffer, Srb, StorvscClient, cdb};
use storage::protocol::{direction, srb};
use vmbus::guid::SCSI_INTERFACE;
use vmbus::vsc::VscBus;
use vmm::testguest::{GuestOptions, GuestVsc, TestGuest};
use vspa_tests::require_tool;

const DISK_BYTES: u64 = 16 << 20;

#[test]
fn guest_writes_and_reads_a_dynamic_vhd_through_the_synic() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let vhd = dir.path().join("disk.vhd");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&vhd)
        .arg(DISK_BYTES.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = format!(
        "[[controller]]\nname = \"scsi0\"\n[[controller.lun]]\nlun = 0\npath = {:?}\n",
        vhd.to_str().unwrap()
    );
    let config = vspa::ValidConfig::from_toml(&text, dir.path()).unwrap();
    let appliance = vspa::Appliance::start(&config, &vspa::Options::default()).unwrap();
    let registry = appliance
        .registry(vspa::tenant::DEFAULT_TENANT)
        .unwrap()
        .clone();
    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 64,
        registry: registry.clone(),
        ..Default::default()
    })
    .unwrap();
    let size = {
        let mut vsc = GuestVsc::connect(&guest).unwrap();
        let offers = vsc.request_offers().unwrap();
        let offer = offers
            .iter()
            .find(|o| o.interface == SCSI_INTERFACE)
            .expect("SCSI offer");
        // storvsc's initialization, as Linux sends it, over rings in guest
        // memory: the same client the hosted tests use.
        let mut c = StorvscClient::connect(&mut vsc, offer, 0, 8).unwrap();
        assert!(c.properties.max_transfer_bytes.get() >= 64 * 1024);

        // READ CAPACITY(16): last LBA and block size.
        let page = VscBus::alloc_pages(&mut vsc, 1).unwrap();
        let cap_buf = Buffer {
            pages: page,
            offset: 0,
            len: 32,
        };
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::read_capacity_16(), direction::READ, 32),
                Some(&cap_buf),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
        let mut cap = [0u8; 12];
        vsc.memory()
            .slice(page.gpa(), cap.len())
            .unwrap()
            .read_at(0, &mut cap)
            .unwrap();
        let blocks = u64::from_be_bytes(cap[..8].try_into().unwrap()) + 1;
        assert_eq!(u32::from_be_bytes(cap[8..12].try_into().unwrap()), 512);

        // WRITE(16) a pattern into two places (one spans a 2 MiB VHD block
        // boundary), READ(16) it back, SYNCHRONIZE CACHE.
        let len = 16 * 4096u32;
        let data = Buffer {
            pages: VscBus::alloc_pages(&mut vsc, 16).unwrap(),
            offset: 0,
            len,
        };
        let back = Buffer {
            pages: VscBus::alloc_pages(&mut vsc, 16).unwrap(),
            offset: 0,
            len,
        };
        for lba in [100u64, (2 << 20) / 512 - 64] {
            let pattern: Vec<u8> = (0..len)
                .map(|i| ((i as u64 * 7 + lba) % 251) as u8)
                .collect();
            vsc.guest.write(data.pages.gpa(), &pattern).unwrap();
            let w = cdb::write_16(lba, len / 512);
            let r = c
                .execute(0, &Srb::new(0, &w, direction::WRITE, len), Some(&data))
                .unwrap();
            assert_eq!(r.srb().srb_status, srb::SUCCESS, "write at {lba}");
            let rd = cdb::read_16(lba, len / 512);
            let r = c
                .execute(0, &Srb::new(0, &rd, direction::READ, len), Some(&back))
                .unwrap();
            assert_eq!(r.srb().srb_status, srb::SUCCESS, "read at {lba}");
            let mut got = vec![0u8; len as usize];
            vsc.memory()
                .slice(back.pages.gpa(), got.len())
                .unwrap()
                .read_at(0, &mut got)
                .unwrap();
            assert!(got == pattern, "read back at LBA {lba}");
        }
        let sync = cdb::synchronize_cache();
        let r = c
            .execute(0, &Srb::new(0, &sync, direction::NONE, 0), None)
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
        blocks * 512
    };
    // qemu-img rounds VHD sizes up to a CHS geometry.
    assert!(
        (DISK_BYTES..DISK_BYTES + (1 << 20)).contains(&size),
        "{size}"
    );
    guest.stop();
    drop(registry);

    // The expected image, built independently, and qemu-img's verdict.
    let raw = dir.path().join("expected.raw");
    let mut expected = vec![0u8; size as usize];
    for lba in [100u64, (2 << 20) / 512 - 64] {
        let off = (lba * 512) as usize;
        for i in 0..16 * 4096usize {
            expected[off + i] = ((i as u64 * 7 + lba) % 251) as u8;
        }
    }
    std::fs::write(&raw, &expected).unwrap();
    // The guest's data really is in the VHD: an all-zero image differs.
    let zeros = dir.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; size as usize]).unwrap();
    let differs = Command::new("qemu-img")
        // -U: the appliance still holds the image (flushed) for writing.
        .args(["compare", "-U", "-q", "-f", "vpc", "-F", "raw"])
        .arg(&vhd)
        .arg(&zeros)
        .status()
        .unwrap();
    assert_eq!(
        differs.code(),
        Some(1),
        "qemu-img compare saw no written data"
    );
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "vpc", "-F", "raw"])
        .arg(&vhd)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
