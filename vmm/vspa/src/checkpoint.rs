//! Live checkpoints of running disk LUNs (Hyper-V's checkpoints on
//! differencing disks): [`create`], [`merge`] and [`revert`], online,
//! without failing or reordering guest I/O. The control API calls these.
//!
//! # How
//! A LUN serving VHD `disk.vhd` gets a differencing child
//! `disk-ckpt-<n>.avhd` next to it, opened over the open image so that both
//! share the image's layers (`vhd::vhd::live`), and the LUN switches to the
//! child in one table change (`storage::Controller::replace_disk`). The
//! image stays open read-write in this process (its lock keeps other
//! writers out) but nothing writes it again until a merge.
//! A merge mirrors new writes into the image while it copies the child's
//! sectors over, then switches the LUN back to the image and deletes the
//! child; a revert switches back and deletes the child at once.
//!
//! # Persisted state and crash safety
//! The configuration keeps naming the base image; `disk.vhd.checkpoint`
//! (`vhd::vhd::live::ChainState`, replaced atomically) names the active
//! child, so `vspa serve` with the same configuration opens the chain. Every
//! step makes the state durable *before* the LUN switch that depends on it:
//! - create: the child is created and synced, then the state names it,
//!   then the LUN switches. A crash before the state write leaves an
//!   unreferenced file; after it, the chain (an empty child) reads as the
//!   image did.
//! - merge: the state is marked `merging` (a revert is refused from then
//!   on: the image no longer holds its checkpoint-time contents); the copy
//!   runs (the child's view never changes); once the image holds every
//!   completed write and mirroring brings it every later one, the state
//!   is removed, then the LUN switches to the image. A crash during the
//!   copy reopens the child's chain; after the state removal, the image.
//! - revert: the state is removed, then the LUN switches.
//!
//! A guest flush on the child flushes the image's metadata and data too,
//! so whichever file a restart opens holds every write acknowledged before
//! the last completed flush.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use storage::Controller;
use storage::controller::{Disk, LunError};
use storage::luns::Lun;
use vhd::vhd::live::{ChainState, sync_dir};
use vhd::{DiskOptions, ImageError, VhdDisk};

/// Block size of checkpoint children (Hyper-V's for VHD).
const CHILD_BLOCK: u32 = 2 << 20;

/// One checkpoint operation at a time, process-wide.
static OPS: Mutex<()> = Mutex::new(());

/// Why a checkpoint operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Lun(#[from] LunError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("LUN {0} is not a read-write VHD disk")]
    NotVhd(u8),
    #[error("LUN {0} already runs on a checkpoint; merge or revert it first")]
    Exists(u8),
    #[error("LUN {0} has no checkpoint")]
    NoCheckpoint(u8),
    #[error("a merge of LUN {0} has started; finish it (merge again) instead of reverting")]
    Merging(u8),
    #[error("LUN {0}'s checkpoint has not been copied into its image (merge_copy first)")]
    NotCopied(u8),
}

/// A merge's progress: sectors looked at so far, of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MergeReport {
    pub image: PathBuf,
    pub removed_child: PathBuf,
    pub sectors_merged: u64,
}

/// The checkpoint state of a LUN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub image: PathBuf,
    pub child: Option<PathBuf>,
    pub merging: bool,
}

/// Creates a checkpoint of disk LUN `lun`: a differencing child next to its
/// VHD image, to which the LUN switches. Returns the child's path.
pub fn create(controller: &Controller, lun: u8) -> Result<PathBuf, CheckpointError> {
    let _op = ops();
    let image = vhd_of(controller, lun)?;
    if image.live_parent().is_some() {
        return Err(CheckpointError::Exists(lun));
    }
    let path = image.chain_paths()[0].clone();
    if ChainState::load(&path)?.child.is_some() {
        return Err(CheckpointError::Exists(lun));
    }
    let name = child_name(&path);
    let child_path = path.with_file_name(&name);
    vhd::create::create_differencing_of(&child_path, &path, image.meta(), CHILD_BLOCK)?;
    sync_dir(dir_of(&path))?;
    // The image's own mode: `direct` falls back to buffered on the child
    // exactly where it did on the image (same filesystem).
    let child = VhdDisk::open_over(
        &child_path,
        &DiskOptions::default().cache(image.cache_mode()),
        image.clone(),
    );
    let switched = child.map_err(CheckpointError::from).and_then(|child| {
        let state = ChainState {
            child: Some(name),
            merging: false,
        };
        state.store(&path)?;
        // The image stays open under the child: nothing to wait for.
        match controller.replace_disk(lun, Arc::new(child)) {
            Ok(_image) => Ok(()),
            Err(e) => {
                let _ = ChainState::default().store(&path);
                Err(e.into())
            }
        }
    });
    if let Err(e) = switched {
        let _ = std::fs::remove_file(&child_path);
        return Err(e);
    }
    tracing::info!(lun, child = %child_path.display(), "checkpoint created");
    Ok(child_path)
}

