//! Crash consistency: a child process writes random 4 KiB pages to a dynamic
//! or differencing VHD at queue depth 8 with periodic flushes, and is
//! SIGKILLed at a random moment. After each kill `vspa image check` must be
//! clean and every write acknowledged before the last completed flush must
//! read back (later writes may or may not have landed, but each page holds
//! exactly one version that was written). The same image carries on from
//! trial to trial, so each run also reopens (and reclaims) a crashed image.
//!
//! Every trial allocates blocks in batches (allocation in memory from
//! reserved space, metadata durable at the next flush; see `vhd::vhd`).
//! The O_DIRECT trials write through io_uring; the buffered trials write
//! inline (`pwritev2` on the worker) and in runs of up to four pages, so
//! one request spans blocks and allocates several.
//!
//! The child is this test binary itself, re-run with `CHILD_ENV` set.
//! `merge_survives_kill` does the same to `vspa image merge`.
// The child's async writes need `Request::new` over its own buffers.
#![allow(unsafe_code)]

use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use vhd::create::{create_differencing, create_dynamic};
use vhd::{
    BlockDevice, BlockingIo, CacheMode, Completion, DiskOptions, IoQueue, Op, Request, VhdDisk,
};
use vspa_tests::workspace_bin;

const CHILD_ENV: &str = "VSPA_VHD_CRASH_CHILD";
const BLOCK: u32 = 8 << 10;
const DEPTH: usize = 8;

/// One series of trials.
#[derive(Debug, Clone, Copy)]
struct Series {
    differencing: bool,
    cache: CacheMode,
    /// Pages per write request: 1..=max_run.
    max_run: u64,
    size: u64,
    trials: u64,
}

impl Series {
    fn pages(&self) -> u64 {
        self.size / 4096
    }
}

/// Self-describing page content: index, generation, then derived bytes.
fn page(index: u64, generation: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation);
    let mut p = vec![0u8; 4096];
    rng.fill_bytes(&mut p);
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..16].copy_from_slice(&generation.to_le_bytes());
    p
}

