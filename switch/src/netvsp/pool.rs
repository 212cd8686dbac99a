//! The threads that run NICs.
//!
//! A pool has a fixed number of threads; each owns the NICs it was given
//! (all channels of a NIC live on one thread, so a NIC's state, its receive
//! buffer and its switch port need no locks) and runs them to completion:
//! poll every NIC, and when a pass moved nothing, spin briefly, then
//! re-enable the rings' interrupts and sleep in epoll on every channel's
//! doorbell, every port's switch doorbell and the thread's inbox.
//!
//! The control plane (channel open/close from VMBus servers, link changes)
//! talks to a thread through its [`Inbox`], touched only on those rare
//! events, and stops it with its [`StopToken`]. Attach and detach wait for
//! the thread's answer, so once `stop` returns the thread no longer touches
//! the channel's rings.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use vmbus::event::Epoll;
use vmbus::worker::{IdleSpin, Inbox, StopToken};

use super::nic::{AttachError, Chan, Nic};

/// Why a NIC or a channel could not be handed to its pool thread.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the NIC's thread did not answer")]
    NoAnswer,
    #[error("the NIC is gone")]
    NicGone,
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("watching the channel's doorbell: {0}")]
    Epoll(#[from] io::Error),
}

/// A request to a pool thread.
pub(crate) enum Command {
    Add(Box<Nic>, SyncSender<()>),
    Attach {
        nic: u64,
        chan: Box<Chan>,
        reply: SyncSender<Result<(), PoolError>>,
    },
    Detach {
        nic: u64,
        index: u16,
        reply: SyncSender<()>,
    },
    /// Poll now (a link change).
    Kick,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Add(n, _) => write!(f, "Add({})", n.id),
            Command::Attach { nic, chan, .. } => write!(f, "Attach({nic}, {})", chan.index),
            Command::Detach { nic, index, .. } => write!(f, "Detach({nic}, {index})"),
            Command::Kick => write!(f, "Kick"),
        }
    }
}

#[derive(Debug)]
struct PoolThread {
    stop: StopToken,
    inbox: Arc<Inbox<Command>>,
    /// NICs on the thread (for placing new ones).
    load: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Option<()>>>,
}

/// Threads running NICs.
#[derive(Debug)]
pub struct Pool {
    threads: Vec<PoolThread>,
    next_id: AtomicU64,
}

