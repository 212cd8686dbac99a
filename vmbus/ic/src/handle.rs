//! The control side: what the appliance (and later the management API)
//! calls. [`IcHandle`] turns each call into a command for the service's
//! worker and waits for its typed answer with a timeout; nothing here
//! touches a ring. [`IcSnapshot`] is the plain state for logs and reports.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::heartbeat::HeartbeatState;
use crate::kvp::{KvpEntry, KvpJob, KvpState, Pool};
use crate::protocol::Service;
use crate::shutdown::{ShutdownJob, ShutdownKind, ShutdownState};
use crate::timesync::{RefClock, SyncJob, TimeSyncState};
use crate::vss::{VssJob, VssState};
use crate::worker::{ChannelInfo, Core};

/// Why a control request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum IcError {
    #[error("the service is disabled in the configuration")]
    Disabled,
    #[error("the guest has not opened the channel")]
    NotConnected,
    #[error("version negotiation has not completed")]
    NotReady,
    #[error("the channel failed: {0}")]
    Failed(String),
    #[error("another request of this kind is in progress")]
    Busy,
    #[error("the guest did not answer in time")]
    TimedOut,
    #[error("the guest answered with status {0:#010x}")]
    Refused(u32),
    #[error("the guest's reply was invalid: {0}")]
    BadReply(String),
    #[error("not allowed: {0}")]
    NotAllowed(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// The result of a shutdown, reboot or hibernate request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum ShutdownOutcome {
    /// The guest accepted (status 0) and is now acting on its own; watch
    /// the VM (or connection) end within a grace period.
    Acknowledged,
    /// The guest refused with this status (hibernate without S4: E_FAIL).
    Refused(u32),
    /// No answer within the timeout.
    TimedOut,
    /// Nothing to ask: the service is off, the guest has not opened or
    /// negotiated the channel, or the channel failed.
    NotConnected(IcError),
    /// Not sent (busy, not allowed, not supported by the negotiated
    /// version) or answered with an invalid reply.
    Failed(IcError),
}

impl ShutdownOutcome {
    pub(crate) fn from_error(e: IcError) -> Self {
        match e {
            IcError::TimedOut => ShutdownOutcome::TimedOut,
            IcError::Refused(s) => ShutdownOutcome::Refused(s),
            IcError::Disabled | IcError::NotConnected | IcError::NotReady | IcError::Failed(_) => {
                ShutdownOutcome::NotConnected(e)
            }
            _ => ShutdownOutcome::Failed(e),
        }
    }
}

/// Where a worker sends a command's answer; a caller that gave up is
/// simply not there any more.
#[derive(Debug)]
pub(crate) struct Responder<T>(SyncSender<T>);

impl<T> Responder<T> {
    pub fn new() -> (Self, Receiver<T>) {
        let (tx, rx) = sync_channel(1);
        (Responder(tx), rx)
    }

    pub fn send(self, value: T) {
        let _ = self.0.try_send(value);
    }
}

/// A command waiting in a worker, with the caller's deadline.
pub(crate) trait Job {
    fn deadline(&self) -> Instant;
    fn fail(self, e: IcError);
}

/// A command for one service's worker.
#[derive(Debug)]
pub(crate) enum Command {
    Shutdown(ShutdownJob),
    TimeSync(SyncJob),
    Kvp(KvpJob),
    Vss(VssJob),
}

impl Command {
    pub fn fail(self, e: IcError) {
        match self {
            Command::Shutdown(j) => j.fail(e),
            Command::TimeSync(j) => j.fail(e),
            Command::Kvp(j) => j.fail(e),
            Command::Vss(j) => j.fail(e),
        }
    }
}

/// Shared state of every service of one set.
#[derive(Default, Clone)]
pub(crate) struct SetState {
    pub shutdown: Option<Service1<ShutdownState>>,
    pub timesync: Option<Service1<TimeSyncState>>,
    pub heartbeat: Option<Service1<HeartbeatState>>,
    pub kvp: Option<Service1<KvpState>>,
    pub vss: Option<Service1<VssState>>,
    pub clock: Arc<Mutex<Option<RefClock>>>,
}

impl std::fmt::Debug for SetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetState").finish_non_exhaustive()
    }
}

/// One service's core (inbox, channel facts) and detail state.
#[derive(Debug)]
pub(crate) struct Service1<T> {
    pub core: Arc<Core>,
    pub detail: Arc<Mutex<T>>,
}

impl<T> Clone for Service1<T> {
    fn clone(&self) -> Self {
        Service1 {
            core: self.core.clone(),
            detail: self.detail.clone(),
        }
    }
}

impl<T: Clone> Service1<T> {
    fn report(&self) -> ServiceReport<T> {
        ServiceReport {
            channel: self.core.info(),
            state: self.detail.lock().expect("service state").clone(),
        }
    }
}

