//! Live checkpoints end to end: a hosted storvsc client writes and reads
//! pages continuously while `vspa::checkpoint` creates, merges and reverts
//! checkpoints of its LUN. No request may fail, every read must return the
//! last write acknowledged for its page (a revert brings back the pages
//! as they were at the checkpoint), and the merged image must match the
//! client's bytes by `qemu-img compare` and pass `vspa image check`. The
//! same run goes once through the library and once through `vspa ctl`
//! against a real `vspa serve --api-socket`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng, rngs::StdRng};
use storage::client::{Buffer, Srb, StorvscClient, cdb};
use storage::protocol::{direction, srb};
use vhd::vhd::live::ChainState;
use vmbus::hosted::client::HostedClient;
use vspa::checkpoint::{self, Progress};
use vspa::{Appliance, Options, ValidConfig};
use vspa_tests::{VspaServe, require_tool, workspace_bin};

const DISK: u64 = 8 << 20;
const PAGES: u64 = DISK / 4096;
/// Pages `[0, HALF)` are written in every phase; `[HALF, PAGES)` only in
/// `ALL`.
const HALF: u64 = PAGES / 2;

// Phases the control thread sets and the client acknowledges.
const ALL: u32 = 0;
const HOLD: u32 = 1;
const REVERTING: u32 = 2;
const RESYNC: u32 = 3;
const RESYNCED: u32 = 4;

#[derive(Default)]
struct Shared {
    phase: AtomicU32,
    seen: AtomicU32,
    ops: AtomicU64,
    stop: AtomicBool,
}

fn content(index: u64, generation: u64) -> Vec<u8> {
    if generation == 0 {
        return vec![0; 4096];
    }
    let mut p: Vec<u8> = (0..4096u64)
        .map(|i| (i.wrapping_mul(31) ^ index.wrapping_mul(7) ^ generation) as u8)
        .collect();
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..16].copy_from_slice(&generation.to_le_bytes());
    p
}

struct Client {
    host: HostedClient,
    c: StorvscClient,
    buf: Buffer,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let (mut host, c) = vspa_tests::connect_scsi(socket, 16 << 20, 0, 8);
        let buf = Buffer {
            pages: host.alloc_pages(1).unwrap(),
            offset: 0,
            len: 4096,
        };
        Client { host, c, buf }
    }

    fn run(&mut self, cdb: &[u8], dir: u8, len: u32, what: &str) {
        let buf = (len > 0).then_some(&self.buf);
        let r = self.c.execute(0, &Srb::new(0, cdb, dir, len), buf).unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS, "{what} failed");
    }

    fn write(&mut self, index: u64, generation: u64) {
        let data = content(index, generation);
        self.host.slice(&self.buf.pages).write_at(0, &data).unwrap();
        let w = cdb::write_16(index * 8, 8);
        self.run(&w, direction::WRITE, 4096, "write");
    }

    fn read(&mut self, index: u64) -> Vec<u8> {
        let r = cdb::read_16(index * 8, 8);
        self.run(&r, direction::READ, 4096, "read");
        let mut got = vec![0u8; 4096];
        self.host
            .slice(&self.buf.pages)
            .read_at(0, &mut got)
            .unwrap();
        got
    }

    fn flush(&mut self) {
        self.run(&cdb::synchronize_cache(), direction::NONE, 0, "flush");
    }

    fn verify(&mut self, index: u64, generation: u64, when: &str) {
        let got = self.read(index);
        assert!(
            got == content(index, generation),
            "{when}: page {index} should hold generation {generation}, holds {:?}",
            &got[..16]
        );
    }
}

