//! Image ownership and format safety end to end.
//!
//! Locks: vspa takes QEMU's file-posix byte-range locks (`vhd::lock`), so
//! QEMU's own tools (qemu-io, qemu-nbd) and vspa keep each other off a
//! writable image, two `vspa serve` processes refuse one image, and readers
//! share. Format: a guest that writes VHD structures into its raw disk
//! reads back exactly its bytes after a restart and after a reload; a file
//! named as a VHD that is not a valid one is refused; parents come only from
//! allowed directories.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use storage::client::{Buffer, Srb, StorvscClient, cdb};
use storage::protocol::{direction, srb};
use vhd::{Access, DeviceKind, DiskOptions, ImageError, ImageLock, LockConflict, ParentPolicy};
use vmbus::hosted::client::HostedClient;
use vspa_tests::{VspaServe, require_tool, workspace_bin};

const MIB: u64 = 1 << 20;
const CHUNK: u32 = 128 * 1024;
const WAIT: Duration = Duration::from_secs(10);

fn quick() -> DiskOptions {
    DiskOptions {
        lock_wait: Duration::ZERO,
        ..DiskOptions::default().cache(vhd::CacheMode::Cached)
    }
}

fn conflict<T: std::fmt::Debug>(r: Result<T, ImageError>) -> (LockConflict, String) {
    match r {
        Err(e @ ImageError::Locked { conflict, .. }) => (conflict, e.to_string()),
        other => panic!("expected a lock conflict, got {other:?}"),
    }
}

fn qemu_io(args: &[&str], image: &Path) -> Output {
    Command::new("qemu-io")
        .args(args)
        .arg(image)
        .output()
        .unwrap()
}

/// Data of `len` bytes that names its seed in every byte run.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 512) as u8 ^ seed ^ (i as u8))
        .collect()
}

/// Writes `data` at sector `lba` of VHD `path`, flushed.
fn write_vhd(path: &Path, lba: u64, data: &[u8]) {
    let disk = vhd::open_as(path, vhd::Format::Vhd, &quick()).unwrap();
    let mut io = vhd::BlockingIo::new().unwrap();
    io.write(&*disk, lba, data).unwrap();
    io.flush(&*disk).unwrap();
}

/// A qemu process holding an image, ended (by pid) on drop.
struct Qemu(std::process::Child);

