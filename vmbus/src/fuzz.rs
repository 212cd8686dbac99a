//! Fuzz harnesses, shared by the cargo-fuzz targets in `vmbus/fuzz` and by
//! proptests in the normal suite. Each takes arbitrary bytes and must never
//! panic, hang or touch memory out of bounds.

use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use crate::channel::ChannelWorker;
use crate::event::EventFd;
use crate::memory::SharedMemory;
use crate::packet::{GpaRanges, TransferPages};
use crate::ring::{IncomingRing, RingMemory};
use crate::server::{
    ChannelServer, ChannelSignals, Device, DeviceOffer, OpenError, OpenedChannel, Registry,
    Transport, TransportError,
};
use crate::wire::{InitiateContact, MessageHeader, PAGE_SIZE, msgtype, version};
use zerocopy::{FromZeros, IntoBytes};

/// Ring reader: the first 68 bytes become the control page (indices,
/// mask, pending size, feature bits), the rest the data area of a one-page
/// ring. Every packet read is also parsed as GPA-direct and transfer-page.
pub fn ring_reader(data: &[u8]) {
    let ring = RingMemory::new_private(1);
    let (control, body) = data.split_at(data.len().min(68));
    ring.write_control_bytes(control);
    ring.write_data_bytes(&body[..body.len().min(PAGE_SIZE)]);
    let Ok(mut reader) = IncomingRing::new(ring) else {
        return;
    };
    let mut ranges = GpaRanges::new();
    let mut pages = TransferPages::default();
    let mem = fuzz_memory();
    for _ in 0..64 {
        match reader.read() {
            Ok(Some(p)) => {
                let _ = p.payload().len();
                if ranges.parse(&p).is_ok() {
                    let _ = ranges.for_each_segment(mem, |_| {});
                }
                let _ = pages.parse(&p);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = reader.commit();
}

fn fuzz_memory() -> &'static SharedMemory {
    static MEM: OnceLock<SharedMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        SharedMemory::create(64 * PAGE_SIZE as u64)
            .expect("memfd")
            .0
    })
}

#[derive(Debug)]
struct NullTransport;

impl Transport for NullTransport {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        assert!(
            msg.len() <= crate::wire::MAX_MESSAGE_SIZE,
            "server sent an oversized message"
        );
        Ok(())
    }

    fn contact_memory(&mut self, _: &mut Vec<OwnedFd>) -> Result<SharedMemory, TransportError> {
        Ok(fuzz_memory().clone())
    }

    fn channel_signals(
        &mut self,
        _relid: u32,
        _connection_id: u32,
        _target_vp: u32,
        _: &mut Vec<OwnedFd>,
    ) -> Result<ChannelSignals, TransportError> {
        Ok(ChannelSignals {
            doorbell: Arc::new(EventFd::new()?),
            notify: Arc::new(EventFd::new()?),
        })
    }
}

#[derive(Debug)]
struct NullWorker;

impl ChannelWorker for NullWorker {
    fn stop(self: Box<Self>) {}
}

#[derive(Debug)]
struct NullDevice;

impl Device for NullDevice {
    fn offer(&self) -> DeviceOffer {
        DeviceOffer::new("null", Default::default(), Default::default())
    }

    fn open(&self, channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        if channel.subchannel_index == 0 {
            channel.control.offer_subchannels(2);
        }
        Ok(Box::new(NullWorker))
    }
}

