//! Receive-side scaling: the Toeplitz hash NDIS specifies, which picks the
//! channel a received flow goes to through the guest's indirection table.

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
}
