//! Opening an image: which format it is read as.
//!
//! Two entry points, for two kinds of caller:
//! - [`open_by_name`] serves guests (storage LUNs, virtio-blk). Under
//!   `format = "auto"` the format comes from the file name
//!   ([`format_from_name`]), never from the file's content, because a guest
//!   writes the content of its own raw disk: if content chose the format, a
//!   guest could write a VHD footer (and a differencing header whose parent
//!   locators name any path) into its raw disk and, after a restart, be
//!   served a different disk. Content is used only to check: a file named
//!   as a VHD or ISO that is not a valid one is refused (never served raw),
//!   and a file named as raw that carries VHD structures is served raw, as
//!   named, with a warning.
//!
//!   So a file that carries VHD structures but is not a valid VHD (both
//!   footers destroyed, dynamic header intact) is refused when named
//!   `.vhd`, the case of a damaged operator image. The same holds for VHDX:
//!   a `.vhdx` without the VHDX signature and valid headers is refused. Named as raw it is served
//!   raw: such content is exactly what a guest may write into its raw disk,
//!   and refusing it would let the guest make its own disk unservable after
//!   a restart and break "it reads back what it wrote".
//! - [`open_by_content`] serves the `vspa image` tools, which probe the
//!   content ([`detect_format`]) for convenience: they act for the operator
//!   on a file the operator names, and serve no guest. Their probe takes a
//!   dynamic header at offset 512 as a VHD, so they report a VHD with both
//!   footers destroyed as damaged rather than calling it raw.
//!
//! [`open_as`] opens a format chosen explicitly (`format = "vhd"` etc.).
//! An NBD URI (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`)
//! is always a raw disk: the server's export.

use crate::device::BlockDevice;
use crate::error::ImageError;
use crate::file::IoFile;
use crate::format::{DYN_COOKIE, FOOTER_COOKIE, FOOTER_SIZE};
use crate::iso::{ISO_BLOCK, IsoMeta, open_iso};
use crate::raw::{DiskOptions, RawDisk};
use crate::vhd::{VhdDisk, VhdMeta};
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

/// The format a file's name gives it (its extension, case-insensitive):
/// `.vhd`/`.avhd` VHD, `.vhdx`/`.avhdx` VHDX, `.iso` ISO 9660, anything else
/// (block devices, `.img`, `.raw`, no extension, NBD URIs) raw.
pub fn format_from_name(path: &Path) -> Result<Format, ImageError> {
    if crate::nbd::is_uri(path) {
        return Ok(Format::Raw);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("vhd" | "avhd") => Ok(Format::Vhd),
        Some("vhdx" | "avhdx") => Ok(Format::Vhdx),
        Some("iso") => Ok(Format::Iso),
        _ => Ok(Format::Raw),
    }
}

/// Probes the content (tools only, see the module docs): "vhdxfile" at
/// offset 0 is a VHDX; a "conectix" footer at the end or at offset 0, or a
/// "cxsparse" dynamic header at 512 (a VHD whose footers are both
/// damaged), is a VHD; "CD001" at sector 16 of 2048 an ISO; anything else
/// (and an NBD URI) raw.
pub fn detect_format(path: &Path) -> Result<Format, ImageError> {
    if crate::nbd::is_uri(path) {
        return Ok(Format::Raw);
    }
    let file = IoFile::open_unlocked(path)?;
    let mut signature = [0u8; 8];
    if file.len()? >= 8 {
        file.read_exact_at(&mut signature, 0)?;
        if &signature == crate::vhdx::format::FILE_SIGNATURE {
            return Ok(Format::Vhdx);
        }
    }
    if carries_vhd_structures(&file)? {
        return Ok(Format::Vhd);
    }
    let len = file.len()?;
    if len >= 17 * ISO_BLOCK {
        let mut id = [0u8; 6];
        file.read_exact_at(&mut id, 16 * ISO_BLOCK)?;
        if &id[1..6] == b"CD001" {
            return Ok(Format::Iso);
        }
    }
    Ok(Format::Raw)
}