/// The client: writes and reads until told to stop; returns each page's
/// last generation.
fn client(socket: &Path, shared: &Shared) -> Vec<u64> {
    let mut c = Client::connect(socket);
    let mut rng = StdRng::seed_from_u64(7);
    let mut expected = vec![0u64; PAGES as usize];
    let mut held: Vec<u64> = Vec::new();
    let mut generation = 0;
    while !shared.stop.load(Ordering::Acquire) {
        let phase = shared.phase.load(Ordering::Acquire);
        match phase {
            HOLD if shared.seen.load(Ordering::Acquire) != HOLD => {
                held = expected[HALF as usize..].to_vec();
            }
            RESYNC => {
                // The revert brought back the upper half as it was held;
                // the lower half was written across the revert: rewrite it.
                expected[HALF as usize..].copy_from_slice(&held);
                for index in 0..HALF {
                    generation += 1;
                    c.write(index, generation);
                    expected[index as usize] = generation;
                }
                for index in 0..PAGES {
                    c.verify(index, expected[index as usize], "after revert");
                }
                shared.seen.store(RESYNCED, Ordering::Release);
                while shared.phase.load(Ordering::Acquire) == RESYNC {
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            _ => {}
        }
        shared.seen.store(phase, Ordering::Release);
        let upper = if phase == ALL { PAGES } else { HALF };
        let index = rng.random_range(0..upper);
        generation += 1;
        c.write(index, generation);
        expected[index as usize] = generation;
        let other = rng.random_range(0..PAGES);
        if phase == REVERTING {
            c.read(other);
        } else {
            c.verify(other, expected[other as usize], "while running");
            c.verify(index, generation, "just written");
        }
        if generation % 64 == 0 {
            c.flush();
        }
        shared.ops.fetch_add(1, Ordering::AcqRel);
    }
    for index in 0..PAGES {
        c.verify(index, expected[index as usize], "at the end");
    }
    c.flush();
    expected
}

fn wait_ops(shared: &Shared, n: u64) {
    let start = shared.ops.load(Ordering::Acquire);
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.ops.load(Ordering::Acquire) < start + n {
        assert!(Instant::now() < deadline, "the client stalled");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_seen(shared: &Shared, phase: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.seen.load(Ordering::Acquire) != phase {
        assert!(Instant::now() < deadline, "the client stalled");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn set_phase(shared: &Shared, phase: u32) {
    shared.phase.store(phase, Ordering::Release);
}

/// What switches the checkpoints: the library itself, or `vspa ctl`
/// against a running `vspa serve`.
trait Driver {
    /// Creates a checkpoint; a second create must be refused.
    fn create(&mut self) -> PathBuf;
    /// Merges, checking the progress it reports.
    fn merge(&mut self);
    fn revert(&mut self);
}

/// Runs a client writing and reading while `driver` creates, merges,
/// creates, reverts, creates and merges checkpoints of LUN 0 (image
/// `image`); returns each page's last generation.
fn scenario(socket: &Path, image: &Path, driver: &mut dyn Driver) -> Vec<u64> {
    let shared = Arc::new(Shared::default());
    let writer = {
        let (shared, socket) = (shared.clone(), socket.to_path_buf());
        std::thread::spawn(move || client(&socket, &shared))
    };

    // Create, write on the child, merge while writing.
    wait_ops(&shared, 200);
    let child = driver.create();
    assert!(child.exists());
    assert_eq!(
        ChainState::load(image).unwrap().child_path(image),
        Some(child.clone())
    );
    wait_ops(&shared, 600);
    driver.merge();
    assert!(!child.exists(), "the merged child is deleted");
    assert_eq!(ChainState::load(image).unwrap(), ChainState::default());
    wait_ops(&shared, 200);

    // Create with the upper half held still, write everywhere, revert:
    // the upper half reads as held.
    set_phase(&shared, HOLD);
    wait_seen(&shared, HOLD);
    let child = driver.create();
    set_phase(&shared, ALL);
    wait_ops(&shared, 600);
    set_phase(&shared, REVERTING);
    wait_seen(&shared, REVERTING);
    wait_ops(&shared, 5);
    driver.revert();
    assert!(!child.exists(), "the reverted child is deleted");
    set_phase(&shared, RESYNC);
    wait_seen(&shared, RESYNCED);
    set_phase(&shared, ALL);
    wait_ops(&shared, 200);

    // And once more, ending merged.
    driver.create();
    wait_ops(&shared, 300);
    driver.merge();
    wait_ops(&shared, 100);
    shared.stop.store(true, Ordering::Release);
    writer.join().unwrap()
}

/// Once vspa has let go of `image`: it holds the client's last bytes
/// (`qemu-img compare`) and checks clean.
fn check_merged(image: &Path, expected: &[u64]) {
    // The workers' rings let go of the image (and its locks) once their
    // last requests are done.
    vhd::ImageLock::acquire(image, vhd::Access::ReadWrite, Duration::from_secs(30)).unwrap();
    let mut raw = Vec::with_capacity(DISK as usize);
    for (index, &generation) in expected.iter().enumerate() {
        raw.extend_from_slice(&content(index as u64, generation));
    }
    let raw_path = image.with_file_name("expected.raw");
    std::fs::write(&raw_path, raw).unwrap();
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(image)
        .arg(&raw_path)
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    let check = vhd::tool::check(image);
    assert!(check.is_clean(), "{check:?}");
}

const CONFIG: &str =
    "[[controller]]\nname = \"scsi0\"\n[[controller.lun]]\nlun = 0\npath = \"disk.vhd\"\n";

/// A directory with an empty `disk.vhd`, and an appliance's configuration
/// serving it as LUN 0 on `vspa.sock` there.
fn setup() -> (tempfile::TempDir, PathBuf, ValidConfig, Options) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhd");
    vhd::create::create_dynamic(&image, DISK, 2 << 20).unwrap();
    let config = ValidConfig::from_toml(CONFIG, dir.path()).unwrap();
    let options = Options {
        serve: Some(dir.path().join("vspa.sock")),
        ..Options::default()
    };
    (dir, image, config, options)
}

/// The library, as the API calls it: switches under the appliance, then
/// `sync_lun`.
struct Library {
    app: Appliance,
    controller: Arc<storage::Controller>,
}

impl Driver for Library {
    fn create(&mut self) -> PathBuf {
        let child = checkpoint::create(&self.controller, 0).unwrap();
        self.app.sync_lun("scsi0", 0);
        assert!(matches!(
            checkpoint::create(&self.controller, 0),
            Err(checkpoint::CheckpointError::Exists(0))
        ));
        child
    }

    fn merge(&mut self) {
        let mut seen: Vec<Progress> = Vec::new();
        let report = checkpoint::merge(&self.controller, 0, &mut |p| seen.push(p)).unwrap();
        self.app.sync_lun("scsi0", 0);
        assert!(report.sectors_merged > 0);
        assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
        let last = seen.last().unwrap();
        assert_eq!((last.done, last.total), (DISK / 512, DISK / 512));
    }

    fn revert(&mut self) {
        checkpoint::revert(&self.controller, 0).unwrap();
        self.app.sync_lun("scsi0", 0);
    }
}

#[test]
fn checkpoints_under_continuous_io() {
    require_tool("qemu-img");
    let (_dir, image, config, options) = setup();
    let socket = options.serve.clone().unwrap();
    let app = Appliance::start(&config, &options).unwrap();
    let controller = app.lun_controller("scsi0", 0).unwrap();
    let mut lib = Library { app, controller };
    let expected = scenario(&socket, &image, &mut lib);
    drop(lib.controller);
    lib.app.shutdown();
    check_merged(&image, &expected);
}

/// `vspa ctl checkpoint ...` against a running `vspa serve --api-socket`.
struct Ctl {
    api: PathBuf,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(workspace_bin("vspa"))
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.api)
            .arg("checkpoint")
            .args(args)
            .output()
            .expect("run vspa ctl")
    }

    /// `vspa ctl --json checkpoint ARGS`, which must succeed.
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(&[&["--json"], args].concat());
        assert!(
            out.status.success(),
            "vspa ctl checkpoint {args:?}: {out:?}"
        );
        serde_json::from_slice(&out.stdout).expect("vspa ctl --json prints JSON")
    }

    /// Fails with this status in its message.
    fn refused(&self, args: &[&str], status: u16) {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("error {status}:")),
            "vspa ctl checkpoint {args:?} should get {status}: {out:?}"
        );
    }
}

