//! Crash consistency of VHDX: the SIGKILL harness of `crash/mod.rs` on
//! dynamic and differencing VHDX (1 MiB blocks, a fresh image every third
//! trial, so trials keep allocating and every flush logs BAT and sector
//! bitmap pages). After each
//! kill, besides `vspa image check`: dynamic images pass `qemu-img check`,
//! alternately after vspa replays the log (`check --repair`) and after qemu
//! replays it (`qemu-img check -r all`), and the harness then reads what
//! the replay left; differencing images (which qemu does not open) are
//! repaired by vspa and read by libvhdi's `vhdiinfo`.
#![allow(unsafe_code)]

mod crash;

use crash::{Format, Series, run_trials};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use vhd::vhdx::{VhdxKind, VhdxOptions, create_differencing, create_vhdx};
use vhd::{BlockDevice, CacheMode, DiskOptions, VhdxDisk};
use vspa_tests::{require_tool, workspace_bin};

/// O_DIRECT writes through io_uring.
const DIRECT: Series = Series {
    differencing: false,
    cache: CacheMode::Direct,
    max_run: 1,
    window: 0,
    size: 32 << 20,
    trials: 30,
};

struct Vhdx;

fn options() -> VhdxOptions {
    VhdxOptions {
        block_size: 1 << 20,
        ..VhdxOptions::default()
    }
}

fn must(cmd: &mut Command, trial: u64) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "trial {trial}: {cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Format for Vhdx {
    fn create(&self, dir: &Path, size: u64, differencing: bool) -> PathBuf {
        let image = dir.join("image.vhdx");
        if differencing {
            let base = dir.join("base.vhdx");
            create_vhdx(&base, VhdxKind::Dynamic, size, &options()).unwrap();
            let rw = DiskOptions::default().cache(CacheMode::Cached);
            crash::fill_base(&VhdxDisk::open(&base, &rw).unwrap());
            create_differencing(&image, &base, &options()).unwrap();
        } else {
            create_vhdx(&image, VhdxKind::Dynamic, size, &options()).unwrap();
        }
        image
    }

    fn open(&self, path: &Path, options: &DiskOptions) -> Arc<dyn BlockDevice> {
        Arc::new(VhdxDisk::open(path, options).unwrap())
    }

    /// 32 blocks are all allocated within a trial or two: start afresh.
    fn trials_per_image(&self) -> u64 {
        3
    }

    fn after_kill(&self, image: &Path, trial: u64, differencing: bool) {
        let vspa_repair = || {
            must(
                Command::new(workspace_bin("vspa"))
                    .args(["image", "check", "--repair"])
                    .arg(image),
                trial,
            )
        };
        if differencing {
            vspa_repair();
            must(Command::new("vhdiinfo").arg(image), trial);
        } else if trial.is_multiple_of(2) {
            vspa_repair();
            must(
                Command::new("qemu-img")
                    .args(["check", "-f", "vhdx"])
                    .arg(image),
                trial,
            );
        } else {
            must(
                Command::new("qemu-img")
                    .args(["check", "-r", "all", "-f", "vhdx"])
                    .arg(image),
                trial,
            );
        }
    }
}

#[test]
fn vhdx_crash_consistency_dynamic() {
    require_tool("qemu-img");
    run_trials(&Vhdx, "vhdx_crash_consistency_dynamic", DIRECT);
}

#[test]
fn vhdx_crash_consistency_differencing() {
    require_tool("vhdiinfo");
    let series = Series {
        differencing: true,
        ..DIRECT
    };
    run_trials(&Vhdx, "vhdx_crash_consistency_differencing", series);
}

/// `vspa image merge` of a differencing VHDX, killed at random moments:
/// the child's view never changes (its link to the parent survives the
/// parent's new DataWriteGuid), both images stay clean, and running the
/// merge again finishes it with the parent holding the merged data.
#[test]
fn vhdx_merge_survives_kill() {
    use crash::{page, read_all, wait_for_dead_writer};
    use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let mut rng = StdRng::seed_from_u64(0x3e13);
    let rw = DiskOptions::default().cache(CacheMode::Cached);
    let ro = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached);
    let mut interrupted = 0;
    for trial in 0..4 {
        let base = dir.path().join(format!("base{trial}.vhdx"));
        let child = dir.path().join(format!("child{trial}.vhdx"));
        create_vhdx(&base, VhdxKind::Dynamic, size, &options()).unwrap();
        let mut io = vhd::BlockingIo::new().unwrap();
        {
            let disk = VhdxDisk::open(&base, &rw).unwrap();
            for index in (0..size / 4096).step_by(5) {
                io.write(&disk, index * 8, &page(index, 0)).unwrap();
            }
        }
        create_differencing(&child, &base, &options()).unwrap();
        {
            let disk = VhdxDisk::open(&child, &rw).unwrap();
            for _ in 0..600 {
                let sectors = rng.random_range(1..16u64);
                let at = rng.random_range(0..size / 512 - sectors);
                let mut buf = vec![0u8; sectors as usize * 512];
                rng.fill_bytes(&mut buf);
                io.write(&disk, at, &buf).unwrap();
            }
        }
        // The queue's ring holds the files it used (and their locks).
        drop(io);
        let expected = read_all(&VhdxDisk::open(&child, &ro).unwrap());
        let mut merge = Command::new(workspace_bin("vspa"))
            .args(["image", "merge"])
            .arg(&child)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..12)));
        let _ = merge.kill();
        merge.wait().unwrap();
        wait_for_dead_writer(&base);
        if child.exists() {
            wait_for_dead_writer(&child);
        }
        if child.exists() {
            interrupted += 1;
            for image in [&child, &base] {
                must(
                    Command::new(workspace_bin("vspa"))
                        .args(["image", "check"])
                        .arg(image),
                    trial,
                );
            }
            let view = read_all(&VhdxDisk::open(&child, &ro).unwrap());
            assert!(
                view == expected,
                "trial {trial}: interrupted merge changed the child's view"
            );
            must(
                Command::new(workspace_bin("vspa"))
                    .args(["image", "merge"])
                    .arg(&child),
                trial,
            );
        }
        assert!(!child.exists());
        must(
            Command::new("qemu-img")
                .args(["check", "-r", "all", "-f", "vhdx"])
                .arg(&base),
            trial,
        );
        let merged = read_all(&VhdxDisk::open(&base, &ro).unwrap());
        assert!(
            merged == expected,
            "trial {trial}: parent does not hold the merged data"
        );
    }
    eprintln!("vhdx merge: {interrupted} of 4 merges interrupted");
    assert!(
        interrupted > 0,
        "no merge was interrupted; the kill came too late"
    );
}
