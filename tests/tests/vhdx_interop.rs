//! VHDX against independent tools: images qemu-img makes and qemu-io
//! writes read back byte-identical through vspa; images vspa makes and
//! writes pass `qemu-img check` and `qemu-img compare` and read the same in
//! libvhdi's vhdimount (which, unlike qemu, also reads 4 KiB-sector and
//! differencing VHDX); a log written by this test's own generator, straight
//! from the specification, replays to the bytes the specification defines,
//! and qemu reads the replayed image the same. A missing tool fails the
//! test.

use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vhd::vhdx::{VhdxKind, VhdxOptions, create_differencing, create_vhdx};
use vhd::{BlockDevice, BlockingIo, CacheMode, DiskOptions, VhdxDisk};
use vspa_tests::{require_tool, workspace_bin};

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ro() -> DiskOptions {
    DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached)
}

fn rw() -> DiskOptions {
    DiskOptions::default().cache(CacheMode::Cached)
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    BlockingIo::new().unwrap().read_all(dev).unwrap()
}

fn opts(block: u32, sector: u32) -> VhdxOptions {
    VhdxOptions {
        block_size: block,
        logical_sector: sector,
        ..VhdxOptions::default()
    }
}

/// Random writes (in units of `unit` bytes) through vspa, mirrored in
/// `model`; flushed at the end.
fn scribble(disk: &dyn BlockDevice, model: &mut [u8], unit: u64, seed: u64, count: usize) {
    let bs = u64::from(disk.info().block_size);
    let mut io = BlockingIo::new().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let units = model.len() as u64 / unit;
    for _ in 0..count {
        let n = rng.random_range(1..(96 << 10) / unit);
        let at = rng.random_range(0..units - n) * unit;
        let mut buf = vec![0u8; (n * unit) as usize];
        rng.fill_bytes(&mut buf);
        io.write(disk, at / bs, &buf).unwrap();
        model[at as usize..][..buf.len()].copy_from_slice(&buf);
    }
    io.flush(disk).unwrap();
}

/// Unmounts a FUSE mount when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// The chain `image` heads as vhdimount exposes it (base first).
fn vhdimount_all(image: &Path, dir: &Path) -> Vec<Vec<u8>> {
    let mnt = dir.join(format!(
        "mnt-{}",
        image.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("vhdimount").arg(image).arg(&mnt));
    let _mount = Mount(mnt.clone());
    let mut out = Vec::new();
    for n in 1.. {
        match std::fs::read(mnt.join(format!("vhdi{n}"))) {
            Ok(bytes) => out.push(bytes),
            Err(_) => break,
        }
    }
    out
}

#[test]
fn qemu_made_vhdx_images_read_byte_identical_through_vspa() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let size = 40u64 << 20;
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(17);
    for _ in 0..24 {
        let len = rng.random_range(1..200 * 1024usize);
        let at = rng.random_range(0..data.len() - len);
        rng.fill_bytes(&mut data[at..at + len]);
    }
    std::fs::write(&src, &data).unwrap();
    for (n, opt) in [
        "subformat=dynamic,block_size=1M",
        "subformat=dynamic,block_size=8M,log_size=2M",
        "subformat=dynamic,block_size=32M,block_state_zero=off",
        "subformat=fixed,block_size=4M",
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("q{n}.vhdx"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vhdx", "-o", opt])
            .arg(&src)
            .arg(&out));
        // qemu-io writes on top (allocating and overwriting).
        let mut expected = data.clone();
        for (pattern, at, len) in [(0x5a, 3 << 20, 64 << 10), (0xa5, 37 << 20, 4096)] {
            run(Command::new("qemu-io")
                .args([
                    "-f",
                    "vhdx",
                    "-c",
                    &format!("write -P {pattern} {at} {len}"),
                ])
                .arg(&out));
            expected[at..at + len].fill(pattern as u8);
        }
        let disk = vhd::open_by_name(&out, &ro()).unwrap();
        assert_eq!(disk.info().size(), size, "{opt}");
        assert!(read_all(&*disk) == expected, "{opt}: contents differ");
        // And vspa writes into qemu's image; qemu reads them back.
        drop(disk);
        let disk = vhd::open_by_name(&out, &rw()).unwrap();
        scribble(&*disk, &mut expected, 512, n as u64, 40);
        drop(disk);
        let raw = dir.path().join(format!("e{n}.raw"));
        std::fs::write(&raw, &expected).unwrap();
        run(Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&out));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vhdx"])
            .arg(&raw)
            .arg(&out));
    }
}

