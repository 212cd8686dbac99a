//! The port trait and the worker poll loop that runs ports.
//!
//! A [`Worker`] owns a set of ports with their handles and runs to
//! completion: read a batch from every port and forward it, then write every
//! port's queued frames, and repeat while there was work. When a round finds
//! nothing (and [`IdleSpin`] says the spin time is over) it announces sleep
//! on every handle and waits in epoll on the ports' descriptors, their
//! doorbells, its stop token and its inbox (ports added or removed at run
//! time through [`WorkerThread`]).

use crate::core::PortHandle;
use crate::frame::{Delivery, Frame, OffloadCaps};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use vmbus::event::Epoll;
use vmbus::worker::{IdleSpin, Inbox, StopToken};

/// Frames read from one port per round.
pub const RX_BATCH: usize = 64;
/// Frames written to one port per round.
pub const TX_BATCH: usize = 256;

/// A port: something that receives and sends batches of frames.
pub trait Port: Send + std::fmt::Debug {
    /// Appends up to `max` frames received from outside to `batch`, without
    /// waiting when there are none; returns how many frames it read but
    /// dropped as malformed (counted on the port).
    fn recv_batch(&mut self, batch: &mut Vec<Frame>, max: usize) -> io::Result<usize>;

    /// Sends `frames` outside, emptying the vector; returns how many could
    /// not be sent (they are counted as transmit errors).
    fn send_batch(&mut self, frames: &mut Vec<Delivery>) -> io::Result<usize>;

    /// A descriptor that becomes readable when `recv_batch` has work.
    fn fd(&self) -> Option<BorrowedFd<'_>>;

    /// The offloads the port accepts on frames it sends.
    fn caps(&self) -> OffloadCaps;

    /// How soon the port needs `recv_batch` called even without input
    /// (timers); None for never.
    fn timeout(&mut self) -> Option<Duration> {
        None
    }
}

/// A port change for a running worker, with where to answer.
#[derive(Debug)]
enum Command {
    Add(Box<(Box<dyn Port>, PortHandle)>, mpsc::Sender<()>),
    /// Drops the port of that switch port name; answers whether it had it.
    Remove(String, mpsc::Sender<bool>),
}

/// How long a caller waits for a worker to take a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A poll loop over a set of ports.
#[derive(Debug)]
pub struct Worker {
    ports: Vec<(Box<dyn Port>, PortHandle)>,
    /// How long to keep polling after the last frame before sleeping: a
    /// busy flow's next frame usually comes sooner than a wake-up would.
    spin: Duration,
    /// The CPU the thread is bound to, if any.
    cpu: Option<usize>,
}

/// A running worker thread.
#[derive(Debug)]
pub struct WorkerThread {
    stop: StopToken,
    inbox: Arc<Inbox<Command>>,
    /// None from the thread only when it never ran (see `spawn_on`).
    thread: Option<JoinHandle<Option<io::Result<()>>>>,
}

impl WorkerThread {
    /// Stops the worker and waits for it.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_and_join()
    }

    fn send(&self, c: Command) {
        self.inbox.send(c);
    }

    /// Hands a port to the running worker and waits until it polls it.
    pub fn add_port(&self, port: Box<dyn Port>, handle: PortHandle) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Add(Box::new((port, handle)), tx));
        rx.recv_timeout(COMMAND_TIMEOUT)
            .map_err(|_| io::Error::other("the worker did not take the port"))
    }

    /// Makes the running worker drop the port of switch port `name` (it
    /// leaves the switch); false if the worker does not run it.
    pub fn remove_port(&self, name: &str) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Remove(name.to_string(), tx));
        rx.recv_timeout(COMMAND_TIMEOUT).unwrap_or(false)
    }

    fn stop_and_join(&mut self) -> io::Result<()> {
        self.stop.stop();
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("worker panicked"))?
                .unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

impl Worker {
    /// A worker that polls for `spin` after its last frame before sleeping.
    pub fn new(spin: Duration) -> Self {
        Worker {
            ports: Vec::new(),
            spin,
            cpu: None,
        }
    }

    /// Binds the worker's thread to `cpu` (None: the scheduler places it).
    pub fn pinned(mut self, cpu: Option<usize>) -> Self {
        self.cpu = cpu;
        self
    }

    /// Adds a port and the handle of its switch port.
    pub fn add(&mut self, port: Box<dyn Port>, handle: PortHandle) {
        self.ports.push((port, handle));
    }

    /// Runs the loop on a new thread.
    pub fn spawn(self, name: &str) -> io::Result<WorkerThread> {
        let stop = StopToken::new()?;
        let inbox = Arc::new(Inbox::new()?);
        let (s, i) = (stop.clone(), inbox.clone());
        let kind = vmbus::ThreadKind::SwitchWorker;
        let thread =
            vmbus::cpu::spawn_on(name.to_string(), self.cpu, kind, move || self.run(&s, &i))?;
        Ok(WorkerThread {
            stop,
            inbox,
            thread: Some(thread),
        })
    }

    /// Watches a port's descriptors. Their numbers are the tokens, so a
    /// doorbell that rang is recognised (and only it is reset) however the
    /// port list changes.
    fn watch(epoll: &Epoll, port: &dyn Port, handle: &PortHandle) -> io::Result<()> {
        if let Some(fd) = port.fd() {
            epoll.watch(fd)?;
        }
        epoll.watch(handle.doorbell_fd())
    }

