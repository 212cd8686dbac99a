//! Image locks: the byte-range lock protocol of QEMU's file-posix driver,
//! so that vspa and QEMU (qemu-img, qemu-io, qemu-nbd,
//! qemu-storage-daemon, a running VM) keep each other off an image exactly
//! as two QEMU processes do, and two vspa processes do too.
//!
//! # Protocol
//! Every lock is an open-file-description (OFD) read lock (`F_OFD_SETLK`,
//! `F_RDLCK`) on one byte. Permission bits (QEMU's `BLK_PERM_*`): 0
//! consistent read, 1 write, 2 write-unchanged, 3 resize.
//! - An opener holds byte `100 + bit` for each permission it uses, and byte
//!   `200 + bit` for each permission it does not let others use.
//! - Then it tests, with `F_OFD_GETLK` for a write lock (which reports only
//!   other descriptions' locks): byte `100 + bit` for each permission it
//!   does not share (somebody uses it) and byte `200 + bit` for each
//!   permission it uses (somebody forbids it). Any hit is a conflict: it drops its
//!   bytes and fails (or retries, see below).
//!
//! Locking before testing means that of two openers racing, at least one
//! sees the other. vspa takes QEMU's sets for an image file under a format
//! driver:
//!
//! | open       | uses                | shares                | holds               | tests               |
//! |------------|---------------------|-----------------------|---------------------|---------------------|
//! | read-write | read, write, resize | read, write-unchanged | 100 101 103 201 203 | 101 103 200 201 203 |
//! | read-only  | read                | read, write-unchanged | 100 201 203         | 101 103 200         |
//!
//! So a writer excludes every other writer and every reader that wants a
//! consistent view (QEMU's own readers included, e.g. `qemu-img info`
//! without `-U`), readers share with each other, and `qemu-io -r` on a raw
//! file (which shares everything) can still read.
//!
//! # Dead writers
//! The locks belong to the data descriptor that io_uring uses. An OFD lock
//! lasts until the last reference to the description goes, and a ring holds
//! references (registered files, requests in flight) until its teardown has
//! finished every request. So after a writer dies, its locks stay until its
//! last write has landed; a new opener waits for that (up to the open's
//! lock wait) instead of reclaiming space that a late write still targets.
//! A file system without OFD locks gives a warning and no locking.

use crate::error::ImageError;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// First byte of the "uses permission" locks.
pub const PERM_BASE: u64 = 100;
/// First byte of the "does not share permission" locks.
pub const SHARED_BASE: u64 = 200;

/// A permission of QEMU's block layer, by its bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

const PERMS: [Perm; 4] = [
    Perm::ConsistentRead,
    Perm::Write,
    Perm::WriteUnchanged,
    Perm::Resize,
];

impl Perm {
    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent reads",
            Perm::Write => "writing",
            Perm::WriteUnchanged => "unchanging writes",
            Perm::Resize => "resizing",
        }
    }
}

/// How an image is opened, which decides the permissions it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

impl Access {
    /// Permissions used (bit mask).
    fn uses(self) -> u8 {
        match self {
            Access::ReadOnly => Perm::ConsistentRead.bit(),
            Access::ReadWrite => {
                Perm::ConsistentRead.bit() | Perm::Write.bit() | Perm::Resize.bit()
            }
        }
    }

    /// Permissions left to others (bit mask).
    fn shares(self) -> u8 {
        Perm::ConsistentRead.bit() | Perm::WriteUnchanged.bit()
    }

    /// The bytes an opener with this access holds.
    pub fn held_bytes(self) -> Vec<u64> {
        let uses = PERMS.iter().filter(|p| self.uses() & p.bit() != 0);
        let unshared = PERMS.iter().filter(|p| self.shares() & p.bit() == 0);
        uses.map(|&p| PERM_BASE + p as u64)
            .chain(unshared.map(|&p| SHARED_BASE + p as u64))
            .collect()
    }

