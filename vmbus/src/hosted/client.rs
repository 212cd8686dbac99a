//! The guest side of hosted mode: a minimal VSC library.
//!
//! [`HostedClient`] owns a sealed memfd as its guest memory, negotiates a
//! VMBus version, collects offers, builds GPADLs and opens channels, sending
//! each channel message byte for byte as a Linux guest does. Tests,
//! benchmarks and the storage/network client libraries sit on top of it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::socket::{self, RECV_BUFFER, Received};
use crate::channel::Channel;
use crate::event::{EventFd, poll_readable};
use crate::gpadl::gpadl_messages;
use crate::memory::{MemoryError, SharedMemory, SharedSlice};
use crate::ring::{IncomingRing, OutgoingRing, RingError, RingMemory};
use crate::server::SUPPORTED_VERSIONS;
use crate::vsc::{BusError, VscBus, VscChannel};
pub use crate::vsc::{Offer, Pages};
use crate::wire::{
    GpadlCreated, GpadlTorndown, InitiateContact, MessageHeader, OpenChannel, OpenResult,
    PAGE_SIZE, RelidMessage, USER_DEFINED_BYTES, VersionResponse, msgtype,
};
use crate::worker::StopToken;

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("host refused every VMBus version")]
    NoVersion,
    #[error("host closed the connection")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("host answered {what} with status {status:#x}")]
    Refused { what: &'static str, status: u32 },
    #[error("out of client memory for {0} pages")]
    OutOfPages(usize),
}

/// First-fit page allocator over the client's memory.
#[derive(Debug)]
struct PageAllocator {
    /// Free runs: start page -> page count.
    free: BTreeMap<u64, u64>,
}

impl PageAllocator {
    fn new(pages: u64) -> Self {
        PageAllocator {
            free: BTreeMap::from([(0, pages)]),
        }
    }

    fn alloc(&mut self, n: u64) -> Option<u64> {
        let (&start, &len) = self.free.iter().find(|(_, len)| **len >= n)?;
        self.free.remove(&start);
        if len > n {
            self.free.insert(start + n, len - n);
        }
        Some(start)
    }

    fn release(&mut self, start: u64, n: u64) {
        let mut start = start;
        let mut n = n;
        if let Some((&prev, &plen)) = self.free.range(..start).next_back()
            && prev + plen == start
        {
            self.free.remove(&prev);
            start = prev;
            n += plen;
        }
        if let Some(&next_len) = self.free.get(&(start + n)) {
            self.free.remove(&(start + n));
            n += next_len;
        }
        self.free.insert(start, n);
    }
}

/// An open channel, client side.
#[derive(Debug)]
pub struct ClientChannel {
    pub offer: Offer,
    /// Guest-to-host ring as `outgoing`, host-to-guest as `incoming`.
    pub channel: Channel,
    gpadl: u32,
    pages: Pages,
    out_pages: u64,
}

impl ClientChannel {
    pub fn relid(&self) -> u32 {
        self.offer.relid
    }

    /// The pages holding both rings (guest-to-host ring first).
    pub fn ring_pages(&self) -> Pages {
        self.pages
    }

    /// Pages of the guest-to-host ring, control page included.
    pub fn out_ring_pages(&self) -> u64 {
        self.out_pages
    }
}

/// Default time to wait for a host reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A hosted-mode VMBus client.
#[derive(Debug)]
pub struct HostedClient {
    sock: OwnedFd,
    memory: SharedMemory,
    memfd: OwnedFd,
    pages: PageAllocator,
    version: u32,
    queued: VecDeque<Vec<u8>>,
    next_gpadl: u32,
    buf: Vec<u8>,
    /// Host messages Linux would drop ([`HostedClient::dropped_messages`]).
    dropped: u64,
    /// Relids of the channels open through this client.
    open: BTreeSet<u32>,
}