/// Channel-message parser: after a valid contact and offer request, each
/// chunk `[len, bytes...]` of the input is one message from the peer.
/// Returns the most channels that were open at once.
pub fn channel_messages(data: &[u8]) -> usize {
    let registry = Registry::new();
    registry.add(Arc::new(NullDevice));
    let mut server = ChannelServer::new(Box::new(NullTransport), registry).expect("server");
    let mut contact = InitiateContact::new_zeroed();
    contact.header = MessageHeader::new(msgtype::INITIATE_CONTACT);
    contact.version_requested = version::WIN10_V5_3.into();
    server
        .handle_message(contact.as_bytes(), Vec::new())
        .expect("contact");
    server
        .handle_message(
            MessageHeader::new(msgtype::REQUESTOFFERS).as_bytes(),
            Vec::new(),
        )
        .expect("offers");
    let mut rest = data;
    let mut most_open = 0;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize).min(tail.len());
        let (msg, next) = tail.split_at(len);
        let _ = server.handle_message(msg, Vec::new());
        let _ = server.handle_requests();
        most_open = most_open.max(server.open_channels());
        rest = next;
    }
    most_open
}

/// Builds a message sequence that reaches deep states: GPADLs over real
/// pages and opens that use them, from a few seed numbers.
pub fn structured_messages(seed: &[u16]) -> Vec<u8> {
    use crate::gpadl::gpadl_messages;
    use crate::wire::{OpenChannel, RelidMessage};
    let mut out = Vec::new();
    let push = |out: &mut Vec<u8>, m: &[u8]| {
        out.push(m.len() as u8);
        out.extend_from_slice(m);
    };
    for (i, &s) in seed.iter().enumerate() {
        let relid = (s % 4) as u32;
        let gpadl = 100 + (s as u32 % 3);
        match s % 5 {
            0 | 1 => {
                let first = (s as u64 >> 3) % 70;
                let pfns: Vec<u64> = (first..first + 4 + (s as u64 % 40)).collect();
                for m in gpadl_messages(relid, gpadl, &pfns) {
                    push(&mut out, &m);
                }
            }
            2 => {
                let mut m = OpenChannel::new_zeroed();
                m.header = MessageHeader::new(msgtype::OPENCHANNEL);
                m.child_relid = relid.into();
                m.open_id = (i as u32).into();
                m.ring_gpadl = gpadl.into();
                m.downstream_ring_page_offset = ((s >> 8) as u32 % 8).into();
                push(&mut out, m.as_bytes());
            }
            3 => {
                let kind = [msgtype::CLOSECHANNEL, msgtype::RELID_RELEASED][(s >> 4) as usize % 2];
                let m = RelidMessage {
                    header: MessageHeader::new(kind),
                    child_relid: relid.into(),
                };
                push(&mut out, m.as_bytes());
            }
            _ => {
                let m = crate::wire::GpadlTeardown {
                    header: MessageHeader::new(msgtype::GPADL_TEARDOWN),
                    child_relid: relid.into(),
                    gpadl: gpadl.into(),
                };
                push(&mut out, m.as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn ring_reader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4200)) {
            ring_reader(&data);
        }

        #[test]
        fn ring_reader_with_plausible_indices(w in 0u32..512, r in 0u32..512, body in proptest::collection::vec(any::<u8>(), 0..600)) {
            // Aligned indices inside the ring make the reader parse packets.
            let mut data = vec![0u8; 68];
            data[0..4].copy_from_slice(&(w * 8).to_le_bytes());
            data[4..8].copy_from_slice(&(r * 8).to_le_bytes());
            data.extend_from_slice(&body);
            ring_reader(&data);
        }

        #[test]
        fn channel_messages_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = channel_messages(&data);
        }

        #[test]
        fn structured_channel_messages_never_panic(seed in proptest::collection::vec(any::<u16>(), 0..40), noise in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut data = structured_messages(&seed);
            data.extend_from_slice(&noise);
            let _ = channel_messages(&data);
        }
    }

    #[test]
    fn structured_messages_reach_open_channels() {
        // Seed 21: GPADL 100 of 25 pages for relid 1; seed 597: open relid 1
        // on GPADL 100 with the downstream ring at page 2.
        assert_eq!(channel_messages(&structured_messages(&[21, 597])), 1);
        // Without the GPADL the open is refused.
        assert_eq!(channel_messages(&structured_messages(&[597])), 0);
    }
}
