//! A hostile VHDX corpus: every damaged image is refused with an error that
//! names what is wrong, never a panic. Damage is made on images vspa
//! creates (layout: 1 MiB log at 1 MiB, metadata region at 2 MiB with its
//! items from +64 KiB, BAT at 3 MiB, blocks from 4 MiB), re-sealing the
//! CRCs where the damage is meant to get past them.

use std::path::{Path, PathBuf};
use vhd::file::IoFile;
use vhd::vhdx::format::{MIB, bat_entry, payload};
use vhd::vhdx::{
    Guid, LogRegion, LogWriter, VhdxKind, VhdxOptions, create_differencing, create_vhdx,
};
use vhd::{BlockingIo, CacheMode, DiskOptions, VhdxDisk};

const META: usize = 2 << 20;
const ITEMS: usize = META + (64 << 10);
const BAT: usize = 3 << 20;

fn ro() -> DiskOptions {
    DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
}

fn rw() -> DiskOptions {
    DiskOptions::default().cache(CacheMode::Cached)
}

fn opts() -> VhdxOptions {
    VhdxOptions {
        block_size: 1 << 20,
        ..VhdxOptions::default()
    }
}

/// A 8 MiB dynamic VHDX with blocks 0 and 3 allocated.
fn image(dir: &Path) -> Vec<u8> {
    let path = dir.join("good.vhdx");
    create_vhdx(&path, VhdxKind::Dynamic, 8 << 20, &opts()).unwrap();
    {
        let disk = VhdxDisk::open(&path, &rw()).unwrap();
        let mut io = BlockingIo::new().unwrap();
        io.write(&disk, 0, &[1; 4096]).unwrap();
        io.write(&disk, 3 * 2048, &[2; 4096]).unwrap();
    }
    std::fs::read(&path).unwrap()
}

/// Writes `bytes` (re-sealed if asked) and opens it read-only and
/// read-write; both must fail with a message containing `expect`.
fn refused(dir: &Path, name: &str, mut bytes: Vec<u8>, reseal: bool, expect: &str) {
    if reseal {
        vhd::fuzzing::vhdx_reseal(&mut bytes);
    }
    let path = dir.join(format!("{name}.vhdx"));
    std::fs::write(&path, &bytes).unwrap();
    for options in [ro(), rw()] {
        let err = VhdxDisk::open(&path, &options)
            .map(|_| ())
            .expect_err(name)
            .to_string();
        assert!(err.contains(expect), "{name}: {err:?} lacks {expect:?}");
    }
    let report = vhd::tool::check(&path);
    assert!(!report.is_clean(), "{name}: check found nothing");
}

fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

#[test]
fn damaged_headers_and_region_tables() {
    let dir = tempfile::tempdir().unwrap();
    let good = image(dir.path());
    let mut b = good.clone();
    b[0] = b'V';
    refused(dir.path(), "signature", b, false, "vhdxfile");
    let mut b = good.clone();
    b[(64 << 10) + 100] ^= 1;
    b[(128 << 10) + 100] ^= 1;
    refused(
        dir.path(),
        "both-headers",
        b,
        false,
        "both VHDX headers are damaged",
    );
    let mut b = good.clone();
    b[(192 << 10) + 40] ^= 1;
    b[(256 << 10) + 40] ^= 1;
    refused(
        dir.path(),
        "both-region-tables",
        b,
        false,
        "region tables are damaged",
    );
    // One damaged copy of each: opens; check reports the region table.
    let mut b = good.clone();
    b[(64 << 10) + 100] ^= 1;
    b[(192 << 10) + 40] ^= 1;
    let path = dir.path().join("one-copy.vhdx");
    std::fs::write(&path, &b).unwrap();
    VhdxDisk::open(&path, &ro()).unwrap();
    let report = vhd::tool::check(&path);
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert!(
        report.notes.iter().any(|n| n.contains("header 1")),
        "{report:?}"
    );
    // Both headers at one sequence number but different.
    let mut b = good.clone();
    put(&mut b, (64 << 10) + 8, &7u64.to_le_bytes());
    put(&mut b, (128 << 10) + 8, &7u64.to_le_bytes());
    refused(dir.path(), "same-sequence", b, true, "same sequence number");
    // The log outside the file.
    let mut b = good.clone();
    for h in [64 << 10, 128 << 10] {
        put(&mut b, h + 72, &(1u64 << 40).to_le_bytes());
    }
    refused(dir.path(), "log-outside", b, true, "log at");
}

