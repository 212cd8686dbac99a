//! The worker every IC channel runs: one thread that owns the channel's
//! rings, negotiates versions, keeps exactly one request outstanding, and
//! hands replies (or timeouts) to the service's [`Handler`].
//!
//! ```text
//!  IcHandle ── Command ──▶ Inbox ─┐
//!                                 ▼
//!  guest ◀── request ── worker loop: read replies → match txid → validate
//!  guest ─── reply ───▶            → Handler::complete / late
//!                                  timers → Handler::poll / next_request
//!                                  idle → unmask, sleep on doorbell|stop|inbox
//! ```
//!
//! One request at a time: Linux's shutdown driver reads one packet per
//! interrupt and KVP/VSS block on their daemons, so a second request
//! queued behind the first may never be read. A request that times out
//! stays "late": its reply is still taken if it comes, and the next request
//! is sent only once the guest has read the late one out of the ring (so a
//! guest that stopped reading never gets a growing backlog). A guest
//! that never answers, answers wrongly or floods the ring costs only its
//! own channel's state; nothing here blocks or panics on guest input.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmbus::channel::{Channel, spawn_worker};
use vmbus::event::{EventFd, poll_readable};
use vmbus::ring::{IncomingRing, RingError, TRAILER_SIZE, WriteError};
use vmbus::server::{Device, DeviceOffer, OpenError, OpenedChannel};
use vmbus::worker::StopToken;
use vmbus::{Guid, channel::ChannelWorker};

use crate::handle::{Command, IcError};
use crate::message::{
    Negotiated, Reply, ReplyError, SentRequest, encode_request, negotiate_body, parse_negotiate,
    validate_reply,
};
use crate::protocol::{Service, Version, msgtype};

/// Packets read per pass before timers and commands get a turn.
const READ_BATCH: usize = 64;
/// Largest reply copied out of the ring: a correct reply is as long as its
/// request, so anything longer is refused by its length alone.
const REPLY_BUFFER: usize = crate::message::MAX_REQUEST.next_multiple_of(8);
/// Protocol errors logged at warn level per channel; the rest at debug.
const LOUD_ERRORS: u64 = 8;

/// The state of one IC channel, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ChannelStatus {
    /// The guest has not opened the channel (or closed it).
    #[default]
    Offline,
    /// NEGOTIATE sent, waiting for the answer.
    Negotiating,
    /// NEGOTIATE unanswered past the reply timeout (a Linux KVP channel
    /// stays here until hv_kvp_daemon runs); still waiting.
    NoReply,
    /// Versions agreed; requests flow.
    Ready {
        framework: Version,
        message: Version,
    },
    /// Negotiation failed or the guest broke the protocol; no more
    /// requests until the guest opens the channel again.
    Failed { reason: String },
}

/// Channel-level facts of one service.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChannelInfo {
    pub status: ChannelStatus,
    /// Times the guest opened the channel.
    pub opens: u64,
    /// Replies refused and packets nobody asked for.
    pub protocol_errors: u64,
    pub last_error: Option<String>,
}

impl ChannelInfo {
    pub fn negotiated(&self) -> Option<Negotiated> {
        match self.status {
            ChannelStatus::Ready { framework, message } => Some(Negotiated { framework, message }),
            _ => None,
        }
    }
}

/// Why a request did not get a valid answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TxError {
    TimedOut,
    Bad(ReplyError),
    /// The guest's ring had no room (it is not reading).
    RingFull,
}

impl From<TxError> for IcError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::TimedOut => IcError::TimedOut,
            TxError::Bad(e) => IcError::BadReply(e.to_string()),
            TxError::RingFull => IcError::Busy,
        }
    }
}

/// Whether a reply's body passed the service's checks.
pub(crate) type BodyCheck = Result<(), ReplyError>;

/// A request a handler wants sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing {
    /// When the request counts as timed out.
    pub deadline: Instant,
}

