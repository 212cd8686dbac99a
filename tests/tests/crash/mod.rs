//! The SIGKILL harness shared by the VHD and VHDX crash tests: a child
//! process writes runs of random 4 KiB pages to a dynamic or differencing
//! image at queue depth 8 with periodic flushes, and is SIGKILLed at a
//! random moment.
//! After each kill `vspa image check` must be clean (plus the format's own
//! independent checks) and every write acknowledged before the last
//! completed flush must read back (later writes may or may not have landed,
//! but each page holds exactly one version that was written; under cache
//! mode `mapped` a page written when the kill came may instead be torn: the
//! start of one allowed version, the rest of another). The same image
//! carries on from trial to trial, so each run also reopens (and repairs) a
//! crashed image.
//!
//! A [`Series`] says how the child writes: through the page cache (its
//! whole-page writes then run inline, `pwritev2` on the worker; under
//! `mapped`, rewrites between flushes are stores into a mapping of the file)
//! or O_DIRECT (through io_uring), how many pages a write spans (a run over
//! a block boundary allocates several blocks in one request) and whether
//! each flush interval's writes crowd into a small window (so pages are
//! rewritten before the next flush). The child checks that it took the
//! write path the series means to test.
//!
//! The child is the test binary itself, re-run with `CHILD_ENV` set.
#![allow(unsafe_code, dead_code)]

use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use vhd::{BlockDevice, BlockingIo, CacheMode, Completion, DiskOptions, IoQueue, Op, Request};
use vspa_tests::workspace_bin;

pub const CHILD_ENV: &str = "VSPA_VHD_CRASH_CHILD";
const DEPTH: usize = 8;

/// One series of kill trials.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    pub differencing: bool,
    /// How the child opens the image: `Direct` writes go to io_uring,
    /// `Cached` ones run inline.
    pub cache: CacheMode,
    /// Pages per write request: 1..=max_run.
    pub max_run: u64,
    /// Pages of the window each flush interval's writes fall in (placed at
    /// random for each interval); 0 for the whole image.
    pub window: u64,
    /// Virtual size of the image.
    pub size: u64,
    pub trials: u64,
}

impl Series {
    fn pages(&self) -> u64 {
        self.size / 4096
    }
}

/// What the harness needs from an image format.
pub trait Format {
    /// Makes an image of `size` bytes (for a differencing one, also its
    /// parent, every page of which holds `page(index, 0)`); returns the
    /// image's path.
    fn create(&self, dir: &Path, size: u64, differencing: bool) -> PathBuf;
    fn open(&self, path: &Path, options: &DiskOptions) -> Arc<dyn BlockDevice>;
    /// Checks by other tools after a kill (may repair the image first).
    fn after_kill(&self, _image: &Path, _trial: u64, _differencing: bool) {}
    /// Trials on one image before a fresh one is made (so that each new
    /// image's first trials allocate its blocks).
    fn trials_per_image(&self) -> u64 {
        u64::MAX
    }
    /// How long after its start the child is killed, in milliseconds (a
    /// random point of this range).
    fn kill_window(&self) -> std::ops::Range<u64> {
        10..200
    }
}

/// Self-describing page content: index, generation, then derived bytes.
pub fn page(index: u64, generation: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation);
    let mut p = vec![0u8; 4096];
    rng.fill_bytes(&mut p);
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..16].copy_from_slice(&generation.to_le_bytes());
    p
}

/// Writes every page of `disk` with generation 0 and flushes.
pub fn fill_base(disk: &dyn BlockDevice) {
    let mut io = BlockingIo::new().unwrap();
    let per_page = 4096 / u64::from(disk.info().block_size);
    for index in 0..disk.info().size() / 4096 {
        io.write(disk, index * per_page, &page(index, 0)).unwrap();
    }
    io.flush(disk).unwrap();
}