/// Merges LUN `lun`'s checkpoint child back into its image online, then
/// switches the LUN to the image and deletes the child: [`merge_copy`]
/// then [`merge_finish`]. `progress` is called as the copy advances.
pub fn merge(
    controller: &Controller,
    lun: u8,
    progress: &mut dyn FnMut(Progress),
) -> Result<MergeReport, CheckpointError> {
    let sectors_merged = merge_copy(controller, lun, progress)?;
    let (image, removed_child) = merge_finish(controller, lun)?;
    Ok(MergeReport {
        image,
        removed_child,
        sectors_merged,
    })
}

/// The long part of a merge: marks the state `merging`, turns on
/// mirroring and copies the child into its image. Afterwards the image
/// holds every completed write and receives every later one; the LUN still
/// runs on the child until [`merge_finish`]. Returns the sectors copied.
pub fn merge_copy(
    controller: &Controller,
    lun: u8,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, CheckpointError> {
    let _op = ops();
    let (child, image) = live_of(controller, lun)?;
    let path = image.chain_paths()[0].clone();
    let mut state = ChainState::load(&path)?;
    state.merging = true;
    state.store(&path)?;
    let merged = child.merge_online(&mut |done, total| progress(Progress { done, total }))?;
    tracing::info!(lun, sectors = merged, "checkpoint copied into its image");
    Ok(merged)
}

/// The short part of a merge, after [`merge_copy`]: the state is removed,
/// the LUN switches to the image (mirroring keeps requests in flight on
/// the child landing in both) and the child is deleted. Returns the image
/// and the deleted child.
pub fn merge_finish(
    controller: &Controller,
    lun: u8,
) -> Result<(PathBuf, PathBuf), CheckpointError> {
    let _op = ops();
    let (child, image) = live_of(controller, lun)?;
    let path = image.chain_paths()[0].clone();
    if !ChainState::load(&path)?.merging {
        return Err(CheckpointError::NotCopied(lun));
    }
    ChainState::default().store(&path)?;
    let removed = finish(controller, lun, child, image)?;
    tracing::info!(lun, "checkpoint merged");
    Ok((path, removed))
}

/// Drops LUN `lun`'s checkpoint: the LUN switches back to its image as it
/// was when the checkpoint was made, and the child is deleted.
pub fn revert(controller: &Controller, lun: u8) -> Result<PathBuf, CheckpointError> {
    let _op = ops();
    let (child, image) = live_of(controller, lun)?;
    let path = image.chain_paths()[0].clone();
    if ChainState::load(&path)?.merging {
        return Err(CheckpointError::Merging(lun));
    }
    ChainState::default().store(&path)?;
    let removed = finish(controller, lun, child, image)?;
    tracing::info!(lun, "checkpoint reverted");
    Ok(removed)
}

/// The checkpoint state of disk LUN `lun`.
pub fn status(controller: &Controller, lun: u8) -> Result<Status, CheckpointError> {
    let top = vhd_of(controller, lun)?;
    let image = top.live_parent().unwrap_or(&top).chain_paths()[0].clone();
    let state = ChainState::load(&image)?;
    Ok(Status {
        child: state.child_path(&image),
        merging: state.merging,
        image,
    })
}

fn ops() -> std::sync::MutexGuard<'static, ()> {
    OPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VHD serving disk LUN `lun`.
fn vhd_of(controller: &Controller, lun: u8) -> Result<Arc<VhdDisk>, CheckpointError> {
    let table = controller.table();
    let entry = table.get(lun).ok_or(LunError::Missing(lun))?;
    let Lun::Disk { device, .. } = &**entry else {
        return Err(CheckpointError::NotVhd(lun));
    };
    match device.clone().as_vhd() {
        Some(v) if !vhd::BlockDevice::info(&*v).read_only => Ok(v),
        _ => Err(CheckpointError::NotVhd(lun)),
    }
}

/// The live child serving LUN `lun` and its image.
fn live_of(
    controller: &Controller,
    lun: u8,
) -> Result<(Arc<VhdDisk>, Arc<VhdDisk>), CheckpointError> {
    let child = vhd_of(controller, lun)?;
    let image = child
        .live_parent()
        .cloned()
        .ok_or(CheckpointError::NoCheckpoint(lun))?;
    Ok((child, image))
}

/// Switches the LUN from `child` back to `image` and deletes the child.
/// The child's file may still be open (by a worker that has not picked up
/// the switch yet, or by the appliance's record until
/// `Appliance::sync_lun`); whoever holds it last closes it, writing only
/// to the unlinked file.
fn finish(
    controller: &Controller,
    lun: u8,
    child: Arc<VhdDisk>,
    image: Arc<VhdDisk>,
) -> Result<PathBuf, CheckpointError> {
    let child_path = child.chain_paths()[0].clone();
    drop(child);
    let image: Disk = image;
    drop(controller.replace_disk(lun, image)?);
    std::fs::remove_file(&child_path).map_err(|source| ImageError::Io {
        path: child_path.clone(),
        source,
    })?;
    sync_dir(dir_of(&child_path))?;
    Ok(child_path)
}

/// A new child's file name: `disk-ckpt-<nanoseconds>.avhd` for `disk.vhd`.
fn child_name(image: &Path) -> String {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{stem}-ckpt-{nanos}.avhd")
}

fn dir_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}
