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
    assert_eq!(&d[8..12], &[0, 0x10, 0x01, 8], "current, not persistent");
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

/// MMC-6 5.2.2 (Feature Descriptor): Persistent = 1 means the feature is
/// always current. Random Readable (0010h) and DVD Read (001Fh) depend on
/// the media: persistent 0, current only with media; the drive's own
/// features (0000h-0003h) are persistent and always current.
#[test]
fn media_dependent_features_are_not_persistent() {
    let flags = |present: bool| {
        let drive = DvdDrive::new(present.then(|| (1u32, iso(10))));
        let mut s = DvdSession::new(&drive);
        let (_, d) = run(&drive, &mut s, &[0x46, 0, 0, 0, 0, 0, 0, 0x01, 0, 0], 256);
        let mut out = Vec::new();
        let mut at = 8;
        while at + 4 <= d.len() {
            out.push((u16::from_be_bytes([d[at], d[at + 1]]), d[at + 2] & 0x03));
            at += 4 + usize::from(d[at + 3]);
        }
        out
    };
    let always = [(0x0000, 3), (0x0001, 3), (0x0002, 3), (0x0003, 3)];
    assert_eq!(flags(true)[..4], always);
    assert_eq!(flags(true)[4..], [(0x0010, 1), (0x001f, 1)]);
    assert_eq!(flags(false)[..4], always);
    assert_eq!(flags(false)[4..], [(0x0010, 0), (0x001f, 0)]);
}

/// MSF addresses stop at 255:59:74; a longer disc's lead-out is that
/// address, not minutes clamped with seconds and frames of a larger count.
#[test]
fn msf_addresses_saturate_as_a_whole() {
    assert_eq!(msf(0), [0, 0, 2, 0]);
    assert_eq!(msf((255 * 60 + 59) * 75 + 74 - 150), [0, 255, 59, 74]);
    assert_eq!(msf(2_000_000), [0, 255, 59, 74]);
    assert_eq!(msf(u64::MAX), [0, 255, 59, 74]);
}

/// What Linux 6.1's sr and cdrom drivers test on a probe and open, in
/// their own terms (storvsc leaves `use_10_for_ms` 0, so MODE SENSE is the
/// 6-byte form).
#[test]
fn sr_probe_checks_in_linux_terms() {
    let blocks = 100_000u64;
    let drive = DvdDrive::new(Some((1u32, iso(blocks))));
    let mut s = DvdSession::new(&drive);
    // get_capabilities() (drivers/scsi/sr.c): scsi_mode_sense(sdev, 0,
    // 0x2a, buffer, 128, ...): `data.length > ms_len` or `header_length +
    // block_descriptor_length > data.length` is a "scsi-1 drive".
    let (_, b) = run(&drive, &mut s, &[0x1a, 0, 0x2a, 0, 128, 0], 128);
    let (length, bdl) = (usize::from(b[0]) + 1, usize::from(b[3]));
    assert!(length <= 128 && 4 + bdl <= length);
    let n = 4 + bdl;
    assert_eq!(b[n] & 0x3f, 0x2a);
    assert_ne!(b[n + 2] & 0x8, 0, "a DVD drive: no CDC_DVD in the mask");
    assert_eq!(b[n + 6] >> 5, 1, "tray loading mechanism");
    assert_ne!(b[n + 6] & 0x8, 0, "can eject: no CDC_OPEN_TRAY");
    assert_eq!(u16::from_be_bytes([b[n + 8], b[n + 9]]) / 176, 8, "speed");
    assert_eq!(b[n + 3] & 0x33, 0, "no writer bits");
    // sr_cd_check() (sr_vendor.c, VENDOR_SCSI3): READ TOC with the
    // format in the control byte (0x40: session info); `(buffer[0] << 8)
    // + buffer[1] < 0x0a` would mean no multisession info.
    let (o, b) = run(&drive, &mut s, &[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40], 12);
    assert!(matches!(o, Outcome::DataIn(_)));
    assert!((usize::from(b[0]) << 8) + usize::from(b[1]) >= 0x0a);
    // cdrom_count_tracks() (drivers/cdrom/cdrom.c): track 1's
    // `cdte_ctrl & CDROM_DATA_TRACK` (0x04), else open_for_data fails
    // with -EMEDIUMTYPE.
    let (_, b) = run(&drive, &mut s, &[0x43, 0, 0, 0, 0, 0, 1, 0, 12, 0], 12);
    assert_eq!((b[2], b[3]), (1, 1), "cdth_trk0, cdth_trk1");
    assert_ne!(b[5] & 0x0f & 0x04, 0);
    // cdrom_get_last_written(): READ DISC INFORMATION for 2 bytes, then
    // `be16 + 2` capped at sizeof(disc_information) (36); last_track_lsb
    // (byte 6) must be in what came back.
    let (_, b) = run(&drive, &mut s, &[0x51, 0, 0, 0, 0, 0, 0, 0, 2, 0], 2);
    let buflen = (usize::from(u16::from_be_bytes([b[0], b[1]])) + 2).min(36);
    let (_, b) = run(
        &drive,
        &mut s,
        &[0x51, 0, 0, 0, 0, 0, 0, 0, buflen as u8, 0],
        buflen as u32,
    );
    assert!(b.len() >= 7 && b[6] == 1, "last track 1");
    // ... READ TRACK INFORMATION fails (quietly) and it falls back to the
    // lead-out in MSF: lba = (m*60 + s)*75 + f - 150 == the capacity.
    let (o, _) = run(&drive, &mut s, &[0x52, 1, 0, 0, 0, 1, 0, 0, 28, 0], 28);
    assert!(matches!(o, Outcome::Check(_)));
    let (_, b) = run(&drive, &mut s, &[0x43, 2, 0, 0, 0, 0, 0xaa, 0, 12, 0], 12);
    let (m, sec, f) = (u64::from(b[9]), u64::from(b[10]), u64::from(b[11]));
    assert_eq!((m * 60 + sec) * 75 + f - 150, blocks);
    // cdrom_mmc3_profile(): 32-byte GET CONFIGURATION, profile at 6..8.
    let (_, b) = run(&drive, &mut s, &[0x46, 0, 0, 0, 0, 0, 0, 0, 32, 0], 32);
    assert_eq!(u16::from_be_bytes([b[6], b[7]]), 0x0010, "DVD-ROM");
    // sr_get_events() / cdrom_get_media_event(): polled GESN, media
    // class, 8 bytes: `be16(data_len) >= sizeof(*med)` (4), `!nea &&
    // notification_class == 4`, media_present is bit 1 of byte 5.
    let (_, b) = run(&drive, &mut s, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
    assert!(u16::from_be_bytes([b[0], b[1]]) >= 4);
    assert_eq!(b[2] & 0x80, 0, "nea");
    assert_eq!(b[2] & 0x07, 4, "notification_class");
    assert_ne!(b[5] & 0x02, 0, "media_present");
}