/// Child: writes until killed. Logs "S page gen" for every page of a write
/// before submitting it and "F" after each flush completes (all writes
/// drained first), one unbuffered write(2) per line.
fn child(
    format: &dyn Format,
    image: &Path,
    log: &Path,
    first_gen: u64,
    seed: u64,
    series: Series,
) -> ! {
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let disk = format.open(image, &DiskOptions::default().cache(series.cache));
    let per_page = 4096 / u64::from(disk.info().block_size);
    let pages = disk.info().size() / 4096;
    let mut queue = IoQueue::new(DEPTH as u32 + 1).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); DEPTH];
    // Pages [first, first + count) each busy slot is writing.
    let mut busy: Vec<Option<(u64, u64)>> = vec![None; DEPTH];
    let mut generation = first_gen;
    let mut stored_seen = false;
    let overlaps = |busy: &[Option<(u64, u64)>], first: u64, count: u64| {
        busy.iter()
            .flatten()
            .any(|&(f, c)| first < f + c && f < first + count)
    };
    loop {
        let batch = rng.random_range(4..48);
        let (low, span) = match series.window {
            0 => (0, pages),
            w => (rng.random_range(0..=pages - w), w),
        };
        for _ in 0..batch {
            let slot = match busy.iter().position(Option::is_none) {
                Some(s) => s,
                None => {
                    wait_some(&mut queue, &mut busy);
                    continue;
                }
            };
            let count = rng.random_range(1..=series.max_run);
            let first = loop {
                let i = low + rng.random_range(0..=span - count);
                if !overlaps(&busy, i, count) {
                    break i;
                }
            };
            buffers[slot].clear();
            for index in first..first + count {
                generation += 1;
                buffers[slot].extend_from_slice(&page(index, generation));
                log.write_all(format!("S {index} {generation}\n").as_bytes())
                    .unwrap();
            }
            let iov = [libc::iovec {
                iov_base: buffers[slot].as_mut_ptr().cast(),
                iov_len: buffers[slot].len(),
            }];
            let blocks = (count * per_page) as u32;
            // SAFETY: buffers[slot] is not touched again until its
            // completion (tag = slot) is reaped in wait_some.
            let req =
                unsafe { Request::new(Op::Write, first * per_page, blocks, &iov, slot as u64) };
            disk.submit(&mut queue, req).unwrap();
            busy[slot] = Some((first, count));
            queue.submit().unwrap();
        }
        while busy.iter().any(Option::is_some) {
            wait_some(&mut queue, &mut busy);
        }
        if !stored_seen && queue.stats().mapped_writes > 0 {
            stored_seen = true;
            log.write_all(b"M\n").unwrap();
        }
        disk.submit(&mut queue, Request::flush(u64::MAX >> 1))
            .unwrap();
        let mut flushed = false;
        while !flushed {
            queue.submit_and_wait().unwrap();
            queue.reap(|c| {
                if let Completion::Request { result, .. } = c {
                    result.unwrap();
                    flushed = true;
                }
            });
        }
        // The series takes the write path it means to test (an O_DIRECT
        // series on a filesystem without O_DIRECT would test nothing new).
        let inline = queue.stats().inline_writes > 0;
        assert_eq!(inline, series.cache != CacheMode::Direct, "{series:?}");
        if series.cache != CacheMode::Mapped {
            assert_eq!(queue.stats().mapped_writes, 0, "{series:?}");
        }
        log.write_all(b"F\n").unwrap();
    }
}

fn wait_some(queue: &mut IoQueue, busy: &mut [Option<(u64, u64)>]) {
    queue.submit_and_wait().unwrap();
    queue.reap(|c| {
        if let Completion::Request { tag, result } = c {
            let (_, count) = busy[tag as usize].take().unwrap();
            assert_eq!(result, Ok(count as u32 * 4096));
        }
    });
}

/// What a page may hold: `None` for never written (zeros, or the parent's
/// generation-0 content for a differencing disk).
type Version = Option<u64>;

