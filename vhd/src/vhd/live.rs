//! Live checkpoints: a differencing child opened over a parent that is
//! already open (and serving), and the online merge back into it.
//!
//! # Sharing the parent
//! [`VhdDisk::open_over`] builds the child's chain from the child's own
//! layer followed by the *same* layer objects the open parent uses, not a
//! second open of the parent file. So the child reads the parent's BAT
//! atomics and bitmaps as they are now: a write to the parent that was
//! submitted before a LUN switched to the child (and is still in flight)
//! is seen by reads through the child exactly as it would be by reads
//! through the parent. That is why switching a LUN from a parent to its
//! fresh child needs no drain for reads. The parent instance keeps its
//! image lock (read-write) and its flusher; the child never writes it
//! except in a merge. A flush of the child also flushes the parent's
//! metadata first, so a guest flush after the switch covers writes that
//! completed on the parent before it.
//!
//! # Online merge
//! A merge must leave the parent holding the child's view while the guest
//! keeps writing to the child. Every write to a live child counts, per
//! span of the disk (64 KiB or more), when it is planned (`started`) and
//! when it completes,
//! failed or not (`done`). [`VhdDisk::merge_online`] first turns on
//! *mirroring*: from then on each write is planned on the parent too (one
//! request, its SQEs on both files, one completion). Then it copies the
//! present sectors of each allocated child block into the parent span by
//! span, each once the span has no write in flight, and again if a write
//! started meanwhile. The counter is bumped before the mirror flag is read
//! (both sequentially consistent), so a write either is mirrored or is
//! seen by the copier's check. When the copy ends, every completed write
//! is in the parent and every later one reaches it, so the LUN can switch
//! to the parent: a request in flight on the child still lands in both.
//!
//! The parent only ever receives sectors the child holds, and mirrored
//! writes land in the child too, so the child's view never changes during
//! a merge: a crash leaves a chain that reads as before (see
//! [`crate::tool::merge`]).

use super::VhdDisk;
use super::batch;
use crate::error::{BlockError, ImageError};
use crate::file::IoFile;
use crate::format::{self, BAT_UNUSED, DiskType, SECTOR};
use crate::queue::{IoQueue, OnComplete, PostAction, SlotId};
use crate::raw::{DiskOptions, dio_align};
use crate::sync::BlockingIo;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long the merge tries to find one span quiet.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// Smallest span writes are counted over; small, so that a span being
/// copied is rarely hit by a guest write (which makes the copier redo it).
const MIN_SPAN: u64 = 64 << 10;
/// Most spans counted per disk (8 bytes each).
const MAX_SPANS: u64 = 1 << 20;

/// The live state of a checkpoint's child.
#[derive(Debug)]
pub(super) struct Live {
    parent: Arc<VhdDisk>,
    /// Bytes per counted span: a power of two, at least [`MIN_SPAN`].
    span: u64,
    /// Writes planned, per span.
    started: Box<[AtomicU32]>,
    /// Writes finished (or cancelled), per span.
    done: Box<[AtomicU32]>,
    /// Writes are planned on the parent too.
    mirror: AtomicBool,
}

