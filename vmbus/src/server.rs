//! The host side of the VMBus channel-management protocol.
//!
//! [`ChannelServer`] is a state machine over channel messages exactly as a
//! Linux guest sends them: version negotiation, offers, GPADLs, open/close,
//! sub-channels, rescind and unload. It knows nothing about how messages and
//! signals travel: a [`Transport`] sends messages and produces the signals of
//! each opened channel (hosted mode: a Unix socket with passed fds; the VMM:
//! the SynIC). One server serves one peer (a guest or a client process);
//! whatever that peer does wrong costs only its own channels.
//!
//! Devices (VSPs) live in a shared [`Registry`]. When a peer opens a channel
//! the device gets an [`OpenedChannel`] (rings mapped, signals wired) and
//! returns a running [`ChannelWorker`]; the server stops that worker before
//! the rings' memory can be released (close, rescind, unload, disconnect).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use zerocopy::{FromBytes, IntoBytes};

use crate::channel::{Channel, ChannelWorker};
use crate::event::{EventFd, Notify};
use crate::gpadl::{Gpadl, GpadlBuilder, GpadlError};
use crate::guid::Guid;
use crate::memory::{MemoryError, SharedMemory};
use crate::ring::{IncomingRing, OutgoingRing, RingError, RingMemory};
use crate::stats::{ChannelInfo, ChannelStats, ChannelStatsList};
use crate::wire::{
    self, ChannelOffer, GpadlCreated, GpadlTeardown, GpadlTorndown, InitiateContact,
    MAX_CHANNEL_RELIDS, MAX_MESSAGE_SIZE, MessageHeader, ModifyChannel, ModifyChannelResponse,
    OfferChannel, OpenChannel, OpenResult, RelidMessage, USER_DEFINED_BYTES, VersionResponse,
    connection_id, msgtype, version,
};
use crate::worker::{StopToken, lock};

/// Versions vspa accepts, newest first (6.0 adds confidential VMBus, which
/// vspa does not offer; a guest asking for it falls back to 5.3).
pub const SUPPORTED_VERSIONS: [u32; 8] = [
    version::WIN10_V5_3,
    version::WIN10_V5_2,
    version::WIN10_V5_1,
    version::WIN10_V5,
    version::WIN10_V4_1,
    version::WIN10,
    version::WIN8_1,
    version::WIN8,
];

/// NTSTATUS STATUS_UNSUCCESSFUL, the failure status of open and GPADL replies.
const STATUS_UNSUCCESSFUL: u32 = 0xC000_0001;

/// What a device offers.
#[derive(Debug, Clone)]
pub struct DeviceOffer {
    pub interface: Guid,
    pub instance: Guid,
    pub mmio_megabytes: u16,
    pub channel_flags: u16,
    pub user_defined: [u8; USER_DEFINED_BYTES],
    /// A short name for logs and thread names.
    pub name: String,
}

impl DeviceOffer {
    pub fn new(name: &str, interface: Guid, instance: Guid) -> Self {
        DeviceOffer {
            interface,
            instance,
            mmio_megabytes: 0,
            channel_flags: 0,
            user_defined: [0; USER_DEFINED_BYTES],
            name: name.to_string(),
        }
    }
}

/// Why a device refused to open a channel (the peer gets a failure status).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The channel's worker could not start (thread, eventfd, io_uring).
    #[error("starting the channel's worker: {0}")]
    Worker(#[from] std::io::Error),
    /// Another peer has the device open; one peer at a time may.
    #[error("in use by peer {0}")]
    InUse(u64),
    /// A sub-channel whose primary this peer does not have open.
    #[error("sub-channel without an open primary of the same peer")]
    NoPrimary,
    /// A refusal particular to the device.
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
}

impl OpenError {
    /// A device-specific refusal.
    pub fn device(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        OpenError::Device(Box::new(e))
    }
}

