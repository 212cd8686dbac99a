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

/// The flags every filter is installed with: none (no TSYNC: each thread
/// installs its own; no SPEC_ALLOW: the kernel's speculation mitigations
/// for filtered tasks stay as the host configures them).
pub(crate) const FILTER_FLAGS: u64 = 0;

/// `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const seccompiler::sock_filter,
}

/// Installs `filter` on the calling thread, after no_new_privs.
pub(crate) fn install(filter: &BpfProgram) -> std::io::Result<()> {
    let len =
        u16::try_from(filter.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
    let prog = SockFprog {
        len,
        filter: filter.as_ptr(),
    };
    // SAFETY: prctl takes integers; seccomp copies the program, which
    // `prog` describes, before it returns.
    let rc = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            FILTER_FLAGS,
            &prog as *const SockFprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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

/// Firecracker-style validation of every rule: in a thread of its own per
/// kind, the kind's filter (with an errno mark instead of the trap) is
/// installed, then each allowed call is made with arguments that satisfy
/// its checks (and are otherwise invalid, so nothing happens) and must
/// pass, and with each check broken in turn, which must be refused.
#[cfg(test)]
mod validate {
    use super::super::rules::{self, Cond, Facts, Op, Rules};
    use super::*;

    /// The errno the test filters answer with.
    const MARK: i64 = 4000;

    /// Calls with side effects the test thread must not have.
    const SKIP: [libc::c_long; 7] = [
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_clone,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setgroups,
    ];

    fn call(nr: i64, a: [u64; 6]) -> i64 {
        // SAFETY: every argument is invalid (-1) except those a rule
        // checks; the calls fail (or do nothing) without touching memory.
        let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        if r == -1 {
            -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            r
        }
    }

    fn holds(c: &Cond, args: &[u64; 6]) -> bool {
        let v = args[usize::from(c.arg)];
        let v = if c.wide { v } else { v & 0xffff_ffff };
        match c.op {
            Op::Eq => v == c.value,
            Op::MaskedEq(mask) => v & mask == c.value,
        }
    }

    fn satisfy(alt: &[Cond]) -> [u64; 6] {
        let mut args = [u64::MAX; 6];
        for c in alt {
            args[usize::from(c.arg)] = c.value;
        }
        args
    }

    /// A value of `c`'s argument that breaks it (and no other alternative
    /// of `alts` accepts).
    fn broken(c: &Cond, base: [u64; 6], alts: &[Vec<Cond>]) -> Option<[u64; 6]> {
        let candidates = match c.op {
            Op::Eq => [c.value ^ 1, c.value ^ 0x80, c.value.wrapping_add(1_000_003)],
            Op::MaskedEq(mask) => [c.value ^ mask; 3],
        };
        candidates.into_iter().find_map(|v| {
            let mut args = base;
            args[usize::from(c.arg)] = v;
            let accepted = alts.iter().any(|a| a.iter().all(|c| holds(c, &args)));
            (!accepted).then_some(args)
        })
    }

    fn check(rules: &Rules) -> Vec<String> {
        let mut bad = Vec::new();
        for (&nr, alts) in &rules.0 {
            if SKIP.contains(&nr) {
                continue;
            }
            let Some(alts) = alts else {
                if call(nr, [u64::MAX; 6]) == -MARK {
                    bad.push(format!("{nr}: refused although always allowed"));
                }
                continue;
            };
            for alt in alts {
                let args = satisfy(alt);
                if call(nr, args) == -MARK {
                    bad.push(format!("{nr} {args:x?}: refused although allowed"));
                }
                for c in alt {
                    if let Some(args) = broken(c, args, alts)
                        && call(nr, args) != -MARK
                    {
                        bad.push(format!("{nr} {args:x?}: allowed with {c:?} broken"));
                    }
                }
            }
        }
        for nr in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_socket] {
            if call(nr, [u64::MAX; 6]) != -MARK {
                bad.push(format!("{nr}: not refused"));
            }
        }
        bad
    }

    #[test]
    fn every_rule_allows_what_it_says_and_nothing_next_to_it() {
        let facts = Facts {
            ids: Some((65534, 65534)),
        };
        for &kind in ThreadKind::ALL {
            let rules = rules::kind(kind, facts);
            let filter = compile_with(&rules, SeccompAction::Errno(MARK as u32)).unwrap();
            let bad = std::thread::spawn(move || {
                install(&filter).unwrap();
                check(&rules)
            })
            .join()
            .unwrap();
            assert!(bad.is_empty(), "{kind}: {bad:#?}");
        }
    }
}
