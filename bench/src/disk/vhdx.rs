//! The VHDX figures of `vspa-bench disk`: 4 KiB random reads and writes at
//! QD32 on a dynamic VHDX holding the same data as the dynamic VHD (2 MiB
//! blocks both; the writes, like the VHD's, on a cache of 4 KiB folios),
//! and first-touch writes: 64 KiB sequential writes at QD32
//! into a fresh dynamic VHD and a fresh dynamic VHDX (every block newly
//! allocated), with a flush after every 16 MiB, in MiB/s.

use super::{IO, QD, vspa_run, warm_small_folios};
use anyhow::bail;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhd::{BlockDevice, CacheMode, Completion, DiskOptions, IoQueue, Op, Request};

/// Block size of every dynamic image the disk bench makes.
const BLOCK: u32 = vhd::format::DEFAULT_BLOCK_SIZE;
/// Bytes per first-touch write, and written between flushes.
const ALLOC_IO: usize = 64 << 10;
const FLUSH_EVERY: u64 = 16 << 20;

#[derive(Debug, Serialize)]
pub(super) struct VhdxFigures {
    vspa_vhdx_dynamic_iops: f64,
    vspa_vhdx_dynamic_randwrite_iops: f64,
    vspa_vhd_alloc_seqwrite_mib_per_s: f64,
    vspa_vhdx_alloc_seqwrite_mib_per_s: f64,
}

impl VhdxFigures {
    pub(super) fn print(&self) {
        let rows = [
            (
                "vspa dynamic VHDX (random read)",
                self.vspa_vhdx_dynamic_iops,
                "IOPS",
            ),
            (
                "vspa dynamic VHDX (random write)",
                self.vspa_vhdx_dynamic_randwrite_iops,
                "IOPS",
            ),
            (
                "vspa new VHD (64K seq write)",
                self.vspa_vhd_alloc_seqwrite_mib_per_s,
                "MiB/s",
            ),
            (
                "vspa new VHDX (64K seq write)",
                self.vspa_vhdx_alloc_seqwrite_mib_per_s,
                "MiB/s",
            ),
        ];
        for (name, value, unit) in rows {
            println!("{name:<34} {value:>12.0} {unit}");
        }
        println!(
            "{:<34} {:>12.2} x VHD",
            "VHDX first-touch writes",
            self.vspa_vhdx_alloc_seqwrite_mib_per_s / self.vspa_vhd_alloc_seqwrite_mib_per_s
        );
    }
}

/// The dynamic VHDX copy of the bench's raw data.
pub(super) fn build(raw: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("dynamic.vhdx");
    let target = vhd::tool::ConvertTarget {
        format: vhd::Format::Vhdx,
        subformat: vhd::tool::Subformat::Dynamic,
        block_size: BLOCK,
    };
    vhd::tool::convert(raw, &path, target, &mut |_, _| {})?;
    Ok(path)
}

fn open(path: &Path, format: vhd::Format) -> anyhow::Result<Arc<dyn BlockDevice>> {
    let options = DiskOptions::default().cache(CacheMode::Cached);
    Ok(vhd::open_as(path, format, &options)?)
}

/// Measures the VHDX figures (`vhdx` warm in the page cache).
pub(super) fn measure(
    vhdx: &Path,
    dir: &Path,
    size: u64,
    time: Duration,
    rounds: u32,
) -> anyhow::Result<VhdxFigures> {
    let disk = open(vhdx, vhd::Format::Vhdx)?;
    let mut read = 0f64;
    for _ in 0..rounds.max(1) {
        read = read.max(vspa_run(&*disk, "randread", QD, IO, time)?);
    }
    warm_small_folios(vhdx)?;
    let write = vspa_run(&*disk, "randwrite", QD, IO, time)?;
    drop(disk);
    let fresh_vhd = dir.join("fresh.vhd");
    vhd::create::create_dynamic(&fresh_vhd, size, BLOCK)?;
    let vhd_alloc = alloc_run(&*open(&fresh_vhd, vhd::Format::Vhd)?, time)?;
    let fresh_vhdx = dir.join("fresh.vhdx");
    let options = vhd::vhdx::VhdxOptions {
        block_size: BLOCK,
        ..Default::default()
    };
    vhd::vhdx::create_vhdx(&fresh_vhdx, vhd::vhdx::VhdxKind::Dynamic, size, &options)?;
    let vhdx_alloc = alloc_run(&*open(&fresh_vhdx, vhd::Format::Vhdx)?, time)?;
    Ok(VhdxFigures {
        vspa_vhdx_dynamic_iops: read,
        vspa_vhdx_dynamic_randwrite_iops: write,
        vspa_vhd_alloc_seqwrite_mib_per_s: vhd_alloc,
        vspa_vhdx_alloc_seqwrite_mib_per_s: vhdx_alloc,
    })
}

/// Sequential 64 KiB writes at QD32 from the start of a fresh image, a
/// flush after every 16 MiB, until `time` passes or the disk is full.
fn alloc_run(dev: &dyn BlockDevice, time: Duration) -> anyhow::Result<f64> {
    let depth = QD as usize;
    let mut queue = IoQueue::new(QD + 1)?;
    let mut memory = vec![0x5au8; depth * ALLOC_IO + 4096];
    let base = memory.as_mut_ptr();
    let align = base.align_offset(4096);
    let sector = u64::from(dev.info().block_size);
    let total = dev.info().size() / ALLOC_IO as u64 * ALLOC_IO as u64;
    let start = Instant::now();
    let (mut next, mut done, mut since_flush) = (0u64, 0u64, 0u64);
    let mut in_flight = 0usize;
    let mut free: Vec<usize> = (0..depth).collect();
    let flush_tag = u64::from(QD);
    let mut flushing = false;
    loop {
        while !flushing && next < total && since_flush < FLUSH_EVERY {
            let Some(slot) = free.pop() else { break };
            let iov = [libc::iovec {
                iov_base: base.wrapping_add(align + slot * ALLOC_IO).cast(),
                iov_len: ALLOC_IO,
            }];
            // SAFETY: each slot's part of `memory` serves one request at a
            // time and outlives the queue's requests (all reaped below).
            let req = unsafe {
                Request::new(
                    Op::Write,
                    next / sector,
                    (ALLOC_IO as u64 / sector) as u32,
                    &iov,
                    slot as u64,
                )
            };
            dev.submit(&mut queue, req)?;
            next += ALLOC_IO as u64;
            since_flush += ALLOC_IO as u64;
            in_flight += 1;
        }
        if !flushing && in_flight == 0 && (since_flush >= FLUSH_EVERY || next >= total) {
            dev.submit(&mut queue, Request::flush(flush_tag))?;
            flushing = true;
        }
        if in_flight == 0 && !flushing {
            break;
        }
        queue.submit_and_wait()?;
        let mut failed = None;
        queue.reap(|c| {
            if let Completion::Request { tag, result } = c {
                if let Err(e) = result {
                    failed = Some(e);
                }
                if tag == flush_tag {
                    flushing = false;
                    since_flush = 0;
                } else {
                    free.push(tag as usize);
                    in_flight -= 1;
                    done += ALLOC_IO as u64;
                }
            }
        });
        if let Some(e) = failed {
            bail!("request failed: {e}");
        }
        if !flushing && in_flight == 0 && (next >= total || start.elapsed() >= time) {
            break;
        }
    }
    debug_assert_eq!(IO, 4096);
    Ok(done as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}
