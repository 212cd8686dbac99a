//! `vspa-bench write-path`: what one 4 KiB buffered random write into a
//! page-cached file costs through each way a worker could submit it, in one
//! run on the same file. The data behind `vhd`'s choice of submission
//! method (see the README's Measuring section).
//!
//! Methods, one thread submitting (bound to the last CPU, as a VSP worker):
//! - `uring`: io_uring WRITE at QD32 (buffered ext4 writes are punted to
//!   io-wq workers, which serialise on the inode lock);
//! - `uring_nowait`: io_uring WRITE with RWF_NOWAIT, a refused write
//!   resubmitted without it (the count of refusals is reported);
//! - `uring_async`: io_uring WRITE with IOSQE_ASYNC (always punted);
//! - `pwrite`: pwritev on the submitting thread, one write at a time;
//! - `pwritev2_nowait`: pwritev2 with RWF_NOWAIT, then plain pwritev on
//!   EAGAIN (refusals reported);
//! - `pool2`: two helper threads doing pwritev for a submitter that keeps
//!   32 writes in flight;
//! - `direct_uring`, `direct_pwrite`: the same file opened O_DIRECT (the
//!   default cache mode for guests), through io_uring and inline;
//! - `mmap`: a copy into a shared mapping of the file, no system call (a
//!   page faults on its first write through the mapping and again after
//!   writeback write-protects it);
//! - `mmap_mincore`: the same, each write first asking `mincore` whether
//!   the page is cached (a worker must never fault a page in from disk:
//!   that blocks it on a read, and an I/O error there is a SIGBUS), a page
//!   that is not written with pwritev instead (reported as refused).
//!
//! Each method reports IOPS at QD32 (the inline ones have a queue depth of
//! one by nature) and mean latency at QD1.
//!
//! `--sustain SECONDS` instead runs `pwrite` and `mmap_marked` (cache mode
//! `mapped`'s policy, see `vhd::mapped`: a page's first write a pwritev,
//! later ones stores) for that long each, from the same cache state, and
//! reports each second's rate: long enough runs meet the flusher's
//! writeback, whose write-protection makes each page's next store fault.
#![allow(unsafe_code)] // raw syscalls and io_uring SQEs over the bench's own buffers

use anyhow::{Context, bail};
use io_uring::{IoUring, opcode, squeue, types};
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::disk::{warm_small_folios, write_random, xorshift};

#[derive(Debug, clap::Args)]
pub struct WritePathArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Directory for the file (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// File size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Instead of the methods table: `pwrite` and `mmap_marked` for this
    /// many seconds each, with each second's rate.
    #[arg(long)]
    pub sustain: Option<u64>,
}

const IO: usize = 4096;
const QD: usize = 32;

/// One method's figures.
#[derive(Debug, Serialize)]
struct MethodFigures {
    method: &'static str,
    qd32_iops: f64,
    qd1_lat_us: f64,
    /// Writes refused with EAGAIN and redone another way (nowait methods).
    refused_pct: f64,
}

pub fn run(args: WritePathArgs) -> anyhow::Result<()> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("vspa-bench-write-path-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("file.raw");
    if let Some(seconds) = args.sustain {
        let result = sustain(&args, &path, seconds);
        let _ = std::fs::remove_dir_all(&dir);
        return print_sustained(&result?, args.json);
    }
    let result = measure(&args, &path);
    let _ = std::fs::remove_dir_all(&dir);
    let figures = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    println!("4 KiB random writes, page-cached file (4 KiB folios), one submitting thread");
    println!(
        "{:<18} {:>12} {:>12} {:>9}",
        "method", "QD32 IOPS", "QD1 lat us", "refused"
    );
    for m in &figures {
        println!(
            "{:<18} {:>12.0} {:>12.2} {:>8.1}%",
            m.method, m.qd32_iops, m.qd1_lat_us, m.refused_pct
        );
    }
    Ok(())
}

