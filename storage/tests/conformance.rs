//! The storage VSP against the packets a Linux guest's storvsc sends, over
//! hosted mode, with the reply bytes that matter checked one by one.

use std::sync::Arc;

use storage::client::{self, Buffer, Srb, StorvscClient, cdb, wait_reply};
use storage::protocol::{VstorPacket, direction, operation, srb, status};
use storage::{Controller, ControllerConfig, Lun};
use vhd::{CacheMode, DiskOptions};
use vmbus::guid::SCSI_INTERFACE;
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::{ClientChannel, HostedClient};
use vmbus::server::Registry;
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use zerocopy::IntoBytes;

const DISK_BYTES: u64 = 64 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    server: HostedServer,
    controller: Controller,
    path: std::path::PathBuf,
}

fn setup(subchannels: u16) -> Setup {
    setup_with(subchannels, "scsi0", &[])
}

fn setup_with(subchannels: u16, name: &str, cpus: &[usize]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.vhd");
    vhd::create::create_dynamic(&path, DISK_BYTES, 2 << 20).unwrap();
    setup_disk(dir, path, subchannels, name, cpus)
}

/// A controller serving the image at `path` (in `dir`) as LUN 0.
fn setup_disk(
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    subchannels: u16,
    name: &str,
    cpus: &[usize],
) -> Setup {
    let disk = vhd::open_by_name(&path, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
    let mut config = ControllerConfig::new(
        name,
        "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".parse().unwrap(),
    );
    config.max_subchannels = subchannels;
    config.cpus = cpus.to_vec();
    let controller = Controller::new(config);
    controller
        .add_lun(
            0,
            Lun::disk(disk, storage::controller::DEFAULT_MAX_TRANSFER),
        )
        .unwrap();
    let registry = Registry::new();
    registry.add(Arc::new(controller.clone()));
    let server = HostedServer::start(&dir.path().join("s.sock"), registry).unwrap();
    Setup {
        _dir: dir,
        server,
        controller,
        path,
    }
}

fn raw_init(ch: &mut ClientChannel, op: u32, body: &[u8], len: usize) -> client::Reply {
    let mut p = VstorPacket::new(op, 0);
    p.header.flags = 1.into();
    p.body[..body.len()].copy_from_slice(body);
    ch.channel
        .outgoing
        .write_packet(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            client::INIT_TXID,
            &[],
            &p.as_bytes()[..len],
        )
        .unwrap();
    wait_reply(ch, client::INIT_TXID, &mut Vec::new(), client::TIMEOUT).unwrap()
}

#[test]
fn init_sequence_bytes_for_each_version() {
    let s = setup(2);
    let mut host = HostedClient::connect(s.server.path(), 4 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    assert_eq!(offer.interface, SCSI_INTERFACE);
    let mut ch = host.open_channel(&offer, 32, 32, &[0; 24]).unwrap();
    // BEGIN_INITIALIZATION sent 48 bytes long, as pre-negotiation guests do.
    let r = raw_init(&mut ch, operation::BEGIN_INITIALIZATION, &[], 48);
    assert_eq!(r.packet_type, packet_type::COMPLETION);
    assert_eq!(r.len, 64, "completions are exactly 64 bytes");
    assert_eq!(
        &r.packet.as_bytes()[..12],
        &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // Versions: 6.2, 6.0 and 5.1 accepted, 4.2 and 2.0 refused.
    for (v, ok) in [
        (0x0602u16, true),
        (0x0600, true),
        (0x0501, true),
        (0x0402, false),
        (0x0200, false),
    ] {
        let r = raw_init(
            &mut ch,
            operation::QUERY_PROTOCOL_VERSION,
            &v.to_le_bytes(),
            64,
        );
        assert_eq!(r.operation(), operation::COMPLETE_IO);
        let want = if ok { 0 } else { status::REVISION_MISMATCH };
        assert_eq!(r.status(), want, "version {v:#x}");
        assert_eq!(&r.packet.as_bytes()[8..12], &want.to_le_bytes());
    }
    let r = raw_init(&mut ch, operation::QUERY_PROPERTIES, &[], 64);
    let b = r.packet.as_bytes();
    assert_eq!(&b[12..16], &[0; 4]);
    assert_eq!(&b[16..18], &[2, 0], "max_channel_count");
    assert_eq!(&b[20..24], &[1, 0, 0, 0], "multi-channel flag");
    assert_eq!(
        &b[24..28],
        &(256u32 * 1024).to_le_bytes(),
        "max transfer 256 KiB"
    );
    let r = raw_init(&mut ch, operation::END_INITIALIZATION, &[], 64);
    assert_eq!(r.status(), 0);
    // Unknown operations get a failure status, not silence.
    let r = raw_init(&mut ch, 0x77, &[], 64);
    assert_eq!(r.status(), status::INVALID_PARAMETER);
    let r = raw_init(&mut ch, operation::FCHBA_DATA, &[], 64);
    assert_ne!(r.status(), 0);
}

fn buffer(host: &mut HostedClient, pages: u64, offset: u32, len: u32) -> Buffer {
    Buffer {
        pages: host.alloc_pages(pages).unwrap(),
        offset,
        len,
    }
}

fn read_buf(host: &HostedClient, b: &Buffer) -> Vec<u8> {
    let mut v = vec![0u8; b.len as usize];
    host.slice(&b.pages)
        .read_at(b.offset as usize, &mut v)
        .unwrap();
    v
}

#[test]
fn scan_sequence_replies() {
    let s = setup(0);
    let mut host = HostedClient::connect(s.server.path(), 4 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = StorvscClient::connect(&mut host, &offer, 0, 32).unwrap();
    assert_eq!(c.version, 0x0602);
    // INQUIRY, 36 bytes.
    let b = buffer(&mut host, 1, 0, 36);
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::inquiry(false, 0, 36), direction::READ, 36),
            Some(&b),
        )
        .unwrap();
    let srb_out = r.srb();
    assert_eq!(srb_out.srb_status, srb::SUCCESS);
    assert_eq!(srb_out.scsi_status, 0);
    assert_eq!(srb_out.data_transfer_length.get(), 36);
    let d = read_buf(&host, &b);
    assert_eq!(&d[..8], &[0, 0, 6, 0x12, 31, 0, 0, 2]);
    assert_eq!(&d[8..32], b"Msft    Virtual Disk    ");
    // VPD 0x00 then each listed page.
    let b = buffer(&mut host, 1, 0, 255);
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::inquiry(true, 0, 255), direction::READ, 255),
            Some(&b),
        )
        .unwrap();
    assert_eq!(r.srb().data_transfer_length.get(), 10);
    let d = read_buf(&host, &b);
    assert_eq!(&d[..10], &[0, 0, 0, 6, 0, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    for page in [0x80u8, 0x83, 0xb0, 0xb1, 0xb2] {
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::inquiry(true, page, 255), direction::READ, 255),
                Some(&b),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS, "VPD {page:#x}");
        assert_eq!(read_buf(&host, &b)[1], page);
    }
    // Serial derives from the VHD's unique id (read beside the open LUN).
    let shared = DiskOptions::default().read_only(true).force_share(true);
    let info = vhd::open_by_name(&s.path, &shared).unwrap();
    let serial: String = info
        .info()
        .unique_id
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    c.execute(
        0,
        &Srb::new(0, &cdb::inquiry(true, 0x80, 255), direction::READ, 255),
        Some(&b),
    )
    .unwrap();
    assert_eq!(&read_buf(&host, &b)[4..36], serial.as_bytes());
    // REPORT LUNS.
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::report_luns(255), direction::READ, 255),
            Some(&b),
        )
        .unwrap();
    assert_eq!(r.srb().data_transfer_length.get(), 16);
    assert_eq!(
        &read_buf(&host, &b)[..16],
        &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // READ CAPACITY(16): 64 MiB of 512-byte blocks.
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::read_capacity_16(), direction::READ, 32),
            Some(&b),
        )
        .unwrap();
    assert_eq!(r.srb().data_transfer_length.get(), 32);
    let d = read_buf(&host, &b);
    assert_eq!(
        u64::from_be_bytes(d[..8].try_into().unwrap()),
        DISK_BYTES / 512 - 1
    );
    assert_eq!(&d[8..12], &[0, 0, 2, 0]);
    // MODE SENSE(10) 0x3F and 0x08.
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::mode_sense_10(0x3f, 255), direction::READ, 255),
            Some(&b),
        )
        .unwrap();
    let d = read_buf(&host, &b);
    let n = r.srb().data_transfer_length.get() as usize;
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, n - 2);
    assert_eq!(d[3], 0, "not write protected");
    c.execute(
        0,
        &Srb::new(0, &cdb::mode_sense_10(0x08, 255), direction::READ, 255),
        Some(&b),
    )
    .unwrap();
    let d = read_buf(&host, &b);
    assert_eq!(&d[16..19], &[0x08, 0x12, 0x04]);
    // A LUN that does not exist: INQUIRY answers peripheral 0x7f.
    let r = c
        .execute(
            0,
            &Srb::new(5, &cdb::inquiry(false, 0, 36), direction::READ, 36),
            Some(&b),
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    assert_eq!(read_buf(&host, &b)[0], 0x7f);
    let r = c
        .execute(
            0,
            &Srb::new(5, &cdb::test_unit_ready(), direction::NONE, 0),
            None,
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::INVALID_LUN);
    // Target 1 is empty: REPORT LUNS says so.
    let report = cdb::report_luns(255);
    let mut srb1 = Srb::new(0, &report, direction::READ, 255);
    srb1.target = 1;
    let r = c.execute(0, &srb1, Some(&b)).unwrap();
    assert_eq!(r.srb().data_transfer_length.get(), 8);
    // Unknown opcode: CHECK CONDITION, ILLEGAL REQUEST / INVALID COMMAND.
    let r = c
        .execute(
            0,
            &Srb::new(0, &[0xd0, 0, 0, 0, 0, 0, 0, 0, 0, 0], direction::NONE, 0),
            None,
        )
        .unwrap();
    let o = r.srb();
    assert_eq!(o.srb_status, srb::ERROR | srb::AUTOSENSE_VALID);
    assert_eq!(o.scsi_status, 2);
    assert_eq!(o.data_transfer_length.get(), 0);
    assert_eq!(
        &r.sense()[..14],
        &[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0]
    );
    drop(s.controller);
}