#[test]
fn vspa_made_vhdx_images_pass_qemu_img_and_read_the_same_in_vhdimount() {
    require_tool("qemu-img");
    require_tool("vhdimount");
    let dir = tempfile::tempdir().unwrap();
    let size = 24u64 << 20;
    for (kind, block, sector) in [
        (VhdxKind::Dynamic, 1 << 20, 512),
        (VhdxKind::Dynamic, 32 << 20, 512),
        (VhdxKind::Fixed, 2 << 20, 512),
        (VhdxKind::Dynamic, 1 << 20, 4096),
        (VhdxKind::Fixed, 8 << 20, 4096),
    ] {
        let name = format!("{}-{}-{sector}", kind.name(), block >> 20);
        let path = dir.path().join(format!("{name}.vhdx"));
        create_vhdx(&path, kind, size, &opts(block, sector)).unwrap();
        let mut model = vec![0u8; size as usize];
        {
            let disk = VhdxDisk::open(&path, &rw()).unwrap();
            scribble(&disk, &mut model, u64::from(sector), 7, 150);
        }
        let raw = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, &model).unwrap();
        if sector == 512 {
            // qemu's VHDX driver supports 512-byte logical sectors only.
            run(Command::new("qemu-img")
                .args(["check", "-f", "vhdx"])
                .arg(&path));
            run(Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "vhdx"])
                .arg(&raw)
                .arg(&path));
        }
        let theirs = vhdimount_all(&path, dir.path());
        assert_eq!(theirs.len(), 1);
        assert!(theirs[0] == model, "{name}: vhdimount reads other contents");
        let info = run(Command::new("vhdiinfo").arg(&path));
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(
            text.contains(&format!("Bytes per sector\t: {sector} bytes")),
            "{text}"
        );
        // The CLI converts back to raw byte for byte.
        let back = dir.path().join(format!("{name}.back"));
        let out = Command::new(workspace_bin("vspa"))
            .args(["image", "convert", "-O", "raw"])
            .arg(&path)
            .arg(&back)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::read(&back).unwrap() == model);
    }
}

#[test]
fn differencing_vhdx_chains_read_identically_in_vhdimount() {
    require_tool("vhdimount");
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    for sector in [512u32, 4096] {
        let base = dir.path().join(format!("base{sector}.vhdx"));
        let mid = dir.path().join(format!("mid{sector}.vhdx"));
        let top = dir.path().join(format!("top{sector}.vhdx"));
        create_vhdx(&base, VhdxKind::Dynamic, size, &opts(2 << 20, sector)).unwrap();
        let mut model = vec![0u8; size as usize];
        let unit = u64::from(sector);
        let mut models = Vec::new();
        scribble(
            &VhdxDisk::open(&base, &rw()).unwrap(),
            &mut model,
            unit,
            1,
            40,
        );
        models.push(model.clone());
        create_differencing(&mid, &base, &opts(2 << 20, sector)).unwrap();
        scribble(
            &VhdxDisk::open(&mid, &rw()).unwrap(),
            &mut model,
            unit,
            2,
            40,
        );
        models.push(model.clone());
        create_differencing(&top, &mid, &opts(1 << 20, sector)).unwrap();
        scribble(
            &VhdxDisk::open(&top, &rw()).unwrap(),
            &mut model,
            unit,
            3,
            40,
        );
        models.push(model.clone());
        assert!(read_all(&VhdxDisk::open(&top, &ro()).unwrap()) == model);
        let theirs = vhdimount_all(&top, dir.path());
        assert_eq!(theirs.len(), 3, "vhdimount follows the parent locators");
        for (level, (t, m)) in theirs.iter().zip(&models).enumerate() {
            let first = t.iter().zip(m).position(|(a, b)| a != b);
            assert_eq!(first, None, "sector {sector}: level {level} differs");
        }
    }
}

