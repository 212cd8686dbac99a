//! `vspa run` as a user meets it: small flat guests boot and print on the
//! serial console, a guest reset is a clean exit, a triple fault is
//! reported, SIGTERM stops the VM, and bad options or images are refused
//! with a clear message.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vspa_tests::workspace_bin;

/// mov al,c; mov dx,0x3f8; out dx,al (for each byte), then the i8042 reset.
fn printing_guest(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &c in text {
        code.extend_from_slice(&[0xb0, c, 0xee]); // mov al, c; out dx, al
    }
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    code
}

fn vspa_run(args: &[&str]) -> Output {
    Command::new(workspace_bin("vspa"))
        .arg("run")
        .args(args)
        .output()
        .expect("run vspa")
}

/// `vspa run` of a flat guest image with 16 MiB of RAM, to spawn.
fn flat_command(guest: &str) -> Command {
    let mut c = Command::new(workspace_bin("vspa"));
    c.args(["run", "--kernel", guest, "--kernel-format", "flat"])
        .args(["--memory", "16"]);
    c
}

/// Runs a flat guest with `extra` options to the end.
fn run_flat(guest: &str, extra: &[&str]) -> Output {
    flat_command(guest).args(extra).output().expect("run vspa")
}

fn write_guest(dir: &tempfile::TempDir, name: &str, code: &[u8]) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, code).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn flat_guest_prints_on_the_console_and_resets_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let guest = write_guest(
        &dir,
        "hello.bin",
        &printing_guest(b"hello from the guest\n"),
    );
    let out = vspa_run(&[
        "--kernel",
        &guest,
        "--kernel-format",
        "flat",
        "--memory",
        "32",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the guest\n"
    );
    // Console to a file.
    let log = dir.path().join("console.log");
    let out = vspa_run(&[
        "--kernel",
        &guest,
        "--kernel-format",
        "flat",
        "--memory",
        "32",
        "--serial",
        log.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hello from the guest\n"
    );
}

#[test]
fn triple_fault_is_reported_and_the_vmm_exits_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // ud2 with no IDT: #UD, #DF, shutdown.
    let guest = write_guest(&dir, "ud2.bin", &[0x0f, 0x0b]);
    let out = run_flat(&guest, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("triple-faulted"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sigterm_stops_a_running_guest() {
    let dir = tempfile::tempdir().unwrap();
    // Print one byte, then spin (no halt: the vCPU keeps running).
    let guest = write_guest(
        &dir,
        "spin.bin",
        &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee, 0xeb, 0xfe],
    );
    let mut child = flat_command(&guest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut byte = [0u8];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut byte).unwrap();
    assert_eq!(&byte, b"!");
    #[allow(unsafe_code)]
    // SAFETY: sends SIGTERM to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM)
    };
    // The flat guest has no integration services: vspa stops it at once
    // and says so with exit status 3.
    let (status, err) = exit_of(&mut child, "vspa run ignored SIGTERM");
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("stopping the VM"), "{err}");
}

/// Waits (20 s at most) for `child` to exit; its status and stderr.
fn exit_of(child: &mut std::process::Child, what: &str) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status, err)
}

/// Waits (20 s at most) for `child` to exit successfully; its stderr.
fn successful_exit(child: &mut std::process::Child, what: &str) -> String {
    let (status, err) = exit_of(child, what);
    assert!(status.success(), "{status:?}: {err}");
    err
}