impl OnComplete for Live {
    fn on_complete(&self, span: u64, _: u64) {
        if let Some(c) = self.done.get(span as usize) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl VhdDisk {
    /// Opens differencing disk `path` (read-write, with its own image
    /// lock) over `parent`, an open VHD, sharing the parent's layers (see
    /// the module docs). The child's locators must lead to the parent's
    /// file, so a later plain open finds the same chain.
    pub fn open_over(
        path: &Path,
        options: &DiskOptions,
        parent: Arc<VhdDisk>,
    ) -> Result<VhdDisk, ImageError> {
        let file = IoFile::open_image(path, true, options)?;
        let meta = super::VhdMeta::read(&file)?;
        let header = match (meta.disk_type(), meta.header.as_ref()) {
            (DiskType::Differencing, Some(h)) => h,
            _ => {
                return Err(ImageError::InvalidArgument(format!(
                    "{} is not a differencing disk",
                    path.display()
                )));
            }
        };
        let parent_path = &parent.chain_paths()[0];
        let found = super::find_parent(path, &file, header, &options.parents)?;
        let expected = std::fs::canonicalize(parent_path).map_err(|e| ImageError::io(path, e))?;
        if found != expected {
            return Err(ImageError::InvalidArgument(format!(
                "{} names parent {}, not {}",
                path.display(),
                found.display(),
                expected.display()
            )));
        }
        if header.parent_unique_id != parent.meta().footer.unique_id {
            return Err(ImageError::ParentIdMismatch {
                parent: found,
                expected: format::format_uuid(&header.parent_unique_id),
                found: format::format_uuid(&parent.meta().footer.unique_id),
            });
        }
        if meta.virtual_size() != parent.meta().virtual_size() {
            return Err(ImageError::InvalidArgument(format!(
                "{} is not the size of its parent",
                path.display()
            )));
        }
        let size = meta.virtual_size();
        let span = size.div_ceil(MAX_SPANS).next_power_of_two().max(MIN_SPAN);
        let spans = size.div_ceil(span) as usize;
        let top = Arc::new(super::chain::Layer::new(file, meta));
        let mut chain = vec![top];
        chain.extend(parent.chain.iter().cloned());
        let live = Live {
            span,
            started: (0..spans).map(|_| AtomicU32::new(0)).collect(),
            done: (0..spans).map(|_| AtomicU32::new(0)).collect(),
            mirror: AtomicBool::new(false),
            parent,
        };
        let mut info = live.parent.info.clone();
        info.read_only = false;
        info.supports_discard = false;
        info.kind = crate::DeviceKind::VhdDifferencing;
        info.unique_id = chain[0].meta.footer.unique_id;
        let disk = VhdDisk {
            meta_state: Arc::new(batch::MetaState::new(
                &chain[0],
                chain[0].meta.footer_offset,
            )),
            dio_align: chain.iter().filter_map(|l| dio_align(&l.file)).max(),
            chain: Arc::new(chain),
            info,
            flusher: crate::flusher::Flusher::new("vhd-flush"),
            live: Some(Arc::new(live)),
        };
        disk.repair_tail()?;
        Ok(disk)
    }

    /// The open parent of a live child ([`VhdDisk::open_over`]).
    pub fn live_parent(&self) -> Option<&Arc<VhdDisk>> {
        self.live.as_ref().map(|l| &l.parent)
    }

    /// For a live child: counts a write of disk bytes `[offset, offset +
    /// len)` as started and, when mirroring, plans it on the parent too.
    /// The count comes before the mirror flag is read (see the module docs).
    pub(super) fn track_write(
        &self,
        queue: &mut IoQueue,
        id: SlotId,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let Some(live) = &self.live else {
            return Ok(());
        };
        for p in super::pieces(offset, len, live.span) {
            if let Some(c) = live.started.get(p.block as usize) {
                c.fetch_add(1, Ordering::SeqCst);
            }
        }
        if live.mirror.load(Ordering::SeqCst) {
            live.parent.plan_write(queue, id, offset, len)?;
            queue.add_mirrored(id, len);
        }
        Ok(())
    }

    /// For a live child: has the write's completion (or cancellation)
    /// count it done. Planned after every other post action of the write.
    pub(super) fn track_done(&self, queue: &mut IoQueue, id: SlotId, offset: u64, len: u64) {
        let Some(live) = &self.live else {
            return;
        };
        for p in super::pieces(offset, len, live.span) {
            queue.add_post(
                id,
                PostAction {
                    target: live.clone(),
                    a: u64::from(p.block),
                    b: 0,
                    always: true,
                },
            );
        }
    }

    /// Online merge of a live child into its parent (see the module docs):
    /// afterwards the parent holds every write completed so far and every
    /// later write reaches both, until this child is closed. `progress`
    /// gets (sectors done, sectors in all). Returns the sectors copied.
    pub fn merge_online(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64, ImageError> {
        let live = self.live.as_ref().ok_or_else(|| {
            ImageError::InvalidArgument("not the child of a live checkpoint".into())
        })?;
        live.mirror.store(true, Ordering::SeqCst);
        let layer = &self.chain[0];
        let per_block = layer.block_size / SECTOR;
        let per_span = live.span / SECTOR;
        let total = self.info.blocks;
        let mut io = BlockingIo::new().map_err(|e| ImageError::io("io_uring", e))?;
        let mut buf = vec![0u8; crate::tool::CHUNK];
        let mut merged = 0;
        for block in 0..layer.bat.len() as u64 {
            let (first, last) = (block * per_block, ((block + 1) * per_block).min(total));
            let mut at = first;
            while at < last {
                let end = ((at / per_span + 1) * per_span).min(last);
                merged += self.merge_span(live, &mut io, &mut buf, block, at, end)?;
                at = end;
            }
            progress(last, total);
        }
        io.flush(&*live.parent)?;
        Ok(merged)
    }

    /// Copies the present sectors of `[first, last)` (inside one span of
    /// child block `block`) into the parent once no write to the span is
    /// in flight, again if one started meanwhile. The block's allocation is
    /// looked at only then: a write planned before mirroring began may
    /// allocate it after the copy started.
    fn merge_span(
        &self,
        live: &Live,
        io: &mut BlockingIo,
        buf: &mut [u8],
        block: u64,
        first: u64,
        last: u64,
    ) -> Result<u64, ImageError> {
        let span = (first * SECTOR / live.span) as usize;
        let present = |s| self.sector_present(s);
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            let started = live.started[span].load(Ordering::SeqCst);
            if live.done[span].load(Ordering::SeqCst) == started {
                let allocated = self.bat_entry(block as usize) != Some(BAT_UNUSED);
                let copied = match allocated {
                    true => {
                        crate::tool::copy_runs(io, buf, self, &*live.parent, first, last, &present)?
                    }
                    false => 0,
                };
                if live.started[span].load(Ordering::SeqCst) == started {
                    return Ok(copied);
                }
            }
            if Instant::now() > deadline {
                return Err(ImageError::InvalidArgument(format!(
                    "merge: sectors {first}..{last} were never free of writes for {DRAIN_WAIT:?}"
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Which checkpoint child, if any, serves an image: kept in a small TOML
/// file next to the image (`disk.vhd.checkpoint` for `disk.vhd`) so that
/// a restart with the same configuration (which names the base image)
/// serves the current chain. Replaced atomically (written to a temporary
/// file, synced, renamed over, the directory synced); no file means no
/// checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainState {
    /// File name (in the image's directory) of the active child.
    pub child: Option<String>,
    /// A merge has started copying into the image: the image no longer
    /// holds its checkpoint-time contents, so a revert is refused and the
    /// merge must be finished.
    #[serde(default)]
    pub merging: bool,
}

impl ChainState {
    /// Where the state of `image` is kept.
    pub fn path(image: &Path) -> std::path::PathBuf {
        let mut name = image.file_name().unwrap_or_default().to_os_string();
        name.push(".checkpoint");
        image.with_file_name(name)
    }

    /// The state of `image` (the default when there is no file).
    pub fn load(image: &Path) -> Result<ChainState, ImageError> {
        let path = ChainState::path(image);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ChainState::default()),
            Err(e) => return Err(ImageError::io(&path, e)),
        };
        let state: ChainState = toml::from_str(&text)
            .map_err(|e| ImageError::InvalidArgument(format!("{}: {e}", path.display())))?;
        if let Some(child) = &state.child {
            check_child_name(child)?;
        }
        Ok(state)
    }

    /// Replaces the state of `image` atomically and durably.
    pub fn store(&self, image: &Path) -> Result<(), ImageError> {
        let path = ChainState::path(image);
        let dir = path.parent().unwrap_or(Path::new("."));
        if self.child.is_none() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io(&path, e)),
            }
            return sync_dir(dir);
        }
        let text = toml::to_string(self)
            .map_err(|e| ImageError::InvalidArgument(format!("checkpoint state: {e}")))?;
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(b"# vspa live checkpoint: the child serving this image\n")?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| ImageError::io(&path, e))?;
        sync_dir(dir)
    }

    /// The active child's path, next to `image`.
    pub fn child_path(&self, image: &Path) -> Option<std::path::PathBuf> {
        self.child.as_ref().map(|c| image.with_file_name(c))
    }
}

/// A child name must be a plain VHD file name in the image's directory.
fn check_child_name(name: &str) -> Result<(), ImageError> {
    let plain = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    if plain && (name.ends_with(".avhd") || name.ends_with(".vhd")) {
        Ok(())
    } else {
        Err(ImageError::InvalidArgument(format!(
            "checkpoint child {name:?} is not a VHD file name"
        )))
    }
}

/// Makes a directory's entries (a rename, a new or removed file) durable.
pub fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ImageError::io(dir, e))
}

