//! One IC device running on private rings, with the guest's end in the
//! test's hands: what conformance and malicious-guest tests use to see
//! every byte the host sends and to answer with exactly chosen bytes. The
//! worker is the real one (its own thread, eventfd signals, the ring's
//! interrupt-mask protocol); only the channel server is left out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbus::channel::{Channel, ChannelWorker, Wait};
use vmbus::event::EventFd;
use vmbus::ring::{IncomingRing, OutgoingRing, RingError, WriteError, private_pair};
use vmbus::server::{ChannelSignals, ControlHandle, Device, GpadlMap, OpenedChannel};
use vmbus::vsc::{BusError, Offer, VscChannel};
use vmbus::worker::StopToken;
use vmbus::{SharedMemory, wire::packet_type};

use crate::IcSet;
use crate::protocol::Service;

/// Data pages of each ring (Linux uses three).
const RING_DATA_PAGES: usize = 3;

/// A packet as the guest read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPacket {
    pub packet_type: u16,
    pub flags: u16,
    pub txid: u64,
    /// Payload including padding to 8 bytes.
    pub payload: Vec<u8>,
}

/// The guest end of one device's channel.
#[derive(Debug)]
pub struct RawGuest {
    pub channel: Channel,
    offer: Offer,
    worker: Option<Box<dyn ChannelWorker>>,
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("the set has no {0} device")]
    NoDevice(Service),
    #[error("{0}")]
    Setup(String),
}

impl RawGuest {
    /// Opens `service`'s device of `set` on fresh rings.
    pub fn attach(set: &IcSet, service: Service) -> Result<RawGuest, HarnessError> {
        let device = set
            .devices()
            .into_iter()
            .find(|d| d.offer().interface == service.interface())
            .ok_or(HarnessError::NoDevice(service))?;
        RawGuest::open(device)
    }

    /// Opens any device on fresh rings.
    pub fn open(device: Arc<dyn Device>) -> Result<RawGuest, HarnessError> {
        let setup = |e: std::io::Error| HarnessError::Setup(e.to_string());
        let (host_out, guest_in) = private_pair(RING_DATA_PAGES);
        let (guest_out, host_in) = private_pair(RING_DATA_PAGES);
        let host_doorbell = Arc::new(EventFd::new().map_err(setup)?);
        let guest_bell = Arc::new(EventFd::new().map_err(setup)?);
        let (memory, _fd) =
            SharedMemory::create(4096).map_err(|e| HarnessError::Setup(e.to_string()))?;
        let o = device.offer();
        let opened = OpenedChannel {
            peer: 0,
            relid: 1,
            subchannel_index: 0,
            user_data: [0; 120],
            incoming: host_in,
            outgoing: host_out,
            signals: ChannelSignals {
                doorbell: host_doorbell.clone(),
                notify: guest_bell.clone(),
            },
            memory,
            gpadls: GpadlMap::default(),
            control: ControlHandle::detached(1),
            stats: Default::default(),
        };
        let worker = device
            .open(opened)
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        let channel = Channel::new(
            guest_in,
            guest_out,
            guest_bell,
            host_doorbell,
            StopToken::new().map_err(setup)?,
        );
        Ok(RawGuest {
            channel,
            offer: Offer {
                relid: 1,
                interface: o.interface,
                instance: o.instance,
                subchannel_index: 0,
                connection_id: 0,
            },
            worker: Some(worker),
        })
    }

    /// The next packet from the host, waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<RawPacket>, RingError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.channel.incoming.read()? {
                let payload = p.payload();
                let mut bytes = vec![0u8; payload.len()];
                payload.read_at(0, &mut bytes).expect("within payload");
                let packet = RawPacket {
                    packet_type: p.desc.packet_type,
                    flags: p.desc.flags,
                    txid: p.desc.transaction_id,
                    payload: bytes,
                };
                self.channel.flush()?;
                return Ok(Some(packet));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.channel.wait_for_work(Some(left))? == Wait::Stopped {
                return Ok(None);
            }
        }
    }

    /// Sends `payload` as an in-band packet with transaction id `txid`.
    pub fn send(&mut self, txid: u64, payload: &[u8]) -> Result<(), WriteError> {
        self.send_packet(packet_type::DATA_INBAND, txid, payload)
    }

    /// Sends a packet of any type.
    pub fn send_packet(&mut self, kind: u16, txid: u64, payload: &[u8]) -> Result<(), WriteError> {
        self.channel
            .outgoing
            .write_packet(kind, 0, txid, &[], payload)?;
        Ok(self.channel.flush()?)
    }

    /// Stops the host's worker (the channel closes).
    pub fn close(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for RawGuest {
    fn drop(&mut self) {
        self.close();
    }
}

impl VscChannel for RawGuest {
    fn offer(&self) -> &Offer {
        &self.offer
    }
    fn outgoing(&mut self) -> &mut OutgoingRing {
        &mut self.channel.outgoing
    }
    fn incoming(&mut self) -> &mut IncomingRing {
        &mut self.channel.incoming
    }
    fn flush(&mut self) -> Result<(), BusError> {
        Ok(self.channel.flush()?)
    }
    fn wait(&mut self, timeout: Duration) -> Result<Wait, BusError> {
        Ok(self.channel.wait_for_work(Some(timeout))?)
    }
}