impl Qemu {
    /// `qemu-io <args> image` reading commands from a pipe: it holds the
    /// image from its first prompt until its input closes.
    fn io(args: &[&str], image: &Path) -> Qemu {
        let mut child = Command::new("qemu-io")
            .args(args)
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut prompt = [0u8; 9];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut prompt)
            .unwrap();
        assert_eq!(&prompt, b"qemu-io> ");
        Qemu(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// A vspa writer keeps QEMU's writers out; a differencing disk's parent is
/// held read-only: QEMU cannot write it, but can read it beside vspa.
#[test]
fn vspa_holding_an_image_keeps_qemu_writers_out() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    vhd::create::create_raw(&raw, 4 * MIB).unwrap();
    let disk = vhd::open_by_name(&raw, &quick()).unwrap();
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k"], &raw);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    drop(disk);
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k"], &raw);
    assert!(out.status.success(), "{out:?}");

    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    vhd::create::create_dynamic(&base, 4 * MIB, 512 << 10).unwrap();
    vhd::create::create_differencing(&child, &base, 512 << 10).unwrap();
    let chain = vhd::open_by_name(&child, &quick()).unwrap();
    assert!(!chain.info().read_only);
    let out = qemu_io(&["-f", "vpc", "-c", "write 0 4k"], &base);
    assert!(!out.status.success(), "the parent must be held read-only");
    let out = qemu_io(&["-f", "vpc", "-r", "-c", "read 0 4k"], &base);
    assert!(out.status.success(), "{out:?}");
}

/// An image qemu-nbd or qemu-io holds for writing is refused, for reading
/// too, with a clear error; readers (vspa's and qemu-io -r) share.
#[test]
fn qemu_holding_an_image_keeps_vspa_out_and_readers_share() {
    require_tool("qemu-nbd");
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    vhd::create::create_raw(&raw, 4 * MIB).unwrap();
    let pid_file = dir.path().join("nbd.pid");
    let socket = dir.path().join(format!("nbd-{}.sock", std::process::id()));
    let status = Command::new("qemu-nbd")
        .args(["--fork", "--persistent", "-f", "raw", "-k"])
        .arg(&socket)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(status.success());
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let (why, message) = conflict(vhd::open_by_name(&raw, &quick()));
    assert_eq!(why, LockConflict::InUse(vhd::lock::Perm::Write));
    assert_eq!(
        message,
        format!(
            "image {} is in use by another process for writing (lock held)",
            raw.display()
        )
    );
    conflict(vhd::open_by_name(&raw, &quick().read_only(true)));
    let killed = Command::new("kill").arg(pid.trim()).status().unwrap();
    assert!(killed.success(), "kill qemu-nbd {pid}");
    // Its locks go with it.
    vhd::open_by_name(
        &raw,
        &DiskOptions {
            lock_wait: WAIT,
            ..quick()
        },
    )
    .unwrap();

    let image = dir.path().join("disk.vhd");
    vhd::create::create_dynamic(&image, 4 * MIB, 512 << 10).unwrap();
    {
        let _writer = Qemu::io(&["-f", "vpc"], &image);
        conflict(vhd::open_by_name(&image, &quick()));
        conflict(vhd::open_by_name(&image, &quick().read_only(true)));
    }
    let _reader = Qemu::io(&["-f", "vpc", "-r"], &image);
    let ro = quick().read_only(true);
    let a = vhd::open_by_name(&image, &ro).unwrap();
    let b = vhd::open_by_name(&image, &ro).unwrap();
    let out = qemu_io(&["-f", "vpc", "-r", "-c", "read 0 4k"], &image);
    assert!(out.status.success(), "{out:?}");
    let (why, _) = conflict(vhd::open_by_name(&image, &quick()));
    assert_eq!(why, LockConflict::Forbidden(vhd::lock::Perm::Write));
    drop((a, b));
}

/// A second `vspa serve` naming a writable image the first one serves
/// refuses to start, saying why.
#[test]
fn two_vspa_processes_refuse_one_writable_image() {
    let dir = tempfile::tempdir().unwrap();
    vhd::create::create_raw(&dir.path().join("shared.img"), 4 * MIB).unwrap();
    let config = dir.path().join("vspa.toml");
    std::fs::write(
        &config,
        "[[controller]]\nname = \"scsi0\"\n[[controller.lun]]\nlun = 0\npath = \"shared.img\"\n",
    )
    .unwrap();
    let _first = VspaServe::start(&["--config", config.to_str().unwrap()]);
    let out = Command::new(workspace_bin("vspa"))
        .args(["serve", "--socket"])
        .arg(dir.path().join("second.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shared.img is in use by another process for writing (lock held)"),
        "{err}"
    );
}

/// The bytes of a VHD made by `make` (then removed), laid out over a raw
/// disk of `disk` bytes: everything but the footer at offset 0, the footer
/// in the last sector, as a guest would write a complete image.
fn vhd_over_raw(path: &Path, disk: u64, make: impl FnOnce(&Path)) -> Vec<u8> {
    make(path);
    let bytes = std::fs::read(path).unwrap();
    std::fs::remove_file(path).unwrap();
    let mut raw = vec![0u8; disk as usize];
    let (body, footer) = bytes.split_at(bytes.len() - 512);
    raw[..body.len()].copy_from_slice(body);
    raw[disk as usize - 512..].copy_from_slice(footer);
    raw
}

fn connect(serve: &VspaServe) -> (HostedClient, StorvscClient) {
    vspa_tests::connect_scsi(&serve.socket, 16 << 20, 0, 8)
}

/// A guest's view of its disks, over SCSI.
struct Guest {
    host: HostedClient,
    c: StorvscClient,
    buf: Buffer,
}

impl Guest {
    fn new(serve: &VspaServe) -> Guest {
        let (mut host, c) = connect(serve);
        let buf = Buffer {
            pages: host.alloc_pages((CHUNK / 4096) as u64).unwrap(),
            offset: 0,
            len: CHUNK,
        };
        Guest { host, c, buf }
    }

    fn run(&mut self, lun: u8, cdb: &[u8], dir: u8, len: u32) {
        let piece = Buffer { len, ..self.buf };
        let r = self
            .c
            .execute(
                0,
                &Srb::new(lun, cdb, dir, len),
                (len > 0).then_some(&piece),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS, "LUN {lun} {:#x}", cdb[0]);
    }

    fn write(&mut self, lun: u8, data: &[u8]) {
        for (i, chunk) in data.chunks(CHUNK as usize).enumerate() {
            self.host.slice(&self.buf.pages).write_at(0, chunk).unwrap();
            let lba = (i * CHUNK as usize / 512) as u64;
            let w = cdb::write_16(lba, chunk.len() as u32 / 512);
            self.run(lun, &w, direction::WRITE, chunk.len() as u32);
        }
        self.run(lun, &cdb::synchronize_cache(), direction::NONE, 0);
    }