/// Child: writes until killed. Logs "S page gen" for every page of a write
/// before submitting it and "F" after each flush completes (all writes
/// drained first), one unbuffered write(2) per line.
fn child(image: &Path, log: &Path, first_gen: u64, seed: u64, series: Series) -> ! {
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let options = DiskOptions::default().cache(series.cache);
    let disk = VhdDisk::open(image, &options).unwrap();
    let mut queue = IoQueue::new(DEPTH as u32 + 1).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); DEPTH];
    // Pages [first, first + count) each busy slot is writing.
    let mut busy: Vec<Option<(u64, u64)>> = vec![None; DEPTH];
    let mut generation = first_gen;
    let overlaps = |busy: &[Option<(u64, u64)>], first: u64, count: u64| {
        busy.iter()
            .flatten()
            .any(|&(f, c)| first < f + c && f < first + count)
    };
    loop {
        let batch = rng.random_range(4..48);
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
                let i = rng.random_range(0..=series.pages() - count);
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
            let blocks = count as u32 * 8;
            // SAFETY: buffers[slot] is not touched again until its
            // completion (tag = slot) is reaped in wait_some.
            let req = unsafe { Request::new(Op::Write, first * 8, blocks, &iov, slot as u64) };
            disk.submit(&mut queue, req).unwrap();
            busy[slot] = Some((first, count));
            queue.submit().unwrap();
        }
        while busy.iter().any(Option::is_some) {
            wait_some(&mut queue, &mut busy);
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
        // The series takes the write path it means to test.
        let inline = queue.stats().inline_writes > 0;
        assert_eq!(inline, series.cache == CacheMode::Cached);
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

fn run_trials(test_name: &str, series: Series) {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let parts: Vec<&str> = spec.split('|').collect();
        child(
            Path::new(parts[0]),
            Path::new(parts[1]),
            parts[2].parse().unwrap(),
            parts[3].parse().unwrap(),
            series,
        );
    }
    let Series {
        differencing,
        size,
        trials,
        ..
    } = series;
    let pages = series.pages();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhd");
    if differencing {
        let base = dir.path().join("base.vhd");
        create_dynamic(&base, size, 2 << 20).unwrap();
        let disk = VhdDisk::open(&base, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
        let mut io = BlockingIo::new().unwrap();
        for index in 0..pages {
            io.write(&disk, index * 8, &page(index, 0)).unwrap();
        }
        io.flush(&disk).unwrap();
        create_differencing(&image, &base, BLOCK).unwrap();
    } else {
        create_dynamic(&image, size, BLOCK).unwrap();
    }
    let mut state: Vec<Version> = vec![None; pages as usize];
    let mut rng = StdRng::seed_from_u64(0x5eed ^ u64::from(differencing) ^ series.max_run << 8);
    let mut leaks = 0;
    let mut flushes = 0;
    for trial in 0..trials {
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
        std::thread::sleep(Duration::from_millis(rng.random_range(10..200)));
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

        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let last_flush = lines.iter().rposition(|l| *l == "F");
        flushes += lines.iter().filter(|l| **l == "F").count();
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

        let disk = VhdDisk::open(
            &image,
            &DiskOptions::default()
                .read_only(true)
                .cache(CacheMode::Cached),
        )
        .unwrap();
        let all = read_all(&disk);
        for index in 0..pages {
            let got = &all[index as usize * 4096..][..4096];
            let version = decode(index, got, differencing).unwrap_or_else(|| {
                panic!("trial {trial}: page {index} holds no version ever written")
            });
            let allowed = candidates
                .get(&index)
                .cloned()
                .unwrap_or_else(|| HashSet::from([state[index as usize]]));
            assert!(
                allowed.contains(&version),
                "trial {trial}: page {index} holds {version:?}, allowed {allowed:?}"
            );
            state[index as usize] = version;
        }
    }
    eprintln!("{test_name}: {trials} kills, {flushes} flushes seen, {leaks} trials left a leak");
    assert!(flushes > 0, "the child never completed a flush");
}

/// A killed writer's io_uring may still finish its last writes after the
/// process is reaped; its image lock (see `vhd::file`) lasts until then.
fn wait_for_dead_writer(image: &Path) {
    let file = std::fs::File::open(image).unwrap();
    file.lock().unwrap();
    file.unlock().unwrap();
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    BlockingIo::new().unwrap().read_all(dev).unwrap()
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

const DIRECT: Series = Series {
    differencing: false,
    cache: CacheMode::Direct,
    max_run: 1,
    size: 64 << 20,
    trials: 30,
};

/// Buffered writes run inline; smaller images keep the added trials quick.
const BUFFERED: Series = Series {
    differencing: false,
    cache: CacheMode::Cached,
    max_run: 4,
    size: 16 << 20,
    trials: 16,
};

#[test]
fn crash_consistency_dynamic() {
    run_trials("crash_consistency_dynamic", DIRECT);
}

#[test]
fn crash_consistency_differencing() {
    let series = Series {
        differencing: true,
        ..DIRECT
    };
    run_trials("crash_consistency_differencing", series);
}

#[test]
fn crash_consistency_dynamic_buffered() {
    run_trials("crash_consistency_dynamic_buffered", BUFFERED);
}

#[test]
fn crash_consistency_differencing_buffered() {
    let series = Series {
        differencing: true,
        ..BUFFERED
    };
    run_trials("crash_consistency_differencing_buffered", series);
}

/// `vspa image merge` killed at random moments: the child's view never
/// changes, both images stay clean, and running the merge again finishes
/// it with the parent holding the merged data.
#[test]
fn merge_survives_kill() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32u64 << 20;
    let mut rng = StdRng::seed_from_u64(0x3e12);
    let mut interrupted = 0;
    for trial in 0..12 {
        let base = dir.path().join(format!("base{trial}.vhd"));
        let child = dir.path().join(format!("child{trial}.vhd"));
        create_dynamic(&base, size, 1 << 20).unwrap();
        let mut io = BlockingIo::new().unwrap();
        let rw = DiskOptions::default().cache(CacheMode::Cached);
        {
            let disk = VhdDisk::open(&base, &rw).unwrap();
            for index in (0..size / 4096).step_by(7) {
                io.write(&disk, index * 8, &page(index, 0)).unwrap();
            }
            io.flush(&disk).unwrap();
        }
        create_differencing(&child, &base, 256 << 10).unwrap();
        {
            let disk = VhdDisk::open(&child, &rw).unwrap();
            for _ in 0..3000 {
                let sectors = rng.random_range(1..16u64);
                let at = rng.random_range(0..size / 512 - sectors);
                let mut buf = vec![0u8; sectors as usize * 512];
                rng.fill_bytes(&mut buf);
                io.write(&disk, at, &buf).unwrap();
            }
            io.flush(&disk).unwrap();
        }
        let ro = DiskOptions::default()
            .read_only(true)
            .cache(CacheMode::Cached);
        let expected = read_all(&VhdDisk::open(&child, &ro).unwrap());

        let mut merge = Command::new(workspace_bin("vspa"))
            .args(["image", "merge"])
            .arg(&child)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
        let _ = merge.kill();
        merge.wait().unwrap();
        wait_for_dead_writer(&base);

        if child.exists() {
            interrupted += 1;
            for image in [&child, &base] {
                let check = Command::new(workspace_bin("vspa"))
                    .args(["image", "check"])
                    .arg(image)
                    .output()
                    .unwrap();
                assert!(
                    check.status.success(),
                    "trial {trial}: {}",
                    String::from_utf8_lossy(&check.stdout)
                );
            }
            let view = read_all(&VhdDisk::open(&child, &ro).unwrap());
            assert!(
                view == expected,
                "trial {trial}: interrupted merge changed the child's view"
            );
            let again = Command::new(workspace_bin("vspa"))
                .args(["image", "merge"])
                .arg(&child)
                .output()
                .unwrap();
            assert!(
                again.status.success(),
                "{}",
                String::from_utf8_lossy(&again.stderr)
            );
        }
        assert!(!child.exists());
        let merged = read_all(&VhdDisk::open(&base, &ro).unwrap());
        assert!(
            merged == expected,
            "trial {trial}: parent does not hold the merged data"
        );
    }
    eprintln!("merge: {interrupted} of 12 merges interrupted");
    assert!(
        interrupted > 0,
        "no merge was interrupted; the kill came too late"
    );
}
