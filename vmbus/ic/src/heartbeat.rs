//! Heartbeat IC: every period the host sends a sequence number and the
//! guest answers with that number plus one (Linux does it in the channel
//! tasklet, so a guest answers as long as its kernel takes interrupts).
//!
//! Health is host policy: `Alive` after a correct answer, `Unresponsive`
//! after `misses` periods in a row without one, `Unknown` until the first
//! answer and whenever the channel is not open. A guest that stops reading
//! is not sent more heartbeats (the unread one stays the outstanding
//! request); when it resumes and answers that one it is alive again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::handle::{Command, IcError, unix_ms};
use crate::message::{Negotiated, Reply, ReplyError};
use crate::protocol::HeartbeatMessage;
use crate::worker::{BodyCheck, Handler, Outgoing, TxError};

/// The guest's health as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    #[default]
    Unknown,
    Alive,
    Unresponsive,
}

/// What the heartbeat service reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HeartbeatState {
    pub health: Health,
    /// Last sequence number sent.
    pub sequence: u64,
    /// Periods in a row without a correct answer.
    pub misses: u32,
    pub replies: u64,
    pub last_reply_unix_ms: Option<u64>,
}

/// The heartbeat body for `sequence`.
pub fn request_body(sequence: u64) -> HeartbeatMessage {
    let mut m = HeartbeatMessage::new_zeroed();
    m.sequence = sequence.into();
    m
}

/// Checks a heartbeat answer: the sequence number plus one.
pub fn parse_reply(sent: u64, body: &[u8]) -> Result<(), ReplyError> {
    let (m, _) = HeartbeatMessage::read_from_prefix(body)
        .map_err(|_| ReplyError::Body(format!("heartbeat body of {} bytes", body.len())))?;
    let got = m.sequence.get();
    if got != sent.wrapping_add(1) {
        return Err(ReplyError::Body(format!(
            "heartbeat {sent} answered with {got}, expected {}",
            sent.wrapping_add(1)
        )));
    }
    Ok(())
}

pub(crate) struct HeartbeatHandler {
    state: Arc<Mutex<HeartbeatState>>,
    period: Duration,
    miss_limit: u32,
    next_tick: Option<Instant>,
    due: bool,
    sequence: u64,
    /// Sequence number sent and not answered yet.
    awaiting: Option<u64>,
}

impl HeartbeatHandler {
    pub fn new(state: Arc<Mutex<HeartbeatState>>, period: Duration, miss_limit: u32) -> Self {
        HeartbeatHandler {
            state,
            period,
            miss_limit,
            next_tick: None,
            due: false,
            sequence: 0,
            awaiting: None,
        }
    }

    fn alive(&mut self) {
        self.awaiting = None;
        let mut s = self.state.lock().expect("heartbeat state");
        if s.health != Health::Alive {
            tracing::info!("guest heartbeat: alive");
        }
        s.health = Health::Alive;
        s.misses = 0;
        s.replies += 1;
        s.last_reply_unix_ms = Some(unix_ms());
    }

    fn miss(&mut self) {
        let mut s = self.state.lock().expect("heartbeat state");
        s.misses = s.misses.saturating_add(1);
        if s.misses >= self.miss_limit && s.health != Health::Unresponsive {
            tracing::warn!(misses = s.misses, "guest heartbeat: unresponsive");
            s.health = Health::Unresponsive;
        }
    }

    fn answered(&mut self, body: &[u8]) -> BodyCheck {
        let Some(sent) = self.awaiting else {
            return Ok(());
        };
        let check = parse_reply(sent, body);
        match check {
            Ok(()) => self.alive(),
            Err(_) => {
                self.awaiting = None;
                self.miss();
            }
        }
        check
    }
}

impl Handler for HeartbeatHandler {
    fn ready(&mut self, _v: Negotiated, now: Instant) {
        self.next_tick = Some(now);
    }

    fn command(&mut self, cmd: Command, _now: Instant) {
        cmd.fail(IcError::InvalidArgument(
            "heartbeat takes no commands".into(),
        ));
    }

    fn poll(&mut self, now: Instant) {
        let Some(tick) = self.next_tick.filter(|t| *t <= now) else {
            return;
        };
        if self.awaiting.is_some() {
            self.miss();
        }
        self.due = true;
        // Skip ticks missed while the worker slept past them.
        let mut next = tick + self.period;
        if next <= now {
            next = now + self.period;
        }
        self.next_tick = Some(next);
    }

    fn next_request(&mut self, now: Instant, body: &mut Vec<u8>) -> Option<Outgoing> {
        if !std::mem::take(&mut self.due) {
            return None;
        }
        self.sequence = self.sequence.wrapping_add(1);
        body.extend_from_slice(request_body(self.sequence).as_bytes());
        self.awaiting = Some(self.sequence);
        self.state.lock().expect("heartbeat state").sequence = self.sequence;
        Some(Outgoing {
            deadline: self.next_tick.unwrap_or(now + self.period),
        })
    }

    fn complete(&mut self, outcome: Result<Reply<'_>, TxError>, _now: Instant) -> BodyCheck {
        match outcome {
            Ok(r) => return self.answered(r.body),
            // Counted at the next tick; a late answer still counts.
            Err(TxError::TimedOut) => {}
            Err(_) => {
                self.awaiting = None;
                self.miss();
            }
        }
        Ok(())
    }

    fn late(&mut self, reply: Reply<'_>, _now: Instant) -> BodyCheck {
        self.answered(reply.body)
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.next_tick
    }

    fn closed(&mut self, _why: &IcError) {
        self.next_tick = None;
        self.awaiting = None;
        let mut s = self.state.lock().expect("heartbeat state");
        s.health = Health::Unknown;
        s.misses = 0;
    }
}
