//! The guest side of the integration services, written once over
//! `vmbus::vsc` (like the storvsc and netvsc clients): it runs in hosted
//! clients and in the VMM's test guest.
//!
//! [`GuestIc::answer`] is a model of Linux 6.1's hv_utils for one channel:
//! the same version lists in the same preference order
//! (`vmbus_prep_negotiate_resp`), replies written into the received
//! buffer (same length, the payload rounded up to 8), flags
//! TRANSACTION|RESPONSE, the VMBus transaction id echoed, a status set by
//! the service, and nothing sent where Linux sends nothing (short bodies,
//! KVP/VSS messages of unknown type, KVP without hv_kvp_daemon). KVP and
//! VSS answer as the kernel does with its daemon (hv_kvp_daemon's pools and
//! Auto pool, hv_vss_daemon's freeze/thaw) when `daemon` is on.
//!
//! Tests make it misbehave through [`GuestIc::tamper`] (edit, redirect or
//! drop each reply) and by not serving (a hung guest).
//!
//! Not modelled: Linux's shutdown driver reads one packet per channel
//! interrupt (here every queued packet is served; the host never queues
//! two), and the daemons' delays (KVP up to 30 s, FREEZE up to 15 min).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus::channel::Wait;
use vmbus::ring::{RingError, WriteError};
use vmbus::vsc::{BusError, Offer, VscBus, VscChannel};
use vmbus::wire::packet_type;
use zerocopy::{FromBytes, IntoBytes};

use crate::message::{Negotiated, linux_negotiate};
use crate::protocol::{
    BODY_OFFSET, KVP_MAX_KEY_SIZE, KVP_MAX_VALUE_SIZE, KvpEnumerateMessage, KvpSetMessage, Service,
    ShutdownMessage, TimesyncV3, TimesyncV4, VSS_HBU_NO_AUTO_RECOVERY, Version, VssMessage,
    icflags, kvp_op, msgtype, reg_type, status, vss_op,
};
use crate::utf16;

/// Ring pages Linux opens each IC channel with, per direction:
/// VMBUS_RING_SIZE(3 × 4096) = the control page and 12 KiB of data.
pub const RING_PAGES: u64 = 4;

/// Guest-side failures.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("VMBus: {0}")]
    Bus(BusError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("no room in the host's ring for the reply")]
    RingFull,
}

impl From<BusError> for GuestError {
    fn from(e: BusError) -> Self {
        GuestError::Bus(e)
    }
}

/// Opens an IC channel as Linux's `util_probe` does (16 KiB rings).
pub fn open<B: VscBus>(bus: &mut B, offer: &Offer) -> Result<B::Channel, GuestError> {
    Ok(bus.open_channel(offer, RING_PAGES, RING_PAGES)?)
}

/// A reply about to be sent; a tamper hook may change any of it.
#[derive(Debug, Clone)]
pub struct ReplyPacket {
    /// `icmsgtype` of the request.
    pub msgtype: u16,
    pub txid: u64,
    pub payload: Vec<u8>,
    /// False: send nothing (a guest that never answers).
    pub send: bool,
}

/// A reply hook.
pub type Tamper = Box<dyn FnMut(&mut ReplyPacket) + Send>;

/// What serving one packet did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// Nothing arrived (or the guest does not read this channel).
    Idle,
    /// A request of this type was answered.
    Answered(u16),
    /// A request of this type was read and not answered.
    Dropped(u16),
}

/// A time message as the guest received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedTime {
    pub flags: u8,
    pub parent_time: u64,
    pub reference_time: u64,
    /// When the guest read it.
    pub at: Instant,
}

/// What hv_kvp_daemon generates for the Auto pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoInfo {
    pub fqdn: String,
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
    pub os_build: String,
    pub os_name: String,
    pub os_major: String,
    pub os_minor: String,
    pub os_version: String,
    pub processor_architecture: String,
}

impl Default for AutoInfo {
    fn default() -> Self {
        AutoInfo {
            fqdn: "guest.localdomain".into(),
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            os_build: "6.1.0".into(),
            os_name: "Linux".into(),
            os_major: "6".into(),
            os_minor: "1".into(),
            os_version: "6.1.0".into(),
            processor_architecture: "x86_64".into(),
        }
    }
}

