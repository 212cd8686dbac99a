//! Creating images: raw, fixed VHD, dynamic VHD and differencing VHD (with
//! W2ru, W2ku and MacX parent locators, the parent's unique id and
//! timestamp).

use crate::error::ImageError;
use crate::file::{CacheMode, IoFile};
use crate::format::{
    self, BAT_UNUSED, CREATOR_APP, DYN_COOKIE, DiskType, DynHeader, FOOTER_COOKIE, FOOTER_SIZE,
    Footer, Locator, SECTOR, bat_size,
};
use crate::vhd::VhdMeta;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use zerocopy::{FromZeros, IntoBytes};

/// Creator version written into footers (major.minor of this crate).
const CREATOR_VERSION: u32 = 0x0001_0000;

/// Checks a requested virtual size.
fn check_size(size: u64) -> Result<(), ImageError> {
    if size == 0 || !size.is_multiple_of(SECTOR) || size > format::MAX_VIRTUAL_SIZE {
        return Err(ImageError::BadVirtualSize(size));
    }
    Ok(())
}

fn check_block_size(block_size: u32) -> Result<(), ImageError> {
    if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
        return Err(ImageError::BadBlockSize(block_size));
    }
    Ok(())
}

/// A sealed footer for a new disk of `size` bytes.
pub fn new_footer(disk_type: DiskType, size: u64, data_offset: u64) -> Result<Footer, ImageError> {
    let mut f = Footer::new_zeroed();
    f.cookie = *FOOTER_COOKIE;
    f.features.set(2);
    f.version.set(0x0001_0000);
    f.data_offset.set(data_offset);
    f.timestamp.set(format::vhd_timestamp_now());
    f.creator_app = CREATOR_APP;
    f.creator_version.set(CREATOR_VERSION);
    f.creator_os = *b"Wi2k";
    f.original_size.set(size);
    f.current_size.set(size);
    let g = format::geometry_for_exact_size(size);
    f.cylinders.set(g.cylinders);
    f.heads = g.heads;
    f.sectors_per_track = g.sectors_per_track;
    f.disk_type.set(disk_type.raw());
    f.unique_id = format::new_uuid().map_err(|e| ImageError::io("getrandom", e))?;
    f.seal();
    Ok(f)
}

pub(crate) fn create_file(path: &Path) -> Result<std::fs::File, ImageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| ImageError::io(path, e))
}

pub(crate) fn write_at(
    file: &std::fs::File,
    path: &Path,
    buf: &[u8],
    at: u64,
) -> Result<(), ImageError> {
    file.write_all_at(buf, at)
        .map_err(|e| ImageError::io(path, e))
}

/// Creates a sparse raw image of `size` bytes.
pub fn create_raw(path: &Path, size: u64) -> Result<(), ImageError> {
    let file = create_file(path)?;
    file.set_len(size).map_err(|e| ImageError::io(path, e))?;
    file.sync_all().map_err(|e| ImageError::io(path, e))
}

/// Creates a fixed VHD: `size` bytes of (sparse) zeros, then the footer.
pub fn create_fixed(path: &Path, size: u64) -> Result<(), ImageError> {
    check_size(size)?;
    let footer = new_footer(DiskType::Fixed, size, u64::MAX)?;
    let file = create_file(path)?;
    file.set_len(size).map_err(|e| ImageError::io(path, e))?;
    write_at(&file, path, footer.as_bytes(), size)?;
    file.sync_all().map_err(|e| ImageError::io(path, e))
}

/// Creates an empty dynamic VHD.
pub fn create_dynamic(path: &Path, size: u64, block_size: u32) -> Result<(), ImageError> {
    check_size(size)?;
    check_block_size(block_size)?;
    let footer = new_footer(DiskType::Dynamic, size, FOOTER_SIZE as u64)?;
    write_sparse(path, &footer, block_size, None)
}

/// What a differencing disk records about its parent.
struct ParentRef {
    id: [u8; 16],
    timestamp: u32,
    name: String,
    locators: Vec<([u8; 4], Vec<u8>)>,
}

/// Creates a differencing VHD over `parent` (a VHD of any type), with the
/// parent's size, unique id and timestamp, and W2ru, W2ku and MacX locators.
pub fn create_differencing(path: &Path, parent: &Path, block_size: u32) -> Result<(), ImageError> {
    check_block_size(block_size)?;
    let parent_file = IoFile::open(parent, false, CacheMode::Cached)?;
    let parent_meta = VhdMeta::read(&parent_file)?;
    drop(parent_file);
    create_differencing_of(path, parent, &parent_meta, block_size)
}

