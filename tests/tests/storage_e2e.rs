//! The storage VSP end to end: `vspa serve --config` in its own process,
//! this test as a storvsc client over hosted mode, and independent tools
//! (qemu-img, xorriso) checking the bytes.

use std::path::Path;
use std::process::Command;

use rand::{RngExt, SeedableRng};
use storage::client::{Buffer, Srb, StorvscClient, cdb};
use storage::protocol::{direction, srb};
use vmbus::hosted::client::HostedClient;
use vspa_tests::{VspaServe, require_tool};

const DISK: u64 = 48 << 20;
const CHUNK: u32 = 128 * 1024;
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("vspa.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn connect(serve: &VspaServe, subchannels: u16) -> (HostedClient, StorvscClient) {
    vspa_tests::connect_scsi(&serve.socket, 16 << 20, subchannels, 32)
}

#[test]
fn dynamic_vhd_through_two_subchannels_verified_by_qemu_img() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhd");
    vhd::create::create_dynamic(&image, DISK, 2 << 20).unwrap();
    let config = write_config(
        dir.path(),
        "[[controller]]\nname = \"scsi0\"\nsubchannels = 2\n\n[[controller.lun]]\nlun = 0\npath = \"disk.vhd\"\n",
    );
    let serve = VspaServe::start(&["--config", config.to_str().unwrap()]);
    let (mut host, mut c) = connect(&serve, 2);
    assert_eq!(c.channels.len(), 3, "primary and two sub-channels");

    // A random pattern over most of the disk, chunks spread over channels;
    // a few gaps stay unwritten and must read back as zeros.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut expected = vec![0u8; DISK as usize];
    let buf = Buffer {
        pages: host.alloc_pages((CHUNK / 4096) as u64 + 1).unwrap(),
        offset: 512,
        len: CHUNK,
    };
    let chunks = (DISK / CHUNK as u64) as usize;
    for i in 0..chunks {
        if i % 7 == 3 {
            continue;
        }
        let at = i * CHUNK as usize;
        rng.fill(&mut expected[at..at + CHUNK as usize]);
        host.slice(&buf.pages)
            .write_at(512, &expected[at..at + CHUNK as usize])
            .unwrap();
        let lba = (at / 512) as u64;
        let w = cdb::write_16(lba, CHUNK / 512);
        let r = c
            .execute(i % 3, &Srb::new(0, &w, direction::WRITE, CHUNK), Some(&buf))
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS, "write chunk {i}");
    }
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::synchronize_cache(), direction::NONE, 0),
            None,
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);

    // Read everything back through a different channel than it was written.
    let mut got = vec![0u8; CHUNK as usize];
    for i in 0..chunks {
        let at = i * CHUNK as usize;
        let rd = cdb::read_16((at / 512) as u64, CHUNK / 512);
        let r = c
            .execute(
                (i + 1) % 3,
                &Srb::new(0, &rd, direction::READ, CHUNK),
                Some(&buf),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS, "read chunk {i}");
        host.slice(&buf.pages).read_at(512, &mut got).unwrap();
        assert!(
            got == expected[at..at + CHUNK as usize],
            "chunk {i} reads back differently"
        );
    }
    drop(c);
    drop(host);
    drop(serve);
    // The killed server's ring lets go of the image (and its locks) once
    // its last requests are done.
    vhd::ImageLock::acquire(&image, vhd::Access::ReadWrite, LOCK_WAIT).unwrap();

    // An independent reader sees the same bytes.
    let raw = dir.path().join("disk.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let converted = std::fs::read(&raw).unwrap();
    assert!(converted.len() as u64 >= DISK);
    assert!(
        converted[..DISK as usize] == expected[..],
        "qemu-img sees different data"
    );
    assert!(converted[DISK as usize..].iter().all(|&b| b == 0));
}

