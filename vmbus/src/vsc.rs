//! What a VSC's protocol logic needs from the VMBus under it, so that one
//! implementation of a guest driver's protocol (the netvsc client in
//! `switch::netvsp::client`) runs unchanged over hosted mode and inside a
//! VM.
//!
//! ```text
//!  protocol logic (NVSP/RNDIS, ...)      generic over VscBus + VscChannel
//!        │                    │
//!   VscBus (control)     VscChannel (data)
//!   memory, pages,       rings, flush = publish + signal the host,
//!   GPADLs, open,        wait = sleep until the host signals
//!   offers
//!        │                    │
//!  hosted::client::HostedClient / ClientChannel: Unix socket, memfd, eventfds
//!  vmm::testguest::GuestVsc / GuestChannel:      HvPostMessage, SINT2 slot,
//!                                                HvSignalEvent, SIEFP + vector
//! ```
//!
//! A bus allocates pages of the peer's memory (the client's memfd, or the
//! VM's RAM), registers them as GPADLs and opens channels with their rings
//! in that memory. A channel hands out its two rings; `flush` publishes
//! what was read and written and signals the host when the ring rules ask
//! for it, `wait` re-enables host signals and sleeps until one comes.
//!
//! Errors of the layer below are boxed ([`BusError`]): the protocol logic
//! only reports them.

use std::time::Duration;

use zerocopy::FromBytes;

use crate::channel::Wait;
use crate::guid::Guid;
use crate::memory::SharedMemory;
use crate::ring::{IncomingRing, OutgoingRing};
use crate::wire::{OfferChannel, PAGE_SIZE};

/// An error of the transport under a VSC.
pub type BusError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An offer as a guest receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub relid: u32,
    pub interface: Guid,
    pub instance: Guid,
    pub subchannel_index: u16,
    pub connection_id: u32,
}

impl Offer {
    /// Parses an OFFERCHANNEL message (None if it is too short).
    pub fn parse(msg: &[u8]) -> Option<Offer> {
        let (m, _) = OfferChannel::read_from_prefix(msg).ok()?;
        Some(Offer {
            relid: m.child_relid.get(),
            interface: m.offer.interface_type,
            instance: m.offer.interface_instance,
            subchannel_index: m.offer.sub_channel_index.get(),
            connection_id: m.connection_id.get(),
        })
    }
}

/// Contiguous pages of the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages {
    pub first_pfn: u64,
    pub count: u64,
}

impl Pages {
    pub fn gpa(&self) -> u64 {
        self.first_pfn * PAGE_SIZE as u64
    }
    pub fn len(&self) -> usize {
        (self.count as usize) * PAGE_SIZE
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn pfns(&self) -> Vec<u64> {
        (self.first_pfn..self.first_pfn + self.count).collect()
    }
}

/// An open channel, guest side.
pub trait VscChannel {
    /// The offer the channel was opened from.
    fn offer(&self) -> &Offer;
    /// The guest-to-host ring.
    fn outgoing(&mut self) -> &mut OutgoingRing;
    /// The host-to-guest ring.
    fn incoming(&mut self) -> &mut IncomingRing;
    /// Publishes what was read and written; signals the host once if
    /// either ring's rules ask for it.
    fn flush(&mut self) -> Result<(), BusError>;
    /// Flushes, re-enables host signals and sleeps until the host signals
    /// the channel or `timeout` passes ([`Wait::Ready`] at once if packets
    /// are already waiting).
    fn wait(&mut self, timeout: Duration) -> Result<Wait, BusError>;
}

/// The VMBus control plane, guest side.
pub trait VscBus {
    type Channel: VscChannel;
    /// The guest's memory (buffers are read and written through it).
    fn memory(&self) -> &SharedMemory;
    /// Allocates zeroed contiguous pages of guest memory.
    fn alloc_pages(&mut self, count: u64) -> Result<Pages, BusError>;
    /// Registers pages (in this order) as a GPADL of channel `relid`.
    fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, BusError>;
    /// Opens a channel with rings of `out_pages` (guest-to-host) and
    /// `in_pages` pages, control pages included, and zero user data.
    fn open_channel(
        &mut self,
        offer: &Offer,
        out_pages: u64,
        in_pages: u64,
    ) -> Result<Self::Channel, BusError>;
    /// Waits for the next offer (sub-channels, hot add).
    fn wait_offer(&mut self) -> Result<Offer, BusError>;
}
