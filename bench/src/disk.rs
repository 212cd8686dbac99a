//! `vspa-bench disk`: the vhd engine alone (one worker's `IoQueue`, no VSP
//! or ring) against fio and `qemu-img bench`, in one run on the same
//! machine and data.
//!
//! Setup: a raw image of random data (1 GiB by default), converted to a fixed
//! and a dynamic VHD, plus a differencing VHD over the dynamic one holding
//! every other block; all read once so the page cache holds them. The
//! measuring thread and fio are bound to the last CPU. Then, each for a
//! fixed time:
//! - reads, in rounds (all configurations one after another, `--rounds`
//!   times, each figure its best round): 4 KiB random reads at QD32 (fio,
//!   tuned, psync and io_uring, on the raw file; vspa on raw, fixed,
//!   dynamic, differencing), 4 KiB sequential reads at QD32 on the dynamic
//!   image (qemu-img bench, which only reads sequentially; vspa);
//! - writes, on a cache of 4 KiB folios (see [`warm_small_folios`]): 4 KiB
//!   random writes at QD32 and QD1 (vspa on raw and dynamic; fio psync and
//!   io_uring on the raw file), and 64 KiB sequential writes at QD32 once
//!   through a fresh dynamic VHD (every block allocated on first touch)
//!   against fio writing a fresh sparse file;
//! - VHDX (see [`vhdx`]): the same data as a dynamic VHDX, its random reads
//!   and writes, and first-touch writes with a flush every 16 MiB into a
//!   fresh VHD and a fresh VHDX.
// Async requests over the bench's own buffers need `Request::new`.
#![allow(unsafe_code)]

