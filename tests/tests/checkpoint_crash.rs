//! Crash safety of live checkpoints: the SIGKILL harness of `crash/mod.rs`
//! writes to a LUN (through its controller's table, as a channel worker
//! does) while a thread of the same child process creates and merges
//! checkpoints of it in a loop, and the child is killed at a random moment.
//! After each kill the chain the state file names (`vhd::vhd::live::
//! ChainState`) must pass `vspa image check` and read every write
//! acknowledged before the last completed flush; the next trial reopens
//! that chain, finishing an interrupted merge or starting a new checkpoint.
#![allow(unsafe_code)]

mod crash;

use crash::{Format, Series, run_trials, wait_for_dead_writer};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use storage::Controller;
use storage::controller::{ControllerConfig, Disk, Lun};
use vhd::vhd::live::{ChainState, open_checkpointed};
use vhd::{BlockDevice, BlockError, CacheMode, DeviceInfo, DiskOptions, IoQueue, Request, VhdDisk};
use vmbus::Guid;

struct Checkpointed;

/// Kills that left a checkpoint active, and an interrupted merge.
static ACTIVE: AtomicU64 = AtomicU64::new(0);
static MERGING: AtomicU64 = AtomicU64::new(0);

/// LUN 0 of a controller: each request goes to the device the table holds
/// when it is submitted, as in a channel worker.
#[derive(Debug)]
struct LunDevice {
    controller: Controller,
    info: DeviceInfo,
}

impl BlockDevice for LunDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&self, queue: &mut IoQueue, req: Request<'_>) -> Result<(), BlockError> {
        let table = self.controller.table();
        let Some(Lun::Disk { device, .. }) = table.get(0).map(|l| &**l) else {
            panic!("LUN 0 is gone");
        };
        device.submit(queue, req)
    }
}

/// The child's checkpoint loop: merge a checkpoint when there is one,
/// create one when there is none. Before each create it rests for up to
/// twice as long as the last merge took (merges slow down on a loaded
/// machine), so that kills land with and without a checkpoint active about
/// equally often; the test fails if either never happens.
fn checkpoint_loop(controller: Controller, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut last_merge = Duration::from_millis(100);
    loop {
        let status = vspa::checkpoint::status(&controller, 0).unwrap();
        if status.child.is_some() {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
            let merging = Instant::now();
            vspa::checkpoint::merge(&controller, 0, &mut |_| {}).unwrap();
            last_merge = merging.elapsed();
        } else {
            std::thread::sleep(last_merge.mul_f64(rng.random_range(0.0..2.0)));
            vspa::checkpoint::create(&controller, 0).unwrap();
        }
    }
}

impl Format for Checkpointed {
    fn create(&self, dir: &Path, size: u64, _differencing: bool) -> PathBuf {
        let image = dir.join("disk.vhd");
        vhd::create::create_dynamic(&image, size, 64 << 10).unwrap();
        image
    }

    fn open(&self, path: &Path, options: &DiskOptions) -> Arc<dyn BlockDevice> {
        if options.read_only {
            let top = active(path).unwrap_or_else(|| path.to_path_buf());
            return Arc::new(VhdDisk::open(&top, options).unwrap());
        }
        let device: Disk = match open_checkpointed(path, options).unwrap() {
            Some(chain) => Arc::new(chain),
            None => Arc::new(VhdDisk::open(path, options).unwrap()),
        };
        let info = device.info().clone();
        let controller = Controller::new(ControllerConfig::new("ckpt", Guid([7; 16])));
        controller.add_lun(0, Lun::disk(device, 256 << 10)).unwrap();
        let seed = std::process::id().into();
        let looped = controller.clone();
        std::thread::spawn(move || checkpoint_loop(looped, seed));
        Arc::new(LunDevice { controller, info })
    }

    /// Long enough for a few create/merge cycles (a merge takes ~100 ms).
    fn kill_window(&self) -> std::ops::Range<u64> {
        10..600
    }

    fn after_kill(&self, image: &Path, trial: u64, _differencing: bool) {
        if let Some(child) = active(image) {
            ACTIVE.fetch_add(1, Ordering::Relaxed);
            if ChainState::load(image).unwrap().merging {
                MERGING.fetch_add(1, Ordering::Relaxed);
            }
            wait_for_dead_writer(&child);
            let report = vhd::tool::check(&child);
            assert!(report.is_clean(), "trial {trial}: {report:?}");
        }
    }
}

/// The active child of `image`, if its state names one.
fn active(image: &Path) -> Option<PathBuf> {
    ChainState::load(image).unwrap().child_path(image)
}

#[test]
fn checkpoints_survive_kill() {
    let series = Series {
        differencing: false,
        cache: CacheMode::Direct,
        max_run: 4,
        window: 0,
        size: 16 << 20,
        trials: 20,
    };
    run_trials(&Checkpointed, "checkpoints_survive_kill", series);
    let (active, merging) = (
        ACTIVE.load(Ordering::Relaxed),
        MERGING.load(Ordering::Relaxed),
    );
    eprintln!("{active} kills with a checkpoint active, {merging} during a merge");
    assert!(
        active > 0 && merging > 0,
        "kills must land in checkpoints and merges"
    );
    assert!(active < series.trials, "and between them");
}
