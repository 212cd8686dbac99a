//! Fuzzes the switch's frame handling: header parsing, the tap's
//! virtio_net_hdr parsing, and a whole forwarding pass (policies, VLAN
//! rewrite, software segmentation and checksumming) over arbitrary frames
//! with arbitrary offload metadata. Nothing may panic; every frame must end
//! delivered or counted as dropped.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switch::policy::{PortPolicy, VlanPolicy};
use switch::{Frame, Gso, GsoKind, Offload, OffloadCaps, PartialCsum, PortSpec, Switch};

fuzz_target!(|data: &[u8]| {
    let _ = switch::frame::parse(data);
    let split = data.len().min(10);
    let _ = switch::tap::frame_from_vnet(&data[..split], Bytes::copy_from_slice(&data[split..]));
    if data.len() < 8 {
        return;
    }
    let (meta, frame) = data.split_at(8);
    let sw = Switch::new("fuzz", 64, 300);
    let policy = |vlan| PortPolicy {
        vlan,
        dhcp_guard: true,
        ra_guard: true,
        ..Default::default()
    };
    let mut src = sw
        .add_port(PortSpec {
            policy: policy(VlanPolicy::trunk(&[1, 2, 3], Some(1))),
            ..PortSpec::new("src", OffloadCaps::ALL)
        })
        .unwrap();
    let mut sinks: Vec<_> = [
        ("tso", OffloadCaps::ALL, VlanPolicy::trunk(&[2, 3], None)),
        ("none", OffloadCaps::NONE, VlanPolicy::access(1)),
        (
            "csum",
            OffloadCaps {
                csum: true,
                ..OffloadCaps::NONE
            },
            VlanPolicy::access(2),
        ),
    ]
    .into_iter()
    .map(|(name, caps, vlan)| {
        sw.add_port(PortSpec {
            policy: policy(vlan),
            ..PortSpec::new(name, caps)
        })
        .unwrap()
    })
    .collect();
    let csum = (meta[0] & 1 != 0).then(|| PartialCsum {
        start: u16::from_le_bytes([meta[1], meta[2]]),
        offset: u16::from(meta[3]),
    });
    let gso = (meta[0] & 2 != 0).then(|| Gso {
        kind: if meta[0] & 4 != 0 {
            GsoKind::Tcp6
        } else {
            GsoKind::Tcp4
        },
        mss: u16::from_le_bytes([meta[4], meta[5]]),
        ecn: meta[0] & 8 != 0,
    });
    let frame = Frame {
        data: Bytes::copy_from_slice(frame),
        offload: Offload { csum, gso },
    };
    src.ingress(&mut vec![frame.clone(), frame]);
    let mut out = Vec::new();
    for sink in &mut sinks {
        sink.drain(&mut out, usize::MAX);
        for d in out.drain(..) {
            let mut tag = [0; 4];
            let len: usize = d.parts(&mut tag).iter().map(|p| p.len()).sum();
            assert_eq!(len, d.len());
        }
    }
    let s = src.stats();
    assert_eq!(s.rx_frames, 2);
});