/// A VSP: offers itself and serves the channels a peer opens.
pub trait Device: Send + Sync + std::fmt::Debug {
    fn offer(&self) -> DeviceOffer;
    /// Starts serving an opened channel (primary or sub-channel).
    fn open(&self, channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError>;
}

/// Identifies a device in a [`Registry`].
pub type DeviceId = u64;

/// Signals of one channel, produced by the transport.
#[derive(Debug)]
pub struct ChannelSignals {
    /// Rung by the peer (data or space for us); the worker sleeps on it.
    pub doorbell: Arc<EventFd>,
    /// Interrupts the peer.
    pub notify: Arc<dyn Notify>,
}

/// What a worker gets for an opened channel.
#[derive(Debug)]
pub struct OpenedChannel {
    /// Distinguishes peers (connections) for devices keeping per-peer state.
    pub peer: u64,
    pub relid: u32,
    pub subchannel_index: u16,
    pub user_data: [u8; USER_DEFINED_BYTES],
    /// Peer-to-host ring.
    pub incoming: IncomingRing,
    /// Host-to-peer ring.
    pub outgoing: OutgoingRing,
    pub signals: ChannelSignals,
    pub memory: SharedMemory,
    /// The peer's GPADLs (netvsc buffers are GPADLs named in-band).
    pub gpadls: GpadlMap,
    pub control: ControlHandle,
    /// The channel's counters, listed in the device's registry.
    pub stats: Arc<ChannelStats>,
}

/// What a worker keeps of an [`OpenedChannel`] besides the [`Channel`]
/// its rings and signals became.
#[derive(Debug)]
pub struct ChannelContext {
    pub peer: u64,
    pub relid: u32,
    pub subchannel_index: u16,
    pub user_data: [u8; USER_DEFINED_BYTES],
    pub memory: SharedMemory,
    pub gpadls: GpadlMap,
    pub control: ControlHandle,
}

impl OpenedChannel {
    /// Takes the channel apart: its rings and signals become a [`Channel`]
    /// stopped by `stop` (interrupts masked: the worker polls), the rest
    /// is the context the worker keeps.
    pub fn into_channel(self, stop: StopToken) -> (Channel, ChannelContext) {
        let channel = Channel::new(
            self.incoming,
            self.outgoing,
            self.signals.doorbell,
            self.signals.notify,
            stop,
        )
        .with_stats(self.stats);
        let context = ChannelContext {
            peer: self.peer,
            relid: self.relid,
            subchannel_index: self.subchannel_index,
            user_data: self.user_data,
            memory: self.memory,
            gpadls: self.gpadls,
            control: self.control,
        };
        (channel, context)
    }
}

/// GPADLs of one peer, readable from workers (control-path lookups only).
#[derive(Debug, Clone, Default)]
pub struct GpadlMap(Arc<Mutex<HashMap<u32, Arc<Gpadl>>>>);

impl GpadlMap {
    pub fn get(&self, id: u32) -> Option<Arc<Gpadl>> {
        lock(&self.0).get(&id).cloned()
    }
    /// Adds a GPADL. The channel server does this when a GPADL completes;
    /// harnesses that run a device without a server do it themselves.
    pub fn insert(&self, g: Gpadl) {
        lock(&self.0).insert(g.id, Arc::new(g));
    }
    fn remove(&self, id: u32) -> Option<Arc<Gpadl>> {
        lock(&self.0).remove(&id)
    }
    fn contains(&self, id: u32) -> bool {
        lock(&self.0).contains_key(&id)
    }
    fn clear(&self) {
        lock(&self.0).clear()
    }
    fn len(&self) -> usize {
        lock(&self.0).len()
    }
}

/// Requests reaching a server from outside its message stream.
#[derive(Debug)]
pub enum ControlRequest {
    /// A primary channel's device asks to offer sub-channels.
    OfferSubchannels {
        relid: u32,
        count: u16,
    },
    /// A worker saw a protocol violation: reset the channel.
    Reset {
        relid: u32,
        reason: String,
    },
    DeviceAdded(DeviceId),
    DeviceRemoved(DeviceId),
}

/// Lets a worker talk to its channel server.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    relid: u32,
    tx: Sender<ControlRequest>,
    wake: Arc<EventFd>,
}

impl ControlHandle {
    /// A handle whose requests go nowhere, for running a device's worker
    /// outside a channel server (fuzz harnesses, benches).
    pub fn detached(relid: u32) -> Self {
        let (tx, _rx) = channel();
        ControlHandle {
            relid,
            tx,
            wake: Arc::new(EventFd::new().expect("eventfd")),
        }
    }

    fn send(&self, req: ControlRequest) {
        if self.tx.send(req).is_ok() {
            self.wake.signal();
        }
    }

    /// Asks the server to offer `count` sub-channels of this channel.
    pub fn offer_subchannels(&self, count: u16) {
        self.send(ControlRequest::OfferSubchannels {
            relid: self.relid,
            count,
        });
    }

    /// Reports a protocol violation; the server resets the channel. The
    /// worker should return after calling this.
    pub fn reset(&self, reason: impl Into<String>) {
        self.send(ControlRequest::Reset {
            relid: self.relid,
            reason: reason.into(),
        });
    }
}

struct Subscriber {
    tx: Sender<ControlRequest>,
    wake: Arc<EventFd>,
}

#[derive(Default)]
struct RegistryInner {
    devices: BTreeMap<DeviceId, Arc<dyn Device>>,
    next_id: DeviceId,
    subscribers: Vec<Subscriber>,
    channels: ChannelStatsList,
}

