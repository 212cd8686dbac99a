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

use crash::{Format, run_trials};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use vhd::vhdx::{VhdxKind, VhdxOptions, create_differencing, create_vhdx};
use vhd::{BlockDevice, CacheMode, DiskOptions, VhdxDisk};
use vspa_tests::{require_tool, workspace_bin};

const SIZE: u64 = 32 << 20;
const TRIALS: u64 = 30;

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
    fn size(&self) -> u64 {
        SIZE
    }

    fn create(&self, dir: &Path, differencing: bool) -> PathBuf {
        let image = dir.join("image.vhdx");
        if differencing {
            let base = dir.join("base.vhdx");
            create_vhdx(&base, VhdxKind::Dynamic, SIZE, &options()).unwrap();
            let rw = DiskOptions::default().cache(CacheMode::Cached);
            crash::fill_base(&VhdxDisk::open(&base, &rw).unwrap());
            create_differencing(&image, &base, &options()).unwrap();
        } else {
            create_vhdx(&image, VhdxKind::Dynamic, SIZE, &options()).unwrap();
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
        } else if trial % 2 == 0 {
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
    run_trials(&Vhdx, "dynamic", "vhdx_crash_consistency_dynamic", TRIALS);
}

#[test]
fn vhdx_crash_consistency_differencing() {
    require_tool("vhdiinfo");
    run_trials(
        &Vhdx,
        "differencing",
        "vhdx_crash_consistency_differencing",
        TRIALS,
    );
}
