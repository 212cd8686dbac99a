//! Damaged images give typed errors: truncation, bad checksums, BAT entries
//! past EOF or overlapping, absurd block sizes, parent cycles, missing or
//! mismatched parents, chains too deep.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vhd::create::{create_differencing, create_dynamic, create_fixed};
use vhd::format::{DYN_CHECKSUM_AT, FOOTER_CHECKSUM_AT, checksum};
use vhd::{BlockingIo, CacheMode, DiskOptions, ImageError, VhdDisk};

const HEADER_AT: u64 = 512;
const BAT_AT: u64 = 1536;

fn opts() -> DiskOptions {
    DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
}

fn open(path: &Path) -> Result<VhdDisk, ImageError> {
    VhdDisk::open(path, &opts())
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, at).unwrap();
    buf
}

/// Recomputes the checksum of the structure of `len` bytes at `at`.
fn reseal(path: &Path, at: u64, len: usize, checksum_at: usize) {
    let bytes = read_at(path, at, len);
    let sum = checksum(&bytes, checksum_at);
    patch(path, at + checksum_at as u64, &sum.to_be_bytes());
}

fn reseal_header(path: &Path) {
    reseal(path, HEADER_AT, 1024, DYN_CHECKSUM_AT);
}

/// A 4 MiB dynamic disk (1 MiB blocks) with blocks 0 and 2 allocated.
fn dynamic_with_data(dir: &Path) -> PathBuf {
    let path = dir.join("d.vhd");
    create_dynamic(&path, 4 << 20, 1 << 20).unwrap();
    let disk = VhdDisk::open(&path, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
    let mut io = BlockingIo::new().unwrap();
    io.write(&disk, 0, &[1u8; 4096]).unwrap();
    io.write(&disk, 4096, &[2u8; 4096]).unwrap();
    io.flush(&disk).unwrap();
    path
}

fn bat(path: &Path, index: u64) -> u32 {
    u32::from_be_bytes(read_at(path, BAT_AT + index * 4, 4).try_into().unwrap())
}

fn set_bat(path: &Path, index: u64, sector: u32) {
    patch(path, BAT_AT + index * 4, &sector.to_be_bytes());
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dynamic_with_data(dir.path());
    let len = std::fs::metadata(&path).unwrap().len();
    // Cut inside the last block: the end footer is gone, the copy at 0
    // leads to a BAT entry past the end.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    assert!(matches!(
        open(&path),
        Err(ImageError::BlockPastEof { index: 2, .. })
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    assert!(matches!(open(&path), Err(ImageError::OutsideFile { .. })));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(matches!(open(&path), Err(ImageError::TooSmall { .. })));

    let fixed = dir.path().join("f.vhd");
    create_fixed(&fixed, 1 << 20).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fixed)
        .unwrap()
        .set_len(1 << 19)
        .unwrap();
    assert!(matches!(open(&fixed), Err(ImageError::BadCookie { .. })));
}

#[test]
fn bad_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("f.vhd");
    create_fixed(&fixed, 1 << 20).unwrap();
    patch(&fixed, (1 << 20) + 100, &[0x55]);
    assert!(matches!(
        open(&fixed),
        Err(ImageError::BadChecksum {
            structure: "footer",
            ..
        })
    ));

    let path = dynamic_with_data(dir.path());
    patch(&path, HEADER_AT + 100, &[0x55]);
    assert!(matches!(
        open(&path),
        Err(ImageError::BadChecksum {
            structure: "dynamic disk header",
            ..
        })
    ));

    // Both footers damaged.
    let path = dir.path().join("e.vhd");
    create_dynamic(&path, 1 << 20, 1 << 20).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    patch(&path, len - 400, &[0x55]);
    patch(&path, 100, &[0x55]);
    assert!(matches!(open(&path), Err(ImageError::BadChecksum { .. })));
}

#[test]
fn damaged_end_footer_with_intact_copy_is_reported_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dynamic_with_data(dir.path());
    let len = std::fs::metadata(&path).unwrap().len();
    patch(&path, len - 400, &[0x55]);
    let report = vhd::tool::check(&path);
    assert!(!report.is_clean(), "{report:?}");
    // A read-write open rewrites the footer.
    drop(VhdDisk::open(&path, &DiskOptions::default().cache(CacheMode::Cached)).unwrap());
    assert!(vhd::tool::check(&path).is_clean());
    let disk = open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    BlockingIo::new()
        .unwrap()
        .read(&disk, 4096, &mut buf)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 2));
}

