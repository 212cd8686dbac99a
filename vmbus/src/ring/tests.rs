use super::*;
use crate::memory::SharedMemory;
use crate::wire::PACKET_FLAG_COMPLETION_REQUESTED;
use proptest::prelude::*;
use std::collections::VecDeque;

fn double_mapped_pair(data_pages: usize) -> (OutgoingRing, IncomingRing, SharedMemory) {
    let (mem, _fd) = SharedMemory::create(((1 + data_pages) * PAGE_SIZE) as u64).unwrap();
    let pfns: Vec<u64> = (0..=data_pages as u64).collect();
    let ring = RingMemory::from_pages(mem.map_ring(&pfns).unwrap()).unwrap();
    ring.init_control();
    let out = OutgoingRing::new(ring.clone()).unwrap();
    let inc = IncomingRing::new(ring).unwrap();
    (out, inc, mem)
}

fn control(mem: &RingMemory, off: usize) -> u32 {
    mem.field(off).load(Ordering::SeqCst)
}

fn set_control(mem: &RingMemory, off: usize, v: u32) {
    mem.field(off).store(v, Ordering::SeqCst)
}

fn raw_data(mem: &RingMemory, pos: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_wrapping(pos, &mut v);
    v
}

fn payload_of(p: &IncomingPacket<'_>, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    p.payload().read_at(0, &mut v).unwrap();
    v
}

#[test]
fn packet_bytes_match_the_linux_layout() {
    let (mut out, _inc) = private_pair(1);
    out.write_inband(0x0102_0304_0506_0708, true, b"hello")
        .unwrap();
    let mem = out.memory().clone();
    // Nothing is visible before commit.
    assert_eq!(control(&mem, ring_offset::WRITE_INDEX), 0);
    assert!(
        out.commit().unwrap(),
        "first packet into an empty ring signals"
    );
    // 16-byte descriptor + 5 bytes padded to 8 = 24 bytes, then the trailer.
    assert_eq!(control(&mem, ring_offset::WRITE_INDEX), 32);
    let bytes = raw_data(&mem, 0, 32);
    assert_eq!(
        bytes,
        [
            6, 0, 2, 0, 3, 0, 1, 0, // type 6, offset8 2, len8 3, flags 1
            8, 7, 6, 5, 4, 3, 2, 1, // transaction id
            b'h', b'e', b'l', b'l', b'o', 0, 0, 0, // payload + zero padding
            0, 0, 0, 0, 0, 0, 0, 0, // trailer: start offset 0 << 32
        ]
    );
    out.write_completion(9, &[0xaa; 8]).unwrap();
    assert!(!out.commit().unwrap(), "ring was not empty: no signal");
    let trailer = raw_data(&mem, 32 + 24, 8);
    assert_eq!(
        trailer,
        [0, 0, 0, 0, 32, 0, 0, 0],
        "trailer holds start << 32"
    );
}

#[test]
fn reader_sees_packets_in_order_and_frees_space() {
    let (mut out, mut inc) = private_pair(1);
    for i in 0..10u8 {
        out.write_inband(i as u64, false, &[i; 100]).unwrap();
    }
    out.commit().unwrap();
    for i in 0..10u8 {
        let p = inc.read().unwrap().expect("packet");
        assert_eq!(p.desc.packet_type, packet_type::DATA_INBAND);
        assert_eq!(p.desc.transaction_id, i as u64);
        assert_eq!(p.desc.data_offset, 16);
        assert_eq!(p.desc.length, 16 + 104);
        assert_eq!(payload_of(&p, 100), vec![i; 100]);
    }
    assert!(inc.read().unwrap().is_none());
    let before = out.free_space().unwrap();
    inc.commit().unwrap();
    assert_eq!(control(inc.memory(), ring_offset::READ_INDEX), 10 * 128);
    assert!(out.free_space().unwrap() > before);
    assert_eq!(out.free_space().unwrap(), 4096 - 8);
}