#[test]
fn reads_and_writes_cross_pages_at_odd_offsets() {
    let s = setup(0);
    let mut host = HostedClient::connect(s.server.path(), 4 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = StorvscClient::connect(&mut host, &offer, 0, 32).unwrap();
    // 5 sectors starting 3000 bytes into a page: spans 2 pages... 3 pieces.
    let len = 5 * 512;
    let w = buffer(&mut host, 3, 3000, len);
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    host.slice(&w.pages).write_at(3000, &pattern).unwrap();
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::write_16(4097, 5), direction::WRITE, len),
            Some(&w),
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    assert_eq!(r.srb().data_transfer_length.get(), len);
    let sync = c
        .execute(
            0,
            &Srb::new(0, &cdb::synchronize_cache(), direction::NONE, 0),
            None,
        )
        .unwrap();
    assert_eq!(sync.srb().srb_status, srb::SUCCESS);
    let rb = buffer(&mut host, 3, 4095, len);
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::read_16(4097, 5), direction::READ, len),
            Some(&rb),
        )
        .unwrap();
    assert_eq!(r.srb().data_transfer_length.get(), len);
    assert_eq!(read_buf(&host, &rb), pattern);
    // Unwritten sectors of a dynamic disk read as zeros.
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::read_16(0, 5), direction::READ, len),
            Some(&rb),
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    assert!(read_buf(&host, &rb).iter().all(|&b| b == 0));
    // Past the end: LBA OUT OF RANGE.
    let r = c
        .execute(
            0,
            &Srb::new(
                0,
                &cdb::read_16(DISK_BYTES / 512 - 2, 5),
                direction::READ,
                len,
            ),
            Some(&rb),
        )
        .unwrap();
    assert_eq!(&r.sense()[12..14], &[0x21, 0]);
}