/// True when the file has a VHD footer cookie at its end or at offset 0, or
/// a dynamic header cookie where a dynamic VHD keeps it (offset 512).
fn carries_vhd_structures(file: &IoFile) -> Result<bool, ImageError> {
    let len = file.len()?;
    let mut cookie = [0u8; 8];
    let mut at = |offset: u64, want: &[u8; 8]| -> Result<bool, ImageError> {
        if offset + 8 > len {
            return Ok(false);
        }
        file.read_exact_at(&mut cookie, offset)?;
        Ok(&cookie == want)
    };
    let end = len.saturating_sub(FOOTER_SIZE as u64) / 512 * 512;
    Ok(at(end, FOOTER_COOKIE)? || at(0, FOOTER_COOKIE)? || at(512, DYN_COOKIE)?)
}

/// Opens an image of a known format as a shareable block device; an NBD
/// URI opens the export as a raw disk through [`crate::nbd::NbdClient`].
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

/// Opens an image to serve a guest, as `format = "auto"` does: the format
/// comes from the file name (see the module docs).
pub fn open_by_name(
    path: &Path,
    options: &DiskOptions,
) -> Result<Arc<dyn BlockDevice>, ImageError> {
    let format = format_from_name(path)?;
    check_named_structure(path, format)?;
    let disk = open_as(path, format, options)?;
    if format == Format::Raw {
        warn_if_structured(path);
    }
    Ok(disk)
}

/// Opens an image for a tool, probing the content for its format.
pub fn open_by_content(
    path: &Path,
    options: &DiskOptions,
) -> Result<Arc<dyn BlockDevice>, ImageError> {
    open_as(path, detect_format(path)?, options)
}

/// For tools that probe content: refuses a file named `.vhdx` whose content
/// is not a VHDX (a damaged VHDX is reported, not taken for raw).
pub(crate) fn check_named_format(path: &Path, probed: Format) -> Result<(), ImageError> {
    if format_from_name(path)? == Format::Vhdx && probed != Format::Vhdx {
        return Err(crate::vhdx::VhdxError::NoSignature.into());
    }
    Ok(())
}

/// Refuses a file whose name says VHD or ISO when its own structure is not
/// one (its parents, if any, are checked by the open itself).
fn check_named_structure(path: &Path, format: Format) -> Result<(), ImageError> {
    if crate::nbd::is_uri(path) {
        return Ok(());
    }
    let (name, checked) = match format {
        Format::Raw => return Ok(()),
        Format::Vhdx => (
            "VHDX",
            IoFile::open_unlocked(path).and_then(|f| crate::vhdx::read_headers(&f).map(drop)),
        ),
        Format::Vhd => (
            "VHD",
            IoFile::open_unlocked(path).and_then(|f| VhdMeta::read(&f).map(drop)),
        ),
        Format::Iso => (
            "ISO 9660",
            IoFile::open_unlocked(path).and_then(|f| IsoMeta::read(&f).map(drop)),
        ),
    };
    match checked {
        Err(e @ (ImageError::Io { .. } | ImageError::Locked { .. })) => Err(e),
        Err(e) => Err(ImageError::NotAsNamed {
            path: path.to_path_buf(),
            format: name,
            source: Box::new(e),
        }),
        Ok(()) => Ok(()),
    }
}

/// Logs a raw-named file that carries VHD structures (typically written by
/// its guest): it is served raw all the same.
fn warn_if_structured(path: &Path) {
    if crate::nbd::is_uri(path) {
        return;
    }
    if IoFile::open_unlocked(path).is_ok_and(|f| carries_vhd_structures(&f).unwrap_or(false)) {
        tracing::warn!(
            path = %path.display(),
            "raw disk carries VHD structures; serving its bytes raw as its name says \
             (name it .vhd or set format = \"vhd\" if it really is a VHD)"
        );
    }
}