/// What a service does on top of the common transport.
pub(crate) trait Handler: Send {
    /// Versions agreed; periodic work may start.
    fn ready(&mut self, versions: Negotiated, now: Instant);
    /// A command from the control handle (only while ready).
    fn command(&mut self, cmd: Command, now: Instant);
    /// Timers: periodic work and expiry of queued commands.
    fn poll(&mut self, now: Instant);
    /// Writes the body of the next request into `body` if one is due.
    fn next_request(&mut self, now: Instant, body: &mut Vec<u8>) -> Option<Outgoing>;
    /// The answer to the request built last. Err: its body was refused
    /// (the caller got the error; the worker counts it).
    fn complete(&mut self, outcome: Result<Reply<'_>, TxError>, now: Instant) -> BodyCheck;
    /// An answer to a request that had already timed out.
    fn late(&mut self, _reply: Reply<'_>, _now: Instant) -> BodyCheck {
        Ok(())
    }
    /// When `poll` wants to run next.
    fn next_wakeup(&self) -> Option<Instant>;
    /// The channel is gone or failed: fail whatever is queued.
    fn closed(&mut self, why: &IcError);
}

/// Commands waiting for a service's worker.
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    wake: EventFd,
}

#[derive(Debug, Default)]
struct InboxState {
    /// A worker is running and will take commands.
    open: bool,
    queue: VecDeque<Command>,
}

/// Commands queued per service at most.
const INBOX_LIMIT: usize = 64;

impl Inbox {
    pub fn new() -> std::io::Result<Self> {
        Ok(Inbox {
            state: Mutex::new(InboxState::default()),
            wake: EventFd::new()?,
        })
    }

    /// Queues a command for the running worker; without one, or when the
    /// queue is full, fails it at once.
    pub fn submit(&self, cmd: Command) {
        let mut s = self.state.lock().expect("inbox");
        if !s.open {
            drop(s);
            return cmd.fail(IcError::NotConnected);
        }
        if s.queue.len() >= INBOX_LIMIT {
            drop(s);
            return cmd.fail(IcError::Busy);
        }
        s.queue.push_back(cmd);
        drop(s);
        self.wake.signal();
    }

    /// Claims the inbox for a new worker; false if one already runs.
    fn claim(&self) -> bool {
        let mut s = self.state.lock().expect("inbox");
        !std::mem::replace(&mut s.open, true)
    }

    fn take(&self) -> Option<Command> {
        self.state.lock().expect("inbox").queue.pop_front()
    }

    /// The worker is gone: fails what it left.
    fn release(&self) {
        let left: Vec<Command> = {
            let mut s = self.state.lock().expect("inbox");
            s.open = false;
            s.queue.drain(..).collect()
        };
        for c in left {
            c.fail(IcError::NotConnected);
        }
    }
}

/// The parts of a service shared by its device, its worker and the handle.
#[derive(Debug)]
pub(crate) struct Core {
    pub service: Service,
    pub inbox: Inbox,
    pub info: Mutex<ChannelInfo>,
}

impl Core {
    pub fn new(service: Service) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Core {
            service,
            inbox: Inbox::new()?,
            info: Mutex::new(ChannelInfo::default()),
        }))
    }

    pub fn info(&self) -> ChannelInfo {
        self.info.lock().expect("channel info").clone()
    }

    fn set_status(&self, status: ChannelStatus) {
        self.info.lock().expect("channel info").status = status;
    }

    fn protocol_error(&self, what: &str) {
        let mut info = self.info.lock().expect("channel info");
        info.protocol_errors += 1;
        info.last_error = Some(what.to_string());
        let n = info.protocol_errors;
        drop(info);
        if n <= LOUD_ERRORS {
            tracing::warn!(service = %self.service, "guest protocol error: {what}");
        } else {
            tracing::debug!(service = %self.service, "guest protocol error: {what}");
        }
    }
}

/// Builds a fresh handler for each opening of the channel.
pub(crate) type HandlerFactory = Arc<dyn Fn() -> Box<dyn Handler> + Send + Sync>;

/// One IC as a VMBus device.
pub(crate) struct IcDevice {
    pub core: Arc<Core>,
    pub instance: Guid,
    pub name: String,
    pub reply_timeout: Duration,
    pub factory: HandlerFactory,
}

impl std::fmt::Debug for IcDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IcDevice")
            .field("service", &self.core.service)
            .field("instance", &self.instance)
            .finish()
    }
}

