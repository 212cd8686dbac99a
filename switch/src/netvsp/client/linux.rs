//! What a Linux 6.1 guest's hv_netvsc accepts from the host, written as
//! Linux's own checks so that the client (and the tests that use it)
//! reject exactly what Linux rejects and fall back exactly where Linux
//! does.
//!
//! Each function names the Linux function it mirrors
//! (drivers/net/hyperv/rndis_filter.c unless said otherwise). A reply
//! that fails here is one a Linux guest ignores or refuses: a regression
//! in the VSP shows up as a client with fewer channels or offloads, hence
//! as failing end-to-end tests and lower benchmark figures, not only as
//! a wrong byte.

use zerocopy::FromBytes;

use super::super::rndis::{
    self, NdisOffload, OBJECT_TYPE_OFFLOAD, OFFLOAD_SIZE_6_0, RssCapabilities, offload_caps,
};

/// `sizeof(struct ndis_offload)` in hyperv_net.h (not packed: 156 bytes),
/// the result size `rndis_query_hwcaps` passes.
pub const OFFLOAD_RESULT_SIZE: usize = 156;
/// `sizeof(struct ndis_recv_scale_cap)` (`__packed`: 18 bytes), the
/// result size `rndis_filter_device_add` passes for RSS capabilities.
pub const RSS_CAPS_RESULT_SIZE: usize = 18;
/// `VRSS_CHANNEL_DEFAULT`: channels netvsc_probe asks for at most.
pub const DEFAULT_CHANNELS: u32 = 16;

/// Why Linux refuses a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("QUERY_COMPLETE shorter than its fixed fields")]
    Short,
    #[error("info_buflen {len} is more than the {limit} bytes Linux passes")]
    TooLong { len: u32, limit: usize },
    #[error("info_buf_offset {0} points into the fixed fields")]
    OffsetInHeader(u32),
    #[error("the information buffer runs past msg_len")]
    PastMessage,
    #[error("NDIS object type {0:#x} is not NDIS_OBJECT_TYPE_OFFLOAD")]
    ObjectType(u8),
    #[error("NDIS object revision {0} is below 1")]
    ObjectRevision(u8),
    #[error("NDIS object size {size} is outside 112..={returned}")]
    ObjectSize { size: u16, returned: usize },
}

/// `rndis_filter_query_device`: the information buffer of a whole
/// RNDIS QUERY_COMPLETE message (`reply`, header included), given the
/// result buffer size the caller passes. Linux does not look at the
/// status: a refused OID comes back as an empty result.
pub fn query_result(reply: &[u8], result_size: usize) -> Result<&[u8], Refused> {
    let word = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let header = rndis::HEADER_SIZE as u32;
    let msg_len = word(4).ok_or(Refused::Short)?.min(reply.len() as u32);
    // msg_len - RNDIS_HEADER_SIZE < sizeof(struct rndis_query_complete)
    if msg_len < header + 16 {
        return Err(Refused::Short);
    }
    let (len, off) = (
        word(16).ok_or(Refused::Short)?,
        word(20).ok_or(Refused::Short)?,
    );
    let body = msg_len - header;
    if len as usize > result_size {
        return Err(Refused::TooLong {
            len,
            limit: result_size,
        });
    }
    if off < 16 {
        return Err(Refused::OffsetInHeader(off));
    }
    if body < off || body - off < len {
        return Err(Refused::PastMessage);
    }
    let start = (header + off) as usize;
    Ok(&reply[start..start + len as usize])
}

/// `rndis_query_hwcaps`: the offload capabilities object, as Linux
/// validates it after the query (type, revision, size against what came
/// back). Shorter objects are zero-extended, as Linux's memset does.
pub fn hardware_caps(result: &[u8]) -> Result<NdisOffload, Refused> {
    let mut buf = [0u8; OFFLOAD_RESULT_SIZE];
    let n = result.len().min(OFFLOAD_RESULT_SIZE);
    buf[..n].copy_from_slice(&result[..n]);
    let caps = NdisOffload::read_from_bytes(&buf).expect("156 bytes");
    let h = caps.header;
    if h.obj_type != OBJECT_TYPE_OFFLOAD {
        return Err(Refused::ObjectType(h.obj_type));
    }
    if h.revision < 1 {
        return Err(Refused::ObjectRevision(h.revision));
    }
    let size = h.size.get();
    if usize::from(size) > result.len() || size < OFFLOAD_SIZE_6_0 {
        return Err(Refused::ObjectSize {
            size,
            returned: result.len(),
        });
    }
    Ok(caps)
}

