//! A stock Linux kernel (Debian's linux-image-cloud-amd64) boots in
//! `vspa run` with an initramfs, runs a shell command and resets back.
//!
//! The kernel and a static busybox come from Debian's archive
//! (`apt-get download`, unpacked here with `dpkg-deb`). Loading the real
//! bzImage is checked everywhere. Booting it needs a KVM that runs guest
//! code natively: on an emulation-only host (a probe guest measures the
//! instruction rate) the test says so and does not attempt the boot.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vspa_tests::{require_tool, workspace_bin};

fn cache_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-linux");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Downloads and unpacks a Debian package (once); returns its root.
fn unpack(package: &str) -> PathBuf {
    let dir = cache_dir();
    let root = dir.join(format!("{package}.root"));
    if root.join(".done").exists() {
        return root;
    }
    let out = Command::new("apt-get")
        .args(["download", package])
        .current_dir(&dir)
        .output()
        .expect("run apt-get download");
    assert!(
        out.status.success(),
        "apt-get download {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{package}_"))
        })
        .expect("downloaded .deb");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success(), "dpkg-deb -x {}", deb.display());
    std::fs::write(root.join(".done"), b"").unwrap();
    root
}

/// The versioned image package the cloud metapackage depends on.
fn kernel_package() -> String {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .expect("run apt-cache");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .expect("linux-image-cloud-amd64 depends on a versioned image (run apt-get update)")
        .to_string()
}

fn find_vmlinuz(root: &Path) -> PathBuf {
    std::fs::read_dir(root.join("boot"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("vmlinuz in the package")
}

/// A newc cpio archive writer (what the kernel unpacks as initramfs).
struct Cpio(Vec<u8>, u32);

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.1 += 1;
        let fields = [
            self.1,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.0.extend_from_slice(b"070701");
        for f in fields {
            self.0.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.0
    }
}

const INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo \"VSPA-GUEST-OK $(/bin/busybox uname -r)\"
/bin/busybox ls /sys/bus/acpi/devices | /bin/busybox grep -q VMBus && echo VSPA-VMBUS-ACPI-DEVICE
/bin/busybox reboot -f
";

fn initramfs(busybox: &[u8]) -> Vec<u8> {
    let mut c = Cpio(Vec::new(), 0);
    for d in ["bin", "dev", "proc", "sys"] {
        c.entry(d, 0o040755, (0, 0), &[]);
    }
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.entry("bin/busybox", 0o100755, (0, 0), busybox);
    c.entry("init", 0o100755, (0, 0), INIT.as_bytes());
    c.finish()
}

#[test]
fn stock_kernel_boots_to_a_shell_command_where_kvm_runs_natively() {
    require_tool("apt-get");
    require_tool("apt-cache");
    require_tool("dpkg-deb");
    let kernel = find_vmlinuz(&unpack(&kernel_package()));
    let busybox = std::fs::read(unpack("busybox-static").join("bin/busybox")).unwrap();

    // The real bzImage loads: 64-bit entry, setup header, zero page.
    let mem = vmm::memory::create_guest_ram(512 << 20).unwrap();
    let cfg = vmm::boot::BootConfig {
        kernel: kernel.clone(),
        cmdline: "console=ttyS0".into(),
        ..Default::default()
    };
    let info = vmm::boot::load(&mem, 512 << 20, &cfg).unwrap();
    assert_eq!(info.entry, 0x10_0200);
    let version: u16 = mem.read_obj(GuestAddress(0x7000 + 0x206)).unwrap();
    assert!(version >= 0x020c, "boot protocol {version:#x}");
    let xloadflags: u16 = mem.read_obj(GuestAddress(0x7000 + 0x236)).unwrap();
    assert_ne!(xloadflags & 1, 0, "XLF_KERNEL_64");

    let mips = vmm::probe::guest_mips().unwrap();
    if mips < vmm::probe::NATIVE_MIPS_THRESHOLD {
        eprintln!(
            "NOTE: this host's KVM is emulation-only (probe guest ran at {mips:.2} million \
             instructions/s, native needs >= {}): a stock kernel cannot boot here, so the \
             boot part of this test ran only the loader checks. It boots the kernel on hosts \
             with hardware virtualization.",
            vmm::probe::NATIVE_MIPS_THRESHOLD
        );
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, initramfs(&busybox)).unwrap();
    let mut child = Command::new(workspace_bin("vspa"))
        .args(["run", "--memory", "512", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 rdinit=/init loglevel=4",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the kernel did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success(),
        "{status:?}\n{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(console.contains("VSPA-GUEST-OK"), "{console}");
    assert!(
        console.contains("VSPA-VMBUS-ACPI-DEVICE"),
        "the DSDT's VMBus device: {console}"
    );
}

#[test]
fn cpio_newc_layout() {
    let mut c = Cpio(Vec::new(), 0);
    c.entry("init", 0o100755, (0, 0), b"ab");
    let a = c.finish();
    assert_eq!(&a[..6], b"070701");
    assert_eq!(&a[6..14], b"00000001", "inode");
    assert_eq!(&a[14..22], b"000081ed", "mode");
    assert_eq!(&a[54..62], b"00000002", "filesize");
    assert_eq!(&a[94..102], b"00000005", "namesize");
    assert_eq!(&a[110..115], b"init\0");
    assert_eq!(&a[116..118], b"ab", "data after 4-byte padding");
    assert!(a.ends_with(b"TRAILER!!!\0\0\0\0") || a.len().is_multiple_of(4));
}