impl Device for IcDevice {
    fn offer(&self) -> DeviceOffer {
        let service = self.core.service;
        DeviceOffer::new(
            &format!("ic-{service}-{}", self.name),
            service.interface(),
            self.instance,
        )
    }

    fn open(&self, ch: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        if ch.subchannel_index != 0 {
            return Err(OpenError::Device(
                "integration services have no sub-channels".into(),
            ));
        }
        if !self.core.inbox.claim() {
            return Err(OpenError::Device(
                format!(
                    "{} is already open on another connection",
                    self.core.service
                )
                .into(),
            ));
        }
        let core = self.core.clone();
        let handler = (self.factory)();
        let reply_timeout = self.reply_timeout;
        // Linux keeps 15 bytes of a thread name: service, then guest.
        let name = format!("ic-{}-{}", self.core.service, self.name);
        let spawned = spawn_worker(name, vmbus::ThreadKind::DeviceWorker, move |stop| {
            let control = ch.control.clone();
            let (channel, _) = ch.into_channel(stop);
            let mut w = Worker::new(channel, core.clone(), handler, reply_timeout);
            if let Err(e) = w.run() {
                tracing::warn!(service = %core.service, "resetting channel: {e}");
                core.info.lock().expect("channel info").last_error = Some(e.to_string());
                control.reset(e.to_string());
            }
            w.finish();
        });
        spawned.map_err(|e| {
            self.core.inbox.release();
            OpenError::Worker(e)
        })
    }
}

/// Why a worker gave its channel up (the channel is then reset).
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    #[error(transparent)]
    Ring(#[from] RingError),
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    sent: SentRequest,
    /// None once a NEGOTIATE has timed out: then it waits indefinitely.
    deadline: Option<Instant>,
    negotiate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Negotiating,
    Ready,
    Failed,
}

/// A worker's whole state.
pub(crate) struct Worker {
    ch: Channel,
    core: Arc<Core>,
    handler: Box<dyn Handler>,
    reply_timeout: Duration,
    phase: Phase,
    versions: (Version, Version),
    next_txid: u64,
    pending: Option<Pending>,
    /// A request that timed out and may still be answered.
    late: Option<SentRequest>,
    /// A late request given up for a newer one: its answer is dropped.
    stale: Option<u64>,
    body: Vec<u8>,
    out: Vec<u8>,
    reply: Vec<u8>,
}

impl Worker {
    fn new(
        ch: Channel,
        core: Arc<Core>,
        handler: Box<dyn Handler>,
        reply_timeout: Duration,
    ) -> Self {
        Worker {
            ch,
            core,
            handler,
            reply_timeout,
            phase: Phase::Negotiating,
            versions: (Version::new(0, 0), Version::new(0, 0)),
            next_txid: 1,
            pending: None,
            late: None,
            stale: None,
            body: Vec::with_capacity(crate::message::MAX_REQUEST),
            out: Vec::with_capacity(crate::message::MAX_REQUEST),
            reply: vec![0; REPLY_BUFFER],
        }
    }

    fn stop(&self) -> &StopToken {
        self.ch.stop_token()
    }

    fn run(&mut self) -> Result<(), WorkerError> {
        {
            let mut info = self.core.info.lock().expect("channel info");
            info.opens += 1;
            info.status = ChannelStatus::Negotiating;
        }
        self.send_negotiate(Instant::now())?;
        loop {
            let now = Instant::now();
            let more = self.read_replies(now)?;
            self.take_commands(now);
            self.check_timeout(now);
            if self.phase == Phase::Ready {
                self.handler.poll(now);
                self.send_next(now)?;
            }
            if self.stop().is_stopped() {
                return Ok(());
            }
            if !more {
                self.sleep()?;
            }
        }
    }

    /// The worker is ending: report the channel offline and fail what waits.
    fn finish(&mut self) {
        self.core.set_status(ChannelStatus::Offline);
        self.core.inbox.release();
        self.handler.closed(&IcError::NotConnected);
    }

    fn txid(&mut self) -> u64 {
        let t = self.next_txid;
        self.next_txid += 1;
        t
    }

