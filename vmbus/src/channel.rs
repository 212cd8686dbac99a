//! An open channel as a worker sees it: its two rings, the doorbell the peer
//! rings, the notifier that reaches the peer, and the stop token of the
//! worker thread. [`Channel`] wraps the interrupt-mask and pending-send-size
//! protocols so a VSP's poll loop is: read everything, write replies,
//! `flush`, and `wait_for_work` when idle. It also keeps the channel's
//! counters ([`crate::stats`]): ring totals published once per `flush`,
//! signals and wake-ups where they happen.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ThreadKind;
use crate::event::{EventFd, Notify, poll_readable};
use crate::ring::{IncomingRing, OutgoingRing, RingError, WriteError, packet_len};
use crate::stats::ChannelStats;
use crate::worker::StopToken;

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
    stats: Arc<ChannelStats>,
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
            stats: Arc::default(),
        }
    }

    /// Counts into `stats` (the channel server's, listed in its registry)
    /// rather than counters of the channel's own.
    pub fn with_stats(mut self, stats: Arc<ChannelStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The channel's counters.
    pub fn stats(&self) -> &Arc<ChannelStats> {
        &self.stats
    }

    pub fn stop_token(&self) -> &StopToken {
        &self.stop
    }

    /// Signals the peer unconditionally.
    pub fn signal_peer(&self) {
        self.notify.notify();
        self.stats.signalled_peer();
    }

    /// Publishes what was read and written; signals the peer once if either
    /// ring's rules ask for it.
    pub fn flush(&mut self) -> Result<(), RingError> {
        let space_freed = self.incoming.commit()?;
        let data_sent = self.outgoing.commit()?;
        self.stats
            .publish_rings(self.incoming.totals(), self.outgoing.totals());
        if space_freed || data_sent {
            self.signal_peer();
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

    /// For workers whose next reply (`payload` bytes after its descriptor)
    /// does not fit the outgoing ring: publishes and asks the peer to
    /// signal once it fits. Returns true if the worker may sleep (it still
    /// does not fit); call [`Channel::woke`] after sleeping.
    pub fn prepare_sleep_for_space(&mut self, payload: usize) -> Result<bool, RingError> {
        self.flush()?;
        Ok(!self.outgoing.request_space(packet_len(payload) as u32)?)
    }

    /// After a sleep prepared by [`Channel::prepare_sleep`]: clears the
    /// doorbell and masks interrupts again while the worker polls.
    pub fn woke(&mut self) {
        self.consume_doorbell();
        self.incoming.mask_interrupts();
    }

    /// Clears the doorbell after a sleep, counting the peer's signals;
    /// true if it had rung. For workers that wait on it themselves.
    pub fn consume_doorbell(&self) -> bool {
        let signals = self.doorbell.take();
        self.stats.woke(signals);
        signals > 0
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
            self.consume_doorbell();
            return Wait::Ready;
        }
        Wait::TimedOut
    }

    /// Waits until a packet with `payload` bytes after its descriptor fits
    /// the outgoing ring. Flushes first so the peer sees what is already
    /// written. Doorbells that bring no space do not extend the timeout.
    pub fn wait_for_space(
        &mut self,
        payload: usize,
        timeout: Option<Duration>,
    ) -> Result<Wait, RingError> {
        self.flush()?;
        let needed = packet_len(payload) as u32;
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
