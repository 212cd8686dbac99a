//! The seccomp allow-lists: one per [`ThreadKind`], built from small groups
//! of system calls with their argument checks, as plain data (so tests can
//! walk every rule).
//!
//! Filters stack: a thread keeps every filter it inherited and adds its
//! own, so a kind that starts threads must allow what those threads do
//! (an acceptor allows what a client thread does, which allows what its
//! channel workers do). [`kind`] builds each kind that way; [`process`] is
//! the union of every kind plus what setup needs, the filter every thread
//! of the process carries from the start.

use std::collections::BTreeMap;

use vspa_threads::ThreadKind;

/// One check of a system call argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cond {
    pub arg: u8,
    /// Compare all 64 bits (else the low 32).
    pub wide: bool,
    pub op: Op,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    /// `(arg & mask) == value`.
    MaskedEq(u64),
}

/// Argument `arg` (32 bits) equals `value`.
pub(crate) const fn eq(arg: u8, value: u64) -> Cond {
    Cond {
        arg,
        wide: false,
        op: Op::Eq,
        value,
    }
}

/// Argument `arg` (64 bits) equals `value`.
pub(crate) const fn eq64(arg: u8, value: u64) -> Cond {
    Cond {
        arg,
        wide: true,
        op: Op::Eq,
        value,
    }
}

/// None of the bits of `mask` are set in argument `arg`.
pub(crate) const fn clear(arg: u8, mask: u64) -> Cond {
    Cond {
        arg,
        wide: true,
        op: Op::MaskedEq(mask),
        value: 0,
    }
}

/// System calls a filter allows: None allows any arguments, else any one
/// of the listed alternatives (each a list of checks that must all hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rules(pub BTreeMap<i64, Option<Vec<Vec<Cond>>>>);

impl Rules {
    fn any(&mut self, nrs: &[libc::c_long]) -> &mut Self {
        for &nr in nrs {
            self.0.insert(nr, None);
        }
        self
    }

    fn when(&mut self, nr: libc::c_long, conds: &[Cond]) -> &mut Self {
        if let Some(alts) = self.0.entry(nr).or_insert_with(|| Some(Vec::new()))
            && !alts.iter().any(|a| a == conds)
        {
            alts.push(conds.to_vec());
        }
        self
    }

    fn ioctls(&mut self, requests: &[u64]) -> &mut Self {
        for &r in requests {
            self.when(libc::SYS_ioctl, &[eq(1, r)]);
        }
        self
    }

    /// Allows what `other` allows too.
    pub(crate) fn add(&mut self, other: &Rules) -> &mut Self {
        for (&nr, alts) in &other.0 {
            match alts {
                None => {
                    self.0.insert(nr, None);
                }
                Some(alts) => {
                    for a in alts {
                        self.when(nr, a);
                    }
                }
            }
        }
        self
    }

    #[cfg(test)]
    pub(crate) fn allows(&self, nr: i64) -> bool {
        self.0.contains_key(&nr)
    }
}

/// What the filters need to know about this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Facts {
    /// The ids the process drops to: every thread takes part in glibc's
    /// set*id broadcast, with exactly these arguments.
    pub ids: Option<(u32, u32)>,
}

// ---- ioctl request numbers (asm-generic/ioctl.h encoding) ----

const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const fn io(ty: u64, nr: u64) -> u64 {
    ioc(0, ty, nr, 0)
}
const fn iow(ty: u64, nr: u64, size: u64) -> u64 {
    ioc(1, ty, nr, size)
}
const fn ior(ty: u64, nr: u64, size: u64) -> u64 {
    ioc(2, ty, nr, size)
}
const fn iowr(ty: u64, nr: u64, size: u64) -> u64 {
    ioc(3, ty, nr, size)
}

const KVMIO: u64 = 0xAE;
/// Sizes of the KVM structures (x86_64 UAPI).
const KVM_REGS: u64 = 144;
const KVM_SREGS: u64 = 312;
const KVM_FPU: u64 = 416;
const KVM_LAPIC: u64 = 1024;
const KVM_MSRS: u64 = 8;
const KVM_CPUID2: u64 = 8;
const KVM_MSI: u64 = 32;
const KVM_IRQFD_SIZE: u64 = 32;
const KVM_IOEVENTFD_SIZE: u64 = 64;
const KVM_MEMORY_REGION: u64 = 32;
const KVM_MP_STATE: u64 = 4;
const KVM_PIT_CONFIG: u64 = 64;
const KVM_ENABLE_CAP_SIZE: u64 = 104;
const KVM_MSR_FILTER: u64 = 392;

