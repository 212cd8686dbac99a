use super::*;

fn iso(blocks: u64) -> MediaInfo {
    MediaInfo {
        block_size: 2048,
        physical_block_size: 2048,
        blocks,
        read_only: true,
        supports_discard: false,
        thin: false,
        unique_id: [7; 16],
    }
}

fn run(
    drive: &DvdDrive<u32>,
    s: &mut DvdSession<u32>,
    cdb: &[u8],
    data_len: u32,
) -> (Outcome, Vec<u8>) {
    let mut out = vec![0u8; 4096];
    let o = DvdTarget.execute(
        drive,
        s,
        &Command {
            cdb,
            data_len,
            data_out: &[],
        },
        &mut out,
    );
    let n = if let Outcome::DataIn(n) = o { n } else { 0 };
    out.truncate(n);
    (o, out)
}

#[test]
fn inquiry_reports_a_removable_dvd() {
    let drive = DvdDrive::new(Some((1u32, iso(1000))));
    let mut s = DvdSession::new(&drive);
    let (_, d) = run(&drive, &mut s, &[0x12, 0, 0, 0, 96, 0], 96);
    assert_eq!(&d[..4], &[0x05, 0x80, 0x06, 0x12]);
    assert_eq!(&d[16..32], b"Virtual DVD-ROM ");
}

#[test]
fn reads_capacity_and_toc() {
    let drive = DvdDrive::new(Some((1u32, iso(1000))));
    let mut s = DvdSession::new(&drive);
    assert_eq!(run(&drive, &mut s, &[0; 6], 0).0, Outcome::Good);
    let (_, d) = run(&drive, &mut s, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(d, vec![0, 0, 0x03, 0xe7, 0, 0, 0x08, 0]);
    let (o, _) = run(&drive, &mut s, &[0x28, 0, 0, 0, 0, 10, 0, 0, 2, 0], 4096);
    assert_eq!(
        o,
        Outcome::Io {
            op: BlockOp::Read,
            lba: 10,
            blocks: 2
        }
    );
    // TOC format 0 in LBA form: track 1 at 0, lead-out at 1000.
    let (_, d) = run(
        &drive,
        &mut s,
        &[0x43, 0, 0, 0, 0, 0, 0, 0x03, 0x24, 0],
        804,
    );
    assert_eq!(
        d,
        vec![
            0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xaa, 0, 0, 0, 0x03, 0xe8
        ]
    );
    // MSF form: 1000 + 150 frames = 00:15:25.
    let (_, d) = run(
        &drive,
        &mut s,
        &[0x43, 2, 0, 0, 0, 0, 0, 0x03, 0x24, 0],
        804,
    );
    assert_eq!(&d[8..12], &[0, 0, 2, 0]);
    assert_eq!(&d[16..20], &[0, 0, 15, 25]);
    let (_, d) = run(&drive, &mut s, &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], 34);
    assert_eq!(&d[..4], &[0, 32, 0x0e, 1]);
}

#[test]
fn writes_fail_with_write_protect() {
    let drive = DvdDrive::new(Some((1u32, iso(1000))));
    let mut s = DvdSession::new(&drive);
    for cdb in [
        [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0x0a, 0, 0, 0, 1, 0, 0, 0, 0, 0],
    ] {
        let (o, _) = run(&drive, &mut s, &cdb, 2048);
        assert_eq!(o, Outcome::Check(Sense::WRITE_PROTECTED));
    }
}

#[test]
fn eject_and_insert_are_seen_once() {
    let drive = DvdDrive::new(Some((1u32, iso(1000))));
    let mut s = DvdSession::new(&drive);
    let gesn = [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0];
    let (_, d) = run(&drive, &mut s, &gesn, 8);
    assert_eq!(
        d,
        vec![0, 6, 4, 0x10, 0, 2, 0, 0],
        "no change, media present"
    );
    drive.eject(true).unwrap();
    let (_, d) = run(&drive, &mut s, &gesn, 8);
    assert_eq!(d[4..6], [3, 0], "media removal, no media");
    let (o, _) = run(&drive, &mut s, &[0; 6], 0);
    assert_eq!(o, Outcome::Check(Sense::MEDIUM_NOT_PRESENT));
    let (o, _) = run(&drive, &mut s, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 2048);
    assert_eq!(o, Outcome::Check(Sense::MEDIUM_NOT_PRESENT));
    drive.insert(2, iso(500));
    let (o, _) = run(&drive, &mut s, &[0; 6], 0);
    assert_eq!(
        o,
        Outcome::Check(Sense::MEDIUM_MAY_HAVE_CHANGED),
        "unit attention once"
    );
    assert_eq!(run(&drive, &mut s, &[0; 6], 0).0, Outcome::Good);
    assert_eq!(s.media(), Some(&2));
    let (_, d) = run(&drive, &mut s, &gesn, 8);
    assert_eq!(d[4..6], [2, 2], "new media");
}

#[test]
fn guest_lock_prevents_guest_eject() {
    let drive = DvdDrive::new(Some((1u32, iso(10))));
    let mut s = DvdSession::new(&drive);
    run(&drive, &mut s, &[0x1e, 0, 0, 0, 1, 0], 0);
    let (o, _) = run(&drive, &mut s, &[0x1b, 0, 0, 0, 0x02, 0], 0);
    assert_eq!(o, Outcome::Check(Sense::MEDIUM_REMOVAL_PREVENTED));
    assert_eq!(drive.eject(false), Err(MediumLocked));
    run(&drive, &mut s, &[0x1e, 0, 0, 0, 0, 0], 0);
    assert_eq!(
        run(&drive, &mut s, &[0x1b, 0, 0, 0, 0x02, 0], 0).0,
        Outcome::Good
    );
    assert!(!drive.has_media());
}

#[test]
fn configuration_and_capabilities() {
    let drive = DvdDrive::new(Some((1u32, iso(10))));
    let mut s = DvdSession::new(&drive);
    let (_, d) = run(&drive, &mut s, &[0x46, 0, 0, 0, 0, 0, 0, 0x01, 0, 0], 256);
    assert_eq!(
        u32::from_be_bytes(d[..4].try_into().unwrap()) as usize,
        d.len() - 4
    );
    assert_eq!(&d[6..8], &[0x00, 0x10], "current profile DVD-ROM");
    assert_eq!(&d[8..16], &[0, 0, 0x03, 4, 0, 0x10, 1, 0], "profile list");
    // RT=2: only the requested feature.
    let (_, d) = run(
        &drive,
        &mut s,
        &[0x46, 2, 0, 0x10, 0, 0, 0, 0x01, 0, 0],
        256,
    );
    assert_eq!(d.len(), 8 + 12);
    assert_eq!(&d[8..12], &[0, 0x10, 0x03, 8]);
    let (_, d) = run(&drive, &mut s, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128, 0], 128);
    assert_eq!(&d[8..10], &[0x2a, 26]);
    assert_eq!(d[8 + 6], 0x29);
    let (o, _) = run(&drive, &mut s, &[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
    assert_eq!(
        o,
        Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
        "asynchronous GESN"
    );
}
