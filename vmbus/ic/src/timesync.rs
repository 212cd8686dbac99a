//! Time sync IC: the host's wall clock, paired with the guest's reference
//! counter at the same instant.
//!
//! Right after negotiation (every time the guest opens the channel) the
//! host sends a SYNC, which Linux applies with `settimeofday`; after that a
//! SAMPLE every period, which Linux keeps as the base of its `hyperv` PTP
//! clock (stale after 600 s). Message version 4.0 carries the reference
//! time (`ictimesync_ref_data`, 22 bytes) so the guest can correct for
//! delivery delay; 3.0 uses `ictimesync_data` (25 bytes). Linux echoes the
//! message unchanged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::handle::{Command, IcError, Job, JobQueue, Responder, unix_ms};
use crate::message::{Negotiated, Reply, ReplyError};
use crate::protocol::{FILETIME_UNIX_EPOCH, TimesyncV3, TimesyncV4, Version, timesync_flags};
use crate::worker::{BodyCheck, Handler, Outgoing, TxError};

/// The guest's reference counter, 100 ns units.
pub type RefClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The host's wall clock as a Windows FILETIME (100 ns since 1601).
pub fn filetime_now() -> u64 {
    let since_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    FILETIME_UNIX_EPOCH + (since_unix.as_nanos() / 100) as u64
}

/// A caller waiting for a SYNC to be answered.
#[derive(Debug)]
pub(crate) struct SyncJob {
    pub deadline: Instant,
    pub reply: Responder<Result<(), IcError>>,
}

impl Job for SyncJob {
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn fail(self, e: IcError) {
        self.reply.send(Err(e));
    }
}

/// One time message the guest answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TimeSample {
    /// "sync" or "sample".
    pub kind: &'static str,
    /// Host wall clock sent, FILETIME.
    pub parent_time: u64,
    /// Guest reference counter sent with it (0 in version 3.0).
    pub reference_time: u64,
    /// What the guest adds to its reference counter to get wall-clock
    /// time, per this sample (`parent_time - reference_time`, 100 ns).
    pub offset_100ns: i64,
    pub round_trip_us: u64,
    pub answered_unix_ms: u64,
}

/// What the time sync service reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TimeSyncState {
    pub syncs: u64,
    pub samples: u64,
    /// Messages without a valid answer in time.
    pub failed: u64,
    pub last: Option<TimeSample>,
}

/// Builds a time message body for the negotiated `version`.
pub fn request_body(version: Version, flags: u8, parent_time: u64, reference_time: u64) -> Vec<u8> {
    if version.major.get() >= 4 {
        let mut m = TimesyncV4::new_zeroed();
        m.parent_time = parent_time.into();
        m.reference_time = reference_time.into();
        m.flags = flags;
        m.as_bytes().to_vec()
    } else {
        let mut m = TimesyncV3::new_zeroed();
        m.parent_time = parent_time.into();
        m.flags = flags;
        m.as_bytes().to_vec()
    }
}

/// Checks that a time message came back with what was sent.
pub fn parse_reply(
    version: Version,
    flags: u8,
    parent_time: u64,
    body: &[u8],
) -> Result<(), ReplyError> {
    let (got_flags, got_time) = if version.major.get() >= 4 {
        let (m, _) = TimesyncV4::read_from_prefix(body)
            .map_err(|_| ReplyError::Body(format!("time body of {} bytes", body.len())))?;
        (m.flags, m.parent_time.get())
    } else {
        let (m, _) = TimesyncV3::read_from_prefix(body)
            .map_err(|_| ReplyError::Body(format!("time body of {} bytes", body.len())))?;
        (m.flags, m.parent_time.get())
    };
    if got_flags != flags || got_time != parent_time {
        return Err(ReplyError::Body(format!(
            "time message echoed as flags {got_flags:#x} time {got_time}"
        )));
    }
    Ok(())
}

struct InFlight {
    flags: u8,
    parent_time: u64,
    reference_time: u64,
    sent_at: Instant,
    waiters: Vec<SyncJob>,
}

pub(crate) struct TimeSyncHandler {
    state: Arc<Mutex<TimeSyncState>>,
    clock: Arc<Mutex<Option<RefClock>>>,
    started: Instant,
    period: Duration,
    reply_timeout: Duration,
    version: Version,
    next_sample: Option<Instant>,
    sync_due: bool,
    sample_due: bool,
    jobs: JobQueue<SyncJob>,
    inflight: Option<InFlight>,
}