/// `vspa run` failed with exit code 1 and `message`, without a panic.
fn assert_refused(out: &Output, what: &str, message: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(
        err.contains(message),
        "{what}: expected {message:?} in {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_options_and_images_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = write_guest(&dir, "garbage.img", &[0x55; 4096]);
    let ok = write_guest(&dir, "ok.bin", &printing_guest(b""));
    let empty = write_guest(&dir, "empty.bin", &[]);
    let cases: [(Vec<&str>, &str); 9] = [
        (vec!["--kernel", &garbage], "neither a bzImage"),
        (vec!["--kernel", "/nonexistent/vmlinuz"], "no such file"),
        (
            vec!["--kernel", &empty, "--kernel-format", "flat"],
            "image is empty",
        ),
        (
            vec!["--kernel", &garbage, "--kernel-format", "bzimage"],
            "cannot load",
        ),
        (
            vec!["--kernel", &ok, "--kernel-format", "flat", "--memory", "1"],
            "--memory 1 MiB is out of range",
        ),
        (
            vec!["--kernel", &ok, "--kernel-format", "flat", "--vcpus", "0"],
            "--vcpus 0 is out of range",
        ),
        (
            vec![
                "--kernel",
                &ok,
                "--kernel-format",
                "flat",
                "--initrd",
                "/nonexistent",
            ],
            "--initrd /nonexistent: no such file",
        ),
        (
            vec![
                "--kernel",
                &ok,
                "--kernel-format",
                "flat",
                "--virtio-disk",
                "/nonexistent.raw",
            ],
            "--virtio-disk /nonexistent.raw",
        ),
        (
            vec!["--kernel", &ok, "--kernel-format", "elf"],
            "cannot load",
        ),
    ];
    for (args, message) in cases {
        assert_refused(&vspa_run(&args), &format!("{args:?}"), message);
    }
    let long = "x".repeat(5000);
    let out = vspa_run(&[
        "--kernel",
        &ok,
        "--kernel-format",
        "flat",
        "--cmdline",
        &long,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("command line is 5000 bytes"));
}

/// `vspa run` of a flat guest with a configuration naming `lun_path`.
fn run_with_config(dir: &tempfile::TempDir, guest: &str, lun_path: &str) -> Output {
    let config = dir.path().join("vspa.toml");
    let text = format!(
        "[[controller]]\nname = \"scsi0\"\n[[controller.lun]]\nlun = 0\npath = {lun_path:?}\n"
    );
    std::fs::write(&config, text).unwrap();
    run_flat(guest, &["--config", config.to_str().unwrap()])
}

#[test]
fn config_file_controllers_come_up_for_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let guest = write_guest(&dir, "ok.bin", &printing_guest(b"ok\n"));
    std::fs::write(dir.path().join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    let out = run_with_config(&dir, &guest, "disk.raw");
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SCSI controller scsi0 with LUNs [0]"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    // A configuration naming a missing image is refused before the VM starts.
    let out = run_with_config(&dir, &guest, "missing.vhd");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.vhd"), "{err}");
    assert!(out.stdout.is_empty());
}

/// Prints the magic, device id and MAC bytes 1-5 of the virtio-mmio
/// device in window 0 (32-bit MMIO loads, as a driver probes), then resets.
fn virtio_probing_guest() -> Vec<u8> {
    let mut c = vec![0x48, 0xbe]; // mov rsi, 0xd0000000
    c.extend_from_slice(&0xd000_0000u64.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    let out_shift = |c: &mut Vec<u8>, n: usize| {
        for i in 0..n {
            if i > 0 {
                c.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
            }
            c.push(0xee); // out dx, al
        }
    };
    c.extend_from_slice(&[0x8b, 0x06]); // mov eax, [rsi]: MagicValue
    out_shift(&mut c, 4);
    c.extend_from_slice(&[0x8b, 0x46, 0x08, 0x04, b'0', 0xee]); // DeviceID + '0'
    c.extend_from_slice(&[0x8b, 0x86, 0x00, 0x01, 0x00, 0x00]); // config: mac[0..4]
    c.extend_from_slice(&[0xc1, 0xe8, 0x08]);
    out_shift(&mut c, 3);
    c.extend_from_slice(&[0x8b, 0x86, 0x04, 0x01, 0x00, 0x00]); // mac[4..6], status
    out_shift(&mut c, 2);
    c.extend_from_slice(&[0xb0, b'\n', 0xee]);
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // i8042 reset
    c
}

#[test]
fn virtio_net_option_puts_a_nic_on_a_configured_switch() {
    let dir = tempfile::tempdir().unwrap();
    let guest = write_guest(&dir, "probe.bin", &virtio_probing_guest());
    let config = dir.path().join("vspa.toml");
    std::fs::write(
        &config,
        "[[switch]]\nname = \"sw\"\n[[switch.port]]\nname = \"mgmt\"\n\
         internal = { mac = \"02:00:00:00:08:fe\", ip = \"10.208.0.254/24\", counters_port = 9100 }\n",
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let run = |nic: &str| run_flat(&guest, &["--config", cfg, "--virtio-net", nic]);
    let out = run("sw:vm0,mac=02:41:42:43:44:45");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "virt1ABCDE\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("virtio-net NIC vm0 on switch sw (MAC 02:41:42:43:44:45)"),
        "{err}"
    );
    // Defaults: port virtio-net0, a MAC derived from the names.
    let out = run("sw");
    assert!(out.status.success(), "{out:?}");
    let mac = switch::config::derived_mac("sw", "virtio-net0");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "virtio-net NIC virtio-net0 on switch sw (MAC {mac})"
        )),
        "{out:?}"
    );
    assert!(out.stdout.starts_with(b"virt1"));
    for (spec, message) in [
        ("nosuch", "--virtio-net nosuch: no switch \"nosuch\""),
        ("sw,mac=zz", "--virtio-net sw,mac=zz"),
        ("sw,mac=01:00:5e:00:00:01", "is a multicast address"),
        ("sw,mtu=9000", "unknown option \"mtu=9000\""),
        ("sw:mgmt", "already has a port named \"mgmt\""),
        (":p", "expected SWITCH[:PORT][,mac=MAC]"),
    ] {
        assert_refused(&run(spec), spec, message);
    }
}