// ---- log replay against a log written from the specification ----

const MIB: u64 = 1 << 20;
const LOG_AT: u64 = MIB;
const LOG_LEN: u64 = MIB;
const BAT_AT: u64 = 3 * MIB;

/// One descriptor of a crafted entry.
enum Desc {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// A log entry as the specification lays it out: the 64-byte header and
/// 32-byte descriptors in 4 KiB descriptor sectors, then one data sector
/// per data descriptor ("data", sequence high, bytes 8..4092 of the page,
/// sequence low; the page's first 8 and last 4 bytes go in the descriptor);
/// CRC-32C over the whole entry with the checksum field zero.
/// `last` is the size the entry's structures need; the file was 4 MiB
/// (durable) when each entry was written.
fn entry(guid: [u8; 16], seq: u64, tail: u32, last: u64, descs: &[Desc]) -> Vec<u8> {
    let flushed = 4 * MIB;
    let data_count = descs.iter().filter(|d| matches!(d, Desc::Data(..))).count();
    let desc_sectors = (descs.len() + 2).div_ceil(128);
    let mut e = vec![0u8; (desc_sectors + data_count) * 4096];
    let len = e.len() as u32;
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&len.to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(descs.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(&guid);
    e[48..56].copy_from_slice(&flushed.to_le_bytes());
    e[56..64].copy_from_slice(&last.to_le_bytes());
    let mut data_at = desc_sectors * 4096;
    for (i, d) in descs.iter().enumerate() {
        let at = 64 + i * 32;
        let dd = &mut e[at..at + 32];
        match d {
            Desc::Data(offset, page) => {
                dd[0..4].copy_from_slice(b"desc");
                dd[4..8].copy_from_slice(&page[4092..]);
                dd[8..16].copy_from_slice(&page[..8]);
                dd[16..24].copy_from_slice(&offset.to_le_bytes());
                let sector = &mut e[data_at..data_at + 4096];
                sector[0..4].copy_from_slice(b"data");
                sector[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                sector[8..4092].copy_from_slice(&page[8..4092]);
                sector[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
                data_at += 4096;
            }
            Desc::Zero(offset, len) => {
                dd[0..4].copy_from_slice(b"zero");
                dd[8..16].copy_from_slice(&len.to_le_bytes());
                dd[16..24].copy_from_slice(&offset.to_le_bytes());
            }
        }
        let dd = &mut e[at..at + 32];
        dd[24..32].copy_from_slice(&seq.to_le_bytes());
    }
    let crc = crc32c::crc32c(&e);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    e
}

/// Puts `entry` into the circular log at sector `sector`.
fn place(log: &mut [u8], sector: u64, entry: &[u8]) -> u64 {
    let mut at = (sector * 4096) as usize;
    for chunk in entry.chunks(4096) {
        log[at..at + 4096].copy_from_slice(chunk);
        at = (at + 4096) % log.len();
    }
    (at / 4096) as u64
}

/// Sets the current header's LogGuid (both headers, new sequence numbers).
fn set_log_guid(image: &mut [u8], guid: [u8; 16]) {
    for (i, at) in [64 << 10, 128 << 10].into_iter().enumerate() {
        let h = &mut image[at..at + 4096];
        h[8..16].copy_from_slice(&(100 + i as u64).to_le_bytes());
        h[48..64].copy_from_slice(&guid);
        h[4..8].fill(0);
        let crc = crc32c::crc32c(h);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

fn bat_page(entries: &[(usize, u64)]) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for &(i, e) in entries {
        p[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    p
}

fn patterned(seed: u8) -> Vec<u8> {
    (0..4096)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

#[test]
fn a_crafted_log_replays_to_the_bytes_the_specification_defines() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.vhdx");
    // 32 MiB, 1 MiB blocks, 1 MiB log at 1 MiB, metadata at 2 MiB, BAT at
    // 3 MiB, blocks from 4 MiB (the layout vspa creates).
    create_vhdx(&clean, VhdxKind::Dynamic, 32 << 20, &opts(1 << 20, 512)).unwrap();
    let mut image = std::fs::read(&clean).unwrap();
    assert_eq!(image.len() as u64, 4 * MIB);
    let guid: [u8; 16] = *b"crafted-log-guid";
    set_log_guid(&mut image, guid);
    let full = |mib: u64| (mib * MIB) | 6; // PAYLOAD_BLOCK_FULLY_PRESENT
    // The active sequence: 10 (tail: itself), 11, 12 (tails: entry 10),
    // placed to wrap around the end of the log; 13 torn; a stale 3..4 and
    // a foreign-GUID entry elsewhere.
    let e10 = entry(
        guid,
        10,
        250 * 4096,
        6 * MIB,
        &[
            Desc::Data(BAT_AT, bat_page(&[(0, full(4)), (1, full(5))])),
            Desc::Data(4 * MIB + 4096, patterned(1)),
            Desc::Data(5 * MIB - 4096, patterned(2)),
        ],
    );
    let e11 = entry(
        guid,
        11,
        250 * 4096,
        6 * MIB,
        &[
            Desc::Zero(4 * MIB + 4096, 4096),
            Desc::Data(5 * MIB + 8192, patterned(3)),
            Desc::Data(6 * MIB - 4096, patterned(4)),
        ],
    );
    let e12 = entry(
        guid,
        12,
        250 * 4096,
        7 * MIB,
        &[
            Desc::Data(
                BAT_AT,
                bat_page(&[(0, full(4)), (1, full(5)), (2, full(6))]),
            ),
            Desc::Data(7 * MIB - 4096, patterned(5)),
        ],
    );
    let mut e13 = entry(
        guid,
        13,
        250 * 4096,
        8 * MIB,
        &[Desc::Data(
            BAT_AT,
            bat_page(&[(0, full(4)), (1, full(5)), (2, full(6)), (3, full(7))]),
        )],
    );
    e13[4096 + 100] ^= 0xff; // torn: its data sector never fully landed
    let stale = [
        entry(
            guid,
            3,
            100 * 4096,
            4 * MIB,
            &[Desc::Data(BAT_AT, bat_page(&[(5, full(9))]))],
        ),
        entry(
            guid,
            4,
            100 * 4096,
            4 * MIB,
            &[Desc::Data(BAT_AT, bat_page(&[(6, full(9))]))],
        ),
    ];
    let foreign = entry(
        *b"some-other-guid!",
        99,
        0,
        4 * MIB,
        &[Desc::Data(BAT_AT, bat_page(&[(7, full(9))]))],
    );
    let mut log = vec![0u8; LOG_LEN as usize];
    let mut at = 250;
    for e in [&e10, &e11, &e12, &e13] {
        at = place(&mut log, at, e);
    }
    let mut s = 100;
    for e in &stale {
        s = place(&mut log, s, e);
    }
    place(&mut log, 180, &foreign);
    image[LOG_AT as usize..(LOG_AT + LOG_LEN) as usize].copy_from_slice(&log);

    // What the specification defines: entries 10, 11, 12 applied in
    // order, the file grown to the last entry's LastFileOffset.
    let mut expected = image.clone();
    expected.resize(7 * MIB as usize, 0);
    let mut apply = |offset: u64, bytes: &[u8]| {
        expected[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes)
    };
    apply(BAT_AT, &bat_page(&[(0, full(4)), (1, full(5))]));
    apply(4 * MIB + 4096, &patterned(1));
    apply(5 * MIB - 4096, &patterned(2));
    apply(4 * MIB + 4096, &[0; 4096]);
    apply(5 * MIB + 8192, &patterned(3));
    apply(6 * MIB - 4096, &patterned(4));
    apply(
        BAT_AT,
        &bat_page(&[(0, full(4)), (1, full(5)), (2, full(6))]),
    );
    apply(7 * MIB - 4096, &patterned(5));
    let mut disk_view = vec![0u8; 32 << 20];
    disk_view[MIB as usize - 4096..MIB as usize].copy_from_slice(&patterned(2));
    disk_view[(MIB + 8192) as usize..][..4096].copy_from_slice(&patterned(3));
    disk_view[2 * MIB as usize - 4096..2 * MIB as usize].copy_from_slice(&patterned(4));
    disk_view[3 * MIB as usize - 4096..3 * MIB as usize].copy_from_slice(&patterned(5));

    let ours = dir.path().join("ours.vhdx");
    std::fs::write(&ours, &image).unwrap();
    // Read-only, the log cannot be replayed in memory: it changes block data.
    let err = VhdxDisk::open(&ours, &ro()).unwrap_err().to_string();
    assert!(err.contains("read-write"), "{err}");
    // vspa replays on a read-write open.
    drop(VhdxDisk::open(&ours, &rw()).unwrap());
    let replayed = std::fs::read(&ours).unwrap();
    assert_eq!(replayed.len(), expected.len());
    // Everything past the header section and the log is as defined.
    let from = (LOG_AT + LOG_LEN) as usize;
    assert!(
        replayed[from..] == expected[from..],
        "replay differs from the specification"
    );
    assert!(read_all(&VhdxDisk::open(&ours, &ro()).unwrap()) == disk_view);
    // qemu opens the replayed image and agrees on its contents. (qemu's
    // own replay is not compared: it ignores the head's tail and replays
    // only the first chain it meets with the highest sequence number, so
    // here it would skip entries 10 and 11.)
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&ours));
    let raw = dir.path().join("view.raw");
    std::fs::write(&raw, &disk_view).unwrap();
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vhdx"])
        .arg(&raw)
        .arg(&ours));
}

fn vspa(args: &[&str]) -> Output {
    let out = Command::new(workspace_bin("vspa"))
        .arg("image")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vspa image {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `vspa image` command line with VHDX: create (4 KiB sectors, block
/// size, differencing), info --json, check --json.
#[test]
fn vspa_image_creates_and_describes_vhdx() {
    require_tool("vhdiinfo");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    vspa(&[
        "create",
        "-f",
        "vhdx",
        "--block-size",
        "8388608",
        "--logical-sector-size",
        "4096",
        &s(&base),
        "1G",
    ]);
    vspa(&["create", "-f", "vhdx", "--parent", &s(&base), &s(&child)]);
    let info: serde_json::Value =
        serde_json::from_slice(&vspa(&["info", "--json", &s(&child)]).stdout).unwrap();
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["type"], "differencing");
    assert_eq!(info["virtual_size"], 1u64 << 30);
    assert_eq!(info["logical_sector_size"], 4096);
    assert_eq!(info["parent_chain"][0], s(&base));
    let info: serde_json::Value =
        serde_json::from_slice(&vspa(&["info", "--json", &s(&base)]).stdout).unwrap();
    assert_eq!(info["type"], "dynamic");
    assert_eq!(info["block_size"], 8 << 20);
    assert_eq!(info["checksums_ok"], true);
    let report: serde_json::Value =
        serde_json::from_slice(&vspa(&["check", "--json", &s(&child)]).stdout).unwrap();
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);
    let text =
        String::from_utf8_lossy(&run(Command::new("vhdiinfo").arg(&child)).stdout).into_owned();
    assert!(text.contains("Differential"), "{text}");
    assert!(text.contains("4096 bytes"), "{text}");
}