fn measure(args: &WritePathArgs, path: &Path) -> anyhow::Result<Vec<MethodFigures>> {
    let size = args.size_mib << 20;
    write_random(path, size)?;
    warm_small_folios(path)?;
    if let Some(&cpu) = vmbus::cpu::allowed_cpus()?.last() {
        vmbus::cpu::pin_current_thread(cpu)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?
    };
    let time = Duration::from_secs(args.seconds);
    let pages = size / IO as u64;
    let mut out = Vec::new();
    for method in [
        Method::Uring,
        Method::UringNowait,
        Method::UringAsync,
        Method::Pwrite,
        Method::PwriteNowait,
        Method::Pool2,
        // Before the O_DIRECT methods: their writes drop pages from the cache.
        Method::Mmap,
        Method::MmapMincore,
        Method::DirectUring,
        Method::DirectPwrite,
    ] {
        let f = if method.direct() { &direct } else { &file };
        let (qd32, refused) = method.run(f, pages, QD, time)?;
        let (qd1, _) = method.run(f, pages, 1, time)?;
        out.push(MethodFigures {
            method: method.name(),
            qd32_iops: qd32,
            qd1_lat_us: 1e6 / qd1,
            refused_pct: refused * 100.0,
        });
    }
    Ok(out)
}

/// One method's run of `--sustain`.
#[derive(Debug, Serialize)]
struct Sustained {
    method: &'static str,
    mean_iops: f64,
    /// Writes in each second of the run.
    per_second: Vec<u64>,
}

fn print_sustained(runs: &[Sustained], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(runs)?);
        return Ok(());
    }
    for r in runs {
        let low = r.per_second.iter().min().copied().unwrap_or(0);
        let high = r.per_second.iter().max().copied().unwrap_or(0);
        println!(
            "{:<12} mean {:>10.0} IOPS, seconds from {low} to {high}",
            r.method, r.mean_iops
        );
        println!("  {:?}", r.per_second);
    }
    Ok(())
}

/// `pwrite`, then `mmap_marked`, each for `seconds` from a freshly re-read
/// cache of 4 KiB folios.
fn sustain(args: &WritePathArgs, path: &Path, seconds: u64) -> anyhow::Result<Vec<Sustained>> {
    let size = args.size_mib << 20;
    write_random(path, size)?;
    if let Some(&cpu) = vmbus::cpu::allowed_cpus()?.last() {
        vmbus::cpu::pin_current_thread(cpu)?;
    }
    let mut out = Vec::new();
    for (method, store) in [("pwrite", false), ("mmap_marked", true)] {
        warm_small_folios(path)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let per_second = marked_writes(&file, size / IO as u64, seconds, store)?;
        let total: u64 = per_second.iter().sum();
        out.push(Sustained {
            method,
            mean_iops: total as f64 / per_second.len().max(1) as f64,
            per_second,
        });
    }
    Ok(out)
}

/// Random page writes for `seconds`, counted per second; with `store`, a
/// page written before is rewritten by a store into a mapping.
fn marked_writes(
    file: &std::fs::File,
    pages: u64,
    seconds: u64,
    store: bool,
) -> anyhow::Result<Vec<u64>> {
    let map = Mapping::new(file)?;
    let mut written = vec![false; pages as usize];
    let buf = Aligned::new(IO);
    let mut offsets = Offsets::new(pages);
    let start = Instant::now();
    let mut per_second = vec![0u64; seconds as usize];
    loop {
        let second = start.elapsed().as_secs() as usize;
        let Some(count) = per_second.get_mut(second) else {
            return Ok(per_second);
        };
        for _ in 0..64 {
            let offset = offsets.next();
            let seen = &mut written[(offset / IO as u64) as usize];
            if store && *seen {
                map.write(offset, buf.at(0));
            } else if pwrite(file.as_raw_fd(), buf.at(0), offset, 0) != IO as isize {
                bail!("pwritev2: {}", std::io::Error::last_os_error());
            }
            *seen = true;
        }
        *count += 64;
    }
}