/// The offloads Linux turns on (`rndis_netdev_set_hwcaps`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// NETIF_F_IP_CSUM: TCP/IPv4 checksum offload.
    pub csum_tcp4: bool,
    pub csum_udp4: bool,
    /// NETIF_F_TSO.
    pub tso4: bool,
    /// NETIF_F_IPV6_CSUM: TCP/IPv6 checksum offload.
    pub csum_tcp6: bool,
    pub csum_udp6: bool,
    /// NETIF_F_TSO6.
    pub tso6: bool,
    /// Largest GSO frame Linux will hand the device.
    pub gso_max_size: u32,
}

/// `GSO_MAX_SIZE` (65536), Linux's starting point for gso_max_size.
const GSO_MAX_SIZE: u32 = 65_536;

/// `rndis_netdev_set_hwcaps`: what Linux enables from the capabilities.
pub fn features(caps: &NdisOffload) -> Features {
    use offload_caps::*;
    let mut f = Features {
        gso_max_size: GSO_MAX_SIZE,
        ..Features::default()
    };
    // (hwcaps.csum.ip4_txcsum & NDIS_TXCSUM_ALL_TCP4) == NDIS_TXCSUM_ALL_TCP4
    let tx4 = caps.ip4_txcsum.get();
    if tx4 & ALL_TCP4 == ALL_TCP4 {
        f.csum_tcp4 = true;
        if caps.lsov2_ip4_encap.get() & ENCAP_8023 != 0 {
            f.tso4 = true;
            f.gso_max_size = f.gso_max_size.min(caps.lsov2_ip4_maxsz.get());
        }
        f.csum_udp4 = tx4 & UDP4 != 0;
    }
    // (hwcaps.csum.ip6_txcsum & NDIS_TXCSUM_ALL_TCP6) == NDIS_TXCSUM_ALL_TCP6
    let tx6 = caps.ip6_txcsum.get();
    if tx6 & ALL_TCP6 == ALL_TCP6 {
        f.csum_tcp6 = true;
        // (ip6_encap & NDIS_OFFLOAD_ENCAP_8023) &&
        // (ip6_opts & NDIS_LSOV2_CAP_IP6) == NDIS_LSOV2_CAP_IP6
        if caps.lsov2_ip6_encap.get() & ENCAP_8023 != 0
            && caps.lsov2_ip6_opts.get() & LSOV2_IP6 == LSOV2_IP6
        {
            f.tso6 = true;
            f.gso_max_size = f.gso_max_size.min(caps.lsov2_ip6_maxsz.get());
        }
        f.csum_udp6 = tx6 & UDP6 != 0;
    }
    f
}

/// `struct ndis_offload_params` as `rndis_filter_set_offload_params`
/// sends it for `features`: 28 bytes (`sizeof`, natural alignment) from
/// NVSP 5, `VERSION_4_OFFLOAD_SIZE` (22) with the UDP fields cleared
/// before.
pub fn offload_params(f: &Features, nvsp_version: u32) -> Vec<u8> {
    const TX_RX_DISABLED: u8 = 1;
    const TX_RX_ENABLED: u8 = 4;
    const LSOV2_ENABLED: u8 = 2;
    let on = |b: bool, v: u8| if b { v } else { 0 };
    let old = nvsp_version <= super::super::nvsp::version::V4;
    let len: u16 = if old { 22 } else { 28 };
    let mut p = vec![0u8; usize::from(len)];
    p[0] = rndis::OBJECT_TYPE_OFFLOAD_PARAMETERS;
    p[1] = 3; // NDIS_OFFLOAD_PARAMETERS_REVISION_3
    p[2..4].copy_from_slice(&len.to_le_bytes());
    p[4] = TX_RX_DISABLED; // ip_v4_csum: Linux checksums IP headers itself
    p[5] = on(f.csum_tcp4, TX_RX_ENABLED);
    p[6] = on(f.csum_udp4 && !old, TX_RX_ENABLED);
    p[7] = on(f.csum_tcp6, TX_RX_ENABLED);
    p[8] = on(f.csum_udp6 && !old, TX_RX_ENABLED);
    p[11] = on(f.tso4, LSOV2_ENABLED);
    p[12] = on(f.tso6, LSOV2_ENABLED);
    p
}

