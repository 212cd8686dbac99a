//! What a Linux 6.1 guest's VMBus driver accepts from the host, written as
//! Linux's own checks, so that the guest-side libraries (the hosted client,
//! and through it the netvsc and storvsc clients) drop exactly what Linux
//! drops. A host message Linux drops leaves its waiter blocked forever; the
//! clients then time out where a Linux guest would hang, and the tests see
//! it.
//!
//! Each function names the Linux function it mirrors (drivers/hv/).

use zerocopy::FromBytes;

use crate::wire::{MAX_CHANNEL_RELIDS, MessageHeader, msgtype};

/// `CHANNELMSG_COUNT`: message types past the table are dropped.
const CHANNELMSG_COUNT: u32 = 25;
/// `HV_MESSAGE_PAYLOAD_BYTE_COUNT`.
const MESSAGE_PAYLOAD_BYTES: usize = 240;

/// Why Linux drops a host message or an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("message shorter than a channel message header")]
    NoHeader,
    #[error("message type {0} is past CHANNELMSG_COUNT")]
    UnknownType(u32),
    #[error("message of {0} bytes is larger than a SynIC message payload")]
    TooLarge(usize),
    #[error("message type {0} has no guest handler")]
    NoHandler(u32),
    #[error("message type {msgtype} of {len} bytes is shorter than its {min}")]
    TooShort {
        msgtype: u32,
        len: usize,
        min: usize,
    },
    #[error("relid {0} is not below MAX_CHANNEL_RELIDS")]
    Relid(u32),
}

/// `channel_message_table[msgtype].min_payload_len` for the messages a
/// guest handles (drivers/hv/channel_mgmt.c); None: no handler (host
/// messages of that type are dropped).
pub fn min_payload_len(kind: u32) -> Option<usize> {
    use msgtype as t;
    Some(match kind {
        t::OFFERCHANNEL => 196,
        t::RESCIND_CHANNELOFFER => 12,
        t::ALLOFFERS_DELIVERED => 0,
        t::OPENCHANNEL_RESULT => 20,
        t::GPADL_CREATED => 20,
        t::GPADL_TORNDOWN => 12,
        t::VERSION_RESPONSE => 16,
        t::UNLOAD_RESPONSE => 0,
        t::MODIFYCHANNEL_RESPONSE => 16,
        _ => return None,
    })
}

/// `vmbus_on_msg_dpc` (drivers/hv/vmbus_drv.c): the message type of a host
/// message Linux hands to its handler, or why it drops the message.
pub fn on_msg_dpc(msg: &[u8]) -> Result<u32, Dropped> {
    let (h, _) = MessageHeader::read_from_prefix(msg).map_err(|_| Dropped::NoHeader)?;
    let msgtype = h.msgtype.get();
    if msgtype >= CHANNELMSG_COUNT {
        return Err(Dropped::UnknownType(msgtype));
    }
    if msg.len() > MESSAGE_PAYLOAD_BYTES {
        return Err(Dropped::TooLarge(msg.len()));
    }
    let min = min_payload_len(msgtype).ok_or(Dropped::NoHandler(msgtype))?;
    if msg.len() < min {
        return Err(Dropped::TooShort {
            msgtype,
            len: msg.len(),
            min,
        });
    }
    Ok(msgtype)
}

/// `vmbus_channel_map_relid` (drivers/hv/channel_mgmt.c): `if
/// (WARN_ON(channel->offermsg.child_relid >= MAX_CHANNEL_RELIDS)) return;`
/// — a channel Linux does not map never gets its interrupts.
pub fn map_relid(relid: u32) -> Result<(), Dropped> {
    if relid >= MAX_CHANNEL_RELIDS {
        return Err(Dropped::Relid(relid));
    }
    Ok(())
}

/// `hv_pkt_iter_first` (drivers/hv/ring_buffer.c) copies at most the
/// channel's `max_pkt_size` bytes of a packet (descriptor included) into
/// its private buffer: a longer packet is cut short. True if a packet of
/// `len` bytes (`len8 << 3`) arrives whole.
pub fn packet_fits(len: usize, max_pkt_size: usize) -> bool {
    len <= max_pkt_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checks_of_vmbus_on_msg_dpc() {
        assert_eq!(on_msg_dpc(&[4, 0, 0, 0, 0, 0, 0, 0]), Ok(4));
        assert_eq!(
            on_msg_dpc(&[6, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
            Err(Dropped::TooShort {
                msgtype: 6,
                len: 12,
                min: 20
            })
        );
        assert_eq!(
            on_msg_dpc(&[5, 0, 0, 0, 0, 0, 0, 0]),
            Err(Dropped::NoHandler(5))
        );
        assert_eq!(
            on_msg_dpc(&[25, 0, 0, 0, 0, 0, 0, 0]),
            Err(Dropped::UnknownType(25))
        );
        assert_eq!(on_msg_dpc(&[1, 0]), Err(Dropped::NoHeader));
        assert_eq!(map_relid(2047), Ok(()));
        assert_eq!(map_relid(2048), Err(Dropped::Relid(2048)));
    }
}
