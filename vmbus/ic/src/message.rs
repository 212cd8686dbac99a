//! Building host requests and validating guest replies, as pure functions
//! over byte slices (the worker, the conformance tests and the fuzz
//! harness all go through them).
//!
//! A Linux guest answers every request by editing the received buffer in
//! place: same length (the payload rounded up to 8), same pipe header,
//! same IC transaction id and `icmsgsize` (16 for NEGOTIATE), flags
//! TRANSACTION|RESPONSE, and a status. The VMBus transaction id comes back
//! unchanged. A reply that differs in any of these is refused.

use zerocopy::{FromBytes, IntoBytes};

use crate::protocol::{
    BODY_OFFSET, IcHeader, MAX_VERSION_COUNT, NEGOTIATE_REPLY_MSGSIZE, NegotiateHeader, PIPE_DATA,
    PipeHeader, Service, Version, icflags, msgtype,
};
use vmbus::wire::packet_type;

/// Largest request vspa sends (a KVP ENUMERATE: 28 + 2580 bytes).
pub const MAX_REQUEST: usize = BODY_OFFSET + 2580;

/// What the host sent, kept to check the reply against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentRequest {
    /// VMBus transaction id of the packet.
    pub txid: u64,
    /// `ictransaction_id` of the IC header.
    pub ic_txid: u8,
    pub msgtype: u16,
    /// Body bytes (`icmsgsize`).
    pub body_len: u16,
}

impl SentRequest {
    /// Payload bytes as sent (pipe + IC header + body).
    pub fn payload_len(&self) -> usize {
        BODY_OFFSET + self.body_len as usize
    }

    /// Payload bytes of a correct reply: the request's, rounded up to 8.
    pub fn reply_len(&self) -> usize {
        self.payload_len().next_multiple_of(8)
    }
}

/// Writes pipe header, IC header and `body` into `out` (cleared first).
pub fn encode_request(
    out: &mut Vec<u8>,
    sent: &SentRequest,
    versions: (Version, Version),
    body: &[u8],
) {
    debug_assert_eq!(body.len(), sent.body_len as usize);
    out.clear();
    let pipe = PipeHeader {
        flags: PIPE_DATA.into(),
        msgsize: ((crate::protocol::IC_HEADER_SIZE + body.len()) as u32).into(),
    };
    let header = IcHeader {
        framework: versions.0,
        msgtype: sent.msgtype.into(),
        message: versions.1,
        msgsize: sent.body_len.into(),
        status: 0.into(),
        transaction_id: sent.ic_txid,
        flags: icflags::HOST_REQUEST,
        reserved: [0; 2],
    };
    out.extend_from_slice(pipe.as_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
}

/// The body of the NEGOTIATE a host sends for `service`.
pub fn negotiate_body(service: Service) -> Vec<u8> {
    let fw = service.host_frameworks();
    let msg = service.host_messages();
    let head = NegotiateHeader {
        framework_count: (fw.len() as u16).into(),
        message_count: (msg.len() as u16).into(),
        reserved: 0.into(),
    };
    let mut body = head.as_bytes().to_vec();
    for v in fw.iter().chain(msg) {
        body.extend_from_slice(v.as_bytes());
    }
    body
}

/// Why a reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("packet type {0} is not in-band data")]
    PacketType(u16),
    #[error("transaction id {got} does not match {want}")]
    Transaction { got: u64, want: u64 },
    #[error("reply of {got} bytes, expected {want} (the request's length)")]
    Length { got: usize, want: usize },
    #[error("pipe header {flags:#x}/{msgsize} is not the one sent")]
    Pipe { flags: u32, msgsize: u32 },
    #[error("message type {got} answers a request of type {want}")]
    MsgType { got: u16, want: u16 },
    #[error("flags {0:#x} are not TRANSACTION|RESPONSE")]
    Flags(u8),
    #[error("IC transaction id {got} does not match {want}")]
    IcTransaction { got: u8, want: u8 },
    #[error("icmsgsize {got}, expected {want}")]
    MsgSize { got: u16, want: u16 },
    #[error("{0}")]
    Body(String),
}

/// A reply that passed the common checks.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    pub header: IcHeader,
    pub status: u32,
    /// The body area of the request (what the guest edited in place).
    pub body: &'a [u8],
}

