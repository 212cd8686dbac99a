//! NBD end to end. vspa's server (`storage::nbd`) against libnbd's nbdinfo
//! and nbdcopy, qemu-img, qemu-io and fio's `nbd` engine; vspa's client
//! (`vhd::nbd`) as the backend of LUNs served by the storage VSP to a
//! hosted storvsc client, against nbdkit and qemu-nbd, including a server
//! killed and restarted mid-run. Appliance pieces run in this process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use storage::client::{Buffer, Srb, StorvscClient, cdb, read_reply, send_srb};
use storage::nbd::{ExportConfig, Listen, Server, ServerConfig};
use storage::protocol::{direction, srb};
use storage::{Controller, ControllerConfig, Lun};
use vhd::{BlockDevice, BlockingIo, CacheMode, DiskOptions};
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::HostedClient;
use vmbus::server::Registry;
use vmbus::vsc::VscChannel;
use vspa_tests::{require_tool, workspace_bin};

const MIB: u64 = 1 << 20;

/// Runs a tool; panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

fn open_cached(path: &Path) -> Arc<dyn BlockDevice> {
    vhd::open_by_name(path, &DiskOptions::default().cache(CacheMode::Cached)).unwrap()
}

/// vspa's NBD server on a Unix socket in `dir`.
fn serve(dir: &Path, exports: Vec<ExportConfig>) -> (Server, PathBuf) {
    let socket = dir.join("vspa-nbd.sock");
    let config = ServerConfig::new(exports, vec![Listen::Unix(socket.clone())]);
    (Server::start(config).unwrap(), socket)
}

fn export(name: &str, device: &Arc<dyn BlockDevice>) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        device: Arc::clone(device),
        read_only: false,
        description: format!("{name} for tests"),
    }
}

