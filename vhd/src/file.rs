//! Backing files: opening with or without O_DIRECT (detected per file), size
//! of regular files and block devices, metadata I/O, discard ioctls.
//!
//! Each [`IoFile`] holds two descriptors on the same file: `data` (O_DIRECT
//! when the backing supports it and the cache mode asks for it) used by
//! io_uring for guest data, and `meta`, always buffered, used for the small
//! synchronous metadata reads (headers, BAT, bitmaps) whose buffers are not
//! aligned. Metadata writes use the data descriptor when it is O_DIRECT (see
//! [`IoFile::write_all_at`]), so no dirty page cache page ever shadows data
//! written directly.
//!
//! Opening takes the image locks (QEMU's protocol, see [`crate::lock`]) on
//! the data descriptor, read-only or read-write as opened.

use crate::error::ImageError;
use crate::lock::{self, Access};
use crate::mapped::Mapping;
use crate::raw::DiskOptions;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

/// How data I/O uses the host page cache (`direct`, `cached` or `mapped`
/// in configuration files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT where the backing supports it at 512-byte granularity;
    /// buffered otherwise (e.g. tmpfs). The default for guests.
    #[default]
    Direct,
    /// Always through the page cache (benchmarks, tools).
    Cached,
    /// Through the page cache like `Cached`, with rewrites of pages written
    /// since the file's last flush done as stores into a shared mapping of
    /// the file instead of `pwritev` (no system call: 1.5-3x the random
    /// write rate; see [`crate::mapped`]). The price: a write in flight
    /// when the vspa process is killed may be left torn inside a sector
    /// (its start new, the rest old, cut at 32 bytes on this project's
    /// hosts), where `Cached` leaves each page old or new. Data flushed
    /// before is never affected.
    Mapped,
}

/// Process-wide counter giving every opened file a unique id, the key of
/// each queue's registered-file table (fd numbers can be reused).
static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);
/// Count of files closed so far: queues sweep their registered-file tables
/// when it moves.
static DROPPED_FILES: AtomicU64 = AtomicU64::new(0);

pub(crate) fn dropped_files() -> u64 {
    DROPPED_FILES.load(Ordering::Acquire)
}

// From <linux/fs.h>: _IOR(0x12, 114, size_t) and _IO(0x12, 119).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;

/// One backing file.
#[derive(Debug)]
pub struct IoFile {
    pub(crate) data: File,
    pub(crate) meta: File,
    pub(crate) id: u64,
    pub(crate) path: PathBuf,
    /// Data descriptor is O_DIRECT.
    pub(crate) direct: bool,
    /// Memory alignment O_DIRECT needs for buffers (1 when buffered).
    pub(crate) mem_align: usize,
    pub(crate) writable: bool,
    pub(crate) block_device: bool,
    /// Cleared on drop; queues holding the file registered check it.
    pub(crate) alive: Arc<AtomicBool>,
    /// Whether buffered writes take `RWF_NOWAIT` (see [`crate::inline`]).
    pub(crate) nowait_writes: AtomicU8,
    /// The cache mode asked for at open.
    pub(crate) cache: CacheMode,
    /// Shared mapping for inline writes (see [`crate::mapped`]): cache
    /// mode `mapped`, writable regular files only.
    pub(crate) mapping: Option<Mapping>,
}

impl Drop for IoFile {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        DROPPED_FILES.fetch_add(1, Ordering::AcqRel);
    }
}

impl IoFile {
    /// Opens `path`, read-write or read-only, with the cache mode's policy,
    /// and takes the image locks for that access (see [`crate::lock`]),
    /// waiting up to [`LOCK_WAIT`] for another holder to go.
    pub fn open(path: &Path, writable: bool, cache: CacheMode) -> Result<IoFile, ImageError> {
        IoFile::open_with(path, writable, cache, LOCK_WAIT)
    }

    /// [`IoFile::open`] with a chosen wait for the image locks.
    pub fn open_with(
        path: &Path,
        writable: bool,
        cache: CacheMode,
        lock_wait: std::time::Duration,
    ) -> Result<IoFile, ImageError> {
        IoFile::open_inner(path, writable, cache, Some(lock_wait))
    }

    /// Opens a file of an image as `options` say: its cache mode, its lock
    /// wait, and no locks at all under `force_share`.
    pub fn open_image(
        path: &Path,
        writable: bool,
        options: &DiskOptions,
    ) -> Result<IoFile, ImageError> {
        if options.force_share && writable {
            return Err(ImageError::InvalidArgument(
                "force_share is for read-only opens".into(),
            ));
        }
        let wait = (!options.force_share && !options.unlocked).then_some(options.lock_wait);
        IoFile::open_inner(path, writable, options.cache, wait)
    }

    /// Opens read-only without image locks, to look at a few bytes (format
    /// probes): the open that serves the image takes the locks.
    pub fn open_unlocked(path: &Path) -> Result<IoFile, ImageError> {
        IoFile::open_inner(path, false, CacheMode::Cached, None)
    }