pub(crate) const KVM_RUN: u64 = io(KVMIO, 0x80);
pub(crate) const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, KVM_REGS);
pub(crate) const KVM_SET_REGS: u64 = iow(KVMIO, 0x82, KVM_REGS);
pub(crate) const KVM_SIGNAL_MSI: u64 = iow(KVMIO, 0xa5, KVM_MSI);
pub(crate) const KVM_IOEVENTFD: u64 = iow(KVMIO, 0x79, KVM_IOEVENTFD_SIZE);
pub(crate) const KVM_IRQFD: u64 = iow(KVMIO, 0x76, KVM_IRQFD_SIZE);

/// KVM requests only setup makes (creating the VM and its vCPUs).
const KVM_SETUP: [u64; 24] = [
    io(KVMIO, 0x00),                       // KVM_GET_API_VERSION
    io(KVMIO, 0x01),                       // KVM_CREATE_VM
    io(KVMIO, 0x03),                       // KVM_CHECK_EXTENSION
    io(KVMIO, 0x04),                       // KVM_GET_VCPU_MMAP_SIZE
    iowr(KVMIO, 0x05, KVM_CPUID2),         // KVM_GET_SUPPORTED_CPUID
    io(KVMIO, 0x41),                       // KVM_CREATE_VCPU
    iow(KVMIO, 0x46, KVM_MEMORY_REGION),   // KVM_SET_USER_MEMORY_REGION
    io(KVMIO, 0x47),                       // KVM_SET_TSS_ADDR
    iow(KVMIO, 0x48, 8),                   // KVM_SET_IDENTITY_MAP_ADDR
    io(KVMIO, 0x60),                       // KVM_CREATE_IRQCHIP
    iow(KVMIO, 0x77, KVM_PIT_CONFIG),      // KVM_CREATE_PIT2
    ior(KVMIO, 0x83, KVM_SREGS),           // KVM_GET_SREGS
    iow(KVMIO, 0x84, KVM_SREGS),           // KVM_SET_SREGS
    iowr(KVMIO, 0x88, KVM_MSRS),           // KVM_GET_MSRS
    iow(KVMIO, 0x89, KVM_MSRS),            // KVM_SET_MSRS
    iow(KVMIO, 0x90, KVM_CPUID2),          // KVM_SET_CPUID2
    iow(KVMIO, 0x8d, KVM_FPU),             // KVM_SET_FPU
    ior(KVMIO, 0x8e, KVM_LAPIC),           // KVM_GET_LAPIC
    iow(KVMIO, 0x8f, KVM_LAPIC),           // KVM_SET_LAPIC
    iow(KVMIO, 0x99, KVM_MP_STATE),        // KVM_SET_MP_STATE
    io(KVMIO, 0xa3),                       // KVM_GET_TSC_KHZ
    iow(KVMIO, 0xa3, KVM_ENABLE_CAP_SIZE), // KVM_ENABLE_CAP
    iow(KVMIO, 0xc6, KVM_MSR_FILTER),      // KVM_X86_SET_MSR_FILTER
    KVM_IRQFD,
];

/// Tap setup: TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ (a VXLAN port's
/// `gso_tap`), and the interface requests that bring a `gso_tap` up and
/// read its MAC: SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCGIFHWADDR.
const TUN: [u64; 6] = [
    iow(b'T' as u64, 202, 4),
    iow(b'T' as u64, 208, 4),
    iow(b'T' as u64, 216, 4),
    0x8913,
    0x8914,
    0x8927,
];
/// Terminal mode of the serial console: TCGETS, TCSETS, TCSETSW, TCSETSF,
/// TIOCGWINSZ.
const TTY: [u64; 5] = [0x5401, 0x5402, 0x5403, 0x5404, 0x5413];
/// Block device images: BLKGETSIZE64, BLKDISCARD, BLKSSZGET, BLKPBSZGET.
const BLK: [u64; 4] = [
    ior(0x12, 114, 8),
    io(0x12, 119),
    io(0x12, 104),
    io(0x12, 123),
];