impl AutoInfo {
    /// The daemon's Auto pool, in its index order.
    pub fn entries(&self) -> Vec<(String, String)> {
        [
            ("FullyQualifiedDomainName", self.fqdn.clone()),
            ("IntegrationServicesVersion", "3.1".to_string()),
            ("NetworkAddressIPv4", self.ipv4.join(";")),
            ("NetworkAddressIPv6", self.ipv6.join(";")),
            ("OSBuildNumber", self.os_build.clone()),
            ("OSName", self.os_name.clone()),
            ("OSMajorVersion", self.os_major.clone()),
            ("OSMinorVersion", self.os_minor.clone()),
            ("OSVersion", self.os_version.clone()),
            ("ProcessorArchitecture", self.processor_architecture.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Linux's per-service state and what the guest observed.
#[derive(Debug, Default)]
pub struct Observed {
    /// Shutdown flags received (answered or not).
    pub shutdowns: Vec<u32>,
    /// Time messages received (the last 1024).
    pub times: Vec<ReceivedTime>,
    pub heartbeats: u64,
    /// VSS operations received.
    pub vss_ops: Vec<u8>,
    /// Requests answered.
    pub answered: u64,
}

/// One IC channel's guest: Linux hv_utils' behaviour plus observations.
pub struct GuestIc {
    pub service: Service,
    /// Linux's packed negotiated message version (`*_srv_version`).
    pub srv_version: u32,
    pub negotiated: Option<Negotiated>,
    /// Shutdown: whether the guest can hibernate (ACPI S4).
    pub hibernation_supported: bool,
    /// KVP/VSS: whether the user-space daemon runs.
    pub daemon: bool,
    /// VSS: the daemon fails FREEZE.
    pub fail_freeze: bool,
    pub frozen: bool,
    /// KVP pools 0..=4 as hv_kvp_daemon keeps them (UTF-8 key, value).
    pub pools: [Vec<(String, String)>; 5],
    pub auto: AutoInfo,
    pub observed: Observed,
    pub tamper: Option<Tamper>,
}

impl std::fmt::Debug for GuestIc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIc")
            .field("service", &self.service)
            .field("negotiated", &self.negotiated)
            .field("observed", &self.observed)
            .finish_non_exhaustive()
    }
}

impl GuestIc {
    /// A well-behaved Linux guest with its daemons running.
    pub fn new(service: Service) -> Self {
        GuestIc {
            service,
            srv_version: 0,
            negotiated: None,
            hibernation_supported: false,
            daemon: true,
            fail_freeze: false,
            frozen: false,
            pools: Default::default(),
            auto: AutoInfo::default(),
            observed: Observed::default(),
            tamper: None,
        }
    }

    /// Whether Linux reads the ring at all (KVP waits for its daemon).
    pub fn reads_ring(&self) -> bool {
        self.service != Service::Kvp || self.daemon
    }

    /// Linux's answer to one request payload (as received, padding
    /// included), or None where Linux sends nothing.
    pub fn answer(&mut self, request: &[u8]) -> Option<Vec<u8>> {
        let mut buf = request.to_vec();
        if buf.len() < BODY_OFFSET {
            return None;
        }
        let kind = u16::from_le_bytes([buf[12], buf[13]]);
        let status = if kind == msgtype::NEGOTIATE {
            self.negotiate(&mut buf);
            None
        } else if kind == self.service.msgtype() {
            Some(self.service_message(&mut buf)?)
        } else {
            match self.service {
                // KVP and VSS log and drop unknown types.
                Service::Kvp | Service::Vss => return None,
                _ => Some(status::E_FAIL),
            }
        };
        if let Some(s) = status {
            buf[20..24].copy_from_slice(&s.to_le_bytes());
        }
        buf[BODY_OFFSET - 3] = icflags::GUEST_RESPONSE;
        self.observed.answered += 1;
        Some(buf)
    }

    fn negotiate(&mut self, buf: &mut [u8]) {
        let s = self.service;
        let chosen = linux_negotiate(buf, s.linux_frameworks(), s.linux_messages());
        // Linux stores the message slot's value whether or not it matched.
        if let Some(slot) = buf.get(BODY_OFFSET + 12..BODY_OFFSET + 16) {
            let v = Version::read_from_bytes(slot).expect("4 bytes");
            self.srv_version = v.packed();
        }
        self.negotiated = chosen;
    }

    /// A message of the service's own type; returns its status.
    fn service_message(&mut self, buf: &mut [u8]) -> Option<u32> {
        let body_len = buf.len() - BODY_OFFSET;
        match self.service {
            Service::Shutdown => {
                let (m, _) = ShutdownMessage::read_from_prefix(&buf[BODY_OFFSET..]).ok()?;
                let flags = m.flags.get();
                self.observed.shutdowns.push(flags);
                Some(match flags {
                    0..=3 => status::S_OK,
                    4 | 5 if self.hibernation_supported => status::S_OK,
                    _ => status::E_FAIL,
                })
            }
            Service::TimeSync => {
                let body = &buf[BODY_OFFSET..];
                let t = if self.srv_version > Version::new(3, 0).packed() {
                    let (m, _) = TimesyncV4::read_from_prefix(body).ok()?;
                    (m.flags, m.parent_time.get(), m.reference_time.get())
                } else {
                    let (m, _) = TimesyncV3::read_from_prefix(body).ok()?;
                    (m.flags, m.parent_time.get(), 0)
                };
                let times = &mut self.observed.times;
                if times.len() >= 1024 {
                    times.remove(0);
                }
                times.push(ReceivedTime {
                    flags: t.0,
                    parent_time: t.1,
                    reference_time: t.2,
                    at: Instant::now(),
                });
                // Status left as the host sent it.
                Some(u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes")))
            }
            Service::Heartbeat => {
                let body = buf.get_mut(BODY_OFFSET..BODY_OFFSET + 8)?;
                let seq = u64::from_le_bytes(body.try_into().expect("8 bytes"));
                body.copy_from_slice(&seq.wrapping_add(1).to_le_bytes());
                self.observed.heartbeats += 1;
                Some(u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes")))
            }
            Service::Kvp if body_len >= 4 => Some(self.kvp(&mut buf[BODY_OFFSET..])),
            Service::Kvp => None,
            Service::Vss => {
                let body = buf.get_mut(BODY_OFFSET..)?;
                let (mut m, _) = VssMessage::read_from_prefix(body).ok()?;
                self.observed.vss_ops.push(m.operation);
                let st = self.vss(&mut m);
                body[..12].copy_from_slice(m.as_bytes());
                Some(st)
            }
        }
    }

    fn vss(&mut self, m: &mut VssMessage) -> u32 {
        match m.operation {
            vss_op::FREEZE | vss_op::THAW | vss_op::HOT_BACKUP if !self.daemon => status::E_FAIL,
            vss_op::FREEZE if self.fail_freeze => status::E_FAIL,
            vss_op::FREEZE => {
                self.frozen = true;
                status::S_OK
            }
            vss_op::THAW => {
                self.frozen = false;
                status::S_OK
            }
            vss_op::HOT_BACKUP => {
                m.flags = VSS_HBU_NO_AUTO_RECOVERY.into();
                status::S_OK
            }
            vss_op::GET_DM_INFO => {
                m.flags = 0.into();
                status::S_OK
            }
            _ => status::S_OK,
        }
    }

    /// The kernel plus hv_kvp_daemon on a KVP body (edited in place).
    fn kvp(&mut self, body: &mut [u8]) -> u32 {
        let (op, pool) = (body[0], body[1] as usize);
        if pool >= self.pools.len() {
            // The daemon indexes its pools unchecked; refuse instead.
            return status::E_FAIL;
        }
        // The kernel reads its union from a 16 KiB buffer: pad the view.
        let mut msg = vec![0u8; body.len().max(size_of::<KvpEnumerateMessage>())];
        msg[..body.len()].copy_from_slice(body);
        match op {
            kvp_op::SET => self.kvp_set(&msg, pool),
            kvp_op::DELETE => self.kvp_delete(&msg, pool),
            kvp_op::ENUMERATE => self.kvp_enumerate(body, &msg, pool),
            kvp_op::GET => self.kvp_get(&msg, pool),
            _ => status::E_FAIL, // no adapter matches: GET/SET_IP_INFO fail
        }
    }

    fn kvp_set(&mut self, msg: &[u8], pool: usize) -> u32 {
        let (m, _) = KvpSetMessage::read_from_prefix(msg).expect("padded to size");
        let d = &m.data;
        let key_area = &msg[16..];
        let key = utf16::linux_to_utf8(key_area, d.key_size.get() as usize, KVP_MAX_KEY_SIZE - 1);
        let value = match d.value_type.get() {
            reg_type::SZ => utf16::linux_to_utf8(
                &msg[528..],
                d.value_size.get() as usize,
                KVP_MAX_VALUE_SIZE - 1,
            ),
            reg_type::U32 => u32::from_le_bytes(d.value[..4].try_into().expect("4")).to_string(),
            reg_type::U64 => u64::from_le_bytes(d.value[..8].try_into().expect("8")).to_string(),
            _ => String::new(),
        };
        let entries = &mut self.pools[pool];
        match entries.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = value,
            None => entries.push((key, value)),
        }
        status::S_OK
    }

    fn kvp_delete(&mut self, msg: &[u8], pool: usize) -> u32 {
        let size = u32::from_le_bytes(msg[4..8].try_into().expect("4")) as usize;
        let key = utf16::linux_to_utf8(&msg[8..], size, KVP_MAX_KEY_SIZE - 1);
        let entries = &mut self.pools[pool];
        match entries.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                entries.remove(i);
                status::S_OK
            }
            None => status::S_CONT,
        }
    }

    fn kvp_get(&mut self, msg: &[u8], pool: usize) -> u32 {
        let size = u32::from_le_bytes(msg[8..12].try_into().expect("4")) as usize;
        let key = utf16::linux_to_utf8(&msg[16..], size, KVP_MAX_KEY_SIZE - 1);
        // GET returns no value in practice (see ic.md §6.3).
        if self.pools[pool].iter().any(|(k, _)| *k == key) {
            status::S_OK
        } else {
            status::S_CONT
        }
    }

    fn kvp_enumerate(&mut self, body: &mut [u8], msg: &[u8], pool: usize) -> u32 {
        let index = u32::from_le_bytes(msg[4..8].try_into().expect("4")) as usize;
        let entry = if pool == 2 {
            self.auto.entries().into_iter().nth(index)
        } else {
            self.pools[pool].get(index).cloned()
        };
        let Some((key, value)) = entry else {
            return status::S_CONT;
        };
        // kvp_respond_to_host writes into the request buffer as far as it
        // reaches; the host sent the full 2580 bytes.
        let mut m = KvpEnumerateMessage::read_from_bytes(&msg[..size_of::<KvpEnumerateMessage>()])
            .expect("sized");
        let keylen = utf16::linux_from_utf8(&key, &mut m.data.key, KVP_MAX_KEY_SIZE / 2 - 2);
        m.data.key_size = (2 * (keylen as u32 + 1)).into();
        let valuelen =
            utf16::linux_from_utf8(&value, &mut m.data.value, KVP_MAX_VALUE_SIZE / 2 - 2);
        m.data.value_size = (2 * (valuelen as u32 + 1)).into();
        m.data.value_type = reg_type::SZ.into();
        let n = body.len();
        body.copy_from_slice(&m.as_bytes()[..n]);
        status::S_OK
    }

    /// Reads one packet if there is one and answers it.
    pub fn serve_ready<C: VscChannel>(&mut self, ch: &mut C) -> Result<Served, GuestError> {
        if !self.reads_ring() {
            return Ok(Served::Idle);
        }
        let Some(p) = ch.incoming().read()? else {
            return Ok(Served::Idle);
        };
        let txid = p.desc.transaction_id;
        let payload = p.payload();
        let mut request = vec![0u8; payload.len()];
        payload.read_at(0, &mut request).expect("within payload");
        let inband = p.desc.packet_type == packet_type::DATA_INBAND;
        let kind = request
            .get(12..14)
            .map_or(u16::MAX, |b| u16::from_le_bytes([b[0], b[1]]));
        let reply = if inband { self.answer(&request) } else { None };
        let Some(payload) = reply else {
            ch.flush()?;
            return Ok(Served::Dropped(kind));
        };
        let mut packet = ReplyPacket {
            msgtype: kind,
            txid,
            payload,
            send: true,
        };
        if let Some(t) = self.tamper.as_mut() {
            t(&mut packet);
        }
        if !packet.send {
            ch.flush()?;
            return Ok(Served::Dropped(kind));
        }
        match ch.outgoing().write_packet(
            packet_type::DATA_INBAND,
            0,
            packet.txid,
            &[],
            &packet.payload,
        ) {
            Ok(()) => {}
            Err(WriteError::Full { .. }) => return Err(GuestError::RingFull),
            Err(WriteError::Ring(e)) => return Err(e.into()),
        }
        ch.flush()?;
        Ok(Served::Answered(kind))
    }

    /// Waits up to `timeout` for a request and answers it.
    pub fn serve_one<C: VscChannel>(
        &mut self,
        ch: &mut C,
        timeout: Duration,
    ) -> Result<Served, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let served = self.serve_ready(ch)?;
            if served != Served::Idle || !self.reads_ring() {
                return Ok(served);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || ch.wait(left)? == Wait::Stopped {
                return Ok(Served::Idle);
            }
        }
    }
}

