//! `vspa image` for VHDX: create, info, check and merge (convert and
//! compare work through the block interface, see [`crate::tool`]).

use super::format::Guid;
use super::{VhdxDisk, VhdxKind, VhdxMeta, VhdxOptions};
use crate::error::ImageError;
use crate::file::CacheMode;
use crate::lock::{Access, ImageLock};
use crate::raw::DiskOptions;
use crate::tool::{CheckReport, CreateSpec, ImageInfo, MergeResult, Subformat};
use std::path::Path;

/// `create -f vhdx`.
pub fn create(path: &Path, spec: &CreateSpec, options: &VhdxOptions) -> Result<(), ImageError> {
    match (spec.subformat, &spec.parent, spec.size) {
        (Subformat::Differencing, Some(parent), None) => {
            super::create_differencing(path, parent, options)
        }
        (Subformat::Differencing, None, _) => Err(ImageError::InvalidArgument(
            "a differencing disk needs --parent".into(),
        )),
        (Subformat::Differencing, Some(_), Some(_)) => Err(ImageError::InvalidArgument(
            "a differencing disk takes its size from the parent".into(),
        )),
        (sub, _, size) => {
            let size =
                size.ok_or_else(|| ImageError::InvalidArgument("a size is required".into()))?;
            let kind = if sub == Subformat::Fixed {
                VhdxKind::Fixed
            } else {
                VhdxKind::Dynamic
            };
            super::create_vhdx(path, kind, size, options)
        }
    }
}

fn read_only() -> DiskOptions {
    DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
}

/// Fills the VHDX part of `info`.
pub fn info(path: &Path, info: &mut ImageInfo) -> Result<(), ImageError> {
    let disk = VhdxDisk::open(path, &read_only())?;
    let meta = disk.meta();
    info.subformat = Some(meta.kind().name());
    info.virtual_size = meta.virtual_size;
    info.block_size = Some(meta.block_size);
    info.allocated_bytes =
        (meta.allocated_blocks() * u64::from(meta.block_size)).min(meta.virtual_size);
    info.creator = Some(meta.creator.clone());
    info.unique_id = Some(meta.page83.to_string());
    info.parent_chain = disk.chain_paths()[1..]
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    info.checksums_ok = disk
        .chain_meta()
        .iter()
        .all(|m| m.headers_valid == [true, true] && m.region_tables_valid == [true, true]);
    info.logical_sector_size = Some(meta.logical_sector);
    info.physical_sector_size = Some(meta.physical_sector);
    info.pending_log_entries = meta.pending_log.map(|(n, _, _)| n);
    Ok(())
}

/// `check`: opens the chain read-only (validating every structure, a
/// pending log replayed in memory) and reports per file.
pub fn check(path: &Path, report: &mut CheckReport) {
    match VhdxDisk::open(path, &read_only()) {
        Err(e) => report.problems.push(e.to_string()),
        Ok(disk) => {
            for (meta, p) in disk.chain_meta().into_iter().zip(disk.chain_paths()) {
                check_file(meta, &p, report);
            }
        }
    }
}

fn check_file(meta: &VhdxMeta, path: &Path, report: &mut CheckReport) {
    let name = path.display();
    if let Some((n, first, last)) = meta.pending_log {
        report.notes.push(format!(
            "{name}: log holds {n} entries (sequence {first}..{last}) that the next read-write open replays; checked as replayed"
        ));
    }
    for (i, ok) in meta.headers_valid.iter().enumerate() {
        if !ok {
            // A header update torn by a crash damages only the
            // non-current copy; the next update rewrites it.
            report.notes.push(format!(
                "{name}: header {} is damaged; the other is current",
                i + 1
            ));
        }
    }
    for (i, ok) in meta.region_tables_valid.iter().enumerate() {
        if !ok {
            report
                .problems
                .push(format!("{name}: region table {} is damaged", i + 1));
        }
    }
    let leaked = meta.leaked_bytes();
    if leaked > 0 {
        report.leaked_bytes += leaked;
        report.notes.push(format!(
            "{name}: {leaked} bytes of unreferenced space at the end (blocks allocated but never logged; a read-write open reclaims them)"
        ));
    }
}

/// `merge` of a differencing VHDX into its parent.
///
/// Crash safety: the parent's DataWriteGuid must change before its first
/// write, which would break the child's link to it; so a new GUID is first
/// recorded as the child's parent_linkage2 (through the child's log), then
/// made the parent's DataWriteGuid, and only then is data copied. Only
/// sectors present in the child are written to the parent, so the child's
/// view never changes and an interrupted merge can be run again.
pub fn merge(
    child: &Path,
    keep_child: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeResult, ImageError> {
    // The merge holds the locks itself: the child's chain would otherwise
    // lock the parent for reading while this process writes it.
    let _child_lock = ImageLock::acquire(child, Access::ReadWrite, crate::file::LOCK_WAIT)?;
    let rw = DiskOptions {
        unlocked: true,
        ..DiskOptions::default().cache(CacheMode::Cached)
    };
    let source = VhdxDisk::open(child, &rw)?;
    if source.meta().kind() != VhdxKind::Differencing {
        return Err(ImageError::InvalidArgument(format!(
            "{} is not a differencing disk",
            child.display()
        )));
    }
    let parent_path = source.chain_paths()[1].clone();
    let _parent_lock = ImageLock::acquire(&parent_path, Access::ReadWrite, crate::file::LOCK_WAIT)?;
    let parent = VhdxDisk::open(&parent_path, &rw)?;
    let guid = Guid::random().map_err(|e| ImageError::io("getrandom", e))?;
    source.set_parent_linkage2(guid)?;
    parent.begin_data_write(guid)?;
    let meta = source.meta();
    let per_block = u64::from(meta.block_size) / u64::from(meta.logical_sector);
    let blocks = (0..meta.payload_blocks()).filter(|&b| {
        let e = meta.bat[meta.payload_index(b) as usize];
        matches!(
            super::format::bat_state(e),
            super::format::payload::FULLY_PRESENT | super::format::payload::PARTIALLY_PRESENT
        )
    });
    let present = |s| source.sector_present(s);
    let merged =
        crate::tool::copy_present(&source, &parent, per_block, blocks, &present, progress)?;
    drop(parent);
    drop(source);
    crate::tool::finish_merge(child, keep_child, parent_path, merged)
}