/// The flags glibc's pthread_create gives clone: a thread, never a process.
pub(crate) const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// glibc's internal signal for its set*id broadcast.
const SIGSETXID: u64 = 33;

/// The vCPU kick signal (vmm::vm: SIGRTMIN + 1).
fn kick_signal() -> u64 {
    (libc::SIGRTMIN() + 1) as u64
}

// ---- groups ----

/// What every thread does once it runs: memory (never executable), locks,
/// time, exiting, logging to stderr, aborting, and the set*id broadcast.
fn common(facts: Facts) -> Rules {
    let mut r = Rules::default();
    r.any(&[
        libc::SYS_futex,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_getrandom,
        libc::SYS_madvise,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_close,
        libc::SYS_sched_getaffinity,
        // std resolves relative paths against the working directory.
        libc::SYS_getcwd,
    ]);
    let exec = libc::PROT_EXEC as u64;
    r.when(libc::SYS_mmap, &[clear(2, exec)]);
    r.when(libc::SYS_mprotect, &[clear(2, exec)]);
    r.when(libc::SYS_write, &[eq(0, 2)]);
    r.when(libc::SYS_tgkill, &[eq(2, libc::SIGABRT as u64)]);
    if let Some((uid, gid)) = facts.ids {
        let (u, g) = (u64::from(uid), u64::from(gid));
        r.when(libc::SYS_setgroups, &[eq(0, 0)]);
        r.when(libc::SYS_setresgid, &[eq(0, g), eq(1, g), eq(2, g)]);
        r.when(libc::SYS_setresuid, &[eq(0, u), eq(1, u), eq(2, u)]);
    }
    r
}

/// Eventfds and sleeping on them (8-byte reads and writes).
fn events() -> Rules {
    let mut r = Rules::default();
    r.when(libc::SYS_read, &[eq(2, 8)]);
    r.when(libc::SYS_write, &[eq(2, 8)]);
    r.any(&[
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_create1,
    ]);
    r
}

/// Starting threads (never processes): glibc tries clone3, which a
/// separate filter answers with ENOSYS (seccomp cannot read its flags),
/// then clone with the thread flags. The new thread runs under this
/// filter until it enters its own kind.
fn threads() -> Rules {
    let mut r = Rules::default();
    r.any(&[libc::SYS_clone3, libc::SYS_rseq, libc::SYS_set_robust_list]);
    r.when(libc::SYS_clone, &[eq64(0, THREAD_CLONE_FLAGS)]);
    r.when(libc::SYS_prctl, &[eq(0, libc::PR_SET_NAME as u64)]);
    r.when(libc::SYS_sched_setaffinity, &[eq(0, 0)]);
    // The new thread installs its own filter (which only narrows).
    r.when(libc::SYS_prctl, &[eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)]);
    r.when(
        libc::SYS_seccomp,
        &[
            eq(0, libc::SECCOMP_SET_MODE_FILTER as u64),
            eq(1, super::seccomp::FILTER_FLAGS),
        ],
    );
    r
}

/// I/O on image files already open: io_uring submission and the
/// synchronous metadata path (no opening).
fn images() -> Rules {
    let mut r = Rules::default();
    r.any(&[
        libc::SYS_io_uring_enter,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_fstat,
        libc::SYS_lseek,
        libc::SYS_eventfd2,
    ]);
    r.ioctls(&BLK);
    r
}

/// Interrupts into a VM of `vspa run` from a device thread.
fn vm_interrupts() -> Rules {
    let mut r = Rules::default();
    r.ioctls(&[KVM_SIGNAL_MSI]);
    r
}

/// Opening channels: mapping client or guest memory (sealed memfds),
/// creating eventfds, and the worker threads the channels get.
fn channels() -> Rules {
    let mut r = Rules::default();
    r.any(&[
        libc::SYS_eventfd2,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_io_uring_enter,
        libc::SYS_epoll_create1,
    ]);
    for cmd in [
        libc::F_GET_SEALS,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_DUPFD_CLOEXEC,
    ] {
        r.when(libc::SYS_fcntl, &[eq(1, cmd as u64)]);
    }
    r.ioctls(&[KVM_IOEVENTFD, KVM_IRQFD, KVM_SIGNAL_MSI]);
    r.add(&threads());
    r
}