impl HostedClient {
    /// Connects, shares `memory_bytes` of fresh memory and negotiates the
    /// newest version the host accepts.
    pub fn connect(path: &Path, memory_bytes: u64) -> Result<Self, ClientError> {
        let sock = socket::connect(path)?;
        let (memory, memfd) = SharedMemory::create(memory_bytes)?;
        let mut client = HostedClient {
            sock,
            pages: PageAllocator::new(memory.size() / PAGE_SIZE as u64),
            memory,
            memfd,
            version: 0,
            queued: VecDeque::new(),
            next_gpadl: 0xE1E10,
            buf: vec![0; RECV_BUFFER],
            dropped: 0,
            open: BTreeSet::new(),
        };
        client.negotiate()?;
        Ok(client)
    }

    fn negotiate(&mut self) -> Result<(), ClientError> {
        for v in SUPPORTED_VERSIONS.iter().copied() {
            let mut m = InitiateContact::new_zeroed();
            m.header = MessageHeader::new(msgtype::INITIATE_CONTACT);
            m.version_requested = v.into();
            m.interrupt_page_or_sint = 2.into(); // msg_sint = VMBUS_MESSAGE_SINT
            socket::send(&self.sock, m.as_bytes(), &[self.memfd.as_raw_fd()])?;
            let reply = self.wait_for(msgtype::VERSION_RESPONSE, "VERSION_RESPONSE")?;
            let (r, _) =
                VersionResponse::read_from_prefix(&reply).map_err(|_| ClientError::NoVersion)?;
            if r.version_supported == 1 {
                self.version = v;
                return Ok(());
            }
        }
        Err(ClientError::NoVersion)
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    /// Sends a raw channel message (tests use this to misbehave).
    pub fn send_raw(&self, msg: &[u8], fds: &[&dyn AsFd]) -> Result<(), ClientError> {
        let raw: Vec<_> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        Ok(socket::send(&self.sock, msg, &raw)?)
    }

    /// Receives the next message from the host (queued ones first).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, ClientError> {
        if let Some(m) = self.queued.pop_front() {
            return Ok(Some(m));
        }
        self.recv_socket(timeout)
    }

