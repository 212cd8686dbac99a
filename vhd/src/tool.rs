//! The logic of `vspa image` (info, convert, compare, check, merge); the
//! binary only parses arguments and prints.

use crate::create;
use crate::device::{BlockDevice, DeviceKind};
use crate::error::ImageError;
use crate::file::{CacheMode, IoFile};
use crate::format::{DiskType, SECTOR, format_uuid};
use crate::iso::{IsoMeta, open_iso};
use crate::lock::{Access, ImageLock};
use crate::open::{Format, detect_format, open_as};
use crate::raw::DiskOptions;
use crate::sync::BlockingIo;
use crate::vhd::{VhdDisk, VhdMeta};
pub use crate::vhdx::VhdxOptions;
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes moved per request by convert, compare and merge.
const CHUNK: usize = 1 << 20;

/// VHD subformats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    Fixed,
    Dynamic,
    Differencing,
}

impl std::str::FromStr for Subformat {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, ImageError> {
        match s {
            "fixed" => Ok(Subformat::Fixed),
            "dynamic" => Ok(Subformat::Dynamic),
            "differencing" => Ok(Subformat::Differencing),
            other => Err(ImageError::InvalidArgument(format!(
                "unknown subformat {other:?}"
            ))),
        }
    }
}

/// What `create` makes.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub format: Format,
    pub subformat: Subformat,
    /// Virtual size; ignored (taken from the parent) for differencing.
    pub size: Option<u64>,
    pub parent: Option<PathBuf>,
    pub block_size: u32,
}

/// Creates an image as `spec` says.
pub fn create(path: &Path, spec: &CreateSpec) -> Result<(), ImageError> {
    let vhdx = VhdxOptions {
        block_size: spec.block_size,
        ..VhdxOptions::default()
    };
    create_with(path, spec, &vhdx)
}

/// [`create`] with the VHDX-only choices (sector sizes, log size; the
/// block size in `vhdx` wins over the spec's for VHDX).
pub fn create_with(path: &Path, spec: &CreateSpec, vhdx: &VhdxOptions) -> Result<(), ImageError> {
    if spec.format == Format::Vhdx {
        return crate::vhdx::tool::create(path, spec, vhdx);
    }
    let need_size = || {
        spec.size
            .ok_or_else(|| ImageError::InvalidArgument("a size is required".into()))
    };
    match (spec.format, spec.subformat) {
        (Format::Raw, _) => create::create_raw(path, need_size()?),
        (Format::Iso, _) => Err(ImageError::InvalidArgument(
            "cannot create ISO images".into(),
        )),
        (Format::Vhdx, _) => unreachable!("handled above"),
        (Format::Vhd, Subformat::Fixed) => create::create_fixed(path, need_size()?),
        (Format::Vhd, Subformat::Dynamic) => {
            create::create_dynamic(path, need_size()?, spec.block_size)
        }
        (Format::Vhd, Subformat::Differencing) => {
            let parent = spec.parent.as_ref().ok_or_else(|| {
                ImageError::InvalidArgument("a differencing disk needs --parent".into())
            })?;
            if spec.size.is_some() {
                return Err(ImageError::InvalidArgument(
                    "a differencing disk takes its size from the parent".into(),
                ));
            }
            create::create_differencing(path, parent, spec.block_size)
        }
    }
}

/// One root directory entry of an ISO, for `info`.
#[derive(Debug, Clone, Serialize)]
pub struct IsoFileInfo {
    pub name: String,
    pub size: u32,
    pub directory: bool,
}

/// Everything `info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub filename: String,
    pub format: &'static str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub subformat: Option<&'static str>,
    pub virtual_size: u64,
    pub file_size: u64,
    /// Host bytes the file occupies (sparse files less than their length).
    pub disk_usage: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Bytes of virtual disk backed by allocated blocks of this image.
    pub allocated_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    /// Parents, nearest first.
    pub parent_chain: Vec<String>,
    pub checksums_ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_label: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub root_directory: Vec<IsoFileInfo>,
    /// VHDX: logical and physical sector sizes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logical_sector_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub physical_sector_size: Option<u32>,
    /// VHDX: entries of a log that the next read-write open replays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_log_entries: Option<usize>,
    /// For an NBD URI: what the server offers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<crate::nbd::image::NbdExportInfo>,
}