/// Runs the kill trials of `series` on images of `format`; `test_name` is
/// the calling test (re-run as child).
pub fn run_trials(format: &dyn Format, test_name: &str, series: Series) {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let parts: Vec<&str> = spec.split('|').collect();
        child(
            format,
            Path::new(parts[0]),
            Path::new(parts[1]),
            parts[2].parse().unwrap(),
            parts[3].parse().unwrap(),
            series,
        );
    }
    let Series {
        differencing,
        trials,
        ..
    } = series;
    let dir = tempfile::tempdir().unwrap();
    let mut image = PathBuf::new();
    let pages = series.pages();
    let mut state: Vec<Version> = Vec::new();
    let mut rng = StdRng::seed_from_u64(0x5eed ^ u64::from(differencing) ^ series.max_run << 8);
    let mut leaks = 0;
    let mut flushes = 0;
    let (mut stored_trials, mut torn) = (0, 0);
    for trial in 0..trials {
        if trial % format.trials_per_image() == 0 {
            let sub = dir.path().join(format!("image{trial}"));
            std::fs::create_dir(&sub).unwrap();
            image = format.create(&sub, series.size, differencing);
            state = vec![None; pages as usize];
        }
        let log = dir.path().join(format!("log{trial}"));
        std::fs::write(&log, b"").unwrap();
        let first_gen = (trial + 1) * 1_000_000;
        let spec = format!(
            "{}|{}|{first_gen}|{}",
            image.display(),
            log.display(),
            rng.random::<u64>()
        );
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(
            rng.random_range(format.kill_window()),
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        wait_for_dead_writer(&image);

        let check = Command::new(workspace_bin("vspa"))
            .args(["image", "check", "--json"])
            .arg(&image)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success(),
            "trial {trial}: check failed: {stdout}"
        );
        let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
        leaks += u64::from(report["leaked_bytes"].as_u64().unwrap() > 0);
        format.after_kill(&image, trial, differencing);

        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let last_flush = lines.iter().rposition(|l| *l == "F");
        flushes += lines.iter().filter(|l| **l == "F").count();
        stored_trials += u32::from(lines.contains(&"M"));
        // Candidates per page: the version durable at the last flush, plus
        // every version submitted after it.
        let mut candidates: HashMap<u64, HashSet<Version>> = HashMap::new();
        for (n, line) in lines.iter().enumerate() {
            let mut parts = line.split(' ');
            if parts.next() != Some("S") {
                continue;
            }
            let index: u64 = parts.next().unwrap().parse().unwrap();
            let generation: u64 = parts.next().unwrap().parse().unwrap();
            let entry = candidates.entry(index).or_default();
            if last_flush.is_some_and(|f| n < f) {
                entry.clear();
            } else if entry.is_empty() {
                entry.insert(state[index as usize]);
            }
            entry.insert(Some(generation));
        }

        let disk = format.open(
            &image,
            &DiskOptions::default()
                .read_only(true)
                .cache(CacheMode::Cached),
        );
        let all = read_all(&*disk);
        drop(disk);
        let mut repairs = Vec::new();
        for index in 0..pages {
            let got = &all[index as usize * 4096..][..4096];
            let allowed = candidates
                .get(&index)
                .cloned()
                .unwrap_or_else(|| HashSet::from([state[index as usize]]));
            let Some(version) = decode(index, got, differencing) else {
                let tearable = series.cache == CacheMode::Mapped && allowed.len() > 1;
                assert!(
                    tearable && is_torn_between(index, got, &allowed, differencing),
                    "trial {trial}: page {index} holds no version ever written"
                );
                torn += 1;
                repairs.push(index);
                continue;
            };
            assert!(
                allowed.contains(&version),
                "trial {trial}: page {index} holds {version:?}, allowed {allowed:?}"
            );
            state[index as usize] = version;
        }
        repair(format, &image, &repairs, &mut state, differencing);
    }
    if series.cache == CacheMode::Mapped {
        eprintln!(
            "{test_name}: {stored_trials} trials stored through the mapping, {torn} torn pages"
        );
        assert!(stored_trials > 0, "no trial wrote through the mapping");
    }
    eprintln!("{test_name}: {trials} kills, {flushes} flushes seen, {leaks} trials left a leak");
    assert!(flushes > 0, "the child never completed a flush");
}

/// A killed writer's io_uring may still finish its last writes after the
/// process is reaped; its image locks (see `vhd::lock`) last until then.
pub fn wait_for_dead_writer(image: &Path) {
    vhd::ImageLock::acquire(image, vhd::Access::ReadWrite, Duration::from_secs(30)).unwrap();
}

pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    BlockingIo::new().unwrap().read_all(dev).unwrap()
}

/// The bytes of `version` of page `index`.
fn version_bytes(index: u64, version: Version, differencing: bool) -> Vec<u8> {
    match version {
        Some(generation) => page(index, generation),
        None if differencing => page(index, 0),
        None => vec![0; 4096],
    }
}

/// True when `got` is a prefix of one of `allowed` followed by the rest of
/// another: a copy into a mapping, cut short by the kill (it runs forward
/// from the start of the page).
fn is_torn_between(index: u64, got: &[u8], allowed: &HashSet<Version>, differencing: bool) -> bool {
    let versions: Vec<Vec<u8>> = allowed
        .iter()
        .map(|&v| version_bytes(index, v, differencing))
        .collect();
    versions.iter().any(|new| {
        let cut = got.iter().zip(new).take_while(|(a, b)| a == b).count();
        versions.iter().any(|old| got[cut..] == old[cut..])
    })
}

/// Writes each torn page's first version (zeros, or the parent's page) over
/// it, as a guest's journal replay would rewrite it, so the next trial
/// starts from known versions.
fn repair(
    format: &dyn Format,
    image: &Path,
    pages: &[u64],
    state: &mut [Version],
    differencing: bool,
) {
    if pages.is_empty() {
        return;
    }
    let disk = format.open(image, &DiskOptions::default().cache(CacheMode::Cached));
    let per_page = 4096 / u64::from(disk.info().block_size);
    let mut io = BlockingIo::new().unwrap();
    for &index in pages {
        let bytes = version_bytes(index, None, differencing);
        io.write(&*disk, index * per_page, &bytes).unwrap();
        state[index as usize] = None;
    }
    io.flush(&*disk).unwrap();
}

/// The version a page holds, if it is exactly one that was written.
fn decode(index: u64, got: &[u8], differencing: bool) -> Option<Version> {
    if !differencing && got.iter().all(|&b| b == 0) {
        return Some(None);
    }
    let stored_index = u64::from_le_bytes(got[..8].try_into().ok()?);
    let generation = u64::from_le_bytes(got[8..16].try_into().ok()?);
    if stored_index != index || got != page(index, generation) {
        return None;
    }
    Some(if generation == 0 {
        None
    } else {
        Some(generation)
    })
}