#[derive(Debug, Clone, Copy)]
enum Method {
    Uring,
    UringNowait,
    UringAsync,
    Pwrite,
    PwriteNowait,
    Pool2,
    DirectUring,
    DirectPwrite,
    Mmap,
    MmapMincore,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Uring => "uring",
            Method::UringNowait => "uring_nowait",
            Method::UringAsync => "uring_async",
            Method::Pwrite => "pwrite",
            Method::PwriteNowait => "pwritev2_nowait",
            Method::Pool2 => "pool2",
            Method::DirectUring => "direct_uring",
            Method::DirectPwrite => "direct_pwrite",
            Method::Mmap => "mmap",
            Method::MmapMincore => "mmap_mincore",
        }
    }

    fn direct(self) -> bool {
        matches!(self, Method::DirectUring | Method::DirectPwrite)
    }

    /// Writes for `time` with `depth` in flight; returns (IOPS, fraction
    /// of writes refused by a NOWAIT attempt).
    fn run(
        self,
        file: &std::fs::File,
        pages: u64,
        depth: usize,
        time: Duration,
    ) -> anyhow::Result<(f64, f64)> {
        let mut offsets = Offsets::new(pages);
        match self {
            Method::Uring => uring(file, &mut offsets, depth, time, Flavor::Plain),
            Method::UringNowait => uring(file, &mut offsets, depth, time, Flavor::Nowait),
            Method::UringAsync => uring(file, &mut offsets, depth, time, Flavor::Async),
            Method::Pwrite => inline(file, &mut offsets, time, false),
            Method::PwriteNowait => inline(file, &mut offsets, time, true),
            Method::Pool2 => pool(file, &mut offsets, depth, time, 2),
            Method::DirectUring => uring(file, &mut offsets, depth, time, Flavor::Plain),
            Method::DirectPwrite => inline(file, &mut offsets, time, false),
            Method::Mmap => mapped(file, &mut offsets, time, false),
            Method::MmapMincore => mapped(file, &mut offsets, time, true),
        }
    }
}

/// Random page offsets (xorshift, as the disk bench).
struct Offsets {
    pages: u64,
    state: u64,
}