/// Adds a 1 MiB raw disk as `lun`; the image lives in the returned dir.
fn hot_add(s: &Setup, lun: u8) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.img");
    vhd::create::create_raw(&path, 1 << 20).unwrap();
    let disk = vhd::open_by_name(&path, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
    s.controller
        .add_lun(lun, Lun::disk(disk, 256 * 1024))
        .unwrap();
    dir
}

/// REPORT LUNS on channel `chan`: the bytes returned.
fn report_luns(host: &mut HostedClient, c: &mut StorvscClient, chan: usize) -> u32 {
    let b = buffer(host, 1, 0, 255);
    let r = c
        .execute(
            chan,
            &Srb::new(0, &cdb::report_luns(255), direction::READ, 255),
            Some(&b),
        )
        .unwrap();
    r.srb().data_transfer_length.get()
}

#[test]
fn subchannels_and_hot_add() {
    let s = setup(2);
    let mut host = HostedClient::connect(s.server.path(), 8 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = StorvscClient::connect(&mut host, &offer, 2, 16).unwrap();
    assert_eq!(c.channels.len(), 3);
    for chan in 0..3 {
        let b = buffer(&mut host, 1, 0, 4096);
        host.slice(&b.pages)
            .write_at(0, &[chan as u8 + 1; 4096])
            .unwrap();
        let r = c.execute(
            chan,
            &Srb::new(
                0,
                &cdb::write_16(chan as u64 * 8, 8),
                direction::WRITE,
                4096,
            ),
            Some(&b),
        );
        assert_eq!(r.unwrap().srb().srb_status, srb::SUCCESS);
    }
    for chan in 0..3 {
        let b = buffer(&mut host, 1, 0, 4096);
        let r = c.execute(
            (chan + 1) % 3,
            &Srb::new(0, &cdb::read_16(chan as u64 * 8, 8), direction::READ, 4096),
            Some(&b),
        );
        assert_eq!(r.unwrap().srb().srb_status, srb::SUCCESS);
        assert_eq!(read_buf(&host, &b), vec![chan as u8 + 1; 4096]);
    }
    // Hot add: the primary channel gets an unsolicited ENUMERATE_BUS.
    let _dir = hot_add(&s, 3);
    assert_eq!(report_luns(&mut host, &mut c, 0), 24);
    assert!(c.unsolicited.contains(&operation::ENUMERATE_BUS));
    s.controller.remove_lun(3).unwrap();
    let r = c
        .execute(
            0,
            &Srb::new(3, &cdb::test_unit_ready(), direction::NONE, 0),
            None,
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::INVALID_LUN);
}

/// UNMAP from the guest on a dynamic VHD: the range reads zeros after it,
/// the neighbours keep their data, and the VPD page says UNMAP is there.
#[test]
fn unmap_on_a_dynamic_vhd_reads_back_zeros() {
    let s = setup(0);
    let mut host = HostedClient::connect(s.server.path(), 4 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = StorvscClient::connect(&mut host, &offer, 0, 32).unwrap();
    let vpd = buffer(&mut host, 1, 0, 64);
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::inquiry(true, 0xb2, 64), direction::READ, 64),
            Some(&vpd),
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    assert_eq!(read_buf(&host, &vpd)[5] & 0x80, 0x80, "LBPU set");
    let w = buffer(&mut host, 4, 0, 16384);
    host.slice(&w.pages).write_at(0, &[0xa5; 16384]).unwrap();
    let r = c.execute(
        0,
        &Srb::new(0, &cdb::write_16(64, 32), direction::WRITE, 16384),
        Some(&w),
    );
    assert_eq!(r.unwrap().srb().srb_status, srb::SUCCESS);
    // One descriptor: LBAs 72..88 (the middle 8 KiB).
    let mut list = [0u8; 24];
    list[..2].copy_from_slice(&22u16.to_be_bytes());
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list[8..16].copy_from_slice(&72u64.to_be_bytes());
    list[16..20].copy_from_slice(&16u32.to_be_bytes());
    let p = buffer(&mut host, 1, 0, 24);
    host.slice(&p.pages).write_at(0, &list).unwrap();
    let mut unmap = [0u8; 10];
    unmap[0] = 0x42;
    unmap[7..9].copy_from_slice(&24u16.to_be_bytes());
    let r = c.execute(0, &Srb::new(0, &unmap, direction::WRITE, 24), Some(&p));
    assert_eq!(r.unwrap().srb().srb_status, srb::SUCCESS);
    let rb = buffer(&mut host, 4, 0, 16384);
    let r = c.execute(
        0,
        &Srb::new(0, &cdb::read_16(64, 32), direction::READ, 16384),
        Some(&rb),
    );
    assert_eq!(r.unwrap().srb().srb_status, srb::SUCCESS);
    let back = read_buf(&host, &rb);
    assert!(back[..4096].iter().all(|&b| b == 0xa5));
    assert!(
        back[4096..12288].iter().all(|&b| b == 0),
        "the unmapped range"
    );
    assert!(back[12288..].iter().all(|&b| b == 0xa5));
}

/// The CPUs each live thread of this process whose name starts with
/// `prefix` may run on.
fn threads_cpus(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            found.push(l["Cpus_allowed_list:".len()..].trim().to_string());
        }
    }
    found.sort();
    found
}

