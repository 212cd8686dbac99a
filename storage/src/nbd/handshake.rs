//! The server side of the fixed newstyle handshake: greeting, client flags,
//! then options until `GO` or `EXPORT_NAME` enters transmission (or the
//! client aborts). Blocking, under the server's handshake deadline; every
//! length the client sends is bounded before anything is read or
//! allocated, and malformed options get `NBD_REP_ERR_INVALID` rather than
//! a dropped connection, as the spec asks.
//!
//! Mode: NOTLS (`STARTTLS` gets `NBD_REP_ERR_POLICY`).

use std::sync::Arc;

use vhd::nbd::Stream;
use vhd::nbd::wire::{
    self, BASE_ALLOCATION, ExportNameReply, Greeting, InfoBlockSize, InfoExport, OptionHeader,
    OptionReplyHeader, client_flags, handshake, info, opt, rep,
};
use zerocopy::{FromBytes, IntoBytes};

use super::Export;

/// Longest option data accepted (a name, a few queries).
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Options one client may send before it counts as abusive.
const MAX_OPTIONS: usize = 1024;
/// Context id of `base:allocation` (the only context).
pub(crate) const ALLOCATION_CONTEXT: u32 = 1;

/// What a successful handshake settled.
#[derive(Debug)]
pub(crate) struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    pub allocation: bool,
}

/// Why a handshake ended without a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("client aborted the handshake")]
    Aborted,
    #[error("client broke the handshake: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn protocol(why: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(why.into())
}

/// Option state negotiated so far.
struct Haggle<'a> {
    stream: &'a Stream,
    exports: &'a [Arc<Export>],
    no_zeroes: bool,
    structured: bool,
    /// The export `SET_META_CONTEXT` selected `base:allocation` for.
    allocation_for: Option<Arc<Export>>,
}

/// Runs the handshake on `stream` until transmission starts.
pub(crate) fn negotiate(
    stream: &Stream,
    exports: &[Arc<Export>],
) -> Result<Session, HandshakeError> {
    let greeting = Greeting {
        magic: wire::NBDMAGIC.into(),
        option_magic: wire::IHAVEOPT.into(),
        flags: (handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).into(),
    };
    stream.write_all(greeting.as_bytes())?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {flags:#x}")));
    }
    let mut h = Haggle {
        stream,
        exports,
        no_zeroes: flags & client_flags::NO_ZEROES != 0,
        structured: false,
        allocation_for: None,
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(session) = h.option()? {
            return Ok(session);
        }
    }
    Err(protocol("too many options"))
}

