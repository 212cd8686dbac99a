//! `vspa-bench disk`: the vhd engine against fio and `qemu-img bench`, in one
//! run on the same machine and data.
//!
//! Setup: a raw image of random data (1 GiB by default), converted to a fixed
//! and a dynamic VHD, plus a differencing VHD over the dynamic one holding
//! every other block; all read once so the page cache holds them. Then, each
//! for a fixed time: 4 KiB random reads at QD32 on one worker (fio with
//! io_uring on the raw file; vspa on raw, fixed, dynamic, differencing),
//! 4 KiB sequential reads at QD32 on the dynamic image (qemu-img bench, which
//! only reads sequentially; vspa), and 4 KiB random writes at QD32 (vspa on
//! raw and dynamic). Reads are measured in rounds (all configurations one
//! after another, `--rounds` times) and each figure is its best round.
// Async requests over the bench's own buffers need `Request::new`.
#![allow(unsafe_code)]

use anyhow::{Context, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhd::{BlockDevice, BlockingIo, CacheMode, Completion, DiskOptions, IoQueue, Op, Request};

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

const QD: usize = 32;
const IO: usize = 4096;

/// The figures, in requests per second.
#[derive(Debug, Serialize)]
struct Figures {
    fio_raw_iops: f64,
    vspa_raw_iops: f64,
    vspa_fixed_iops: f64,
    vspa_dynamic_iops: f64,
    vspa_differencing_iops: f64,
    qemu_img_dynamic_seq_iops: f64,
    vspa_dynamic_seq_iops: f64,
    vspa_raw_randwrite_iops: f64,
    vspa_dynamic_randwrite_iops: f64,
}

pub fn run(args: DiskArgs) -> anyhow::Result<()> {
    for tool in ["fio", "qemu-img"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        if !found {
            bail!("{tool} is required (apt-get install fio qemu-utils)");
        }
    }
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
    let images = Images::build(dir, size)?;
    for path in [
        &images.raw,
        &images.fixed,
        &images.dynamic,
        &images.differencing,
    ] {
        warm(path)?;
    }
    let open = |path: &Path, format| -> anyhow::Result<Arc<dyn BlockDevice>> {
        let options = DiskOptions::default().cache(CacheMode::Cached);
        Ok(vhd::open_as(path, format, &options)?)
    };
    let raw = open(&images.raw, vhd::Format::Raw)?;
    let fixed = open(&images.fixed, vhd::Format::Vhd)?;
    let dynamic = open(&images.dynamic, vhd::Format::Vhd)?;
    let differencing = open(&images.differencing, vhd::Format::Vhd)?;
    let mut best = [0f64; 7];
    for _ in 0..args.rounds.max(1) {
        let round = [
            fio(&images.raw, size, args.seconds)?,
            vspa_run(&*raw, Pattern::Random, Op::Read, time)?,
            vspa_run(&*fixed, Pattern::Random, Op::Read, time)?,
            vspa_run(&*dynamic, Pattern::Random, Op::Read, time)?,
            vspa_run(&*differencing, Pattern::Random, Op::Read, time)?,
            qemu_img_bench(&images.dynamic, size)?,
            vspa_run(&*dynamic, Pattern::Sequential, Op::Read, time)?,
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
    let vspa_raw_randwrite_iops = vspa_run(&*raw, Pattern::Random, Op::Write, time)?;
    let vspa_dynamic_randwrite_iops = vspa_run(&*dynamic, Pattern::Random, Op::Write, time)?;
    Ok(Figures {
        fio_raw_iops,
        vspa_raw_iops,
        vspa_fixed_iops,
        vspa_dynamic_iops,
        vspa_differencing_iops,
        qemu_img_dynamic_seq_iops,
        vspa_dynamic_seq_iops,
        vspa_raw_randwrite_iops,
        vspa_dynamic_randwrite_iops,
    })
}

fn print_table(f: &Figures) {
    let row = |name: &str, iops: f64, peer: f64, peer_name: &str| {
        println!(
            "{name:<34} {iops:>12.0} IOPS   {:>5.2} x {peer_name}",
            iops / peer
        );
    };
    println!("4 KiB, QD32, one worker, page cache");
    println!(
        "{:<34} {:>12.0} IOPS",
        "fio io_uring raw (random read)", f.fio_raw_iops
    );
    row(
        "vspa raw (random read)",
        f.vspa_raw_iops,
        f.fio_raw_iops,
        "fio",
    );
    row(
        "vspa fixed VHD (random read)",
        f.vspa_fixed_iops,
        f.fio_raw_iops,
        "fio",
    );
    row(
        "vspa dynamic VHD (random read)",
        f.vspa_dynamic_iops,
        f.fio_raw_iops,
        "fio",
    );
    row(
        "vspa differencing (random read)",
        f.vspa_differencing_iops,
        f.fio_raw_iops,
        "fio",
    );
    println!(
        "{:<34} {:>12.0} IOPS",
        "qemu-img bench dynamic (seq read)", f.qemu_img_dynamic_seq_iops
    );
    row(
        "vspa dynamic VHD (seq read)",
        f.vspa_dynamic_seq_iops,
        f.qemu_img_dynamic_seq_iops,
        "qemu-img",
    );
    println!(
        "{:<34} {:>12.0} IOPS",
        "vspa raw (random write)", f.vspa_raw_randwrite_iops
    );
    println!(
        "{:<34} {:>12.0} IOPS",
        "vspa dynamic VHD (random write)", f.vspa_dynamic_randwrite_iops
    );
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

pub(crate) fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn fio(raw: &Path, size: u64, seconds: u64) -> anyhow::Result<f64> {
    Ok(fio_run(raw, size, "randread", "4k", 32, seconds)?.iops)
}

/// What one fio job measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FioResult {
    pub iops: f64,
    pub mean_lat_us: f64,
}

/// fio with io_uring on a file through the page cache (`--invalidate=0`,
/// so it reads what is cached, as vspa does): one job, `rw` pattern.
pub(crate) fn fio_run(
    path: &Path,
    size: u64,
    rw: &str,
    bs: &str,
    depth: u32,
    seconds: u64,
) -> anyhow::Result<FioResult> {
    let out = Command::new("fio")
        .args(["--name=raw", "--ioengine=io_uring", "--numjobs=1"])
        .args(["--direct=0", "--invalidate=0", "--randrepeat=0"])
        .args(["--time_based", "--output-format=json"])
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--size={size}"))
        .arg(format!("--filename={}", path.display()))
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let job = &v["jobs"][0][side];
    Ok(FioResult {
        iops: job["iops"].as_f64().context("fio JSON has no iops")?,
        mean_lat_us: job["lat_ns"]["mean"]
            .as_f64()
            .context("fio JSON has no latency")?
            / 1000.0,
    })
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

/// Page-aligned buffers, one per request in flight.
struct Buffers {
    memory: Vec<u8>,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            memory: vec![0x5a; QD * IO + 4096],
        }
    }

    fn iovec(&mut self, slot: usize) -> libc::iovec {
        let base = self.memory.as_mut_ptr();
        let align = base.align_offset(4096);
        libc::iovec {
            iov_base: base.wrapping_add(align + slot * IO).cast(),
            iov_len: IO,
        }
    }
}

/// One worker keeps QD32 requests in flight for `time`; returns IOPS.
fn vspa_run(
    dev: &dyn BlockDevice,
    pattern: Pattern,
    op: Op,
    time: Duration,
) -> anyhow::Result<f64> {
    let mut queue = IoQueue::new(QD as u32)?;
    let mut buffers = Buffers::new();
    let memory = [libc::iovec {
        iov_base: buffers.memory.as_mut_ptr().cast(),
        iov_len: buffers.memory.len(),
    }];
    // SAFETY: `buffers` outlives the queue, which is dropped (after every
    // request is reaped) at the end of this function.
    unsafe { queue.register_memory(&memory)? };
    let pages = dev.info().size() / IO as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_seq = 0u64;
    let mut next_page = |rng: &mut u64| match pattern {
        Pattern::Random => {
            *rng = xorshift(*rng);
            *rng % pages
        }
        Pattern::Sequential => {
            let p = next_seq;
            next_seq = (next_seq + 1) % pages;
            p
        }
    };
    let mut submit = |queue: &mut IoQueue, slot: usize, page: u64| -> anyhow::Result<()> {
        let iov = [buffers.iovec(slot)];
        // SAFETY: each slot's buffer is used by at most one request at a
        // time (the slot is the tag and is resubmitted only after its
        // completion is reaped); `buffers` outlives the queue's requests
        // because every request is reaped before this function returns.
        let req = unsafe { Request::new(op, page * 8, 8, &iov, slot as u64) };
        dev.submit(queue, req)?;
        Ok(())
    };
    for slot in 0..QD {
        let page = next_page(&mut rng);
        submit(&mut queue, slot, page)?;
    }
    let start = Instant::now();
    let mut done = 0u64;
    let mut failed = None;
    let mut reaped = Vec::with_capacity(QD);
    loop {
        queue.submit_and_wait()?;
        reaped.clear();
        queue.reap(|c| {
            if let Completion::Request { tag, result } = c {
                if let Err(e) = result {
                    failed = Some(e);
                }
                reaped.push(tag as usize);
            }
        });
        if let Some(e) = failed.take() {
            bail!("request failed: {e}");
        }
        done += reaped.len() as u64;
        if start.elapsed() >= time {
            break;
        }
        for &slot in &reaped {
            let page = next_page(&mut rng);
            submit(&mut queue, slot, page)?;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    while queue.in_flight() > 0 {
        queue.submit_and_wait()?;
        queue.reap(|_| {});
    }
    Ok(done as f64 / elapsed)
}