/// How long a thread waits for another to answer before giving up (a
/// thread that died is the only way to get there).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl Pool {
    /// Starts `threads` threads named `name-N` that poll for `spin` after
    /// their last work before sleeping.
    pub fn new(name: &str, threads: usize, spin: Duration) -> io::Result<Arc<Self>> {
        Self::pinned(name, threads, spin, &[])
    }

    /// As [`Pool::new`], thread N bound to `cpus[N % cpus.len()]` (no
    /// binding when `cpus` is empty). Fails if a thread cannot take its CPU.
    pub fn pinned(
        name: &str,
        threads: usize,
        spin: Duration,
        cpus: &[usize],
    ) -> io::Result<Arc<Self>> {
        // Built in place so that an early return stops the threads started.
        let mut pool = Pool {
            threads: Vec::new(),
            next_id: AtomicU64::new(1),
        };
        for i in 0..threads.max(1) {
            let stop = StopToken::new()?;
            let inbox = Arc::new(Inbox::new()?);
            let load = Arc::new(AtomicUsize::new(0));
            let (st, ib, ld) = (stop.clone(), inbox.clone(), load.clone());
            let cpu = vmbus::cpu::nth(cpus, i);
            let kind = vmbus::ThreadKind::NicThread;
            let handle = vmbus::cpu::spawn_on(format!("{name}-{i}"), cpu, kind, move || {
                if let Err(e) = run(&st, &ib, &ld, spin) {
                    tracing::error!("netvsp pool thread failed: {e}");
                }
            })?;
            pool.threads.push(PoolThread {
                stop,
                inbox,
                load,
                handle: Some(handle),
            });
        }
        Ok(Arc::new(pool))
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The thread with the fewest NICs.
    pub(crate) fn pick(&self) -> usize {
        (0..self.threads.len())
            .min_by_key(|&i| self.threads[i].load.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub(crate) fn add(&self, thread: usize, nic: Box<Nic>) -> Result<(), PoolError> {
        let (tx, rx) = sync_channel(1);
        self.threads[thread].inbox.send(Command::Add(nic, tx));
        rx.recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| PoolError::NoAnswer)
    }

    pub(crate) fn attach(&self, thread: usize, nic: u64, chan: Chan) -> Result<(), PoolError> {
        let (tx, rx) = sync_channel(1);
        self.threads[thread].inbox.send(Command::Attach {
            nic,
            chan: Box::new(chan),
            reply: tx,
        });
        rx.recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| PoolError::NoAnswer)?
    }

    pub(crate) fn detach(&self, thread: usize, nic: u64, index: u16) {
        let (tx, rx) = sync_channel(1);
        self.threads[thread].inbox.send(Command::Detach {
            nic,
            index,
            reply: tx,
        });
        if rx.recv_timeout(ANSWER_TIMEOUT).is_err() {
            tracing::error!(nic, index, "netvsp thread did not release a channel");
        }
    }

    pub(crate) fn kick(&self, thread: usize) {
        self.threads[thread].inbox.send(Command::Kick);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for t in &self.threads {
            t.stop.stop();
        }
        for t in &mut self.threads {
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn watch_chan(epoll: &Epoll, c: &Chan) -> io::Result<()> {
    epoll.watch(c.ch.doorbell().as_fd())
}

fn unwatch_chan(epoll: &Epoll, c: &Chan) {
    let _ = epoll.del(c.ch.doorbell().as_fd());
}

fn run(
    stop: &StopToken,
    inbox: &Inbox<Command>,
    load: &AtomicUsize,
    spin: Duration,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.watch(stop.event().as_fd())?;
    epoll.watch(inbox.bell().as_fd())?;
    let mut nics: Vec<Nic> = Vec::new();
    let mut ready = Vec::new();
    let mut idle = IdleSpin::new(spin);
    while !stop.is_stopped() {
        let commands = inbox.receive();
        if !commands.is_empty() {
            for c in commands {
                handle(&epoll, &mut nics, c);
            }
            load.store(nics.len(), Ordering::Relaxed);
        }
        let mut progress = false;
        for n in &mut nics {
            progress |= n.poll();
        }
        if idle.keep_polling(progress) {
            continue;
        }
        sleep(&epoll, inbox, &mut nics, &mut ready)?;
    }
    for n in &nics {
        unwatch_all(&epoll, n);
    }
    Ok(())
}

/// Prepares every NIC for sleeping and waits, unless work arrived
/// meanwhile; then lets the NICs that prepared see what woke them.
fn sleep(
    epoll: &Epoll,
    inbox: &Inbox<Command>,
    nics: &mut [Nic],
    ready: &mut Vec<u64>,
) -> io::Result<()> {
    let mut sleep = !inbox.is_pending();
    let mut prepared = 0;
    for n in nics.iter_mut() {
        if !sleep {
            break;
        }
        prepared += 1;
        sleep = n.prepare_sleep();
    }
    ready.clear();
    if sleep {
        epoll.wait(None, ready)?;
    }
    for n in &mut nics[..prepared] {
        n.woke(ready);
    }
    Ok(())
}

fn unwatch_all(epoll: &Epoll, n: &Nic) {
    for c in n.chans.iter().flatten() {
        unwatch_chan(epoll, c);
    }
    let _ = epoll.del(n.port().doorbell_fd());
}

/// Applies one command.
fn handle(epoll: &Epoll, nics: &mut Vec<Nic>, c: Command) {
    match c {
        Command::Add(nic, reply) => {
            for c in nic.chans.iter().flatten() {
                if let Err(e) = watch_chan(epoll, c) {
                    tracing::error!("epoll: {e}");
                }
            }
            if let Err(e) = epoll.watch(nic.port().doorbell_fd()) {
                tracing::error!("epoll: {e}");
            }
            nics.push(*nic);
            let _ = reply.send(());
        }
        Command::Attach { nic, chan, reply } => {
            let _ = reply.send(attach(epoll, nics, nic, *chan));
        }
        Command::Detach { nic, index, reply } => {
            if let Some(pos) = nics.iter().position(|n| n.id == nic) {
                if index == 0 {
                    let n = nics.swap_remove(pos);
                    unwatch_all(epoll, &n);
                    drop(n);
                } else if let Some(c) = nics[pos].detach(index) {
                    unwatch_chan(epoll, &c);
                }
            }
            let _ = reply.send(());
        }
        Command::Kick => {}
    }
}

/// Adds a sub-channel to its NIC and watches its doorbell.
fn attach(epoll: &Epoll, nics: &mut [Nic], nic: u64, chan: Chan) -> Result<(), PoolError> {
    let n = nics
        .iter_mut()
        .find(|n| n.id == nic)
        .ok_or(PoolError::NicGone)?;
    n.can_attach(chan.index)?;
    let watched = watch_chan(epoll, &chan);
    n.attach(chan);
    Ok(watched?)
}