/// One hosted client's socket: messages with descriptors, peer credentials.
fn hosted_socket() -> Rules {
    let mut r = Rules::default();
    r.any(&[libc::SYS_recvmsg, libc::SYS_sendmsg]);
    for opt in [libc::SO_PEERCRED, libc::SO_PEERGROUPS, libc::SO_PEERSEC] {
        r.when(
            libc::SYS_getsockopt,
            &[eq(1, libc::SOL_SOCKET as u64), eq(2, opt as u64)],
        );
    }
    r
}

/// Opening files the sandbox's paths allow (Landlock confines where):
/// reloads (configuration, images, media, taps, pcap files).
fn opening() -> Rules {
    let mut r = Rules::default();
    r.any(&[
        libc::SYS_openat,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_lseek,
        libc::SYS_flock,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // Checkpoint children and their state file (written beside, then
        // renamed over, then made durable).
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_getdents64,
        libc::SYS_readlink,
        libc::SYS_access,
        libc::SYS_fcntl,
        libc::SYS_memfd_create,
    ]);
    r.ioctls(&TUN);
    r
}

/// FIONBIO: std's `connect_timeout` and `set_nonblocking` on sockets.
const FIONBIO: u64 = 0x5421;

/// I/O on a connected stream socket (an NBD connection, either end):
/// messages, its timeouts and TCP_NODELAY, shutting it down.
fn stream_io() -> Rules {
    let mut r = Rules::default();
    r.any(&[libc::SYS_recvmsg, libc::SYS_sendmsg, libc::SYS_shutdown]);
    r.when(libc::SYS_setsockopt, &[eq(1, libc::SOL_SOCKET as u64)]);
    r.when(libc::SYS_setsockopt, &[eq(1, libc::IPPROTO_TCP as u64)]);
    r
}

/// The sockets a thread other than setup may create, as (domain, type):
/// a new tenant's listening socket, a VXLAN port's UDP sockets, an NBD
/// client's stream. Only the main thread (reloads) and the NBD client
/// (reconnects) make any; Landlock confines the TCP ports (ABI 4).
const SOCKET_KINDS: [(i32, i32); 6] = [
    (libc::AF_UNIX, libc::SOCK_SEQPACKET),
    (libc::AF_UNIX, libc::SOCK_STREAM),
    (libc::AF_INET, libc::SOCK_STREAM),
    (libc::AF_INET6, libc::SOCK_STREAM),
    (libc::AF_INET, libc::SOCK_DGRAM),
    (libc::AF_INET6, libc::SOCK_DGRAM),
];

/// Creating sockets of `kinds` (always close-on-exec) and connecting them.
fn making_sockets(kinds: &[(i32, i32)]) -> Rules {
    let mut r = Rules::default();
    for &(domain, ty) in kinds {
        let ty = (ty | libc::SOCK_CLOEXEC) as u64;
        r.when(libc::SYS_socket, &[eq(0, domain as u64), eq(1, ty)]);
    }
    r.any(&[
        libc::SYS_connect,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_poll,
    ]);
    r.ioctls(&[FIONBIO]);
    r
}

/// A control-plane endpoint served on one thread (an API socket, a
/// metrics endpoint) from a listener made during setup: accept, read
/// requests and write replies on the accepted connections, wait on them.
/// It opens nothing and creates no sockets or threads.
fn control_socket() -> Rules {
    let mut r = Rules::default();
    r.add(&events()).add(&stream_io());
    r.any(&[
        libc::SYS_accept4,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
    ]);
    for cmd in [libc::F_GETFL, libc::F_SETFL] {
        r.when(libc::SYS_fcntl, &[eq(1, cmd as u64)]);
    }
    r.ioctls(&[FIONBIO]);
    r
}

/// Listening on sockets made by [`making_sockets`]: tenants' sockets
/// (owner and mode set on the file), VXLAN ports' UDP sockets.
fn listening() -> Rules {
    let mut r = Rules::default();
    r.any(&[
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_chmod,
        libc::SYS_chown,
        libc::SYS_fchmod,
        libc::SYS_fchown,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
    ]);
    r
}

