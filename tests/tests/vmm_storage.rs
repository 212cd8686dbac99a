//! Storage over the VMM: the test guest finds the SCSI controller's offer,
//! opens its channel with the rings in guest memory, runs the storvsc
//! initialization and writes, reads back and flushes a pattern on a dynamic
//! VHD, every packet signalled through HvSignalEvent and every completion
//! through the SynIC. `qemu-img compare` checks the image afterwards
//! against the expected raw image.

use std::process::Command;
use std::time::Duration;

use storage::client::{INIT_TXID, cdb};
use storage::protocol::{
    ChannelProperties, PACKET_SIZE, ProtocolVersion, REQUEST_COMPLETION_FLAG, SENSE_BUFFER_SIZE,
    ScsiRequest, VstorPacket, direction, operation, status,
};
use vmbus::guid::SCSI_INTERFACE;
use vmbus::packet::write_gpa_direct;
use vmbus::server::Registry;
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use vmm::testguest::{GuestChannel, GuestOptions, GuestVsc, TestGuest};
use vspa_tests::require_tool;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const DISK_BYTES: u64 = 16 << 20;

/// Sends one packet (in-band, or GPA-direct over `pages`) and returns the
/// host's completion, waiting for the channel interrupt.
fn round_trip(
    vsc: &mut GuestVsc<'_>,
    ch: &mut GuestChannel,
    txid: u64,
    p: &VstorPacket,
    pages: Option<(&[u64], u32)>,
) -> VstorPacket {
    match pages {
        Some((pfns, len)) => write_gpa_direct(
            &mut ch.outgoing,
            txid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            &[(len, 0, pfns)],
            p.as_bytes(),
        )
        .unwrap(),
        None => ch
            .outgoing
            .write_packet(
                packet_type::DATA_INBAND,
                PACKET_FLAG_COMPLETION_REQUESTED,
                txid,
                &[],
                p.as_bytes(),
            )
            .unwrap(),
    }
    vsc.flush(ch).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        while let Some(r) = ch.incoming.read().unwrap() {
            let (id, payload) = (r.desc.transaction_id, r.payload());
            let mut raw = [0u8; PACKET_SIZE];
            let n = payload.len().min(PACKET_SIZE);
            payload.read_at(0, &mut raw[..n]).unwrap();
            if id == txid {
                vsc.flush(ch).unwrap();
                return VstorPacket::read_from_bytes(&raw).unwrap();
            }
        }
        vsc.flush(ch).unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "no completion for {txid:#x}"
        );
        vsc.wait_channel_interrupt(ch).unwrap();
    }
}

fn init_op(vsc: &mut GuestVsc<'_>, ch: &mut GuestChannel, op: u32) -> VstorPacket {
    let mut p = VstorPacket::new(op, 0);
    p.header.flags = REQUEST_COMPLETION_FLAG.into();
    let r = round_trip(vsc, ch, INIT_TXID, &p, None);
    assert_eq!(r.header.operation.get(), operation::COMPLETE_IO);
    r
}

