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
    let options = DiskOptions::default().read_only(true).cache(CacheMode::Cached);
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