use anyhow::{Context, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhd::{BlockDevice, BlockingIo, CacheMode, Completion, DiskOptions, IoQueue, Op, Request};

use crate::fio::{FioJob, mib_per_s, qd1_lat_us};
use crate::storage::Access;

mod vhdx;

#[derive(Debug, clap::Args)]
pub struct DiskArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Directory for the images (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Rounds of the read measurements; each figure is its best round
    /// (host noise only ever slows a round down).
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Keep the images afterwards.
    #[arg(long)]
    pub keep: bool,
}

const QD: u32 = 32;
const IO: u32 = 4096;
const SEQ: u32 = 64 << 10;

/// The figures: requests per second unless the name says otherwise.
#[derive(Debug, Serialize)]
struct Figures {
    cpu: usize,
    /// fio's best engine for 4 KiB random reads at QD32 on the raw file.
    fio_raw_iops: f64,
    fio_raw_engine: &'static str,
    vspa_raw_iops: f64,
    vspa_fixed_iops: f64,
    vspa_dynamic_iops: f64,
    vspa_differencing_iops: f64,
    qemu_img_dynamic_seq_iops: f64,
    vspa_dynamic_seq_iops: f64,
    vspa_raw_randwrite_iops: f64,
    vspa_dynamic_randwrite_iops: f64,
    fio_psync_randwrite_qd32_iops: f64,
    fio_io_uring_randwrite_qd32_iops: f64,
    fio_best_randwrite_qd32_iops: f64,
    fio_best_randwrite_qd32_engine: &'static str,
    randwrite_qd32_ratio: f64,
    vspa_raw_randwrite_qd1_lat_us: f64,
    vspa_dynamic_randwrite_qd1_lat_us: f64,
    fio_psync_randwrite_qd1_lat_us: f64,
    fio_io_uring_randwrite_qd1_lat_us: f64,
    randwrite_qd1_lat_ratio: f64,
    /// The dynamic image in cache mode `mapped` (see `vhd::mapped`).
    vspa_dynamic_mapped_randwrite_iops: f64,
    mapped_randwrite_qd32_ratio: f64,
    vspa_dynamic_mapped_randwrite_qd1_lat_us: f64,
    mapped_randwrite_qd1_lat_ratio: f64,
    vspa_alloc_seqwrite_mib_per_s: f64,
    fio_psync_fresh_seqwrite_64k_mib_per_s: f64,
    alloc_seqwrite_ratio: f64,
    #[serde(flatten)]
    vhdx: vhdx::VhdxFigures,
}

pub fn run(args: DiskArgs) -> anyhow::Result<()> {
    crate::fio::require(&["fio", "qemu-img"])?;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("vspa-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure(&args, &dir);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let figures = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        print_table(&figures);
    }
    Ok(())
}

fn measure(args: &DiskArgs, dir: &Path) -> anyhow::Result<Figures> {
    let size = args.size_mib << 20;
    let time = Duration::from_secs(args.seconds);
    let (cpu, _) = crate::storage::bench_cpus()?;
    vmbus::cpu::pin_current_thread(cpu)?;
    let images = Images::build(dir, size)?;
    for path in [
        &images.raw,
        &images.fixed,
        &images.dynamic,
        &images.differencing,
    ] {
        warm(path)?;
    }
    let open_in = |path: &Path, format, read_only, cache| -> anyhow::Result<Arc<dyn BlockDevice>> {
        let options = DiskOptions::default().read_only(read_only).cache(cache);
        Ok(vhd::open_as(path, format, &options)?)
    };
    let open = |path: &Path, format, read_only| open_in(path, format, read_only, CacheMode::Cached);
    // Read-only for the reads: the dynamic image is then shared with the
    // differencing disk's parent reader and with qemu-img bench (image locks).
    let raw = open(&images.raw, vhd::Format::Raw, true)?;
    let fixed = open(&images.fixed, vhd::Format::Vhd, true)?;
    let dynamic = open(&images.dynamic, vhd::Format::Vhd, true)?;
    let differencing = open(&images.differencing, vhd::Format::Vhd, true)?;
    let job = |rw, bs, depth| FioJob {
        path: &images.raw,
        size,
        rw,
        bs,
        depth,
        seconds: args.seconds,
        cpu: Some(cpu),
    };
    let run = |dev: &dyn BlockDevice, pattern, depth, bs| vspa_run(dev, pattern, depth, bs, time);
    let mut best = [0f64; 7];
    let mut fio_raw_engine = "io_uring";
    for _ in 0..args.rounds.max(1) {
        let fio = crate::fio::pair(job("randread", IO, QD))?;
        if fio.best_iops() > best[0] {
            fio_raw_engine = fio.best_engine();
        }
        let round = [
            fio.best_iops(),
            run(&*raw, "randread", QD, IO)?,
            run(&*fixed, "randread", QD, IO)?,
            run(&*dynamic, "randread", QD, IO)?,
            run(&*differencing, "randread", QD, IO)?,
            qemu_img_bench(&images.dynamic, size)?,
            run(&*dynamic, "seqread", QD, IO)?,
        ];
        for (b, r) in best.iter_mut().zip(round) {
            *b = b.max(r);
        }
    }
    let [
        fio_raw_iops,
        vspa_raw_iops,
        vspa_fixed_iops,
        vspa_dynamic_iops,
        vspa_differencing_iops,
        qemu_img_dynamic_seq_iops,
        vspa_dynamic_seq_iops,
    ] = best;
    drop((raw, fixed, dynamic, differencing));
    for path in [&images.raw, &images.dynamic] {
        warm_small_folios(path)?;
    }
    let raw = open(&images.raw, vhd::Format::Raw, false)?;
    let dynamic = open(&images.dynamic, vhd::Format::Vhd, false)?;
    let vspa_raw_randwrite_iops = run(&*raw, "randwrite", QD, IO)?;
    let vspa_dynamic_randwrite_iops = run(&*dynamic, "randwrite", QD, IO)?;
    let vspa_raw_randwrite_qd1_lat_us = qd1_lat_us(run(&*raw, "randwrite", 1, IO)?);
    let vspa_dynamic_randwrite_qd1_lat_us = qd1_lat_us(run(&*dynamic, "randwrite", 1, IO)?);
    let rw32 = crate::fio::pair(job("randwrite", IO, QD))?;
    let rw1 = crate::fio::pair(job("randwrite", IO, 1))?;
    drop((raw, dynamic));
    let mapped = open_in(&images.dynamic, vhd::Format::Vhd, false, CacheMode::Mapped)?;
    let vspa_dynamic_mapped_randwrite_iops = run(&*mapped, "randwrite", QD, IO)?;
    let vspa_dynamic_mapped_randwrite_qd1_lat_us = qd1_lat_us(run(&*mapped, "randwrite", 1, IO)?);
    drop(mapped);
    sync_all();
    let fresh = dir.join("first-touch.vhd");
    vhd::create::create_dynamic(&fresh, size, vhd::format::DEFAULT_BLOCK_SIZE)?;
    let alloc = {
        let disk = open(&fresh, vhd::Format::Vhd, false)?;
        run(&*disk, "seqwrite-once", QD, SEQ)?
    };
    std::fs::remove_file(&fresh)?;
    let vspa_alloc_seqwrite_mib_per_s = mib_per_s(alloc, SEQ);
    sync_all();
    let fio_fresh = crate::storage::fresh_seqwrite(dir, size, cpu)?;
    let vhdx_image = vhdx::build(&images.raw, dir)?;
    warm(&vhdx_image)?;
    let vhdx = vhdx::measure(&vhdx_image, dir, size, time, args.rounds)?;
    Ok(Figures {
        cpu,
        fio_raw_iops,
        fio_raw_engine,
        vspa_raw_iops,
        vspa_fixed_iops,
        vspa_dynamic_iops,
        vspa_differencing_iops,
        qemu_img_dynamic_seq_iops,
        vspa_dynamic_seq_iops,
        vspa_raw_randwrite_iops,
        vspa_dynamic_randwrite_iops,
        fio_psync_randwrite_qd32_iops: rw32.psync_iops,
        fio_io_uring_randwrite_qd32_iops: rw32.io_uring_iops,
        fio_best_randwrite_qd32_iops: rw32.best_iops(),
        fio_best_randwrite_qd32_engine: rw32.best_engine(),
        randwrite_qd32_ratio: vspa_dynamic_randwrite_iops / rw32.best_iops(),
        vspa_raw_randwrite_qd1_lat_us,
        vspa_dynamic_randwrite_qd1_lat_us,
        fio_psync_randwrite_qd1_lat_us: qd1_lat_us(rw1.psync_iops),
        fio_io_uring_randwrite_qd1_lat_us: qd1_lat_us(rw1.io_uring_iops),
        randwrite_qd1_lat_ratio: vspa_dynamic_randwrite_qd1_lat_us / qd1_lat_us(rw1.psync_iops),
        vspa_dynamic_mapped_randwrite_iops,
        mapped_randwrite_qd32_ratio: vspa_dynamic_mapped_randwrite_iops / rw32.best_iops(),
        vspa_dynamic_mapped_randwrite_qd1_lat_us,
        mapped_randwrite_qd1_lat_ratio: vspa_dynamic_mapped_randwrite_qd1_lat_us
            / qd1_lat_us(rw1.psync_iops),
        vspa_alloc_seqwrite_mib_per_s,
        fio_psync_fresh_seqwrite_64k_mib_per_s: fio_fresh,
        alloc_seqwrite_ratio: vspa_alloc_seqwrite_mib_per_s / fio_fresh,
        vhdx,
    })
}

fn print_table(f: &Figures) {
    let row = |name: &str, v: f64, unit: &str, peer: f64, peer_name: &str| {
        println!(
            "{name:<36} {v:>12.1} {unit:<6} {:>6.2} x {peer_name}",
            v / peer
        );
    };
    let plain = |name: &str, v: f64, unit: &str| println!("{name:<36} {v:>12.1} {unit}");
    println!("one worker on CPU {}, page cache", f.cpu);
    println!("4 KiB random reads, QD32");
    plain(
        &format!("fio {} raw", f.fio_raw_engine),
        f.fio_raw_iops,
        "IOPS",
    );
    row("vspa raw", f.vspa_raw_iops, "IOPS", f.fio_raw_iops, "fio");
    row(
        "vspa fixed VHD",
        f.vspa_fixed_iops,
        "IOPS",
        f.fio_raw_iops,
        "fio",
    );
    row(
        "vspa dynamic VHD",
        f.vspa_dynamic_iops,
        "IOPS",
        f.fio_raw_iops,
        "fio",
    );
    row(
        "vspa differencing",
        f.vspa_differencing_iops,
        "IOPS",
        f.fio_raw_iops,
        "fio",
    );
    println!("4 KiB sequential reads, QD32");
    plain(
        "qemu-img bench dynamic",
        f.qemu_img_dynamic_seq_iops,
        "IOPS",
    );
    row(
        "vspa dynamic VHD",
        f.vspa_dynamic_seq_iops,
        "IOPS",
        f.qemu_img_dynamic_seq_iops,
        "qemu-img",
    );
    println!("4 KiB random writes (4 KiB folios)");
    plain(
        "fio psync raw, QD32 (=QD1)",
        f.fio_psync_randwrite_qd32_iops,
        "IOPS",
    );
    plain(
        "fio io_uring raw, QD32",
        f.fio_io_uring_randwrite_qd32_iops,
        "IOPS",
    );
    let best = f.fio_best_randwrite_qd32_iops;
    row(
        "vspa raw, QD32",
        f.vspa_raw_randwrite_iops,
        "IOPS",
        best,
        "fio best",
    );
    row(
        "vspa dynamic VHD, QD32",
        f.vspa_dynamic_randwrite_iops,
        "IOPS",
        best,
        "fio best",
    );
    row(
        "vspa dynamic VHD mapped, QD32",
        f.vspa_dynamic_mapped_randwrite_iops,
        "IOPS",
        best,
        "fio best",
    );
    plain("fio psync raw, QD1", f.fio_psync_randwrite_qd1_lat_us, "us");
    plain(
        "fio io_uring raw, QD1",
        f.fio_io_uring_randwrite_qd1_lat_us,
        "us",
    );
    let psync = f.fio_psync_randwrite_qd1_lat_us;
    row(
        "vspa raw, QD1",
        f.vspa_raw_randwrite_qd1_lat_us,
        "us",
        psync,
        "fio psync",
    );
    row(
        "vspa dynamic VHD, QD1",
        f.vspa_dynamic_randwrite_qd1_lat_us,
        "us",
        psync,
        "fio psync",
    );
    row(
        "vspa dynamic VHD mapped, QD1",
        f.vspa_dynamic_mapped_randwrite_qd1_lat_us,
        "us",
        psync,
        "fio psync",
    );
    println!("64 KiB sequential writes, first touch");
    plain(
        "fio psync fresh sparse file",
        f.fio_psync_fresh_seqwrite_64k_mib_per_s,
        "MiB/s",
    );
    row(
        "vspa fresh dynamic VHD, QD32",
        f.vspa_alloc_seqwrite_mib_per_s,
        "MiB/s",
        f.fio_psync_fresh_seqwrite_64k_mib_per_s,
        "fio",
    );
    f.vhdx.print();
}

struct Images {
    raw: PathBuf,
    fixed: PathBuf,
    dynamic: PathBuf,
    differencing: PathBuf,
}

impl Images {
    /// Random data in a raw file, converted by vspa to fixed and dynamic
    /// VHDs; a differencing child holding every other 2 MiB block (the same
    /// data, so reads mix child and parent).
    fn build(dir: &Path, size: u64) -> anyhow::Result<Images> {
        let images = Images {
            raw: dir.join("disk.raw"),
            fixed: dir.join("fixed.vhd"),
            dynamic: dir.join("dynamic.vhd"),
            differencing: dir.join("child.vhd"),
        };
        write_random(&images.raw, size)?;
        let mut quiet = |_, _| {};
        for (path, subformat) in [
            (&images.fixed, vhd::tool::Subformat::Fixed),
            (&images.dynamic, vhd::tool::Subformat::Dynamic),
        ] {
            let target = vhd::tool::ConvertTarget {
                format: vhd::Format::Vhd,
                subformat,
                block_size: vhd::format::DEFAULT_BLOCK_SIZE,
            };
            vhd::tool::convert(&images.raw, path, target, &mut quiet)?;
        }
        vhd::create::create_differencing(
            &images.differencing,
            &images.dynamic,
            vhd::format::DEFAULT_BLOCK_SIZE,
        )?;
        let parent = vhd::open_as(
            &images.dynamic,
            vhd::Format::Vhd,
            &DiskOptions::default()
                .read_only(true)
                .cache(CacheMode::Cached),
        )?;
        let child = vhd::open_as(
            &images.differencing,
            vhd::Format::Vhd,
            &DiskOptions::default().cache(CacheMode::Cached),
        )?;
        let mut io = BlockingIo::new()?;
        let block = u64::from(vhd::format::DEFAULT_BLOCK_SIZE);
        let mut buf = vec![0u8; block as usize];
        for b in (0..size / block).step_by(2) {
            io.read(&*parent, b * block / 512, &mut buf)?;
            io.write(&*child, b * block / 512, &buf)?;
        }
        io.flush(&*child)?;
        Ok(images)
    }
}

pub(crate) fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size / chunk.len() as u64 {
        for word in chunk.chunks_exact_mut(8) {
            state = xorshift(state);
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk)?;
    }
    file.flush()?;
    Ok(())
}

