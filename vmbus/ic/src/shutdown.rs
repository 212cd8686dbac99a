//! Shutdown IC: the host asks the guest to power off, reboot or hibernate.
//!
//! The request is one SHUTDOWN message with the full 2060-byte body (a
//! shorter one is dropped by Linux without a word). Linux answers status 0
//! before it acts (power-off and reboot always; hibernate only if the guest
//! can enter S4, else E_FAIL), then the VM stops by ordinary means. Reboot
//! is sent only to a guest that negotiated 3.1 and hibernate only 3.2 (the
//! versions that added them to Linux), and hibernate only when the
//! configuration allows it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::handle::Command;
use crate::handle::{IcError, Job, Responder, ShutdownOutcome, unix_ms};
use crate::message::{Negotiated, Reply, ReplyError};
use crate::protocol::{SHUTDOWN_REASON_PLANNED, ShutdownMessage, Version, shutdown_flags};
use crate::worker::{BodyCheck, Handler, Outgoing, TxError};

/// What the guest is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownKind {
    PowerOff,
    Reboot,
    Hibernate,
}

impl ShutdownKind {
    /// The message's flags field.
    pub fn flags(self, force: bool) -> u32 {
        let kind = match self {
            ShutdownKind::PowerOff => 0,
            ShutdownKind::Reboot => shutdown_flags::RESTART,
            ShutdownKind::Hibernate => shutdown_flags::HIBERNATE,
        };
        kind | if force { shutdown_flags::FORCE } else { 0 }
    }

    /// The message version that introduced the request in Linux.
    pub fn min_version(self) -> Version {
        match self {
            ShutdownKind::PowerOff => Version::new(1, 0),
            ShutdownKind::Reboot => Version::new(3, 1),
            ShutdownKind::Hibernate => Version::new(3, 2),
        }
    }
}

/// A shutdown request from the handle.
#[derive(Debug)]
pub(crate) struct ShutdownJob {
    pub kind: ShutdownKind,
    pub force: bool,
    pub deadline: Instant,
    pub reply: Responder<ShutdownOutcome>,
}

impl Job for ShutdownJob {
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn fail(self, e: IcError) {
        self.reply.send(ShutdownOutcome::from_error(e));
    }
}

/// What the shutdown service reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ShutdownState {
    /// A request on its way or waiting for the guest's answer.
    pub in_progress: Option<ShutdownKind>,
    pub last: Option<ShutdownRecord>,
}

/// The most recent answered (or failed) request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShutdownRecord {
    pub kind: ShutdownKind,
    pub outcome: ShutdownOutcome,
    pub at_unix_ms: u64,
    /// The answer came after the caller's timeout.
    pub late: bool,
}

/// Builds the SHUTDOWN body for `flags`.
pub fn request_body(flags: u32) -> ShutdownMessage {
    let mut m = ShutdownMessage::new_zeroed();
    m.reason_code = SHUTDOWN_REASON_PLANNED.into();
    m.timeout_seconds = 0.into();
    m.flags = flags.into();
    m
}

/// Checks a SHUTDOWN reply body (the guest echoes the request) and maps
/// its status.
pub fn parse_reply(flags: u32, status: u32, body: &[u8]) -> Result<ShutdownOutcome, ReplyError> {
    let (m, _) = ShutdownMessage::read_from_prefix(body)
        .map_err(|_| ReplyError::Body(format!("shutdown body of {} bytes", body.len())))?;
    if m.flags.get() != flags {
        return Err(ReplyError::Body(format!(
            "shutdown flags {:#x} echoed as {:#x}",
            flags,
            m.flags.get()
        )));
    }
    Ok(match status {
        0 => ShutdownOutcome::Acknowledged,
        s => ShutdownOutcome::Refused(s),
    })
}

pub(crate) struct ShutdownHandler {
    pub state: Arc<Mutex<ShutdownState>>,
    pub hibernate_allowed: bool,
    versions: Option<Negotiated>,
    queued: Option<ShutdownJob>,
    /// The request sent, and its flags.
    inflight: Option<(ShutdownJob, u32)>,
    /// Flags of a request that timed out (its answer may still come).
    late_flags: Option<(ShutdownKind, u32)>,
}