fn srb_packet(cdb: &[u8], data_in: u8, len: u32) -> VstorPacket {
    let mut p = VstorPacket::new(operation::EXECUTE_SRB, 0);
    p.header.flags = REQUEST_COMPLETION_FLAG.into();
    let mut r = ScsiRequest::new_zeroed();
    r.length = (size_of::<ScsiRequest>() as u16).into();
    r.cdb_length = cdb.len() as u8;
    r.sense_info_length = SENSE_BUFFER_SIZE as u8;
    r.data_in = data_in;
    r.data_transfer_length = len.into();
    r.cdb_or_sense[..cdb.len()].copy_from_slice(cdb);
    p.set_srb(&r);
    p
}

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
    let spec: toml::Value = toml::from_str(&format!(
        "name = \"scsi0\"\n[[lun]]\nlun = 0\npath = {:?}\n",
        vhd.to_str().unwrap()
    ))
    .unwrap();
    let spec: storage::config::ControllerSpec = spec.try_into().unwrap();
    let registry = Registry::new();
    for c in storage::config::build_all(&[spec], dir.path()).unwrap() {
        registry.add(c);
    }
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
        let mut ch = vsc.open_channel(offer, 8, 8).unwrap();

        // storvsc's initialization, as Linux sends it.
        init_op(&mut vsc, &mut ch, operation::BEGIN_INITIALIZATION);
        let mut p = VstorPacket::new(operation::QUERY_PROTOCOL_VERSION, 0);
        p.header.flags = REQUEST_COMPLETION_FLAG.into();
        p.set_body(&ProtocolVersion {
            major_minor: storage::protocol::version::WIN10.into(),
            revision: 0.into(),
        });
        let r = round_trip(&mut vsc, &mut ch, INIT_TXID, &p, None);
        assert_eq!(r.header.status.get(), status::SUCCESS);
        let props: ChannelProperties =
            init_op(&mut vsc, &mut ch, operation::QUERY_PROPERTIES).body_as();
        assert!(props.max_transfer_bytes.get() >= 64 * 1024);
        init_op(&mut vsc, &mut ch, operation::END_INITIALIZATION);

        // READ CAPACITY(16): last LBA and block size.
        let buf = vsc.alloc_pages(1).unwrap();
        let r = round_trip(
            &mut vsc,
            &mut ch,
            1,
            &srb_packet(&cdb::read_capacity_16(), direction::READ, 32),
            Some((&buf, 32)),
        );
        assert_eq!(r.srb().srb_status, storage::protocol::srb::SUCCESS);
        let mut cap = [0u8; 12];
        vm_memory::Bytes::read_slice(
            &**vsc.guest.memory(),
            &mut cap,
            vm_memory::GuestAddress(buf[0] * 4096),
        )
        .unwrap();
        let blocks = u64::from_be_bytes(cap[..8].try_into().unwrap()) + 1;
        assert_eq!(u32::from_be_bytes(cap[8..12].try_into().unwrap()), 512);

        // WRITE(16) a pattern into two places (one spans a 2 MiB VHD block
        // boundary), READ(16) it back, SYNCHRONIZE CACHE.
        let data = vsc.alloc_pages(16).unwrap();
        let back = vsc.alloc_pages(16).unwrap();
        let len = 16 * 4096u32;
        for (txid, lba) in [(2u64, 100u64), (3, (2 << 20) / 512 - 64)] {
            let pattern: Vec<u8> = (0..len)
                .map(|i| ((i as u64 * 7 + lba) % 251) as u8)
                .collect();
            vsc.guest.write(data[0] * 4096, &pattern).unwrap();
            let w = srb_packet(&cdb::write_16(lba, len / 512), direction::WRITE, len);
            let r = round_trip(&mut vsc, &mut ch, txid, &w, Some((&data, len)));
            assert_eq!(
                r.srb().srb_status,
                storage::protocol::srb::SUCCESS,
                "write at {lba}"
            );
            let rd = srb_packet(&cdb::read_16(lba, len / 512), direction::READ, len);
            let r = round_trip(&mut vsc, &mut ch, txid + 0x100, &rd, Some((&back, len)));
            assert_eq!(
                r.srb().srb_status,
                storage::protocol::srb::SUCCESS,
                "read at {lba}"
            );
            let mut got = vec![0u8; len as usize];
            vm_memory::Bytes::read_slice(
                &**vsc.guest.memory(),
                &mut got,
                vm_memory::GuestAddress(back[0] * 4096),
            )
            .unwrap();
            assert!(got == pattern, "read back at LBA {lba}");
        }
        let r = round_trip(
            &mut vsc,
            &mut ch,
            9,
            &srb_packet(&cdb::synchronize_cache(), direction::NONE, 0),
            None,
        );
        assert_eq!(r.srb().srb_status, storage::protocol::srb::SUCCESS);
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
        .args(["compare", "-q", "-f", "vpc", "-F", "raw"])
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
        .args(["compare", "-f", "vpc", "-F", "raw"])
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