#[test]
fn overlapping_and_misplaced_regions() {
    let dir = tempfile::tempdir().unwrap();
    let good = image(dir.path());
    // Region entries: BAT at 192 KiB + 16, metadata at + 48.
    let (bat_entry_at, meta_entry_at) = ((192 << 10) + 16, (192 << 10) + 48);
    let mut b = good.clone();
    for t in [0, 64 << 10] {
        put(&mut b, meta_entry_at + t + 16, &(3 * MIB).to_le_bytes());
    }
    refused(dir.path(), "meta-over-bat", b, true, "overlaps");
    let mut b = good.clone();
    for t in [0, 64 << 10] {
        put(&mut b, bat_entry_at + t + 16, &MIB.to_le_bytes());
    }
    refused(dir.path(), "bat-over-log", b, true, "overlaps");
    let mut b = good.clone();
    for t in [0, 64 << 10] {
        put(
            &mut b,
            bat_entry_at + t + 16,
            &(3 * MIB + 4096).to_le_bytes(),
        );
    }
    refused(dir.path(), "bat-unaligned", b, true, "multiple of 1 MiB");
    let mut b = good.clone();
    for t in [0, 64 << 10] {
        put(&mut b, bat_entry_at + t + 16, &(64 * MIB).to_le_bytes());
    }
    refused(dir.path(), "bat-past-eof", b, true, "outside the file");
    // An unknown region marked required.
    let mut b = good.clone();
    for t in [0, 64 << 10] {
        put(&mut b, (192 << 10) + t + 8, &3u32.to_le_bytes());
        put(&mut b, (192 << 10) + t + 80, &[0x11; 16]);
        put(&mut b, (192 << 10) + t + 96, &(5 * MIB).to_le_bytes());
        put(&mut b, (192 << 10) + t + 104, &(MIB as u32).to_le_bytes());
        put(&mut b, (192 << 10) + t + 108, &1u32.to_le_bytes());
    }
    refused(dir.path(), "unknown-required", b, true, "marked required");
}

#[test]
fn bat_entries_past_eof_overlapping_or_in_bad_states() {
    let dir = tempfile::tempdir().unwrap();
    let good = image(dir.path());
    let set = |b: &mut Vec<u8>, index: usize, e: u64| put(b, BAT + index * 8, &e.to_le_bytes());
    let mut b = good.clone();
    set(&mut b, 5, bat_entry(payload::FULLY_PRESENT, 100 * MIB));
    refused(dir.path(), "past-eof", b, false, "outside the file");
    let first = u64::from_le_bytes(good[BAT..BAT + 8].try_into().unwrap());
    let mut b = good.clone();
    set(&mut b, 6, first);
    refused(dir.path(), "overlap", b, false, "overlaps");
    let mut b = good.clone();
    set(&mut b, 1, bat_entry(payload::FULLY_PRESENT, 3 * MIB));
    refused(dir.path(), "over-bat", b, false, "overlaps the BAT");
    let mut b = good.clone();
    set(&mut b, 2, bat_entry(payload::PARTIALLY_PRESENT, 4 * MIB));
    refused(dir.path(), "partial-in-dynamic", b, false, "state 7");
    let mut b = good.clone();
    set(&mut b, 2, 4);
    refused(dir.path(), "reserved-state", b, false, "state 4");
}

#[test]
fn absurd_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let good = image(dir.path());
    let cases: [(&str, usize, Vec<u8>, &str); 7] = [
        (
            "block-3m",
            ITEMS,
            (3u32 << 20).to_le_bytes().to_vec(),
            "block size",
        ),
        (
            "block-512m",
            ITEMS,
            (512u32 << 20).to_le_bytes().to_vec(),
            "block size",
        ),
        (
            "block-4k",
            ITEMS,
            4096u32.to_le_bytes().to_vec(),
            "block size",
        ),
        (
            "size-zero",
            ITEMS + 8,
            0u64.to_le_bytes().to_vec(),
            "virtual size",
        ),
        (
            "size-huge",
            ITEMS + 8,
            (1u64 << 50).to_le_bytes().to_vec(),
            "virtual size",
        ),
        (
            "logical-1000",
            ITEMS + 32,
            1000u32.to_le_bytes().to_vec(),
            "sector size",
        ),
        (
            "physical-0",
            ITEMS + 40,
            0u32.to_le_bytes().to_vec(),
            "sector size",
        ),
    ];
    for (name, at, value, expect) in cases {
        let mut b = good.clone();
        put(&mut b, at, &value);
        refused(dir.path(), name, b, false, expect);
    }
    let mut b = good.clone();
    put(&mut b, META, b"metadatX");
    refused(dir.path(), "table-signature", b, false, "signature");
    let mut b = good.clone();
    put(&mut b, META + 10, &3000u16.to_le_bytes());
    refused(dir.path(), "table-count", b, false, "2047");
    // The file parameters item pointed outside the region.
    let mut b = good.clone();
    put(&mut b, META + 32 + 16, &(2u32 << 20).to_le_bytes());
    refused(dir.path(), "item-outside", b, false, "outside the region");
    // A virtual size whose BAT does not fit the BAT region.
    let mut b = good.clone();
    put(&mut b, ITEMS + 8, &(1u64 << 40).to_le_bytes());
    refused(dir.path(), "bat-too-small", b, false, "BAT region holds");
}