#[test]
fn channel_workers_run_on_the_configured_cpus() {
    let allowed = vmbus::cpu::allowed_cpus().unwrap();
    let (a, b) = (allowed[0], *allowed.last().unwrap());
    let s = setup_with(2, "pinc", &[b, a]);
    let mut host = HostedClient::connect(s.server.path(), 8 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let c = StorvscClient::connect(&mut host, &offer, 2, 16).unwrap();
    assert_eq!(c.channels.len(), 3);
    // Primary and sub-channel 2 on `b`, sub-channel 1 on `a`.
    let mut want = vec![b.to_string(), b.to_string(), a.to_string()];
    want.sort();
    assert_eq!(threads_cpus("scsi-pinc-"), want);
    drop(c);
    // A CPU this process may not use: the open fails, no worker runs.
    let outside = (0..vmbus::cpu::MAX_CPUS)
        .find(|c| !allowed.contains(c))
        .unwrap();
    let s = setup_with(0, "pind", &[outside]);
    let mut host = HostedClient::connect(s.server.path(), 8 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    assert!(host.open_channel(&offer, 32, 32, &[0; 24]).is_err());
    assert!(threads_cpus("scsi-pind-").is_empty());
}

/// A controller with an empty DVD drive at LUN 0, served to a connected
/// storvsc client.
fn empty_dvd(dir: &std::path::Path) -> (Controller, HostedServer, HostedClient, StorvscClient) {
    let controller = Controller::new(ControllerConfig::new("dvd", Default::default()));
    controller.add_lun(0, Lun::dvd(None)).unwrap();
    let registry = Registry::new();
    registry.add(Arc::new(controller.clone()));
    let server = HostedServer::start(&dir.join("s.sock"), registry).unwrap();
    let mut host = HostedClient::connect(server.path(), 4 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let c = StorvscClient::connect(&mut host, &offer, 0, 16).unwrap();
    (controller, server, host, c)
}

#[test]
fn dvd_media_change_through_the_vsp() {
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("a.iso");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("HELLO.TXT"), b"hello").unwrap();
    let out = std::process::Command::new("xorriso")
        .args(["-as", "mkisofs", "-V", "MEDIA", "-o"])
        .arg(&iso)
        .arg(&src)
        .output()
        .expect("xorriso must be installed (run .ci/run)");
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let media = vhd::open_as(
        &iso,
        vhd::Format::Iso,
        &DiskOptions::default().read_only(true),
    )
    .unwrap();
    let (controller, _server, mut host, mut c) = empty_dvd(dir.path());
    let tur = cdb::test_unit_ready();
    // Empty drive: NOT READY, MEDIUM NOT PRESENT.
    let r = c
        .execute(0, &Srb::new(0, &tur, direction::NONE, 0), None)
        .unwrap();
    assert_eq!(
        &r.sense()[..14],
        &[0x70, 0, 2, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x3a, 0]
    );
    controller.insert_media(0, media.clone()).unwrap();
    // First command after the change: UNIT ATTENTION, then ready.
    let r = c
        .execute(0, &Srb::new(0, &tur, direction::NONE, 0), None)
        .unwrap();
    assert_eq!((r.sense()[2], r.sense()[12]), (6, 0x28));
    let r = c
        .execute(0, &Srb::new(0, &tur, direction::NONE, 0), None)
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    let b = buffer(&mut host, 1, 0, 2048);
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::read_10(16, 1), direction::READ, 2048),
            Some(&b),
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    assert_eq!(&read_buf(&host, &b)[1..6], b"CD001");
    // The guest locks the tray; a polite host eject is refused, a forced one works.
    let lock = [0x1e, 0, 0, 0, 1, 0];
    c.execute(0, &Srb::new(0, &lock, direction::NONE, 0), None)
        .unwrap();
    assert!(controller.eject_media(0, false).is_err());
    controller.eject_media(0, true).unwrap();
    let gesn = [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0];
    let g = buffer(&mut host, 1, 0, 8);
    c.execute(0, &Srb::new(0, &gesn, direction::READ, 8), Some(&g))
        .unwrap();
    assert_eq!(
        &read_buf(&host, &g)[4..6],
        &[3, 0],
        "media removal event, no media"
    );
}

/// Linux's VPD scan (`scsi_attach_vpd` -> `scsi_get_vpd_buf` ->
/// `scsi_get_vpd_size`, drivers/scsi/scsi.c): a 4-byte INQUIRY EVPD per
/// page to learn its size, then the whole page; each reply must pass
/// `scsi_vpd_inquiry` (byte 1 is the page asked for, a non-zero length).
/// Returns every page Linux would attach, by page code.
fn linux_vpd_scan(host: &mut HostedClient, c: &mut StorvscClient) -> Vec<(u8, Vec<u8>)> {
    use storage::client::linux::{VPD_HEADER_SIZE, listed_pages, vpd_inquiry};
    let b = buffer(host, 1, 0, 255);
    let mut fetch = |page: u8| {
        let mut sizes = Vec::new();
        for len in [VPD_HEADER_SIZE, 255] {
            let inquiry = cdb::inquiry(true, page, len as u16);
            let srb = Srb::new(0, &inquiry, direction::READ, len as u32);
            let r = c.execute(0, &srb, Some(&b)).unwrap();
            assert_eq!(r.srb().srb_status, srb::SUCCESS, "VPD {page:#04x}");
            let n = r.srb().data_transfer_length.get() as usize;
            let reply = read_buf(host, &b)[..n].to_vec();
            let size = vpd_inquiry(&reply, page)
                .unwrap_or_else(|e| panic!("scsi_vpd_inquiry refuses VPD {page:#04x}: {e}"));
            sizes.push((size, reply));
        }
        let (full, reply) = sizes.pop().unwrap();
        assert_eq!(
            sizes[0].0, full,
            "VPD {page:#04x}: header and page disagree on the size"
        );
        reply[..full.min(reply.len())].to_vec()
    };
    let page0 = fetch(0);
    let pages = listed_pages(&page0).unwrap();
    assert_eq!(
        pages.first(),
        Some(&0),
        "the list starts with page 0x00 itself"
    );
    pages.iter().map(|&p| (p, fetch(p))).collect()
}

#[test]
fn dvd_vpd_pages_pass_linux_scsi_vpd_inquiry() {
    let dir = tempfile::tempdir().unwrap();
    let (_controller, _server, mut host, mut c) = empty_dvd(dir.path());
    let pages = linux_vpd_scan(&mut host, &mut c);
    assert_eq!(pages[0], (0, vec![0x05, 0x00, 0x00, 0x01, 0x00]));
}

#[test]
fn disk_vpd_pages_pass_linux_scsi_vpd_inquiry() {
    let s = setup(0);
    let mut host = HostedClient::connect(s.server.path(), 4 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = StorvscClient::connect(&mut host, &offer, 0, 32).unwrap();
    let pages = linux_vpd_scan(&mut host, &mut c);
    let codes: Vec<u8> = pages.iter().map(|(p, _)| *p).collect();
    assert_eq!(codes, [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
}

/// VHDX LUNs with 4096-byte logical sectors (4Kn) and 512-byte logical on
/// 4096-byte physical sectors (512e): READ CAPACITY(16) reports the block
/// length and the logical-per-physical exponent, the block limits page the
/// maximum transfer in blocks and the physical block as the optimal
/// granularity, and 4 KiB blocks move whole.
#[test]
fn vhdx_luns_report_their_sector_sizes() {
    for (logical, physical, exponent) in [(4096u32, 4096u32, 0u8), (512, 4096, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhdx");
        let options = vhd::vhdx::VhdxOptions {
            block_size: 1 << 20,
            logical_sector: logical,
            physical_sector: physical,
            ..Default::default()
        };
        vhd::vhdx::create_vhdx(&path, vhd::vhdx::VhdxKind::Dynamic, DISK_BYTES, &options).unwrap();
        let s = setup_disk(dir, path, 0, "scsi4k", &[]);
        let mut host = HostedClient::connect(s.server.path(), 4 << 20).unwrap();
        let offer = host.request_offers().unwrap().remove(0);
        let mut c = StorvscClient::connect(&mut host, &offer, 0, 32).unwrap();
        let b = buffer(&mut host, 1, 0, 64);
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::read_capacity_16(), direction::READ, 32),
                Some(&b),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
        let d = read_buf(&host, &b);
        let blocks = DISK_BYTES / u64::from(logical);
        assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), blocks - 1);
        assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), logical);
        assert_eq!(d[13] & 0x0f, exponent, "logical blocks per physical block");
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::inquiry(true, 0xb0, 64), direction::READ, 64),
                Some(&b),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
        let d = read_buf(&host, &b);
        assert_eq!(
            u16::from_be_bytes([d[6], d[7]]),
            (physical / logical) as u16,
            "optimal transfer granularity"
        );
        let max = storage::controller::DEFAULT_MAX_TRANSFER / logical;
        assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), max);
        // Two blocks written and read back whole.
        let len = 2 * logical;
        let w = buffer(&mut host, 3, 100, len);
        let pattern: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
        host.slice(&w.pages).write_at(100, &pattern).unwrap();
        let lba = blocks - 7;
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::write_16(lba, 2), direction::WRITE, len),
                Some(&w),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
        assert_eq!(r.srb().data_transfer_length.get(), len);
        let rb = buffer(&mut host, 3, 4000, len);
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::read_16(lba, 2), direction::READ, len),
                Some(&rb),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
        assert_eq!(read_buf(&host, &rb), pattern);
        // A transfer length that is not whole blocks is refused.
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::read_16(lba, 1), direction::READ, 512 + logical),
                Some(&rb),
            )
            .unwrap();
        assert_ne!(r.srb().srb_status, srb::SUCCESS, "{logical}-byte blocks");
        drop(s.controller);
    }
}

