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
//! block (in memory under a mutex, from space the flusher thread reserves
//! ahead) and flushing VHD metadata (on a per-image flusher thread the
//! request waits for through the ring). Buffered whole-page writes are done
//! inline (faster than io_uring's io-wq punt; see `inline`): as a copy into
//! a shared mapping of the file for pages written since the last flush
//! (see `mapped`), as one system call otherwise, and complete through the
//! same queue.
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
//! - [`VhdxDisk`]: VHDX fixed, dynamic and differencing, 512 or 4096-byte
//!   logical sectors, metadata changes through the VHDX log (see [`vhdx`]).
//! - ISO 9660 ([`iso::open_iso`]): read-only media with 2048-byte blocks.
//! - NBD exports ([`nbd::NbdClient`]): `nbd://` and `nbd+unix://` URIs open
//!   as raw disks on another machine's server; a connection thread moves
//!   the data and completes requests into the worker's ring.
//!
//! Every backend also answers allocation queries
//! ([`BlockDevice::allocation`]: VHD block allocation, file holes, NBD block
//! status), which sparse copies and vspa's NBD server use.
//!
//! # Modules
//! [`format`](mod@format) holds the on-disk VHD structures, [`create`] makes images,
//! [`tool`] implements `vspa image` (info, convert, compare, check, merge),
//! [`fuzzing`] holds the fuzz harnesses (run by cargo-fuzz and by proptest).
//!
//! # Image ownership
//! Every open takes QEMU's image locks ([`lock`]): a read-write open keeps
//! every other writer (vspa or QEMU) and every consistent reader off the
//! image and refuses an image one of them holds; read-only opens, and the
//! parents of a differencing chain, take a reader's locks and share with
//! each other. The locks also wait out a dead writer's last io_uring writes.
//!
//! # Format safety
//! A guest must never change how its own image is read. [`open_by_name`],
//! the entry point for serving guests, takes the format from the file name
//! (`.vhd`/`.avhd` VHD, `.iso` ISO, anything else raw), never from content
//! a guest may have written; a file named as a VHD that is not a valid VHD
//! is refused, not served raw. [`open_by_content`] probes the content and
//! is for the `vspa image` tools only. A differencing disk's parents are
//! opened read-only and only from the directories [`ParentPolicy`] allows
//! (by default the child's own), never from its deny-list: the appliance
//! puts every other tenant's images in `DiskOptions::parents.denied`.
//!
//! Image files are untrusted: every field is validated on open and bad input
//! gives an [`ImageError`], never a panic.
//!
//! # Example: one worker's loop
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use vhd::{BlockDevice, Completion, DiskOptions, IoQueue, Op, Request};
//! let disk = vhd::open_by_name(std::path::Path::new("disk.vhd"), &DiskOptions::default())?;
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
mod flusher;
pub mod format;
pub mod fuzzing;
#[allow(unsafe_code)]
mod inline;
pub mod iso;
#[allow(unsafe_code)]
pub mod lock;
#[allow(unsafe_code)]
mod mapped;
pub mod nbd;
pub mod open;
#[allow(unsafe_code)]
pub mod queue;
pub mod raw;
#[allow(unsafe_code)]
mod remote;
#[allow(unsafe_code)]
mod seek;
#[allow(unsafe_code)]
pub mod sync;
pub mod tool;
#[allow(unsafe_code)]
pub mod trycopy;
pub mod vhd;
pub mod vhdx;

pub use device::{Allocation, BlockDevice, DeviceInfo, DeviceKind, Op, Request};
pub use error::{BlockError, ImageError};
pub use file::CacheMode;
pub use lock::{Access, ImageLock, LockConflict};
pub use open::{Format, detect_format, format_from_name, open_as, open_by_content, open_by_name};
pub use queue::{
    Completion, IoQueue, QueueConfig, QueueStats, RESTRICTED_OPCODES, RESTRICTED_SQE_FLAGS,
    SOCKET_OPCODES, restrict_new_rings, restricted_rings_available,
};
pub use raw::{DiskOptions, RawDisk};
pub use sync::BlockingIo;
pub use vhd::{ParentPolicy, VhdDisk, VhdMeta};
pub use vhdx::{VhdxDisk, VhdxMeta};