/// A guest channel served on its own thread until stopped: what a hosted
/// client runs for each IC it opened. The model is shared so tests can
/// read observations and change behaviour while it runs.
#[derive(Debug)]
pub struct GuestRunner {
    pub ic: Arc<Mutex<GuestIc>>,
    /// True: the guest stops reading its ring (a hung guest).
    pub paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl GuestRunner {
    pub fn spawn<C: VscChannel + Send + 'static>(mut ch: C, ic: GuestIc) -> Self {
        let ic = Arc::new(Mutex::new(ic));
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, p, s) = (ic.clone(), paused.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ic-guest".into())
            .spawn(move || -> Result<(), String> {
                while !s.load(Ordering::Acquire) {
                    if p.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let served = m.lock().expect("guest ic").serve_ready(&mut ch);
                    match served.map_err(|e| e.to_string())? {
                        Served::Idle => {
                            ch.wait(Duration::from_millis(20))
                                .map_err(|e| e.to_string())?;
                        }
                        _ => continue,
                    }
                }
                Ok(())
            })
            .expect("spawn guest thread");
        GuestRunner {
            ic,
            paused,
            stop,
            thread: Some(thread),
        }
    }

    /// Runs `f` on the guest model.
    pub fn with<T>(&self, f: impl FnOnce(&mut GuestIc) -> T) -> T {
        f(&mut self.ic.lock().expect("guest ic"))
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
    }