    fn send_negotiate(&mut self, now: Instant) -> Result<(), WorkerError> {
        let body = negotiate_body(self.core.service);
        let sent = self.sent_request(msgtype::NEGOTIATE, body.len());
        encode_request(
            &mut self.out,
            &sent,
            (Version::new(0, 0), Version::new(0, 0)),
            &body,
        );
        if self.write(&sent)? {
            self.pending = Some(Pending {
                sent,
                deadline: Some(now + self.reply_timeout),
                negotiate: true,
            });
        } else {
            self.fail_channel("no room in the guest's ring for NEGOTIATE".into());
        }
        Ok(())
    }

    fn sent_request(&mut self, kind: u16, body_len: usize) -> SentRequest {
        let txid = self.txid();
        SentRequest {
            txid,
            ic_txid: txid as u8,
            msgtype: kind,
            body_len: body_len as u16,
        }
    }

    /// Writes `self.out` as an in-band packet; false if the ring is full.
    fn write(&mut self, sent: &SentRequest) -> Result<bool, WorkerError> {
        match self.ch.outgoing.write_inband(sent.txid, false, &self.out) {
            Ok(()) => {
                self.ch.flush()?;
                Ok(true)
            }
            Err(WriteError::Full { .. }) => Ok(false),
            Err(WriteError::Ring(e)) => Err(e.into()),
        }
    }

    /// Reads up to a batch of packets; true if more may be waiting.
    fn read_replies(&mut self, now: Instant) -> Result<bool, WorkerError> {
        let mut n = 0;
        while n < READ_BATCH {
            let Some((packet, txid, len)) = read_packet(&mut self.ch.incoming, &mut self.reply)?
            else {
                break;
            };
            n += 1;
            self.dispatch(packet, txid, len, now);
        }
        self.ch.flush()?;
        Ok(n == READ_BATCH)
    }

