//! Fuzz harness for decapsulation, shared by `switch/fuzz` (target
//! `vxlan`) and the proptest below: arbitrary bytes arrive at a real
//! VXLAN port as one receive buffer (a lone datagram, or a UDP GRO batch
//! of a size taken from the input) from a configured remote or an unknown
//! source, on an access port or a trunk of two VNIs. Nothing may panic;
//! every datagram must come out as a frame the switch can parse (tagged
//! with its VNI's VLAN on the trunk) or be counted as dropped, and the
//! frames must then cross a real switch.

use super::{Received, VxlanConfig, VxlanPort};
use crate::frame::parse;
use crate::policy::{PortPolicy, VlanPolicy};
use crate::{OffloadCaps, PortSpec, Switch};
use bytes::BytesMut;
use std::net::SocketAddr;

/// Runs one input through the receive path.
pub fn decap(data: &[u8]) {
    let Some((&meta, rest)) = data.split_first() else {
        return;
    };
    let Some((seg, dgrams)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let trunk = meta & 1 != 0;
    let cfg = VxlanConfig {
        local: "127.0.0.1:0".parse().expect("address"),
        vni: (!trunk).then_some(42),
        vnis: if trunk {
            vec![
                super::VniVlan { vni: 42, vlan: 10 },
                super::VniVlan {
                    vni: 0x12_3456,
                    vlan: 20,
                },
            ]
        } else {
            Vec::new()
        },
        remotes: vec!["127.0.0.9:4789".parse().expect("remote")],
        statics: vec![super::StaticEntry {
            mac: "02:00:00:00:00:01".parse().expect("mac"),
            remote: "127.0.0.9".parse().expect("remote"),
            vni: None,
        }],
        udp_csum: true,
        learn_unknown: meta & 2 != 0,
        mtu: 576 + usize::from(meta >> 4) as u32 * 100,
        fdb_size: 4,
        fdb_age_secs: 300,
        tx_sockets: 1,
        offloads: false,
        gso_tap: None,
    };
    let spec = cfg
        .validate(&crate::config::VlanMode::default())
        .expect("a valid table");
    let mut port = VxlanPort::open("fuzz", "vx", &spec).expect("loopback sockets");
    let from: SocketAddr = if meta & 4 != 0 {
        "127.0.0.9:40000".parse().expect("address")
    } else {
        "127.0.0.10:40000".parse().expect("address")
    };
    let segment = usize::from(u16::from_le_bytes(*seg));
    let r = Received {
        len: dgrams.len(),
        from: Some(from),
        segment: (meta & 8 != 0 && segment > 0).then_some(segment),
        truncated: false,
    };
    let datagrams = match r.segment {
        Some(s) => dgrams.len().div_ceil(s).max(1),
        None => 1,
    } as u64;
    let mut frames = Vec::new();
    let now = port.secs();
    port.ingest(BytesMut::from(dgrams), r, now, &mut frames);
    let max_inner = cfg.max_inner() + if trunk { 4 } else { 0 };
    for f in &frames {
        let info = parse(&f.data);
        assert!(f.data.len() >= 14 && f.data.len() <= max_inner);
        if trunk {
            let vid = info.map(|i| i.tag_vid()).unwrap_or(Some(10));
            assert!(matches!(vid, Some(10 | 20)), "tagged with a mapped VLAN");
        }
    }
    let s = port.shared().stats();
    let drops = s.drop_truncated
        + s.drop_bad_flags
        + s.drop_unknown_vni
        + s.drop_short_inner
        + s.drop_rx_too_big
        + s.drop_inner_tag
        + s.drop_bad_source_mac
        + s.drop_unknown_source
        + s.drop_static_conflict;
    assert_eq!(s.rx_packets, frames.len() as u64);
    assert_eq!(s.rx_packets + drops, datagrams, "{s:?}");
    let sw = Switch::new("fuzz", 16, 300);
    let vlan = if trunk {
        VlanPolicy::trunk(&[10, 20], None)
    } else {
        VlanPolicy::access(1)
    };
    let mut vx = sw
        .add_port(PortSpec {
            policy: PortPolicy {
                vlan: vlan.clone(),
                ..Default::default()
            },
            ..PortSpec::new("vx", OffloadCaps::ALL)
        })
        .expect("port");
    let mut sink = sw
        .add_port(PortSpec {
            policy: PortPolicy {
                vlan,
                ..Default::default()
            },
            ..PortSpec::new("sink", OffloadCaps::NONE)
        })
        .expect("port");
    let n = frames.len() as u64;
    vx.ingress(&mut frames);
    let mut out = Vec::new();
    sink.drain(&mut out, usize::MAX);
    assert_eq!(vx.stats().rx_frames, n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid VXLAN packet for VNI 42 around a small frame, so that the
    /// mutations below reach past the header checks.
    fn valid(vni: u32) -> Vec<u8> {
        let mut p = zerocopy::IntoBytes::as_bytes(&super::super::wire::VxlanHdr::new(vni)).to_vec();
        p.extend_from_slice(&[0xff; 6]);
        p.extend_from_slice(&[2, 0, 0, 0, 0, 7, 0x08, 0x06]);
        p.extend_from_slice(&[0u8; 28]);
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn empty_datagrams_are_counted(meta in any::<u8>(), seg in any::<u16>()) {
            let mut data = vec![meta];
            data.extend_from_slice(&seg.to_le_bytes());
            decap(&data);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            decap(&data);
        }

        #[test]
        fn mutated_packets_never_panic(
            meta in any::<u8>(),
            seg in 0u16..200,
            copies in 1usize..6,
            flips in proptest::collection::vec((0usize..300, any::<u8>()), 0..4),
            vni in prop_oneof![Just(42u32), Just(0x12_3456), any::<u32>()],
        ) {
            let mut data = vec![meta];
            data.extend_from_slice(&seg.to_le_bytes());
            for _ in 0..copies {
                data.extend_from_slice(&valid(vni & 0xff_ffff));
            }
            for (at, v) in flips {
                if let Some(b) = data.get_mut(3 + at) {
                    *b = v;
                }
            }
            decap(&data);
        }
    }
}
