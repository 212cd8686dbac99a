//! The toolkit of every run-to-completion worker loop in the workspace: the
//! storage channel workers, the switch's port workers, the netvsp pool
//! threads, the virtio-net poller and the echo device all stop, take
//! control-plane commands and decide when to sleep the same way.
//!
//! - [`StopToken`]: the one way to ask a worker to stop; it is a flag plus
//!   an eventfd the worker puts in its own poll set.
//! - [`Inbox`]: the one way for the control plane to hand a running worker
//!   commands (add a port, attach a channel): a short locked queue, a
//!   "pending" flag the loop checks with one atomic load per pass, and a
//!   bell the sleeping loop wakes on. Only rare control events touch it.
//! - [`IdleSpin`]: the one spin-then-sleep policy. After a pass that moved
//!   nothing a worker polls on for `spin` before paying for a sleep and a
//!   wake-up, yielding the CPU between passes: the peer it serves often
//!   shares that CPU, and yielding lets it produce the next request. The
//!   storage workers used `spin_loop` before; on the 2-CPU host, loaded,
//!   `vspa-bench storage` measured `yield_now` no worse (medians of three
//!   interleaved runs: randread QD32 ratio to fio 1.09 against 0.51, QD1
//!   latency 214 against 318 µs), so the switch's `yield_now` was kept.
//! - [`lock`]: the workspace's rule for poisoned locks.
//!
//! A loop then reads:
//!
//! ```no_run
//! # fn poll() -> bool { false }
//! # fn sleep() {}
//! use vmbus::worker::{IdleSpin, StopToken};
//! let stop = StopToken::new()?;
//! let mut idle = IdleSpin::new(std::time::Duration::from_micros(50));
//! while !stop.is_stopped() {
//!     if idle.keep_polling(poll()) {
//!         continue;
//!     }
//!     sleep(); // re-enable interrupts, re-check, wait on the loop's fds
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::event::EventFd;

/// Locks `m`, recovering the data of a poisoned lock.
///
/// The rule for every lock in vmbus, storage and the switch: a poisoned
/// lock is recovered, not propagated. Every critical section in these
/// crates is a single push, insert, remove or replace of control-plane
/// state, so a panic elsewhere in the holding thread cannot leave the data
/// half-updated; and a worker that panicked (a bug) must cost only its own
/// channel or port, not every later control-plane call.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct StopInner {
    stopped: AtomicBool,
    event: EventFd,
}

/// The worker side of a stop request; clones share it.
#[derive(Debug, Clone)]
pub struct StopToken(Arc<StopInner>);

impl StopToken {
    pub fn new() -> std::io::Result<Self> {
        Ok(StopToken(Arc::new(StopInner {
            stopped: AtomicBool::new(false),
            event: EventFd::new()?,
        })))
    }

    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::Acquire)
    }

    /// Asks the worker to stop and wakes it.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::Release);
        self.0.event.signal();
    }

    /// Readable once stop was requested (for a worker's own poll set).
    pub fn event(&self) -> &EventFd {
        &self.0.event
    }
}

/// A control-plane thread serving a listening socket (hosted mode's
/// acceptor, the control API, the metrics endpoint): it runs until its
/// [`StopToken`] is stopped, is joined on [`ServiceThread::stop`] or drop,
/// and its socket file, if it has one, is removed after it ends.
#[derive(Debug)]
pub struct ServiceThread {
    stop: StopToken,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: Option<std::path::PathBuf>,
}

impl ServiceThread {
    /// Takes over `thread`, which must return once `stop` is stopped.
    pub fn new(
        stop: StopToken,
        thread: std::thread::JoinHandle<()>,
        socket: Option<std::path::PathBuf>,
    ) -> Self {
        ServiceThread {
            stop,
            thread: Some(thread),
            socket,
        }
    }