    /// The bytes tested after locking, each with the conflict it reveals.
    fn tests(self) -> impl Iterator<Item = (u64, LockConflict)> {
        let uses = PERMS
            .into_iter()
            .filter(move |p| self.uses() & p.bit() != 0);
        let unshared = PERMS
            .into_iter()
            .filter(move |p| self.shares() & p.bit() == 0);
        // Users first: "in use for writing" is the clearer message when a
        // writer holds both kinds.
        unshared
            .map(|p| (PERM_BASE + p as u64, LockConflict::InUse(p)))
            .chain(uses.map(|p| (SHARED_BASE + p as u64, LockConflict::Forbidden(p))))
    }
}

/// Why another process's locks keep an open out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockConflict {
    /// It uses a permission this open does not share (holds `100 + bit`).
    InUse(Perm),
    /// It does not share a permission this open needs (holds `200 + bit`).
    Forbidden(Perm),
}

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockConflict::InUse(p) => write!(f, "in use by another process for {}", p.name()),
            LockConflict::Forbidden(p) => write!(
                f,
                "open in another process that does not allow {} by others",
                p.name()
            ),
        }
    }
}

/// Outcome of one locking attempt that did not succeed.
enum Failure {
    Conflict(LockConflict),
    /// The file system has no OFD locks.
    Unsupported(std::io::Error),
    Os(std::io::Error),
}

/// Locks `file` (a descriptor of `path`) for `access`, retrying for up to
/// `wait` while another process holds conflicting locks.
pub(crate) fn lock(
    file: &File,
    path: &Path,
    access: Access,
    wait: Duration,
) -> Result<(), ImageError> {
    let deadline = Instant::now() + wait;
    loop {
        match try_lock(file, access) {
            Ok(()) => return Ok(()),
            Err(Failure::Conflict(conflict)) => {
                unlock(file);
                if Instant::now() >= deadline {
                    return Err(ImageError::Locked {
                        path: path.to_path_buf(),
                        conflict,
                    });
                }
                // Jittered, so two openers that saw each other part ways.
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() % 10_000_000);
                std::thread::sleep(Duration::from_millis(5) + Duration::from_nanos(jitter.into()));
            }
            Err(Failure::Unsupported(e)) => {
                unlock(file);
                tracing::warn!(path = %path.display(), "image locking unavailable, going on unlocked: {e}");
                return Ok(());
            }
            Err(Failure::Os(e)) => {
                unlock(file);
                return Err(ImageError::io(path, e));
            }
        }
    }
}

fn try_lock(file: &File, access: Access) -> Result<(), Failure> {
    for byte in access.held_bytes() {
        set_lock(file, byte, libc::F_RDLCK as i16).map_err(|e| match e.raw_os_error() {
            // Someone holds a write lock there: not QEMU's protocol, but a
            // conflict all the same.
            Some(libc::EAGAIN | libc::EACCES) => Failure::Conflict(conflict_at(byte)),
            _ => classify(e),
        })?;
    }
    for (byte, conflict) in access.tests() {
        if held_by_others(file, byte).map_err(classify)? {
            return Err(Failure::Conflict(conflict));
        }
    }
    Ok(())
}

fn classify(e: std::io::Error) -> Failure {
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => {
            Failure::Unsupported(e)
        }
        _ => Failure::Os(e),
    }
}

/// The conflict a foreign write lock on `byte` stands for.
fn conflict_at(byte: u64) -> LockConflict {
    let perm = PERMS[(byte % 100) as usize % PERMS.len()];
    if byte >= SHARED_BASE {
        LockConflict::Forbidden(perm)
    } else {
        LockConflict::InUse(perm)
    }
}

/// Drops every lock byte of the protocol held through `file`.
fn unlock(file: &File) {
    let _ = fcntl_lock(
        file,
        libc::F_OFD_SETLK,
        PERM_BASE,
        SHARED_BASE + PERMS.len() as u64 - PERM_BASE,
        libc::F_UNLCK as i16,
    );
}

