//! Typed errors: [`ImageError`] for opening, creating and inspecting images,
//! [`BlockError`] for requests on the data path.

use std::path::PathBuf;

/// Why an image could not be opened, created or changed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file is too small ({len} bytes) to hold a {what}")]
    TooSmall { what: &'static str, len: u64 },
    #[error("bad {structure} cookie")]
    BadCookie { structure: &'static str },
    #[error("{structure} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        structure: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("unsupported {structure} version {version:#010x}")]
    BadVersion {
        structure: &'static str,
        version: u32,
    },
    #[error("unsupported VHD disk type {0}")]
    UnsupportedDiskType(u32),
    #[error("footer at the end of the file and its copy at offset 0 are both damaged")]
    NoValidFooter,
    #[error("block size {0} is not a power of two between 512 bytes and 256 MiB")]
    BadBlockSize(u32),
    #[error(
        "virtual size {0} bytes is not a whole number of sectors, or is zero, or exceeds the format's limit"
    )]
    BadVirtualSize(u64),
    #[error("image needs {0} blocks, more than this implementation accepts")]
    TooManyBlocks(u64),
    #[error(
        "BAT with {entries} entries of {block_size} bytes does not cover the virtual size {size}"
    )]
    BatTooSmall {
        entries: u32,
        block_size: u32,
        size: u64,
    },
    #[error("{what} at offset {offset} (+{len} bytes) lies outside the file ({file_len} bytes)")]
    OutsideFile {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("{what} at offset {offset} overlaps {other}")]
    MetadataOverlap {
        what: &'static str,
        offset: u64,
        other: &'static str,
    },
    #[error("BAT entry {index} (sector {sector}) points past the end of the file")]
    BlockPastEof { index: u32, sector: u32 },
    #[error("BAT entry {index} (sector {sector}) overlaps the image metadata")]
    BlockOverlapsMetadata { index: u32, sector: u32 },
    #[error("BAT entries {first} and {second} overlap")]
    BlocksOverlap { first: u32, second: u32 },
    #[error("differencing disk names no usable parent locator")]
    NoParentLocator,
    #[error("parent locator {code} is malformed: {reason}")]
    BadLocator { code: String, reason: &'static str },
    #[error("parent of {child} not found (tried: {tried})")]
    ParentNotFound { child: PathBuf, tried: String },
    #[error("parent {parent} has unique id {found}, child expects {expected}")]
    ParentIdMismatch {
        parent: PathBuf,
        expected: String,
        found: String,
    },
    #[error("parent {parent} has virtual size {parent_size}, child has {child_size}")]
    ParentSizeMismatch {
        parent: PathBuf,
        parent_size: u64,
        child_size: u64,
    },
    #[error("parent chain is deeper than {0} images")]
    ChainTooDeep(usize),
    #[error("parent chain has a cycle through {0}")]
    ParentCycle(PathBuf),
    #[error("not an ISO 9660 image: {0}")]
    NotIso(&'static str),
    #[error("bad ISO 9660 primary volume descriptor: {0}")]
    BadIso(&'static str),
    #[error("unrecognised image format")]
    UnknownFormat,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("image is read-only")]
    ReadOnly,
    #[error("image {path} is {conflict} (lock held)")]
    Locked {
        path: PathBuf,
        conflict: crate::lock::LockConflict,
    },
    #[error(
        "{path}: its name says {format} but it is not a valid {format} image ({source}); it is not served as raw either (set format = \"raw\" to serve its bytes as they are)"
    )]
    NotAsNamed {
        path: PathBuf,
        format: &'static str,
        #[source]
        source: Box<ImageError>,
    },
    #[error("{path}: {format} images are not supported")]
    UnsupportedFormat { path: PathBuf, format: &'static str },
    #[error(
        "parent {parent} of {child} is outside the directories parents may come from ({allowed}); list its directory in the LUN's parent_dirs to allow it"
    )]
    ParentNotAllowed {
        child: PathBuf,
        parent: PathBuf,
        allowed: String,
    },
    #[error(
        "parent {parent} of {child} is a disk this image may not use as a parent (another tenant's, or denied by the configuration)"
    )]
    ParentDenied { child: PathBuf, parent: PathBuf },
    #[error("request failed: {0}")]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vhdx(Box<crate::vhdx::VhdxError>),
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdError),
}

impl From<crate::vhdx::VhdxError> for ImageError {
    fn from(e: crate::vhdx::VhdxError) -> Self {
        ImageError::Vhdx(Box::new(e))
    }
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Why a request failed: either rejected at submission (bad range, read-only,
/// metadata failure) or completed with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("request of {blocks} blocks at block {offset} exceeds the device ({capacity} blocks)")]
    OutOfRange {
        offset: u64,
        blocks: u32,
        capacity: u64,
    },
    #[error("scatter-gather list holds {actual} bytes, request needs {expected}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("device is read-only")]
    ReadOnly,
    #[error("request of {0} bytes exceeds the 4 GiB limit of one request")]
    TooLarge(u64),
    #[error("device does not support discard")]
    DiscardUnsupported,
    #[error("no free request slot in the queue")]
    QueueFull,
    #[error("user tag {0:#x} uses the reserved top bit")]
    BadTag(u64),
    #[error("I/O error (errno {0})")]
    Os(i32),
    #[error("short transfer: {done} of {expected} bytes")]
    ShortTransfer { done: u64, expected: u64 },
    #[error("image metadata error: {0}")]
    Metadata(String),
}

impl BlockError {
    pub(crate) fn from_io(err: &std::io::Error) -> Self {
        BlockError::Os(err.raw_os_error().unwrap_or(libc::EIO))
    }
}
