//! Finding a differencing disk's parent through its locators, and the
//! policy that confines where a parent may be.
//!
//! Locators are data inside an image file, so they may name any path. A
//! candidate is taken only if, with symlinks resolved, it lies directly in
//! an allowed directory (by default the child's own) and is not on the
//! deny-list; the chain then opens that resolved path, read-only.

use crate::error::ImageError;
use crate::file::IoFile;
use crate::format::{self, DynHeader};
use std::path::{Path, PathBuf};

/// Where a differencing disk's parents may be (part of
/// [`DiskOptions`](crate::DiskOptions)).
///
/// The appliance fills `denied` with the images of every other tenant (and
/// any writable image of the configuration other than the one opened), so a
/// chain can never read another tenant's disk: see the crate docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentPolicy {
    /// Directories a parent must be directly in (not in a subdirectory),
    /// compared with symlinks resolved. Empty: the child's own directory.
    pub allowed_dirs: Vec<PathBuf>,
    /// Files that may never be a parent, compared with symlinks resolved.
    pub denied: Vec<PathBuf>,
}

impl ParentPolicy {
    /// Checks `candidate` (an existing file) as a parent of `child`;
    /// returns its resolved path.
    pub fn check(&self, child: &Path, candidate: &Path) -> Result<PathBuf, ImageError> {
        let resolve = |p: &Path| std::fs::canonicalize(p).map_err(|e| ImageError::io(p, e));
        let parent = resolve(candidate)?;
        let allowed = if self.allowed_dirs.is_empty() {
            let child = resolve(child)?;
            vec![child.parent().map(Path::to_path_buf).unwrap_or_default()]
        } else {
            self.allowed_dirs
                .iter()
                .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
                .collect()
        };
        if !parent
            .parent()
            .is_some_and(|dir| allowed.iter().any(|a| a == dir))
        {
            return Err(ImageError::ParentNotAllowed {
                child: child.to_path_buf(),
                parent,
                allowed: allowed
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let denied = |d: &PathBuf| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        if self.denied.iter().map(denied).any(|d| d == parent) {
            return Err(ImageError::ParentDenied {
                child: child.to_path_buf(),
                parent,
            });
        }
        Ok(parent)
    }
}

/// Largest accepted parent locator payload.
const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// Locates the parent of differencing disk `child` through its locators
/// (W2ru relative, W2ku absolute, MacX file URL), then its parent name:
/// the first candidate that exists and that `policy` allows, resolved. A
/// candidate the policy refuses is skipped; if nothing else is found, the
/// refusal is the error.
pub fn find_parent(
    child: &Path,
    file: &IoFile,
    header: &DynHeader,
    policy: &ParentPolicy,
) -> Result<PathBuf, ImageError> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    for code in [b"W2ru", b"W2ku", b"MacX"] {
        for loc in header.locators.iter().filter(|l| &l.platform_code == code) {
            let len = loc.data_length.get();
            if len == 0 {
                continue;
            }
            let text = String::from_utf8_lossy(code).into_owned();
            if len > MAX_LOCATOR_LEN {
                return Err(ImageError::BadLocator {
                    code: text,
                    reason: "data length is absurd",
                });
            }
            let mut data = vec![0u8; len as usize];
            file.read_exact_at(&mut data, loc.data_offset.get())?;
            let path = if code == b"MacX" {
                let url = String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .to_string();
                PathBuf::from(percent_decode(url.strip_prefix("file://").unwrap_or(&url)))
            } else {
                windows_to_local(&format::from_utf16le(&data))
            };
            candidates.push(if path.is_absolute() {
                path
            } else {
                dir.join(path)
            });
        }
    }
    let name = header.parent_name();
    if !name.is_empty() {
        let local = windows_to_local(&name);
        if let Some(base) = local.file_name() {
            candidates.push(dir.join(base));
        }
        candidates.push(if local.is_absolute() {
            local
        } else {
            dir.join(local)
        });
    }
    if candidates.is_empty() {
        return Err(ImageError::NoParentLocator);
    }
    let mut refused = None;
    for candidate in candidates {
        if candidate.is_file() || is_block_device(&candidate) {
            match policy.check(child, &candidate) {
                Ok(parent) => return Ok(parent),
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        tried.push(candidate.display().to_string());
    }
    if let Some(e) = refused {
        return Err(e);
    }
    Err(ImageError::ParentNotFound {
        child: child.to_path_buf(),
        tried: tried.join(", "),
    })
}

pub(crate) fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// A Windows path (".\x.vhd", "C:\dir\x.vhd") as a local path: backslashes
/// become slashes; a drive letter cannot resolve here and stays as is.
pub(crate) fn windows_to_local(path: &str) -> PathBuf {
    let p = path.trim_end_matches('\0').replace('\\', "/");
    PathBuf::from(p.strip_prefix("./").map(str::to_string).unwrap_or(p))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(
                std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                16,
            )
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
