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
//! talks to a thread through its inbox: a short locked queue plus an
//! eventfd, touched only on those rare events. Attach and detach wait for
//! the thread's answer, so once `stop` returns the thread no longer touches
//! the channel's rings.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::nic::{Chan, Nic};
use crate::sys::{Epoll, EventFd};

/// A request to a pool thread.
pub(crate) enum Command {
    Add(Box<Nic>, SyncSender<()>),
    Attach {
        nic: u64,
        chan: Chan,
        reply: SyncSender<Result<(), String>>,
    },
    Detach {
        nic: u64,
        index: u16,
        reply: SyncSender<()>,
    },
    /// Poll now (a link change).
    Kick,
    Stop,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Add(n, _) => write!(f, "Add({})", n.id),
            Command::Attach { nic, chan, .. } => write!(f, "Attach({nic}, {})", chan.index),
            Command::Detach { nic, index, .. } => write!(f, "Detach({nic}, {index})"),
            Command::Kick => write!(f, "Kick"),
            Command::Stop => write!(f, "Stop"),
        }
    }
}

#[derive(Debug)]
struct Inbox {
    commands: Mutex<Vec<Command>>,
    pending: AtomicBool,
    bell: EventFd,
}

impl Inbox {
    fn send(&self, c: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c);
        self.pending.store(true, Ordering::SeqCst);
        self.bell.ring();
    }
}

#[derive(Debug)]
struct PoolThread {
    inbox: Arc<Inbox>,
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
            let inbox = Arc::new(Inbox {
                commands: Mutex::new(Vec::new()),
                pending: AtomicBool::new(false),
                bell: EventFd::new()?,
            });
            let load = Arc::new(AtomicUsize::new(0));
            let (ib, ld) = (inbox.clone(), load.clone());
            let cpu = vmbus::cpu::nth(cpus, i);
            let kind = vmbus::ThreadKind::NicThread;
            let handle = vmbus::cpu::spawn_on(format!("{name}-{i}"), cpu, kind, move || {
                if let Err(e) = run(&ib, &ld, spin) {
                    tracing::error!("netvsp pool thread failed: {e}");
                }
            })?;
            pool.threads.push(PoolThread {
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

    pub(crate) fn add(&self, thread: usize, nic: Box<Nic>) -> Result<(), String> {
        let (tx, rx) = sync_channel(1);
        self.threads[thread].inbox.send(Command::Add(nic, tx));
        rx.recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| "the NIC's thread did not answer".to_string())
    }

    pub(crate) fn attach(&self, thread: usize, nic: u64, chan: Chan) -> Result<(), String> {
        let (tx, rx) = sync_channel(1);
        self.threads[thread].inbox.send(Command::Attach {
            nic,
            chan,
            reply: tx,
        });
        rx.recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| "the NIC's thread did not answer".to_string())?
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
            t.inbox.send(Command::Stop);
        }
        for t in &mut self.threads {
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn token(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    fd.as_raw_fd() as u64
}

fn watch_chan(epoll: &Epoll, c: &Chan) -> io::Result<()> {
    epoll.add(c.ch.doorbell().as_fd(), token(c.ch.doorbell().as_fd()))
}

fn unwatch_chan(epoll: &Epoll, c: &Chan) {
    let _ = epoll.del(c.ch.doorbell().as_fd());
}

fn run(inbox: &Inbox, load: &AtomicUsize, spin: Duration) -> io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.add(inbox.bell.fd(), token(inbox.bell.fd()))?;
    let mut nics: Vec<Nic> = Vec::new();
    let mut ready = Vec::new();
    let mut idle_since: Option<Instant> = None;
    loop {
        if inbox.pending.swap(false, Ordering::SeqCst) {
            let commands =
                std::mem::take(&mut *inbox.commands.lock().unwrap_or_else(|e| e.into_inner()));
            for c in commands {
                if !handle(&epoll, &mut nics, c) {
                    for n in &nics {
                        unwatch_all(&epoll, n);
                    }
                    return Ok(());
                }
            }
            load.store(nics.len(), Ordering::Relaxed);
        }
        let mut progress = false;
        for n in &mut nics {
            progress |= n.poll();
        }
        if progress {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < spin {
            // Let whoever shares the CPU (often the guest) run first.
            std::thread::yield_now();
            continue;
        }
        idle_since = None;
        let mut sleep = !inbox.pending.load(Ordering::SeqCst);
        let mut prepared = 0;
        for n in &mut nics {
            if !sleep {
                break;
            }
            prepared += 1;
            sleep = n.prepare_sleep();
        }
        ready.clear();
        if sleep {
            epoll.wait(None, &mut ready)?;
        }
        for n in &mut nics[..prepared] {
            n.woke(&ready);
        }
        if ready.contains(&token(inbox.bell.fd())) {
            inbox.bell.clear();
        }
    }
}

fn unwatch_all(epoll: &Epoll, n: &Nic) {
    for c in n.chans.iter().flatten() {
        unwatch_chan(epoll, c);
    }
    let _ = epoll.del(n.port().doorbell_fd());
}

/// Applies one command; false on Stop.
fn handle(epoll: &Epoll, nics: &mut Vec<Nic>, c: Command) -> bool {
    match c {
        Command::Add(nic, reply) => {
            for c in nic.chans.iter().flatten() {
                if let Err(e) = watch_chan(epoll, c) {
                    tracing::error!("epoll: {e}");
                }
            }
            if let Err(e) = epoll.add(nic.port().doorbell_fd(), token(nic.port().doorbell_fd())) {
                tracing::error!("epoll: {e}");
            }
            nics.push(*nic);
            let _ = reply.send(());
        }
        Command::Attach { nic, chan, reply } => {
            let r = match nics.iter_mut().find(|n| n.id == nic) {
                Some(n) => n.can_attach(chan.index).and_then(|()| {
                    let watched = watch_chan(epoll, &chan).map_err(|e| e.to_string());
                    n.attach(chan);
                    watched
                }),
                None => Err("the NIC is gone".to_string()),
            };
            let _ = reply.send(r);
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
        Command::Stop => return false,
    }
    true
}