    /// The whole disk, after checking READ CAPACITY says `len` bytes.
    fn read(&mut self, lun: u8, len: u64) -> Vec<u8> {
        self.run(lun, &cdb::read_capacity_16(), direction::READ, 32);
        let mut cap = [0u8; 12];
        self.host
            .slice(&self.buf.pages)
            .read_at(0, &mut cap)
            .unwrap();
        let last = u64::from_be_bytes(cap[..8].try_into().unwrap());
        assert_eq!((last + 1) * 512, len, "LUN {lun} capacity");
        let mut all = vec![0u8; len as usize];
        for (i, chunk) in all.chunks_mut(CHUNK as usize).enumerate() {
            let lba = (i * CHUNK as usize / 512) as u64;
            let rd = cdb::read_16(lba, chunk.len() as u32 / 512);
            self.run(lun, &rd, direction::READ, chunk.len() as u32);
            self.host.slice(&self.buf.pages).read_at(0, chunk).unwrap();
        }
        all
    }

    fn lun_count(&mut self) -> u32 {
        self.run(0, &cdb::report_luns(256), direction::READ, 256);
        let mut head = [0u8; 4];
        self.host
            .slice(&self.buf.pages)
            .read_at(0, &mut head)
            .unwrap();
        u32::from_be_bytes(head) / 8
    }
}

/// A guest writes a complete differencing VHD (parent locators naming
/// another disk of the configuration, relatively and by absolute path) and
/// a complete dynamic VHD into its two raw disks. After a restart and
/// after a reload it reads back exactly those bytes, never the parent's.
#[test]
fn guest_written_vhd_structures_stay_raw_across_restart_and_reload() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = 4 * MIB;
    let base = d.join("base.vhd");
    vhd::create::create_dynamic(&base, disk, 512 << 10).unwrap();
    let base_data = pattern(disk as usize, 0xb5);
    write_vhd(&base, 0, &base_data);
    let diff = vhd_over_raw(&d.join("made.vhd"), disk, |p| {
        vhd::create::create_differencing(p, &base, 512 << 10).unwrap();
        write_vhd(p, 8, &pattern(8192, 0x3c));
    });
    let abs = std::fs::canonicalize(&base).unwrap();
    let abs = abs.to_str().unwrap().as_bytes();
    let utf16 = |s: &[u8]| s.iter().flat_map(|&b| [b, 0]).collect::<Vec<u8>>();
    assert!(
        diff.windows(2 * abs.len()).any(|w| w == utf16(abs)),
        "W2ku names base.vhd"
    );
    let dynamic = vhd_over_raw(&d.join("made.vhd"), disk, |p| {
        vhd::create::create_dynamic(p, 2 * MIB, 512 << 10).unwrap();
        write_vhd(p, 0, &pattern(2 * MIB as usize, 0x71));
    });
    // Read by content, these bytes would be a differencing disk over
    // base.vhd: what a guest must never get.
    std::fs::write(d.join("probe.img"), &diff).unwrap();
    let probed = vhd::open_by_content(&d.join("probe.img"), &quick()).unwrap();
    assert_eq!(probed.info().kind, DeviceKind::VhdDifferencing);
    drop(probed);

    for name in ["guest.img", "guest2.img", "marker.img"] {
        vhd::create::create_raw(&d.join(name), disk).unwrap();
    }
    let lun = |n: u8, path: &str, extra: &str| {
        format!("[[controller.lun]]\nlun = {n}\npath = \"{path}\"\n{extra}\n")
    };
    let config = d.join("vspa.toml");
    let body = |cache: &str, marker: bool| {
        let cache = format!("cache = \"{cache}\"");
        format!(
            "[[controller]]\nname = \"scsi0\"\nsubchannels = 0\n{}{}{}{}",
            lun(0, "guest.img", &cache),
            lun(1, "guest2.img", &cache),
            lun(2, "base.vhd", "read_only = true"),
            if marker {
                lun(3, "marker.img", "")
            } else {
                String::new()
            }
        )
    };
    std::fs::write(&config, body("direct", false)).unwrap();
    let start = || VspaServe::start(&["--config", config.to_str().unwrap()]);

    let serve = start();
    let mut guest = Guest::new(&serve);
    assert_eq!(guest.read(2, disk), base_data);
    guest.write(0, &diff);
    guest.write(1, &dynamic);
    assert!(guest.read(0, disk) == diff);
    // Served, the raw disk is vspa's: QEMU cannot take it for writing.
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k"], &d.join("guest.img"));
    assert!(!out.status.success(), "{out:?}");
    drop(guest);
    drop(serve);
    for name in ["guest.img", "guest2.img"] {
        ImageLock::acquire(&d.join(name), Access::ReadWrite, WAIT).unwrap();
    }