/// Puts a file in the page cache the same way for every image: written
/// back, evicted, then read sequentially (so readahead gives every file the
/// same large folios, whatever pattern wrote it).
pub(crate) fn warm(path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut file = std::fs::File::open(path)?;
    file.sync_all()?;
    // SAFETY: plain syscall on a live descriptor; it only drops clean pages.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!("posix_fadvise on {}: errno {rc}", path.display());
    }
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf)? > 0 {}
    Ok(())
}

/// Puts a file in the page cache in 4 KiB folios: written back, evicted,
/// then read a page at a time with readahead off. Writes are measured in
/// this state: on this kernel a 4 KiB buffered write into a large folio
/// (what [`warm`]'s readahead builds) costs 15-30x more than into a small
/// one, for every writer alike (fio psync: ~15,000 vs ~400,000 IOPS), so
/// large folios would measure the kernel's folio handling, not vspa.
pub(crate) fn warm_small_folios(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    file.sync_all()?;
    let fd = file.as_raw_fd();
    for advice in [libc::POSIX_FADV_DONTNEED, libc::POSIX_FADV_RANDOM] {
        // SAFETY: plain syscall on a live descriptor.
        let rc = unsafe { libc::posix_fadvise(fd, 0, 0, advice) };
        if rc != 0 {
            bail!("posix_fadvise on {}: errno {rc}", path.display());
        }
    }
    let len = file.metadata()?.len();
    let mut page = [0u8; 4096];
    let mut at = 0;
    while at < len {
        file.read_at(&mut page, at)?;
        at += page.len() as u64;
    }
    Ok(())
}