#[test]
fn ring_never_fills_completely() {
    let (mut out, mut inc) = private_pair(1);
    // Packets of 56 + 8 trailer = 64 bytes: 63 fit in 4096 - 8.
    let mut n = 0;
    while out.write_inband(n, false, &[0; 40]).is_ok() {
        n += 1;
    }
    assert_eq!(n, 63);
    assert_eq!(
        out.write_inband(0, false, &[0; 40]),
        Err(WriteError::Full { needed: 64 })
    );
    out.commit().unwrap();
    let w = control(out.memory(), ring_offset::WRITE_INDEX);
    assert_ne!(w, 0, "full ring must not look empty");
    let mut read = 0;
    while inc.read().unwrap().is_some() {
        read += 1;
    }
    assert_eq!(read, 63);
}

/// A one-page ring, privately or doubly mapped, whose indices were moved
/// on by one packet of `skip` payload bytes (sent and consumed).
fn ring_advanced_by(
    double: bool,
    skip: usize,
) -> (OutgoingRing, IncomingRing, Option<SharedMemory>) {
    let (mut out, mut inc, m) = if double {
        let (o, i, m) = double_mapped_pair(1);
        (o, i, Some(m))
    } else {
        let (o, i) = private_pair(1);
        (o, i, None)
    };
    out.write_inband(0, false, &vec![1; skip]).unwrap();
    out.commit().unwrap();
    assert!(inc.read().unwrap().is_some());
    inc.commit().unwrap();
    (out, inc, m)
}

#[test]
fn a_descriptor_split_by_the_end_of_the_ring_reads_back() {
    for double in [false, true] {
        // One packet of 4088 bytes (16 + 4064 + trailer 8) leaves the write
        // index 8 bytes before the end: the next descriptor's two words
        // land on either side of the wrap.
        let (mut out, mut inc, _m) = ring_advanced_by(double, 4064);
        assert_eq!(control(out.memory(), ring_offset::WRITE_INDEX), 4096 - 8);
        out.write_inband(0x1122_3344_5566_7788, true, &[9; 24])
            .unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        assert_eq!(p.desc.transaction_id, 0x1122_3344_5566_7788);
        assert_eq!(p.desc.length, 16 + 24);
        assert_eq!(payload_of(&p, 24), [9; 24]);
    }
}

#[test]
fn wrapping_packet_is_contiguous_when_double_mapped() {
    for double in [false, true] {
        // Move both indices near the end of the ring.
        let (mut out, mut inc, _m) = ring_advanced_by(double, 4000);
        let payload: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        out.write_inband(7, false, &payload).unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        assert_eq!(p.desc.transaction_id, 7);
        assert_eq!(payload_of(&p, 200), payload);
        assert_eq!(p.bytes().len(), 16 + 200);
    }
}

#[test]
fn bad_indices_are_rejected() {
    let (_out, mut inc) = private_pair(1);
    let mem = inc.memory().clone();
    set_control(&mem, ring_offset::WRITE_INDEX, 4);
    assert!(matches!(
        inc.read(),
        Err(RingError::BadIndex {
            which: "write_index",
            value: 4,
            ..
        })
    ));
    set_control(&mem, ring_offset::WRITE_INDEX, 4096);
    assert!(matches!(
        inc.read(),
        Err(RingError::BadIndex { value: 4096, .. })
    ));
    set_control(&mem, ring_offset::WRITE_INDEX, 0);
    set_control(&mem, ring_offset::READ_INDEX, 0xffff_fff8);
    let (mut out2, _) = (OutgoingRing::new(mem.clone()), ());
    assert!(matches!(
        out2,
        Err(RingError::BadIndex {
            which: "read_index",
            ..
        })
    ));
    set_control(&mem, ring_offset::READ_INDEX, 0);
    let mut out = OutgoingRing::new(mem.clone()).unwrap();
    out.write_inband(1, false, &[0; 8]).unwrap();
    set_control(&mem, ring_offset::READ_INDEX, 3);
    assert!(matches!(out.commit(), Err(RingError::BadIndex { .. })));
    out2 = OutgoingRing::new(mem);
    assert!(out2.is_err());
}