/// `storvsc_on_receive()` (drivers/scsi/storvsc_drv.c, Linux 6.1) answers
/// an unsolicited ENUMERATE_BUS or REMOVE_DEVICE with
/// `queue_work(host_dev->handle_error_wq, &host_dev->host_scan_work)`,
/// and `storvsc_probe()` allocates `handle_error_wq` only after
/// `storvsc_connect_to_vsp()` returned: a notice between END_INITIALIZATION
/// and the guest's first command (its scan, `scsi_scan_host`) hits a NULL
/// queue. A change then needs no notice (the scan sees it); one after the
/// first command, on any channel, gets it on the primary.
#[test]
fn no_rescan_notice_before_the_guests_first_command() {
    let s = setup(1);
    let mut host = HostedClient::connect(s.server.path(), 8 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = StorvscClient::connect(&mut host, &offer, 1, 16).unwrap();
    assert_eq!(c.channels.len(), 2);
    let _dir = hot_add(&s, 3);
    // Let the primary's worker take the kick while the guest "probes".
    std::thread::sleep(std::time::Duration::from_millis(100));
    // The first command, on the sub-channel as Linux may send it: the
    // scan sees LUN 3.
    assert_eq!(report_luns(&mut host, &mut c, 1), 8 + 2 * 8);
    // From now on the guest is told: the removal comes as REMOVE_DEVICE,
    // after anything sent before it on the primary.
    s.controller.remove_lun(3).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !c.unsolicited.contains(&operation::REMOVE_DEVICE) && std::time::Instant::now() < deadline
    {
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::test_unit_ready(), direction::NONE, 0),
                None,
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
    }
    assert_eq!(c.unsolicited, vec![operation::REMOVE_DEVICE]);
}

