//! Fuzz harnesses: feed arbitrary bytes to the parsers and the read path.
//! Run by the cargo-fuzz targets in `vhd/fuzz` and by proptest in the normal
//! test suite. Each must return (any error is fine) and never panic.

use crate::file::CacheMode;
use crate::iso::IsoMeta;
use crate::raw::DiskOptions;
use crate::sync::BlockingIo;
use crate::vhd::VhdDisk;
use crate::vhdx::VhdxDisk;
use crate::{BlockDevice, ImageError};
use std::path::PathBuf;

/// A scratch file private to this process and thread; in memory (tmpfs)
/// where there is one, since the VHDX harness fdatasyncs a lot.
fn scratch_path(ext: &str) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("vhd-fuzz-{}-{thread}.{ext}", std::process::id()))
}

/// Opens `data` as a VHD (read-only, with validation) and reads its first,
/// middle and last sectors; also runs `check` on it.
pub fn vhd_open_and_read(data: &[u8]) {
    let path = scratch_path("vhd");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let options = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached);
    if let Ok(disk) = VhdDisk::open(&path, &options)
        && let Ok(mut io) = BlockingIo::new()
    {
        let blocks = disk.info().blocks;
        let mut buf = vec![0u8; 8 * 512];
        for start in [0, blocks / 2, blocks.saturating_sub(8)] {
            let n = (blocks - start.min(blocks)).min(8) as usize;
            if n > 0 {
                let _ = io.read(&disk, start, &mut buf[..n * 512]);
            }
        }
        let _ = disk.sector_present(blocks / 3);
    }
    let _ = crate::tool::check(&path);
    let _ = crate::tool::info(&path);
    let _ = std::fs::remove_file(&path);
}

/// Opens `data` as a VHDX read-only (full validation, a pending log
/// replayed in memory) and reads its first, middle and last sectors; runs
/// `check` and `info`; then, if that open worked, opens it read-write (replaying a log, reclaiming
/// space), writes a sector near the middle and flushes.
pub fn vhdx_open_and_read(data: &[u8]) {
    let path = scratch_path("vhdx");
    if write_sparse(&path, data).is_err() {
        return;
    }
    let ro = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached);
    let opened = VhdxDisk::open(&path, &ro).map(|disk| {
        read_ends(&disk);
        let _ = disk.sector_present(disk.info().blocks / 3);
    });
    let _ = crate::tool::check(&path);
    let _ = crate::tool::info(&path);
    let rw = DiskOptions::default().cache(CacheMode::Cached);
    // A read-write open refuses what a read-only one does, and more.
    if opened.is_ok()
        && let Ok(disk) = VhdxDisk::open(&path, &rw)
        && let Ok(mut io) = BlockingIo::new()
    {
        let bs = disk.info().block_size as usize;
        let _ = io.write(&disk, disk.info().blocks / 2, &vec![0x5a; bs]);
        let _ = io.flush(&disk);
        read_ends(&disk);
    }
    let _ = std::fs::remove_file(&path);
}

/// Writes `data` leaving its all-zero 4 KiB pages as holes (VHDX images
/// are mostly zeros; the harness runs many).
fn write_sparse(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path)?;
    file.set_len(data.len() as u64)?;
    for (i, page) in data.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(page, i as u64 * 4096)?;
        }
    }
    Ok(())
}

/// Reads up to 8 blocks at the start, middle and end of `disk`.
fn read_ends(disk: &dyn BlockDevice) {
    let Ok(mut io) = BlockingIo::new() else {
        return;
    };
    let blocks = disk.info().blocks;
    let bs = disk.info().block_size as usize;
    let mut buf = vec![0u8; 8 * bs];
    for start in [0, blocks / 2, blocks.saturating_sub(8)] {
        let n = (blocks - start.min(blocks)).min(8) as usize;
        if n > 0 {
            let _ = io.read(disk, start, &mut buf[..n * bs]);
        }
    }
}

/// Recomputes the CRC-32C of both VHDX headers and region tables of an
/// image in memory (so mutations reach the structures behind them).
pub fn vhdx_reseal(image: &mut [u8]) {
    use crate::vhdx::format::{
        HEADER_OFFSETS, HEADER_SIZE, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, seal_crc,
    };
    let at = |o: u64, n: usize| (o as usize, o as usize + n);
    for (start, end) in HEADER_OFFSETS.iter().map(|&o| at(o, HEADER_SIZE)).chain(
        REGION_TABLE_OFFSETS
            .iter()
            .map(|&o| at(o, REGION_TABLE_SIZE)),
    ) {
        if let Some(bytes) = image.get_mut(start..end) {
            seal_crc(bytes, 4);
        }
    }
}