/// Opens VHD `image` as its checkpoint state says: the active child over
/// the image (both read-write, the child sharing the image's layers as
/// [`VhdDisk::open_over`] does), or None when it has no checkpoint.
pub fn open_checkpointed(
    image: &Path,
    options: &DiskOptions,
) -> Result<Option<VhdDisk>, ImageError> {
    let state = ChainState::load(image)?;
    let Some(child) = state.child_path(image) else {
        return Ok(None);
    };
    let base = Arc::new(VhdDisk::open(image, options)?);
    VhdDisk::open_over(&child, options, base).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockDevice, CacheMode};

    #[test]
    fn chain_state_round_trips_and_names_only_files_next_to_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.vhd");
        assert_eq!(ChainState::load(&image).unwrap(), ChainState::default());
        let state = ChainState {
            child: Some("disk-ckpt-1.avhd".into()),
            merging: true,
        };
        state.store(&image).unwrap();
        assert_eq!(ChainState::load(&image).unwrap(), state);
        assert_eq!(
            state.child_path(&image),
            Some(dir.path().join("disk-ckpt-1.avhd"))
        );
        ChainState::default().store(&image).unwrap();
        assert!(!ChainState::path(&image).exists());
        for bad in ["../other.vhd", "x/y.avhd", "disk.img", ""] {
            let text = format!("child = {bad:?}\n");
            std::fs::write(ChainState::path(&image), text).unwrap();
            assert!(ChainState::load(&image).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_child_over_an_open_parent_reads_its_writes_and_merges_online() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.vhd");
        crate::create::create_dynamic(&image, 4 << 20, 64 << 10).unwrap();
        let options = DiskOptions::default().cache(CacheMode::Cached);
        let base = Arc::new(VhdDisk::open(&image, &options).unwrap());
        let mut io = BlockingIo::new().unwrap();
        // Allocated in memory only: a second open of the image would not
        // see it, a child sharing the open image's layers does.
        io.write(&*base, 16, &[1; 4096]).unwrap();
        let child_path = dir.path().join("disk-ckpt.avhd");
        crate::create::create_differencing_of(&child_path, &image, base.meta(), 1 << 20).unwrap();
        let child = VhdDisk::open_over(&child_path, &options, base.clone()).unwrap();
        let mut page = vec![0u8; 4096];
        io.read(&child, 16, &mut page).unwrap();
        assert_eq!(page, [1; 4096]);
        io.write(&child, 4096, &[2; 4096]).unwrap();
        io.read(&*base, 4096, &mut page).unwrap();
        assert_eq!(page, [0; 4096], "the image keeps its checkpoint-time data");
        let mut last = (0, 0);
        let merged = child.merge_online(&mut |d, t| last = (d, t)).unwrap();
        assert_eq!(merged, 8);
        assert_eq!(last, (8192, 8192));
        io.read(&*base, 4096, &mut page).unwrap();
        assert_eq!(page, [2; 4096], "merged");
        // Mirrored from now on.
        io.write(&child, 2048, &[3; 4096]).unwrap();
        io.read(&*base, 2048, &mut page).unwrap();
        assert_eq!(page, [3; 4096], "mirrored");
        // A child whose locators lead elsewhere is refused.
        let other = dir.path().join("other.vhd");
        crate::create::create_dynamic(&other, 4 << 20, 64 << 10).unwrap();
        let stray = dir.path().join("stray.avhd");
        crate::create::create_differencing(&stray, &other, 1 << 20).unwrap();
        assert!(VhdDisk::open_over(&stray, &options, base).is_err());
        assert_eq!(child.info().blocks, 8192);
    }
}