/// One service in a snapshot: its channel and its own state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceReport<T> {
    pub channel: ChannelInfo,
    #[serde(flatten)]
    pub state: T,
}

/// Everything a set's services know, for logs and the management API.
/// A service that is off is `None`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IcSnapshot {
    pub shutdown: Option<ServiceReport<ShutdownState>>,
    pub timesync: Option<ServiceReport<TimeSyncState>>,
    pub heartbeat: Option<ServiceReport<HeartbeatState>>,
    pub kvp: Option<ServiceReport<KvpState>>,
    pub vss: Option<ServiceReport<VssState>>,
}

/// Extra time a caller waits beyond its timeout for the worker's answer
/// (the worker enforces the timeout itself).
const ANSWER_GRACE: Duration = Duration::from_millis(500);

/// Controls one guest's integration services. Cheap to clone; every call
/// is safe from any thread and returns within its timeout.
#[derive(Debug, Clone)]
pub struct IcHandle {
    pub(crate) state: SetState,
}

impl IcHandle {
    fn call<T>(
        &self,
        core: Option<&Arc<Core>>,
        timeout: Duration,
        make: impl FnOnce(Instant, Responder<T>) -> Command,
        on_error: impl Fn(IcError) -> T,
    ) -> T {
        let Some(core) = core else {
            return on_error(IcError::Disabled);
        };
        let (tx, rx) = Responder::new();
        core.inbox.submit(make(Instant::now() + timeout, tx));
        rx.recv_timeout(timeout + ANSWER_GRACE)
            .unwrap_or_else(|_| on_error(IcError::TimedOut))
    }

    /// Asks the guest to power off, reboot or hibernate, and waits up to
    /// `timeout` for its answer. An acknowledged request means the guest
    /// has started on its own; the caller then waits for the VM to stop.
    pub fn shutdown(&self, kind: ShutdownKind, timeout: Duration) -> ShutdownOutcome {
        let core = self.state.shutdown.as_ref().map(|s| &s.core);
        self.call(
            core,
            timeout,
            |deadline, reply| {
                Command::Shutdown(ShutdownJob {
                    kind,
                    force: false,
                    deadline,
                    reply,
                })
            },
            ShutdownOutcome::from_error,
        )
    }