impl ImageInfo {
    /// Facts of an image not looked at yet: sizes zero, no metadata.
    pub fn new(filename: String, format: &'static str) -> ImageInfo {
        ImageInfo {
            filename,
            format,
            subformat: None,
            virtual_size: 0,
            file_size: 0,
            disk_usage: 0,
            block_size: None,
            allocated_bytes: 0,
            creator: None,
            unique_id: None,
            parent_chain: Vec::new(),
            checksums_ok: true,
            volume_label: None,
            root_directory: Vec::new(),
            logical_sector_size: None,
            physical_sector_size: None,
            pending_log_entries: None,
            nbd: None,
        }
    }
}

impl std::fmt::Display for ImageInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "image: {}", self.filename)?;
        writeln!(f, "format: {}", self.format)?;
        if let Some(t) = self.subformat {
            writeln!(f, "type: {t}")?;
        }
        writeln!(
            f,
            "virtual size: {} ({} bytes)",
            human(self.virtual_size),
            self.virtual_size
        )?;
        writeln!(
            f,
            "file size: {} bytes ({} on disk)",
            self.file_size,
            human(self.disk_usage)
        )?;
        if let Some(bs) = self.block_size {
            writeln!(f, "block size: {bs}")?;
        }
        if let (Some(l), Some(p)) = (self.logical_sector_size, self.physical_sector_size) {
            writeln!(f, "sector size: {l} logical, {p} physical")?;
        }
        if let Some(n) = self.pending_log_entries {
            writeln!(f, "log: {n} entries to replay")?;
        }
        writeln!(f, "allocated: {} bytes", self.allocated_bytes)?;
        if let Some(c) = &self.creator {
            writeln!(f, "creator: {c}")?;
        }
        if let Some(id) = &self.unique_id {
            writeln!(f, "unique id: {id}")?;
        }
        for (i, p) in self.parent_chain.iter().enumerate() {
            writeln!(f, "parent {}: {p}", i + 1)?;
        }
        writeln!(
            f,
            "checksums ok: {}",
            if self.checksums_ok { "yes" } else { "no" }
        )?;
        if let Some(nbd) = &self.nbd {
            writeln!(f, "export: {:?}", nbd.export)?;
            if let Some(d) = &nbd.description {
                writeln!(f, "description: {d}")?;
            }
            writeln!(
                f,
                "transmission flags: {}",
                nbd.transmission_flags.join(" ")
            )?;
            writeln!(
                f,
                "block sizes: minimum {}, preferred {}, maximum {}",
                nbd.block_size_minimum, nbd.block_size_preferred, nbd.block_size_maximum
            )?;
        }
        if let Some(label) = &self.volume_label {
            writeln!(f, "volume label: {label}")?;
            for e in &self.root_directory {
                let kind = if e.directory { "dir " } else { "file" };
                writeln!(f, "  {kind} {:>12} {}", e.size, e.name)?;
            }
        }
        Ok(())
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn file_facts(path: &Path) -> Result<(u64, u64), ImageError> {
    let m = std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
    Ok((m.len(), m.blocks() * 512))
}

/// `vspa image info` (of an image file or an NBD URI).
pub fn info(path: &Path) -> Result<ImageInfo, ImageError> {
    info_with(path, false)
}