/// A dynamic VHD with data in blocks 1 and 5 (of 2 MiB): the rest are
/// holes. Returns the image and its contents.
fn sparse_vhd(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("sparse.vhd");
    vhd::create::create_dynamic(&path, 16 * MIB, 2 << 20).unwrap();
    let disk = open_cached(&path);
    let mut io = BlockingIo::new().unwrap();
    let mut contents = vec![0u8; 16 * MIB as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for (at, len) in [(2 * MIB + 4096, 256 * 1024), (10 * MIB, 2 * MIB)] {
        let range = at as usize..(at + len) as usize;
        rng.fill(&mut contents[range.clone()]);
        io.write(&*disk, at / 512, &contents[range]).unwrap();
    }
    io.flush(&*disk).unwrap();
    (path, contents)
}

/// A process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `ready` holds (the server process still running).
fn wait_until(child: &mut Child, what: &Path, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(child.try_wait().unwrap().is_none(), "server exited early");
        assert!(
            Instant::now() < deadline,
            "{} never became ready",
            what.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts qemu-nbd (or another server creating `socket`) and waits until
/// it accepts connections.
fn spawn_server(cmd: &mut Command, socket: &Path) -> Guard {
    let _ = std::fs::remove_file(socket);
    let mut child = cmd.stdout(Stdio::null()).spawn().unwrap();
    wait_until(&mut child, socket, || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    Guard(child)
}

/// `nbdkit -f -U socket ARGS...`, ready once it wrote its pid file.
fn nbdkit(socket: &Path, args: &[&str]) -> Guard {
    let pidfile = socket.with_extension("pid");
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&pidfile);
    let mut child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-P"])
        .arg(&pidfile)
        .arg("-U")
        .arg(socket)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(&mut child, socket, || {
        std::fs::read_to_string(&pidfile).is_ok_and(|p| p.ends_with('\n'))
    });
    Guard(child)
}

/// A controller with `device` as LUN 0, served in process, and a storvsc
/// client connected to it.
struct Appliance {
    client: StorvscClient,
    host: HostedClient,
    _server: HostedServer,
    pages: vmbus::hosted::client::Pages,
    next_txid: u64,
}

/// Bytes of guest memory the test client uses for buffers.
const GUEST_BUFFERS: u64 = 8 * MIB;

impl Appliance {
    fn new(dir: &Path, device: Arc<dyn BlockDevice>) -> Appliance {
        let controller = Controller::new(ControllerConfig::new(
            "nbd0",
            "5e2a7d61-1c1f-4a8e-9d3b-0b6c7f1e2a90".parse().unwrap(),
        ));
        controller
            .add_lun(
                0,
                Lun::disk(device, storage::controller::DEFAULT_MAX_TRANSFER),
            )
            .unwrap();
        let registry = Registry::new();
        registry.add(Arc::new(controller));
        let server = HostedServer::start(&dir.join("vmbus.sock"), registry).unwrap();
        let (mut host, client) = vspa_tests::connect_scsi(server.path(), 2 * GUEST_BUFFERS, 0, 64);
        let pages = host.alloc_pages(GUEST_BUFFERS / 4096).unwrap();
        Appliance {
            client,
            host,
            _server: server,
            pages,
            next_txid: 0x100,
        }
    }

    /// Runs SRBs concurrently (all sent, then all replies collected); each
    /// has its own part of guest memory. Returns the SRB statuses in order.
    fn batch(&mut self, srbs: &[([u8; 16], u8, u32)]) -> Vec<u8> {
        let txids = self.send(srbs);
        self.collect(&txids)
    }

    /// Sends SRBs without waiting; returns their transaction ids.
    fn send(&mut self, srbs: &[([u8; 16], u8, u32)]) -> Vec<u64> {
        let ch = &mut self.client.channels[0];
        let mut offset = 0u32;
        let mut txids = Vec::new();
        for (cdb, dir, len) in srbs {
            let buffer = Buffer {
                pages: self.pages,
                offset,
                len: *len,
            };
            offset += len.next_multiple_of(4096);
            assert!(u64::from(offset) <= GUEST_BUFFERS);
            self.next_txid += 1;
            let srb = Srb::new(0, cdb, *dir, *len);
            send_srb(ch, self.next_txid, &srb, (*len > 0).then_some(&buffer)).unwrap();
            txids.push(self.next_txid);
        }
        ch.flush().unwrap();
        txids
    }

    /// Waits for the replies to `txids`; their SRB statuses in order.
    fn collect(&mut self, txids: &[u64]) -> Vec<u8> {
        let ch = &mut self.client.channels[0];
        let mut status = vec![None; txids.len()];
        let deadline = Instant::now() + Duration::from_secs(30);
        while status.iter().any(Option::is_none) {
            ch.flush().unwrap();
            while let Some(r) = read_reply(ch).unwrap() {
                if let Some(i) = txids.iter().position(|&t| t == r.txid) {
                    status[i] = Some(r.srb().srb_status);
                }
            }
            assert!(Instant::now() < deadline, "storage replies timed out");
            ch.wait(Duration::from_millis(50)).unwrap();
        }
        status.into_iter().map(Option::unwrap_or_default).collect()
    }

    /// Writes `chunks` (lba, data) with all of them in flight at once.
    fn write_all(&mut self, chunks: &[(u64, &[u8])]) -> Vec<u8> {
        let txids = self.send_writes(chunks);
        self.collect(&txids)
    }

    fn send_writes(&mut self, chunks: &[(u64, &[u8])]) -> Vec<u64> {
        let mut offset = 0;
        let mut srbs = Vec::new();
        for (lba, data) in chunks {
            self.host.slice(&self.pages).write_at(offset, data).unwrap();
            offset += data.len().next_multiple_of(4096);
            srbs.push((
                cdb::write_16(*lba, (data.len() / 512) as u32),
                direction::WRITE,
                data.len() as u32,
            ));
        }
        self.send(&srbs)
    }
    fn read(&mut self, lba: u64, len: usize) -> Vec<u8> {
        let status = self.batch(&[(
            cdb::read_16(lba, (len / 512) as u32),
            direction::READ,
            len as u32,
        )]);
        assert_eq!(status, [srb::SUCCESS], "read at LBA {lba}");
        let mut out = vec![0u8; len];
        self.host.slice(&self.pages).read_at(0, &mut out).unwrap();
        out
    }

    /// SYNCHRONIZE CACHE; the SRB status.
    fn sync(&mut self) -> u8 {
        let mut c = [0u8; 16];
        c[..10].copy_from_slice(&cdb::synchronize_cache());
        self.batch(&[(c, direction::NONE, 0)])[0]
    }
}

/// Random chunks over a disk: (byte offset, data).
fn random_chunks(seed: u64, disk: u64, count: usize, len: usize) -> Vec<(u64, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let slots = disk / len as u64;
    let mut picked: Vec<u64> = Vec::new();
    while picked.len() < count {
        let slot = rng.random_range(0..slots);
        if !picked.contains(&slot) {
            picked.push(slot);
        }
    }
    picked
        .into_iter()
        .map(|slot| {
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            (slot * len as u64, data)
        })
        .collect()
}

fn apply(expected: &mut [u8], chunks: &[(u64, Vec<u8>)]) {
    for (at, data) in chunks {
        expected[*at as usize..*at as usize + data.len()].copy_from_slice(data);
    }
}

fn as_writes(chunks: &[(u64, Vec<u8>)]) -> Vec<(u64, &[u8])> {
    chunks
        .iter()
        .map(|(at, d)| (at / 512, d.as_slice()))
        .collect()
}

/// `qemu-img compare` (with `-U`: an image vspa still serves keeps its
/// write lock).
fn qemu_img_compare(a: &str, fa: &str, b: &Path, fb: &str) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
}

// ---- vspa's server ----

#[test]
fn server_nbdinfo_sees_exports_sizes_and_the_vhds_holes() {
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = sparse_vhd(dir.path());
    let disk = open_cached(&image);
    let raw = dir.path().join("small.img");
    vhd::create::create_raw(&raw, 3 * MIB).unwrap();
    let small = open_cached(&raw);
    let mut ro = export("small", &small);
    ro.read_only = true;
    let (_server, socket) = serve(dir.path(), vec![export("sparse", &disk), ro]);

    let out = run(Command::new("nbdinfo").args(["--json", "--list", &unix_uri("", &socket)]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let found: Vec<(&str, u64, bool)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap(),
                e["export-size"].as_u64().unwrap(),
                e["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("sparse", disk.info().size(), false),
            ("small", 3 * MIB, true)
        ]
    );
    assert_eq!(list["structured"], true);
    assert_eq!(exports[0]["contexts"][0], "base:allocation");
    assert_eq!(exports[0]["can_multi_conn"], true);
    assert_eq!(exports[1]["can_trim"], false);

    // The map: data exactly in the allocated blocks 1 and 5.
    let out = run(Command::new("nbdinfo").args(["--json", "--map", &unix_uri("sparse", &socket)]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let (block, hole) = (2 * MIB, 3);
    assert_eq!(
        extents,
        [
            (0, block, hole),
            (block, block, 0),
            (2 * block, 3 * block, hole),
            (5 * block, block, 0),
            (6 * block, disk.info().size() - 6 * block, hole),
        ]
    );
}

#[test]
fn server_nbdcopy_round_trip_and_qemu_img_compare() {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (image, contents) = sparse_vhd(dir.path());
    let disk = open_cached(&image);
    let (_server, socket) = serve(dir.path(), vec![export("d", &disk)]);
    let uri = unix_uri("d", &socket);

    // qemu-img compares the exported dynamic VHD with its raw contents.
    let raw = dir.path().join("contents.raw");
    std::fs::write(&raw, &contents).unwrap();
    qemu_img_compare(&uri, "raw", &raw, "raw");

    // Out to a file: the same bytes, and sparse (holes not written).
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    let copied = std::fs::read(&copy).unwrap();
    assert!(copied[..contents.len()] == contents[..]);
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&copy).unwrap()) * 512;
    assert!(
        used < 6 * MIB,
        "nbdcopy wrote the holes ({used} bytes used)"
    );

    // Back in: a changed file replaces the export's contents.
    let mut changed = copied.clone();
    changed[MIB as usize..MIB as usize + 8192].fill(0x77);
    changed[10 * MIB as usize..11 * MIB as usize].fill(0);
    std::fs::write(&copy, &changed).unwrap();
    run(Command::new("nbdcopy").arg(&copy).arg(&uri));
    let mut io = BlockingIo::new().unwrap();
    let back = io.read_all(&*disk).unwrap();
    assert!(
        back[..changed.len()] == changed[..],
        "the export holds the copied-in file"
    );
    qemu_img_compare(&uri, "raw", &copy, "raw");
}

#[test]
fn server_qemu_io_pattern_reads_back_through_the_storage_vsp() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("shared.vhd");
    vhd::create::create_dynamic(&image, 32 * MIB, 2 << 20).unwrap();
    // One open device: exported over NBD and LUN 0 of a SCSI controller.
    let disk = open_cached(&image);
    let (_server, socket) = serve(dir.path(), vec![export("", &disk)]);
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 3M 192k",
            "-c",
            "write -z 3M 4k",
        ])
        .arg(unix_uri("", &socket)));
    let mut vsp = Appliance::new(dir.path(), Arc::clone(&disk));
    let got = vsp.read((3 * MIB) / 512, 256 * 1024);
    assert!(
        got[..4096].iter().all(|&b| b == 0),
        "write -z zeroed the first 4 KiB"
    );
    assert!(got[4096..192 * 1024].iter().all(|&b| b == 0x5a));
    assert!(got[192 * 1024..].iter().all(|&b| b == 0));
}