fn forge(mem: &RingMemory, desc: [u8; 16], write_index: u32) {
    mem.write_wrapping(0, &desc);
    set_control(mem, ring_offset::WRITE_INDEX, write_index);
}

#[test]
fn bad_descriptors_are_rejected() {
    let mem = RingMemory::new_private(1);
    mem.init_control();
    let mut inc = IncomingRing::new(mem.clone()).unwrap();
    // Length past the published bytes.
    forge(&mem, [6, 0, 2, 0, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 64);
    assert!(matches!(
        inc.read(),
        Err(RingError::BadDescriptor { length8: 200, .. })
    ));
    // Data offset inside the descriptor.
    let mut inc = IncomingRing::new(mem.clone()).unwrap();
    forge(&mem, [6, 0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 64);
    assert!(matches!(
        inc.read(),
        Err(RingError::BadDescriptor { offset8: 1, .. })
    ));
    // Data offset past the packet length.
    let mut inc = IncomingRing::new(mem.clone()).unwrap();
    forge(&mem, [6, 0, 5, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 64);
    assert!(matches!(
        inc.read(),
        Err(RingError::BadDescriptor { offset8: 5, .. })
    ));
    // Exactly fitting packet with its trailer is fine.
    let mut inc = IncomingRing::new(mem.clone()).unwrap();
    forge(&mem, [6, 0, 2, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 64);
    assert_eq!(inc.read().unwrap().unwrap().desc.length, 56);
    // Fewer bytes than a descriptor plus trailer.
    forge(&mem, [6, 0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 16);
    let mut inc = IncomingRing::new(mem.clone()).unwrap();
    assert!(matches!(
        inc.read(),
        Err(RingError::Truncated { available: 16 })
    ));
}

#[test]
fn too_large_packets_are_refused() {
    let (mut out, _inc) = private_pair(1);
    assert!(matches!(
        out.write_inband(0, false, &[0; 4096]),
        Err(WriteError::Ring(RingError::TooLarge(_)))
    ));
}

#[test]
fn masked_consumer_is_not_signalled() {
    let (mut out, mut inc) = private_pair(1);
    inc.mask_interrupts();
    out.write_inband(1, false, &[0; 8]).unwrap();
    assert!(!out.commit().unwrap());
    assert!(
        !inc.unmask_and_check_empty().unwrap(),
        "data arrived while masked"
    );
    inc.read().unwrap().unwrap();
    inc.commit().unwrap();
    assert!(inc.unmask_and_check_empty().unwrap());
    out.write_inband(2, false, &[0; 8]).unwrap();
    assert!(out.commit().unwrap(), "empty and unmasked: signal");
}

#[test]
fn pending_send_size_wakes_the_producer_once() {
    let (mut out, mut inc) = private_pair(1);
    let mut n = 0;
    while out.write_inband(n, false, &[0; 1000]).is_ok() {
        n += 1;
    }
    out.commit().unwrap();
    let needed = 1016 + 8;
    assert!(!out.request_space(needed).unwrap());
    assert_eq!(control(out.memory(), ring_offset::PENDING_SEND_SZ), needed);
    // Reading one packet frees 1024 bytes: now enough space.
    inc.read().unwrap().unwrap();
    assert!(inc.commit().unwrap(), "crossing pending_send_sz signals");
    inc.read().unwrap().unwrap();
    assert!(!inc.commit().unwrap(), "already above: no second signal");
    out.write_inband(99, false, &[0; 1000]).unwrap();
    out.commit().unwrap();
    assert_eq!(control(out.memory(), ring_offset::PENDING_SEND_SZ), 0);
}

#[test]
fn pending_send_size_needs_the_feature_bit() {
    let (mut out, mut inc) = private_pair(1);
    set_control(out.memory(), ring_offset::FEATURE_BITS, 0);
    while out.write_inband(0, false, &[0; 1000]).is_ok() {}
    out.commit().unwrap();
    out.request_space(1024).unwrap();
    inc.read().unwrap().unwrap();
    assert!(!inc.commit().unwrap());
}

// ---- model-based property test -------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Write(usize),
    CommitWrite,
    Read(usize),
    CommitRead,
    Mask(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..700).prop_map(Op::Write),
        2 => Just(Op::CommitWrite),
        4 => (1usize..6).prop_map(Op::Read),
        2 => Just(Op::CommitRead),
        1 => any::<bool>().prop_map(Op::Mask),
    ]
}

/// What the ring should hold, in bytes of ring space per packet.
#[derive(Default)]
struct Model {
    staged: VecDeque<(u64, Vec<u8>)>,
    published: VecDeque<(u64, Vec<u8>)>,
    /// Space of packets read but not yet committed by the reader.
    read_uncommitted: usize,
    /// Pending send size the writer asked for, if waiting.
    pending: Option<u32>,
    masked: bool,
    next_id: u64,
    signals_to_reader: usize,
    signals_to_writer: usize,
}

fn space(len: usize) -> usize {
    (16 + len).next_multiple_of(8) + 8
}

impl Model {
    fn used(&self) -> usize {
        self.staged
            .iter()
            .chain(&self.published)
            .map(|(_, p)| space(p.len()))
            .sum::<usize>()
            + self.read_uncommitted
    }
    fn committed_used(&self) -> usize {
        self.published
            .iter()
            .map(|(_, p)| space(p.len()))
            .sum::<usize>()
            + self.read_uncommitted
    }
}

fn run_model(
    ops: &[Op],
    mut out: OutgoingRing,
    mut inc: IncomingRing,
) -> Result<(), TestCaseError> {
    let size = out.memory().size() as usize;
    let mut m = Model::default();
    for op in ops {
        match *op {
            Op::Write(len) => {
                let id = m.next_id;
                let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ id) as u8).collect();
                let fits = size - m.used() >= space(len) + 8;
                let r = out.write_inband(id, false, &payload);
                if space(len) + 8 > size {
                    prop_assert!(matches!(r, Err(WriteError::Ring(RingError::TooLarge(_)))));
                } else if fits {
                    prop_assert!(r.is_ok(), "model has room: {:?}", r);
                    m.staged.push_back((id, payload));
                    m.next_id += 1;
                } else {
                    prop_assert_eq!(
                        r,
                        Err(WriteError::Full {
                            needed: space(len) as u32
                        })
                    );
                    // A blocked writer publishes what it has, then waits.
                    let was_empty = m.published.is_empty() && m.read_uncommitted == 0;
                    let staged = !m.staged.is_empty();
                    let sig = out.commit().unwrap();
                    prop_assert_eq!(sig, staged && was_empty && !m.masked);
                    m.published.extend(m.staged.drain(..));
                    let ok_now = out.request_space(space(len) as u32).unwrap();
                    prop_assert!(!ok_now);
                    m.pending = Some(space(len) as u32);
                }
            }
            Op::CommitWrite => {
                let was_empty = m.published.is_empty() && m.read_uncommitted == 0;
                let staged = !m.staged.is_empty();
                let sig = out.commit().unwrap();
                prop_assert_eq!(sig, staged && was_empty && !m.masked);
                if staged {
                    m.pending = None;
                    m.signals_to_reader += sig as usize;
                }
                m.published.extend(m.staged.drain(..));
            }
            Op::Read(n) => {
                for _ in 0..n {
                    let got = inc.read().unwrap();
                    match (got, m.published.pop_front()) {
                        (None, None) => break,
                        (Some(p), Some((id, payload))) => {
                            prop_assert_eq!(p.desc.transaction_id, id);
                            prop_assert_eq!(
                                p.desc.length as usize,
                                (16 + payload.len()).next_multiple_of(8)
                            );
                            let mut got = vec![0; payload.len()];
                            p.payload().read_at(0, &mut got).unwrap();
                            prop_assert_eq!(got, payload.clone());
                            m.read_uncommitted += space(payload.len());
                        }
                        (got, want) => {
                            prop_assert!(
                                false,
                                "reader saw {:?}, model {:?}",
                                got.map(|p| p.desc),
                                want.map(|w| w.0)
                            );
                        }
                    }
                }
            }
            Op::CommitRead => {
                let free_before = size - m.committed_used();
                let free_after = free_before + m.read_uncommitted;
                let sig = inc.commit().unwrap();
                let expect = match m.pending {
                    Some(p) => {
                        m.read_uncommitted > 0 && free_before as u32 <= p && free_after as u32 > p
                    }
                    None => false,
                };
                prop_assert_eq!(sig, expect);
                if sig {
                    // The wake-up promise: the waiting packet now fits.
                    let p = m.pending.unwrap();
                    if m.staged.is_empty() {
                        prop_assert!(out.free_space().unwrap() >= p);
                    }
                    m.signals_to_writer += 1;
                }
                m.read_uncommitted = 0;
            }
            Op::Mask(on) => {
                m.masked = on;
                if on {
                    inc.mask_interrupts();
                } else {
                    let empty = inc.unmask_and_check_empty().unwrap();
                    prop_assert_eq!(empty, m.published.is_empty());
                }
            }
        }
    }
    // Drain: everything written comes out, in order.
    out.commit().unwrap();
    m.published.extend(m.staged.drain(..));
    while let Some((id, payload)) = m.published.pop_front() {
        let p = inc.read().unwrap().expect("model has more packets");
        prop_assert_eq!(p.desc.transaction_id, id);
        let mut got = vec![0; payload.len()];
        p.payload().read_at(0, &mut got).unwrap();
        prop_assert_eq!(got, payload);
    }
    prop_assert!(inc.read().unwrap().is_none());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ring_matches_model_single_mapped(ops in proptest::collection::vec(op(), 1..400)) {
        let (out, inc) = private_pair(1);
        run_model(&ops, out, inc)?;
    }

    #[test]
    fn ring_matches_model_double_mapped(ops in proptest::collection::vec(op(), 1..400)) {
        let (out, inc, _mem) = double_mapped_pair(1);
        run_model(&ops, out, inc)?;
    }
}

#[test]
fn long_random_run_wraps_many_times() {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let ops: Vec<Op> = (0..200_000)
        .map(|_| match rng.random_range(0..15) {
            0..=5 => Op::Write(rng.random_range(0..700)),
            6 | 7 => Op::CommitWrite,
            8..=11 => Op::Read(rng.random_range(1..6)),
            12 | 13 => Op::CommitRead,
            _ => Op::Mask(rng.random()),
        })
        .collect();
    let (out, inc, _mem) = double_mapped_pair(2);
    run_model(&ops, out, inc).unwrap();
    let (out, inc) = private_pair(2);
    run_model(&ops, out, inc).unwrap();
}

#[test]
fn completion_flag_is_reported() {
    let (mut out, mut inc) = private_pair(1);
    out.write_packet(
        packet_type::DATA_INBAND,
        PACKET_FLAG_COMPLETION_REQUESTED,
        5,
        &[1, 2, 3],
        b"x",
    )
    .unwrap();
    out.commit().unwrap();
    let p = inc.read().unwrap().unwrap();
    assert!(p.is_completion_requested());
    assert_eq!(p.desc.data_offset, 24);
    let mut h = [0u8; 8];
    p.header_area().read_at(0, &mut h).unwrap();
    assert_eq!(h, [1, 2, 3, 0, 0, 0, 0, 0]);
}

#[test]
fn packet_len_counts_descriptor_padding_and_trailer() {
    // A 64-byte vstor completion: 16 + 64 + 8.
    assert_eq!(packet_len(64), 88);
    // A 40-byte NVSP completion, and an odd length padded to 8.
    assert_eq!(packet_len(40), 64);
    assert_eq!(packet_len(41), 72);
    // A packet uses up exactly what packet_len says.
    let (mut out, _inc) = private_pair(1);
    let free = out.free_space().unwrap() as usize;
    out.write_inband(1, false, &[0; 41]).unwrap();
    assert_eq!(free - out.free_space().unwrap() as usize, packet_len(41));
}