    fn dispatch(&mut self, packet: u16, txid: u64, len: usize, now: Instant) {
        let payload = &self.reply[..len.min(REPLY_BUFFER)];
        let check = |sent: &SentRequest| -> Result<Reply<'_>, ReplyError> {
            if len > REPLY_BUFFER {
                return Err(ReplyError::Length {
                    got: len,
                    want: sent.reply_len(),
                });
            }
            validate_reply(sent, packet, txid, payload)
        };
        if let Some(p) = self.pending.filter(|p| p.sent.txid == txid) {
            self.pending = None;
            let result = check(&p.sent);
            if let Err(e) = &result {
                self.core.protocol_error(&e.to_string());
            }
            if p.negotiate {
                let outcome = result.map_err(|e| e.to_string()).and_then(|r| {
                    parse_negotiate(self.core.service, r.body).map_err(|e| e.to_string())
                });
                match outcome {
                    Ok(v) => self.negotiated(v, now),
                    Err(reason) => self.fail_channel(reason),
                }
            } else if let Err(e) = self.handler.complete(result.map_err(TxError::Bad), now) {
                self.core.protocol_error(&e.to_string());
            }
        } else if let Some(sent) = self.late.filter(|s| s.txid == txid) {
            self.late = None;
            if let Err(e) = check(&sent).and_then(|r| self.handler.late(r, now)) {
                self.core.protocol_error(&e.to_string());
            }
        } else if self.stale == Some(txid) {
            self.stale = None;
            tracing::debug!(service = %self.core.service, txid, "answer to a superseded request dropped");
        } else {
            self.core.protocol_error(&format!(
                "unexpected packet (type {packet}, transaction {txid}, {len} bytes)"
            ));
        }
    }

    fn negotiated(&mut self, v: Negotiated, now: Instant) {
        tracing::info!(
            service = %self.core.service,
            "IC negotiated: framework {}, message {}",
            v.framework,
            v.message
        );
        self.versions = (v.framework, v.message);
        self.phase = Phase::Ready;
        self.core.set_status(ChannelStatus::Ready {
            framework: v.framework,
            message: v.message,
        });
        self.handler.ready(v, now);
    }

    fn fail_channel(&mut self, reason: String) {
        tracing::warn!(service = %self.core.service, "IC channel failed: {reason}");
        self.phase = Phase::Failed;
        self.pending = None;
        self.late = None;
        {
            let mut info = self.core.info.lock().expect("channel info");
            info.last_error = Some(reason.clone());
            info.status = ChannelStatus::Failed {
                reason: reason.clone(),
            };
        }
        self.handler.closed(&IcError::Failed(reason));
    }

    fn take_commands(&mut self, now: Instant) {
        while let Some(cmd) = self.core.inbox.take() {
            match self.phase {
                Phase::Ready => self.handler.command(cmd, now),
                Phase::Negotiating => cmd.fail(IcError::NotReady),
                Phase::Failed => {
                    let reason = match &self.core.info().status {
                        ChannelStatus::Failed { reason } => reason.clone(),
                        _ => "channel failed".into(),
                    };
                    cmd.fail(IcError::Failed(reason))
                }
            }
        }
    }

    fn check_timeout(&mut self, now: Instant) {
        let Some(mut p) = self
            .pending
            .filter(|p| p.deadline.is_some_and(|d| now >= d))
        else {
            return;
        };
        if p.negotiate {
            // Keep waiting (a KVP guest answers once its daemon runs); say so.
            tracing::info!(service = %self.core.service, "no answer to NEGOTIATE yet");
            self.core.set_status(ChannelStatus::NoReply);
            p.deadline = None;
            self.pending = Some(p);
            return;
        }
        self.pending = None;
        self.late = Some(p.sent);
        // No body to check: nothing to count.
        let _ = self.handler.complete(Err(TxError::TimedOut), now);
    }

    fn send_next(&mut self, now: Instant) -> Result<(), WorkerError> {
        if self.pending.is_some() {
            return Ok(());
        }
        if self.late.is_some() && !self.guest_read_all()? {
            return Ok(()); // the guest has not even read the late request
        }
        self.body.clear();
        let Some(out) = self.handler.next_request(now, &mut self.body) else {
            return Ok(());
        };
        if let Some(late) = self.late.take() {
            self.stale = Some(late.txid);
        }
        let sent = self.sent_request(self.core.service.msgtype(), self.body.len());
        encode_request(&mut self.out, &sent, self.versions, &self.body);
        if self.write(&sent)? {
            self.pending = Some(Pending {
                sent,
                deadline: Some(out.deadline),
                negotiate: false,
            });
        } else {
            let _ = self.handler.complete(Err(TxError::RingFull), now);
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.and_then(|p| p.deadline);
        let handler = (self.phase == Phase::Ready)
            .then(|| self.handler.next_wakeup())
            .flatten();
        [pending, handler].into_iter().flatten().min()
    }

    /// True once the guest has read everything we sent. Otherwise asks it
    /// (pending_send_sz = the whole ring) to signal when it has, so the
    /// worker can sleep instead of polling.
    fn guest_read_all(&mut self) -> Result<bool, WorkerError> {
        let all = self.ch.outgoing.memory().size() - TRAILER_SIZE as u32;
        Ok(self.ch.outgoing.request_space(all)?)
    }

    fn sleep(&mut self) -> Result<(), WorkerError> {
        if !self.ch.prepare_sleep()? {
            return Ok(());
        }
        let timeout = self
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        if timeout != Some(Duration::ZERO) {
            let fds = [
                self.ch.doorbell().as_fd(),
                self.stop().event().as_fd(),
                self.core.inbox.wake.as_fd(),
            ];
            poll_readable(fds, timeout);
        }
        self.core.inbox.wake.consume();
        self.ch.woke();
        Ok(())
    }
}

/// Copies the next packet's payload into `buf` (as much as fits); returns
/// its type, transaction id and full payload length.
fn read_packet(
    ring: &mut IncomingRing,
    buf: &mut [u8],
) -> Result<Option<(u16, u64, usize)>, RingError> {
    let Some(p) = ring.read()? else {
        return Ok(None);
    };
    let payload = p.payload();
    let n = payload.len().min(buf.len());
    payload
        .read_at(0, &mut buf[..n])
        .expect("within the payload");
    Ok(Some((
        p.desc.packet_type,
        p.desc.transaction_id,
        payload.len(),
    )))
}