/// Writes back every dirty page, so a first-touch write run starts clean.
pub(crate) fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

pub(crate) fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// `qemu-img bench`: one sequential pass over the image, 4 KiB at QD32.
fn qemu_img_bench(image: &Path, size: u64) -> anyhow::Result<f64> {
    let count = size / IO as u64;
    let out = Command::new("qemu-img")
        .args([
            "bench",
            "-f",
            "vpc",
            "-t",
            "writeback",
            "-d",
            "32",
            "-s",
            "4k",
        ])
        .arg("-c")
        .arg(count.to_string())
        .arg(image)
        .output()
        .context("running qemu-img bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "Run completed in 1.234 seconds."
    let seconds: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .context("qemu-img bench printed no run time")?;
    Ok(count as f64 / seconds)
}

/// Page-aligned buffers, one per request in flight.
struct Buffers {
    memory: Vec<u8>,
    size: usize,
}

impl Buffers {
    fn new(depth: u32, size: u32) -> Buffers {
        let size = size as usize;
        Buffers {
            memory: vec![0x5a; depth as usize * size + 4096],
            size,
        }
    }

    fn iovec(&mut self, slot: usize) -> libc::iovec {
        let base = self.memory.as_mut_ptr();
        let align = base.align_offset(4096);
        libc::iovec {
            iov_base: base.wrapping_add(align + slot * self.size).cast(),
            iov_len: self.size,
        }
    }
}

/// One worker keeps `depth` requests of `bs` bytes in flight for `time`
/// (or one pass, for `seqwrite-once`); returns IOPS.
fn vspa_run(
    dev: &dyn BlockDevice,
    pattern: &str,
    depth: u32,
    bs: u32,
    time: Duration,
) -> anyhow::Result<f64> {
    let mut queue = IoQueue::new(depth)?;
    let mut buffers = Buffers::new(depth, bs);
    let memory = [libc::iovec {
        iov_base: buffers.memory.as_mut_ptr().cast(),
        iov_len: buffers.memory.len(),
    }];
    // SAFETY: `buffers` outlives the queue, which is dropped (after every
    // request is reaped) at the end of this function.
    unsafe { queue.register_memory(&memory)? };
    let mut access = Access::new(pattern, dev.info().size(), bs)?;
    let op = if access.write { Op::Write } else { Op::Read };
    let blocks = bs / 512;
    let mut submit = |queue: &mut IoQueue, slot: usize, offset: u64| -> anyhow::Result<()> {
        let iov = [buffers.iovec(slot)];
        // SAFETY: each slot's buffer is used by at most one request at a
        // time (the slot is the tag and is resubmitted only after its
        // completion is reaped); `buffers` outlives the queue's requests
        // because every request is reaped before this function returns.
        let req = unsafe { Request::new(op, offset / 512, blocks, &iov, slot as u64) };
        dev.submit(queue, req)?;
        Ok(())
    };
    let start = Instant::now();
    let mut free: Vec<usize> = (0..depth as usize).collect();
    let mut done = 0u64;
    let mut failed = None;
    loop {
        let running = start.elapsed() < time;
        while let Some(slot) = free.pop() {
            let Some(offset) = access.next().filter(|_| running) else {
                free.push(slot);
                break;
            };
            submit(&mut queue, slot, offset)?;
        }
        if queue.in_flight() == 0 {
            break;
        }
        queue.submit_and_wait()?;
        queue.reap(|c| {
            if let Completion::Request { tag, result } = c {
                if let Err(e) = result {
                    failed = Some(e);
                }
                free.push(tag as usize);
                done += 1;
            }
        });
        if let Some(e) = failed.take() {
            bail!("request failed: {e}");
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}