/// [`info`], under `force_share` without image locks (qemu-img's `-U`):
/// for an image a running vspa holds for writing.
pub fn info_with(path: &Path, force_share: bool) -> Result<ImageInfo, ImageError> {
    if crate::nbd::is_uri(path) {
        return crate::nbd::image::info(path);
    }
    let format = detect_format(path)?;
    let (file_size, disk_usage) = file_facts(path)?;
    let mut info = ImageInfo {
        file_size,
        disk_usage,
        ..ImageInfo::new(path.display().to_string(), format.name())
    };
    let options = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
        .force_share(force_share);
    match format {
        Format::Raw => {
            let dev = open_as(path, Format::Raw, &options)?;
            info.virtual_size = dev.info().size();
            info.allocated_bytes = disk_usage.min(info.virtual_size);
        }
        Format::Iso => {
            let (dev, meta) = open_iso(path, &options)?;
            info.virtual_size = dev.info().size();
            info.allocated_bytes = info.virtual_size;
            info.volume_label = Some(meta.volume_label.clone());
            info.root_directory = meta
                .root
                .iter()
                .map(|e| IsoFileInfo {
                    name: e.name.clone(),
                    size: e.size,
                    directory: e.is_dir,
                })
                .collect();
        }
        Format::Vhdx => crate::vhdx::tool::info(path, &mut info)?,
        Format::Vhd => {
            let disk = VhdDisk::open(path, &options)?;
            let meta = disk.meta();
            let footer = &meta.footer;
            info.subformat = Some(meta.disk_type().name());
            info.virtual_size = meta.virtual_size();
            info.block_size = meta.header.as_ref().map(|h| h.block_size.get());
            info.allocated_bytes = allocated_bytes(meta);
            let version = footer.creator_version.get();
            info.creator = Some(format!(
                "{} {}.{} ({})",
                footer.creator(),
                version >> 16,
                version & 0xffff,
                String::from_utf8_lossy(&footer.creator_os).trim_end_matches('\0')
            ));
            info.unique_id = Some(format_uuid(&footer.unique_id));
            info.parent_chain = disk.chain_paths()[1..]
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            info.checksums_ok = disk
                .chain_meta()
                .iter()
                .all(|m| !m.end_footer_damaged && !m.footer_copy_differs);
        }
    }
    Ok(info)
}

fn allocated_bytes(meta: &VhdMeta) -> u64 {
    match meta.disk_type() {
        DiskType::Fixed => meta.virtual_size(),
        _ => {
            let used = meta
                .bat
                .iter()
                .filter(|&&e| e != crate::format::BAT_UNUSED)
                .count() as u64;
            used * u64::from(meta.block_size())
        }
    }
}

/// `vspa image check`: problems make the image unclean; notes do not.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    /// Trailing space no BAT entry references (a crash leftover, not
    /// corruption; a read-write open reclaims it).
    pub leaked_bytes: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// `vspa image check`.
pub fn check(path: &Path) -> CheckReport {
    check_with(path, false)
}

/// [`check`], under `force_share` without image locks (qemu-img's `-U`):
/// for an image a running vspa holds, flushed.
pub fn check_with(path: &Path, force_share: bool) -> CheckReport {
    let mut report = CheckReport::default();
    let format = match detect_format(path)
        .and_then(|f| crate::open::check_named_format(path, f).map(|()| f))
    {
        Ok(f) => f,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    let options = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
        .force_share(force_share);
    match format {
        Format::Raw => report.notes.push("raw image: nothing to check".into()),
        Format::Iso => {
            if let Err(e) = open_iso(path, &options) {
                report.problems.push(e.to_string());
            }
        }
        Format::Vhdx => crate::vhdx::tool::check(path, &mut report),
        Format::Vhd => match VhdDisk::open(path, &options) {
            Err(e) => report.problems.push(e.to_string()),
            Ok(disk) => {
                for (meta, p) in disk.chain_meta().into_iter().zip(disk.chain_paths()) {
                    check_vhd(meta, &p, &mut report);
                }
            }
        },
    }
    report
}

fn check_vhd(meta: &VhdMeta, path: &Path, report: &mut CheckReport) {
    let name = path.display();
    if meta.end_footer_damaged {
        report.problems.push(format!(
            "{name}: footer at the end of the file is damaged (copy at offset 0 is intact)"
        ));
    }
    if meta.footer_copy_differs {
        report.problems.push(format!(
            "{name}: footer copy at offset 0 differs from the footer"
        ));
    }
    let leaked = meta.leaked_bytes();
    if leaked > 0 {
        report.leaked_bytes += leaked;
        report.notes.push(format!(
            "{name}: {leaked} bytes of unreferenced space before the footer (leak from an interrupted allocation; not corruption)"
        ));
    }
    if meta.disk_type() != DiskType::Fixed && meta.file_len > meta.footer_offset + SECTOR {
        report.notes.push(format!(
            "{name}: {} bytes after the footer",
            meta.file_len - meta.footer_offset - SECTOR
        ));
    }
}

/// `vspa image check --repair`: a read-write open and close, which
/// replays a pending VHDX log and reclaims leaked space of VHD and VHDX.
pub fn repair(path: &Path) -> Result<(), ImageError> {
    let options = DiskOptions::default().cache(CacheMode::Cached);
    drop(open_as(path, detect_format(path)?, &options)?);
    Ok(())
}

/// Output of `compare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompareResult {
    pub identical: bool,
    /// Byte offset of the first difference.
    pub first_difference: Option<u64>,
    pub size_a: u64,
    pub size_b: u64,
}

