//! virtio-net over a [`NetBackend`]: the transmit queue hands frames to the
//! backend, received frames fill the driver's receive buffers. Every frame
//! carries the 12-byte `virtio_net_hdr_v1` (no offloads negotiated).
//!
//! # A NIC on a vspa switch
//!
//! ```text
//!  guest driver ── TX notify (vCPU thread) ──▶ VirtioNet::transmit ─▶ SwitchPort::send/flush
//!                                                  copy into a chunk ─▶ PortHandle::ingress
//!  guest driver ◀── used RX buffers + irqfd ◀─ VirtioNet::receive ◀── SwitchPort::recv
//!                                              (NetPoller thread)      PortHandle::drain
//! ```
//!
//! [`SwitchPort`] is a port of a [`switch::Switch`] that takes no offloads
//! (the switch completes checksums and cuts large segments for it). Frames
//! the guest sends are forwarded on the vCPU thread that took the queue
//! notification, one `ingress` per notification; each is copied once from
//! the descriptor chain into a shared chunk of memory, so steady state
//! allocates nothing per frame. Frames for the guest are moved by a
//! [`NetPoller`] thread: it sleeps on the port's doorbell (rung by the
//! switch when it queues frames for a sleeping owner) and on an eventfd the
//! device rings when the driver adds receive buffers, and copies frames
//! straight from the switch's buffers into the driver's. When the driver
//! has no buffer left, the frame waits and the port's queue fills (the
//! switch drops and counts beyond its bound); the poll thread sleeps until
//! the driver adds buffers rather than spin.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;

use bytes::BytesMut;
use switch::{Delivery, Frame, OffloadCaps, PortHandle, PortSpec, Switch, SwitchError};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmbus::event::{EventFd, poll_readable};
use vmbus::worker::StopToken;

use super::VIRTIO_F_VERSION_1;
use super::mmio::{VirtioBackend, VirtioMmio, read_config_bytes};

/// VIRTIO_NET_F_MAC: the device has a MAC address in config space.
pub const F_MAC: u64 = 1 << 5;
pub const HEADER_LEN: usize = 12;
/// Largest frame accepted: Ethernet + VLAN tag, no jumbo frames.
pub const MAX_FRAME: usize = 1518;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Where a NIC's frames go: a switch port ([`SwitchPort`]) or, in tests,
/// an in-process peer ([`ChannelBackend`]).
pub trait NetBackend: Send + std::fmt::Debug {
    fn mac(&self) -> [u8; 6];
    /// Hands one frame to the network.
    fn send(&mut self, frame: &[u8]);
    /// The end of a batch of [`NetBackend::send`]s (one queue
    /// notification): forward what was sent.
    fn flush(&mut self) {}
    /// The next received frame, if any (non-blocking).
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize>;
    /// Drops every frame waiting (the driver is not running).
    fn discard(&mut self) {
        let mut buf = [0u8; MAX_FRAME];
        while self.recv(&mut buf).is_some() {}
    }
    /// A descriptor that becomes readable when frames arrive, for a
    /// [`NetPoller`]; None if the backend must be polled.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// The poller is about to sleep on [`NetBackend::wake_fd`]: false if
    /// frames are already waiting.
    fn prepare_sleep(&mut self) -> bool {
        true
    }
    /// The poller woke up.
    fn woke(&mut self) {}
}

/// The virtio-net device model.
#[derive(Debug)]
pub struct VirtioNet {
    backend: Box<dyn NetBackend>,
    sizes: [u16; 2],
    frame: Vec<u8>,
    /// A received frame waiting for a receive buffer.
    pending: Option<usize>,
    /// Rung when the driver adds receive buffers (wakes a [`NetPoller`]).
    rx_kick: Option<Arc<EventFd>>,
}

impl VirtioNet {
    pub fn new(backend: Box<dyn NetBackend>) -> Self {
        VirtioNet {
            backend,
            sizes: [QUEUE_SIZE, QUEUE_SIZE],
            frame: vec![0; HEADER_LEN + MAX_FRAME],
            pending: None,
            rx_kick: None,
        }
    }

