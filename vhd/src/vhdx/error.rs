//! Why a VHDX image was refused: one variant per kind of damage, each
//! naming the structure and what is wrong with it.

use super::format::Guid;

#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    #[error("not a VHDX file: no \"vhdxfile\" signature at offset 0")]
    NoSignature,
    #[error("VHDX file is too small ({0} bytes) to hold its header section")]
    TooSmall(u64),
    #[error("both VHDX headers are damaged (64 KiB: {first}; 128 KiB: {second})")]
    NoValidHeader { first: String, second: String },
    #[error("the two VHDX headers have the same sequence number {0} but differ")]
    AmbiguousHeaders(u64),
    #[error("VHDX header: {0}")]
    BadHeader(String),
    #[error("both VHDX region tables are damaged (192 KiB: {first}; 256 KiB: {second})")]
    NoValidRegionTable { first: String, second: String },
    #[error("VHDX region {what}: {reason}")]
    BadRegion { what: String, reason: String },
    #[error("VHDX {first} (offset {first_offset}) overlaps {second} (offset {second_offset})")]
    Overlap {
        first: String,
        first_offset: u64,
        second: String,
        second_offset: u64,
    },
    #[error("VHDX region table lacks the {0} region")]
    MissingRegion(&'static str),
    #[error("VHDX {what} {guid} is marked required but is not known to this implementation")]
    UnknownRequired { what: &'static str, guid: Guid },
    #[error("VHDX metadata: {0}")]
    BadMetadata(String),
    #[error("VHDX block size {0} is not a power of two between 1 MiB and 256 MiB")]
    BadBlockSize(u32),
    #[error("VHDX {which} sector size {value} is neither 512 nor 4096")]
    BadSectorSize { which: &'static str, value: u32 },
    #[error(
        "VHDX virtual size {size} is zero, not a multiple of the {sector}-byte sector or above 64 TiB"
    )]
    BadVirtualSize { size: u64, sector: u32 },
    #[error("VHDX needs {0} BAT entries, more than this implementation accepts")]
    TooManyBlocks(u64),
    #[error("VHDX BAT region holds {have} entries, the disk needs {needed}")]
    BatTooSmall { needed: u64, have: u64 },
    #[error("VHDX BAT entry {index}: {reason}")]
    BadBatEntry { index: u64, reason: String },
    #[error("VHDX log: {0}")]
    BadLog(String),
    #[error(
        "VHDX log holds entries that must be replayed and {0}; open the image read-write once (e.g. `vspa image check --repair`) to replay it"
    )]
    LogNeedsWrite(String),
    #[error("VHDX parent locator: {0}")]
    BadLocator(String),
    #[error("VHDX parent {parent} has data write GUID {found}; the child was made from {expected}")]
    ParentLinkMismatch {
        parent: std::path::PathBuf,
        expected: String,
        found: String,
    },
    #[error("VHDX parent {parent} does not match the child: {reason}")]
    ParentMismatch {
        parent: std::path::PathBuf,
        reason: String,
    },
}