    let serve = start();
    let mut guest = Guest::new(&serve);
    assert!(guest.read(0, disk) == diff, "after a restart");
    assert!(guest.read(1, disk) == dynamic, "after a restart");

    // A reload that reopens both disks (new cache mode) and adds a marker
    // LUN, whose arrival says the reload was applied.
    std::fs::write(&config, body("cached", true)).unwrap();
    let pid = serve.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + WAIT * 2;
    while guest.lun_count() != 4 {
        assert!(std::time::Instant::now() < deadline, "reload never applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(guest.read(0, disk) == diff, "after a reload");
    assert!(guest.read(1, disk) == dynamic, "after a reload");
}

/// Under `auto`, a `.vhd` whose footers are both destroyed but whose
/// dynamic header is intact is refused (by `vspa serve` too), not served
/// raw; the same bytes named as raw are raw. The tools' content probe sees
/// a damaged VHD, not a raw disk.
#[test]
fn damaged_vhd_is_refused_and_parents_stay_in_allowed_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broken = d.join("broken.vhd");
    vhd::create::create_dynamic(&broken, 4 * MIB, 512 << 10).unwrap();
    let mut bytes = std::fs::read(&broken).unwrap();
    let len = bytes.len();
    bytes[..512].fill(0);
    bytes[len - 512..].fill(0);
    assert_eq!(&bytes[512..520], b"cxsparse");
    std::fs::write(&broken, &bytes).unwrap();
    match vhd::open_by_name(&broken, &quick()) {
        Err(ImageError::NotAsNamed { source, .. }) => {
            assert!(source.to_string().contains("footer"), "{source}")
        }
        other => panic!("a damaged .vhd must be refused: {other:?}"),
    }
    assert!(matches!(
        vhd::open_by_content(&broken, &quick()),
        Err(ImageError::BadCookie {
            structure: "footer"
        })
    ));
    std::fs::write(d.join("broken.img"), &bytes).unwrap();
    let raw = vhd::open_by_name(&d.join("broken.img"), &quick()).unwrap();
    assert_eq!(raw.info().kind, DeviceKind::Raw);

    // A parent in another directory: refused unless that directory is
    // allowed, and never when denied; a symlink next to the child that
    // leads there is no way around it.
    let elsewhere = d.join("base");
    std::fs::create_dir(&elsewhere).unwrap();
    let base = elsewhere.join("base.vhd");
    vhd::create::create_dynamic(&base, 4 * MIB, 512 << 10).unwrap();
    let child = d.join("child.vhd");
    vhd::create::create_differencing(&child, &base, 512 << 10).unwrap();
    std::os::unix::fs::symlink(&base, d.join("base.vhd")).unwrap();
    let ro = quick().read_only(true);
    let with = |parents: ParentPolicy| DiskOptions {
        parents,
        ..ro.clone()
    };
    assert!(matches!(
        vhd::open_by_name(&child, &ro),
        Err(ImageError::ParentNotAllowed { .. })
    ));
    let allowed = ParentPolicy {
        allowed_dirs: vec![elsewhere.clone()],
        denied: vec![],
    };
    vhd::open_by_name(&child, &with(allowed.clone())).unwrap();
    let denied = ParentPolicy {
        denied: vec![d.join("base.vhd")],
        ..allowed
    };
    assert!(matches!(
        vhd::open_by_name(&child, &with(denied)),
        Err(ImageError::ParentDenied { .. })
    ));

    // The configuration says the same, and `parent_dirs` allows.
    let serve = |extra: &str, disk: &str| -> Output {
        let config = d.join("vspa.toml");
        std::fs::write(
            &config,
            format!("[[controller]]\nname = \"a\"\n[[controller.lun]]\nlun = 0\npath = \"{disk}\"\n{extra}"),
        )
        .unwrap();
        let socket = d.join("s.sock");
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(workspace_bin("vspa"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = [0u8; 11];
        let ready = child.stdout.as_mut().unwrap().read_exact(&mut line).is_ok();
        let _ = child.kill();
        let mut out = child.wait_with_output().unwrap();
        if ready {
            out.stdout.splice(0..0, line);
        }
        out
    };
    for (disk, want) in [
        (
            "broken.vhd",
            "broken.vhd: its name says VHD but it is not a valid VHD image",
        ),
        (
            "child.vhd",
            "is outside the directories parents may come from",
        ),
    ] {
        let out = serve("", disk);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{disk}: {err:?} lacks {want:?}");
    }
    let out = serve("parent_dirs = [\"base\"]\n", "child.vhd");
    assert!(out.stdout.starts_with(b"vspa: ready"), "{out:?}");
}
