//! A per-image thread for metadata work, shared by VHD and VHDX.
//!
//! A guest's flush that has metadata to write (log entries, BAT pages,
//! fdatasyncs) must not stall the worker that received it: the work goes to
//! the image's flusher thread (started on first use) and the request waits
//! for it as one more I/O on the worker's ring (a read of an eventfd the
//! thread rings, see `queue::Signal`), so the worker keeps serving its other
//! requests meanwhile. The same thread takes background work nobody waits
//! for (a dynamic VHD reserves space ahead of its allocations there). Jobs
//! run one at a time, in order.
//!
//! Dropping the flusher waits for the jobs already queued, so once an image
//! is dropped its files are closed (and its image locks released) even when
//! a job still held them.

use crate::error::BlockError;
use crate::queue::{IoQueue, Signal, SlotId};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;

/// Work a flush does; `Err` fails the request with that message.
pub(crate) type Work = Box<dyn FnOnce() -> Result<(), String> + Send>;
/// Work nobody waits for; it reports its own errors.
pub(crate) type Background = Box<dyn FnOnce() + Send>;

/// The running thread: where jobs go, and the thread to join on drop.
#[derive(Debug)]
struct Thread {
    tx: mpsc::Sender<Background>,
    handle: Option<JoinHandle<()>>,
}

/// The flusher of one image; dropping it ends the thread after its jobs.
#[derive(Debug)]
pub(crate) struct Flusher {
    name: &'static str,
    thread: OnceLock<Thread>,
}

impl Flusher {
    pub(crate) fn new(name: &'static str) -> Flusher {
        Flusher {
            name,
            thread: OnceLock::new(),
        }
    }

    /// Runs `work` on the thread; request `id` completes when it is done.
    /// Without a thread (it could not be started) the work runs here, as
    /// it must happen either way, and the request completes at once.
    pub(crate) fn submit(
        &self,
        queue: &mut IoQueue,
        id: SlotId,
        work: Work,
    ) -> Result<(), BlockError> {
        let signal = Signal::new().map_err(|e| BlockError::from_io(&e))?;
        let done = Arc::clone(&signal);
        let job: Background = Box::new(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|_| Err("metadata flush panicked".into()));
            done.finish(outcome);
        });
        if let Err(job) = self.background(job) {
            job();
        }
        queue.add_wait(id, signal);
        Ok(())
    }

    /// Queues `work` behind the jobs already queued. Without a thread it
    /// comes back: the caller decides whether it must run anyway.
    pub(crate) fn background(&self, work: Background) -> Result<(), Background> {
        let thread = self.thread.get_or_init(|| start(self.name));
        thread.tx.send(work).map_err(|mpsc::SendError(work)| work)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let Some(Thread { tx, handle }) = self.thread.take() else {
            return;
        };
        drop(tx);
        // Never on the thread itself: jobs hold an image's parts, never
        // its flusher.
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::warn!("{} thread panicked", self.name);
        }
    }
}

fn start(name: &'static str) -> Thread {
    let (tx, rx) = mpsc::channel::<Background>();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            vspa_threads::enter(vspa_threads::ThreadKind::Flusher);
            for work in rx {
                // The work (and the image parts it holds) is consumed by
                // the call, so a close that follows a flush really closes
                // the files.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
                    tracing::warn!("{name}: background metadata work panicked");
                }
            }
        });
    let handle = match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            // The receiver went with the closure: sends fail, flushes run
            // on the worker.
            tracing::warn!("no {name} thread ({e}); metadata flushes run on the worker");
            None
        }
    };
    Thread { tx, handle }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Completion;
    use std::sync::Mutex;

    /// Runs request `tag` (planned by `plan`) to completion.
    fn run(queue: &mut IoQueue, tag: u64, plan: impl FnOnce(&mut IoQueue, SlotId)) -> Completion {
        let id = queue.begin(tag, &[], false).unwrap();
        plan(queue, id);
        queue.commit(id).unwrap();
        loop {
            queue.submit_and_wait().unwrap();
            let mut seen = None;
            queue.reap(|c| seen = Some(c));
            if let Some(c) = seen {
                return c;
            }
        }
    }

    #[test]
    fn jobs_run_in_order_and_a_drop_waits_for_them() {
        let flusher = Flusher::new("test-flush");
        let mut queue = IoQueue::new(4).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(());
        let (o, h) = (Arc::clone(&order), Arc::clone(&held));
        let background = Box::new(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            o.lock().unwrap().push("background");
            drop(h);
        });
        assert!(flusher.background(background).is_ok());
        let o = Arc::clone(&order);
        let done = run(&mut queue, 1, |q, id| {
            let work = Box::new(move || {
                o.lock().unwrap().push("flush");
                Err("no space".to_string())
            });
            flusher.submit(q, id, work).unwrap();
        });
        // The work's failure fails its request.
        let Completion::Request { tag: 1, result } = done else {
            panic!("{done:?}")
        };
        assert_eq!(result, Err(BlockError::Metadata("no space".into())));
        assert_eq!(*order.lock().unwrap(), ["background", "flush"]);
        // A background job still queued at the drop has run (and let go of
        // what it held) once the drop returns.
        let h = Arc::clone(&held);
        let late = Box::new(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(h);
        });
        assert!(flusher.background(late).is_ok());
        drop(flusher);
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[test]
    fn a_panicking_flush_fails_its_request() {
        let flusher = Flusher::new("test-flush");
        let mut queue = IoQueue::new(4).unwrap();
        let done = run(&mut queue, 7, |q, id| {
            flusher.submit(q, id, Box::new(|| panic!("boom"))).unwrap();
        });
        let Completion::Request { tag: 7, result } = done else {
            panic!("{done:?}")
        };
        assert_eq!(
            result,
            Err(BlockError::Metadata("metadata flush panicked".into()))
        );
        // The thread survives it.
        let ok = run(&mut queue, 8, |q, id| {
            flusher.submit(q, id, Box::new(|| Ok(()))).unwrap();
        });
        assert!(
            matches!(
                ok,
                Completion::Request {
                    tag: 8,
                    result: Ok(0)
                }
            ),
            "{ok:?}"
        );
    }
}