    /// Prepares the device for a [`NetPoller`]: what the poll thread
    /// sleeps on. Fails if the backend has no descriptor to wait on.
    pub fn poller_wakers(&mut self) -> std::io::Result<PollerWakers> {
        let frames = self
            .backend
            .wake_fd()
            .ok_or_else(|| std::io::Error::other("the backend has no wake descriptor"))?
            .try_clone_to_owned()?;
        let kick = Arc::new(EventFd::new()?);
        self.rx_kick = Some(kick.clone());
        Ok(PollerWakers { frames, kick })
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(mem) {
                let len = reader.available_bytes();
                if (HEADER_LEN..=HEADER_LEN + MAX_FRAME).contains(&len)
                    && reader.read_exact(&mut self.frame[..len]).is_ok()
                {
                    self.backend.send(&self.frame[HEADER_LEN..len]);
                } else {
                    tracing::debug!(len, "dropped malformed virtio-net frame");
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        self.backend.flush();
        used
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.frame[HEADER_LEN..]) {
                    Some(len) => len.min(MAX_FRAME),
                    None => return used,
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.pending = Some(len);
                return used;
            };
            let head = chain.head_index();
            // virtio_net_hdr_v1: no flags, no GSO, num_buffers = 1.
            self.frame[..HEADER_LEN].fill(0);
            self.frame[10] = 1;
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= HEADER_LEN + len => {
                    w.write_all(&self.frame[..HEADER_LEN + len]).is_ok() as u32
                        * (HEADER_LEN + len) as u32
                }
                _ => 0, // buffer too small: the frame is dropped
            };
            if queue.add_used(mem, head, written).is_err() {
                return used;
            }
            used = true;
        }
    }
}

