//! The channel server against the byte sequence a Linux guest sends, with
//! every reply checked byte for byte (layouts from include/linux/hyperv.h).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use vmbus::SharedMemory;
use vmbus::echo::EchoDevice;
use vmbus::event::EventFd;
use vmbus::server::{ChannelServer, ChannelSignals, Registry, Transport, TransportError};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);

impl Capture {
    /// The messages sent since the last call. Each must pass Linux's
    /// `vmbus_on_msg_dpc` (drivers/hv/vmbus_drv.c): a type with a guest
    /// handler and at least `channel_message_table[type].min_payload_len`
    /// bytes; Linux drops any other, and its waiter never wakes.
    fn take(&self) -> Vec<Vec<u8>> {
        let sent = std::mem::take(&mut *self.0.lock().unwrap());
        for m in &sent {
            if let Err(e) = vmbus::linux::on_msg_dpc(m) {
                panic!("Linux drops {m:?}: {e}");
            }
        }
        sent
    }
}

struct TestTransport {
    sent: Capture,
    memory: SharedMemory,
    /// (relid, target_vp) of every MODIFYCHANNEL passed to the transport.
    retargets: Arc<Mutex<Vec<(u32, u32)>>>,
}

impl Transport for TestTransport {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        self.sent.0.lock().unwrap().push(msg.to_vec());
        Ok(())
    }
    fn contact_memory(&mut self, _: &mut Vec<OwnedFd>) -> Result<SharedMemory, TransportError> {
        Ok(self.memory.clone())
    }
    fn channel_signals(
        &mut self,
        _: u32,
        _: u32,
        _: u32,
        _: &mut Vec<OwnedFd>,
    ) -> Result<ChannelSignals, TransportError> {
        Ok(ChannelSignals {
            doorbell: Arc::new(EventFd::new()?),
            notify: Arc::new(EventFd::new()?),
        })
    }
    fn retarget(&mut self, relid: u32, target_vp: u32) -> Result<(), TransportError> {
        if target_vp > 3 {
            return Err(TransportError::Peer("no such VP".into()));
        }
        self.retargets.lock().unwrap().push((relid, target_vp));
        Ok(())
    }
}

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// INITIATE_CONTACT as vmbus_negotiate_version() builds it.
fn initiate_contact(version: u32) -> Vec<u8> {
    let mut m = vec![14, 0, 0, 0, 0, 0, 0, 0];
    m.extend(le32(version));
    m.extend(le32(0)); // target_vcpu
    m.extend([2, 0, 0, 0, 0, 0, 0, 0]); // msg_sint 2, msg_vtl 0
    m.extend(0x1000u64.to_le_bytes()); // monitor_page1
    m.extend(0x2000u64.to_le_bytes()); // monitor_page2
    assert_eq!(m.len(), 40);
    m
}

