//! Disk image backends behind one async block interface, on io_uring.
//!
//! # Place in the data path
//! ```text
//! storage VSP worker --Request{op, offset, blocks, iovecs into guest memory, tag}-->
//!     BlockDevice::submit  (map blocks onto files of the image; push SQEs)
//!     IoQueue::submit      (one io_uring_enter per poll-loop iteration)
//!     IoQueue::reap        (CQEs -> one Completion{tag, result} per request)
//! ```
//! Every worker owns one [`IoQueue`] (one io_uring, a fixed slab of request
//! slots, registered files, optionally registered memory such as guest RAM
//! for READ/WRITE_FIXED). Devices are `Arc<dyn BlockDevice>` shared by all
//! workers; mapping a request only reads atomics (the VHD BAT), so workers
//! never contend on the data path. No request allocates, locks or copies in
//! the steady state; the exceptions are metadata work: allocating a VHD
//! block (under a mutex, synchronous) and flushing VHD metadata (on a
//! per-image flusher thread the request waits for through the ring).
//!
//! # Backends
//! - [`RawDisk`]: a raw file or host block device, O_DIRECT when the backing
//!   supports it (bounce buffers for unaligned caller memory), discard as
//!   hole punch or BLKDISCARD.
//! - [`VhdDisk`]: VHD fixed, dynamic and differencing (with its read-only
//!   parent chain). See [`vhd`] for the crash-safe allocation scheme.
//!   Discard punches the data of fixed disks and of allocated dynamic
//!   blocks (blocks stay allocated: the format cannot free them); a
//!   differencing disk does not offer it.
//! - ISO 9660 ([`iso::open_iso`]): read-only media with 2048-byte blocks.
//!
//! # Modules
//! [`format`](mod@format) holds the on-disk VHD structures, [`create`] makes images,
//! [`tool`] implements `vspa image` (info, convert, compare, check, merge),
//! [`fuzzing`] holds the fuzz harnesses (run by cargo-fuzz and by proptest).
//!
//! A read-write open takes an exclusive lock on the image (waiting out a
//! dead writer's last io_uring writes, see [`file`](mod@file)); parents and
//! read-only opens take none.
//!
//! Image files are untrusted: every field is validated on open and bad input
//! gives an [`ImageError`], never a panic.
//!
//! # Example: one worker's loop
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use vhd::{BlockDevice, Completion, DiskOptions, IoQueue, Op, Request};
//! let disk = vhd::open(std::path::Path::new("disk.vhd"), &DiskOptions::default())?;
//! let mut queue = IoQueue::new(64)?;
//! let mut buf = vec![0u8; 4096];
//! let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
//! // SAFETY: `buf` is left alone until the completion is reaped below.
//! disk.submit(&mut queue, unsafe { Request::new(Op::Read, 0, 8, &iov, 1) })?;
//! let mut done = false;
//! while !done {
//!     queue.submit_and_wait()?; // one io_uring_enter for all pushed SQEs
//!     queue.reap(|c| {
//!         if let Completion::Request { tag: 1, result } = c {
//!             assert_eq!(result, Ok(4096));
//!             done = true;
//!         }
//!     });
//! }
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

pub mod create;
pub mod device;
pub mod error;
#[allow(unsafe_code)]
pub mod file;
pub mod format;
pub mod fuzzing;
pub mod iso;
pub mod open;
#[allow(unsafe_code)]
pub mod queue;
pub mod raw;
#[allow(unsafe_code)]
pub mod sync;
pub mod tool;
pub mod vhd;

pub use device::{BlockDevice, DeviceInfo, DeviceKind, Op, Request};
pub use error::{BlockError, ImageError};
pub use file::CacheMode;
pub use open::{Format, detect_format, open, open_as};
pub use queue::{
    Completion, IoQueue, QueueConfig, QueueStats, RESTRICTED_OPCODES, RESTRICTED_SQE_FLAGS,
    restrict_new_rings, restricted_rings_available,
};
pub use raw::{DiskOptions, RawDisk};
pub use sync::BlockingIo;
pub use vhd::{VhdDisk, VhdMeta};
