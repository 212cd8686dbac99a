//! A per-image thread for metadata flushes.
//!
//! A guest's flush that has metadata to write (log entries, BAT pages,
//! fdatasyncs) must not stall the worker that received it: the work goes to
//! the image's flusher thread (started on first use) and the request waits
//! for it as one more I/O on the worker's ring (a read of an eventfd the
//! thread rings, see `queue::Signal`), so the worker keeps serving its other
//! requests meanwhile. Jobs run one at a time, in order.

use crate::error::BlockError;
use crate::queue::{IoQueue, Signal, SlotId};
use std::sync::{Arc, OnceLock, mpsc};

/// Work a flush does; `Err` fails the request with that message.
pub(crate) type Work = Box<dyn FnOnce() -> Result<(), String> + Send>;

struct Job {
    work: Work,
    signal: Arc<Signal>,
}

/// The flusher of one image; dropping it ends the thread after its jobs.
#[derive(Debug)]
pub(crate) struct Flusher {
    name: &'static str,
    tx: OnceLock<mpsc::Sender<Job>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Flusher {
    pub(crate) fn new(name: &'static str) -> Flusher {
        Flusher {
            name,
            tx: OnceLock::new(),
        }
    }

    /// Runs `work` on the thread; request `id` completes when it is done.
    /// Without a thread (it could not be started) the work runs here, as
    /// it must happen either way.
    pub(crate) fn submit(
        &self,
        queue: &mut IoQueue,
        id: SlotId,
        work: Work,
    ) -> Result<(), BlockError> {
        let signal = Signal::new().map_err(|e| BlockError::from_io(&e))?;
        let job = Job {
            work,
            signal: Arc::clone(&signal),
        };
        match self.tx.get_or_init(|| start(self.name)).send(job) {
            Ok(()) => {
                queue.add_wait(id, signal);
                Ok(())
            }
            Err(mpsc::SendError(job)) => (job.work)().map_err(BlockError::Metadata),
        }
    }
}

fn start(name: &'static str) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for Job { work, signal } in rx {
                // `work` (and the image it holds) is consumed by the call,
                // so a close that follows the flush really closes the files.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                    .unwrap_or_else(|_| Err("metadata flush panicked".into()));
                signal.finish(outcome);
            }
        });
    if let Err(e) = spawned {
        // The receiver went with the closure: sends fail, flushes run inline.
        tracing::warn!("no {name} thread ({e}); metadata flushes run on the worker");
    }
    tx
}