/// One SRB with a `len`-byte read buffer on channel 0: (reply, data).
fn read_srb(
    host: &mut HostedClient,
    c: &mut StorvscClient,
    srb: &Srb<'_>,
) -> (client::Reply, Vec<u8>) {
    let len = srb.data_transfer_length;
    let b = buffer(host, u64::from(len.div_ceil(4096)), 0, len);
    let r = c.execute(0, srb, Some(&b)).unwrap();
    (r, read_buf(host, &b))
}

/// What Linux 6.1's SCSI scan and sd probe test on a disk's replies, in
/// their own terms (storvsc: `use_10_for_ms` 0, max_lun 255).
#[test]
fn disk_scan_and_sd_probe_in_linux_terms() {
    let s = setup(2);
    let _dir = hot_add(&s, 255);
    let mut host = HostedClient::connect(s.server.path(), 8 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    // storvsc_channel_init() / handle_multichannel_storage(): every init
    // step COMPLETE_IO with status 0 (the client checks), num_sc =
    // min(num_online_cpus() - 1, max_channel_cnt): 8 CPUs, 2 sub-channels.
    let mut c = StorvscClient::connect(&mut host, &offer, 7, 16).unwrap();
    assert_eq!(c.channels.len(), 3);
    assert!(client::linux::max_sectors(&c.properties) > 0);
    let h = &mut host;
    // scsi_probe_and_add_lun(): `(result[0] >> 5) == 3` is "no LUN here";
    // storvsc_on_io_completion() forces INQUIRY to SUCCESS, so the answer
    // must be that data, for a missing LUN and for target 1 alike.
    let inq = cdb::inquiry(false, 0, 36);
    for (lun, target) in [(5u8, 0u8), (0, 1)] {
        let srb = Srb {
            target,
            ..Srb::new(lun, &inq, direction::READ, 36)
        };
        let (r, d) = read_srb(h, &mut c, &srb);
        assert_eq!(
            r.srb().srb_status,
            srb::SUCCESS,
            "lun {lun} target {target}"
        );
        assert_eq!(d[0] >> 5, 3, "lun {lun} target {target}");
    }
    // scsi_report_lun_scan(): a 4096-byte buffer, `be32(lun_data) +
    // sizeof(struct scsi_lun) <= length`, and scsilun_to_int() of each
    // entry names the LUN (255 included).
    let rl = cdb::report_luns(4096);
    let (_, d) = read_srb(h, &mut c, &Srb::new(0, &rl, direction::READ, 4096));
    let length = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
    assert!(length + 8 <= 4096);
    let luns: Vec<u64> = d[8..8 + length]
        .chunks(8)
        .map(|l| {
            (0..8).step_by(2).fold(0u64, |acc, i| {
                acc | u64::from(l[i]) << ((i + 1) * 8) | u64::from(l[i + 1]) << (i * 8)
            })
        })
        .collect();
    assert_eq!(luns, vec![0, 255]);
    // read_capacity_16(): no protection (`buffer[12] & 1`), physical block
    // `(1 << (buffer[13] & 0xf)) * sector_size`, LBPME for a dynamic VHD.
    let rc = cdb::read_capacity_16();
    let (_, d) = read_srb(h, &mut c, &Srb::new(0, &rc, direction::READ, 32));
    let sector = u32::from_be_bytes(d[8..12].try_into().unwrap());
    assert_eq!(sector, 512);
    assert_eq!(d[12] & 1, 0);
    assert!((1u32 << (d[13] & 0xf)) * sector >= sector);
    assert_ne!(d[14] & 0x80, 0, "lbpme");
    // sd_read_block_limits(): `vpd->len >= 64` for the unmap fields;
    // sd_read_block_characteristics(): `len >= 8`, rot == 1;
    // sd_read_block_provisioning(): `len >= 8`, lbpu with lbpme.
    let vpd = |h: &mut HostedClient, c: &mut StorvscClient, page: u8| {
        let q = cdb::inquiry(true, page, 255);
        let (_, d) = read_srb(h, c, &Srb::new(0, &q, direction::READ, 255));
        let len = client::linux::vpd_inquiry(&d, page).unwrap();
        d[..len].to_vec()
    };
    let b0 = vpd(h, &mut c, 0xb0);
    assert!(b0.len() >= 64);
    assert!(
        u32::from_be_bytes(b0[20..24].try_into().unwrap()) > 0,
        "max unmap LBAs"
    );
    assert!(
        u32::from_be_bytes(b0[24..28].try_into().unwrap()) > 0,
        "max unmap descriptors"
    );
    let b1 = vpd(h, &mut c, 0xb1);
    assert!(b1.len() >= 8);
    assert_eq!(
        u16::from_be_bytes([b1[4], b1[5]]),
        1,
        "rot == 1: non-rotational"
    );
    let b2 = vpd(h, &mut c, 0xb2);
    assert!(b2.len() >= 8);
    assert_ne!(b2[5] & 0x80, 0, "lbpu");
    // sd_read_cache_type() with MODE SENSE(6): a 4-byte request for page
    // 8 first, `len = buffer[0] + 1`, then the whole; the page walk starts
    // at header_length (4) + block_descriptor_length and finds page 8;
    // WCE is `buffer[offset + 2] & 0x04`.
    let ms6 = |len: u8| [0x1a, 0, 0x08, 0, len, 0];
    let first = ms6(4);
    let (_, d) = read_srb(h, &mut c, &Srb::new(0, &first, direction::READ, 4));
    let len = usize::from(d[0]) + 1;
    assert!(len > 4 && len <= 255);
    let all = ms6(len as u8);
    let (r, d) = read_srb(h, &mut c, &Srb::new(0, &all, direction::READ, len as u32));
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    let mut offset = 4 + usize::from(d[3]);
    while offset + 2 < len && d[offset] & 0x3f != 8 {
        offset += 2 + usize::from(d[offset + 1]);
    }
    assert_eq!(d[offset] & 0x3f, 8, "caching page found");
    assert!(len - offset > 2);
    assert_ne!(d[offset + 2] & 0x04, 0, "WCE");
}