/// Checks a reply against the request it answers.
pub fn validate_reply<'a>(
    sent: &SentRequest,
    packet: u16,
    txid: u64,
    payload: &'a [u8],
) -> Result<Reply<'a>, ReplyError> {
    if packet != packet_type::DATA_INBAND {
        return Err(ReplyError::PacketType(packet));
    }
    if txid != sent.txid {
        return Err(ReplyError::Transaction {
            got: txid,
            want: sent.txid,
        });
    }
    if payload.len() != sent.reply_len() {
        return Err(ReplyError::Length {
            got: payload.len(),
            want: sent.reply_len(),
        });
    }
    let (pipe, rest) = PipeHeader::read_from_prefix(payload).expect("length checked");
    let (header, _) = IcHeader::read_from_prefix(rest).expect("length checked");
    let pipe_size = (crate::protocol::IC_HEADER_SIZE + sent.body_len as usize) as u32;
    if pipe.flags.get() != PIPE_DATA || pipe.msgsize.get() != pipe_size {
        return Err(ReplyError::Pipe {
            flags: pipe.flags.get(),
            msgsize: pipe.msgsize.get(),
        });
    }
    if header.msgtype.get() != sent.msgtype {
        return Err(ReplyError::MsgType {
            got: header.msgtype.get(),
            want: sent.msgtype,
        });
    }
    if header.flags != icflags::GUEST_RESPONSE {
        return Err(ReplyError::Flags(header.flags));
    }
    if header.transaction_id != sent.ic_txid {
        return Err(ReplyError::IcTransaction {
            got: header.transaction_id,
            want: sent.ic_txid,
        });
    }
    let want_size = if sent.msgtype == msgtype::NEGOTIATE {
        NEGOTIATE_REPLY_MSGSIZE
    } else {
        sent.body_len
    };
    if header.msgsize.get() != want_size {
        return Err(ReplyError::MsgSize {
            got: header.msgsize.get(),
            want: want_size,
        });
    }
    Ok(Reply {
        header,
        status: header.status.get(),
        body: &payload[BODY_OFFSET..BODY_OFFSET + sent.body_len as usize],
    })
}

/// The versions both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Negotiated {
    pub framework: Version,
    pub message: Version,
}

/// Why negotiation did not produce a version pair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiateError {
    #[error("the guest supports none of the offered versions")]
    NoCommonVersion,
    #[error("the guest answered with {framework} framework and {message} message versions")]
    Counts { framework: u16, message: u16 },
    #[error("the guest chose {0}, which was not offered")]
    NotOffered(Version),
}

/// Reads the chosen versions from a NEGOTIATE reply body. Success is two
/// counts of 1 (Linux leaves the status alone even when it fails).
pub fn parse_negotiate(service: Service, body: &[u8]) -> Result<Negotiated, NegotiateError> {
    let bad = NegotiateError::Counts {
        framework: 0xffff,
        message: 0xffff,
    };
    let (head, rest) = NegotiateHeader::read_from_prefix(body).map_err(|_| bad.clone())?;
    let counts = (head.framework_count.get(), head.message_count.get());
    match counts {
        (1, 1) => {}
        (0, 0) => return Err(NegotiateError::NoCommonVersion),
        (framework, message) => return Err(NegotiateError::Counts { framework, message }),
    }
    let (fw, rest) = Version::read_from_prefix(rest).map_err(|_| bad.clone())?;
    let (msg, _) = Version::read_from_prefix(rest).map_err(|_| bad)?;
    if !service.host_frameworks().contains(&fw) {
        return Err(NegotiateError::NotOffered(fw));
    }
    if !service.host_messages().contains(&msg) {
        return Err(NegotiateError::NotOffered(msg));
    }
    Ok(Negotiated {
        framework: fw,
        message: msg,
    })
}

/// Linux's `vmbus_prep_negotiate_resp` on a received payload (edited in
/// place): picks the first of `frameworks` and of `messages` (its own
/// lists, preferred first) that the host offered. Returns the choice.
pub fn linux_negotiate(
    payload: &mut [u8],
    frameworks: &[Version],
    messages: &[Version],
) -> Option<Negotiated> {
    // Too short to hold both counts: the buffer goes back untouched.
    if payload.len() < BODY_OFFSET + 4 {
        return None;
    }
    payload[BODY_OFFSET - 10..BODY_OFFSET - 8]
        .copy_from_slice(&NEGOTIATE_REPLY_MSGSIZE.to_le_bytes());
    let body = &mut payload[BODY_OFFSET..];
    let count = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let (f, m) = (count(body, 0), count(body, 2));
    let offered = |b: &[u8], i: usize| -> Version {
        let at = 8 + 4 * i;
        Version::new(count(b, at), count(b, at + 2))
    };
    let fits = 8 + 4 * (f as usize + m as usize) <= body.len();
    let valid = f as usize <= MAX_VERSION_COUNT && m as usize <= MAX_VERSION_COUNT && fits;
    // Unmatched results keep the counts as "versions", as Linux does.
    let mut chosen_fw = Version::new(f, 0);
    let mut chosen_msg = Version::new(m, 0);
    let mut found = false;
    let (f, m) = (f as usize, m as usize);
    if valid && let Some(v) = first_offered(frameworks, (0..f).map(|i| offered(body, i))) {
        chosen_fw = v;
        if let Some(v) = first_offered(messages, (f..f + m).map(|i| offered(body, i))) {
            chosen_msg = v;
            found = true;
        }
    }
    let n: u16 = found.into();
    body[0..2].copy_from_slice(&n.to_le_bytes());
    body[2..4].copy_from_slice(&n.to_le_bytes());
    // Linux writes both version slots whatever the packet's length.
    for (i, v) in [chosen_fw, chosen_msg].iter().enumerate() {
        let at = 8 + 4 * i;
        if let Some(slot) = body.get_mut(at..at + 4) {
            slot.copy_from_slice(v.as_bytes());
        }
    }
    found.then_some(Negotiated {
        framework: chosen_fw,
        message: chosen_msg,
    })
}

