use super::*;
use crate::{BlockingIo, CacheMode};
use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};

fn rw() -> DiskOptions {
    DiskOptions::default().cache(CacheMode::Cached)
}

fn ro() -> DiskOptions {
    DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
}

fn opts(block: u32, sector: u32) -> VhdxOptions {
    VhdxOptions {
        block_size: block,
        logical_sector: sector,
        ..VhdxOptions::default()
    }
}

/// Random writes mirrored in a model; returns the model.
fn scribble(disk: &VhdxDisk, model: &mut [u8], seed: u64, count: usize) {
    let bs = u64::from(disk.info().block_size);
    let mut io = BlockingIo::new().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let sectors = model.len() as u64 / bs;
    for _ in 0..count {
        let n = rng.random_range(1..(64 << 10) / bs);
        let at = rng.random_range(0..sectors - n);
        let mut buf = vec![0u8; (n * bs) as usize];
        rng.fill_bytes(&mut buf);
        io.write(disk, at, &buf).unwrap();
        model[(at * bs) as usize..][..buf.len()].copy_from_slice(&buf);
    }
    io.flush(disk).unwrap();
}

fn read_all(disk: &dyn BlockDevice) -> Vec<u8> {
    BlockingIo::new().unwrap().read_all(disk).unwrap()
}

#[test]
fn dynamic_writes_survive_a_reopen_and_close_clears_the_log() {
    for sector in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhdx");
        let size = 24u64 << 20;
        create_vhdx(&path, VhdxKind::Dynamic, size, &opts(1 << 20, sector)).unwrap();
        let mut model = vec![0u8; size as usize];
        {
            let disk = VhdxDisk::open(&path, &rw()).unwrap();
            assert_eq!(disk.info().block_size, sector);
            assert_eq!(disk.info().kind, DeviceKind::VhdxDynamic);
            scribble(&disk, &mut model, u64::from(sector), 300);
            assert!(read_all(&disk) == model);
        }
        let headers =
            read_headers(&IoFile::open(&path, false, CacheMode::Cached).unwrap()).unwrap();
        assert!(
            headers.current.log_guid.is_zero(),
            "a clean close empties the log"
        );
        let disk = VhdxDisk::open(&path, &ro()).unwrap();
        assert!(disk.meta().pending_log.is_none());
        assert!(read_all(&disk) == model, "sector {sector}");
        assert!(disk.meta().allocated_blocks() > 0);
    }
}

#[test]
fn a_copy_taken_after_a_flush_replays_its_log_in_memory_and_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let size = 16u64 << 20;
    create_vhdx(&path, VhdxKind::Dynamic, size, &opts(1 << 20, 512)).unwrap();
    let mut model = vec![0u8; size as usize];
    let crashed = dir.path().join("crashed.vhdx");
    {
        let disk = VhdxDisk::open(&path, &rw()).unwrap();
        scribble(&disk, &mut model, 5, 100);
        // The flush logged and applied the BAT; the log is still live.
        std::fs::copy(&path, &crashed).unwrap();
    }
    let headers = read_headers(&IoFile::open(&crashed, false, CacheMode::Cached).unwrap()).unwrap();
    assert!(!headers.current.log_guid.is_zero());
    let disk = VhdxDisk::open(&crashed, &ro()).unwrap();
    let (entries, _, _) = disk.meta().pending_log.expect("a pending log");
    assert!(entries >= 1);
    assert!(read_all(&disk) == model);
    drop(disk);
    // check sees the pending log, checks the image as replayed, and is
    // clean; info counts the entries.
    let report = crate::tool::check(&crashed);
    assert!(report.is_clean(), "{report:?}");
    assert!(
        report.notes.iter().any(|n| n.contains("replays")),
        "{report:?}"
    );
    let info = crate::tool::info(&crashed).unwrap();
    assert_eq!(info.pending_log_entries, Some(entries));
    let disk = VhdxDisk::open(&crashed, &rw()).unwrap();
    assert!(read_all(&disk) == model);
    drop(disk);
    let disk = VhdxDisk::open(&crashed, &ro()).unwrap();
    assert!(disk.meta().pending_log.is_none());
}

#[test]
fn differencing_chains_read_through_and_record_sector_bits() {
    for sector in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let child = dir.path().join("child.vhdx");
        let size = 16u64 << 20;
        create_vhdx(&base, VhdxKind::Dynamic, size, &opts(2 << 20, sector)).unwrap();
        let mut model = vec![0u8; size as usize];
        scribble(&VhdxDisk::open(&base, &rw()).unwrap(), &mut model, 1, 60);
        create_differencing(&child, &base, &opts(1 << 20, 512)).unwrap();
        {
            let disk = VhdxDisk::open(&child, &rw()).unwrap();
            assert_eq!(disk.info().kind, DeviceKind::VhdxDifferencing);
            assert_eq!(
                disk.info().block_size,
                sector,
                "inherits the parent's sector"
            );
            assert!(read_all(&disk) == model);
            scribble(&disk, &mut model, 2, 60);
            assert!(read_all(&disk) == model);
        }
        let disk = VhdxDisk::open(&child, &ro()).unwrap();
        assert_eq!(disk.chain_paths().len(), 2);
        assert!(read_all(&disk) == model, "sector {sector}");
        // The base was not touched by the child's writes.
        let base_disk = VhdxDisk::open(&base, &ro()).unwrap();
        assert!(read_all(&base_disk) != model);
    }
}

