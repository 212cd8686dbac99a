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
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.0.lock().unwrap())
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
