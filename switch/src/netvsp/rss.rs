//! Receive-side scaling: the guest's settings (OID_GEN_RECEIVE_SCALE_
//! PARAMETERS, parsed into [`RssParams`]) and the Toeplitz hash NDIS
//! specifies over a frame's addresses and TCP ports, which picks the
//! channel a received flow goes to through the guest's indirection table.

use zerocopy::FromBytes;

use super::rndis;
use crate::wire::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IPPROTO_TCP, Ipv4Hdr, Ipv6Hdr};

/// NDIS hash types (`hash_info` of the RSS parameters).
pub const HASH_FUNC_TOEPLITZ: u32 = 0x1;
pub const HASH_IPV4: u32 = 0x100;
pub const HASH_TCP_IPV4: u32 = 0x200;
pub const HASH_IPV6: u32 = 0x400;
pub const HASH_TCP_IPV6: u32 = 0x1000;

/// The key used until the guest sets its own (the one from the NDIS
/// specification's verification suite).
pub const DEFAULT_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// Toeplitz hash of `input` with `key` (bits beyond the key count as 0).
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let mut result = 0u32;
    for (i, &byte) in input.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        // The 64 key bits starting at bit 8 * i.
        let mut window = [0u8; 8];
        for (j, w) in window.iter_mut().enumerate() {
            *w = key.get(i + j).copied().unwrap_or(0);
        }
        let k = u64::from_be_bytes(window);
        for b in 0..8 {
            if byte & (0x80 >> b) != 0 {
                result ^= (k >> (32 - b)) as u32;
            }
        }
    }
    result
}

/// The guest's receive-side scaling settings.
#[derive(Debug, Clone)]
pub struct RssSettings {
    key: [u8; rndis::RSS_KEY_MAX],
    key_len: usize,
    table: [u8; rndis::RSS_TABLE_MAX],
    table_len: usize,
    hash_info: u32,
}

/// What an OID_GEN_RECEIVE_SCALE_PARAMETERS set asks for.
#[derive(Debug, Clone)]
pub enum RssParams {
    /// Hashing off (NDIS_RSS_PARAM_FLAG_DISABLE_RSS).
    Disable,
    /// The settings to hash with (boxed: parsed only on the control path).
    Enable(Box<RssSettings>),
}

/// Why RSS parameters are refused (RNDIS_STATUS_INVALID_DATA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RssError {
    #[error("not an NDIS_RSS_PARAMETERS object")]
    NotRssParameters,
    #[error("indirection table or key larger than NDIS allows")]
    TooLarge,
    #[error("indirection table or key outside the information buffer")]
    OutOfBounds,
}

impl RssParams {
    /// Parses the information buffer of the set.
    pub fn parse(info: &[u8]) -> Result<RssParams, RssError> {
        let (p, _) =
            rndis::RssParameters::read_from_prefix(info).map_err(|_| RssError::NotRssParameters)?;
        if p.header.obj_type != rndis::OBJECT_TYPE_RSS_PARAMETERS {
            return Err(RssError::NotRssParameters);
        }
        if p.flags.get() & rndis::RSS_PARAM_FLAG_DISABLE_RSS != 0 {
            return Ok(RssParams::Disable);
        }
        let (toff, entries) = (
            p.table_offset.get() as usize,
            usize::from(p.table_size.get()) / 4,
        );
        let (koff, klen) = (p.key_offset.get() as usize, usize::from(p.key_size.get()));
        if entries > rndis::RSS_TABLE_MAX || klen > rndis::RSS_KEY_MAX {
            return Err(RssError::TooLarge);
        }
        let field = |off: usize, len: usize| info.get(off..off.checked_add(len)?);
        let table = field(toff, entries * 4).ok_or(RssError::OutOfBounds)?;
        let key = field(koff, klen).ok_or(RssError::OutOfBounds)?;
        let mut s = RssSettings {
            key: [0; rndis::RSS_KEY_MAX],
            key_len: klen,
            table: [0; rndis::RSS_TABLE_MAX],
            table_len: entries,
            hash_info: p.hash_info.get(),
        };
        s.key[..klen].copy_from_slice(key);
        for (i, e) in table.chunks_exact(4).enumerate() {
            // Entries name channels; clamp what no channel could be.
            s.table[i] = u32::from_le_bytes(e.try_into().expect("4 bytes")).min(255) as u8;
        }
        Ok(RssParams::Enable(Box::new(s)))
    }
}

