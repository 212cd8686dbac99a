//! Finding a differencing disk's parent through its locators.

use crate::error::ImageError;
use crate::file::IoFile;
use crate::format::{self, DynHeader};
use std::path::{Path, PathBuf};

/// Largest accepted parent locator payload.
const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// Locates the parent of differencing disk `child` through its locators
/// (W2ru relative, W2ku absolute, MacX file URL), then its parent name.
pub fn find_parent(child: &Path, file: &IoFile, header: &DynHeader) -> Result<PathBuf, ImageError> {
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
    for candidate in candidates {
        if candidate.is_file() || is_block_device(&candidate) {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
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