impl Haggle<'_> {
    /// Handles one option; a session when it entered transmission.
    fn option(&mut self) -> Result<Option<Session>, HandshakeError> {
        let mut head = [0u8; size_of::<OptionHeader>()];
        self.stream.read_exact(&mut head)?;
        let h = OptionHeader::read_from_bytes(&head).map_err(|_| protocol("short option"))?;
        if h.magic.get() != wire::IHAVEOPT {
            return Err(protocol(format!("bad option magic {:#x}", h.magic.get())));
        }
        let (option, len) = (h.option.get(), h.length.get());
        if len > MAX_OPTION_DATA {
            // Reading (or skipping) that much is not worth it: say why, go.
            let _ = self.reply_text(option, rep::ERR_TOO_BIG, "option data too long");
            return Err(protocol(format!(
                "option {option} with {len} bytes of data"
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        match option {
            opt::EXPORT_NAME => self.export_name(&data).map(Some),
            opt::ABORT => {
                let _ = self.reply(option, rep::ACK, &[]);
                Err(HandshakeError::Aborted)
            }
            opt::LIST if !data.is_empty() => self.invalid(option, "LIST takes no data"),
            opt::LIST => self.list(),
            opt::STARTTLS => self.reply_text(option, rep::ERR_POLICY, "TLS is not enabled"),
            opt::INFO | opt::GO => self.info_or_go(option, &data),
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                self.invalid(option, "STRUCTURED_REPLY takes no data")
            }
            opt::STRUCTURED_REPLY => {
                self.structured = true;
                self.reply(option, rep::ACK, &[]).map(|()| None)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, &data),
            _ => self.reply_text(option, rep::ERR_UNSUP, "option not supported"),
        }
    }

    fn reply(&self, option: u32, reply_type: u32, data: &[u8]) -> Result<(), HandshakeError> {
        let head = OptionReplyHeader::new(option, reply_type, data.len() as u32);
        let mut msg = head.as_bytes().to_vec();
        msg.extend_from_slice(data);
        self.stream.write_all(&msg)?;
        Ok(())
    }

    fn reply_text(
        &self,
        option: u32,
        reply_type: u32,
        text: &str,
    ) -> Result<Option<Session>, HandshakeError> {
        self.reply(option, reply_type, text.as_bytes())
            .map(|()| None)
    }

    fn invalid(&self, option: u32, why: &str) -> Result<Option<Session>, HandshakeError> {
        self.reply_text(option, rep::ERR_INVALID, why)
    }

    /// The export a client names; the empty name is the first export
    /// unless one is literally named "".
    fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        self.exports
            .iter()
            .find(|e| e.name.as_bytes() == name)
            .or_else(|| name.is_empty().then(|| self.exports.first()).flatten())
            .cloned()
    }

    fn export_name(&mut self, name: &[u8]) -> Result<Session, HandshakeError> {
        // This option cannot fail politely: an unknown name ends the session.
        let export = self.find(name).ok_or_else(|| {
            protocol(format!(
                "EXPORT_NAME of unknown export {:?}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let reply = ExportNameReply {
            size: export.size().into(),
            flags: export.flags(self.structured).into(),
        };
        let mut msg = reply.as_bytes().to_vec();
        if !self.no_zeroes {
            msg.extend_from_slice(&[0u8; wire::EXPORT_NAME_PADDING]);
        }
        self.stream.write_all(&msg)?;
        Ok(self.session(export))
    }

    fn session(&mut self, export: Arc<Export>) -> Session {
        let allocation = self
            .allocation_for
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, &export));
        Session {
            export,
            structured: self.structured,
            allocation,
        }
    }

    fn list(&self) -> Result<Option<Session>, HandshakeError> {
        for e in self.exports {
            let mut data = (e.name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(e.name.as_bytes());
            data.extend_from_slice(e.description.as_bytes());
            self.reply(opt::LIST, rep::SERVER, &data)?;
        }
        self.reply_text(opt::LIST, rep::ACK, "")
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, HandshakeError> {
        let Some((name, requests)) = parse_info_request(data) else {
            return self.invalid(option, "malformed INFO/GO request");
        };
        let Some(export) = self.find(name) else {
            return self.reply_text(option, rep::ERR_UNKNOWN, "no such export");
        };
        let reply_info = |bytes: &[u8]| self.reply(option, rep::INFO, bytes);
        let info_export = InfoExport {
            info_type: info::EXPORT.into(),
            size: export.size().into(),
            flags: export.flags(self.structured).into(),
        };
        reply_info(info_export.as_bytes())?;
        // Sent whether asked or not: clients that ignore it get EINVAL for
        // unaligned requests, which the spec allows.
        let block = export.block_size();
        let sizes = InfoBlockSize {
            info_type: info::BLOCK_SIZE.into(),
            minimum: block.into(),
            preferred: block.max(4096).into(),
            maximum: wire::MAX_PAYLOAD.into(),
        };
        reply_info(sizes.as_bytes())?;
        for kind in requests {
            let text = match kind {
                info::NAME => &export.name,
                info::DESCRIPTION if !export.description.is_empty() => &export.description,
                _ => continue,
            };
            let mut bytes = kind.to_be_bytes().to_vec();
            bytes.extend_from_slice(text.as_bytes());
            reply_info(&bytes)?;
        }
        self.reply(option, rep::ACK, &[])?;
        Ok((option == opt::GO).then(|| self.session(export)))
    }

    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Session>, HandshakeError> {
        if option == opt::SET_META_CONTEXT {
            // Replaced even when this one fails.
            self.allocation_for = None;
        }
        if !self.structured {
            return self.invalid(option, "negotiate structured replies first");
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.invalid(option, "malformed meta context request");
        };
        let Some(export) = self.find(name) else {
            return self.reply_text(option, rep::ERR_UNKNOWN, "no such export");
        };
        let wanted = if option == opt::LIST_META_CONTEXT {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
        } else {
            queries.contains(&BASE_ALLOCATION.as_bytes())
        };
        if wanted {
            let id = if option == opt::SET_META_CONTEXT {
                self.allocation_for = Some(export);
                ALLOCATION_CONTEXT
            } else {
                0
            };
            let mut bytes = id.to_be_bytes().to_vec();
            bytes.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, rep::META_CONTEXT, &bytes)?;
        }
        self.reply(option, rep::ACK, &[]).map(|()| None)
    }
}

/// `u32 length, name, u16 count, count × u16` of INFO and GO.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let (name, rest) = take_string(data)?;
    let count = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let items = rest.get(2..)?;
    if items.len() != count * 2 {
        return None;
    }
    Some((
        name,
        items
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// `u32 length, name, u32 count, count × (u32 length, query)`.
fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let (name, rest) = take_string(data)?;
    let count = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let mut rest = rest.get(4..)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let (query, after) = take_string(rest)?;
        queries.push(query);
        rest = after;
    }
    rest.is_empty().then_some((name, queries))
}

/// A u32-length-prefixed string (at most 4096 bytes) and what follows.
fn take_string(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    if len > wire::MAX_STRING {
        return None;
    }
    let text = data.get(4..4 + len)?;
    Some((text, &data[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_payloads_parse_strictly() {
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&[0, 3, 0, 1]);
        assert_eq!(parse_info_request(&go), Some((&b"disk"[..], vec![3, 1])));
        assert_eq!(parse_info_request(&go[..go.len() - 1]), None);
        let mut long = go.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);

        let mut meta = 0u32.to_be_bytes().to_vec();
        meta.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
            meta.extend_from_slice(q);
        }
        let (name, queries) = parse_meta_request(&meta).unwrap();
        assert!(name.is_empty());
        assert_eq!(queries, [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]);
        let mut lying = meta.clone();
        lying[7] = 3;
        assert_eq!(parse_meta_request(&lying), None);
    }
}