    /// Stops the thread, waits for it and removes the socket file.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.stop();
        let _ = thread.join();
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Waits for the thread to end without asking it to.
    pub fn wait(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServiceThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Commands for a running worker from the control plane.
#[derive(Debug)]
pub struct Inbox<C> {
    commands: Mutex<Vec<C>>,
    /// Commands are waiting: the worker's one check per pass.
    pending: AtomicBool,
    bell: EventFd,
}

impl<C> Inbox<C> {
    pub fn new() -> std::io::Result<Self> {
        Ok(Inbox {
            commands: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            bell: EventFd::new()?,
        })
    }

    /// Queues `c` and wakes the worker. The bell rings before `pending`
    /// is set, so the worker's next `receive` after it (which sees
    /// `pending`) clears it: the bell never stays readable with nothing
    /// pending, which would make a level-triggered wait return at once
    /// forever.
    pub fn send(&self, c: C) {
        lock(&self.commands).push(c);
        self.bell.signal();
        self.pending.store(true, Ordering::SeqCst);
    }

    /// True if commands wait (a worker about to sleep checks this).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Takes the waiting commands (none: no lock taken). The bell is
    /// cleared before the queue is taken, so a command sent meanwhile is
    /// either taken now or rings the bell again.
    pub fn receive(&self) -> Vec<C> {
        if !self.pending.swap(false, Ordering::SeqCst) {
            return Vec::new();
        }
        self.bell.consume();
        std::mem::take(&mut *lock(&self.commands))
    }

    /// Readable while commands wait (for the worker's poll set).
    pub fn bell(&self) -> &EventFd {
        &self.bell
    }
}

/// The spin-then-sleep policy of an idle worker.
#[derive(Debug, Clone)]
pub struct IdleSpin {
    spin: Duration,
    idle_since: Option<Instant>,
    yield_cpu: bool,
}

impl IdleSpin {
    /// Polls on for `spin` after the last pass that moved something,
    /// yielding the CPU between idle passes.
    pub fn new(spin: Duration) -> Self {
        IdleSpin {
            spin,
            idle_since: None,
            yield_cpu: true,
        }
    }

    /// The same without yielding: for a thread bound to a CPU of its own,
    /// where a yield only adds a system call to every idle pass.
    pub fn without_yield(spin: Duration) -> Self {
        IdleSpin {
            yield_cpu: false,
            ..IdleSpin::new(spin)
        }
    }

    /// Called after each pass with whether it moved anything: true if the
    /// worker should poll again now, false if it should sleep (the spin
    /// time is over; it starts again after the sleep).
    pub fn keep_polling(&mut self, progress: bool) -> bool {
        if progress {
            self.idle_since = None;
            return true;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.spin {
            if self.yield_cpu {
                // Let whoever shares the CPU (often the peer) run first.
                std::thread::yield_now();
            }
            return true;
        }
        self.idle_since = None;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn service_thread_stops_joins_and_removes_its_socket_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"").unwrap();
        let stop = StopToken::new().unwrap();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            while !token.is_stopped() {
                crate::event::poll_readable([token.event().as_fd()], None);
            }
        });
        let mut service = ServiceThread::new(stop.clone(), thread, Some(path.clone()));
        service.stop();
        assert!(stop.is_stopped());
        assert!(!path.exists(), "socket file removed after the thread ended");
        std::fs::write(&path, b"").unwrap();
        drop(service); // already stopped: nothing more to do
        assert!(path.exists(), "a second stop removes nothing");
    }

    #[test]
    fn inbox_takes_commands_once_and_rings() {
        let inbox = Inbox::new().unwrap();
        assert!(inbox.receive().is_empty());
        inbox.send(1);
        inbox.send(2);
        assert!(inbox.is_pending());
        assert_eq!(inbox.receive(), [1, 2]);
        assert!(!inbox.is_pending());
        assert!(inbox.receive().is_empty());
        assert!(!inbox.bell().consume(), "the bell was cleared");
    }

    #[test]
    fn a_command_sent_during_receive_leaves_no_bell_ringing() {
        // `send` interleaved with `receive`: queued and rung, then the
        // worker's receive (not pending yet), then pending set.
        let inbox = Inbox::new().unwrap();
        lock(&inbox.commands).push(7);
        inbox.bell.signal();
        assert!(inbox.receive().is_empty());
        inbox.pending.store(true, Ordering::SeqCst);
        assert_eq!(inbox.receive(), [7]);
        assert!(
            !inbox.bell().consume(),
            "the bell rang once and was cleared"
        );
    }

    #[test]
    fn idle_spin_polls_for_its_time_then_sleeps() {
        let mut s = IdleSpin::new(Duration::from_millis(20));
        assert!(s.keep_polling(true));
        assert!(s.keep_polling(false), "within the spin time");
        std::thread::sleep(Duration::from_millis(25));
        assert!(!s.keep_polling(false), "spin time over: sleep");
        assert!(s.keep_polling(false), "a new spin after the sleep");
        let mut never = IdleSpin::new(Duration::ZERO);
        assert!(!never.keep_polling(false));
    }

    #[test]
    fn stop_token_wakes_its_event() {
        let t = StopToken::new().unwrap();
        assert!(!t.is_stopped());
        t.clone().stop();
        assert!(t.is_stopped());
        assert!(t.event().consume());
    }

    #[test]
    fn poisoned_locks_are_recovered() {
        let m = Arc::new(Mutex::new(vec![1]));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), [1]);
    }
}
