//! The client side of the fixed newstyle handshake: greeting, client flags,
//! `STRUCTURED_REPLY`, `SET_META_CONTEXT base:allocation`, then `GO` with
//! an `INFO_BLOCK_SIZE` request (falling back to `EXPORT_NAME` for servers
//! without `GO`). Blocking, with a deadline per read and write; every
//! length the server sends is checked before anything is allocated.

use super::NbdError;
use super::stream::Stream;
use super::uri::NbdUri;
use super::wire::{
    self, ExportNameReply, Greeting, InfoBlockSize, InfoExport, OptionHeader, OptionReplyHeader,
    client_flags, flag, handshake, info, opt, rep,
};
use std::time::Duration;
use zerocopy::{FromBytes, IntoBytes};

/// Longest option reply accepted (strings are at most 4 KiB; a reply is a
/// few of them).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Replies accepted to one option before giving up (LIST of a huge server).
const MAX_REPLIES: usize = 4096;

/// What a handshake settled about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`wire::flag`).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, when the server offers it.
    pub allocation_context: Option<u32>,
    /// Size constraints (the spec's defaults unless the server sent some).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    pub description: Option<String>,
}

impl ExportInfo {
    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    /// The names of the transmission flags set, for `vspa image info`.
    pub fn flag_names(&self) -> Vec<&'static str> {
        [
            (flag::READ_ONLY, "read-only"),
            (flag::SEND_FLUSH, "flush"),
            (flag::SEND_FUA, "fua"),
            (flag::ROTATIONAL, "rotational"),
            (flag::SEND_TRIM, "trim"),
            (flag::SEND_WRITE_ZEROES, "write-zeroes"),
            (flag::SEND_DF, "df"),
            (flag::CAN_MULTI_CONN, "multi-conn"),
            (flag::SEND_CACHE, "cache"),
            (flag::SEND_FAST_ZERO, "fast-zero"),
        ]
        .into_iter()
        .filter(|(f, _)| self.has(*f))
        .map(|(_, name)| name)
        .collect()
    }
}

/// Connects to `uri` and negotiates its export; the stream is then in the
/// transmission phase (blocking, no timeout set).
pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<(Stream, ExportInfo), NbdError> {
    let stream = Stream::connect(&uri.endpoint, timeout)?;
    stream.set_timeout(Some(timeout))?;
    let mut session = Session::start(&stream)?;
    let info = session.negotiate(&uri.export)?;
    stream.set_timeout(None)?;
    Ok((stream, info))
}

/// Lists the server's exports (name, description) with `NBD_OPT_LIST`.
pub fn list_exports(uri: &NbdUri, timeout: Duration) -> Result<Vec<(String, String)>, NbdError> {
    let stream = Stream::connect(&uri.endpoint, timeout)?;
    stream.set_timeout(Some(timeout))?;
    let mut session = Session::start(&stream)?;
    session.send_option(opt::LIST, &[])?;
    let mut out = Vec::new();
    for _ in 0..MAX_REPLIES {
        let (reply, data) = session.read_reply(opt::LIST)?;
        match reply {
            rep::ACK => {
                session.send_option(opt::ABORT, &[])?;
                return Ok(out);
            }
            rep::SERVER => {
                let len = data
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .filter(|&n| n <= data.len() - 4)
                    .ok_or_else(|| protocol("NBD_REP_SERVER name overruns the reply"))?;
                let name = String::from_utf8_lossy(&data[4..4 + len]).into_owned();
                let rest = String::from_utf8_lossy(&data[4 + len..]).into_owned();
                out.push((name, rest));
            }
            other => return Err(refused(opt::LIST, other, &data)),
        }
    }
    Err(protocol("too many replies to NBD_OPT_LIST"))
}

fn protocol(why: impl Into<String>) -> NbdError {
    NbdError::Protocol(why.into())
}

