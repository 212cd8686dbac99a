//! `SEEK_DATA`/`SEEK_HOLE`: where a sparse file has data, for the
//! allocation queries of raw images.

use std::fs::File;
use std::os::fd::AsRawFd;

/// A run of a file from some offset: data or hole, and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileRun {
    Data(u64),
    Hole(u64),
}

/// The run of `file` starting at byte `offset` (below `end`), clipped to
/// `end`. Without SEEK_DATA support the whole range counts as data.
pub(crate) fn run_at(file: &File, offset: u64, end: u64) -> FileRun {
    match lseek(file, offset, libc::SEEK_DATA) {
        Ok(None) => FileRun::Hole(end),
        Ok(Some(data)) if data > offset => FileRun::Hole(data.min(end)),
        Ok(Some(_)) => match lseek(file, offset, libc::SEEK_HOLE) {
            Ok(Some(hole)) if hole > offset => FileRun::Data(hole.min(end)),
            _ => FileRun::Data(end),
        },
        Err(_) => FileRun::Data(end),
    }
}

/// `lseek(2)`; None when there is no data (ENXIO) at or after `offset`.
fn lseek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek takes no pointers. It moves the descriptor's file
    // offset, which nothing here uses (all I/O is positioned).
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_between_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[1u8; 1 << 20], 2 << 20).unwrap();
        file.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(run_at(&file, 0, 8 << 20), FileRun::Hole(2 << 20));
        assert_eq!(run_at(&file, 2 << 20, 8 << 20), FileRun::Data(3 << 20));
        assert_eq!(run_at(&file, 3 << 20, 8 << 20), FileRun::Hole(8 << 20));
        assert_eq!(run_at(&file, 2 << 20, 5 << 19), FileRun::Data(5 << 19));
    }
}
