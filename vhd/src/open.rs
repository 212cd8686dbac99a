//! Opening any image by format, with detection.

use crate::device::BlockDevice;
use crate::error::ImageError;
use crate::file::{CacheMode, IoFile};
use crate::format::{FOOTER_COOKIE, FOOTER_SIZE};
use crate::iso::{ISO_BLOCK, open_iso};
use crate::raw::{DiskOptions, RawDisk};
use crate::vhd::VhdDisk;
use std::path::Path;
use std::sync::Arc;

/// Image formats (lower-case names in configuration files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Vhd,
    Iso,
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Iso => "iso",
            Format::Vhdx => "vhdx",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, ImageError> {
        match s {
            "raw" => Ok(Format::Raw),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "iso" => Ok(Format::Iso),
            "vhdx" => Ok(Format::Vhdx),
            other => Err(ImageError::InvalidArgument(format!(
                "unknown format {other:?}"
            ))),
        }
    }
}

/// Guesses the format: "vhdxfile" at offset 0 is a VHDX; a "conectix"
/// cookie at the end (or, for a damaged dynamic disk, at offset 0) is a VHD;
/// "CD001" at sector 16 of 2048 an ISO; anything else raw. An NBD URI is a
/// raw disk (the server's export).
pub fn detect_format(path: &Path) -> Result<Format, ImageError> {
    if crate::nbd::is_uri(path) {
        return Ok(Format::Raw);
    }
    let file = IoFile::open(path, false, CacheMode::Cached)?;
    let len = file.len()?;
    let mut cookie = [0u8; 8];
    if len >= 8 {
        file.read_exact_at(&mut cookie, 0)?;
        if &cookie == crate::vhdx::format::FILE_SIGNATURE {
            return Ok(Format::Vhdx);
        }
    }
    if len >= FOOTER_SIZE as u64 {
        file.read_exact_at(&mut cookie, (len - FOOTER_SIZE as u64) / 512 * 512)?;
        if &cookie == FOOTER_COOKIE {
            return Ok(Format::Vhd);
        }
        file.read_exact_at(&mut cookie, 0)?;
        if &cookie == FOOTER_COOKIE {
            return Ok(Format::Vhd);
        }
    }
    if len >= 17 * ISO_BLOCK {
        let mut id = [0u8; 6];
        file.read_exact_at(&mut id, 16 * ISO_BLOCK)?;
        if &id[1..6] == b"CD001" {
            return Ok(Format::Iso);
        }
    }
    Ok(Format::Raw)
}

/// Opens an image of a known format as a shareable block device. An NBD
/// URI (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`) opens
/// the export as a raw disk through [`crate::nbd::NbdClient`].
pub fn open_as(
    path: &Path,
    format: Format,
    options: &DiskOptions,
) -> Result<Arc<dyn BlockDevice>, ImageError> {
    if crate::nbd::is_uri(path) {
        return match format {
            Format::Raw => crate::nbd::client::open_path(path, options.read_only),
            other => Err(ImageError::InvalidArgument(format!(
                "an NBD export is a raw disk, not {}",
                other.name()
            ))),
        };
    }
    Ok(match format {
        Format::Raw => Arc::new(RawDisk::open(path, options)?),
        Format::Vhd => Arc::new(VhdDisk::open(path, options)?),
        Format::Iso => Arc::new(open_iso(path, options)?.0),
        Format::Vhdx => Arc::new(crate::vhdx::VhdxDisk::open(path, options)?),
    })
}

/// Opens an image (or an NBD URI), detecting its format. A file named
/// `.vhdx` that holds no VHDX signature is refused rather than served raw:
/// a damaged VHDX must not reach a guest as a raw disk whose writes would
/// destroy it.
pub fn open(path: &Path, options: &DiskOptions) -> Result<Arc<dyn BlockDevice>, ImageError> {
    let format = detect_format(path)?;
    check_named_format(path, format)?;
    open_as(path, format, options)
}

/// Refuses a file named `.vhdx` that detection did not find to be one.
pub(crate) fn check_named_format(path: &Path, format: Format) -> Result<(), ImageError> {
    let named_vhdx = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vhdx"));
    if named_vhdx && format != Format::Vhdx {
        return Err(crate::vhdx::VhdxError::NoSignature.into());
    }
    Ok(())
}
