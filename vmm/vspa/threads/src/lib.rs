//! Thread kinds of the vspa process, and the one hook every thread calls
//! when it starts.
//!
//! # Place in the system
//! The data-plane crates (`vmbus`, `vhd`, `switch`, `vmm`, `storage`)
//! start threads; the appliance decides what each kind of thread may do
//! (its sandbox: a seccomp allow-list per kind). This crate is the seam
//! between them and knows nothing of seccomp:
//!
//! ```text
//!  spawn site (vmbus::cpu::spawn_on, vhd flusher, vCPU, ...)
//!      └─ new thread: vspa_threads::enter(ThreadKind::StorageWorker)
//!            └─ installer set by the appliance (vspa::sandbox): installs
//!               the kind's filter on this thread, before the thread
//!               touches any ring, packet or image
//! ```
//!
//! Without an installer (tools, tests, `vspa demo`) [`enter`] does nothing.
//!
//! It also holds the *ring thread* ([`privileged`]): the one thread that
//! may still create io_uring rings once the sandbox is in force. Every
//! other thread is denied `io_uring_setup` and `io_uring_register`, so a
//! compromised worker cannot make itself an unrestricted ring; queues are
//! created there and handed back. The data path never goes through it.
#![forbid(unsafe_code)]

pub mod conns;

use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Declares the kinds: one row each (variant, log name, what the thread
/// does). Adding a kind is one row here plus its allow-list arm in the
/// appliance's sandbox rules (the compiler points at the match).
macro_rules! thread_kinds {
    ($($(#[doc = $doc:literal])* $kind:ident = $name:literal,)+) => {
        /// What a thread of vspa does, which decides what it may do.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ThreadKind {
            $($(#[doc = $doc])* $kind,)+
        }

        impl ThreadKind {
            /// Every kind, in declaration order.
            pub const ALL: &'static [ThreadKind] = &[$(ThreadKind::$kind,)+];

            /// A short name for logs.
            pub fn name(self) -> &'static str {
                match self {
                    $(ThreadKind::$kind => $name,)+
                }
            }
        }
    };
}

thread_kinds! {
    /// The main thread: setup, then signals, reloads and shutdown.
    Main = "main",
    /// The ring thread: creates restricted io_uring rings on request.
    Rings = "rings",
    /// Hosted mode: accepts a tenant's client connections.
    Acceptor = "acceptor",
    /// Hosted mode: one client's channel messages (offers, GPADLs, opens).
    Client = "client",
    /// `vspa run`: the VM's VMBus control requests (resets, sub-channels).
    VmControl = "vm-control",
    /// `vspa run`: one virtual processor (KVM_RUN, exits, hypercalls, and
    /// the VMBus messages the guest posts).
    Vcpu = "vcpu",
    /// A storage (storvsp) channel's worker: rings, SCSI, io_uring.
    StorageWorker = "storage-worker",
    /// Another VMBus device's channel worker (echo, integration services).
    DeviceWorker = "device-worker",
    /// A netvsp NIC thread: the channels of the NICs it owns.
    NicThread = "nic",
    /// A switch worker: tap, internal (smoltcp), pcap and VXLAN ports.
    SwitchWorker = "switch-worker",
    /// `vspa run`: a virtio-net device's poll thread.
    VirtioNet = "virtio-net",
    /// A VHD or VHDX image's metadata flusher.
    Flusher = "flusher",
    /// `vspa run`: waits for SIGINT/SIGTERM and stops the VM.
    Signals = "signals",
    /// `vspa run`: copies standard input to the guest's serial port.
    Console = "console",
    /// An NBD server's listener: accepts connections on one TCP or Unix
    /// socket.
    NbdListener = "nbd-listen",
    /// One NBD server connection: its socket and its export's image, all
    /// through one io_uring.
    NbdConnection = "nbd-conn",
    /// The client of one NBD-backed LUN: the socket to its server,
    /// reconnecting when it drops.
    NbdClient = "nbd-client",
    /// The control API (`--api-socket`): HTTP requests, applied as reloads
    /// are (so it may do what the main thread does).
    Api = "api",
    /// The Prometheus endpoint (`--metrics`): reads counters, answers GETs.
    Metrics = "metrics",
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`enter`] runs: the appliance's per-kind setup of a thread.
pub type Installer = fn(ThreadKind);

static INSTALLER: OnceLock<Installer> = OnceLock::new();

/// Sets the function every [`enter`] calls; only the first call counts
/// (returns false for later ones).
pub fn set_installer(installer: Installer) -> bool {
    INSTALLER.set(installer).is_ok()
}

/// Called by every thread vspa starts, first thing, with its kind.
pub fn enter(kind: ThreadKind) {
    if let Some(install) = INSTALLER.get() {
        install(kind);
    }
}

/// Starts thread `name` of kind `kind`: it [`enter`]s its kind, then runs
/// `f`. The spawn hook for threads that need no CPU binding (those use
/// `vmbus::cpu::spawn_on`, which enters the kind the same way).
pub fn spawn<F, T>(name: &str, kind: ThreadKind, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            enter(kind);
            f()
        })
}

type Job = Box<dyn FnOnce() + Send>;

static RINGS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

/// Starts the ring thread (once; later calls do nothing). From then on
/// [`privileged`] runs its work there. The thread enters
/// [`ThreadKind::Rings`].
pub fn start_ring_thread() -> std::io::Result<()> {
    if RINGS.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("vspa-rings".into())
        .spawn(move || {
            enter(ThreadKind::Rings);
            for job in rx {
                job();
            }
        })?;
    let _ = RINGS.set(tx);
    Ok(())
}

/// Runs `f` on the ring thread and returns its result; without a ring
/// thread, here. For the few system calls other threads are denied once
/// the sandbox is in force (creating an io_uring ring). A panic in `f`
/// comes back as a panic here.
pub fn privileged<T, F>(f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(rings) = RINGS.get() else {
        return f();
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(result);
    });
    if rings.send(job).is_err() {
        panic!("the ring thread is gone");
    }
    match rx.recv() {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("the ring thread dropped a request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ThreadKind::ALL.len());
    }

    #[test]
    fn privileged_work_runs_on_the_ring_thread() {
        start_ring_thread().unwrap();
        let name = privileged(|| std::thread::current().name().map(str::to_string));
        assert_eq!(name.as_deref(), Some("vspa-rings"));
        let caught = std::panic::catch_unwind(|| privileged(|| panic!("boom")));
        assert!(caught.is_err());
        assert_eq!(privileged(|| 7), 7, "the thread survives a panicking job");
    }
}