fn set_lock(file: &File, byte: u64, kind: i16) -> std::io::Result<libc::flock> {
    fcntl_lock(file, libc::F_OFD_SETLK, byte, 1, kind)
}

/// True when another open file description holds a lock on `byte`.
fn held_by_others(file: &File, byte: u64) -> std::io::Result<bool> {
    let answer = fcntl_lock(file, libc::F_OFD_GETLK, byte, 1, libc::F_WRLCK as i16)?;
    Ok(answer.l_type != libc::F_UNLCK as i16)
}

fn fcntl_lock(
    file: &File,
    cmd: i32,
    start: u64,
    len: u64,
    kind: i16,
) -> std::io::Result<libc::flock> {
    // SAFETY: flock is plain old data; all-zero is a valid value (and OFD
    // locks require l_pid to be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    loop {
        // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and GETLK writes) one
        // struct flock through the pointer, which points at a live local.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
        if rc == 0 {
            return Ok(fl);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Image locks held through a descriptor of their own, for as long as the
/// value lives: for tools and tests that must keep others off an image (or
/// wait until nobody holds it) without opening it as a disk.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

impl ImageLock {
    /// Takes `access`'s locks on `path`, waiting up to `wait`.
    pub fn acquire(path: &Path, access: Access, wait: Duration) -> Result<ImageLock, ImageError> {
        let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        lock(&file, path, access, wait)?;
        Ok(ImageLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes 0..300 that another description sees locked.
    fn locked_bytes(path: &Path) -> Vec<u64> {
        let probe = File::open(path).unwrap();
        (0..300)
            .filter(|&b| held_by_others(&probe, b).unwrap())
            .collect()
    }

    /// The bytes match QEMU's for a format driver's file: a writer
    /// (qemu-io -f vpc) holds 100 101 103 201 203, a reader 100 201 203.
    #[test]
    fn held_bytes_are_qemus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let wait = Duration::ZERO;
        {
            let _w = ImageLock::acquire(&path, Access::ReadWrite, wait).unwrap();
            assert_eq!(locked_bytes(&path), [100, 101, 103, 201, 203]);
        }
        assert_eq!(locked_bytes(&path), Vec::<u64>::new());
        let _r = ImageLock::acquire(&path, Access::ReadOnly, wait).unwrap();
        assert_eq!(locked_bytes(&path), [100, 201, 203]);
    }

    /// Readers share; a writer excludes readers and writers, whichever
    /// came first; a failed attempt leaves no bytes behind.
    #[test]
    fn conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let wait = Duration::ZERO;
        let take = |a| ImageLock::acquire(&path, a, wait);
        let conflict = |r: Result<ImageLock, ImageError>| match r {
            Err(ImageError::Locked { conflict, .. }) => conflict,
            other => panic!("expected a lock conflict, got {other:?}"),
        };
        let r1 = take(Access::ReadOnly).unwrap();
        let r2 = take(Access::ReadOnly).unwrap();
        assert_eq!(
            conflict(take(Access::ReadWrite)),
            LockConflict::Forbidden(Perm::Write)
        );
        drop((r1, r2));
        let w = take(Access::ReadWrite).unwrap();
        assert_eq!(
            conflict(take(Access::ReadOnly)),
            LockConflict::InUse(Perm::Write)
        );
        assert_eq!(
            conflict(take(Access::ReadWrite)),
            LockConflict::InUse(Perm::Write)
        );
        assert_eq!(locked_bytes(&path), [100, 101, 103, 201, 203]);
        drop(w);
        take(Access::ReadWrite).unwrap();
    }

    #[test]
    fn messages() {
        let e = ImageError::Locked {
            path: "/x/a.img".into(),
            conflict: LockConflict::InUse(Perm::Write),
        };
        assert_eq!(
            e.to_string(),
            "image /x/a.img is in use by another process for writing (lock held)"
        );
    }
}
