//! Fuzz harnesses: feed arbitrary bytes to the parsers and the read path.
//! Run by the cargo-fuzz targets in `vhd/fuzz` and by proptest in the normal
//! test suite. Each must return (any error is fine) and never panic.

use crate::file::CacheMode;
use crate::iso::IsoMeta;
use crate::raw::DiskOptions;
use crate::sync::BlockingIo;
use crate::vhd::VhdDisk;
use crate::{BlockDevice, ImageError};
use std::path::PathBuf;

/// A scratch file private to this process and thread.
fn scratch_path(ext: &str) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    std::env::temp_dir().join(format!("vhd-fuzz-{}-{thread}.{ext}", std::process::id()))
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
