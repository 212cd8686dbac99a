//! A memory copy whose bus error is an error, not the end of the process.
//!
//! Writes through a shared mapping of an image file (see `mapped`) are
//! plain stores, and the kernel answers a store it cannot back with SIGBUS:
//! the file was shortened underneath, a delayed allocation found the disk
//! full, reading the page in failed, or the source (a hosted guest's
//! memory) went away. One appliance serves many tenants, so such a fault
//! must fail that one write. [`try_copy`] is a `rep movsb` at a known
//! address; the SIGBUS handler installed by [`install`] moves a fault at
//! that instruction to a return of `false`, and hands every other SIGBUS to
//! the handler that was there before (Rust's runtime, or the default
//! action), so faults anywhere else still end the process as they would
//! have. The handler is installed before the sandbox (which then no longer
//! allows `rt_sigaction` on the data path).
//!
//! x86-64 only; elsewhere [`install`] reports it unavailable and the
//! mapping is never used.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.vspa_vhd_try_copy,\"ax\",@progbits",
    ".p2align 4",
    ".globl vspa_vhd_try_copy",
    ".type vspa_vhd_try_copy,@function",
    "vspa_vhd_try_copy:",
    "mov rcx, rdx",
    ".globl vspa_vhd_try_copy_insn",
    "vspa_vhd_try_copy_insn:",
    "rep movsb",
    "mov eax, 1",
    "ret",
    ".globl vspa_vhd_try_copy_fixup",
    "vspa_vhd_try_copy_fixup:",
    "xor eax, eax",
    "ret",
    ".size vspa_vhd_try_copy, . - vspa_vhd_try_copy",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    /// Copies `len` bytes from `src` to `dst`; 1 when done, 0 when the copy
    /// faulted with SIGBUS part way.
    fn vspa_vhd_try_copy(dst: *mut u8, src: *const u8, len: usize) -> u32;
    static vspa_vhd_try_copy_insn: u8;
    static vspa_vhd_try_copy_fixup: u8;
}

/// The SIGBUS action in place before [`install`], for faults not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Outcome of the one installation.
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Installs the SIGBUS handler (once; later calls report the first
/// outcome). False when it could not be installed or the platform has no
/// [`try_copy`]: callers then do not copy into file mappings at all.
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let ok = install_handler();
        if !ok {
            tracing::warn!("SIGBUS handler not installed: writes go through pwritev only");
        }
        ok
    })
}

/// True once [`install`] succeeded.
pub(crate) fn installed() -> bool {
    INSTALLED.get() == Some(&true)
}

#[cfg(target_arch = "x86_64")]
fn install_handler() -> bool {
    // SAFETY: sigaction with a null new action only reads the current one
    // into a zeroed local of the right type.
    let previous = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
            return false;
        }
        old
    };
    // The handler reads PREVIOUS, so it is set before the handler exists.
    if PREVIOUS.set(previous).is_err() {
        return false;
    }
    // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler and an
    // empty mask; sigaction copies it. SA_ONSTACK keeps Rust's stack
    // overflow reporting working when a fault is forwarded to it.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn install_handler() -> bool {
    false
}

/// Copies `len` bytes from `src` to `dst`, false if the copy faulted with
/// SIGBUS (part of `dst` may then have been written).
///
/// # Safety
/// `src` and `dst` are mapped for `len` bytes (readable and writable) and
/// do not overlap; faults the kernel reports as SIGBUS are the only ones
/// allowed. [`installed`] must be true.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn try_copy(dst: *mut u8, src: *const u8, len: usize) -> bool {
    debug_assert!(installed());
    // SAFETY: the caller's contract; the routine touches nothing else.
    unsafe { vspa_vhd_try_copy(dst, src, len) == 1 }
}

/// See the x86-64 version: never called here ([`installed`] is false).
///
/// # Safety
/// As on x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn try_copy(_dst: *mut u8, _src: *const u8, _len: usize) -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let insn = (&raw const vspa_vhd_try_copy_insn) as i64;
    let fixup = (&raw const vspa_vhd_try_copy_fixup) as i64;
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO
    // handler; changing the saved instruction pointer makes the return
    // from the handler resume at the fixup, which only sets the result.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        let rip = &mut (*uc).uc_mcontext.gregs[libc::REG_RIP as usize];
        if *rip == insn {
            *rip = fixup;
            return;
        }
    }
    forward(sig, info, ctx);
}

/// Hands a SIGBUS that is not ours to the action that was there before.
#[cfg(target_arch = "x86_64")]
fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS.get().copied();
    match previous {
        Some(prev) if prev.sa_sigaction > libc::SIG_IGN => {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                type Action = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
                // SAFETY: an SA_SIGINFO action's address is a function of
                // this type, registered by whoever installed it.
                let f: Action = unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                type Handler = extern "C" fn(libc::c_int);
                // SAFETY: as above, for a plain handler.
                let f: Handler = unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: resetting the default action and re-raising are both
            // async-signal-safe; a fault then recurs on return and takes
            // the default action (a core dump), as without this handler.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                if (*info).si_code <= 0 {
                    libc::raise(sig);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod tests {
    use super::*;

    /// A read-write file of `len` bytes in a fresh directory, with the
    /// handler installed.
    pub(crate) fn scratch_file(len: u64) -> (tempfile::TempDir, std::fs::File) {
        assert!(install());
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.set_len(len).unwrap();
        (dir, file)
    }

    /// A shared read-write mapping of `len` bytes of `file` (never unmapped:
    /// tests only).
    fn map_shared(file: &std::fs::File, len: usize) -> *mut u8 {
        // SAFETY: a fresh mapping at an address the kernel picks.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        map.cast()
    }

    #[test]
    fn a_copy_past_the_end_of_a_file_mapping_fails_and_the_process_lives() {
        let (dir, file) = scratch_file(4096);
        let dst = map_shared(&file, 3 * 4096);
        let src = vec![0x5au8; 8192];
        // SAFETY: `dst` is mapped for 3 pages, `src` holds 2; page 2 and
        // beyond lie past the end of the file (SIGBUS, the tested case).
        unsafe {
            assert!(try_copy(dst, src.as_ptr(), 4096), "inside the file");
            assert!(
                !try_copy(dst.add(2048), src.as_ptr(), 8192),
                "runs past the end"
            );
            assert!(
                !try_copy(dst.add(8192), src.as_ptr(), 4096),
                "wholly past it"
            );
        }
        let on_disk = std::fs::read(dir.path().join("f")).unwrap();
        assert!(
            on_disk.iter().all(|&b| b == 0x5a),
            "the part inside was copied"
        );
        file.set_len(2 * 4096).unwrap();
        // SAFETY: as above; page 1 is inside the file now.
        unsafe { assert!(try_copy(dst.add(4096), src.as_ptr(), 4096), "after growth") };
    }

    /// Set in the child of the next test: fault outside `try_copy`.
    const CHILD: &str = "VSPA_TRYCOPY_FAULT_CHILD";

    #[test]
    fn a_bus_error_anywhere_else_still_ends_the_process() {
        use std::os::unix::process::ExitStatusExt;
        if std::env::var_os(CHILD).is_some() {
            let (_dir, file) = scratch_file(0);
            let map = map_shared(&file, 4096);
            // SAFETY: the page lies past the end of the empty file: the
            // store raises SIGBUS outside try_copy, which is the test.
            unsafe { std::ptr::write_volatile(map, 1) };
            std::process::exit(0);
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["trycopy::tests::a_bus_error_anywhere_else_still_ends_the_process"])
            .arg("--exact")
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    }
}