fn open_any_read_only(path: &Path) -> Result<std::sync::Arc<dyn BlockDevice>, ImageError> {
    let options = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached);
    open_as(path, detect_format(path)?, &options)
}

/// `vspa image compare`: identical when the common part matches and any
/// extra part of the larger image reads as zeros.
pub fn compare(a: &Path, b: &Path) -> Result<CompareResult, ImageError> {
    let da = open_any_read_only(a)?;
    let db = open_any_read_only(b)?;
    let mut io = BlockingIo::new().map_err(|e| ImageError::io("io_uring", e))?;
    let (size_a, size_b) = (da.info().size(), db.info().size());
    let mut buf_a = vec![0u8; CHUNK];
    let mut buf_b = vec![0u8; CHUNK];
    let end = size_a.max(size_b);
    let mut pos = 0;
    while pos < end {
        let n = (end - pos).min(CHUNK as u64) as usize;
        if reads_zero(&*da, pos, n) && reads_zero(&*db, pos, n) {
            pos += n as u64;
            continue;
        }
        read_or_zero(&mut io, &*da, pos, &mut buf_a[..n])?;
        read_or_zero(&mut io, &*db, pos, &mut buf_b[..n])?;
        if let Some(i) = buf_a[..n].iter().zip(&buf_b[..n]).position(|(x, y)| x != y) {
            return Ok(CompareResult {
                identical: false,
                first_difference: Some(pos + i as u64),
                size_a,
                size_b,
            });
        }
        pos += n as u64;
    }
    Ok(CompareResult {
        identical: true,
        first_difference: None,
        size_a,
        size_b,
    })
}

/// True when the device's allocation says bytes `[pos, pos + len)` read
/// as zeros (holes of sparse files, unallocated VHD blocks, NBD block
/// status); past the end counts as zeros. Unknown counts as data.
fn reads_zero(dev: &dyn BlockDevice, pos: u64, len: usize) -> bool {
    let info = dev.info();
    let bs = u64::from(info.block_size);
    let first = pos / bs;
    if first >= info.blocks {
        return true;
    }
    let blocks = (len as u64).div_ceil(bs).min(info.blocks - first);
    dev.allocation(first, blocks)
        .is_ok_and(|(state, run)| state.reads_zero() && run >= blocks)
}

/// Reads `buf.len()` bytes at byte `pos`; past the device's end reads zeros.
fn read_or_zero(
    io: &mut BlockingIo,
    dev: &dyn BlockDevice,
    pos: u64,
    buf: &mut [u8],
) -> Result<(), ImageError> {
    let size = dev.info().size();
    let bs = u64::from(dev.info().block_size);
    buf.fill(0);
    if pos >= size {
        return Ok(());
    }
    let n = (size - pos).min(buf.len() as u64) as usize;
    // Positions are multiples of CHUNK, itself a multiple of every block size.
    io.read(dev, pos / bs, &mut buf[..n])?;
    Ok(())
}

