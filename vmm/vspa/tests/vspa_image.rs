//! `vspa image` end to end through the real binary: create, info, check,
//! compare, merge, convert, and clear errors (never panics) on bad input.
//! Checked against the vhd library, which the interop tests check against
//! qemu-img and vhdimount.

use std::path::Path;
use std::process::{Command, Output};
use vhd::{BlockingIo, CacheMode, DiskOptions, VhdDisk};

fn vspa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vspa"))
        .arg("image")
        .args(args)
        .output()
        .unwrap()
}

fn rw() -> DiskOptions {
    DiskOptions::default().cache(CacheMode::Cached)
}

#[test]
fn vspa_image_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(vspa(&[
        "create",
        "-f",
        "vhd",
        "--subformat",
        "dynamic",
        &p("base.vhd"),
        "8M",
    ]));
    ok(vspa(&[
        "create",
        "-f",
        "vhd",
        "--subformat",
        "differencing",
        "--parent",
        &p("base.vhd"),
        &p("child.vhd"),
    ]));
    ok(vspa(&["create", "-f", "raw", &p("r.raw"), "8M"]));
    ok(vspa(&[
        "create",
        "-f",
        "vhd",
        "--subformat",
        "fixed",
        &p("f.vhd"),
        "8M",
    ]));
    let info = ok(vspa(&["info", "--json", &p("child.vhd")]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["type"], "differencing");
    assert_eq!(v["parent_chain"][0], p("base.vhd"));
    assert_eq!(v["checksums_ok"], true);
    assert_eq!(v["block_size"], 2 << 20);
    for image in ["base.vhd", "child.vhd", "f.vhd", "r.raw"] {
        let out = ok(vspa(&["check", &p(image)]));
        assert!(out.contains("No errors"), "{out}");
    }
    // Write into the child, merge it, and compare the parent with the data.
    {
        let disk = VhdDisk::open(Path::new(&p("child.vhd")), &rw()).unwrap();
        let mut io = BlockingIo::new().unwrap();
        io.write(&disk, 2048, &[0x77u8; 8192]).unwrap();
        io.flush(&disk).unwrap();
    }
    let mut expected = vec![0u8; 8 << 20];
    expected[2048 * 512..2048 * 512 + 8192].fill(0x77);
    std::fs::write(p("expected.raw"), &expected).unwrap();
    let out = vspa(&["compare", &p("child.vhd"), &p("base.vhd")]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "child and base differ before the merge"
    );
    ok(vspa(&["merge", &p("child.vhd")]));
    assert!(!Path::new(&p("child.vhd")).exists());
    ok(vspa(&["compare", &p("expected.raw"), &p("base.vhd")]));
    ok(vspa(&[
        "convert",
        "-O",
        "raw",
        &p("base.vhd"),
        &p("back.raw"),
    ]));
    assert_eq!(std::fs::read(p("back.raw")).unwrap(), expected);

    // Damage: a flipped header byte. check lists the problem, exit 2;
    // info fails with a message, never a panic.
    let mut bytes = std::fs::read(p("base.vhd")).unwrap();
    bytes[512 + 200] ^= 0xff;
    std::fs::write(p("bad.vhd"), &bytes).unwrap();
    let out = vspa(&["check", &p("bad.vhd")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("checksum"));
    for args in [
        vec!["info", p("bad.vhd").leak() as &str],
        vec!["merge", p("base.vhd").leak()],
        vec!["create", "-f", "vhd", p("x.vhd").leak(), "1000"],
        vec!["info", p("missing.vhd").leak()],
    ] {
        let out = vspa(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A reader that stops early (`vspa image info x | head -0`) ends the
/// command quietly: no panic, no error, success.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.vhd");
    vhd::create::create_dynamic(&image, 64 << 20, vhd::format::DEFAULT_BLOCK_SIZE).unwrap();
    for sub in [&["info"][..], &["info", "--json"], &["check"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_vspa"))
            .arg("image")
            .args(sub)
            .arg(&image)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{sub:?}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{sub:?}: {stderr}");
    }
}

/// `-U` reads an image another process holds for writing (as a running
/// vspa does) at once; without it the tools wait for the lock and fail.
#[test]
fn force_share_reads_an_image_held_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.vhd");
    vhd::create::create_dynamic(&image, 64 << 20, vhd::format::DEFAULT_BLOCK_SIZE).unwrap();
    let _held = vhd::ImageLock::acquire(
        &image,
        vhd::lock::Access::ReadWrite,
        std::time::Duration::ZERO,
    )
    .unwrap();
    let image = image.to_str().unwrap();
    for args in [
        &["info", "-U", image][..],
        &["check", "--force-share", image],
    ] {
        let start = std::time::Instant::now();
        let out = vspa(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{args:?} waited"
        );
    }
    let refused = vspa(&["check", "--repair", "-U", image]);
    assert!(!refused.status.success(), "--repair with -U is refused");
}