impl TimeSyncHandler {
    pub fn new(
        state: Arc<Mutex<TimeSyncState>>,
        clock: Arc<Mutex<Option<RefClock>>>,
        started: Instant,
        period: Duration,
        reply_timeout: Duration,
    ) -> Self {
        TimeSyncHandler {
            state,
            clock,
            started,
            period,
            reply_timeout,
            version: Version::new(4, 0),
            next_sample: None,
            sync_due: false,
            sample_due: false,
            jobs: JobQueue::new(16),
            inflight: None,
        }
    }

    fn reference_time(&self) -> u64 {
        match self.clock.lock().expect("clock").as_ref() {
            Some(c) => c(),
            None => (self.started.elapsed().as_nanos() / 100) as u64,
        }
    }
}

impl Handler for TimeSyncHandler {
    fn ready(&mut self, v: Negotiated, now: Instant) {
        self.version = v.message;
        self.sync_due = true;
        self.next_sample = Some(now + self.period);
    }

    fn command(&mut self, cmd: Command, _now: Instant) {
        match cmd {
            Command::TimeSync(job) => {
                self.jobs.push(job);
                self.sync_due = true;
            }
            other => other.fail(IcError::InvalidArgument("not a time sync command".into())),
        }
    }

    fn poll(&mut self, now: Instant) {
        self.jobs.expire(now);
        if let Some(t) = self.next_sample.filter(|t| *t <= now) {
            self.sample_due = true;
            let mut next = t + self.period;
            if next <= now {
                next = now + self.period;
            }
            self.next_sample = Some(next);
        }
    }

    fn next_request(&mut self, now: Instant, body: &mut Vec<u8>) -> Option<Outgoing> {
        if !self.sync_due && !self.sample_due {
            return None;
        }
        let flags = if self.sync_due {
            timesync_flags::SYNC
        } else {
            timesync_flags::SAMPLE
        };
        self.sync_due = false;
        self.sample_due = false;
        let mut waiters = Vec::new();
        if flags == timesync_flags::SYNC {
            while let Some(j) = self.jobs.pop(now) {
                waiters.push(j);
            }
        }
        let reference_time = self.reference_time();
        let parent_time = filetime_now();
        body.extend_from_slice(&request_body(
            self.version,
            flags,
            parent_time,
            reference_time,
        ));
        let deadline = waiters
            .iter()
            .map(|j| j.deadline)
            .chain([now + self.reply_timeout.min(self.period)])
            .max()
            .expect("one element");
        self.inflight = Some(InFlight {
            flags,
            parent_time,
            reference_time: if self.version.major.get() >= 4 {
                reference_time
            } else {
                0
            },
            sent_at: now,
            waiters,
        });
        Some(Outgoing { deadline })
    }

    fn complete(&mut self, outcome: Result<Reply<'_>, TxError>, now: Instant) -> BodyCheck {
        let Some(f) = self.inflight.take() else {
            return Ok(());
        };
        let mut check = Ok(());
        let result = outcome.map_err(IcError::from).and_then(|r| {
            parse_reply(self.version, f.flags, f.parent_time, r.body).map_err(|e| {
                check = Err(e.clone());
                IcError::BadReply(e.to_string())
            })
        });
        let mut s = self.state.lock().expect("time sync state");
        match &result {
            Ok(()) => {
                let sync = f.flags == timesync_flags::SYNC;
                if sync {
                    s.syncs += 1;
                } else {
                    s.samples += 1;
                }
                s.last = Some(TimeSample {
                    kind: if sync { "sync" } else { "sample" },
                    parent_time: f.parent_time,
                    reference_time: f.reference_time,
                    offset_100ns: f.parent_time.wrapping_sub(f.reference_time) as i64,
                    round_trip_us: now.duration_since(f.sent_at).as_micros() as u64,
                    answered_unix_ms: unix_ms(),
                });
            }
            Err(_) => s.failed += 1,
        }
        drop(s);
        for w in f.waiters {
            w.reply.send(result.clone());
        }
        check
    }

    fn next_wakeup(&self) -> Option<Instant> {
        [self.next_sample, self.jobs.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    fn closed(&mut self, why: &IcError) {
        self.next_sample = None;
        self.sync_due = false;
        self.sample_due = false;
        self.jobs.fail_all(why);
        if let Some(f) = self.inflight.take() {
            for w in f.waiters {
                w.fail(why.clone());
            }
        }
    }
}