    fn recv_socket(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, ClientError> {
        let [ready] = poll_readable([self.sock.as_fd()], Some(timeout));
        if !ready {
            return Ok(None);
        }
        match socket::recv(&self.sock, &mut self.buf)? {
            Received::Message { len, .. } => Ok(self.linux_accepts(len)),
            Received::Closed => Err(ClientError::Closed),
        }
    }

    /// The received message of `len` bytes if Linux would take it
    /// ([`crate::linux`]: `vmbus_on_msg_dpc`, and `vmbus_channel_map_relid`
    /// for offers); otherwise it is dropped and counted, as Linux drops it.
    fn linux_accepts(&mut self, len: usize) -> Option<Vec<u8>> {
        let msg = &self.buf[..len];
        let checked = crate::linux::on_msg_dpc(msg).and_then(|t| match Offer::parse(msg) {
            Some(o) if t == msgtype::OFFERCHANNEL => crate::linux::map_relid(o.relid),
            _ => Ok(()),
        });
        match checked {
            Ok(()) => Some(msg.to_vec()),
            Err(e) => {
                tracing::warn!("host message dropped as Linux drops it: {e}");
                self.dropped += 1;
                None
            }
        }
    }

    /// Host messages dropped because Linux would drop them.
    pub fn dropped_messages(&self) -> u64 {
        self.dropped
    }

    /// Waits for a message of type `kind`; others are queued for `recv`.
    pub fn wait_for(&mut self, kind: u32, what: &'static str) -> Result<Vec<u8>, ClientError> {
        self.wait_matching(what, |m| msg_type(m) == Some(kind))
    }

    fn wait_matching(
        &mut self,
        what: &'static str,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, ClientError> {
        if let Some(i) = self.queued.iter().position(|m| pred(m)) {
            return Ok(self.queued.remove(i).expect("present"));
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(what));
            }
            if let Some(m) = self.recv_socket(left)? {
                if pred(&m) {
                    return Ok(m);
                }
                self.queued.push_back(m);
            }
        }
    }

    /// Asks for offers and collects them until ALLOFFERS_DELIVERED.
    pub fn request_offers(&mut self) -> Result<Vec<Offer>, ClientError> {
        socket::send(
            &self.sock,
            MessageHeader::new(msgtype::REQUESTOFFERS).as_bytes(),
            &[],
        )?;
        let mut offers = Vec::new();
        loop {
            let m = self.wait_matching("offers", |m| {
                matches!(
                    msg_type(m),
                    Some(msgtype::OFFERCHANNEL | msgtype::ALLOFFERS_DELIVERED)
                )
            })?;
            match Offer::parse(&m) {
                Some(o) if msg_type(&m) == Some(msgtype::OFFERCHANNEL) => offers.push(o),
                _ => return Ok(offers),
            }
        }
    }

    /// Waits for the next offer (sub-channels, hot add, re-offers).
    pub fn wait_offer(&mut self) -> Result<Offer, ClientError> {
        let m = self.wait_for(msgtype::OFFERCHANNEL, "OFFERCHANNEL")?;
        Offer::parse(&m).ok_or(ClientError::Timeout("a well-formed offer"))
    }

    /// Waits for the host to rescind `relid` (without answering).
    pub fn wait_rescind(&mut self, relid: u32) -> Result<(), ClientError> {
        self.wait_matching("RESCIND_CHANNELOFFER", |m| {
            msg_type(m) == Some(msgtype::RESCIND_CHANNELOFFER)
                && RelidMessage::read_from_prefix(m)
                    .is_ok_and(|(r, _)| r.child_relid.get() == relid)
        })?;
        Ok(())
    }

    /// Answers the host's rescinds of channels that are not open, as
    /// Linux's `vmbus_onoffer_rescind` does (drivers/hv/channel_mgmt.c: a
    /// closed sub-channel goes to `hv_process_channel_removal`, which sends
    /// RELID_RELEASED; a closed primary is unregistered and released the
    /// same way): every rescind already received is handled, without
    /// waiting for more. Returns the relids released; rescinds of open
    /// channels stay queued for their owner.
    pub fn release_closed_rescinds(&mut self) -> Result<Vec<u32>, ClientError> {
        while let Some(m) = self.recv_socket(Duration::ZERO)? {
            self.queued.push_back(m);
        }
        let mut released = Vec::new();
        let mut keep = VecDeque::with_capacity(self.queued.len());
        for m in std::mem::take(&mut self.queued) {
            match rescinded_relid(&m) {
                Some(relid) if !self.open.contains(&relid) => released.push(relid),
                _ => keep.push_back(m),
            }
        }
        self.queued = keep;
        for &relid in &released {
            self.release_relid(relid)?;
        }
        Ok(released)
    }

    /// Sends RELID_RELEASED.
    pub fn release_relid(&mut self, relid: u32) -> Result<(), ClientError> {
        let m = RelidMessage {
            header: MessageHeader::new(msgtype::RELID_RELEASED),
            child_relid: relid.into(),
        };
        Ok(socket::send(&self.sock, m.as_bytes(), &[])?)
    }

    /// Allocates zeroed contiguous pages of client memory.
    pub fn alloc_pages(&mut self, count: u64) -> Result<Pages, ClientError> {
        let first_pfn = self
            .pages
            .alloc(count)
            .ok_or(ClientError::OutOfPages(count as usize))?;
        let pages = Pages { first_pfn, count };
        self.slice(&pages).zero();
        Ok(pages)
    }

    pub fn free_pages(&mut self, pages: Pages) {
        self.pages.release(pages.first_pfn, pages.count);
    }

    /// Client memory of `pages`.
    pub fn slice(&self, pages: &Pages) -> SharedSlice<'_> {
        self.memory
            .slice(pages.gpa(), pages.len())
            .expect("allocated pages lie in memory")
    }

    /// Registers pages as a GPADL for channel `relid`; returns its id.
    pub fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, ClientError> {
        let id = self.next_gpadl;
        self.next_gpadl += 1;
        for m in gpadl_messages(relid, id, pfns) {
            socket::send(&self.sock, &m, &[])?;
        }
        let reply = self.wait_matching("GPADL_CREATED", |m| {
            msg_type(m) == Some(msgtype::GPADL_CREATED)
                && GpadlCreated::read_from_prefix(m).is_ok_and(|(r, _)| r.gpadl.get() == id)
        })?;
        let (r, _) = GpadlCreated::read_from_prefix(&reply).expect("matched");
        match r.creation_status.get() {
            0 => Ok(id),
            status => Err(ClientError::Refused {
                what: "GPADL",
                status,
            }),
        }
    }

    /// Tears a GPADL down and waits for the host's answer.
    pub fn teardown_gpadl(&mut self, relid: u32, id: u32) -> Result<(), ClientError> {
        let m = crate::wire::GpadlTeardown {
            header: MessageHeader::new(msgtype::GPADL_TEARDOWN),
            child_relid: relid.into(),
            gpadl: id.into(),
        };
        socket::send(&self.sock, m.as_bytes(), &[])?;
        self.wait_matching("GPADL_TORNDOWN", |m| {
            msg_type(m) == Some(msgtype::GPADL_TORNDOWN)
                && GpadlTorndown::read_from_prefix(m).is_ok_and(|(r, _)| r.gpadl.get() == id)
        })?;
        Ok(())
    }

    /// Opens a channel with rings of `out_pages` (guest-to-host) and
    /// `in_pages` (host-to-guest) pages, control pages included.
    pub fn open_channel(
        &mut self,
        offer: &Offer,
        out_pages: u64,
        in_pages: u64,
        user_data: &[u8],
    ) -> Result<ClientChannel, ClientError> {
        let pages = self.alloc_pages(out_pages + in_pages)?;
        let pfns = pages.pfns();
        let ring = |p: &[u64]| -> Result<Arc<RingMemory>, ClientError> {
            let r = RingMemory::from_pages(self.memory.map_ring(p)?)?;
            r.init_control();
            Ok(r)
        };
        let out_mem = ring(&pfns[..out_pages as usize])?;
        let in_mem = ring(&pfns[out_pages as usize..])?;
        let gpadl = match self.create_gpadl(offer.relid, &pfns) {
            Ok(g) => g,
            Err(e) => {
                self.free_pages(pages);
                return Err(e);
            }
        };
        let to_host = EventFd::new()?;
        let from_host = EventFd::new()?;
        let mut m = OpenChannel::new_zeroed();
        m.header = MessageHeader::new(msgtype::OPENCHANNEL);
        m.child_relid = offer.relid.into();
        m.open_id = offer.relid.into();
        m.ring_gpadl = gpadl.into();
        m.downstream_ring_page_offset = (out_pages as u32).into();
        let n = user_data.len().min(USER_DEFINED_BYTES);
        m.user_data[..n].copy_from_slice(&user_data[..n]);
        socket::send(
            &self.sock,
            m.as_bytes(),
            &[to_host.as_raw_fd(), from_host.as_raw_fd()],
        )?;
        let relid = offer.relid;
        let reply = self.wait_matching("OPENCHANNEL_RESULT", |m| {
            msg_type(m) == Some(msgtype::OPENCHANNEL_RESULT)
                && OpenResult::read_from_prefix(m).is_ok_and(|(r, _)| r.child_relid.get() == relid)
        })?;
        let (r, _) = OpenResult::read_from_prefix(&reply).expect("matched");
        if r.status.get() != 0 {
            self.teardown_gpadl(relid, gpadl)?;
            self.free_pages(pages);
            return Err(ClientError::Refused {
                what: "OPENCHANNEL",
                status: r.status.get(),
            });
        }
        self.open.insert(relid);
        let channel = Channel::new(
            IncomingRing::new(in_mem)?,
            OutgoingRing::new(out_mem)?,
            Arc::new(from_host),
            Arc::new(to_host),
            StopToken::new()?,
        );
        Ok(ClientChannel {
            offer: offer.clone(),
            channel,
            gpadl,
            pages,
            out_pages,
        })
    }

    /// Closes a channel: CLOSECHANNEL, then the ring GPADL's teardown.
    pub fn close_channel(&mut self, ch: ClientChannel) -> Result<(), ClientError> {
        let m = RelidMessage {
            header: MessageHeader::new(msgtype::CLOSECHANNEL),
            child_relid: ch.offer.relid.into(),
        };
        socket::send(&self.sock, m.as_bytes(), &[])?;
        self.open.remove(&ch.offer.relid);
        self.teardown_gpadl(ch.offer.relid, ch.gpadl)?;
        let pages = ch.pages;
        drop(ch);
        self.free_pages(pages);
        Ok(())
    }

    /// Handles the host's rescind of an open channel as Linux does: close,
    /// tear the ring GPADL down, release the relid.
    pub fn release_rescinded(&mut self, ch: ClientChannel) -> Result<(), ClientError> {
        let relid = ch.relid();
        self.close_channel(ch)?;
        self.release_relid(relid)
    }

    /// Sends UNLOAD and waits for UNLOAD_RESPONSE.
    pub fn unload(&mut self) -> Result<(), ClientError> {
        socket::send(
            &self.sock,
            MessageHeader::new(msgtype::UNLOAD).as_bytes(),
            &[],
        )?;
        self.wait_for(msgtype::UNLOAD_RESPONSE, "UNLOAD_RESPONSE")?;
        Ok(())
    }
}