impl RssSettings {
    /// The channel the guest's indirection table gives `hash`, if it has one.
    pub fn channel(&self, hash: u32) -> Option<usize> {
        (self.table_len > 0).then(|| usize::from(self.table[hash as usize % self.table_len]))
    }
}

/// The Toeplitz hash of a frame the guest's RSS settings ask for (or a
/// fixed-key one when it set none); None for frames that are not IP.
pub fn flow_hash(rss: Option<&RssSettings>, frame: &[u8]) -> Option<u32> {
    let mut input = [0u8; 36];
    let (n, ports) = hash_input(frame_body(frame), &mut input)?;
    let (key, hash_info) = match rss {
        Some(r) if r.key_len >= 4 => (&r.key[..r.key_len], r.hash_info),
        _ => (&DEFAULT_KEY[..], u32::MAX),
    };
    // Hash the ports only when the guest asked for TCP hashing.
    let n = if ports && hash_info & (HASH_TCP_IPV4 | HASH_TCP_IPV6) == 0 {
        n - 4
    } else {
        n
    };
    Some(toeplitz(key, &input[..n]))
}

/// What follows the MAC addresses and any 802.1Q tag.
fn frame_body(data: &[u8]) -> &[u8] {
    let from = if data.get(12..14) == Some(&ETHERTYPE_VLAN.to_be_bytes()[..]) {
        16
    } else {
        12
    };
    data.get(from..).unwrap_or_default()
}