#[test]
fn xorriso_iso_reads_back_through_read_10() {
    require_tool("xorriso");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut content = vec![0u8; 300_000];
    rng.fill(&mut content[..]);
    std::fs::write(src.join("DATA.BIN"), &content).unwrap();
    std::fs::write(src.join("README.TXT"), b"hello from the DVD\n").unwrap();
    let iso = dir.path().join("media.iso");
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-R", "-J", "-V", "VSPATEST", "-o"])
        .arg(&iso)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = write_config(
        dir.path(),
        "[[controller]]\nname = \"dvd0\"\nsubchannels = 0\n\n[[controller.lun]]\nlun = 0\ndvd = true\npath = \"media.iso\"\n",
    );
    let serve = VspaServe::start(&["--config", config.to_str().unwrap()]);
    let (mut host, mut c) = connect(&serve, 0);
    let b = Buffer {
        pages: host.alloc_pages(2).unwrap(),
        offset: 0,
        len: 96,
    };
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::inquiry(false, 0, 96), direction::READ, 96),
            Some(&b),
        )
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS);
    let mut inq = [0u8; 2];
    host.slice(&b.pages).read_at(0, &mut inq).unwrap();
    assert_eq!(inq, [0x05, 0x80], "removable DVD");
    // Where the file lives, read from the ISO on the host side.
    let meta = vhd::iso::IsoMeta::read(
        &vhd::file::IoFile::open(&iso, false, vhd::CacheMode::Cached).unwrap(),
    )
    .unwrap();
    let entry = meta
        .find("DATA.BIN")
        .expect("file in root directory")
        .clone();
    // READ(10) in 64-block pieces (the controller's 256 KiB transfer limit).
    let blocks = content.len().div_ceil(2048) as u32;
    let buf = Buffer {
        pages: host.alloc_pages(32).unwrap(),
        offset: 0,
        len: 64 * 2048,
    };
    let mut got = Vec::new();
    let mut lba = 0;
    while lba < blocks {
        let n = (blocks - lba).min(64);
        let len = n * 2048;
        let piece = Buffer { len, ..buf };
        let rd = cdb::read_10(entry.extent + lba, n as u16);
        let r = c
            .execute(0, &Srb::new(0, &rd, direction::READ, len), Some(&piece))
            .unwrap();
        assert_eq!(r.srb().srb_status, srb::SUCCESS);
        assert_eq!(r.srb().data_transfer_length.get(), len);
        let mut part = vec![0u8; len as usize];
        host.slice(&buf.pages).read_at(0, &mut part).unwrap();
        got.extend_from_slice(&part);
        lba += n;
    }
    got.truncate(content.len());
    assert!(got == content, "file read through READ(10) differs");
    assert_eq!(entry.size as usize, content.len());
    // Writes are refused with DATA PROTECT.
    let w = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let one = Buffer { len: 2048, ..buf };
    let r = c
        .execute(0, &Srb::new(0, &w, direction::WRITE, 2048), Some(&one))
        .unwrap();
    assert_eq!(r.srb().scsi_status, 2);
    assert_eq!(r.sense()[2], 7);
}

#[test]
fn bad_configuration_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[controller]]\nname = \"a\"\nbogus = 1\n", "unknown field"),
        (
            "[[controller]]\nname = \"a\"\n[[controller.lun]]\nlun = 0\npath = \"missing.vhd\"\n",
            "missing.vhd",
        ),
        (
            "[[controller]]\nname = \"a\"\n[[controller.lun]]\nlun = 0\n",
            "needs a path",
        ),
        (
            "[[controller]]\nname = \"a\"\nqueue_depth = 0\n",
            "queue_depth",
        ),
        (
            "[[controller]]\nname = \"a\"\ncpus = [4096]\n",
            "cpu 4096 is past the last CPU number",
        ),
        (
            "[[controller]]\nname = \"a\"\n[[controller]]\nname = \"a\"\n",
            "name used twice",
        ),
    ];
    for (body, want) in cases {
        let config = write_config(dir.path(), body);
        let out = Command::new(vspa_tests::workspace_bin("vspa"))
            .args(["serve", "--socket"])
            .arg(dir.path().join("x.sock"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{body:?} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{body:?}: error {err:?} lacks {want:?}");
        assert!(!err.contains("panicked"));
    }
}

/// Sends SIGHUP (reload) to a `vspa serve` process.
fn sighup(child: &std::process::Child) {
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(status.success());
}

#[test]
fn sighup_reload_hot_adds_and_removes_luns() {
    let dir = tempfile::tempdir().unwrap();
    vhd::create::create_dynamic(&dir.path().join("a.vhd"), 8 << 20, 2 << 20).unwrap();
    vhd::create::create_raw(&dir.path().join("b.img"), 4 << 20).unwrap();
    let one = "[[controller]]\nname = \"scsi0\"\n\n[[controller.lun]]\nlun = 0\npath = \"a.vhd\"\n";
    let two = format!("{one}\n[[controller.lun]]\nlun = 1\npath = \"b.img\"\n");
    let config = write_config(dir.path(), one);
    let serve = VspaServe::start(&["--config", config.to_str().unwrap()]);
    let (mut host, mut c) = connect(&serve, 0);
    let b = Buffer {
        pages: host.alloc_pages(1).unwrap(),
        offset: 0,
        len: 255,
    };
    let mut luns = |c: &mut StorvscClient| {
        let r = c
            .execute(
                0,
                &Srb::new(0, &cdb::report_luns(255), direction::READ, 255),
                Some(&b),
            )
            .unwrap();
        (r.srb().data_transfer_length.get() - 8) / 8
    };
    assert_eq!(luns(&mut c), 1);
    let hup = |serve: &VspaServe| sighup(&serve.child);
    let wait_for =
        |c: &mut StorvscClient, want: u32, luns: &mut dyn FnMut(&mut StorvscClient) -> u32| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while luns(c) != want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "LUN count never reached {want}"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        };
    std::fs::write(&config, &two).unwrap();
    hup(&serve);
    wait_for(&mut c, 2, &mut luns);
    assert!(
        c.unsolicited
            .contains(&storage::protocol::operation::ENUMERATE_BUS)
    );
    // A broken file changes nothing.
    std::fs::write(
        &config,
        "[[controller]]\nname = \"scsi0\"\nnonsense = true\n",
    )
    .unwrap();
    hup(&serve);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(luns(&mut c), 2);
    std::fs::write(&config, one).unwrap();
    hup(&serve);
    wait_for(&mut c, 1, &mut luns);
    assert!(
        c.unsolicited
            .contains(&storage::protocol::operation::REMOVE_DEVICE)
    );
}