impl VscChannel for ClientChannel {
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

    fn wait(&mut self, timeout: Duration) -> Result<crate::channel::Wait, BusError> {
        Ok(self.channel.wait_for_work(Some(timeout))?)
    }
}

impl VscBus for HostedClient {
    type Channel = ClientChannel;

    fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    fn alloc_pages(&mut self, count: u64) -> Result<Pages, BusError> {
        Ok(HostedClient::alloc_pages(self, count)?)
    }

    fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, BusError> {
        Ok(HostedClient::create_gpadl(self, relid, pfns)?)
    }

    fn open_channel(
        &mut self,
        offer: &Offer,
        out_pages: u64,
        in_pages: u64,
    ) -> Result<ClientChannel, BusError> {
        Ok(HostedClient::open_channel(
            self,
            offer,
            out_pages,
            in_pages,
            &[0; USER_DEFINED_BYTES],
        )?)
    }

    fn wait_offer(&mut self) -> Result<Offer, BusError> {
        Ok(HostedClient::wait_offer(self)?)
    }
}

/// The relid a RESCIND_CHANNELOFFER names (None for other messages).
fn rescinded_relid(msg: &[u8]) -> Option<u32> {
    (msg_type(msg) == Some(msgtype::RESCIND_CHANNELOFFER))
        .then(|| RelidMessage::read_from_prefix(msg).ok())
        .flatten()
        .map(|(r, _)| r.child_relid.get())
}

/// The type of a channel message.
pub fn msg_type(msg: &[u8]) -> Option<u32> {
    MessageHeader::read_from_prefix(msg)
        .ok()
        .map(|(h, _)| h.msgtype.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_coalesces() {
        let mut a = PageAllocator::new(10);
        let x = a.alloc(3).unwrap();
        let y = a.alloc(3).unwrap();
        let z = a.alloc(4).unwrap();
        assert_eq!((x, y, z), (0, 3, 6));
        assert!(a.alloc(1).is_none());
        a.release(y, 3);
        a.release(x, 3);
        assert_eq!(a.alloc(6), Some(0));
        a.release(0, 6);
        a.release(z, 4);
        assert_eq!(a.free, BTreeMap::from([(0, 10)]));
    }
}
