use super::*;
use crate::scsi::sense::key;

fn media(read_only: bool, discard: bool) -> MediaInfo {
    MediaInfo {
        block_size: 512,
        physical_block_size: 4096,
        blocks: 2 * 1024 * 1024, // 1 GiB
        read_only,
        supports_discard: discard,
        thin: true,
        unique_id: [
            0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
            0xff, 0x01,
        ],
    }
}

fn run(t: &DiskTarget, cdb: &[u8], data_len: u32) -> (Outcome, Vec<u8>) {
    let mut out = vec![0u8; 4096];
    let o = t.execute(
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
fn standard_inquiry_bytes() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    let (_, d) = run(&t, &[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!(d.len(), 36);
    assert_eq!(&d[..8], &[0x00, 0x00, 0x06, 0x12, 31, 0, 0, 0x02]);
    assert_eq!(&d[8..16], b"Msft    ");
    assert_eq!(&d[16..32], b"Virtual Disk    ");
    assert_eq!(&d[32..36], b"1.0 ");
    // A page code without EVPD is invalid.
    let (o, _) = run(&t, &[0x12, 0, 0x80, 0, 36, 0], 36);
    assert_eq!(o, Outcome::Check(Sense::INVALID_FIELD_IN_CDB));
}

#[test]
fn vpd_pages() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    let (_, d) = run(&t, &[0x12, 1, 0x00, 0, 255, 0], 255);
    assert_eq!(d, vec![0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let (_, d) = run(&t, &[0x12, 1, 0x80, 0, 255, 0], 255);
    assert_eq!(&d[..4], &[0, 0x80, 0, 32]);
    assert_eq!(&d[4..], b"112233445566778899AABBCCDDEEFF01");
    let (_, d) = run(&t, &[0x12, 1, 0x83, 0, 255, 0], 255);
    assert_eq!(&d[..4], &[0, 0x83, 0, (d.len() - 4) as u8]);
    // NAA type 3 (locally assigned) from the UUID's last 8 bytes.
    assert_eq!(
        &d[4..16],
        &[1, 3, 0, 8, 0x39, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x01]
    );
    assert_eq!(&d[16..20], &[2, 1, 0, 40]);
    assert_eq!(&d[20..28], b"Msft    ");
    let (_, d) = run(&t, &[0x12, 1, 0xb0, 0, 255, 0], 255);
    assert_eq!(d.len(), 64);
    assert_eq!(&d[..4], &[0, 0xb0, 0, 0x3c]);
    assert_eq!(
        u32::from_be_bytes(d[8..12].try_into().unwrap()),
        512,
        "max transfer 256 KiB"
    );
    assert_eq!(
        u32::from_be_bytes(d[24..28].try_into().unwrap()),
        MAX_UNMAP_DESCRIPTORS
    );
    assert_eq!(
        u32::from_be_bytes(d[28..32].try_into().unwrap()),
        8,
        "4 KiB unmap granularity"
    );
    let (_, d) = run(&t, &[0x12, 1, 0xb1, 0, 255, 0], 255);
    assert_eq!(&d[4..6], &[0, 1], "non-rotating");
    let (_, d) = run(&t, &[0x12, 1, 0xb2, 0, 255, 0], 255);
    assert_eq!(
        d,
        vec![0, 0xb2, 0, 4, 0, 0xe0, 2, 0],
        "LBPU|LBPWS|LBPWS10, thin"
    );
    let (o, _) = run(&t, &[0x12, 1, 0x89, 0, 255, 0], 255);
    assert_eq!(o, Outcome::Check(Sense::INVALID_FIELD_IN_CDB));
    // Without discard support the provisioning bits are clear.
    let t = DiskTarget::new(media(false, false), 256 * 1024);
    let (_, d) = run(&t, &[0x12, 1, 0xb2, 0, 255, 0], 255);
    assert_eq!(d[5], 0);
}

#[test]
fn capacity() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    let (_, d) = run(&t, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(d, vec![0x00, 0x1f, 0xff, 0xff, 0, 0, 2, 0]);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let (_, d) = run(&t, &cdb, 32);
    assert_eq!(&d[..12], &[0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0, 0, 2, 0]);
    assert_eq!(d[13], 3, "8 logical blocks per 4 KiB physical block");
    assert_eq!(d[14], 0x80, "LBPME");
    // Block limits: optimal transfer granularity is the physical block.
    let (_, d) = run(&t, &[0x12, 1, 0xb0, 0, 64, 0], 64);
    assert_eq!(&d[6..8], &[0, 8]);
}

#[test]
fn mode_sense_pages_and_write_protect() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    // MODE SENSE(6), all pages, with block descriptor.
    let (_, d) = run(&t, &[0x1a, 0, 0x3f, 0, 255, 0], 255);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(&d[1..4], &[0, 0, 8]);
    assert_eq!(
        &d[4..12],
        &[0, 0x20, 0, 0, 0, 0, 2, 0],
        "2 Mi blocks of 512"
    );
    assert_eq!(&d[12..15], &[0x08, 0x12, 0x04], "caching page, WCE");
    assert_eq!(&d[32..34], &[0x0a, 0x0a], "control page");
    // MODE SENSE(10), caching page only, DBD.
    let (_, d) = run(&t, &[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!(&d[..8], &[0, 26, 0, 0, 0, 0, 0, 0]);
    assert_eq!(d.len(), 28);
    // Read-only image: WP bit.
    let ro = DiskTarget::new(media(true, true), 256 * 1024);
    let (_, d) = run(&ro, &[0x1a, 0x08, 0x3f, 0, 255, 0], 255);
    assert_eq!(d[2], 0x80);
    // Saved values and unknown pages are refused.
    let (o, _) = run(&t, &[0x1a, 0, 0xc8, 0, 255, 0], 255);
    assert_eq!(o, Outcome::Check(Sense::SAVING_NOT_SUPPORTED));
    let (o, _) = run(&t, &[0x1a, 0, 0x1c, 0, 255, 0], 255);
    assert_eq!(o, Outcome::Check(Sense::INVALID_FIELD_IN_CDB));
}

#[test]
fn reads_and_writes() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    let (o, _) = run(&t, &[0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], 4096);
    assert_eq!(
        o,
        Outcome::Io {
            op: BlockOp::Read,
            lba: 16,
            blocks: 8
        }
    );
    // Transfer length disagreeing with the guest's buffer.
    let (o, _) = run(&t, &[0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], 512);
    assert_eq!(o, Outcome::Check(Sense::INVALID_FIELD_IN_CDB));
    // Past the end.
    let (o, _) = run(&t, &[0x2a, 0, 0, 0x1f, 0xff, 0xff, 0, 0, 2, 0], 1024);
    assert_eq!(o, Outcome::Check(Sense::LBA_OUT_OF_RANGE));
    // Larger than the advertised maximum transfer.
    let (o, _) = run(&t, &[0x28, 0, 0, 0, 0, 0, 0, 0x04, 0, 0], 1024 * 512);
    assert_eq!(o, Outcome::Check(Sense::INVALID_FIELD_IN_CDB));
    let ro = DiskTarget::new(media(true, true), 256 * 1024);
    let (o, _) = run(&ro, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512);
    assert_eq!(o, Outcome::Check(Sense::WRITE_PROTECTED));
    assert_eq!(Sense::WRITE_PROTECTED.key, key::DATA_PROTECT);
    let (o, _) = run(&t, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0);
    assert!(matches!(
        o,
        Outcome::Io {
            op: BlockOp::Flush,
            ..
        }
    ));
}

#[test]
fn unmap_parameter_list() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    let mut param = vec![0u8, 38, 0, 32, 0, 0, 0, 0];
    for (lba, n) in [(8u64, 8u32), (1000, 24)] {
        param.extend_from_slice(&lba.to_be_bytes());
        param.extend_from_slice(&n.to_be_bytes());
        param.extend_from_slice(&[0; 4]);
    }
    let cdb = [0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0];
    let mut out = [0u8; 64];
    let cmd = Command {
        cdb: &cdb,
        data_len: 40,
        data_out: &param,
    };
    assert_eq!(
        t.execute(&cmd, &mut out),
        Outcome::Discard(vec![(8, 8), (1000, 24)])
    );
    // A descriptor past the end of the disk.
    param[8..16].copy_from_slice(&(u64::MAX - 2).to_be_bytes());
    let cmd = Command {
        cdb: &cdb,
        data_len: 40,
        data_out: &param,
    };
    assert_eq!(
        t.execute(&cmd, &mut out),
        Outcome::Check(Sense::LBA_OUT_OF_RANGE)
    );
    // Descriptor length not a multiple of 16.
    param[3] = 31;
    let cmd = Command {
        cdb: &cdb,
        data_len: 40,
        data_out: &param,
    };
    assert_eq!(
        t.execute(&cmd, &mut out),
        Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR)
    );
    // No discard support: UNMAP is not a command this disk has.
    let t = DiskTarget::new(media(false, false), 256 * 1024);
    assert_eq!(
        t.execute(&cmd, &mut out),
        Outcome::Check(Sense::INVALID_COMMAND)
    );
}

#[test]
fn write_same() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x93;
    cdb[1] = 0x08;
    cdb[9] = 64;
    cdb[13] = 16;
    let (o, _) = run(&t, &cdb, 512);
    assert_eq!(o, Outcome::Discard(vec![(64, 16)]));
    cdb[1] = 0;
    let (o, _) = run(&t, &cdb, 512);
    assert_eq!(
        o,
        Outcome::WriteSame {
            lba: 64,
            blocks: 16
        }
    );
    cdb[13] = 0;
    let (o, _) = run(&t, &cdb, 512);
    assert_eq!(o, Outcome::Check(Sense::INVALID_FIELD_IN_CDB), "WSNZ");
}

#[test]
fn unknown_commands_get_invalid_opcode_sense() {
    let t = DiskTarget::new(media(false, true), 256 * 1024);
    for op in [0x04u8, 0x15, 0x3b, 0x4d, 0xa3, 0xff] {
        let (o, _) = run(&t, &[op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0);
        assert_eq!(o, Outcome::Check(Sense::INVALID_COMMAND), "opcode {op:#x}");
    }
    assert_eq!(
        Sense::INVALID_COMMAND.fixed(),
        [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0]
    );
}