fn refused(option: u32, reply: u32, data: &[u8]) -> NbdError {
    NbdError::Refused {
        option,
        reply,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

struct Session<'a> {
    stream: &'a Stream,
    no_zeroes: bool,
}

impl<'a> Session<'a> {
    /// Reads the greeting and answers with the client flags.
    fn start(stream: &'a Stream) -> Result<Session<'a>, NbdError> {
        let mut greeting = [0u8; size_of::<Greeting>()];
        stream.read_exact(&mut greeting)?;
        let g = Greeting::read_from_bytes(&greeting).map_err(|_| protocol("short greeting"))?;
        if g.magic.get() != wire::NBDMAGIC {
            return Err(protocol(format!("bad greeting magic {:#x}", g.magic.get())));
        }
        if g.option_magic.get() == wire::CLISERV_MAGIC {
            return Err(protocol("oldstyle server (not supported)"));
        }
        if g.option_magic.get() != wire::IHAVEOPT {
            return Err(protocol(format!(
                "bad newstyle magic {:#x}",
                g.option_magic.get()
            )));
        }
        let flags = g.flags.get();
        if flags & handshake::FIXED_NEWSTYLE == 0 {
            return Err(protocol("server does not speak fixed newstyle"));
        }
        let no_zeroes = flags & handshake::NO_ZEROES != 0;
        let mine = client_flags::FIXED_NEWSTYLE
            | if no_zeroes {
                client_flags::NO_ZEROES
            } else {
                0
            };
        stream.write_all(&mine.to_be_bytes())?;
        Ok(Session { stream, no_zeroes })
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len()).map_err(|_| protocol("option too long"))?;
        let mut msg = OptionHeader::new(option, len).as_bytes().to_vec();
        msg.extend_from_slice(data);
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// One reply to `option`: its type and data.
    fn read_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut head = [0u8; size_of::<OptionReplyHeader>()];
        self.stream.read_exact(&mut head)?;
        let h = OptionReplyHeader::read_from_bytes(&head).map_err(|_| protocol("short reply"))?;
        if h.magic.get() != wire::OPTION_REPLY_MAGIC {
            return Err(protocol(format!(
                "bad option reply magic {:#x}",
                h.magic.get()
            )));
        }
        if h.option.get() != option {
            return Err(protocol(format!(
                "reply for option {} while waiting for {option}",
                h.option.get()
            )));
        }
        let len = h.length.get();
        if len > MAX_OPTION_REPLY {
            return Err(protocol(format!("oversized option reply ({len} bytes)")));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok((h.reply_type.get(), data))
    }

    /// Structured replies, the allocation context, then GO (or EXPORT_NAME).
    fn negotiate(&mut self, export: &str) -> Result<ExportInfo, NbdError> {
        self.send_option(opt::STRUCTURED_REPLY, &[])?;
        let structured = match self.read_reply(opt::STRUCTURED_REPLY)? {
            (rep::ACK, _) => true,
            (r, _) if r & rep::ERR_BIT != 0 => false,
            (r, _) => return Err(protocol(format!("reply {r:#x} to STRUCTURED_REPLY"))),
        };
        let allocation_context = if structured {
            self.set_meta_context(export)?
        } else {
            None
        };
        let mut info = match self.go(export)? {
            Some(info) => info,
            None => self.export_name(export)?,
        };
        info.structured = structured;
        info.allocation_context = allocation_context;
        check_sizes(&info)?;
        Ok(info)
    }

    fn set_meta_context(&mut self, export: &str) -> Result<Option<u32>, NbdError> {
        let query = wire::BASE_ALLOCATION.as_bytes();
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query);
        self.send_option(opt::SET_META_CONTEXT, &data)?;
        let mut context = None;
        for _ in 0..MAX_REPLIES {
            match self.read_reply(opt::SET_META_CONTEXT)? {
                (rep::ACK, _) => return Ok(context),
                (rep::META_CONTEXT, d) if d.len() >= 4 => {
                    if &d[4..] == query {
                        context = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                    }
                }
                (r, _) if r & rep::ERR_BIT != 0 => return Ok(None),
                (r, _) => {
                    return Err(protocol(format!("reply {r:#x} to SET_META_CONTEXT")));
                }
            }
        }
        Err(protocol("too many replies to SET_META_CONTEXT"))
    }

    /// `NBD_OPT_GO`; None when the server does not know it.
    fn go(&mut self, export: &str) -> Result<Option<ExportInfo>, NbdError> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
        self.send_option(opt::GO, &data)?;
        let mut out = default_info();
        let mut have_export = false;
        for _ in 0..MAX_REPLIES {
            let (reply, d) = self.read_reply(opt::GO)?;
            match reply {
                rep::ACK if have_export => return Ok(Some(out)),
                rep::ACK => return Err(protocol("GO acknowledged without NBD_INFO_EXPORT")),
                rep::INFO => have_export |= parse_info(&d, &mut out)?,
                rep::ERR_UNSUP => return Ok(None),
                r if r & rep::ERR_BIT != 0 => return Err(refused(opt::GO, r, &d)),
                r => return Err(protocol(format!("reply {r:#x} to GO"))),
            }
        }
        Err(protocol("too many replies to GO"))
    }

    /// The pre-GO way into transmission; the server closes on a bad name.
    fn export_name(&mut self, export: &str) -> Result<ExportInfo, NbdError> {
        self.send_option(opt::EXPORT_NAME, export.as_bytes())?;
        let mut reply = [0u8; size_of::<ExportNameReply>()];
        self.stream.read_exact(&mut reply).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                protocol(format!(
                    "server closed the connection: no export {export:?}"
                ))
            } else {
                NbdError::Io(e)
            }
        })?;
        let r = ExportNameReply::read_from_bytes(&reply).map_err(|_| protocol("short reply"))?;
        if !self.no_zeroes {
            let mut pad = [0u8; wire::EXPORT_NAME_PADDING];
            self.stream.read_exact(&mut pad)?;
        }
        Ok(ExportInfo {
            size: r.size.get(),
            flags: r.flags.get(),
            ..default_info()
        })
    }
}

