//! Test-only probe of the vspa sandbox, built for `tests/tests/sandbox.rs`
//! and never installed (the `vspa` binary has no such trigger). It puts
//! the sandbox in force exactly as `vspa serve` does (strict), starts a
//! thread of the given kind through the real spawn hook
//! (`vmbus::cpu::spawn_on`, which enters the kind), and makes one system
//! call there; `main` makes it on the main thread.
//!
//! Usage: `vspa-sandbox-probe <kind> <socket|execve|fork|io_uring_setup|mmap_exec|open>`;
//! prints `probe: <call> returned ...` if the call came back.
// The probe makes raw system calls on purpose.
#![allow(unsafe_code)]

use vmbus::ThreadKind;
use vspa::sandbox::{Mode, Paths, Settings};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, call] = args.as_slice() else {
        panic!("usage: vspa-sandbox-probe <kind> <call>");
    };
    let kind = ThreadKind::ALL
        .iter()
        .copied()
        .find(|k| k.name() == kind)
        .unwrap_or_else(|| panic!("no thread kind {kind:?}"));
    let settings = Settings {
        mode: Mode::Strict,
        ..Settings::default()
    };
    let prepared = vspa::sandbox::prepare(&settings, &Paths::new()).expect("sandbox");
    prepared.finish().expect("sandbox after setup");
    let call = call.clone();
    let result = if kind == ThreadKind::Main {
        make(&call)
    } else {
        let thread = vmbus::cpu::spawn_on("probe".into(), None, kind, move || make(&call)).unwrap();
        thread.join().unwrap().unwrap()
    };
    println!("probe: {result}");
}

fn make(call: &str) -> String {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: each call gets valid (or null) pointers to locals; none of
    // them touches memory the probe uses afterwards.
    let r = unsafe {
        match call {
            "socket" => i64::from(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0)),
            "execve" => {
                let argv = [c"/bin/true".as_ptr(), null];
                i64::from(libc::execve(
                    c"/bin/true".as_ptr(),
                    argv.as_ptr(),
                    [null].as_ptr(),
                ))
            }
            "fork" => libc::syscall(libc::SYS_fork),
            "io_uring_setup" => {
                let mut params = [0u8; 120];
                libc::syscall(libc::SYS_io_uring_setup, 2, params.as_mut_ptr())
            }
            "mmap_exec" => libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64,
            "open" => i64::from(libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY)),
            other => panic!("unknown call {other:?}"),
        }
    };
    format!("{call} returned {r} ({})", std::io::Error::last_os_error())
}
