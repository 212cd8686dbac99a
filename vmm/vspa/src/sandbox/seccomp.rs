//! Compiling the allow-lists of [`rules`](super::rules) to BPF with
//! `seccompiler`, installing them, and the SIGSYS handler that turns a
//! denied system call into a clear message and a distinct exit status.
//!
//! A mismatch traps (SIGSYS). The handler writes
//! `vspa: seccomp: thread <name> (<kind>) made a denied system call <nr> (<name>)`
//! to stderr with async-signal-safe calls only and ends the process with
//! [`EXIT_DENIED_SYSCALL`]. Should the handler be unable to run, the
//! kernel's default for SIGSYS still kills the process.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vspa_threads::ThreadKind;

use super::rules::{Cond, Op, Rules};

/// Exit status of a process one of whose threads made a denied system call.
pub const EXIT_DENIED_SYSCALL: i32 = 148;

/// Compiles `rules` into a filter that traps on anything else.
pub(crate) fn compile(rules: &Rules) -> Result<BpfProgram, seccompiler::Error> {
    compile_with(rules, SeccompAction::Trap)
}

/// Compiles `rules`; a call they do not allow gets `mismatch`.
pub(crate) fn compile_with(
    rules: &Rules,
    mismatch: SeccompAction,
) -> Result<BpfProgram, seccompiler::Error> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (&nr, alts) in &rules.0 {
        let chain = match alts {
            None => Vec::new(),
            Some(alts) => alts
                .iter()
                .map(|conds| {
                    SeccompRule::new(conds.iter().map(condition).collect::<Result<_, _>>()?)
                })
                .collect::<Result<_, _>>()?,
        };
        map.insert(nr, chain);
    }
    let filter = SeccompFilter::new(map, mismatch, SeccompAction::Allow, arch())?;
    Ok(filter.try_into()?)
}

/// The filter that answers clone3 with ENOSYS (its flags are in memory
/// seccomp cannot read), so glibc falls back to clone, whose flags the
/// allow-lists check.
pub(crate) fn no_clone3() -> Result<BpfProgram, seccompiler::Error> {
    let map = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )?;
    Ok(filter.try_into()?)
}

/// The filter that answers every open with ENOENT (threads that open
/// nothing; see `rules::opens_files`).
pub(crate) fn no_open() -> Result<BpfProgram, seccompiler::Error> {
    let map = super::rules::OPENS
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOENT as u32),
        arch(),
    )?;
    Ok(filter.try_into()?)
}

fn arch() -> TargetArch {
    TargetArch::x86_64
}

fn condition(c: &Cond) -> Result<SeccompCondition, seccompiler::BackendError> {
    let len = if c.wide {
        SeccompCmpArgLen::Qword
    } else {
        SeccompCmpArgLen::Dword
    };
    let op = match c.op {
        Op::Eq => SeccompCmpOp::Eq,
        Op::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
    };
    SeccompCondition::new(c.arg, len, op, c.value)
}

/// Installs `filter` on the calling thread (no_new_privs first, which
/// seccompiler sets).
pub(crate) fn install(filter: &BpfProgram) -> Result<(), seccompiler::Error> {
    seccompiler::apply_filter(filter)
}

// ---- the SIGSYS handler ----

thread_local! {
    /// This thread's name and kind, for the handler (const-initialised
    /// and without destructor: plain thread-local memory, safe to read
    /// from a signal handler).
    static WHO: Cell<([u8; 16], u8)> = const { Cell::new(([0; 16], u8::MAX)) };
}

/// Remembers the calling thread's name and kind for the handler.
pub(crate) fn remember_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let n = current.name().unwrap_or("main").as_bytes();
    let len = n.len().min(15);
    name[..len].copy_from_slice(&n[..len]);
    let index = ThreadKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
    WHO.with(|w| w.set((name, index as u8)));
}

/// Installs the SIGSYS handler for the whole process.
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler and an
    // empty mask; sigaction copies it.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `siginfo_t` as the kernel fills it for SIGSYS (x86_64).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: usize,
    syscall: i32,
    arch: u32,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler;
    // for SIGSYS it has the layout of SigsysInfo.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let (name, kind) = WHO.with(|w| w.get());
    let mut msg = Message::default();
    msg.push(b"vspa: seccomp: thread ");
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    msg.push(if len == 0 { b"?" } else { &name[..len] });
    msg.push(b" (");
    let kind = ThreadKind::ALL.get(usize::from(kind));
    msg.push(kind.map_or("unsandboxed", |k| k.name()).as_bytes());
    msg.push(b") made a denied system call ");
    msg.number(i64::from(nr));
    if let Some(name) = syscall_name(i64::from(nr)) {
        msg.push(b" (");
        msg.push(name.as_bytes());
        msg.push(b")");
    }
    msg.push(b"; vspa exits\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_DENIED_SYSCALL);
    }
}

/// A fixed buffer the handler formats into (no allocation).
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Names of the system calls a report is most likely to show.
pub(crate) fn syscall_name(nr: i64) -> Option<&'static str> {
    const NAMES: &[(libc::c_long, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_openat2, "openat2"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_io_uring_setup, "io_uring_setup"),
        (libc::SYS_io_uring_enter, "io_uring_enter"),
        (libc::SYS_io_uring_register, "io_uring_register"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_setresuid, "setresuid"),
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_pwrite64, "pwrite64"),
    ];
    NAMES.iter().find(|(n, _)| *n == nr).map(|&(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handler_message_formats_numbers_without_allocating() {
        let mut m = Message::default();
        m.push(b"nr ");
        m.number(425);
        m.push(b" ");
        m.number(0);
        m.push(b" ");
        m.number(-7);
        assert_eq!(&m.buf[..m.len], b"nr 425 0 -7");
    }
}
