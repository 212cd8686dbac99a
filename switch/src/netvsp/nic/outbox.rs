//! Replies to the guest and where they wait: NVSP completions, RNDIS
//! control messages (which go through the receive buffer as one-range
//! transfer-page packets) and in-band NVSP messages. A reply goes out at
//! once when nothing is queued before it and it fits; otherwise it waits in
//! the channel's [`Outbox`], in order, and frames for that channel are
//! dropped until the outbox has drained (replies wait for the ring, frames
//! do not).

use std::collections::VecDeque;

use vmbus::packet::write_transfer_pages;
use vmbus::ring::{RingError, WriteError};
use vmbus::wire::PACKET_FLAG_COMPLETION_REQUESTED;

use super::{Chan, NicCore};
use crate::netvsp::nvsp;

/// Control replies a channel holds for a full ring before dropping more.
const MAX_OUTBOX: usize = 256;

/// A reply waiting for ring or receive-buffer space.
#[derive(Debug)]
pub(super) enum Reply {
    /// A completion packet.
    Completion { tid: u64, bytes: [u8; 40], len: u8 },
    /// An RNDIS control message for the receive buffer.
    Control(Vec<u8>),
    /// An in-band NVSP message (the send indirection table).
    Inband(Vec<u8>),
}

impl Reply {
    /// Bytes after the packet descriptor this reply takes in the ring.
    fn payload_len(&self) -> usize {
        match self {
            Reply::Completion { len, .. } => usize::from(*len),
            // Transfer-page header with one range, then the 16-byte
            // SEND_RNDIS_PKT.
            Reply::Control(_) => 16 + 16,
            Reply::Inband(b) => b.len(),
        }
    }
}

/// A channel's replies waiting for ring space, oldest first.
#[derive(Debug, Default)]
pub(super) struct Outbox(VecDeque<Reply>);

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Payload bytes the first waiting reply needs, if one waits.
    pub fn waiting_for(&self) -> Option<usize> {
        self.0.front().map(Reply::payload_len)
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl NicCore {
    /// Completes the guest's packet `tid` with `bytes` (an NVSP message).
    pub(super) fn complete(
        &mut self,
        c: &mut Chan,
        tid: u64,
        bytes: &[u8],
    ) -> Result<(), RingError> {
        let mut b = [0u8; 40];
        b[..bytes.len()].copy_from_slice(bytes);
        let reply = Reply::Completion {
            tid,
            bytes: b,
            len: bytes.len() as u8,
        };
        self.queue(c, reply)
    }

    /// Sends `reply` now if nothing is queued before it and it fits, else
    /// queues it (control replies beyond [`MAX_OUTBOX`] are dropped and
    /// counted; completions never are).
    pub(super) fn queue(&mut self, c: &mut Chan, reply: Reply) -> Result<(), RingError> {
        if c.outbox.is_empty() && self.try_send(c, &reply)? {
            return Ok(());
        }
        if c.outbox.0.len() >= MAX_OUTBOX && !matches!(reply, Reply::Completion { .. }) {
            self.count(|c| &c.drop_control_replies, 1);
            return Ok(());
        }
        c.outbox.0.push_back(reply);
        Ok(())
    }

    /// Writes queued replies; true if the outbox is empty afterwards.
    pub(super) fn drain_outbox(&mut self, c: &mut Chan) -> Result<bool, RingError> {
        while let Some(reply) = c.outbox.0.pop_front() {
            if !self.try_send(c, &reply)? {
                c.outbox.0.push_front(reply);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes one reply; false if the ring or receive buffer is full.
    fn try_send(&mut self, c: &mut Chan, reply: &Reply) -> Result<bool, RingError> {
        let r = match reply {
            Reply::Completion { tid, bytes, len } => {
                c.ch.outgoing
                    .write_completion(*tid, &bytes[..usize::from(*len)])
            }
            Reply::Inband(b) => c.ch.outgoing.write_inband(0, false, b),
            Reply::Control(msg) => return self.send_control_now(c, msg),
        };
        match r {
            Ok(()) => Ok(true),
            Err(WriteError::Full { .. }) => Ok(false),
            Err(WriteError::Ring(e)) => Err(e),
        }
    }

    /// Puts an RNDIS control message into the receive buffer and sends it
    /// as a one-range control packet. False if the ring is full (the reply
    /// waits); a reply that finds no receive buffer, or no space in it, is
    /// dropped and counted, like a frame: only a guest that has not given
    /// a receive buffer or does not complete its receives gets there, and
    /// waiting for it would stall the channel.
    fn send_control_now(&mut self, c: &mut Chan, msg: &[u8]) -> Result<bool, RingError> {
        let Some(rx) = self.state.rx_mut() else {
            self.count(|c| &c.drop_control_replies, 1);
            return Ok(true);
        };
        let off = match rx.ring.table_full() {
            false => rx.ring.alloc(msg.len() as u32),
            true => None,
        };
        let Some(off) = off else {
            self.count(|c| &c.drop_control_replies, 1);
            return Ok(true);
        };
        let tid = rx.ring.next_tid();
        let _ = rx.recv.map.slice().write_at(off as usize, msg);
        let payload = nvsp::rndis_pkt_payload(nvsp::channel_type::CONTROL);
        match write_transfer_pages(
            &mut c.ch.outgoing,
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            nvsp::RECV_BUFFER_ID,
            &[(msg.len() as u32, off)],
            &payload,
        ) {
            Ok(()) => {
                rx.ring.commit();
                Ok(true)
            }
            Err(WriteError::Full { .. }) => {
                rx.ring.rollback();
                Ok(false)
            }
            Err(WriteError::Ring(e)) => Err(e),
        }
    }
}