    /// Stops the thread; returns the error that ended it early, if any.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Release);
        self.thread.take().map_or(Ok(()), |t| {
            t.join().unwrap_or(Err("guest thread panicked".into()))
        })
    }
}

impl Drop for GuestRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{SentRequest, encode_request, negotiate_body};

    fn request(service: Service, kind: u16, body: &[u8]) -> Vec<u8> {
        let sent = SentRequest {
            txid: 1,
            ic_txid: 1,
            msgtype: kind,
            body_len: body.len() as u16,
        };
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &sent,
            (Version::new(3, 0), service.host_messages()[0]),
            body,
        );
        out.resize(sent.reply_len(), 0);
        out
    }

    #[test]
    fn short_and_unknown_messages() {
        let mut g = GuestIc::new(Service::Heartbeat);
        assert_eq!(g.answer(&[0; 20]), None);
        let short = request(Service::Heartbeat, msgtype::HEARTBEAT, &[1, 2, 3, 4]);
        assert_eq!(g.answer(&short), None, "body shorter than seq_num");
        let other = request(Service::Heartbeat, msgtype::SHUTDOWN, &[0; 8]);
        let r = g.answer(&other).unwrap();
        assert_eq!(&r[20..24], &status::E_FAIL.to_le_bytes());
        assert_eq!(r[25], 5);
        let mut kvp = GuestIc::new(Service::Kvp);
        assert_eq!(
            kvp.answer(&request(Service::Kvp, msgtype::SHUTDOWN, &[0; 8])),
            None
        );
    }

    #[test]
    fn timesync_layout_follows_the_negotiated_version() {
        let mut g = GuestIc::new(Service::TimeSync);
        let nego = request(
            Service::TimeSync,
            msgtype::NEGOTIATE,
            &negotiate_body(Service::TimeSync),
        );
        g.answer(&nego).unwrap();
        assert_eq!(g.srv_version, 0x0004_0000);
        let v4 = crate::timesync::request_body(Version::new(4, 0), 1, 1000, 77);
        g.answer(&request(Service::TimeSync, msgtype::TIMESYNC, &v4))
            .unwrap();
        let t = g.observed.times[0];
        assert_eq!((t.flags, t.parent_time, t.reference_time), (1, 1000, 77));
    }
}