/// The devices offered to every peer. Adding or removing a device offers or
/// rescinds it on every connected peer.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<RegistryInner>>);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.0);
        f.debug_struct("Registry")
            .field("devices", &inner.devices.len())
            .finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn notify_all(inner: &mut RegistryInner, make: impl Fn() -> ControlRequest) {
        inner.subscribers.retain(|s| {
            let ok = s.tx.send(make()).is_ok();
            if ok {
                s.wake.signal();
            }
            ok
        });
    }

    /// Adds a device; connected peers get an offer.
    pub fn add(&self, device: Arc<dyn Device>) -> DeviceId {
        let mut inner = lock(&self.0);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.devices.insert(id, device);
        Self::notify_all(&mut inner, || ControlRequest::DeviceAdded(id));
        id
    }

    /// Removes a device; connected peers get a rescind.
    pub fn remove(&self, id: DeviceId) -> Option<Arc<dyn Device>> {
        let mut inner = lock(&self.0);
        let dev = inner.devices.remove(&id);
        if dev.is_some() {
            Self::notify_all(&mut inner, || ControlRequest::DeviceRemoved(id));
        }
        dev
    }

    fn get(&self, id: DeviceId) -> Option<Arc<dyn Device>> {
        lock(&self.0).devices.get(&id).cloned()
    }

    /// Every device with its offer, for the management API.
    pub fn offers(&self) -> Vec<(DeviceId, DeviceOffer)> {
        self.snapshot()
            .into_iter()
            .map(|(id, d)| (id, d.offer()))
            .collect()
    }

    fn snapshot(&self) -> Vec<(DeviceId, Arc<dyn Device>)> {
        let inner = lock(&self.0);
        inner.devices.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    fn subscribe(&self, tx: Sender<ControlRequest>, wake: Arc<EventFd>) {
        lock(&self.0).subscribers.push(Subscriber { tx, wake });
    }

    /// Counters for a channel of one of these devices being opened.
    fn track_channel(&self, info: ChannelInfo) -> Arc<ChannelStats> {
        lock(&self.0).channels.track(info)
    }

    /// The counters of every open channel of these devices, for metrics.
    pub fn channel_stats(&self) -> Vec<Arc<ChannelStats>> {
        lock(&self.0).channels.live()
    }

    fn count_reset(&self, device: &str) {
        lock(&self.0).channels.reset(device);
    }

    /// Channel resets (protocol violations) per device name, for metrics.
    pub fn channel_resets(&self) -> std::collections::BTreeMap<String, u64> {
        lock(&self.0).channels.resets()
    }
}

/// One channel of a peer as the management API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSummary {
    pub relid: u32,
    pub interface: Guid,
    pub instance: Guid,
    /// The device's short name.
    pub name: String,
    pub subchannel_index: u16,
    /// Open (rings mapped, a worker running) rather than only offered.
    pub open: bool,
}

/// Moves messages and signals between the server and its peer.
pub trait Transport: Send {
    /// Sends one channel message (at most 240 bytes) to the peer.
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError>;
    /// The peer's memory, at INITIATE_CONTACT (hosted mode: a memfd that
    /// came with the message).
    fn contact_memory(
        &mut self,
        attachments: &mut Vec<OwnedFd>,
    ) -> Result<SharedMemory, TransportError>;
    /// Signals for a channel being opened (hosted mode: eventfds that came
    /// with OPENCHANNEL).
    fn channel_signals(
        &mut self,
        relid: u32,
        connection_id: u32,
        target_vp: u32,
        attachments: &mut Vec<OwnedFd>,
    ) -> Result<ChannelSignals, TransportError>;
    /// Moves an open channel's host-to-peer interrupts to `target_vp`
    /// (MODIFYCHANNEL). Transports without processors ignore it.
    fn retarget(&mut self, _relid: u32, _target_vp: u32) -> Result<(), TransportError> {
        Ok(())
    }
}

/// A transport failure or a peer that broke the transport's rules.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("transport I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent {0}")]
    Peer(String),
}

