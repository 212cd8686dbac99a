//! Fuzz harness for the storage VSP's packet and CDB handling, shared by
//! `storage/fuzz` and the proptests. It runs the real worker over private
//! rings against a small raw disk: a Linux guest's initialisation, then
//! packets built from the input (which may themselves be initialisation
//! requests, out of order by then).

use std::sync::{Arc, OnceLock};

use vmbus::SharedMemory;
use vmbus::event::EventFd;
use vmbus::packet::write_gpa_direct;
use vmbus::ring::OutgoingRing;
use vmbus::ring::private_pair;
use vmbus::server::{ChannelSignals, ControlHandle, GpadlMap, OpenedChannel};
use vmbus::wire::packet_type;
use zerocopy::IntoBytes;

use crate::controller::{Controller, ControllerConfig, DEFAULT_MAX_TRANSFER, Lun};
use crate::protocol::{ProtocolVersion, VstorPacket, operation, version};

/// Pages of the fuzzed guest's memory.
const MEMORY_PAGES: u64 = 64;
/// Bytes of input per packet.
const CHUNK: usize = 80;

struct Fixture {
    controller: Controller,
    memory: SharedMemory,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk_path = dir.path().join("disk.img");
        vhd::create::create_raw(&disk_path, 1 << 20).expect("raw disk");
        let iso_path = dir.path().join("media.iso");
        vhd::create::create_raw(&iso_path, 64 * 2048).expect("iso stand-in");
        let options = vhd::DiskOptions::default().cache(vhd::CacheMode::Cached);
        let disk = vhd::open_as(&disk_path, vhd::Format::Raw, &options).expect("open disk");
        let controller = Controller::new(ControllerConfig::new("fuzz", Default::default()));
        controller
            .add_lun(0, Lun::disk(disk, DEFAULT_MAX_TRANSFER))
            .expect("lun 0");
        controller.add_lun(1, Lun::dvd(None)).expect("lun 1");
        let (memory, _fd) = SharedMemory::create(MEMORY_PAGES * 4096).expect("memfd");
        Fixture {
            controller,
            memory,
            _dir: dir,
        }
    })
}

/// The initialisation requests of a Linux guest (each answered).
const INIT_REQUESTS: usize = 4;

fn write_init(to_vsp: &mut OutgoingRing) {
    let ops = [
        operation::BEGIN_INITIALIZATION,
        operation::QUERY_PROTOCOL_VERSION,
        operation::QUERY_PROPERTIES,
        operation::END_INITIALIZATION,
    ];
    for (i, op) in ops.into_iter().enumerate() {
        let mut p = VstorPacket::new(op, 0);
        p.set_body(&ProtocolVersion {
            major_minor: version::WIN10.into(),
            revision: 0.into(),
        });
        let txid = u64::MAX - i as u64;
        to_vsp
            .write_packet(packet_type::DATA_INBAND, 1, txid, &[], p.as_bytes())
            .expect("room for initialisation");
    }
}

/// Runs the worker over packets made from `data`, after the guest's
/// initialisation: each 80-byte chunk is a packet (byte 0: in-band or
/// GPA-direct; bytes 1..65: the vstor packet; the rest: the page range).
/// Returns the number of replies written to those packets.
pub fn packets(data: &[u8]) -> usize {
    let replies = serve(|to_vsp| {
        write_init(to_vsp);
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            if !write_chunk(to_vsp, i as u64 + 1, chunk) {
                break;
            }
        }
    });
    replies.len().saturating_sub(INIT_REQUESTS)
}

/// Writes one packet built from an input chunk; false if the ring is full.
fn write_chunk(to_vsp: &mut OutgoingRing, txid: u64, chunk: &[u8]) -> bool {
    let mut c = [0u8; CHUNK];
    c[..chunk.len()].copy_from_slice(chunk);
    let body = &c[1..65];
    let written = if c[0] & 1 == 0 {
        let len = 16 + (c[0] as usize >> 1) % 49;
        to_vsp.write_packet(packet_type::DATA_INBAND, 1, txid, &[], &body[..len.min(64)])
    } else {
        let count = u32::from_le_bytes([c[65], c[66], c[67], 0]) % (300 * 1024);
        let offset = u32::from(u16::from_le_bytes([c[68], c[69]])) % 4096;
        let pages = ((offset + count) as usize).div_ceil(4096).clamp(1, 80);
        let first = u64::from(c[70]) % (MEMORY_PAGES + 8);
        let pfns: Vec<u64> = (first..first + pages as u64).collect();
        write_gpa_direct(to_vsp, txid, 1, &[(count.max(1), offset, &pfns)], body)
    };
    written.is_ok()
}