    fn run(mut self, stop: &StopToken, inbox: &Inbox<Command>) -> io::Result<()> {
        let epoll = Epoll::new()?;
        epoll.watch(stop.event().as_fd())?;
        epoll.watch(inbox.bell().as_fd())?;
        for (port, handle) in &self.ports {
            Self::watch(&epoll, port.as_ref(), handle)?;
        }
        let mut batch = Vec::with_capacity(RX_BATCH);
        let mut out = Vec::with_capacity(TX_BATCH);
        let mut ready = Vec::new();
        let mut idle = IdleSpin::new(self.spin);
        while !stop.is_stopped() {
            for c in inbox.receive() {
                self.apply(c, &epoll)?;
            }
            if idle.keep_polling(self.round(&mut batch, &mut out)) {
                continue;
            }
            self.sleep(&epoll, &mut ready)?;
        }
        Ok(())
    }

    /// Sleeps until a port has input, a doorbell rings, a port's timer is
    /// due or the control plane calls (stop, inbox).
    fn sleep(&mut self, epoll: &Epoll, ready: &mut Vec<u64>) -> io::Result<()> {
        let timeout = self.ports.iter_mut().filter_map(|(p, _)| p.timeout()).min();
        if timeout == Some(Duration::ZERO) {
            return Ok(());
        }
        ready.clear();
        if self.ports.iter().all(|(_, h)| h.prepare_sleep()) {
            epoll.wait(timeout, ready)?;
        }
        for (_, h) in &self.ports {
            h.woke(ready.contains(&Epoll::token(h.doorbell_fd())));
        }
        Ok(())
    }

    /// Takes or drops a port at run time.
    fn apply(&mut self, c: Command, epoll: &Epoll) -> io::Result<()> {
        match c {
            Command::Add(added, done) => {
                let (port, handle) = *added;
                Self::watch(epoll, port.as_ref(), &handle)?;
                self.ports.push((port, handle));
                let _ = done.send(());
            }
            Command::Remove(name, done) => {
                let i = self.ports.iter().position(|(_, h)| h.name() == name);
                if let Some(i) = i {
                    // Closing the port's descriptors and dropping the handle
                    // take them out of the epoll set and the switch.
                    self.ports.swap_remove(i);
                }
                let _ = done.send(i.is_some());
            }
        }
        Ok(())
    }

    /// One round over all ports; true if any frame moved. A port whose
    /// receive fails (its device went away) is removed from the switch.
    fn round(&mut self, batch: &mut Vec<Frame>, out: &mut Vec<Delivery>) -> bool {
        let mut busy = false;
        let mut failed = None;
        for (i, (port, handle)) in self.ports.iter_mut().enumerate() {
            match port.recv_batch(batch, RX_BATCH) {
                Ok(0) => {}
                Ok(bad) => handle.count_rx_malformed(bad as u64),
                Err(e) => {
                    tracing::error!(
                        port = handle.name(),
                        "receive failed, removing the port: {e}"
                    );
                    failed = Some(i);
                }
            }
            if !batch.is_empty() {
                busy = true;
                handle.ingress(batch);
            }
        }
        if let Some(i) = failed {
            // Dropping the port closes its descriptors (leaving the epoll set)
            // and dropping the handle removes it from the switch.
            self.ports.swap_remove(i);
            busy = true;
        }
        for (port, handle) in &mut self.ports {
            if handle.drain(out, TX_BATCH) == 0 {
                continue;
            }
            busy = true;
            let n = out.len();
            match port.send_batch(out) {
                Ok(failed) => handle.count_tx_errors(failed as u64),
                Err(e) => {
                    tracing::warn!(port = handle.name(), "send failed: {e}");
                    handle.count_tx_errors(n as u64);
                }
            }
            out.clear();
        }
        busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{PortSpec, Switch};
    use bytes::Bytes;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    /// A port that delivers one frame, then fails like a detached tap.
    #[derive(Debug)]
    struct Flaky {
        reads: usize,
        sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Port for Flaky {
        fn recv_batch(&mut self, batch: &mut Vec<Frame>, _max: usize) -> io::Result<usize> {
            self.reads += 1;
            match self.reads {
                1 => {
                    let mut f = vec![0xff; 6];
                    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xb5, 0, 0]);
                    batch.push(Frame::new(Bytes::from(f)));
                    Ok(0)
                }
                2..=3 => Ok(0),
                _ => Err(io::Error::from_raw_os_error(libc::EBADFD)),
            }
        }
        fn send_batch(&mut self, frames: &mut Vec<Delivery>) -> io::Result<usize> {
            self.sent.fetch_add(frames.len(), Ordering::SeqCst);
            frames.clear();
            Ok(0)
        }
        fn fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
        fn caps(&self) -> OffloadCaps {
            OffloadCaps::NONE
        }
        fn timeout(&mut self) -> Option<Duration> {
            Some(Duration::from_millis(1))
        }
    }

    #[test]
    fn worker_forwards_and_drops_a_failed_port() {
        let sw = Switch::new("w", 64, 300);
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut worker = Worker::new(Duration::ZERO);
        for name in ["a", "b"] {
            let port = Flaky {
                reads: if name == "a" { 0 } else { 1 },
                sent: sent.clone(),
            };
            worker.add(
                Box::new(port),
                sw.add_port(PortSpec::new(name, OffloadCaps::NONE)).unwrap(),
            );
        }
        let thread = worker.spawn("test-worker").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (sw.port_stats("a").is_some() || sw.port_stats("b").is_some())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            sw.port_stats("a").is_none() && sw.port_stats("b").is_none(),
            "failed ports removed"
        );
        assert_eq!(
            sent.load(Ordering::SeqCst),
            1,
            "a's frame reached b before they failed"
        );
        thread.stop().unwrap();
    }
}