/// Addresses (and TCP ports) of a frame body (what follows the MACs), in
/// Toeplitz input order: returns the length and whether ports are in it.
fn hash_input(body: &[u8], out: &mut [u8; 36]) -> Option<(usize, bool)> {
    let et = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let l3 = body.get(2..)?;
    let (n, proto, l4) = match et {
        ETHERTYPE_IPV4 => {
            let (ip, _) = Ipv4Hdr::ref_from_prefix(l3).ok()?;
            out[..4].copy_from_slice(&ip.src);
            out[4..8].copy_from_slice(&ip.dst);
            // Only a first fragment without more has the whole L4 header.
            let whole = ip.frag.get() & 0x3fff == 0;
            let l4 = whole.then(|| l3.get(ip.header_len()..)).flatten();
            (8, ip.proto, l4)
        }
        ETHERTYPE_IPV6 => {
            let (ip, rest) = Ipv6Hdr::ref_from_prefix(l3).ok()?;
            out[..16].copy_from_slice(&ip.src);
            out[16..32].copy_from_slice(&ip.dst);
            (32, ip.next_header, Some(rest))
        }
        _ => return None,
    };
    match (proto, l4) {
        (IPPROTO_TCP, Some(l4)) if l4.len() >= 4 => {
            out[n..n + 4].copy_from_slice(&l4[..4]);
            Some((n + 4, true))
        }
        _ => Some((n, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_suite_vectors() {
        // 66.9.149.187:2794 -> 161.142.100.80:1766
        let ip = [66, 9, 149, 187, 161, 142, 100, 80];
        assert_eq!(toeplitz(&DEFAULT_KEY, &ip), 0x323e_8fc2);
        let mut tcp = ip.to_vec();
        tcp.extend_from_slice(&2794u16.to_be_bytes());
        tcp.extend_from_slice(&1766u16.to_be_bytes());
        assert_eq!(toeplitz(&DEFAULT_KEY, &tcp), 0x51cc_c178);
        // 199.92.111.2:14230 -> 65.69.140.83:4739
        let ip = [199, 92, 111, 2, 65, 69, 140, 83];
        assert_eq!(toeplitz(&DEFAULT_KEY, &ip), 0xd718_262a);
        let mut tcp = ip.to_vec();
        tcp.extend_from_slice(&14230u16.to_be_bytes());
        tcp.extend_from_slice(&4739u16.to_be_bytes());
        assert_eq!(toeplitz(&DEFAULT_KEY, &tcp), 0xc626_b0ea);
    }

    #[test]
    fn flow_hash_inputs() {
        let l4 = [
            0x03, 0xe8, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0, 0, 0, 0, 0, 0, 0,
        ];
        let ip = crate::testing::ipv4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, &l4);
        let f = crate::testing::eth(Default::default(), Default::default(), ETHERTYPE_IPV4, &ip);
        let mut input = [0u8; 36];
        let (n, ports) = hash_input(&f[12..], &mut input).unwrap();
        assert!(ports);
        assert_eq!(&input[..n], &[10, 0, 0, 1, 10, 0, 0, 2, 0x03, 0xe8, 0, 80]);
        assert!(hash_input(&[0x08, 0x06, 0, 1], &mut input).is_none());
        // Without TCP hashing asked for, the ports stay out.
        let mut info = vec![0u8; 80];
        info[0] = rndis::OBJECT_TYPE_RSS_PARAMETERS;
        info[8..12].copy_from_slice(&(HASH_IPV4 | HASH_FUNC_TOEPLITZ).to_le_bytes());
        info[20..22].copy_from_slice(&40u16.to_le_bytes());
        info[24..28].copy_from_slice(&40u32.to_le_bytes());
        info[40..80].copy_from_slice(&DEFAULT_KEY);
        let RssParams::Enable(no_tcp) = RssParams::parse(&info).unwrap() else {
            panic!("enabled")
        };
        assert_eq!(
            flow_hash(Some(&no_tcp), &f),
            Some(toeplitz(&DEFAULT_KEY, &input[..8]))
        );
        assert_eq!(
            flow_hash(None, &f),
            Some(toeplitz(&DEFAULT_KEY, &input[..12]))
        );
    }

    #[test]
    fn rss_parameters_parse_into_three_outcomes() {
        let mut info = vec![0u8; 40 + 16 + 40];
        info[0] = rndis::OBJECT_TYPE_RSS_PARAMETERS;
        info[8..12].copy_from_slice(&(HASH_TCP_IPV4 | HASH_FUNC_TOEPLITZ).to_le_bytes());
        info[12..14].copy_from_slice(&16u16.to_le_bytes()); // 4 entries
        info[16..20].copy_from_slice(&40u32.to_le_bytes());
        info[20..22].copy_from_slice(&40u16.to_le_bytes()); // key size
        info[24..28].copy_from_slice(&56u32.to_le_bytes());
        for (i, e) in [1u32, 0, 3, 300].iter().enumerate() {
            info[40 + 4 * i..44 + 4 * i].copy_from_slice(&e.to_le_bytes());
        }
        info[56..96].copy_from_slice(&DEFAULT_KEY);
        let RssParams::Enable(s) = RssParams::parse(&info).unwrap() else {
            panic!("enabled")
        };
        assert_eq!(s.channel(0), Some(1));
        assert_eq!(s.channel(3), Some(255), "entries past any channel clamp");
        let mut off = info.clone();
        off[4] = rndis::RSS_PARAM_FLAG_DISABLE_RSS as u8;
        assert!(matches!(RssParams::parse(&off), Ok(RssParams::Disable)));
        assert_eq!(
            RssParams::parse(&info[..80]).unwrap_err(),
            RssError::OutOfBounds
        );
        let mut big = info.clone();
        big[20] = 65; // key past RSS_KEY_MAX
        assert_eq!(RssParams::parse(&big).unwrap_err(), RssError::TooLarge);
        let mut other = info;
        other[0] = rndis::OBJECT_TYPE_OFFLOAD_PARAMETERS;
        assert_eq!(
            RssParams::parse(&other).unwrap_err(),
            RssError::NotRssParameters
        );
    }
}