/// `rndis_filter_device_add`: the receive queues Linux sees in the RSS
/// capabilities reply, or None when it stays on one channel (a refused
/// query reads as zeroed capabilities; fewer than 2 queues means no RSS).
pub fn rss_queues(result: Result<&[u8], Refused>) -> Option<u32> {
    let result = result.ok()?;
    let mut buf = [0u8; RSS_CAPS_RESULT_SIZE];
    buf[..result.len()].copy_from_slice(result);
    let caps = RssCapabilities::read_from_bytes(&buf).expect("18 bytes");
    let queues = caps.num_receive_queues.get();
    (queues >= 2).then_some(queues)
}

/// Channels Linux opens: `min(online CPUs, receive queues,
/// VRSS_CHANNEL_DEFAULT)` (`rndis_filter_device_add`, `netvsc_probe`).
pub fn channels(queues: Option<u32>, cpus: u32) -> u32 {
    queues.map_or(1, |q| q.min(cpus).clamp(1, DEFAULT_CHANNELS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn complete(info: &[u8], off: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&rndis::msg::QUERY_COMPLETE.to_le_bytes());
        m.extend_from_slice(&(8 + off + info.len() as u32).to_le_bytes());
        m.extend_from_slice(&7u32.to_le_bytes()); // request id
        m.extend_from_slice(&0u32.to_le_bytes()); // status
        m.extend_from_slice(&(info.len() as u32).to_le_bytes());
        m.extend_from_slice(&off.to_le_bytes());
        m.resize((8 + off) as usize, 0);
        m.extend_from_slice(info);
        m
    }

    #[test]
    fn query_result_applies_linux_bounds() {
        let r = complete(&[1, 2, 3, 4], 16);
        assert_eq!(query_result(&r, 4), Ok(&[1u8, 2, 3, 4][..]));
        assert_eq!(
            query_result(&r, 3),
            Err(Refused::TooLong { len: 4, limit: 3 })
        );
        let mut bad = complete(&[1, 2, 3, 4], 16);
        bad[20..24].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(query_result(&bad, 4), Err(Refused::OffsetInHeader(8)));
        let mut past = complete(&[1, 2, 3, 4], 16);
        past[16..20].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(query_result(&past, 8), Err(Refused::PastMessage));
        assert_eq!(query_result(&r[..20], 4), Err(Refused::Short));
    }

    #[test]
    fn a_20_byte_rss_reply_leaves_linux_on_one_channel() {
        let mut caps = [0u8; 20];
        caps[12..16].copy_from_slice(&4u32.to_le_bytes());
        let r = complete(&caps, 16);
        let got = query_result(&r, RSS_CAPS_RESULT_SIZE);
        assert!(got.is_err());
        assert_eq!(channels(rss_queues(got), 2), 1);
        let r = complete(&caps[..18], 16);
        assert_eq!(
            channels(rss_queues(query_result(&r, RSS_CAPS_RESULT_SIZE)), 2),
            2
        );
    }

    #[test]
    fn tso6_needs_both_lsov2_ipv6_option_bits() {
        let mut caps = rndis::offload_capabilities(super::super::super::nvsp::version::V61, 62_780);
        assert!(features(&caps).tso6);
        caps.lsov2_ip6_opts = (offload_caps::LSOV2_IP6_EXT | 0x2).into();
        let f = features(&caps);
        assert!(!f.tso6 && f.tso4 && f.csum_tcp6);
        assert_eq!(hardware_caps(caps.as_bytes()), Ok(caps));
        assert_eq!(
            hardware_caps(&caps.as_bytes()[..100]),
            Err(Refused::ObjectSize {
                size: 156,
                returned: 100
            })
        );
    }

    #[test]
    fn offload_params_follow_linux_sizes() {
        let f = Features {
            csum_tcp4: true,
            csum_udp4: true,
            tso4: true,
            csum_tcp6: true,
            csum_udp6: true,
            tso6: true,
            gso_max_size: 62_780,
        };
        let p = offload_params(&f, super::super::super::nvsp::version::V61);
        assert_eq!(
            p,
            [
                0x80, 3, 28, 0, 1, 4, 4, 4, 4, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0
            ]
        );
        let p = offload_params(&f, super::super::super::nvsp::version::V4);
        assert_eq!(p.len(), 22);
        assert_eq!(
            (p[6], p[8]),
            (0, 0),
            "no UDP checksum offload before NVSP 5"
        );
    }
}