/// Why the server refused a peer's OPENCHANNEL (answered with a failure
/// status; the channel stays offered).
#[derive(Debug, thiserror::Error)]
enum OpenRefused {
    #[error("unknown relid")]
    UnknownRelid,
    #[error("channel is not in the offered state")]
    NotOffered,
    #[error("unknown ring GPADL")]
    UnknownGpadl,
    #[error("ring GPADL already used by another channel")]
    GpadlInUse,
    #[error("ring GPADL is not one page-aligned range")]
    GpadlNotOneRange,
    #[error("downstream ring offset {split} invalid for {pages} pages")]
    BadSplit { split: usize, pages: usize },
    #[error("ring pages: {0}")]
    Memory(#[from] MemoryError),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("channel signals: {0}")]
    Signals(#[from] TransportError),
    #[error("device refused: {0}")]
    Device(#[from] OpenError),
}

/// Errors that end a peer's connection.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("channel message of {0} bytes is larger than 240")]
    Oversized(usize),
}

#[derive(Debug)]
enum ChannelState {
    Offered,
    Open {
        worker: Box<dyn ChannelWorker>,
        ring_gpadl: u32,
    },
    /// Rescinded; waiting for RELID_RELEASED. `reoffer`: offer the device
    /// again afterwards (a reset rather than a removal).
    Rescinded {
        reoffer: bool,
    },
}

#[derive(Debug)]
struct ChannelEntry {
    device_id: DeviceId,
    device: Arc<dyn Device>,
    subchannel_index: u16,
    primary: u32,
    state: ChannelState,
}

impl ChannelEntry {
    /// Not rescinded: the relid and the sub-channel index are taken.
    fn is_live(&self) -> bool {
        !matches!(self.state, ChannelState::Rescinded { .. })
    }
}

/// Limits per peer, so one peer cannot exhaust the host.
const MAX_GPADLS: usize = 4096;
const MAX_GPADLS_BUILDING: usize = 64;
const MAX_SUBCHANNELS: u16 = 64;

static NEXT_PEER: AtomicU64 = AtomicU64::new(1);

/// The channel-management state machine for one peer.
pub struct ChannelServer {
    transport: Box<dyn Transport>,
    registry: Registry,
    peer: u64,
    version: Option<u32>,
    offers_requested: bool,
    memory: Option<SharedMemory>,
    /// Every relid in use, by relid: a relid stays in use from its offer
    /// until the peer's RELID_RELEASED (or unload).
    channels: BTreeMap<u32, ChannelEntry>,
    /// An offer was skipped because every relid was in use; devices are
    /// offered again when one is released.
    relids_exhausted: bool,
    gpadls: GpadlMap,
    building: HashMap<u32, GpadlBuilder>,
    requests: Receiver<ControlRequest>,
    requests_tx: Sender<ControlRequest>,
    wake: Arc<EventFd>,
    /// Who the peer is, for logs (hosted mode: tenant and credentials).
    label: String,
    /// Counts requests for channels this peer was not offered.
    violations: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for ChannelServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelServer")
            .field("peer", &self.peer)
            .field("version", &self.version)
            .field("channels", &self.channels.len())
            .finish()
    }
}

impl ChannelServer {
    /// A server for one peer. `wake` is signalled whenever a
    /// [`ControlRequest`] is queued; the owner then calls
    /// [`ChannelServer::handle_requests`].
    pub fn new(transport: Box<dyn Transport>, registry: Registry) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new()?);
        registry.subscribe(tx.clone(), wake.clone());
        Ok(ChannelServer {
            transport,
            registry,
            peer: NEXT_PEER.fetch_add(1, Ordering::Relaxed),
            version: None,
            offers_requested: false,
            memory: None,
            channels: BTreeMap::new(),
            relids_exhausted: false,
            gpadls: GpadlMap::default(),
            building: HashMap::new(),
            requests: rx,
            requests_tx: tx,
            wake,
            label: String::new(),
            violations: None,
        })
    }

    /// Names the peer in logs (e.g. its tenant and credentials).
    pub fn set_peer_label(&mut self, label: String) {
        self.label = label;
    }

    /// Counts requests for channels that are not offered to this peer
    /// (they get exactly the answer an unknown relid gets).
    pub fn set_violation_counter(&mut self, counter: Arc<AtomicU64>) {
        self.violations = Some(counter);
    }

    /// Signalled when control requests are queued.
    pub fn wake_event(&self) -> &Arc<EventFd> {
        &self.wake
    }

    /// The negotiated protocol version, once connected.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// Number of channels currently open.
    pub fn open_channels(&self) -> usize {
        self.channels
            .values()
            .filter(|c| matches!(c.state, ChannelState::Open { .. }))
            .count()
    }

    /// The peer's channels (offered and open), in relid order.
    pub fn channel_summary(&self) -> Vec<ChannelSummary> {
        self.channels
            .iter()
            .filter(|(_, c)| !matches!(c.state, ChannelState::Rescinded { .. }))
            .map(|(relid, c)| {
                let offer = c.device.offer();
                ChannelSummary {
                    relid: *relid,
                    interface: offer.interface,
                    instance: offer.instance,
                    name: offer.name,
                    subchannel_index: c.subchannel_index,
                    open: matches!(c.state, ChannelState::Open { .. }),
                }
            })
            .collect()
    }

    fn send<T: IntoBytes + zerocopy::Immutable>(&mut self, msg: &T) -> Result<(), ServerError> {
        Ok(self.transport.send(msg.as_bytes())?)
    }

    /// Handles one channel message from the peer. Errors end the peer's
    /// connection; problems the protocol can express are answered instead.
    pub fn handle_message(
        &mut self,
        msg: &[u8],
        mut attachments: Vec<OwnedFd>,
    ) -> Result<(), ServerError> {
        if msg.len() > MAX_MESSAGE_SIZE {
            return Err(ServerError::Oversized(msg.len()));
        }
        let Ok((header, _)) = MessageHeader::read_from_prefix(msg) else {
            tracing::warn!(
                peer = self.peer,
                len = msg.len(),
                "runt channel message ignored"
            );
            return Ok(());
        };
        let kind = header.msgtype.get();
        tracing::debug!(peer = self.peer, kind, len = msg.len(), "channel message");
        if kind != msgtype::INITIATE_CONTACT && self.version.is_none() {
            tracing::warn!(
                peer = self.peer,
                kind,
                "message before version negotiation ignored"
            );
            return Ok(());
        }
        match kind {
            msgtype::INITIATE_CONTACT => self.on_initiate_contact(msg, &mut attachments),
            msgtype::REQUESTOFFERS => self.on_request_offers(),
            msgtype::GPADL_HEADER => self.on_gpadl_header(msg),
            msgtype::GPADL_BODY => self.on_gpadl_body(msg),
            msgtype::GPADL_TEARDOWN => self.on_gpadl_teardown(msg),
            msgtype::OPENCHANNEL => self.on_open(msg, &mut attachments),
            msgtype::CLOSECHANNEL => self.on_close(msg),
            msgtype::RELID_RELEASED => self.on_relid_released(msg),
            msgtype::MODIFYCHANNEL => self.on_modify(msg),
            msgtype::UNLOAD => self.on_unload(),
            other => {
                tracing::warn!(
                    peer = self.peer,
                    msgtype = other,
                    "unsupported channel message ignored"
                );
                Ok(())
            }
        }
    }

    fn on_initiate_contact(
        &mut self,
        msg: &[u8],
        attachments: &mut Vec<OwnedFd>,
    ) -> Result<(), ServerError> {
        let Ok((m, _)) = InitiateContact::read_from_prefix(msg) else {
            tracing::warn!(peer = self.peer, "short INITIATE_CONTACT ignored");
            return Ok(());
        };
        if self.version.is_some() {
            // A peer that reconnects (kexec, driver reload) starts over.
            self.unload_all();
        }
        let requested = m.version_requested.get();
        let supported = SUPPORTED_VERSIONS.contains(&requested);
        if supported && self.memory.is_none() {
            match self.transport.contact_memory(attachments) {
                Ok(mem) => self.memory = Some(mem),
                Err(e) => {
                    tracing::warn!(peer = self.peer, "refusing contact: {e}");
                    return self.reply_version(false);
                }
            }
        }
        if supported {
            self.version = Some(requested);
            tracing::info!(
                peer = self.peer,
                "VMBus {}.{} negotiated",
                requested >> 16,
                requested & 0xffff
            );
        }
        self.reply_version(supported)
    }

    fn reply_version(&mut self, supported: bool) -> Result<(), ServerError> {
        let reply = VersionResponse {
            header: MessageHeader::new(msgtype::VERSION_RESPONSE),
            version_supported: supported as u8,
            connection_state: 0,
            padding: 0.into(),
            msg_conn_id: if supported {
                connection_id::MESSAGE_4
            } else {
                0
            }
            .into(),
        };
        self.send(&reply)
    }

    fn on_request_offers(&mut self) -> Result<(), ServerError> {
        self.offers_requested = true;
        self.offer_missing()?;
        self.send(&MessageHeader::new(msgtype::ALLOFFERS_DELIVERED))
    }

    /// Offers every device of the registry that has no primary channel.
    fn offer_missing(&mut self) -> Result<(), ServerError> {
        for (id, dev) in self.registry.snapshot() {
            if !self
                .channels
                .values()
                .any(|c| c.device_id == id && c.subchannel_index == 0)
            {
                self.offer_device(id, dev, 0, None)?;
            }
        }
        Ok(())
    }

    /// The lowest relid not in use, as Hyper-V allocates them; None when
    /// all below [`MAX_CHANNEL_RELIDS`] are taken. Relid 0 is never used.
    fn free_relid(&self) -> Option<u32> {
        let mut want = 1;
        for &relid in self.channels.keys() {
            if relid != want {
                break;
            }
            want += 1;
        }
        (want < MAX_CHANNEL_RELIDS).then_some(want)
    }

    /// Offers a device's primary channel or one of its sub-channels. With
    /// every relid in use the offer is not made (logged): a guest cannot
    /// use a relid of 2048 or more, so offering one would leave it waiting
    /// on a channel whose interrupts it never sees.
    fn offer_device(
        &mut self,
        device_id: DeviceId,
        device: Arc<dyn Device>,
        subchannel_index: u16,
        primary: Option<u32>,
    ) -> Result<(), ServerError> {
        let Some(relid) = self.free_relid() else {
            tracing::error!(
                peer = self.peer,
                who = self.label,
                subchannel_index,
                "every relid below {MAX_CHANNEL_RELIDS} is in use; offer not made"
            );
            self.relids_exhausted = true;
            return Ok(());
        };
        let o = device.offer();
        let mut msg = OfferChannel::new_zeroed();
        msg.header = MessageHeader::new(msgtype::OFFERCHANNEL);
        msg.offer = ChannelOffer {
            interface_type: o.interface,
            interface_instance: o.instance,
            reserved1: 0.into(),
            reserved2: 0.into(),
            channel_flags: o.channel_flags.into(),
            mmio_megabytes: o.mmio_megabytes.into(),
            user_defined: o.user_defined,
            sub_channel_index: subchannel_index.into(),
            reserved3: 0.into(),
        };
        msg.child_relid = relid.into();
        msg.interrupt_flags = 1.into(); // dedicated interrupt
        msg.connection_id = (connection_id::CHANNEL_EVENT_BASE + relid).into();
        self.channels.insert(
            relid,
            ChannelEntry {
                device_id,
                device,
                subchannel_index,
                primary: primary.unwrap_or(relid),
                state: ChannelState::Offered,
            },
        );
        self.send(&msg)
    }

    fn on_gpadl_header(&mut self, msg: &[u8]) -> Result<(), ServerError> {
        let builder = match GpadlBuilder::start(msg) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(peer = self.peer, "bad GPADL header: {e}");
                return self.reply_gpadl_failure_from(msg);
            }
        };
        let id = builder.id();
        if self.gpadls.contains(id) || self.building.contains_key(&id) {
            tracing::warn!(peer = self.peer, "{}", GpadlError::Duplicate(id));
            // Do not disturb the existing GPADL of that id.
            return self.reply_gpadl(builder_relid(msg), id, STATUS_UNSUCCESSFUL);
        }
        if self.building.len() >= MAX_GPADLS_BUILDING || self.gpadls.len() >= MAX_GPADLS {
            tracing::warn!(peer = self.peer, "too many GPADLs");
            return self.reply_gpadl(builder_relid(msg), id, STATUS_UNSUCCESSFUL);
        }
        self.building.insert(id, builder);
        self.maybe_finish_gpadl(id)
    }

    fn on_gpadl_body(&mut self, msg: &[u8]) -> Result<(), ServerError> {
        let id = match GpadlBuilder::body_id(msg) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(peer = self.peer, "bad GPADL body: {e}");
                return Ok(());
            }
        };
        let Some(builder) = self.building.get_mut(&id) else {
            tracing::warn!(peer = self.peer, "{}", GpadlError::UnknownBody(id));
            return Ok(());
        };
        if let Err(e) = builder.add_body(msg) {
            tracing::warn!(peer = self.peer, "{e}");
            let b = self.building.remove(&id).expect("present");
            return self.reply_gpadl(b.child_relid(), id, STATUS_UNSUCCESSFUL);
        }
        self.maybe_finish_gpadl(id)
    }

    fn maybe_finish_gpadl(&mut self, id: u32) -> Result<(), ServerError> {
        if !self.building.get(&id).is_some_and(|b| b.is_complete()) {
            return Ok(());
        }
        let builder = self.building.remove(&id).expect("present");
        let relid = builder.child_relid();
        let memory = self.memory.clone().expect("connected peers have memory");
        match builder.finish(&memory) {
            Ok(g) => {
                self.gpadls.insert(g);
                self.reply_gpadl(relid, id, 0)
            }
            Err(e) => {
                tracing::warn!(peer = self.peer, "GPADL refused: {e}");
                self.reply_gpadl(relid, id, STATUS_UNSUCCESSFUL)
            }
        }
    }

    fn reply_gpadl_failure_from(&mut self, msg: &[u8]) -> Result<(), ServerError> {
        match wire::GpadlHeader::read_from_prefix(msg) {
            Ok((h, _)) => self.reply_gpadl(h.child_relid.get(), h.gpadl.get(), STATUS_UNSUCCESSFUL),
            Err(_) => Ok(()),
        }
    }

    fn reply_gpadl(&mut self, relid: u32, gpadl: u32, status: u32) -> Result<(), ServerError> {
        let reply = GpadlCreated {
            header: MessageHeader::new(msgtype::GPADL_CREATED),
            child_relid: relid.into(),
            gpadl: gpadl.into(),
            creation_status: status.into(),
        };
        self.send(&reply)
    }

    fn on_gpadl_teardown(&mut self, msg: &[u8]) -> Result<(), ServerError> {
        let Ok((m, _)) = GpadlTeardown::read_from_prefix(msg) else {
            return Ok(());
        };
        let id = m.gpadl.get();
        // A ring GPADL still in use: the peer skipped CLOSECHANNEL. Stop the
        // channel first so nothing touches the pages after we answer.
        let users: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| matches!(c.state, ChannelState::Open { ring_gpadl, .. } if ring_gpadl == id))
            .map(|(r, _)| *r)
            .collect();
        for relid in users {
            tracing::warn!(
                peer = self.peer,
                relid,
                "ring GPADL torn down while open; closing channel"
            );
            self.close_by_peer(relid)?;
        }
        self.building.remove(&id);
        if self.gpadls.remove(id).is_none() {
            tracing::warn!(peer = self.peer, gpadl = id, "teardown of unknown GPADL");
        }
        let reply = GpadlTorndown {
            header: MessageHeader::new(msgtype::GPADL_TORNDOWN),
            gpadl: id.into(),
        };
        self.send(&reply)
    }

    fn on_open(&mut self, msg: &[u8], attachments: &mut Vec<OwnedFd>) -> Result<(), ServerError> {
        let Ok((m, _)) = OpenChannel::read_from_prefix(msg) else {
            tracing::warn!(peer = self.peer, "short OPENCHANNEL ignored");
            return Ok(());
        };
        let relid = m.child_relid.get();
        if !self.channels.contains_key(&relid) {
            if let Some(v) = &self.violations {
                v.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                peer = self.peer,
                who = self.label,
                relid,
                "open of a channel not offered to this peer"
            );
        }
        let status = match self.open_channel(&m, attachments) {
            Ok(()) => 0,
            Err(reason) => {
                tracing::warn!(peer = self.peer, relid, "open refused: {reason}");
                STATUS_UNSUCCESSFUL
            }
        };
        let reply = OpenResult {
            header: MessageHeader::new(msgtype::OPENCHANNEL_RESULT),
            child_relid: relid.into(),
            open_id: m.open_id,
            status: status.into(),
        };
        self.send(&reply)
    }

    fn open_channel(
        &mut self,
        m: &OpenChannel,
        attachments: &mut Vec<OwnedFd>,
    ) -> Result<(), OpenRefused> {
        let relid = m.child_relid.get();
        let entry = self.channels.get(&relid).ok_or(OpenRefused::UnknownRelid)?;
        if !matches!(entry.state, ChannelState::Offered) {
            return Err(OpenRefused::NotOffered);
        }
        let gpadl_id = m.ring_gpadl.get();
        let gpadl = self.gpadls.get(gpadl_id).ok_or(OpenRefused::UnknownGpadl)?;
        if self.channels.values().any(
            |c| matches!(c.state, ChannelState::Open { ring_gpadl, .. } if ring_gpadl == gpadl_id),
        ) {
            return Err(OpenRefused::GpadlInUse);
        }
        let pages = gpadl
            .single_range_pages()
            .ok_or(OpenRefused::GpadlNotOneRange)?;
        let split = m.downstream_ring_page_offset.get() as usize;
        if split < 2 || split + 2 > pages.len() {
            return Err(OpenRefused::BadSplit {
                split,
                pages: pages.len(),
            });
        }
        let memory = self.memory.clone().expect("connected peers have memory");
        let map = |p: &[u64]| -> Result<Arc<RingMemory>, OpenRefused> {
            Ok(RingMemory::from_pages(memory.map_ring(p)?)?)
        };
        let incoming = IncomingRing::new(map(&pages[..split])?)?;
        let outgoing = OutgoingRing::new(map(&pages[split..])?)?;
        let signals = self.transport.channel_signals(
            relid,
            connection_id::CHANNEL_EVENT_BASE + relid,
            m.target_vp.get(),
            attachments,
        )?;
        let entry = self.channels.get_mut(&relid).expect("checked");
        let stats = self.registry.track_channel(ChannelInfo {
            device: entry.device.offer().name,
            peer: self.peer,
            relid,
            subchannel_index: entry.subchannel_index,
        });
        let opened = OpenedChannel {
            peer: self.peer,
            relid,
            subchannel_index: entry.subchannel_index,
            user_data: m.user_data,
            incoming,
            outgoing,
            signals,
            memory,
            gpadls: self.gpadls.clone(),
            control: ControlHandle {
                relid,
                tx: self.requests_tx.clone(),
                wake: self.wake.clone(),
            },
            stats,
        };
        let worker = entry.device.open(opened)?;
        entry.state = ChannelState::Open {
            worker,
            ring_gpadl: gpadl_id,
        };
        Ok(())
    }

    /// Stops a channel's worker; the channel returns to the offered state.
    fn close_channel(&mut self, relid: u32) {
        let Some(entry) = self.channels.get_mut(&relid) else {
            return;
        };
        if !matches!(entry.state, ChannelState::Open { .. }) {
            return;
        }
        if let ChannelState::Open { worker, .. } =
            std::mem::replace(&mut entry.state, ChannelState::Offered)
        {
            worker.stop();
        }
    }

    /// The peer closed a channel. Closing a primary ends its sub-channels:
    /// they are rescinded, as Hyper-V does, so that a guest opening the
    /// primary again gets fresh sub-channel offers numbered from 1. Linux
    /// (drivers/hv/channel.c `vmbus_disconnect_ring`) closes its
    /// sub-channels before the primary and frees them only on their
    /// rescind; its netvsc then asks for sub-channels again and
    /// `netvsc_sc_open` ignores any offer whose index is not below the
    /// channel count it waits for.
    fn close_by_peer(&mut self, relid: u32) -> Result<(), ServerError> {
        self.close_channel(relid);
        if self
            .channels
            .get(&relid)
            .is_some_and(|c| c.subchannel_index == 0)
        {
            self.rescind_subchannels(relid)?;
        }
        Ok(())
    }

    fn on_close(&mut self, msg: &[u8]) -> Result<(), ServerError> {
        let Ok((m, _)) = RelidMessage::read_from_prefix(msg) else {
            return Ok(());
        };
        let relid = m.child_relid.get();
        match self.channels.get(&relid).map(|c| &c.state) {
            Some(ChannelState::Open { .. }) => self.close_by_peer(relid)?,
            Some(ChannelState::Rescinded { .. }) => {}
            _ => tracing::warn!(
                peer = self.peer,
                relid,
                "close of a channel that is not open"
            ),
        }
        Ok(())
    }

    fn on_relid_released(&mut self, msg: &[u8]) -> Result<(), ServerError> {
        let Ok((m, _)) = RelidMessage::read_from_prefix(msg) else {
            return Ok(());
        };
        let relid = m.child_relid.get();
        match self.channels.get(&relid).map(|c| &c.state) {
            Some(ChannelState::Rescinded { reoffer }) => {
                let reoffer = *reoffer;
                let entry = self.channels.remove(&relid).expect("present");
                if reoffer && entry.subchannel_index == 0 && self.offers_requested {
                    self.offer_device(entry.device_id, entry.device, 0, None)?;
                }
                if std::mem::take(&mut self.relids_exhausted) && self.offers_requested {
                    self.offer_missing()?;
                }
            }
            _ => tracing::warn!(
                peer = self.peer,
                relid,
                "RELID_RELEASED for a channel not rescinded"
            ),
        }
        Ok(())
    }

    fn on_modify(&mut self, msg: &[u8]) -> Result<(), ServerError> {
        let Ok((m, _)) = ModifyChannel::read_from_prefix(msg) else {
            return Ok(());
        };
        let relid = m.child_relid.get();
        let open = self
            .channels
            .get(&relid)
            .is_some_and(|c| matches!(c.state, ChannelState::Open { .. }));
        let status = if !open {
            tracing::debug!(
                peer = self.peer,
                relid,
                "MODIFYCHANNEL for a channel not open"
            );
            STATUS_UNSUCCESSFUL
        } else if let Err(e) = self.transport.retarget(relid, m.target_vp.get()) {
            tracing::debug!(peer = self.peer, relid, "MODIFYCHANNEL refused: {e}");
            STATUS_UNSUCCESSFUL
        } else {
            0
        };
        // Versions before 5.3 define no response; the guest just moves on.
        if self.version.is_some_and(|v| v >= version::WIN10_V5_3) {
            let reply = ModifyChannelResponse {
                header: MessageHeader::new(msgtype::MODIFYCHANNEL_RESPONSE),
                child_relid: m.child_relid,
                status: status.into(),
            };
            self.send(&reply)?;
        }
        Ok(())
    }

    fn on_unload(&mut self) -> Result<(), ServerError> {
        self.unload_all();
        self.send(&MessageHeader::new(msgtype::UNLOAD_RESPONSE))
    }

    /// Stops every channel and forgets every GPADL and offer.
    fn unload_all(&mut self) {
        let relids: Vec<u32> = self.channels.keys().copied().collect();
        for relid in relids {
            self.close_channel(relid);
        }
        self.channels.clear();
        self.relids_exhausted = false;
        self.gpadls.clear();
        self.building.clear();
        self.offers_requested = false;
        self.version = None;
    }

    /// Rescinds a channel and its sub-channels (stopping their workers),
    /// the sub-channels first: Linux frees a primary when its rescind is
    /// handled (`vmbus_onoffer_rescind` -> `vmbus_device_unregister`), and
    /// a sub-channel rescind handled after that unlinks the sub-channel
    /// from the freed primary's list (`hv_process_channel_removal`).
    fn rescind(&mut self, primary: u32, reoffer: bool) -> Result<(), ServerError> {
        self.rescind_subchannels(primary)?;
        self.rescind_one(primary, reoffer)
    }

    fn rescind_subchannels(&mut self, primary: u32) -> Result<(), ServerError> {
        let subchannels: Vec<u32> = self
            .channels
            .iter()
            .filter(|(r, c)| **r != primary && c.primary == primary)
            .map(|(r, _)| *r)
            .collect();
        for relid in subchannels {
            self.rescind_one(relid, false)?;
        }
        Ok(())
    }

    fn rescind_one(&mut self, relid: u32, reoffer: bool) -> Result<(), ServerError> {
        self.close_channel(relid);
        let Some(entry) = self.channels.get_mut(&relid) else {
            return Ok(());
        };
        if !entry.is_live() {
            return Ok(());
        }
        entry.state = ChannelState::Rescinded { reoffer };
        tracing::debug!(peer = self.peer, relid, "rescinding");
        let msg = RelidMessage {
            header: MessageHeader::new(msgtype::RESCIND_CHANNELOFFER),
            child_relid: relid.into(),
        };
        self.send(&msg)
    }

    /// Handles queued control requests (sub-channel offers, resets, hot
    /// add/remove).
    pub fn handle_requests(&mut self) -> Result<(), ServerError> {
        self.wake.consume();
        while let Ok(req) = self.requests.try_recv() {
            self.handle_request(req)?;
        }
        Ok(())
    }

    fn handle_request(&mut self, req: ControlRequest) -> Result<(), ServerError> {
        match req {
            ControlRequest::OfferSubchannels { relid, count } => {
                self.offer_subchannels(relid, count)
            }
            ControlRequest::Reset { relid, reason } => {
                let Some(entry) = self.channels.get(&relid) else {
                    return Ok(());
                };
                tracing::warn!(peer = self.peer, relid, "resetting channel: {reason}");
                self.registry.count_reset(&entry.device.offer().name);
                let primary = entry.primary;
                self.rescind(primary, true)
            }
            ControlRequest::DeviceAdded(id) => {
                if self.offers_requested
                    && let Some(dev) = self.registry.get(id)
                {
                    self.offer_device(id, dev, 0, None)?;
                }
                Ok(())
            }
            ControlRequest::DeviceRemoved(id) => {
                let primaries: Vec<u32> = self
                    .channels
                    .iter()
                    .filter(|(_, c)| c.device_id == id && c.subchannel_index == 0)
                    .map(|(r, _)| *r)
                    .collect();
                for relid in primaries {
                    self.rescind(relid, false)?;
                }
                Ok(())
            }
        }
    }

    fn offer_subchannels(&mut self, primary: u32, count: u16) -> Result<(), ServerError> {
        let Some(entry) = self.channels.get(&primary) else {
            return Ok(());
        };
        if entry.subchannel_index != 0 || !matches!(entry.state, ChannelState::Open { .. }) {
            return Ok(());
        }
        let (device_id, device) = (entry.device_id, entry.device.clone());
        // Indexes are numbered from 1 among the live sub-channels: a
        // rescinded one's index is free again even before its relid is
        // released (netvsc takes index i as channel i of `num_chn`).
        let taken: std::collections::BTreeSet<u16> = self
            .channels
            .values()
            .filter(|c| c.primary == primary && c.subchannel_index != 0 && c.is_live())
            .map(|c| c.subchannel_index)
            .collect();
        let free = (1..=MAX_SUBCHANNELS).filter(|i| !taken.contains(i));
        for index in free.take(usize::from(count)) {
            self.offer_device(device_id, device.clone(), index, Some(primary))?;
        }
        Ok(())
    }

    /// Called when the peer is gone: stops every worker.
    pub fn shutdown(&mut self) {
        self.unload_all();
    }
}

impl Drop for ChannelServer {
    fn drop(&mut self) {
        self.unload_all();
    }
}

fn builder_relid(msg: &[u8]) -> u32 {
    wire::GpadlHeader::read_from_prefix(msg).map_or(0, |(h, _)| h.child_relid.get())
}

use zerocopy::FromZeros;