    fn open_inner(
        path: &Path,
        writable: bool,
        cache: CacheMode,
        lock_wait: Option<std::time::Duration>,
    ) -> Result<IoFile, ImageError> {
        let meta = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| ImageError::io(path, e))?;
        let block_device = meta
            .metadata()
            .map_err(|e| ImageError::io(path, e))?
            .file_type()
            .is_block_device();
        let (data, direct, mem_align) = match cache {
            CacheMode::Cached | CacheMode::Mapped => (
                meta.try_clone().map_err(|e| ImageError::io(path, e))?,
                false,
                1,
            ),
            CacheMode::Direct => match open_direct(path, writable) {
                Some((file, align)) => (file, true, align),
                None => (
                    meta.try_clone().map_err(|e| ImageError::io(path, e))?,
                    false,
                    1,
                ),
            },
        };
        if let Some(wait) = lock_wait {
            // On the descriptor io_uring uses: see `lock` on dead writers.
            let access = if writable {
                Access::ReadWrite
            } else {
                Access::ReadOnly
            };
            lock::lock(&data, path, access, wait)?;
        }
        let mapping = if cache == CacheMode::Mapped && writable && !direct && !block_device {
            crate::trycopy::install();
            let len = meta.metadata().map_err(|e| ImageError::io(path, e))?.len();
            Mapping::new(data.as_fd(), len)
        } else {
            None
        };
        Ok(IoFile {
            mapping,
            cache,
            data,
            meta,
            id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            direct,
            mem_align,
            writable,
            block_device,
            alive: Arc::new(AtomicBool::new(true)),
            nowait_writes: AtomicU8::new(crate::inline::nowait::UNKNOWN),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn data_fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    /// Size in bytes: the file length, or BLKGETSIZE64 for a block device.
    pub fn len(&self) -> Result<u64, ImageError> {
        if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local of that type.
            let rc = unsafe { libc::ioctl(self.meta.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if rc < 0 {
                return Err(ImageError::io(&self.path, std::io::Error::last_os_error()));
            }
            Ok(size)
        } else {
            Ok(self
                .meta
                .metadata()
                .map_err(|e| ImageError::io(&self.path, e))?
                .len())
        }
    }

    pub fn is_empty(&self) -> Result<bool, ImageError> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (metadata path).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        use std::os::unix::fs::FileExt;
        self.meta
            .read_exact_at(buf, offset)
            .map_err(|e| ImageError::io(&self.path, e))
    }

    /// Writes all of `buf` at `offset` (metadata path).
    ///
    /// With O_DIRECT data I/O, metadata writes go O_DIRECT too (through an
    /// aligned copy): a buffered write would leave a dirty page cache page
    /// that may also cover data sectors (a block's bitmap shares a page with
    /// its first sectors), and its later writeback could overwrite a
    /// concurrent direct data write with stale bytes.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        use std::os::unix::fs::FileExt;
        let sector_aligned = offset.is_multiple_of(512) && buf.len().is_multiple_of(512);
        let result = if self.direct && sector_aligned {
            let mut storage = vec![0u8; buf.len() + 4096];
            let skip = storage.as_ptr().align_offset(4096);
            let aligned = &mut storage[skip..skip + buf.len()];
            aligned.copy_from_slice(buf);
            self.data.write_all_at(aligned, offset)
        } else {
            self.meta.write_all_at(buf, offset)
        };
        result.map_err(|e| ImageError::io(&self.path, e))
    }

    /// fdatasync: data (and the metadata needed to read it) is durable.
    pub fn sync_data(&self) -> Result<(), ImageError> {
        self.flushing();
        self.meta
            .sync_data()
            .map_err(|e| ImageError::io(&self.path, e))
    }

    /// A flush of the file is being issued: pages written through the
    /// mapping from now on must be written with `pwritev` first.
    pub(crate) fn flushing(&self) {
        if let Some(map) = &self.mapping {
            map.flushed();
        }
    }

    pub fn set_len(&self, len: u64) -> Result<(), ImageError> {
        self.meta
            .set_len(len)
            .map_err(|e| ImageError::io(&self.path, e))
    }

    /// Discards a byte range of a host block device (BLKDISCARD).
    pub(crate) fn blk_discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer,
        // which points at a live local array of exactly that shape.
        let rc = unsafe { libc::ioctl(self.meta.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A stable 16-byte id derived from the file's device and inode.
    pub fn derived_id(&self) -> [u8; 16] {
        let (dev, ino) = self
            .meta
            .metadata()
            .map(|m| (if self.block_device { m.rdev() } else { m.dev() }, m.ino()))
            .unwrap_or((0, 0));
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&dev.to_le_bytes());
        bytes.extend_from_slice(&ino.to_le_bytes());
        derive_id(&bytes)
    }
}

/// How long an open waits by default for conflicting image locks to go
/// (a dead writer's last io_uring writes, an old LUN being let go).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// 16 bytes from two FNV-1a 64 hashes with different offset bases; stable
/// across runs and versions (it names disks to guests).
pub fn derive_id(data: &[u8]) -> [u8; 16] {
    let fnv = |basis: u64| {
        data.iter().fold(basis, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_be_bytes());
    id[8..].copy_from_slice(&fnv(0x6c62_272e_07bb_0142).to_be_bytes());
    id
}

/// Opens with O_DIRECT if the backing supports it at 512-byte file offsets;
/// returns the file and the memory alignment it needs.
fn open_direct(path: &Path, writable: bool) -> Option<(File, usize)> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let (mem_align, offset_align) = dio_alignment(&file)?;
    if offset_align == 0 || offset_align > 512 || mem_align == 0 || mem_align > 4096 {
        return None;
    }
    Some((file, mem_align as usize))
}

/// (memory, offset) alignment for O_DIRECT from statx; None if unknown.
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string used with
    // AT_EMPTY_PATH on a live fd, and `stx` is a writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Fills `buf` from the kernel's random pool with getrandom(2): no file to
/// open, so new image and session GUIDs work inside the sandbox, where
/// `/dev/urandom` is not reachable.
pub(crate) fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`,
        // which is valid, writable memory of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}
