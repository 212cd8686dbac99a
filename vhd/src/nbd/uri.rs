//! NBD URIs as qemu and libnbd write them (NetworkBlockDevice/nbd
//! `doc/uri.md`): `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`. The export name is the path without
//! its leading `/`, percent-decoded. TLS schemes (`nbds`, `nbds+unix`) are
//! refused: vspa's NBD client does not speak TLS.

use super::NbdError;
use super::wire::DEFAULT_PORT;
use std::path::{Path, PathBuf};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP host (name or address, IPv6 without brackets) and port.
    Tcp { host: String, port: u16 },
    /// A Unix socket path.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    /// Export name (empty: the server's default export).
    pub export: String,
}

/// True when `path` is written as an NBD URI (so it names no file).
pub fn is_uri(path: &Path) -> bool {
    path.to_str().is_some_and(|s| {
        [
            "nbd://",
            "nbd+unix://",
            "nbds://",
            "nbds+unix://",
            "nbd+tcp://",
        ]
        .iter()
        .any(|scheme| s.starts_with(scheme))
    })
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let export = encode(&self.export, false);
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            Endpoint::Unix(path) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                encode(&path.to_string_lossy(), true)
            ),
        }
    }
}

impl std::str::FromStr for NbdUri {
    type Err = NbdError;

    fn from_str(text: &str) -> Result<NbdUri, NbdError> {
        let bad = |why: &str| NbdError::Uri(format!("{text}: {why}"));
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("not a URI"))?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" | "nbds+tcp" => {
                return Err(bad("TLS (nbds) is not supported by vspa's NBD client"));
            }
            _ => return Err(bad("scheme is not nbd, nbd+tcp or nbd+unix")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err(bad("fragments are not allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| bad("bad percent-encoding in the export"))?;
        if export.len() > super::wire::MAX_STRING {
            return Err(bad("export name longer than 4096 bytes"));
        }
        let mut socket = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "socket" if unix => {
                    let value = decode(value).ok_or_else(|| bad("bad percent-encoding"))?;
                    socket = Some(PathBuf::from(value));
                }
                _ => return Err(bad(&format!("unsupported query parameter {key:?}"))),
            }
        }
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    "a Unix socket URI has no host (nbd+unix:///export?socket=PATH)",
                ));
            }
            Endpoint::Unix(socket.ok_or_else(|| bad("missing ?socket=PATH"))?)
        } else {
            let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host:port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            Endpoint::Tcp { host, port }
        };
        Ok(NbdUri { endpoint, export })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; userinfo is ignored.
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().ok()?,
    };
    Some((host.to_string(), port))
}

/// Percent-decoding (RFC 3986); None on a malformed escape or non-UTF-8.
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes what a path segment (or a query value) cannot hold.
fn encode(text: &str, query: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b':' | b'@')
            || (!query && matches!(b, b'=' | b'+' | b','));
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> NbdUri {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn the_spec_examples_give_their_export_names() {
        let tcp = |host: &str, port| Endpoint::Tcp {
            host: host.into(),
            port,
        };
        for (text, endpoint, export) in [
            ("nbd://example.com/disk", tcp("example.com", 10809), "disk"),
            ("nbd://example.com/", tcp("example.com", 10809), ""),
            ("nbd://example.com", tcp("example.com", 10809), ""),
            (
                "nbd://example.com//disk",
                tcp("example.com", 10809),
                "/disk",
            ),
            (
                "nbd://example.com/hello%20world",
                tcp("example.com", 10809),
                "hello world",
            ),
            ("nbd://127.0.0.1:2000/x", tcp("127.0.0.1", 2000), "x"),
            ("nbd://[::1]:2000/x", tcp("::1", 2000), "x"),
            ("nbd://[::1]/", tcp("::1", 10809), ""),
            (
                "nbd+unix:///disk?socket=/tmp/s.sock",
                Endpoint::Unix("/tmp/s.sock".into()),
                "disk",
            ),
            (
                "nbd+unix:///?socket=/tmp/a%20b",
                Endpoint::Unix("/tmp/a b".into()),
                "",
            ),
        ] {
            let uri = parse(text);
            assert_eq!(uri.endpoint, endpoint, "{text}");
            assert_eq!(uri.export, export, "{text}");
            assert_eq!(parse(&uri.to_string()), uri, "round trip of {text}");
        }
    }

    #[test]
    fn bad_uris_are_refused_with_a_reason() {
        for text in [
            "nbds://host/x",
            "nbds+unix:///x?socket=/s",
            "http://host/x",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://host:99999/x",
            "nbd://host/x?socket=/s",
            "nbd:///x",
            "nbd://host/%zz",
            "nbd://host/x#frag",
        ] {
            assert!(text.parse::<NbdUri>().is_err(), "{text} accepted");
        }
        assert!(is_uri(Path::new("nbd://h/x")));
        assert!(is_uri(Path::new("nbd+unix:///x?socket=/s")));
        assert!(!is_uri(Path::new("disk.vhd")));
        assert!(!is_uri(Path::new("/srv/nbd/disk.vhd")));
    }
}
