//! Crash consistency of VHD: the SIGKILL harness of `crash/mod.rs` on
//! dynamic and differencing VHDs (8 KiB blocks, so allocation is frequent),
//! and `merge_survives_kill` does the same to `vspa image merge`.
//!
//! Every trial allocates blocks in batches (allocation in memory from
//! reserved space, metadata durable at the next flush; see `vhd::vhd`).
//! The O_DIRECT series write through io_uring; the buffered series write
//! inline (`pwritev2` on the worker) and in runs of up to four pages, so
//! one request spans blocks and allocates several; the mapped series do the
//! same with cache mode `mapped`, crowding writes so that pages are
//! rewritten between flushes (stores into the file's mapping).
// The harness's async writes need `Request::new` over its own buffers.
#![allow(unsafe_code)]

mod crash;

use crash::{Format, Series, page, read_all, run_trials, wait_for_dead_writer};
use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use vhd::create::{create_differencing, create_dynamic};
use vhd::{BlockDevice, BlockingIo, CacheMode, DiskOptions, VhdDisk};
use vspa_tests::workspace_bin;

const BLOCK: u32 = 8 << 10;

const DIRECT: Series = Series {
    differencing: false,
    cache: CacheMode::Direct,
    max_run: 1,
    window: 0,
    size: 64 << 20,
    trials: 30,
};

/// Buffered writes run inline; smaller images keep the added trials quick.
const BUFFERED: Series = Series {
    differencing: false,
    cache: CacheMode::Cached,
    max_run: 4,
    window: 0,
    size: 16 << 20,
    trials: 16,
};

/// Cache mode `mapped`: each flush interval's writes crowd into 64 pages,
/// so most rewrite a page written since the last flush (a store into the
/// file's mapping).
const MAPPED: Series = Series {
    cache: CacheMode::Mapped,
    window: 64,
    ..BUFFERED
};

struct Vhd;

impl Format for Vhd {
    fn create(&self, dir: &Path, size: u64, differencing: bool) -> PathBuf {
        let image = dir.join("image.vhd");
        if differencing {
            let base = dir.join("base.vhd");
            create_dynamic(&base, size, 2 << 20).unwrap();
            let rw = DiskOptions::default().cache(CacheMode::Cached);
            crash::fill_base(&VhdDisk::open(&base, &rw).unwrap());
            create_differencing(&image, &base, BLOCK).unwrap();
        } else {
            create_dynamic(&image, size, BLOCK).unwrap();
        }
        image
    }

    fn open(&self, path: &Path, options: &DiskOptions) -> Arc<dyn BlockDevice> {
        Arc::new(VhdDisk::open(path, options).unwrap())
    }
}

#[test]
fn crash_consistency_dynamic() {
    run_trials(&Vhd, "crash_consistency_dynamic", DIRECT);
}

#[test]
fn crash_consistency_differencing() {
    let series = Series {
        differencing: true,
        ..DIRECT
    };
    run_trials(&Vhd, "crash_consistency_differencing", series);
}

#[test]
fn crash_consistency_dynamic_buffered() {
    run_trials(&Vhd, "crash_consistency_dynamic_buffered", BUFFERED);
}

#[test]
fn crash_consistency_differencing_buffered() {
    let series = Series {
        differencing: true,
        ..BUFFERED
    };
    run_trials(&Vhd, "crash_consistency_differencing_buffered", series);
}

#[test]
fn crash_consistency_dynamic_mapped() {
    run_trials(&Vhd, "crash_consistency_dynamic_mapped", MAPPED);
}

#[test]
fn crash_consistency_differencing_mapped() {
    let series = Series {
        differencing: true,
        ..MAPPED
    };
    run_trials(&Vhd, "crash_consistency_differencing_mapped", series);
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