#[test]
fn bat_entries_past_eof_or_overlapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dynamic_with_data(dir.path());
    let first = bat(&path, 0);
    let second = bat(&path, 2);
    assert_ne!(first, u32::MAX);
    assert_ne!(second, u32::MAX);

    set_bat(&path, 1, 0x00ff_ffff);
    assert!(matches!(
        open(&path),
        Err(ImageError::BlockPastEof { index: 1, .. })
    ));

    set_bat(&path, 1, first + 8);
    assert!(matches!(
        open(&path),
        Err(ImageError::BlocksOverlap {
            first: 0,
            second: 1
        })
    ));

    set_bat(&path, 1, 2); // sector 2: inside the dynamic header
    assert!(matches!(
        open(&path),
        Err(ImageError::BlockOverlapsMetadata { index: 1, .. })
    ));

    set_bat(&path, 1, u32::MAX);
    open(&path).unwrap();
}

#[test]
fn absurd_block_sizes_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dynamic_with_data(dir.path());
    let block_size_at = HEADER_AT + 32;
    for bad in [0u32, 3, 256, 1 << 31, 3 << 20] {
        patch(&path, block_size_at, &bad.to_be_bytes());
        reseal_header(&path);
        assert!(
            matches!(open(&path), Err(ImageError::BadBlockSize(b)) if b == bad),
            "block size {bad}"
        );
    }
    patch(&path, block_size_at, &(1u32 << 20).to_be_bytes());
    // Too few BAT entries for the virtual size.
    patch(&path, HEADER_AT + 28, &2u32.to_be_bytes());
    reseal_header(&path);
    assert!(matches!(open(&path), Err(ImageError::BatTooSmall { .. })));
    // A BAT that would run past the end of the file.
    patch(&path, HEADER_AT + 28, &0x0100_0000u32.to_be_bytes());
    reseal_header(&path);
    assert!(matches!(
        open(&path),
        Err(ImageError::OutsideFile { what: "BAT", .. })
    ));
}

#[test]
fn parent_problems() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    create_dynamic(&base, 1 << 20, 1 << 20).unwrap();
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    create_differencing(&a, &base, 1 << 20).unwrap();
    create_differencing(&b, &a, 1 << 20).unwrap();
    open(&b).unwrap();

    // Chain depth limit: b -> a -> base is three images.
    let shallow = opts();
    let shallow = DiskOptions {
        max_chain_depth: 2,
        ..shallow
    };
    assert!(matches!(
        VhdDisk::open(&b, &shallow),
        Err(ImageError::ChainTooDeep(2))
    ));

    // Unique id mismatch: base replaced by another disk.
    let saved = std::fs::read(&base).unwrap();
    create_dynamic(&base, 1 << 20, 1 << 20).unwrap();
    assert!(matches!(open(&a), Err(ImageError::ParentIdMismatch { .. })));

    // Cycle: base becomes a copy of b (whose parent is a), and a is told
    // to expect b's id: a -> base(=b) -> a.
    std::fs::copy(&b, &base).unwrap();
    let b_id = read_at(&b, 68, 16);
    patch(&a, HEADER_AT + 40, &b_id);
    reseal_header(&a);
    assert!(matches!(open(&a), Err(ImageError::ParentCycle(_))));

    // Missing parent.
    std::fs::write(&base, saved).unwrap();
    std::fs::remove_file(&base).unwrap();
    assert!(matches!(open(&b), Err(ImageError::ParentNotFound { .. })));
}

#[test]
fn unknown_disk_type_and_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("f.vhd");
    create_fixed(&fixed, 1 << 20).unwrap();
    let footer_at = 1u64 << 20;
    patch(&fixed, footer_at + 60, &7u32.to_be_bytes());
    reseal(&fixed, footer_at, 512, FOOTER_CHECKSUM_AT);
    assert!(matches!(
        open(&fixed),
        Err(ImageError::UnsupportedDiskType(7))
    ));
    patch(&fixed, footer_at + 60, &2u32.to_be_bytes());
    // current_size larger than the data in front of the footer.
    patch(&fixed, footer_at + 48, &(4u64 << 20).to_be_bytes());
    reseal(&fixed, footer_at, 512, FOOTER_CHECKSUM_AT);
    assert!(matches!(open(&fixed), Err(ImageError::OutsideFile { .. })));
    patch(&fixed, footer_at + 48, &1000u64.to_be_bytes());
    reseal(&fixed, footer_at, 512, FOOTER_CHECKSUM_AT);
    assert!(matches!(
        open(&fixed),
        Err(ImageError::BadVirtualSize(1000))
    ));
}