#[test]
fn linux_guest_sequence_gets_byte_exact_replies() {
    let (memory, _fd) = SharedMemory::create(64 * 4096).unwrap();
    let sent = Capture::default();
    let registry = Registry::new();
    let instance = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
    registry.add(Arc::new(EchoDevice::new(instance)));
    let retargets = Arc::new(Mutex::new(Vec::new()));
    let transport = TestTransport {
        sent: sent.clone(),
        memory: memory.clone(),
        retargets: retargets.clone(),
    };
    let mut server = ChannelServer::new(Box::new(transport), registry).unwrap();

    // 6.0 (confidential VMBus) is refused; the guest falls back to 5.3.
    server
        .handle_message(&initiate_contact(6 << 16), vec![])
        .unwrap();
    assert_eq!(
        sent.take(),
        vec![vec![15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    );
    server
        .handle_message(&initiate_contact(5 << 16 | 3), vec![])
        .unwrap();
    assert_eq!(
        sent.take(),
        vec![vec![15, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0]],
        "supported, connection state 0, message connection id 4"
    );

    server
        .handle_message(&[3, 0, 0, 0, 0, 0, 0, 0], vec![])
        .unwrap();
    let replies = sent.take();
    assert_eq!(replies.len(), 2);
    let offer = &replies[0];
    assert_eq!(offer.len(), 196);
    assert_eq!(&offer[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // Echo interface 7a5c0e11-3b8e-4d7f-9a42-565350414543, mixed endian.
    assert_eq!(
        &offer[8..24],
        &[
            0x11, 0x0e, 0x5c, 0x7a, 0x8e, 0x3b, 0x7f, 0x4d, 0x9a, 0x42, 0x56, 0x53, 0x50, 0x41,
            0x45, 0x43
        ]
    );
    assert_eq!(
        &offer[24..40],
        &[
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff
        ]
    );
    assert_eq!(&offer[40..56], &[0; 16], "reserved");
    assert_eq!(&offer[180..182], &[0, 0], "sub_channel_index 0: primary");
    assert_eq!(&offer[184..188], &le32(1), "child_relid");
    assert_eq!(offer[189] & 1, 0, "no monitor page");
    assert_eq!(&offer[190..192], &[1, 0], "dedicated interrupt");
    assert_eq!(&offer[192..196], &le32(0x10001), "connection id");
    assert_eq!(
        replies[1],
        vec![4, 0, 0, 0, 0, 0, 0, 0],
        "ALLOFFERS_DELIVERED"
    );

    // GPADL of 30 pages: header with 26 pfns, one body with 4.
    let pfns: Vec<u64> = (8..38).collect();
    let mut header = vec![8, 0, 0, 0, 0, 0, 0, 0];
    header.extend(le32(1)); // child_relid
    header.extend(le32(0xe1e10)); // gpadl
    header.extend((8u16 + 30 * 8).to_le_bytes()); // range_buflen
    header.extend(1u16.to_le_bytes()); // rangecount
    header.extend(le32(30 * 4096)); // byte_count
    header.extend(le32(0)); // byte_offset
    for p in &pfns[..26] {
        header.extend(p.to_le_bytes());
    }
    assert_eq!(header.len(), 236);
    server.handle_message(&header, vec![]).unwrap();
    assert!(sent.take().is_empty(), "no reply before the body arrives");
    let mut body = vec![9, 0, 0, 0, 0, 0, 0, 0];
    body.extend(le32(0)); // msgnumber
    body.extend(le32(0xe1e10));
    for p in &pfns[26..] {
        body.extend(p.to_le_bytes());
    }
    server.handle_message(&body, vec![]).unwrap();
    let mut created = vec![10, 0, 0, 0, 0, 0, 0, 0];
    created.extend(le32(1));
    created.extend(le32(0xe1e10));
    created.extend(le32(0));
    assert_eq!(sent.take(), vec![created]);

    // OPENCHANNEL: rings of 15 pages each (guest-to-host first).
    let mut open = vec![5, 0, 0, 0, 0, 0, 0, 0];
    open.extend(le32(1)); // child_relid
    open.extend(le32(1)); // openid
    open.extend(le32(0xe1e10)); // ring gpadl
    open.extend(le32(0)); // target_vp
    open.extend(le32(15)); // downstream ring page offset
    open.extend([0u8; 120]);
    assert_eq!(open.len(), 148);
    server.handle_message(&open, vec![]).unwrap();
    let mut result = vec![6, 0, 0, 0, 0, 0, 0, 0];
    result.extend(le32(1));
    result.extend(le32(1));
    result.extend(le32(0));
    assert_eq!(sent.take(), vec![result]);
    assert_eq!(server.open_channels(), 1);

    // A second open of the same channel is refused with a failure status.
    server.handle_message(&open, vec![]).unwrap();
    let refused = sent.take();
    assert_eq!(&refused[0][16..20], &le32(0xC000_0001));

    // MODIFYCHANNEL (relid 1 to VP 3) as vmbus_send_modifychannel()
    // builds it: moved, and acknowledged on 5.3. A VP the transport does
    // not have is refused with a failure status.
    server
        .handle_message(&[22, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0], vec![])
        .unwrap();
    assert_eq!(
        sent.take(),
        vec![vec![24, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
    );
    assert_eq!(*retargets.lock().unwrap(), vec![(1, 3)]);
    server
        .handle_message(&[22, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0], vec![])
        .unwrap();
    let mut refused = vec![24, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    refused.extend(le32(0xC000_0001));
    assert_eq!(sent.take(), vec![refused.clone()]);

    // CLOSECHANNEL (no reply), then GPADL_TEARDOWN -> GPADL_TORNDOWN.
    server
        .handle_message(&[7, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], vec![])
        .unwrap();
    assert!(sent.take().is_empty());
    assert_eq!(server.open_channels(), 0);
    let mut teardown = vec![11, 0, 0, 0, 0, 0, 0, 0];
    teardown.extend(le32(1));
    teardown.extend(le32(0xe1e10));
    server.handle_message(&teardown, vec![]).unwrap();
    assert_eq!(
        sent.take(),
        vec![vec![12, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x1e, 0x0e, 0]]
    );

    // MODIFYCHANNEL of a closed channel is refused and moves nothing.
    server
        .handle_message(&[22, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], vec![])
        .unwrap();
    assert_eq!(sent.take(), vec![refused]);
    assert_eq!(*retargets.lock().unwrap(), vec![(1, 3)]);

    server
        .handle_message(&[16, 0, 0, 0, 0, 0, 0, 0], vec![])
        .unwrap();
    assert_eq!(
        sent.take(),
        vec![vec![17, 0, 0, 0, 0, 0, 0, 0]],
        "UNLOAD_RESPONSE"
    );
    assert_eq!(server.version(), None);
}

#[test]
fn ring_gpadl_must_be_well_formed() {
    let (memory, _fd) = SharedMemory::create(64 * 4096).unwrap();
    let sent = Capture::default();
    let registry = Registry::new();
    registry.add(Arc::new(EchoDevice::new(Default::default())));
    let transport = TestTransport {
        sent: sent.clone(),
        memory,
        retargets: Default::default(),
    };
    let mut server = ChannelServer::new(Box::new(transport), registry).unwrap();
    server
        .handle_message(&initiate_contact(5 << 16 | 3), vec![])
        .unwrap();
    server
        .handle_message(&[3, 0, 0, 0, 0, 0, 0, 0], vec![])
        .unwrap();
    for m in vmbus::gpadl::gpadl_messages(1, 7, &[1, 2, 3, 4]) {
        server.handle_message(&m, vec![]).unwrap();
    }
    sent.take();
    for offset in [0u32, 1, 3, 4, 100] {
        let mut open = vec![5, 0, 0, 0, 0, 0, 0, 0];
        open.extend(le32(1));
        open.extend(le32(1));
        open.extend(le32(7));
        open.extend(le32(0));
        open.extend(le32(offset));
        open.extend([0u8; 120]);
        server.handle_message(&open, vec![]).unwrap();
        let reply = sent.take();
        assert_eq!(
            &reply[0][16..20],
            &le32(0xC000_0001),
            "offset {offset} must be refused"
        );
    }
    // Offset 2 of 4 pages: two rings of one control and one data page.
    let mut open = vec![5, 0, 0, 0, 0, 0, 0, 0];
    open.extend(le32(1));
    open.extend(le32(1));
    open.extend(le32(7));
    open.extend(le32(0));
    open.extend(le32(2));
    open.extend([0u8; 120]);
    server.handle_message(&open, vec![]).unwrap();
    assert_eq!(&sent.take()[0][16..20], &le32(0));
}

/// A server with `registry`, contacted at 5.3 and asked for offers (the
/// replies are left in the capture).
fn contacted(registry: Registry) -> (ChannelServer, Capture) {
    let (memory, _fd) = SharedMemory::create(512 * 4096).unwrap();
    let sent = Capture::default();
    let transport = TestTransport {
        sent: sent.clone(),
        memory,
        retargets: Default::default(),
    };
    let mut server = ChannelServer::new(Box::new(transport), registry).unwrap();
    server
        .handle_message(&initiate_contact(5 << 16 | 3), vec![])
        .unwrap();
    sent.take();
    server
        .handle_message(&[3, 0, 0, 0, 0, 0, 0, 0], vec![])
        .unwrap();
    (server, sent)
}

/// (relid, sub_channel_index) of the OFFERCHANNELs among `msgs`.
fn offers(msgs: &[Vec<u8>]) -> Vec<(u32, u16)> {
    msgs.iter()
        .filter(|m| m[0] == 1)
        .map(|m| {
            let o = vmbus::vsc::Offer::parse(m).unwrap();
            (o.relid, o.subchannel_index)
        })
        .collect()
}

/// The relids of the RESCIND_CHANNELOFFERs among `msgs`, in order.
fn rescinds(msgs: &[Vec<u8>]) -> Vec<u32> {
    msgs.iter()
        .filter(|m| m[0] == 2)
        .map(|m| u32::from_le_bytes(m[8..12].try_into().unwrap()))
        .collect()
}

fn relid_message(kind: u8, relid: u32) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0, 0, 0, 0, 0];
    m.extend(le32(relid));
    m
}

/// A guest opening `relid` as `vmbus_open` does: a 4-page ring GPADL
/// (`gpadl`, on pages from `pfn`), then OPENCHANNEL; the open succeeds.
fn open(server: &mut ChannelServer, sent: &Capture, relid: u32, gpadl: u32, pfn: u64) {
    let pfns: Vec<u64> = (pfn..pfn + 4).collect();
    for m in vmbus::gpadl::gpadl_messages(relid, gpadl, &pfns) {
        server.handle_message(&m, vec![]).unwrap();
    }
    let mut open = vec![5, 0, 0, 0, 0, 0, 0, 0];
    open.extend(le32(relid));
    open.extend(le32(relid));
    open.extend(le32(gpadl));
    open.extend(le32(0));
    open.extend(le32(2));
    open.extend([0u8; 120]);
    server.handle_message(&open, vec![]).unwrap();
    let replies = sent.take();
    let result = replies
        .iter()
        .find(|m| m[0] == 6)
        .expect("OPENCHANNEL_RESULT");
    assert_eq!(&result[16..20], &le32(0), "open of relid {relid}");
}

/// `vmbus_close` (drivers/hv/channel.c `vmbus_disconnect_ring`) closes the
/// sub-channels first, then the primary; then the ring GPADLs go.
fn close_all(server: &mut ChannelServer, sent: &Capture, relids: &[u32]) -> Vec<Vec<u8>> {
    for &relid in relids.iter().skip(1).chain(&relids[..1]) {
        server
            .handle_message(&relid_message(7, relid), vec![])
            .unwrap();
    }
    sent.take()
}

/// A netvsc-like device with 4 channels: the primary's open asks for 3
/// sub-channels. After the guest closes the NIC as `vmbus_close` does
/// (sub-channels, then primary) and opens it again (`netvsc_detach` +
/// `netvsc_attach`, e.g. on an MTU change), it asks for 3 sub-channels
/// again and `rndis_set_subchannel` waits until `open_chn == num_chn`;
/// `netvsc_sc_open` (drivers/net/hyperv/rndis_filter.c) counts an offer
/// only `if (chn_index < nvscdev->num_chn)`. So the closed sub-channels
/// must be rescinded (Linux frees a closed sub-channel only on its
/// rescind, `vmbus_onoffer_rescind` -> `hv_process_channel_removal`) and
/// the new offers numbered 1..=3 again.
#[test]
fn reopened_primary_gets_subchannels_numbered_from_one() {
    let registry = Registry::new();
    let mut echo = EchoDevice::new(Default::default());
    echo.subchannels = 3;
    registry.add(Arc::new(echo));
    let (mut server, sent) = contacted(registry);
    assert_eq!(offers(&sent.take()), [(1, 0)]);
    open(&mut server, &sent, 1, 100, 8);
    server.handle_requests().unwrap();
    let subs = offers(&sent.take());
    assert_eq!(subs, [(2, 1), (3, 2), (4, 3)]);
    for (i, &(relid, _)) in subs.iter().enumerate() {
        open(&mut server, &sent, relid, 101 + i as u32, 16 + 4 * i as u64);
    }
    assert_eq!(server.open_channels(), 4);

    // The guest closes the NIC: its sub-channels are rescinded.
    let replies = close_all(&mut server, &sent, &[1, 2, 3, 4]);
    assert_eq!(rescinds(&replies), [2, 3, 4], "{replies:?}");
    assert_eq!(server.open_channels(), 0);
    // hv_process_channel_removal releases two of them right away; the
    // third is still in use (its relid too) when the NIC opens again.
    for relid in [2, 4] {
        server
            .handle_message(&relid_message(13, relid), vec![])
            .unwrap();
    }
    assert!(sent.take().is_empty());
    open(&mut server, &sent, 1, 200, 40);
    server.handle_requests().unwrap();
    let again = offers(&sent.take());
    let num_chn = 4;
    assert_eq!(again.len(), 3);
    for &(relid, index) in &again {
        assert!(
            (1..num_chn).contains(&index),
            "netvsc_sc_open ignores sub-channel index {index}"
        );
        assert_ne!(relid, 3, "relid 3 is in use until RELID_RELEASED");
    }
    assert_eq!(again, [(2, 1), (4, 2), (5, 3)], "lowest free relids");
}

/// When a device with open sub-channels is removed, Linux 6.1 must see
/// every sub-channel's RESCIND_CHANNELOFFER before the primary's: the
/// primary's rescind unregisters the device and frees the primary
/// (`vmbus_onoffer_rescind` -> `vmbus_device_unregister`), and a
/// sub-channel rescind handled after that runs
/// `hv_process_channel_removal` -> `list_del(&channel->sc_list)` on the
/// freed primary's list (drivers/hv/channel_mgmt.c).
#[test]
fn subchannels_are_rescinded_before_their_primary() {
    let registry = Registry::new();
    let mut echo = EchoDevice::new(Default::default());
    echo.subchannels = 2;
    let id = registry.add(Arc::new(echo));
    let (mut server, sent) = contacted(registry.clone());
    sent.take();
    open(&mut server, &sent, 1, 100, 8);
    server.handle_requests().unwrap();
    assert_eq!(offers(&sent.take()), [(2, 1), (3, 2)]);
    open(&mut server, &sent, 2, 101, 16);
    open(&mut server, &sent, 3, 102, 24);
    registry.remove(id);
    server.handle_requests().unwrap();
    assert_eq!(rescinds(&sent.take()), [2, 3, 1]);
    assert_eq!(server.open_channels(), 0);
}

/// `vmbus_channel_map_relid` (drivers/hv/channel_mgmt.c) maps a channel
/// only `if (child_relid < MAX_CHANNEL_RELIDS)` (2048), and the interrupt
/// scan covers that many event flags: relids are reused once the guest
/// released them (RELID_RELEASED), the lowest free first, so a peer that
/// sees thousands of offers over its life never gets one of 2048 or more.
/// With every relid in use, an offer waits until one is released.
#[test]
fn relids_are_reused_and_stay_below_max_channel_relids() {
    let registry = Registry::new();
    registry.add(Arc::new(EchoDevice::new(Default::default())));
    let (mut server, sent) = contacted(registry.clone());
    assert_eq!(offers(&sent.take()), [(1, 0)]);
    for cycle in 0..2100 {
        let id = registry.add(Arc::new(EchoDevice::new(Default::default())));
        server.handle_requests().unwrap();
        assert_eq!(offers(&sent.take()), [(2, 0)], "cycle {cycle}");
        registry.remove(id);
        server.handle_requests().unwrap();
        assert_eq!(rescinds(&sent.take()), [2]);
        server
            .handle_message(&relid_message(13, 2), vec![])
            .unwrap();
    }
    // Fill relids 2..=2047; the next device waits for a free relid.
    let ids: Vec<_> = (2..2048)
        .map(|_| registry.add(Arc::new(EchoDevice::new(Default::default()))))
        .collect();
    server.handle_requests().unwrap();
    let all = offers(&sent.take());
    assert_eq!(all.len(), 2046);
    assert!(all.iter().all(|&(relid, _)| relid < 2048));
    registry.add(Arc::new(EchoDevice::new(Default::default())));
    server.handle_requests().unwrap();
    assert!(sent.take().is_empty(), "no relid below 2048 is free");
    registry.remove(ids[3]);
    server.handle_requests().unwrap();
    assert_eq!(rescinds(&sent.take()), [5]);
    server
        .handle_message(&relid_message(13, 5), vec![])
        .unwrap();
    assert_eq!(offers(&sent.take()), [(5, 0)], "offered once 5 is free");
}