#[test]
fn fixed_disks_are_fully_allocated_and_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.vhdx");
    let size = 10u64 << 20;
    create_vhdx(&path, VhdxKind::Fixed, size, &opts(4 << 20, 512)).unwrap();
    let mut model = vec![0u8; size as usize];
    {
        let disk = VhdxDisk::open(&path, &rw()).unwrap();
        assert_eq!(disk.info().kind, DeviceKind::VhdxFixed);
        assert_eq!(disk.meta().allocated_blocks(), 3);
        scribble(&disk, &mut model, 9, 50);
        assert!(!disk.has_dirty_metadata());
    }
    assert!(read_all(&VhdxDisk::open(&path, &ro()).unwrap()) == model);
}

#[test]
fn a_modified_parent_no_longer_links_until_a_merge_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    create_vhdx(&base, VhdxKind::Dynamic, 8 << 20, &opts(1 << 20, 512)).unwrap();
    create_differencing(&child, &base, &opts(1 << 20, 512)).unwrap();
    {
        let parent = VhdxDisk::open(&base, &rw()).unwrap();
        BlockingIo::new()
            .unwrap()
            .write(&parent, 0, &[1; 512])
            .unwrap();
    }
    let err = VhdxDisk::open(&child, &ro()).unwrap_err();
    assert!(err.to_string().contains("data write GUID"), "{err}");
    // parent_linkage2 set to the parent's DataWriteGuid links it again.
    let parent = VhdxDisk::open(&base, &ro()).unwrap();
    let guid = parent.meta().header.data_write_guid;
    drop(parent);
    {
        // The child cannot be opened through its chain; patch its locator
        // as a merge does, with the chain check skipped by opening the
        // parent's GUID into it first.
        let file = IoFile::open(&child, true, CacheMode::Cached).unwrap();
        let headers = read_headers(&file).unwrap();
        let meta = VhdxMeta::read(&file, &headers, None).unwrap();
        let mut pairs = meta.locator.clone();
        pairs.push(("parent_linkage2".into(), guid.braced()));
        for (offset, page) in create::locator_pages(&file, &meta, &pairs).unwrap() {
            file.write_all_at(&page, offset).unwrap();
        }
    }
    let disk = VhdxDisk::open(&child, &ro()).unwrap();
    assert_eq!(read_all(&disk)[..512], [1; 512]);
}

#[test]
fn convert_moves_contents_between_raw_vhd_and_vhdx() {
    use crate::Format;
    use crate::tool::{ConvertTarget, Subformat, compare, convert, convert_with};
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; 12 << 20];
    StdRng::seed_from_u64(3).fill_bytes(&mut data[(1 << 20)..(3 << 20)]);
    data[(9 << 20)..(9 << 20) + 4096].fill(0x77);
    std::fs::write(&raw, &data).unwrap();
    let target = |format, subformat| ConvertTarget {
        format,
        subformat,
        block_size: 1 << 20,
    };
    let quiet = &mut |_, _| {};
    let x4k = dir.path().join("a.vhdx");
    convert_with(
        &raw,
        &x4k,
        target(Format::Vhdx, Subformat::Dynamic),
        &opts(1 << 20, 4096),
        quiet,
    )
    .unwrap();
    let vhd = dir.path().join("b.vhd");
    convert(&x4k, &vhd, target(Format::Vhd, Subformat::Dynamic), quiet).unwrap();
    let fixed = dir.path().join("c.vhdx");
    convert(&vhd, &fixed, target(Format::Vhdx, Subformat::Fixed), quiet).unwrap();
    let back = dir.path().join("d.raw");
    convert(
        &fixed,
        &back,
        target(Format::Raw, Subformat::Dynamic),
        quiet,
    )
    .unwrap();
    assert!(std::fs::read(&back).unwrap() == data);
    for p in [&x4k, &vhd, &fixed] {
        assert!(compare(&raw, p).unwrap().identical, "{}", p.display());
    }
    let info = crate::tool::info(&x4k).unwrap();
    assert_eq!(info.logical_sector_size, Some(4096));
    assert_eq!(
        info.allocated_bytes,
        3 << 20,
        "zero chunks stay unallocated"
    );
    let err = convert(
        &raw,
        &dir.path().join("e.vhdx"),
        target(Format::Vhdx, Subformat::Differencing),
        quiet,
    );
    assert!(err.is_err());
}