/// Runs a primary channel's worker over what `write` puts in the guest's
/// ring until it is idle; returns the host's replies (txid and payload),
/// each checked to be at most a 64-byte vstor packet.
fn serve(write: impl FnOnce(&mut OutgoingRing)) -> Vec<(u64, VstorPacket)> {
    let f = fixture();
    let (mut to_vsp, from_guest) = private_pair(16);
    let (to_guest, mut replies) = private_pair(16);
    write(&mut to_vsp);
    if to_vsp.commit().is_err() {
        return Vec::new();
    }
    let channel = OpenedChannel {
        peer: 0,
        relid: 1,
        subchannel_index: 0,
        user_data: [0; 120],
        incoming: from_guest,
        outgoing: to_guest,
        signals: ChannelSignals {
            doorbell: Arc::new(EventFd::new().expect("eventfd")),
            notify: Arc::new(EventFd::new().expect("eventfd")),
        },
        memory: f.memory.clone(),
        gpadls: GpadlMap::default(),
        control: ControlHandle::detached(1),
        stats: Default::default(),
    };
    if f.controller.serve_until_idle(channel).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    while let Ok(Some(p)) = replies.read() {
        let payload = p.payload();
        assert!(payload.len() <= 64, "reply larger than 80 bytes");
        let mut packet = VstorPacket::new(0, 0);
        payload
            .read_at(0, &mut packet.as_mut_bytes()[..payload.len()])
            .expect("inside");
        out.push((p.desc.transaction_id, packet));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::status;
    use proptest::prelude::*;

    /// TEST UNIT READY on LUN 0 as an in-band SRB.
    fn test_unit_ready() -> VstorPacket {
        let mut p = VstorPacket::new(operation::EXECUTE_SRB, 0);
        let mut srb = p.srb();
        srb.cdb_length = 6;
        srb.data_in = crate::protocol::direction::NONE;
        p.set_srb(&srb);
        p
    }

    #[test]
    fn requests_before_initialisation_get_invalid_device_state() {
        let replies = serve(|r| {
            for (txid, p) in [
                (1, test_unit_ready()),
                (2, VstorPacket::new(operation::QUERY_PROPERTIES, 0)),
                (3, VstorPacket::new(operation::FCHBA_DATA, 0)),
            ] {
                r.write_packet(packet_type::DATA_INBAND, 1, txid, &[], p.as_bytes())
                    .unwrap();
            }
            write_init(r);
            r.write_packet(
                packet_type::DATA_INBAND,
                1,
                4,
                &[],
                test_unit_ready().as_bytes(),
            )
            .unwrap();
        });
        let status = |txid: u64| {
            let (_, p) = replies.iter().find(|(t, _)| *t == txid).unwrap();
            assert_eq!(p.header.operation.get(), operation::COMPLETE_IO);
            (p.header.status.get(), p.srb().srb_status)
        };
        // Refused, not run: no SRB status filled in.
        assert_eq!(status(1), (status::INVALID_DEVICE_STATE, 0));
        assert_eq!(status(2).0, status::INVALID_DEVICE_STATE);
        assert_eq!(status(3).0, status::INVALID_PARAMETER);
        // Initialisation still works after them, then SRBs run.
        assert_eq!(replies.len(), 3 + INIT_REQUESTS + 1);
        assert_eq!(status(4), (status::SUCCESS, crate::protocol::srb::SUCCESS));
    }

    #[test]
    fn every_well_formed_request_gets_one_reply() {
        // TEST UNIT READY on LUN 0 as an in-band SRB.
        let mut chunk = [0u8; CHUNK];
        chunk[0] = 96; // in-band, 64-byte body
        chunk[1] = 3; // EXECUTE_SRB
        chunk[5] = 1; // completion requested
        chunk[13 + 8] = 6; // cdb_length
        chunk[13 + 10] = 2; // data_in NONE
        let data: Vec<u8> = chunk.iter().copied().cycle().take(CHUNK * 10).collect();
        assert_eq!(packets(&data), 10);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn packets_never_panic(data in proptest::collection::vec(any::<u8>(), 0..CHUNK * 12)) {
            packets(&data);
        }

        #[test]
        fn srb_packets_never_panic(
            ops in proptest::collection::vec((any::<u8>(), 0u8..20, any::<[u8; 16]>(), 0u8..3, any::<u32>(), any::<[u8; 15]>()), 1..12)
        ) {
            // Mostly EXECUTE_SRB with plausible fields, random CDBs.
            let mut data = Vec::new();
            for (kind, cdb_len, cdb, dir, len, range) in ops {
                let mut c = [0u8; CHUNK];
                c[0] = kind | 0x80;
                c[1] = 3;
                c[5] = 1;
                c[13 + 7] = cdb[15] % 3; // lun
                c[13 + 8] = cdb_len;
                c[13 + 10] = dir;
                c[13 + 12..13 + 16].copy_from_slice(&(len % (512 * 1024)).to_le_bytes());
                c[13 + 16..13 + 32].copy_from_slice(&cdb);
                c[65..80].copy_from_slice(&range);
                data.extend_from_slice(&c);
            }
            packets(&data);
        }
    }
}