/// Echoes COM1 input to COM1 output until it reads '.', then resets:
/// polls LSR (0x3fd) for data ready, reads RBR (0x3f8), writes it back.
const ECHO_GUEST: &[u8] = &[
    0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd
    0xec, // poll: in al, dx
    0xa8, 0x01, // test al, 1
    0x74, 0xfb, // jz poll
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xec, // in al, dx
    0x3c, b'.', // cmp al, '.'
    0x74, 0x07, // je reset
    0xee, // out dx, al
    0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd
    0xeb, 0xeb, // jmp poll
    0xb0, 0xfe, 0xe6, 0x64, // reset: mov al, 0xfe; out 0x64, al
];

#[test]
fn console_input_reaches_the_guest() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let guest = write_guest(&dir, "echo.bin", ECHO_GUEST);
    let mut child = flat_command(&guest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // More than the UART's 64-byte FIFO: the rest waits for the guest.
    let text: String = (0..6)
        .map(|i| format!("line {i} typed at the vspa console\n"))
        .collect();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    stdin.write_all(b".").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
}

/// A pseudo-terminal pair: (master, slave).
#[allow(unsafe_code)]
fn open_pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the ints; the name and
    // settings pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[allow(unsafe_code)]
fn local_flags(fd: &std::os::fd::OwnedFd) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it for an open tty.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

/// On a terminal the console is raw (the guest echoes, the terminal does
/// not), Ctrl-A x stops the VM, and the terminal's settings come back.
#[test]
fn terminal_console_is_raw_and_ctrl_a_x_stops_the_vm() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let guest = write_guest(&dir, "echo.bin", ECHO_GUEST);
    let (mut master, slave) = open_pty();
    let cooked = local_flags(&slave);
    assert_ne!(cooked & libc::ECHO, 0, "a new pty echoes");
    let mut child = flat_command(&guest)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for raw mode, then type.
    let deadline = Instant::now() + Duration::from_secs(20);
    while local_flags(&slave) & libc::ECHO != 0 {
        assert!(Instant::now() < deadline, "the terminal never went raw");
        std::thread::sleep(Duration::from_millis(10));
    }
    master.write_all(b"hi\x01\x01").unwrap();
    let mut echoed = [0u8; 3];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut echoed)
        .unwrap();
    assert_eq!(
        &echoed, b"hi\x01",
        "the guest got the bytes, Ctrl-A Ctrl-A as one Ctrl-A"
    );
    master.write_all(b"\x01x").unwrap();
    let err = successful_exit(&mut child, "Ctrl-A x did not stop the VM");
    assert!(err.contains("Ctrl-A x stops the VM"), "{err}");
    // Nothing was echoed locally, and the settings are back.
    let mut tty_out = Vec::new();
    let n = {
        use std::os::fd::AsRawFd;
        #[allow(unsafe_code)]
        // SAFETY: makes our own master descriptor non-blocking.
        unsafe {
            libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK)
        };
        master.read_to_end(&mut tty_out).err();
        tty_out.len()
    };
    let banner = String::from_utf8_lossy(&tty_out);
    assert_eq!(n, 0, "terminal output: {banner:?}");
    assert_eq!(local_flags(&slave), cooked);
}