/// Where `convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertTarget {
    pub format: Format,
    pub subformat: Subformat,
    pub block_size: u32,
}

/// `vspa image convert`: copies every non-zero chunk of `src` into a new
/// image (zero chunks stay holes or unallocated blocks; chunks the
/// source's allocation reports as zeros are not even read). `progress` is
/// called with (bytes done, total). Either side may be an NBD URI; an NBD
/// destination is an existing export written in place (raw), where zero
/// chunks are written as zeros unless the export already reads zeros there.
pub fn convert(
    src: &Path,
    dst: &Path,
    target: ConvertTarget,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let vhdx = VhdxOptions {
        block_size: target.block_size,
        ..VhdxOptions::default()
    };
    convert_with(src, dst, target, &vhdx, progress)
}

/// [`convert`] with the VHDX-only choices for a VHDX output.
pub fn convert_with(
    src: &Path,
    dst: &Path,
    target: ConvertTarget,
    vhdx: &VhdxOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let input = open_any_read_only(src)?;
    let size = input.info().size();
    let spec = CreateSpec {
        format: target.format,
        subformat: target.subformat,
        size: Some(size),
        parent: None,
        block_size: target.block_size,
    };
    if target.subformat == Subformat::Differencing
        && matches!(target.format, Format::Vhd | Format::Vhdx)
    {
        return Err(ImageError::InvalidArgument(
            "convert cannot produce a differencing disk".into(),
        ));
    }
    let out_block = if target.format == Format::Vhdx {
        u64::from(vhdx.logical_sector)
    } else {
        SECTOR
    };
    if size % out_block != 0 {
        return Err(ImageError::BadVirtualSize(size));
    }
    let in_place = crate::nbd::is_uri(dst);
    let output = if in_place {
        crate::nbd::image::open_target(dst, target.format, size)?
    } else {
        create_with(dst, &spec, vhdx)?;
        let options = DiskOptions::default().cache(CacheMode::Cached);
        open_as(dst, target.format, &options)?
    };
    let mut io = BlockingIo::new().map_err(|e| ImageError::io("io_uring", e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(CHUNK as u64) as usize;
        let zero = reads_zero(&*input, pos, n) || {
            read_or_zero(&mut io, &*input, pos, &mut buf[..n])?;
            buf[..n].iter().all(|&b| b == 0)
        };
        if !zero {
            io.write(&*output, pos / out_block, &buf[..n])?;
        } else if in_place && !reads_zero(&*output, pos, n) {
            buf[..n].fill(0);
            io.write(&*output, pos / out_block, &buf[..n])?;
        }
        pos += n as u64;
        progress(pos, size);
    }
    io.flush(&*output)?;
    Ok(())
}

/// Output of `merge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MergeResult {
    pub parent: PathBuf,
    pub sectors_merged: u64,
    pub child_removed: bool,
}