fn default_info() -> ExportInfo {
    ExportInfo {
        size: 0,
        flags: 0,
        structured: false,
        allocation_context: None,
        min_block: 1,
        preferred_block: 4096,
        max_payload: wire::MAX_PAYLOAD,
        description: None,
    }
}

/// One `NBD_REP_INFO`; true when it was `NBD_INFO_EXPORT`.
fn parse_info(d: &[u8], out: &mut ExportInfo) -> Result<bool, NbdError> {
    let Some(kind) = d.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return Err(protocol("NBD_REP_INFO without a type"));
    };
    match kind {
        info::EXPORT => {
            let e = InfoExport::read_from_bytes(d)
                .map_err(|_| protocol("NBD_INFO_EXPORT is not 12 bytes"))?;
            out.size = e.size.get();
            out.flags = e.flags.get();
            Ok(true)
        }
        info::BLOCK_SIZE => {
            let b = InfoBlockSize::read_from_bytes(d)
                .map_err(|_| protocol("NBD_INFO_BLOCK_SIZE is not 14 bytes"))?;
            out.min_block = b.minimum.get();
            out.preferred_block = b.preferred.get();
            out.max_payload = b.maximum.get();
            Ok(false)
        }
        info::DESCRIPTION => {
            out.description = Some(String::from_utf8_lossy(&d[2..]).into_owned());
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// The spec's rules for size constraints, plus what vspa can serve.
fn check_sizes(info: &ExportInfo) -> Result<(), NbdError> {
    if info.flags & flag::HAS_FLAGS == 0 {
        return Err(protocol("transmission flags lack NBD_FLAG_HAS_FLAGS"));
    }
    let min = info.min_block;
    if !min.is_power_of_two() || min > 65536 {
        return Err(protocol(format!(
            "minimum block size {min} is not a power of two <= 64 KiB"
        )));
    }
    if min > 4096 {
        return Err(NbdError::Unsupported(format!(
            "minimum block size {min} (vspa serves 512..4096-byte blocks)"
        )));
    }
    if info.max_payload < min.max(512) {
        return Err(protocol(format!(
            "maximum payload {} below the block size",
            info.max_payload
        )));
    }
    Ok(())
}
