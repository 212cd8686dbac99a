//! Finding a differencing VHDX's parent through its parent locator, and
//! checking that the file found is the parent the child was made from.

use super::error::VhdxError;
use super::format::Guid;
use super::meta::VhdxMeta;
use crate::error::ImageError;
use crate::vhd::ParentPolicy;
use crate::vhd::parent::{is_block_device, windows_to_local};
use std::path::{Path, PathBuf};

/// Candidate paths from the locator, in the specification's order
/// (relative_path, volume_path, absolute_win32_path), then the bare file
/// name next to the child; the first that exists and that `policy` allows
/// (see [`ParentPolicy`]) is the parent, by its resolved path.
pub fn find_parent(
    child: &Path,
    meta: &VhdxMeta,
    policy: &ParentPolicy,
) -> Result<PathBuf, ImageError> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut candidates = Vec::new();
    for key in ["relative_path", "volume_path", "absolute_win32_path"] {
        let Some(value) = meta.locator_value(key) else {
            continue;
        };
        // "\\?\C:\x" style prefixes cannot resolve here; drop them.
        let value = value.strip_prefix("\\\\?\\").unwrap_or(value);
        let local = windows_to_local(value);
        candidates.push(if local.is_absolute() {
            local.clone()
        } else {
            dir.join(&local)
        });
        if let Some(name) = local.file_name() {
            candidates.push(dir.join(name));
        }
    }
    if candidates.is_empty() {
        return Err(VhdxError::BadLocator("no path to the parent".into()).into());
    }
    let mut tried = Vec::new();
    let mut refused = None;
    for c in candidates {
        if c.is_file() || is_block_device(&c) {
            match policy.check(child, &c) {
                Ok(parent) => return Ok(parent),
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        tried.push(c.display().to_string());
    }
    if let Some(e) = refused {
        return Err(e);
    }
    Err(ImageError::ParentNotFound {
        child: child.to_path_buf(),
        tried: tried.join(", "),
    })
}

/// The parent's DataWriteGuid must be the child's parent_linkage (or
/// parent_linkage2), and its geometry the child's.
pub fn check_parent(child: &VhdxMeta, path: &Path, parent: &VhdxMeta) -> Result<(), ImageError> {
    let found = parent.header.data_write_guid;
    let linked = ["parent_linkage", "parent_linkage2"]
        .iter()
        .filter_map(|k| child.locator_value(k))
        .filter_map(Guid::parse)
        .any(|g| g == found);
    if !linked {
        return Err(VhdxError::ParentLinkMismatch {
            parent: path.to_path_buf(),
            expected: child
                .locator_value("parent_linkage")
                .unwrap_or_default()
                .to_string(),
            found: found.braced(),
        }
        .into());
    }
    let mismatch = |reason: String| {
        ImageError::from(VhdxError::ParentMismatch {
            parent: path.to_path_buf(),
            reason,
        })
    };
    if parent.virtual_size != child.virtual_size {
        return Err(mismatch(format!(
            "virtual size {} vs {}",
            parent.virtual_size, child.virtual_size
        )));
    }
    if parent.logical_sector != child.logical_sector {
        return Err(mismatch(format!(
            "logical sector size {} vs {}",
            parent.logical_sector, child.logical_sector
        )));
    }
    Ok(())
}