impl VirtioBackend for VirtioNet {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status u16 (LINK_UP).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.backend.mac());
        config[6] = 1;
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            TX => self.transmit(queue, mem),
            RX => {
                let used = self.receive(queue, mem);
                // New buffers: a poller that waited for them looks again.
                if let Some(k) = &self.rx_kick {
                    k.signal();
                }
                used
            }
            _ => false,
        }
    }

    fn poll(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match queues.get_mut(RX) {
            Some(q) if q.ready() => self.receive(q, mem),
            _ => {
                self.discard();
                false
            }
        }
    }

    fn discard(&mut self) {
        self.pending = None;
        self.backend.discard();
    }

    fn prepare_sleep(&mut self) -> bool {
        // A frame waiting for a buffer: sleep until the driver adds one
        // (rx_kick), not on the port, whose queue stays non-empty.
        self.pending.is_some() || self.backend.prepare_sleep()
    }

    fn woke(&mut self) {
        self.backend.woke();
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

/// What a [`NetPoller`] sleeps on: the backend's wake descriptor and the
/// device's "receive buffers added" eventfd.
#[derive(Debug)]
pub struct PollerWakers {
    frames: OwnedFd,
    kick: Arc<EventFd>,
}

/// The thread that moves received frames into a virtio-net device's
/// receive buffers; stopped and joined on drop.
#[derive(Debug)]
pub struct NetPoller {
    stop: StopToken,
    /// None from the thread only when it never ran (see `spawn_on`).
    thread: Option<JoinHandle<Option<()>>>,
}

impl NetPoller {
    /// Starts the poll thread of `device` (a [`VirtioNet`] whose
    /// [`VirtioNet::poller_wakers`] gave `wakers`), unbound.
    pub fn spawn(
        name: &str,
        device: Arc<VirtioMmio>,
        wakers: PollerWakers,
    ) -> std::io::Result<NetPoller> {
        Self::spawn_on(name, None, device, wakers)
    }

    /// As [`NetPoller::spawn`], the thread bound to `cpu` (see
    /// [`vmbus::cpu::spawn_on`]).
    pub fn spawn_on(
        name: &str,
        cpu: Option<usize>,
        device: Arc<VirtioMmio>,
        wakers: PollerWakers,
    ) -> std::io::Result<NetPoller> {
        let stop = StopToken::new()?;
        let s = stop.clone();
        let kind = vmbus::ThreadKind::VirtioNet;
        let thread = vmbus::cpu::spawn_on(name.to_string(), cpu, kind, move || {
            poll_loop(&device, &wakers, &s)
        })?;
        Ok(NetPoller {
            stop,
            thread: Some(thread),
        })
    }
}

/// Moves frames until stopped. It does not spin: the device's
/// `prepare_sleep` re-checks for frames after each pass (the vCPU thread,
/// not this one, does the latency-sensitive transmit side).
fn poll_loop(device: &VirtioMmio, wakers: &PollerWakers, stop: &StopToken) {
    while !stop.is_stopped() {
        device.poll();
        if !device.prepare_sleep() {
            continue;
        }
        let fds = [
            wakers.frames.as_fd(),
            wakers.kick.as_fd(),
            stop.event().as_fd(),
        ];
        let [_, kicked, _] = poll_readable(fds, None);
        if kicked {
            wakers.kick.consume();
        }
        device.woke();
    }
}

impl Drop for NetPoller {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Frames copied from the guest go into chunks of this size.
const CHUNK: usize = 256 << 10;
/// Frames sent before they are forwarded even without a flush.
const TX_BATCH: usize = 64;
/// Frames taken from the switch at a time.
const RX_BATCH: usize = 64;

/// A [`NetBackend`] that is a port of a vspa switch.
#[derive(Debug)]
pub struct SwitchPort {
    port: PortHandle,
    mac: [u8; 6],
    /// Where frames from the guest are copied; frames are cut from it and
    /// it is reused once the switch dropped them all.
    chunk: BytesMut,
    to_switch: Vec<Frame>,
    from_switch: Vec<Delivery>,
    /// Next frame of `from_switch` to hand to the guest.
    next: usize,
}

impl SwitchPort {
    /// Joins `switch` as port `name` with the default policy; the port
    /// takes no offloads (complete frames of at most MTU size).
    pub fn attach(switch: &Arc<Switch>, name: &str, mac: [u8; 6]) -> Result<Self, SwitchError> {
        Ok(Self::new(
            switch.add_port(PortSpec::new(name, OffloadCaps::NONE))?,
            mac,
        ))
    }

    /// A backend over a port added with [`OffloadCaps::NONE`].
    pub fn new(port: PortHandle, mac: [u8; 6]) -> Self {
        SwitchPort {
            port,
            mac,
            chunk: BytesMut::new(),
            to_switch: Vec::with_capacity(TX_BATCH),
            from_switch: Vec::with_capacity(RX_BATCH),
            next: 0,
        }
    }

    pub fn port(&self) -> &PortHandle {
        &self.port
    }
}

impl NetBackend for SwitchPort {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn send(&mut self, frame: &[u8]) {
        let len = frame.len();
        if self.chunk.capacity() < len && !self.chunk.try_reclaim(len.max(CHUNK / 2)) {
            self.chunk = BytesMut::with_capacity(CHUNK.max(len));
        }
        self.chunk.extend_from_slice(frame);
        self.to_switch.push(Frame::new(self.chunk.split().freeze()));
        if self.to_switch.len() >= TX_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.port.ingress(&mut self.to_switch);
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            if self.next == self.from_switch.len() {
                self.from_switch.clear();
                self.next = 0;
                if self.port.drain(&mut self.from_switch, RX_BATCH) == 0 {
                    return None;
                }
            }
            let d = &self.from_switch[self.next];
            self.next += 1;
            let len = d.len();
            if len > buf.len() {
                self.port.count_tx_errors(1);
                continue;
            }
            let mut tag = [0u8; 4];
            let mut at = 0;
            for part in d.parts(&mut tag) {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            return Some(len);
        }
    }

    fn discard(&mut self) {
        let mut dropped = self.from_switch.len() - self.next;
        self.from_switch.clear();
        self.next = 0;
        loop {
            let n = self.port.drain(&mut self.from_switch, RX_BATCH);
            if n == 0 {
                break;
            }
            dropped += n;
            self.from_switch.clear();
        }
        if dropped > 0 {
            self.port.count_tx_errors(dropped as u64);
        }
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.port.doorbell_fd())
    }

    fn prepare_sleep(&mut self) -> bool {
        self.next == self.from_switch.len() && self.port.prepare_sleep()
    }

    fn woke(&mut self) {
        self.port.woke(true);
    }
}

/// A backend connected to an in-process peer by two channels.
#[derive(Debug)]
pub struct ChannelBackend {
    mac: [u8; 6],
    to_peer: Sender<Vec<u8>>,
    from_peer: Receiver<Vec<u8>>,
}

/// The other end of a [`ChannelBackend`].
#[derive(Debug)]
pub struct ChannelPeer {
    pub to_device: Sender<Vec<u8>>,
    pub from_device: Receiver<Vec<u8>>,
}

/// A connected backend/peer pair.
pub fn channel_pair(mac: [u8; 6]) -> (ChannelBackend, ChannelPeer) {
    let (to_peer, from_device) = channel();
    let (to_device, from_peer) = channel();
    (
        ChannelBackend {
            mac,
            to_peer,
            from_peer,
        },
        ChannelPeer {
            to_device,
            from_device,
        },
    )
}

impl NetBackend for ChannelBackend {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn send(&mut self, frame: &[u8]) {
        let _ = self.to_peer.send(frame.to_vec());
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self.from_peer.try_recv() {
            Ok(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Some(n)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }
}