fn first_offered(mine: &[Version], host: impl Iterator<Item = Version> + Clone) -> Option<Version> {
    mine.iter().copied().find(|v| host.clone().any(|h| h == *v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiate_request(service: Service) -> (SentRequest, Vec<u8>) {
        let body = negotiate_body(service);
        let sent = SentRequest {
            txid: 7,
            ic_txid: 7,
            msgtype: msgtype::NEGOTIATE,
            body_len: body.len() as u16,
        };
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &sent,
            (Version::new(0, 0), Version::new(0, 0)),
            &body,
        );
        (sent, out)
    }

    #[test]
    fn linux_picks_its_preferred_versions() {
        for (service, fw, msg) in [
            (Service::Shutdown, (3, 0), (3, 2)),
            (Service::TimeSync, (3, 0), (4, 0)),
            (Service::Heartbeat, (3, 0), (3, 0)),
            (Service::Kvp, (3, 0), (4, 0)),
            (Service::Vss, (3, 0), (5, 0)),
        ] {
            let (sent, mut payload) = negotiate_request(service);
            payload.resize(sent.reply_len(), 0);
            let got = linux_negotiate(
                &mut payload,
                service.linux_frameworks(),
                service.linux_messages(),
            )
            .unwrap();
            assert_eq!(got.framework, Version::new(fw.0, fw.1), "{service}");
            assert_eq!(got.message, Version::new(msg.0, msg.1), "{service}");
            payload[BODY_OFFSET - 3] = icflags::GUEST_RESPONSE;
            let reply = validate_reply(&sent, packet_type::DATA_INBAND, 7, &payload).unwrap();
            assert_eq!(parse_negotiate(service, reply.body), Ok(got));
        }
    }

    #[test]
    fn no_common_version_zeroes_the_counts() {
        let (sent, mut payload) = negotiate_request(Service::TimeSync);
        payload.resize(sent.reply_len(), 0);
        assert!(linux_negotiate(&mut payload, &[Version::new(9, 0)], &[]).is_none());
        let body = &payload[BODY_OFFSET..];
        assert_eq!(&body[..4], &[0, 0, 0, 0]);
        // Slots hold the counts as versions (2.0 frameworks, 2.0 messages).
        assert_eq!(&body[8..16], &[2, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(
            parse_negotiate(Service::TimeSync, body),
            Err(NegotiateError::NoCommonVersion)
        );
    }

    #[test]
    fn reply_checks() {
        let (sent, mut payload) = negotiate_request(Service::Heartbeat);
        payload.resize(sent.reply_len(), 0);
        linux_negotiate(
            &mut payload,
            Service::Heartbeat.linux_frameworks(),
            Service::Heartbeat.linux_messages(),
        );
        payload[BODY_OFFSET - 3] = icflags::GUEST_RESPONSE;
        let ok = |p: &[u8]| validate_reply(&sent, packet_type::DATA_INBAND, 7, p).map(|r| r.status);
        ok(&payload).unwrap();
        assert!(matches!(
            ok(&payload[..payload.len() - 8]),
            Err(ReplyError::Length { .. })
        ));
        let mut longer = payload.clone();
        longer.extend_from_slice(&[0; 8]);
        assert!(matches!(ok(&longer), Err(ReplyError::Length { .. })));
        let mut p = payload.clone();
        p[BODY_OFFSET - 3] = icflags::HOST_REQUEST;
        assert_eq!(ok(&p).unwrap_err(), ReplyError::Flags(3));
        let mut p = payload.clone();
        p[BODY_OFFSET - 4] = 8;
        assert!(matches!(
            ok(&p),
            Err(ReplyError::IcTransaction { got: 8, want: 7 })
        ));
        let mut p = payload.clone();
        p[0] = 2;
        assert!(matches!(ok(&p), Err(ReplyError::Pipe { .. })));
        let mut p = payload.clone();
        p[12] = 3;
        assert!(matches!(
            ok(&p),
            Err(ReplyError::MsgType { got: 3, want: 0 })
        ));
        assert!(matches!(
            validate_reply(&sent, packet_type::DATA_INBAND, 8, &payload),
            Err(ReplyError::Transaction { .. })
        ));
        assert_eq!(
            validate_reply(&sent, packet_type::COMPLETION, 7, &payload).unwrap_err(),
            ReplyError::PacketType(packet_type::COMPLETION)
        );
    }

    #[test]
    fn version_not_offered_is_refused() {
        let mut body = negotiate_body(Service::Vss);
        body[0..4].copy_from_slice(&[1, 0, 1, 0]);
        body[8..16].copy_from_slice(&[3, 0, 0, 0, 4, 0, 0, 0]);
        assert_eq!(
            parse_negotiate(Service::Vss, &body),
            Err(NegotiateError::NotOffered(Version::new(4, 0)))
        );
        body[0..4].copy_from_slice(&[2, 0, 1, 0]);
        assert!(matches!(
            parse_negotiate(Service::Vss, &body),
            Err(NegotiateError::Counts { .. })
        ));
    }
}