/// What setup alone does (before any thread enters its kind): binding the
/// socket, creating the VM, reading the kernel.
fn setup() -> Rules {
    let mut r = Rules::default();
    r.any(&[
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_rt_sigaction,
        libc::SYS_prlimit64,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_fchmod,
        libc::SYS_fchown,
        libc::SYS_chmod,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_mkdirat,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_register,
        libc::SYS_pipe2,
        libc::SYS_uname,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_capget,
        libc::SYS_prctl,
        libc::SYS_setgroups,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_set_tid_address,
        libc::SYS_rt_sigtimedwait,
    ]);
    r.when(
        libc::SYS_socket,
        &[
            eq(0, libc::AF_UNIX as u64),
            eq(1, (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64),
        ],
    );
    r.when(libc::SYS_tgkill, &[eq(2, SIGSETXID)]);
    r.ioctls(&KVM_SETUP);
    r.ioctls(&TTY);
    r
}

/// Whether threads of `kind` open files. Those that do not get ENOENT
/// from a separate filter for opens rather than a trap (as crosvm's device
/// policies do): glibc's malloc may open /proc/sys/vm/overcommit_memory
/// from any thread when it trims a heap, and must just be told no.
pub(crate) fn opens_files(kind: ThreadKind) -> bool {
    matches!(kind, ThreadKind::Main | ThreadKind::Api)
}

/// The system calls answered with ENOENT in threads that open nothing.
pub(crate) const OPENS: [libc::c_long; 3] = [libc::SYS_open, libc::SYS_openat, libc::SYS_openat2];

/// The allow-list of threads of `kind`, including what the threads they
/// start do (filters stack).
pub(crate) fn kind(which: ThreadKind, facts: Facts) -> Rules {
    let mut r = common(facts);
    // Threads that open nothing pass opens on to the ENOENT filter (see
    // `opens_files`); the main thread opens what Landlock lets it.
    r.any(&OPENS);
    match which {
        ThreadKind::Main => {
            r.add(&opening())
                .add(&images())
                .add(&channels())
                .add(&kind_only(ThreadKind::SwitchWorker))
                .add(&kind_only(ThreadKind::NicThread))
                .add(&kind_only(ThreadKind::Flusher))
                .add(&kind_only(ThreadKind::NbdClient))
                .add(&kind(ThreadKind::Acceptor, facts))
                .add(&making_sockets(&SOCKET_KINDS))
                .add(&listening())
                .add(&stream_io());
            r.any(&[libc::SYS_rt_sigtimedwait]);
            r.when(libc::SYS_tgkill, &[eq(2, kick_signal())]);
            r.ioctls(&TTY).ioctls(&[KVM_RUN]);
        }
        ThreadKind::Acceptor => {
            r.add(&threads()).add(&kind(ThreadKind::Client, facts));
            r.any(&[libc::SYS_accept4, libc::SYS_poll]);
        }
        ThreadKind::Api => {
            // Its requests change the appliance as a reload does.
            r.add(&kind(ThreadKind::Main, facts))
                .add(&control_socket())
                .add(&hosted_socket());
        }
        ThreadKind::NbdListener => {
            r.add(&threads())
                .add(&events())
                .add(&kind(ThreadKind::NbdConnection, facts));
            r.any(&[libc::SYS_accept4, libc::SYS_poll]);
        }
        ThreadKind::Client => {
            r.add(&hosted_socket())
                .add(&events())
                .add(&channels())
                .add(&kind(ThreadKind::StorageWorker, facts))
                .add(&kind(ThreadKind::DeviceWorker, facts));
        }
        ThreadKind::VmControl | ThreadKind::Vcpu => {
            r.add(&events())
                .add(&channels())
                .add(&images())
                .add(&kind(ThreadKind::StorageWorker, facts))
                .add(&kind(ThreadKind::DeviceWorker, facts));
            if which == ThreadKind::Vcpu {
                // Serial console output goes to stdout or a file.
                r.any(&[libc::SYS_write]);
                r.ioctls(&[KVM_RUN, KVM_GET_REGS, KVM_SET_REGS]);
            }
            r.when(libc::SYS_tgkill, &[eq(2, kick_signal())]);
        }
        other => {
            r.add(&kind_only(other));
        }
    }
    r
}

/// The rules of a kind that starts no threads of another kind. A new kind
/// (one row in `vspa_threads::thread_kinds!`) gets its arm here, made of
/// the groups above, e.g. `r.add(&control_socket())` for a control-plane
/// listener (as `Metrics`): the match is exhaustive on purpose.
fn kind_only(kind: ThreadKind) -> Rules {
    let mut r = Rules::default();
    match kind {
        ThreadKind::Rings => {
            r.any(&[libc::SYS_io_uring_setup, libc::SYS_io_uring_register]);
        }
        ThreadKind::StorageWorker => {
            r.add(&events())
                .add(&images())
                .add(&threads())
                .add(&vm_interrupts())
                .add(&kind_only(ThreadKind::Flusher));
        }
        ThreadKind::DeviceWorker | ThreadKind::NicThread | ThreadKind::VirtioNet => {
            r.add(&events()).add(&vm_interrupts());
        }
        ThreadKind::SwitchWorker => {
            r.add(&events());
            // Tap frames and pcap records: any length; VXLAN datagrams in
            // batches.
            r.any(&[
                libc::SYS_read,
                libc::SYS_write,
                libc::SYS_readv,
                libc::SYS_writev,
                libc::SYS_recvmmsg,
                libc::SYS_sendmmsg,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
            ]);
        }
        ThreadKind::Flusher => {
            r.add(&images());
            r.when(libc::SYS_write, &[eq(2, 8)]);
        }
        ThreadKind::NbdConnection => {
            // An image's flusher starts on its first metadata flush.
            r.add(&events())
                .add(&images())
                .add(&stream_io())
                .add(&threads())
                .add(&kind_only(ThreadKind::Flusher));
        }
        ThreadKind::NbdClient => {
            // Reconnects: a new stream to the same server.
            r.add(&events())
                .add(&stream_io())
                .add(&making_sockets(&SOCKET_KINDS[1..4]));
            r.any(&[libc::SYS_io_uring_enter]);
        }
        ThreadKind::Signals => {
            r.any(&[libc::SYS_rt_sigtimedwait]);
            r.when(libc::SYS_tgkill, &[eq(2, kick_signal())]);
            r.when(libc::SYS_write, &[eq(2, 8)]);
        }
        ThreadKind::Console => {
            r.when(libc::SYS_read, &[eq(0, 0)]);
            r.when(libc::SYS_tgkill, &[eq(2, kick_signal())]);
            r.when(libc::SYS_write, &[eq(2, 8)]);
        }
        ThreadKind::Metrics => {
            // Each connection on a thread of its own kind.
            r.add(&control_socket()).add(&threads());
        }
        // Kinds that start threads of other kinds: see `kind`.
        ThreadKind::Main
        | ThreadKind::Api
        | ThreadKind::Acceptor
        | ThreadKind::Client
        | ThreadKind::VmControl
        | ThreadKind::Vcpu
        | ThreadKind::NbdListener => {}
    }
    r
}

/// The filter of the whole process, from the start of setup: everything
/// any thread kind may do, and what setup does.
pub(crate) fn process(facts: Facts) -> Rules {
    let mut r = setup();
    r.add(&threads());
    for &k in ThreadKind::ALL {
        r.add(&kind(k, facts));
    }
    r
}

/// System calls no vspa thread ever makes, whatever its kind (the tests
/// check that no filter allows them).
#[cfg(test)]
pub(crate) const NEVER: [libc::c_long; 13] = [
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_bpf,
    libc::SYS_init_module,
    libc::SYS_kexec_load,
    libc::SYS_process_vm_writev,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            ids: Some((65534, 65534)),
        }
    }

    fn all() -> impl Iterator<Item = (ThreadKind, Rules)> {
        ThreadKind::ALL.iter().map(|&k| (k, kind(k, facts())))
    }

    #[test]
    fn no_thread_execs_forks_traces_or_mounts() {
        for (k, r) in all().chain([(ThreadKind::Main, process(facts()))]) {
            for nr in NEVER {
                assert!(!r.allows(nr), "{k}: system call {nr} allowed");
            }
        }
    }

    #[test]
    fn no_worker_creates_sockets_and_only_the_ring_thread_makes_rings() {
        // The main thread (reloads: tenants' sockets, VXLAN ports, NBD
        // clients) and an NBD client (reconnects) make sockets, of the
        // listed kinds only; no thread serving a guest or a client does.
        let makers = [ThreadKind::Main, ThreadKind::Api, ThreadKind::NbdClient];
        for (k, r) in all() {
            let sockets = r.allows(libc::SYS_socket) || r.allows(libc::SYS_connect);
            assert_eq!(sockets, makers.contains(&k), "{k} may create sockets");
            assert!(!r.allows(libc::SYS_socketpair), "{k} may create sockets");
            for alt in r.0.get(&libc::SYS_socket).into_iter().flatten().flatten() {
                let domain = alt.iter().find(|c| c.arg == 0).expect("domain checked");
                let ty = alt.iter().find(|c| c.arg == 1).expect("type checked");
                let listed = SOCKET_KINDS.iter().any(|&(d, t)| {
                    domain.value == d as u64 && ty.value == (t | libc::SOCK_CLOEXEC) as u64
                });
                assert!(listed, "{k}: socket {alt:?}");
            }
            let rings = r.allows(libc::SYS_io_uring_setup) || r.allows(libc::SYS_io_uring_register);
            assert_eq!(rings, k == ThreadKind::Rings, "{k}");
        }
    }

    #[test]
    fn ioctls_by_exact_request_and_memory_never_executable() {
        for (k, r) in all().chain([(ThreadKind::Main, process(facts()))]) {
            if let Some(alts) = r.0.get(&libc::SYS_ioctl) {
                let alts = alts.as_ref().expect("ioctl with argument checks");
                for a in alts {
                    assert!(a.iter().any(|c| c.arg == 1 && c.op == Op::Eq), "{k}: {a:?}");
                }
            }
            for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
                let alts = r.0[&nr].as_ref().expect("mmap and mprotect checked");
                let exec = libc::PROT_EXEC as u64;
                for a in alts {
                    assert!(a.contains(&clear(2, exec)), "{k}: {a:?}");
                }
            }
            if let Some(alts) = r.0.get(&libc::SYS_clone) {
                for a in alts.as_ref().expect("clone checked") {
                    assert_eq!(
                        a,
                        &[eq64(0, THREAD_CLONE_FLAGS)],
                        "{k}: clone makes threads only"
                    );
                }
            }
        }
    }

    /// Filters stack: a thread that starts threads of another kind must
    /// allow everything they do, or they would die before their own
    /// filter went in.
    #[test]
    fn a_kind_allows_what_the_threads_it_starts_do() {
        use ThreadKind::*;
        let starts = [
            // After setup, reloads add switch ports and close images.
            (Main, vec![SwitchWorker, NicThread, Flusher]),
            (Acceptor, vec![Client]),
            (Client, vec![StorageWorker, DeviceWorker]),
            (Vcpu, vec![StorageWorker, DeviceWorker, Flusher]),
            (VmControl, vec![StorageWorker, DeviceWorker]),
            (StorageWorker, vec![Flusher]),
            (Main, vec![NbdClient, Acceptor]),
            (NbdListener, vec![NbdConnection]),
            (NbdConnection, vec![Flusher]),
            (Api, vec![Main]),
        ];
        for (parent, children) in starts {
            let p = kind(parent, facts());
            for child in children {
                for (nr, alts) in &kind(child, facts()).0 {
                    let covered = match (p.0.get(nr), alts) {
                        (None, _) => false,
                        (Some(None), _) => true,
                        (Some(Some(_)), None) => false,
                        (Some(Some(have)), Some(want)) => want.iter().all(|a| have.contains(a)),
                    };
                    assert!(covered, "{parent} starts {child}, which may call {nr}");
                }
            }
        }
    }

    #[test]
    fn a_control_endpoint_opens_creates_and_starts_nothing() {
        let mut r = common(facts());
        r.add(&control_socket());
        for nr in NEVER.iter().chain(&[
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone,
            libc::SYS_io_uring_setup,
        ]) {
            assert!(!r.allows(*nr), "system call {nr} allowed");
        }
        assert!(r.allows(libc::SYS_accept4) && r.allows(libc::SYS_sendmsg));
        super::super::seccomp::compile(&r).unwrap();
    }

    #[test]
    fn every_filter_compiles() {
        for (k, r) in all() {
            super::super::seccomp::compile(&r).unwrap_or_else(|e| panic!("{k}: {e}"));
        }
        super::super::seccomp::compile(&process(facts())).unwrap();
        super::super::seccomp::compile(&process(Facts::default())).unwrap();
    }
}