#[test]
fn server_fio_nbd_engine_random_reads_and_verified_writes() {
    require_tool("fio");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fio.raw");
    vhd::create::create_raw(&image, 32 * MIB).unwrap();
    let disk = open_cached(&image);
    let (_server, socket) = serve(dir.path(), vec![export("", &disk)]);
    let fio = |rw: &str, extra: &[&str]| {
        let out = run(Command::new("fio")
            .args([
                "--name=nbd",
                "--ioengine=nbd",
                "--bs=4k",
                "--iodepth=16",
                "--size=32M",
            ])
            .arg(format!("--uri={}", unix_uri("", &socket)))
            .arg(format!("--rw={rw}"))
            .args(["--output-format=json"])
            .args(extra));
        let text = String::from_utf8_lossy(&out.stdout);
        let json = &text[text.find('{').expect("fio JSON")..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "fio {rw}: {job}");
        job.clone()
    };
    // Random writes over 8 MiB, then fio reads back and checks each block.
    let w = fio(
        "randwrite",
        &[
            "--io_size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    assert!(w["write"]["io_bytes"].as_u64().unwrap() >= 8 * MIB);
    assert!(
        w["read"]["io_bytes"].as_u64().unwrap() >= 8 * MIB,
        "verification read back"
    );
    let r = fio("randread", &["--io_size=8M"]);
    assert_eq!(r["read"]["io_bytes"].as_u64().unwrap(), 8 * MIB);
}

// ---- vspa's client ----

#[test]
fn client_lun_on_nbdkit_memory_through_the_storage_vsp() {
    require_tool("nbdkit");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbdkit.sock");
    let _nbdkit = nbdkit(&socket, &["memory", "32M"]);
    let uri = unix_uri("", &socket);
    let disk = vhd::open_by_name(Path::new(&uri), &DiskOptions::default()).unwrap();
    assert_eq!(disk.info().size(), 32 * MIB);
    assert_eq!(disk.info().kind, vhd::DeviceKind::Nbd);
    let mut vsp = Appliance::new(dir.path(), disk);
    let mut expected = vec![0u8; 32 * MIB as usize];
    for round in 0..3 {
        let chunks = random_chunks(round, 32 * MIB, 24, 64 * 1024);
        let status = vsp.write_all(&as_writes(&chunks));
        assert!(status.iter().all(|&s| s == srb::SUCCESS), "{status:?}");
        apply(&mut expected, &chunks);
        let (at, data) = &chunks[5];
        assert!(vsp.read(at / 512, data.len()) == *data);
    }
    assert_eq!(vsp.sync(), srb::SUCCESS);
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    qemu_img_compare(&uri, "raw", &raw, "raw");
}

#[test]
fn client_lun_on_qemu_nbd_over_a_vhd_through_the_storage_vsp() {
    require_tool("qemu-nbd");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("served.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&image)
        .arg("24M"));
    let socket = dir.path().join("qemu-nbd.sock");
    let qemu = spawn_server(
        Command::new("qemu-nbd")
            .args(["-t", "-f", "vpc", "-k"])
            .arg(&socket)
            .arg(&image),
        &socket,
    );
    let uri = unix_uri("", &socket);
    let disk = vhd::open_by_name(Path::new(&uri), &DiskOptions::default()).unwrap();
    let size = disk.info().size();
    let mut vsp = Appliance::new(dir.path(), disk);
    let chunks = random_chunks(9, size / MIB * MIB, 32, 32 * 1024);
    let status = vsp.write_all(&as_writes(&chunks));
    assert!(status.iter().all(|&s| s == srb::SUCCESS), "{status:?}");
    assert_eq!(vsp.sync(), srb::SUCCESS);
    let mut expected = vec![0u8; size as usize];
    apply(&mut expected, &chunks);
    let (at, data) = &chunks[0];
    assert!(vsp.read(at / 512, data.len()) == *data);
    drop(vsp);
    drop(qemu);
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    qemu_img_compare(image.to_str().unwrap(), "vpc", &raw, "raw");
}

#[test]
fn client_survives_a_server_killed_and_restarted_mid_run() {
    require_tool("nbdkit");
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.raw");
    vhd::create::create_raw(&backing, 16 * MIB).unwrap();
    let socket = dir.path().join("nbdkit.sock");
    let file = format!("file={}", backing.display());
    // Writes take 400 ms in this server: they are in flight when it dies.
    let server = nbdkit(
        &socket,
        &["--filter=delay", "file", &file, "delay-write=400ms"],
    );
    let uri = unix_uri("", &socket);
    let disk = vhd::open_by_name(Path::new(&uri), &DiskOptions::default()).unwrap();
    let mut vsp = Appliance::new(dir.path(), disk);
    let mut expected = vec![0u8; 16 * MIB as usize];

    // Acknowledged, not flushed, before the crash.
    let before = random_chunks(1, 16 * MIB, 4, 64 * 1024);
    assert!(
        vsp.write_all(&as_writes(&before))
            .iter()
            .all(|&s| s == srb::SUCCESS)
    );
    apply(&mut expected, &before);

    // In flight when the server is killed; it comes back 300 ms later
    // (started from this thread: nbdkit spawned by a thread that then
    // ends exits on its first connection).
    let during = random_chunks(2, 16 * MIB, 8, 64 * 1024);
    let txids = vsp.send_writes(&as_writes(&during));
    std::thread::sleep(Duration::from_millis(150));
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    let _restarted = nbdkit(&socket, &["file", &file]);
    let status = vsp.collect(&txids);
    // The rule: in-flight writes are sent again and succeed.
    assert!(status.iter().all(|&s| s == srb::SUCCESS), "{status:?}");
    apply(&mut expected, &during);
    // The first flush after the reconnect fails: writes acknowledged
    // before the crash were never flushed. The next one succeeds.
    assert_ne!(
        vsp.sync(),
        srb::SUCCESS,
        "flush after a lost server must fail"
    );
    // Writes after the reconnect land.
    let after = random_chunks(3, 16 * MIB, 6, 64 * 1024);
    assert!(
        vsp.write_all(&as_writes(&after))
            .iter()
            .all(|&s| s == srb::SUCCESS)
    );
    apply(&mut expected, &after);
    assert_eq!(vsp.sync(), srb::SUCCESS);
    let (at, data) = &after[2];
    assert!(vsp.read(at / 512, data.len()) == *data);
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    qemu_img_compare(backing.to_str().unwrap(), "raw", &raw, "raw");
}

// ---- vspa image on NBD URIs ----

#[test]
fn vspa_image_info_convert_and_compare_on_nbd_uris() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (image, contents) = sparse_vhd(dir.path());
    let disk = open_cached(&image);
    let target_path = dir.path().join("target.raw");
    std::fs::write(&target_path, vec![0xeeu8; 16 * MIB as usize]).unwrap();
    let target = open_cached(&target_path);
    let (_server, socket) = serve(
        dir.path(),
        vec![export("sparse", &disk), export("target", &target)],
    );
    let source = unix_uri("sparse", &socket);
    let vspa = workspace_bin("vspa");

    let out = run(Command::new(&vspa).args(["image", "info", "--json", &source]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["format"], "nbd");
    assert_eq!(info["virtual_size"], disk.info().size());
    assert_eq!(info["allocated_bytes"], 4 * MIB, "blocks 1 and 5 hold data");
    assert_eq!(info["nbd"]["export"], "sparse");
    assert_eq!(info["nbd"]["base_allocation"], true);

    // Out of the export into a new dynamic VHD: sparse, same contents.
    let copy = dir.path().join("copy.vhd");
    run(Command::new(&vspa)
        .args(["image", "convert", "-O", "vhd", &source])
        .arg(&copy));
    let copied = vhd::tool::info(&copy).unwrap();
    assert_eq!(copied.allocated_bytes, 4 * MIB, "holes stayed unallocated");
    run(Command::new(&vspa)
        .args(["image", "compare", &source])
        .arg(&copy));
    qemu_img_compare(copy.to_str().unwrap(), "vpc", &image, "vpc");

    // Into an existing export: its old bytes are replaced, zeros included.
    let into = unix_uri("target", &socket);
    run(Command::new(&vspa)
        .args(["image", "convert", "-O", "raw"])
        .arg(&copy)
        .arg(&into));
    run(Command::new(&vspa).args(["image", "compare", &into, &source]));
    let mut io = BlockingIo::new().unwrap();
    let back = io.read_all(&*target).unwrap();
    assert!(back[..contents.len()] == contents[..]);
}