/// `vspa image merge`: commits differencing disk `child` into its parent,
/// then removes the child unless `keep_child`.
///
/// Crash safety: only sectors present in the child are written to the
/// parent, so the child's view (child over parent) never changes while the
/// merge runs; an interrupted merge leaves a consistent chain and can simply
/// be run again. The parent's own writes use its crash-safe allocation, and
/// the child is removed only after the parent is flushed.
pub fn merge(
    child: &Path,
    keep_child: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeResult, ImageError> {
    if detect_format(child)? == Format::Vhdx {
        return crate::vhdx::tool::merge(child, keep_child, progress);
    }
    // The child keeps a reader's lock of its own; the chain under it takes
    // none, because this process opens the parent for writing below.
    let _child_lock = ImageLock::acquire(child, Access::ReadOnly, crate::file::LOCK_WAIT)?;
    let options = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
        .force_share(true);
    let source = VhdDisk::open(child, &options)?;
    if source.meta().disk_type() != DiskType::Differencing {
        return Err(ImageError::InvalidArgument(format!(
            "{} is not a differencing disk",
            child.display()
        )));
    }
    let parent_path = source.chain_paths()[1].clone();
    let parent = VhdDisk::open(
        &parent_path,
        &DiskOptions::default().cache(CacheMode::Cached),
    )?;
    let meta = source.meta().clone();
    let per_block = u64::from(meta.block_size()) / SECTOR;
    let blocks = meta
        .bat
        .iter()
        .enumerate()
        .filter(|(_, e)| **e != crate::format::BAT_UNUSED)
        .map(|(i, _)| i as u64);
    let present = |s| source.sector_present(s);
    let merged = copy_present(&source, &parent, per_block, blocks, &present, progress)?;
    drop(parent);
    drop(source);
    finish_merge(child, keep_child, parent_path, merged)
}

/// Copies every sector of `source` that `present` says it holds itself
/// into `parent` (the same disk address), block by block over the blocks
/// `blocks` lists (`per_block` sectors each), then flushes `parent`.
/// Returns the sectors copied.
pub(crate) fn copy_present(
    source: &dyn BlockDevice,
    parent: &dyn BlockDevice,
    per_block: u64,
    blocks: impl Iterator<Item = u64>,
    present: &dyn Fn(u64) -> Result<bool, crate::BlockError>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, ImageError> {
    let mut io = BlockingIo::new().map_err(|e| ImageError::io("io_uring", e))?;
    let sector = u64::from(source.info().block_size);
    let total_sectors = source.info().blocks;
    let max_run = CHUNK as u64 / sector;
    let mut buf = vec![0u8; CHUNK];
    let mut merged = 0;
    for index in blocks {
        let first = index * per_block;
        let last = (first + per_block).min(total_sectors);
        let mut s = first;
        while s < last {
            if !present(s)? {
                s += 1;
                continue;
            }
            let mut run = 1;
            while s + run < last && run < max_run && present(s + run)? {
                run += 1;
            }
            let bytes = (run * sector) as usize;
            io.read(source, s, &mut buf[..bytes])?;
            io.write(parent, s, &buf[..bytes])?;
            merged += run;
            s += run;
        }
        progress(last, total_sectors);
    }
    io.flush(parent)?;
    Ok(merged)
}

/// Removes the merged child unless kept.
pub(crate) fn finish_merge(
    child: &Path,
    keep_child: bool,
    parent: PathBuf,
    sectors_merged: u64,
) -> Result<MergeResult, ImageError> {
    if !keep_child {
        std::fs::remove_file(child).map_err(|e| ImageError::io(child, e))?;
    }
    Ok(MergeResult {
        parent,
        sectors_merged,
        child_removed: !keep_child,
    })
}

/// Size argument: bytes with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, ImageError> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(ImageError::InvalidArgument(format!("bad size {text:?}"))),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(1 << shift))
        .ok_or_else(|| ImageError::InvalidArgument(format!("bad size {text:?}")))
}

/// Kind of an open device, for messages.
pub fn kind_name(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Raw => "raw",
        DeviceKind::VhdFixed => "vhd fixed",
        DeviceKind::VhdDynamic => "vhd dynamic",
        DeviceKind::VhdDifferencing => "vhd differencing",
        DeviceKind::Iso => "iso",
        DeviceKind::VhdxFixed => "vhdx fixed",
        DeviceKind::VhdxDynamic => "vhdx dynamic",
        DeviceKind::VhdxDifferencing => "vhdx differencing",
        DeviceKind::Nbd => "nbd",
    }
}

/// The ISO metadata of `path`.
pub fn iso_meta(path: &Path) -> Result<IsoMeta, ImageError> {
    let file = IoFile::open(path, false, CacheMode::Cached)?;
    IsoMeta::read(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }
}