#[test]
fn logs_pointing_outside_the_file_or_at_the_headers() {
    let dir = tempfile::tempdir().unwrap();
    let good = image(dir.path());
    for (name, target, expect) in [
        ("log-past-eof", 64 * MIB, "outside"),
        ("log-into-headers", 64 << 10, "outside"),
        ("log-into-log", MIB + 8192, "outside"),
    ] {
        let path = dir.path().join(format!("{name}.vhdx"));
        std::fs::write(&path, &good).unwrap();
        let guid = Guid::random().unwrap();
        {
            let file = IoFile::open(&path, true, CacheMode::Cached).unwrap();
            let mut w = LogWriter::new(
                LogRegion {
                    offset: MIB,
                    length: MIB,
                },
                guid,
            );
            w.write_round(&file, &[(target, &[7u8; 4096][..])], good.len() as u64)
                .unwrap();
        }
        let mut b = std::fs::read(&path).unwrap();
        for h in [64 << 10, 128 << 10] {
            put(&mut b, h + 48, &guid.0);
        }
        refused(dir.path(), name, b, true, expect);
    }
}

#[test]
fn parent_loops_and_missing_parents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A child renamed over its parent names itself.
    create_vhdx(&d.join("a.vhdx"), VhdxKind::Dynamic, 8 << 20, &opts()).unwrap();
    create_differencing(&d.join("b.vhdx"), &d.join("a.vhdx"), &opts()).unwrap();
    std::fs::rename(d.join("b.vhdx"), d.join("a.vhdx")).unwrap();
    let err = VhdxDisk::open(&d.join("a.vhdx"), &ro()).unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");
    // A two-step loop: x <- p <- q, then q renamed over x, with x's
    // DataWriteGuid, so that p's link to it holds.
    create_vhdx(&d.join("x.vhdx"), VhdxKind::Dynamic, 8 << 20, &opts()).unwrap();
    create_differencing(&d.join("p.vhdx"), &d.join("x.vhdx"), &opts()).unwrap();
    create_differencing(&d.join("q.vhdx"), &d.join("p.vhdx"), &opts()).unwrap();
    let x = std::fs::read(d.join("x.vhdx")).unwrap();
    let mut q = std::fs::read(d.join("q.vhdx")).unwrap();
    for h in [64 << 10, 128 << 10] {
        put(&mut q, h + 32, &x[(64 << 10) + 32..(64 << 10) + 48]);
    }
    vhd::fuzzing::vhdx_reseal(&mut q);
    std::fs::write(d.join("x.vhdx"), &q).unwrap();
    std::fs::remove_file(d.join("q.vhdx")).unwrap();
    let err = VhdxDisk::open(&d.join("p.vhdx"), &ro()).unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");
    // A missing parent.
    create_vhdx(&d.join("m.vhdx"), VhdxKind::Dynamic, 8 << 20, &opts()).unwrap();
    create_differencing(&d.join("n.vhdx"), &d.join("m.vhdx"), &opts()).unwrap();
    std::fs::remove_file(d.join("m.vhdx")).unwrap();
    let err = VhdxDisk::open(&d.join("n.vhdx"), &ro()).unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    // A different disk in the parent's place.
    create_vhdx(&d.join("m.vhdx"), VhdxKind::Dynamic, 8 << 20, &opts()).unwrap();
    let err = VhdxDisk::open(&d.join("n.vhdx"), &ro()).unwrap_err();
    assert!(err.to_string().contains("data write GUID"), "{err}");
}

#[test]
fn truncated_files_and_named_vhdx_without_signature() {
    let dir = tempfile::tempdir().unwrap();
    let good = image(dir.path());
    for cut in [
        0usize,
        7,
        100,
        64 << 10,
        MIB as usize,
        (3 << 20) + 4096,
        good.len() - 4096,
    ] {
        let path: PathBuf = dir.path().join(format!("cut{cut}.vhdx"));
        std::fs::write(&path, &good[..cut]).unwrap();
        assert!(VhdxDisk::open(&path, &ro()).is_err(), "cut at {cut}");
        // The name says VHDX: a file that is not one is refused rather
        // than served raw.
        let err = vhd::open_by_name(&path, &ro()).unwrap_err().to_string();
        if cut < 8 {
            assert!(err.contains("not served as raw"), "cut at {cut}: {err}");
        }
    }
}
