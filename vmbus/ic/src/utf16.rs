//! KVP strings: UTF-16LE with a byte count that includes the 2-byte
//! terminator. The host side encodes strictly and decodes strictly (an
//! odd, oversized or unterminated string, an interior NUL or a lone
//! surrogate is refused). The guest side models what Linux's
//! `utf16s_to_utf8s`/`utf8s_to_utf16s` do, since that is what a guest
//! answers with.

/// Why a UTF-16 string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Utf16Error {
    #[error("byte count {0} is odd")]
    Odd(u32),
    #[error("byte count {size} is outside 2..={max}")]
    Size { size: u32, max: usize },
    #[error("string is not NUL-terminated at its byte count")]
    Unterminated,
    #[error("NUL inside the string")]
    InteriorNul,
    #[error("invalid UTF-16 (lone surrogate)")]
    Invalid,
    #[error("string of {len} bytes does not fit {max} bytes with its terminator")]
    TooLong { len: usize, max: usize },
}

/// Encodes `s` as UTF-16LE plus terminator into `dst` (which the caller
/// has zeroed). Returns the byte count including the terminator.
pub fn encode(s: &str, dst: &mut [u8]) -> Result<u32, Utf16Error> {
    if s.contains('\0') {
        return Err(Utf16Error::InteriorNul);
    }
    let units = s.encode_utf16().count();
    let len = 2 * (units + 1);
    if len > dst.len() {
        return Err(Utf16Error::TooLong {
            len,
            max: dst.len(),
        });
    }
    for (i, u) in s.encode_utf16().enumerate() {
        dst[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
    }
    dst[len - 2..len].fill(0);
    Ok(len as u32)
}

/// Decodes a string of `size` bytes (terminator included) from `field`,
/// whose length is the protocol maximum.
pub fn decode(field: &[u8], size: u32) -> Result<String, Utf16Error> {
    if !size.is_multiple_of(2) {
        return Err(Utf16Error::Odd(size));
    }
    let n = size as usize;
    if n < 2 || n > field.len() {
        return Err(Utf16Error::Size {
            size,
            max: field.len(),
        });
    }
    let units: Vec<u16> = field[..n]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let (last, text) = units.split_last().expect("at least one unit");
    if *last != 0 {
        return Err(Utf16Error::Unterminated);
    }
    if text.contains(&0) {
        return Err(Utf16Error::InteriorNul);
    }
    String::from_utf16(text).map_err(|_| Utf16Error::Invalid)
}

/// Linux's `utf16s_to_utf8s`: reads at most `inlen` units (Linux passes a
/// byte count here) from `src`, stops at NUL, drops lone surrogates, and
/// writes at most `maxout` bytes of UTF-8.
pub fn linux_to_utf8(src: &[u8], inlen: usize, maxout: usize) -> String {
    let units: Vec<u16> = src
        .chunks_exact(2)
        .take(inlen)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let mut out = String::new();
    for c in char::decode_utf16(units).flatten() {
        if out.len() + c.len_utf8() > maxout {
            break;
        }
        out.push(c);
    }
    out
}

/// Linux's `utf8s_to_utf16s` as the KVP reply path uses it: writes at most
/// `max_units` units into `dst` (no terminator: the request buffer is
/// zeroed) and returns the number written. A character that needs a
/// surrogate pair is not split.
pub fn linux_from_utf8(s: &str, dst: &mut [u8], max_units: usize) -> usize {
    let mut n = 0;
    let mut pair = [0u16; 2];
    for c in s.chars() {
        if c == '\0' {
            break;
        }
        let units = c.encode_utf16(&mut pair);
        if n + units.len() > max_units || 2 * (n + units.len()) > dst.len() {
            break;
        }
        for u in units.iter() {
            dst[2 * n..2 * n + 2].copy_from_slice(&u.to_le_bytes());
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_terminator() {
        let mut buf = [0u8; 16];
        assert_eq!(encode("héy", &mut buf), Ok(8));
        assert_eq!(&buf[..8], &[b'h', 0, 0xe9, 0, b'y', 0, 0, 0]);
        assert_eq!(decode(&buf, 8).unwrap(), "héy");
        assert_eq!(encode("", &mut buf), Ok(2));
        assert_eq!(decode(&buf, 2).unwrap(), "");
    }

    #[test]
    fn strict_decoding() {
        let mut buf = [0u8; 16];
        encode("abc", &mut buf).unwrap();
        assert_eq!(decode(&buf, 7), Err(Utf16Error::Odd(7)));
        assert_eq!(decode(&buf, 6), Err(Utf16Error::Unterminated));
        assert!(matches!(decode(&buf, 0), Err(Utf16Error::Size { .. })));
        assert!(matches!(decode(&buf, 18), Err(Utf16Error::Size { .. })));
        assert_eq!(decode(&buf, 10), Err(Utf16Error::InteriorNul));
        let lone = [0x00, 0xd8, 0, 0];
        assert_eq!(decode(&lone, 4), Err(Utf16Error::Invalid));
        assert!(matches!(
            encode("toolong", &mut buf[..8]),
            Err(Utf16Error::TooLong { .. })
        ));
        assert_eq!(encode("a\0b", &mut buf), Err(Utf16Error::InteriorNul));
    }

    #[test]
    fn linux_conversions() {
        let mut buf = [0u8; 16];
        encode("a😀b", &mut buf).unwrap();
        assert_eq!(linux_to_utf8(&buf, 16, 100), "a😀b");
        assert_eq!(linux_to_utf8(&buf, 2, 100), "a", "stops after inlen units");
        let lone = [b'x', 0, 0x00, 0xdc, b'y', 0];
        assert_eq!(
            linux_to_utf8(&lone, 3, 100),
            "xy",
            "lone low surrogate dropped"
        );
        let mut out = [0u8; 16];
        assert_eq!(linux_from_utf8("a😀b", &mut out, 2), 1, "pair not split");
        assert_eq!(linux_from_utf8("a😀b", &mut out, 8), 4);
        assert_eq!(&out[..2], &[b'a', 0]);
    }
}