/// [`create_differencing`] over a parent already read (and perhaps held
/// open read-write by this process, whose lock a second open would
/// conflict with): `parent_meta` is its metadata.
pub fn create_differencing_of(
    path: &Path,
    parent: &Path,
    parent_meta: &VhdMeta,
    block_size: u32,
) -> Result<(), ImageError> {
    check_block_size(block_size)?;
    let size = parent_meta.virtual_size();
    check_size(size)?;
    let parent_abs = std::fs::canonicalize(parent).map_err(|e| ImageError::io(parent, e))?;
    let child_dir = absolute_dir(path)?;
    let relative = relative_path(&child_dir, &parent_abs);
    let rel_windows = format!(".\\{}", relative.display().to_string().replace('/', "\\"));
    let abs_text = parent_abs.display().to_string();
    let parent_ref = ParentRef {
        id: parent_meta.footer.unique_id,
        // The parent's own timestamp: it changes only when the parent is
        // rewritten, unlike the file's mtime, which copying changes.
        timestamp: parent_meta.footer.timestamp.get(),
        // Just the file name: readers (libvhdi among them) look for it next
        // to the child; the locators carry the full paths.
        name: parent_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        locators: vec![
            (*b"W2ru", format::utf16le(&rel_windows)),
            (*b"W2ku", format::utf16le(&abs_text)),
            (*b"MacX", format!("file://{abs_text}").into_bytes()),
        ],
    };
    let mut footer = new_footer(DiskType::Differencing, size, FOOTER_SIZE as u64)?;
    // Keep the parent's geometry and size rule.
    footer.cylinders = parent_meta.footer.cylinders;
    footer.heads = parent_meta.footer.heads;
    footer.sectors_per_track = parent_meta.footer.sectors_per_track;
    if footer.virtual_size() != size {
        let g = format::geometry_for_exact_size(size);
        footer.cylinders.set(g.cylinders);
        footer.heads = g.heads;
        footer.sectors_per_track = g.sectors_per_track;
    }
    footer.seal();
    write_sparse(path, &footer, block_size, Some(parent_ref))
}

/// Writes footer copy, dynamic header, empty BAT, locators and footer.
fn write_sparse(
    path: &Path,
    footer: &Footer,
    block_size: u32,
    parent: Option<ParentRef>,
) -> Result<(), ImageError> {
    let size = footer.current_size.get();
    let entries = u32::try_from(size.div_ceil(u64::from(block_size)))
        .map_err(|_| ImageError::BadVirtualSize(size))?;
    let bat_offset = 3 * SECTOR;
    let bat_len = bat_size(entries);
    let mut header = DynHeader::new_zeroed();
    header.cookie = *DYN_COOKIE;
    header.data_offset.set(u64::MAX);
    header.table_offset.set(bat_offset);
    header.version.set(0x0001_0000);
    header.max_table_entries.set(entries);
    header.block_size.set(block_size);
    let mut end = bat_offset + bat_len;
    let mut locator_data = Vec::new();
    if let Some(p) = &parent {
        header.parent_unique_id = p.id;
        header.parent_timestamp.set(p.timestamp);
        let units: Vec<u8> = p.name.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let n = units.len().min(header.parent_name.len() - 2);
        header.parent_name[..n].copy_from_slice(&units[..n]);
        for (slot, (code, data)) in p.locators.iter().enumerate() {
            let space = (data.len() as u64).div_ceil(SECTOR).max(1) * SECTOR;
            header.locators[slot] = Locator {
                platform_code: *code,
                data_space: (space as u32).into(),
                data_length: (data.len() as u32).into(),
                reserved: 0.into(),
                data_offset: end.into(),
            };
            locator_data.push((end, data.clone()));
            end += space;
        }
    }
    header.seal();
    let file = create_file(path)?;
    write_at(&file, path, footer.as_bytes(), 0)?;
    write_at(&file, path, header.as_bytes(), FOOTER_SIZE as u64)?;
    let bat: Vec<u8> = std::iter::repeat_n(BAT_UNUSED.to_be_bytes(), bat_len as usize / 4)
        .flatten()
        .collect();
    write_at(&file, path, &bat, bat_offset)?;
    for (at, data) in locator_data {
        write_at(&file, path, &data, at)?;
    }
    write_at(&file, path, footer.as_bytes(), end)?;
    file.sync_all().map_err(|e| ImageError::io(path, e))
}

/// Absolute, canonical directory that will hold `path`.
pub(crate) fn absolute_dir(path: &Path) -> Result<PathBuf, ImageError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&dir).map_err(|e| ImageError::io(&dir, e))
}

/// `target` relative to directory `base` (both absolute and canonical).
pub fn relative_path(base: &Path, target: &Path) -> PathBuf {
    let b: Vec<Component> = base.components().collect();
    let t: Vec<Component> = target.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            PathBuf::from("p.vhd")
        );
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/a/d/p.vhd")),
            PathBuf::from("../../d/p.vhd")
        );
    }
}