impl ShutdownHandler {
    pub fn new(state: Arc<Mutex<ShutdownState>>, hibernate_allowed: bool) -> Self {
        ShutdownHandler {
            state,
            hibernate_allowed,
            versions: None,
            queued: None,
            inflight: None,
            late_flags: None,
        }
    }

    fn record(&self, kind: ShutdownKind, outcome: &ShutdownOutcome, late: bool) {
        let mut s = self.state.lock().expect("shutdown state");
        if !late {
            s.in_progress = None;
        }
        s.last = Some(ShutdownRecord {
            kind,
            outcome: outcome.clone(),
            at_unix_ms: unix_ms(),
            late,
        });
    }

    fn refuse(&self, job: ShutdownJob) -> Option<ShutdownJob> {
        if self.queued.is_some() || self.inflight.is_some() {
            job.fail(IcError::Busy);
            return None;
        }
        if job.kind == ShutdownKind::Hibernate && !self.hibernate_allowed {
            job.fail(IcError::NotAllowed(
                "hibernate is off in the configuration".into(),
            ));
            return None;
        }
        let negotiated = self.versions.map(|v| v.message);
        if negotiated.is_some_and(|v| v.packed() < job.kind.min_version().packed()) {
            let v = negotiated.expect("checked");
            let why = format!(
                "{:?} needs shutdown version {}, the guest negotiated {v}",
                job.kind,
                job.kind.min_version()
            );
            job.fail(IcError::NotAllowed(why));
            return None;
        }
        Some(job)
    }
}

impl Handler for ShutdownHandler {
    fn ready(&mut self, versions: Negotiated, _now: Instant) {
        self.versions = Some(versions);
    }

    fn command(&mut self, cmd: Command, _now: Instant) {
        let Command::Shutdown(job) = cmd else {
            return cmd.fail(IcError::InvalidArgument("not a shutdown command".into()));
        };
        if let Some(job) = self.refuse(job) {
            self.state.lock().expect("shutdown state").in_progress = Some(job.kind);
            self.queued = Some(job);
        }
    }

    fn poll(&mut self, now: Instant) {
        if self.queued.as_ref().is_some_and(|j| j.deadline <= now) {
            let job = self.queued.take().expect("checked");
            self.record(job.kind, &ShutdownOutcome::TimedOut, false);
            job.fail(IcError::TimedOut);
        }
    }

    fn next_request(&mut self, now: Instant, body: &mut Vec<u8>) -> Option<Outgoing> {
        self.poll(now);
        let job = self.queued.take()?;
        let flags = job.kind.flags(job.force);
        body.extend_from_slice(request_body(flags).as_bytes());
        let deadline = job.deadline;
        self.inflight = Some((job, flags));
        Some(Outgoing { deadline })
    }

    fn complete(&mut self, outcome: Result<Reply<'_>, TxError>, _now: Instant) -> BodyCheck {
        let Some((job, flags)) = self.inflight.take() else {
            return Ok(());
        };
        let mut check = Ok(());
        let result = match outcome {
            Ok(r) => parse_reply(flags, r.status, r.body).unwrap_or_else(|e| {
                check = Err(e.clone());
                ShutdownOutcome::Failed(IcError::BadReply(e.to_string()))
            }),
            Err(TxError::TimedOut) => {
                self.late_flags = Some((job.kind, flags));
                ShutdownOutcome::TimedOut
            }
            Err(e) => ShutdownOutcome::from_error(e.into()),
        };
        tracing::info!(kind = ?job.kind, "shutdown request: {result:?}");
        self.record(job.kind, &result, false);
        job.reply.send(result);
        check
    }

    fn late(&mut self, reply: Reply<'_>, _now: Instant) -> BodyCheck {
        let Some((kind, flags)) = self.late_flags.take() else {
            return Ok(());
        };
        let outcome = parse_reply(flags, reply.status, reply.body)?;
        tracing::info!(?kind, "late answer to a shutdown request: {outcome:?}");
        self.record(kind, &outcome, true);
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.queued.as_ref().map(|j| j.deadline)
    }

    fn closed(&mut self, why: &IcError) {
        self.versions = None;
        if let Some(j) = self.queued.take() {
            j.fail(why.clone());
        }
        if let Some((j, _)) = self.inflight.take() {
            j.fail(why.clone());
        }
        self.state.lock().expect("shutdown state").in_progress = None;
    }
}