    /// Sets `key` to the string `value` in a host pool (External or
    /// AutoExternal) of the guest.
    pub fn kvp_set(
        &self,
        pool: Pool,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<(), IcError> {
        crate::kvp::check_host_pool(pool)?;
        crate::kvp::check_entry(key, value)?;
        self.kvp(timeout, |deadline, reply| {
            KvpJob::set(pool, key, value, deadline, reply)
        })
        .map(|_| ())
    }

    /// Deletes `key` from a host pool of the guest.
    pub fn kvp_delete(&self, pool: Pool, key: &str, timeout: Duration) -> Result<(), IcError> {
        crate::kvp::check_host_pool(pool)?;
        crate::kvp::check_entry(key, "")?;
        self.kvp(timeout, |deadline, reply| {
            KvpJob::delete(pool, key, deadline, reply)
        })
        .map(|_| ())
    }

    /// Reads every entry of one of the guest's pools (ENUMERATE until the
    /// guest says there are no more). Reading Guest or Auto also refreshes
    /// the cached values in the snapshot.
    pub fn kvp_enumerate(&self, pool: Pool, timeout: Duration) -> Result<Vec<KvpEntry>, IcError> {
        self.kvp(timeout, |deadline, reply| {
            KvpJob::enumerate(pool, deadline, reply)
        })
    }

    fn kvp(
        &self,
        timeout: Duration,
        make: impl FnOnce(Instant, Responder<Result<Vec<KvpEntry>, IcError>>) -> KvpJob,
    ) -> Result<Vec<KvpEntry>, IcError> {
        let core = self.state.kvp.as_ref().map(|s| &s.core);
        self.call(core, timeout, |d, r| Command::Kvp(make(d, r)), Err)
    }

    /// Sends a time SYNC now (after a resume or restore: the guest steps
    /// its clock to the host's).
    pub fn timesync_now(&self, timeout: Duration) -> Result<(), IcError> {
        let core = self.state.timesync.as_ref().map(|s| &s.core);
        self.call(
            core,
            timeout,
            |deadline, reply| Command::TimeSync(SyncJob { deadline, reply }),
            Err,
        )
    }

    /// Freezes the guest's file systems (VSS FREEZE). Thaw with
    /// [`IcHandle::vss_thaw`]; the worker thaws by itself after the
    /// configured limit.
    pub fn vss_freeze(&self, timeout: Duration) -> Result<(), IcError> {
        self.vss(timeout, true)
    }

    /// Thaws the guest's file systems (VSS THAW).
    pub fn vss_thaw(&self, timeout: Duration) -> Result<(), IcError> {
        self.vss(timeout, false)
    }

    /// Freezes, runs `f` (take the snapshot there) and thaws. Returns
    /// `f`'s result, or the freeze or thaw error (after a failed thaw the
    /// worker still thaws by itself once the freeze limit passes).
    pub fn vss_with_frozen<T>(
        &self,
        timeout: Duration,
        f: impl FnOnce() -> T,
    ) -> Result<T, IcError> {
        self.vss_freeze(timeout)?;
        let out = f();
        self.vss_thaw(timeout)?;
        Ok(out)
    }

    fn vss(&self, timeout: Duration, freeze: bool) -> Result<(), IcError> {
        let core = self.state.vss.as_ref().map(|s| &s.core);
        self.call(
            core,
            timeout,
            |deadline, reply| {
                Command::Vss(VssJob {
                    freeze,
                    deadline,
                    reply,
                })
            },
            Err,
        )
    }

    /// Sets where time sync reads the guest's reference counter (100 ns
    /// units; the VMM passes its partition clock). Without one, a
    /// monotonic clock that starts with the set stands in (hosted guests
    /// have no reference counter).
    pub fn set_reference_clock(&self, clock: RefClock) {
        *self.state.clock.lock().expect("clock") = Some(clock);
    }

    /// Heartbeat state, or None if the service is off.
    pub fn heartbeat(&self) -> Option<HeartbeatState> {
        self.state.heartbeat.as_ref().map(|s| s.report().state)
    }

    /// The last time sample and counters, or None if the service is off.
    pub fn time_sync(&self) -> Option<TimeSyncState> {
        self.state.timesync.as_ref().map(|s| s.report().state)
    }

    /// Cached KVP values (host pools as set, guest pools as last read).
    pub fn kvp_values(&self) -> Option<KvpState> {
        self.state.kvp.as_ref().map(|s| s.report().state)
    }

    /// Channel facts of one service, or None if it is off.
    pub fn channel(&self, service: Service) -> Option<ChannelInfo> {
        let s = &self.state;
        let core = match service {
            Service::Shutdown => s.shutdown.as_ref().map(|x| &x.core),
            Service::TimeSync => s.timesync.as_ref().map(|x| &x.core),
            Service::Heartbeat => s.heartbeat.as_ref().map(|x| &x.core),
            Service::Kvp => s.kvp.as_ref().map(|x| &x.core),
            Service::Vss => s.vss.as_ref().map(|x| &x.core),
        };
        core.map(|c| c.info())
    }

    /// Everything, as plain data.
    pub fn snapshot(&self) -> IcSnapshot {
        let s = &self.state;
        IcSnapshot {
            shutdown: s.shutdown.as_ref().map(Service1::report),
            timesync: s.timesync.as_ref().map(Service1::report),
            heartbeat: s.heartbeat.as_ref().map(Service1::report),
            kvp: s.kvp.as_ref().map(Service1::report),
            vss: s.vss.as_ref().map(Service1::report),
        }
    }

    /// Waits until `service` has negotiated (or `timeout`); true if it has.
    pub fn wait_ready(&self, service: Service, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.channel(service) {
                Some(info) if info.negotiated().is_some() => return true,
                None => return false,
                _ => {}
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Milliseconds since the Unix epoch, for reports.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Commands a worker holds until it can send them, failed with TimedOut
/// once their caller's deadline passes.
#[derive(Debug)]
pub(crate) struct JobQueue<J> {
    jobs: std::collections::VecDeque<J>,
    limit: usize,
}

impl<J: Job> JobQueue<J> {
    pub fn new(limit: usize) -> Self {
        JobQueue {
            jobs: Default::default(),
            limit,
        }
    }

    pub fn push(&mut self, job: J) {
        if self.jobs.len() >= self.limit {
            job.fail(IcError::Busy);
        } else {
            self.jobs.push_back(job);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Fails the jobs whose deadline has passed.
    pub fn expire(&mut self, now: Instant) {
        while let Some(i) = self.jobs.iter().position(|j| j.deadline() <= now) {
            if let Some(j) = self.jobs.remove(i) {
                j.fail(IcError::TimedOut);
            }
        }
    }

    /// The oldest job still in time.
    pub fn pop(&mut self, now: Instant) -> Option<J> {
        self.expire(now);
        self.jobs.pop_front()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.jobs.iter().map(Job::deadline).min()
    }

    pub fn fail_all(&mut self, e: &IcError) {
        for j in self.jobs.drain(..) {
            j.fail(e.clone());
        }
    }
}
