//! VSS (backup) IC: freeze and thaw the guest's file systems around a
//! snapshot.
//!
//! FREEZE asks the guest to quiesce (Linux's hv_vss_daemon runs FIFREEZE on
//! every writable mount, and thaws them all itself if one fails); THAW
//! undoes it. Linux negotiates framework 3.0 / message 5.0 only, answers
//! E_FAIL without its daemon, and has no timer of its own to thaw, so the
//! host thaws by itself once the configured limit passes, and at once if a
//! FREEZE is acknowledged after its caller gave up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::handle::{Command, IcError, Job, JobQueue, Responder, unix_ms};
use crate::message::{Negotiated, Reply, ReplyError};
use crate::protocol::{VssMessage, vss_op};
use crate::worker::{BodyCheck, Handler, Outgoing, TxError};

/// A freeze or thaw request from the handle.
#[derive(Debug)]
pub(crate) struct VssJob {
    pub freeze: bool,
    pub deadline: Instant,
    pub reply: Responder<Result<(), IcError>>,
}

impl Job for VssJob {
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn fail(self, e: IcError) {
        self.reply.send(Err(e));
    }
}

/// Whether the guest's file systems are frozen, as far as the host knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VssPhase {
    #[default]
    Thawed,
    Frozen,
}

/// What the VSS service reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VssState {
    pub phase: VssPhase,
    pub frozen_since_unix_ms: Option<u64>,
    pub freezes: u64,
    /// Thaws the host sent on its own (limit passed, or late FREEZE).
    pub auto_thaws: u64,
    /// Status of the last answer.
    pub last_status: Option<u32>,
}

/// The body of a VSS request.
pub fn request_body(op: u8) -> VssMessage {
    let mut m = VssMessage::new_zeroed();
    m.operation = op;
    m
}

/// Checks a VSS answer (the operation echoed).
pub fn parse_reply(op: u8, body: &[u8]) -> Result<(), ReplyError> {
    let (m, _) = VssMessage::read_from_prefix(body)
        .map_err(|_| ReplyError::Body(format!("VSS body of {} bytes", body.len())))?;
    if m.operation != op {
        return Err(ReplyError::Body(format!(
            "VSS answer for operation {}, asked {op}",
            m.operation
        )));
    }
    Ok(())
}

pub(crate) struct VssHandler {
    state: Arc<Mutex<VssState>>,
    limit: Duration,
    reply_timeout: Duration,
    jobs: JobQueue<VssJob>,
    /// Operation in flight and the caller waiting for it (None: our own thaw).
    inflight: Option<(u8, Option<VssJob>)>,
    /// A FREEZE that timed out: if it succeeds late, thaw at once.
    late_freeze: bool,
    frozen_at: Option<Instant>,
    thaw_due: bool,
}

impl VssHandler {
    pub fn new(state: Arc<Mutex<VssState>>, limit: Duration, reply_timeout: Duration) -> Self {
        VssHandler {
            state,
            limit,
            reply_timeout,
            jobs: JobQueue::new(8),
            inflight: None,
            late_freeze: false,
            frozen_at: None,
            thaw_due: false,
        }
    }

    fn set_phase(&mut self, frozen: bool, now: Instant) {
        self.frozen_at = frozen.then_some(now);
        let mut s = self.state.lock().expect("vss state");
        if frozen {
            s.phase = VssPhase::Frozen;
            s.freezes += 1;
            s.frozen_since_unix_ms = Some(unix_ms());
        } else {
            s.phase = VssPhase::Thawed;
            s.frozen_since_unix_ms = None;
        }
    }
}

impl Handler for VssHandler {
    fn ready(&mut self, _v: Negotiated, _now: Instant) {}

    fn command(&mut self, cmd: Command, _now: Instant) {
        match cmd {
            Command::Vss(job) if job.freeze && self.frozen_at.is_some() => job.fail(IcError::Busy),
            Command::Vss(job) => self.jobs.push(job),
            other => other.fail(IcError::InvalidArgument("not a VSS command".into())),
        }
    }

    fn poll(&mut self, now: Instant) {
        self.jobs.expire(now);
        if self.frozen_at.is_some_and(|t| now >= t + self.limit) {
            tracing::warn!(limit = ?self.limit, "guest frozen too long: thawing");
            // One automatic thaw per freeze; the timer is done.
            self.frozen_at = None;
            self.thaw_due = true;
        }
    }

    fn next_request(&mut self, now: Instant, body: &mut Vec<u8>) -> Option<Outgoing> {
        let (op, job) = if std::mem::take(&mut self.thaw_due) {
            self.state.lock().expect("vss state").auto_thaws += 1;
            (vss_op::THAW, None)
        } else {
            let job = self.jobs.pop(now)?;
            let op = if job.freeze {
                vss_op::FREEZE
            } else {
                vss_op::THAW
            };
            (op, Some(job))
        };
        body.extend_from_slice(request_body(op).as_bytes());
        let deadline = job
            .as_ref()
            .map_or(now + self.reply_timeout, |j| j.deadline);
        self.inflight = Some((op, job));
        Some(Outgoing { deadline })
    }

    fn complete(&mut self, outcome: Result<Reply<'_>, TxError>, now: Instant) -> BodyCheck {
        let Some((op, job)) = self.inflight.take() else {
            return Ok(());
        };
        let mut check = Ok(());
        let result = match outcome {
            Ok(r) => {
                self.state.lock().expect("vss state").last_status = Some(r.status);
                match parse_reply(op, r.body) {
                    Err(e) => {
                        check = Err(e.clone());
                        Err(IcError::BadReply(e.to_string()))
                    }
                    Ok(()) if r.status != 0 => Err(IcError::Refused(r.status)),
                    Ok(()) => {
                        self.set_phase(op == vss_op::FREEZE, now);
                        Ok(())
                    }
                }
            }
            Err(e) => {
                self.late_freeze = op == vss_op::FREEZE && e == TxError::TimedOut;
                Err(e.into())
            }
        };
        match job {
            Some(j) => j.reply.send(result),
            None => {
                if let Err(e) = result {
                    // Our own thaw failed: report it (the phase stays frozen).
                    tracing::warn!("automatic THAW failed: {e}");
                }
            }
        }
        check
    }

    fn late(&mut self, reply: Reply<'_>, now: Instant) -> BodyCheck {
        if !std::mem::take(&mut self.late_freeze) {
            return Ok(());
        }
        parse_reply(vss_op::FREEZE, reply.body)?;
        if reply.status == 0 {
            tracing::warn!("FREEZE acknowledged after its caller gave up: thawing");
            self.set_phase(true, now);
            self.thaw_due = true;
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let thaw = self.frozen_at.map(|t| t + self.limit);
        [thaw, self.jobs.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    fn closed(&mut self, why: &IcError) {
        self.jobs.fail_all(why);
        if let Some((_, Some(j))) = self.inflight.take() {
            j.fail(why.clone());
        }
        // Linux thaws through its daemon when the channel goes away.
        self.set_phase(false, Instant::now());
        self.thaw_due = false;
        self.late_freeze = false;
    }
}
