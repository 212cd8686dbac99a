//! An open channel as a worker sees it: its two rings, the doorbell the peer
//! rings, the notifier that reaches the peer, and the stop token of the
//! worker thread. [`Channel`] wraps the interrupt-mask and pending-send-size
//! protocols so a VSP's poll loop is: read everything, write replies,
//! `flush`, and `wait_for_work` when idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ThreadKind;
use crate::event::{EventFd, Notify, poll_readable};
use crate::ring::{IncomingRing, OutgoingRing, RingError, TRAILER_SIZE, WriteError};
use std::os::fd::AsFd;

/// Why a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// There may be work: the peer signalled or data is already there.
    Ready,
    /// The worker was asked to stop.
    Stopped,
    /// Nothing happened within the timeout.
    TimedOut,
}

#[derive(Debug)]
struct StopInner {
    stopped: AtomicBool,
    event: EventFd,
}

/// The worker side of a stop request.
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

/// A running channel worker, owned by the channel server.
pub trait ChannelWorker: Send + std::fmt::Debug {
    /// Stops the worker and waits until it no longer touches the rings.
    fn stop(self: Box<Self>);
}

/// A worker thread with a stop token.
#[derive(Debug)]
pub struct ThreadWorker {
    stop: StopToken,
    handle: Option<JoinHandle<Option<()>>>,
}

impl ChannelWorker for ThreadWorker {
    fn stop(mut self: Box<Self>) {
        self.stop.stop();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Runs `f` on a new named thread of kind `kind`; the returned worker stops it.
pub fn spawn_worker<F>(
    name: String,
    kind: ThreadKind,
    f: F,
) -> std::io::Result<Box<dyn ChannelWorker>>
where
    F: FnOnce(StopToken) + Send + 'static,
{
    spawn_worker_on(name, None, kind, f)
}

/// As [`spawn_worker`], the thread bound to `cpu`; fails if it cannot be.
pub fn spawn_worker_on<F>(
    name: String,
    cpu: Option<usize>,
    kind: ThreadKind,
    f: F,
) -> std::io::Result<Box<dyn ChannelWorker>>
where
    F: FnOnce(StopToken) + Send + 'static,
{
    let stop = StopToken::new()?;
    let token = stop.clone();
    let handle = crate::cpu::spawn_on(name, cpu, kind, move || f(token))?;
    Ok(Box::new(ThreadWorker {
        stop,
        handle: Some(handle),
    }))
}

/// Both rings of a channel plus its signals.
#[derive(Debug)]
pub struct Channel {
    pub incoming: IncomingRing,
    pub outgoing: OutgoingRing,
    doorbell: Arc<EventFd>,
    notify: Arc<dyn Notify>,
    stop: StopToken,
}

impl Channel {
    pub fn new(
        incoming: IncomingRing,
        outgoing: OutgoingRing,
        doorbell: Arc<EventFd>,
        notify: Arc<dyn Notify>,
        stop: StopToken,
    ) -> Self {
        incoming.mask_interrupts();
        Channel {
            incoming,
            outgoing,
            doorbell,
            notify,
            stop,
        }
    }

    pub fn stop_token(&self) -> &StopToken {
        &self.stop
    }

    /// Signals the peer unconditionally.
    pub fn signal_peer(&self) {
        self.notify.notify();
    }

    /// Publishes what was read and written; signals the peer once if either
    /// ring's rules ask for it.
    pub fn flush(&mut self) -> Result<(), RingError> {
        let space_freed = self.incoming.commit()?;
        let data_sent = self.outgoing.commit()?;
        if space_freed || data_sent {
            self.notify.notify();
        }
        Ok(())
    }

    /// Called when a poll found nothing to do: publishes, re-enables
    /// interrupts and sleeps until the peer signals (or `timeout`).
    pub fn wait_for_work(&mut self, timeout: Option<Duration>) -> Result<Wait, RingError> {
        self.flush()?;
        if self.stop.is_stopped() {
            return Ok(Wait::Stopped);
        }
        if !self.incoming.unmask_and_check_empty()? {
            self.incoming.mask_interrupts();
            return Ok(Wait::Ready);
        }
        let woke = self.sleep(timeout);
        self.incoming.mask_interrupts();
        Ok(woke)
    }

    /// For workers with their own poll set: publishes, re-enables
    /// interrupts and re-checks the ring. Returns true if the worker may
    /// sleep (nothing arrived); call [`Channel::woke`] after sleeping.
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        self.flush()?;
        if self.incoming.unmask_and_check_empty()? {
            return Ok(true);
        }
        self.incoming.mask_interrupts();
        Ok(false)
    }

    /// After a sleep prepared by [`Channel::prepare_sleep`]: clears the
    /// doorbell and masks interrupts again while the worker polls.
    pub fn woke(&mut self) {
        self.doorbell.consume();
        self.incoming.mask_interrupts();
    }

    /// The eventfd the peer rings.
    pub fn doorbell(&self) -> &EventFd {
        &self.doorbell
    }

    /// Sleeps until the doorbell rings, stop is requested or the timeout.
    pub fn sleep(&self, timeout: Option<Duration>) -> Wait {
        let [bell, stop] =
            poll_readable([self.doorbell.as_fd(), self.stop.event().as_fd()], timeout);
        if stop || self.stop.is_stopped() {
            return Wait::Stopped;
        }
        if bell {
            self.doorbell.consume();
            return Wait::Ready;
        }
        Wait::TimedOut
    }

    /// Waits until a packet of `len` bytes fits the outgoing ring. Flushes
    /// first so the peer sees what is already written. Doorbells that bring
    /// no space do not extend the timeout.
    pub fn wait_for_space(
        &mut self,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<Wait, RingError> {
        self.flush()?;
        let needed = (len.next_multiple_of(8) + TRAILER_SIZE) as u32;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.outgoing.request_space(needed)? {
                return Ok(Wait::Ready);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(Wait::TimedOut);
            }
            if self.sleep(left) == Wait::Stopped {
                return Ok(Wait::Stopped);
            }
        }
    }
}

/// Result of trying to send while honouring backpressure.
pub fn is_full(e: &WriteError) -> bool {
    matches!(e, WriteError::Full { .. })
}