impl Driver for Ctl {
    fn create(&mut self) -> PathBuf {
        let body = self.json(&["create", "scsi0", "0"]);
        self.refused(&["create", "scsi0", "0"], 409);
        let status = self.json(&["status", "scsi0", "0"]);
        assert_eq!(status["checkpoint"], body["checkpoint"]);
        PathBuf::from(body["checkpoint"].as_str().expect("the child's path"))
    }

    fn merge(&mut self) {
        // Not a terminal: a line per percent, then the merged image.
        let out = self.run(&["merge", "scsi0", "0"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "vspa ctl checkpoint merge: {out:?}");
        assert!(text.contains("merging: 100% ("), "{text}");
        assert!(
            text.lines().last().unwrap().starts_with("merged: "),
            "{text}"
        );
        let status = self.json(&["status", "scsi0", "0"]);
        assert_eq!(status["merge"]["state"], "done", "{status}");
        assert_eq!(status["merge"]["done"], DISK / 512, "{status}");
        assert_eq!(status["checkpoint"], serde_json::Value::Null);
        self.refused(&["revert", "scsi0", "0"], 409);
    }

    fn revert(&mut self) {
        self.json(&["revert", "scsi0", "0"]);
    }
}

#[test]
fn checkpoints_through_vspa_ctl_under_continuous_io() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.vhd");
    vhd::create::create_dynamic(&image, DISK, 2 << 20).unwrap();
    vhd::create::create_raw(&d.join("raw.img"), DISK).unwrap();
    let config = format!("{CONFIG}[[controller.lun]]\nlun = 1\npath = \"raw.img\"\n");
    std::fs::write(d.join("vspa.toml"), config).unwrap();
    let api = d.join("api.sock");
    let serve = VspaServe::start(&[
        "--config",
        d.join("vspa.toml").to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    let mut ctl = Ctl { api };
    ctl.refused(&["create", "scsi0", "9"], 404);
    ctl.refused(&["status", "scsi9", "0"], 404);
    ctl.refused(&["create", "scsi0", "1"], 422);
    ctl.refused(&["merge", "scsi0", "0"], 409);
    let expected = scenario(&serve.socket, &image, &mut ctl);
    drop(serve);
    check_merged(&image, &expected);
}

#[test]
fn a_restart_serves_the_checkpoint_chain() {
    let (_dir, image, config, options) = setup();
    let socket = options.serve.clone().unwrap();
    let start = || {
        let app = Appliance::start(&config, &options).unwrap();
        let controller = app.lun_controller("scsi0", 0).unwrap();
        (app, controller)
    };
    let (app, controller) = start();
    let mut c = Client::connect(&socket);
    c.write(1, 1);
    let child = checkpoint::create(&controller, 0).unwrap();
    c.write(2, 2);
    c.flush();
    drop((c, controller));
    app.shutdown();

    // Same configuration: the chain the state file names.
    let (app, controller) = start();
    let status = checkpoint::status(&controller, 0).unwrap();
    assert_eq!(status.child, Some(child.clone()));
    let mut c = Client::connect(&socket);
    c.verify(1, 1, "after restart");
    c.verify(2, 2, "after restart");
    checkpoint::merge(&controller, 0, &mut |_| {}).unwrap();
    c.verify(2, 2, "after the merge");
    drop((c, controller));
    app.shutdown();
    assert!(!child.exists());
    vhd::ImageLock::acquire(&image, vhd::Access::ReadWrite, Duration::from_secs(30)).unwrap();
    let disk = vhd::open_by_name(&image, &vhd::DiskOptions::default().read_only(true)).unwrap();
    let mut page = vec![0u8; 4096];
    vhd::BlockingIo::new()
        .unwrap()
        .read(&*disk, 16, &mut page)
        .unwrap();
    assert!(page == content(2, 2), "the image holds the merged write");
}