impl Offsets {
    fn new(pages: u64) -> Offsets {
        Offsets {
            pages,
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn next(&mut self) -> u64 {
        self.state = xorshift(self.state);
        self.state % self.pages * IO as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Plain,
    Nowait,
    Async,
}

fn uring(
    file: &std::fs::File,
    offsets: &mut Offsets,
    depth: usize,
    time: Duration,
    flavor: Flavor,
) -> anyhow::Result<(f64, f64)> {
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(64)?;
    let buf = Aligned::new(IO * depth);
    let fd = types::Fd(file.as_raw_fd());
    let sqe = |slot: usize, offset: u64, nowait: bool| -> squeue::Entry {
        let mut w = opcode::Write::new(fd, buf.at(slot * IO).as_ptr(), IO as u32).offset(offset);
        if nowait {
            w = w.rw_flags(libc::RWF_NOWAIT);
        }
        let e = w.build().user_data(slot as u64 | (offset << 8));
        if flavor == Flavor::Async {
            e.flags(squeue::Flags::ASYNC)
        } else {
            e
        }
    };
    let push = |ring: &mut IoUring, e: &squeue::Entry| {
        // SAFETY: the buffer outlives the ring (every SQE is reaped before
        // this function returns).
        unsafe { ring.submission().push(e) }.expect("ring has room for the depth");
    };
    for slot in 0..depth {
        push(
            &mut ring,
            &sqe(slot, offsets.next(), flavor == Flavor::Nowait),
        );
    }
    let start = Instant::now();
    let (mut done, mut refused, mut in_flight) = (0u64, 0u64, depth);
    while in_flight > 0 {
        ring.submit_and_wait(1)?;
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let more = start.elapsed() < time;
        for (data, res) in cqes {
            let slot = (data & 0xff) as usize;
            if res == -libc::EAGAIN {
                refused += 1;
                push(&mut ring, &sqe(slot, data >> 8, false));
                continue;
            }
            if res != IO as i32 {
                bail!("io_uring write returned {res}");
            }
            done += 1;
            if more {
                push(
                    &mut ring,
                    &sqe(slot, offsets.next(), flavor == Flavor::Nowait),
                );
            } else {
                in_flight -= 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((done as f64 / secs, refused as f64 / done.max(1) as f64))
}

/// Page-aligned write buffers (O_DIRECT needs them).
struct Aligned {
    memory: Vec<u8>,
    skip: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let memory = vec![0x5au8; len + 4096];
        let skip = memory.as_ptr().align_offset(4096);
        Aligned { memory, skip }
    }

    /// The page at byte `at`.
    fn at(&self, at: usize) -> &[u8] {
        &self.memory[self.skip + at..][..IO]
    }
}

fn pwrite(fd: i32, buf: &[u8], offset: u64, flags: i32) -> isize {
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a live buffer the kernel only reads.
    unsafe { libc::pwritev2(fd, &iov, 1, offset as i64, flags) }
}

fn inline(
    file: &std::fs::File,
    offsets: &mut Offsets,
    time: Duration,
    nowait: bool,
) -> anyhow::Result<(f64, f64)> {
    let buf = Aligned::new(IO);
    let fd = file.as_raw_fd();
    one_at_a_time(offsets, time, |offset| {
        let page = buf.at(0);
        if nowait && pwrite(fd, page, offset, libc::RWF_NOWAIT) == IO as isize {
            return Ok(false);
        }
        if pwrite(fd, page, offset, 0) != IO as isize {
            bail!("pwritev2: {}", std::io::Error::last_os_error());
        }
        Ok(nowait)
    })
}

/// Writes one page at a time with `write` (true: the first way was
/// refused) for `time`; returns (IOPS, fraction refused).
fn one_at_a_time(
    offsets: &mut Offsets,
    time: Duration,
    mut write: impl FnMut(u64) -> anyhow::Result<bool>,
) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let (mut done, mut refused) = (0u64, 0u64);
    while start.elapsed() < time {
        for _ in 0..64 {
            refused += u64::from(write(offsets.next())?);
            done += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((done as f64 / secs, refused as f64 / done.max(1) as f64))
}

/// A shared mapping of a whole file, unmapped on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &std::fs::File) -> anyhow::Result<Mapping> {
        let len = usize::try_from(file.metadata()?.len())?;
        // SAFETY: a new shared mapping of the bench's own file (nothing
        // truncates it while mapped); only `Mapping` uses the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(Mapping {
            base: base.cast(),
            len,
        })
    }

    /// True if the page at `offset` is in the page cache.
    fn resident(&self, offset: u64) -> anyhow::Result<bool> {
        let mut vec = 0u8;
        // SAFETY: one page inside the mapping; the kernel writes one byte.
        let rc = unsafe { libc::mincore(self.base.add(offset as usize).cast(), IO, &mut vec) };
        if rc != 0 {
            bail!("mincore: {}", std::io::Error::last_os_error());
        }
        Ok(vec & 1 != 0)
    }

    fn write(&self, offset: u64, page: &[u8]) {
        assert!(offset as usize + page.len() <= self.len);
        // SAFETY: in bounds (checked above) of a live writable mapping;
        // the source is a separate buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(page.as_ptr(), self.base.add(offset as usize), page.len())
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Copies into a fresh shared mapping (its page faults count); with
/// `check`, a page `mincore` says is not cached is written with pwritev.
fn mapped(
    file: &std::fs::File,
    offsets: &mut Offsets,
    time: Duration,
    check: bool,
) -> anyhow::Result<(f64, f64)> {
    let map = Mapping::new(file)?;
    let buf = Aligned::new(IO);
    let fd = file.as_raw_fd();
    one_at_a_time(offsets, time, |offset| {
        if !check || map.resident(offset)? {
            map.write(offset, buf.at(0));
            return Ok(false);
        }
        if pwrite(fd, buf.at(0), offset, 0) != IO as isize {
            bail!("pwritev2: {}", std::io::Error::last_os_error());
        }
        Ok(true)
    })
}

fn pool(
    file: &std::fs::File,
    offsets: &mut Offsets,
    depth: usize,
    time: Duration,
    threads: usize,
) -> anyhow::Result<(f64, f64)> {
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (tx, rx) = mpsc::channel::<(usize, u64)>();
        let done_tx = done_tx.clone();
        let fd = file.as_raw_fd();
        senders.push(tx);
        handles.push(std::thread::spawn(move || {
            let buf = vec![0x5au8; IO];
            for (slot, offset) in rx {
                let n = pwrite(fd, &buf, offset, 0);
                let _ = done_tx.send(if n == IO as isize { slot } else { usize::MAX });
            }
        }));
    }
    let mut next = 0usize;
    let mut send = |senders: &[mpsc::Sender<(usize, u64)>], slot: usize, offset: u64| {
        let _ = senders[next % threads].send((slot, offset));
        next += 1;
    };
    for slot in 0..depth {
        send(&senders, slot, offsets.next());
    }
    let start = Instant::now();
    let (mut done, mut in_flight) = (0u64, depth);
    while in_flight > 0 {
        let slot = done_rx.recv()?;
        if slot == usize::MAX {
            bail!("pool write failed");
        }
        done += 1;
        if start.elapsed() < time {
            send(&senders, slot, offsets.next());
        } else {
            in_flight -= 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(senders);
    for h in handles {
        let _ = h.join();
    }
    Ok((done as f64 / secs, 0.0))
}