/// Parses `data` as an ISO 9660 image.
pub fn iso_open(data: &[u8]) {
    let _ = IsoMeta::parse(data.len() as u64, |at, buf| {
        let start = usize::try_from(at).map_err(|_| ImageError::UnknownFormat)?;
        let src = data
            .get(start..start.saturating_add(buf.len()))
            .ok_or(ImageError::TooSmall {
                what: "ISO read",
                len: data.len() as u64,
            })?;
        buf.copy_from_slice(src);
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Seed images: a dynamic disk with two allocated blocks, a fixed disk,
    /// and a differencing disk (its parent is absent from the scratch dir).
    fn seeds() -> Vec<Vec<u8>> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let dynamic = dir.join("d.vhd");
        crate::create::create_dynamic(&dynamic, 4 << 20, 1 << 20).unwrap();
        {
            let disk =
                VhdDisk::open(&dynamic, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
            let mut io = BlockingIo::new().unwrap();
            io.write(&disk, 0, &[0xab; 1024]).unwrap();
            io.write(&disk, 6000, &[0xcd; 512]).unwrap();
            io.flush(&disk).unwrap();
        }
        let fixed = dir.join("f.vhd");
        crate::create::create_fixed(&fixed, 64 << 10).unwrap();
        let diff = dir.join("c.vhd");
        crate::create::create_differencing(&diff, &dynamic, 1 << 20).unwrap();
        [dynamic, fixed, diff]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect()
    }

    /// Offsets of the structures of the seeds' layout (1 MiB log at 1 MiB,
    /// metadata at 2 MiB with its items at +64 KiB, BAT at 3 MiB).
    const VHDX_SPOTS: [u64; 8] = [
        0,
        64 << 10,
        128 << 10,
        192 << 10,
        1 << 20,
        2 << 20,
        (2 << 20) + (64 << 10),
        3 << 20,
    ];

    /// Seed images: a dynamic VHDX with data and a live log (a copy taken
    /// before close), and a differencing child whose parent is absent.
    fn vhdx_seeds() -> Vec<Vec<u8>> {
        use crate::vhdx::{VhdxKind, VhdxOptions, create_differencing, create_vhdx};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let o = VhdxOptions {
            block_size: 1 << 20,
            ..VhdxOptions::default()
        };
        let base = dir.join("b.vhdx");
        create_vhdx(&base, VhdxKind::Dynamic, 4 << 20, &o).unwrap();
        let live;
        {
            let disk =
                VhdxDisk::open(&base, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
            let mut io = BlockingIo::new().unwrap();
            io.write(&disk, 0, &[0xab; 1024]).unwrap();
            io.write(&disk, 6000, &[0xcd; 512]).unwrap();
            io.flush(&disk).unwrap();
            live = std::fs::read(&base).unwrap();
        }
        let child = dir.join("c.vhdx");
        create_differencing(&child, &base, &o).unwrap();
        vec![live, std::fs::read(&child).unwrap()]
    }

    fn mutate(mut data: Vec<u8>, edits: &[(u32, u8, bool)], cut: Option<u32>) -> Vec<u8> {
        let len = data.len();
        for &(at, value, near_end) in edits {
            // Half the edits hit the metadata at either end of the file.
            let window = len.min(4096);
            let pos = at as usize % window;
            let pos = if near_end { len - 1 - pos } else { pos };
            data[pos] = value;
        }
        if let Some(cut) = cut {
            data.truncate(cut as usize % (len + 1));
        }
        data
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

        #[test]
        fn vhd_harness_never_panics(
            seed in 0usize..3,
            edits in proptest::collection::vec((any::<u32>(), any::<u8>(), any::<bool>()), 0..8),
            cut in proptest::option::weighted(0.2, any::<u32>()),
        ) {
            thread_local!(static SEEDS: Vec<Vec<u8>> = seeds());
            let image = SEEDS.with(|s| s[seed].clone());
            vhd_open_and_read(&mutate(image, &edits, cut));
        }

        #[test]
        fn vhdx_harness_never_panics(
            seed in 0usize..2,
            edits in proptest::collection::vec((0usize..VHDX_SPOTS.len(), any::<u16>(), any::<u8>()), 1..8),
            reseal in any::<bool>(),
            cut in proptest::option::weighted(0.1, any::<u32>()),
        ) {
            thread_local!(static SEEDS: Vec<Vec<u8>> = vhdx_seeds());
            let mut image = SEEDS.with(|s| s[seed].clone());
            for (spot, at, value) in edits {
                // Edits land in the headers, region tables, metadata table
                // and items, the BAT and the log of the seed's layout.
                let pos = VHDX_SPOTS[spot] as usize + usize::from(at) % 512;
                if let Some(b) = image.get_mut(pos) {
                    *b = value;
                }
            }
            if reseal {
                vhdx_reseal(&mut image);
            }
            if let Some(cut) = cut {
                image.truncate(cut as usize % (image.len() + 1));
            }
            vhdx_open_and_read(&image);
        }

        #[test]
        fn iso_harness_never_panics(
            edits in proptest::collection::vec((any::<u32>(), any::<u8>()), 0..16),
            cut in proptest::option::weighted(0.2, any::<u32>()),
        ) {
            let mut image = crate::iso::tests::tiny_iso();
            for (at, value) in edits {
                // Edits land in the descriptors and the root directory.
                let pos = 16 * 2048 + at as usize % (4 * 2048);
                image[pos] = value;
            }
            if let Some(cut) = cut {
                image.truncate(cut as usize % (image.len() + 1));
            }
            iso_open(&image);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            vhd_open_and_read(&data);
            vhdx_open_and_read(&data);
            iso_open(&data);
        }
    }

    #[test]
    fn seeds_are_valid_before_mutation() {
        let seeds = seeds();
        let dir = std::env::temp_dir();
        for (i, seed) in seeds.iter().take(2).enumerate() {
            let path = dir.join(format!("vhd-seed-check-{}-{i}.vhd", std::process::id()));
            std::fs::write(&path, seed).unwrap();
            let opened = VhdDisk::open(&path, &DiskOptions::default().read_only(true));
            std::fs::remove_file(&path).unwrap();
            opened.unwrap();
        }
    }
}
