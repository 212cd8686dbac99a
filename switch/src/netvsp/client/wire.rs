//! The client's wire helpers: NVSP messages in and out of a channel, and
//! the RNDIS requests and replies the control path builds and parses. Tests
//! use them to send exact bytes and inspect exact replies.

use super::*;

/// A packet from the host, copied out (tests and control path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPacket {
    Completion {
        tid: u64,
        payload: Vec<u8>,
    },
    TransferPages {
        tid: u64,
        flags: u16,
        set_id: u16,
        ranges: Vec<(u32, u32)>,
        payload: Vec<u8>,
    },
    Inband {
        tid: u64,
        payload: Vec<u8>,
    },
    Other {
        packet_type: u16,
    },
}

/// Writes an NVSP message as an in-band packet (40 bytes, as Linux does).
pub fn send_nvsp(
    ch: &mut impl VscChannel,
    txid: u64,
    completion: bool,
    msg: &NvspMessage,
) -> Result<(), NetvscError> {
    let flags = if completion {
        PACKET_FLAG_COMPLETION_REQUESTED
    } else {
        0
    };
    ch.outgoing()
        .write_packet(packet_type::DATA_INBAND, flags, txid, &[], msg.as_bytes())?;
    ch.flush()?;
    Ok(())
}

/// Reads the next packet, copied out.
pub fn read_packet(ch: &mut impl VscChannel) -> Result<Option<HostPacket>, NetvscError> {
    let Some(p) = ch.incoming().read()? else {
        return Ok(None);
    };
    let tid = p.desc.transaction_id;
    let payload = p.payload();
    let mut bytes = vec![0u8; payload.len()];
    payload.read_at(0, &mut bytes).expect("inside the payload");
    let out = match p.desc.packet_type {
        packet_type::COMPLETION => HostPacket::Completion {
            tid,
            payload: bytes,
        },
        packet_type::DATA_INBAND => HostPacket::Inband {
            tid,
            payload: bytes,
        },
        packet_type::DATA_USING_TRANSFER_PAGES => {
            let mut t = TransferPages::default();
            t.parse(&p)
                .map_err(|_| NetvscError::Malformed("transfer-page packet"))?;
            HostPacket::TransferPages {
                tid,
                flags: p.desc.flags,
                set_id: t.set_id,
                ranges: t
                    .ranges
                    .iter()
                    .map(|r| (r.byte_count.get(), r.byte_offset.get()))
                    .collect(),
                payload: bytes,
            }
        }
        other => HostPacket::Other { packet_type: other },
    };
    Ok(Some(out))
}

/// Waits for the next packet.
pub fn wait_packet(ch: &mut impl VscChannel, timeout: Duration) -> Result<HostPacket, NetvscError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = read_packet(ch)? {
            ch.flush()?;
            return Ok(p);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || ch.wait(left)? == Wait::Stopped {
            return Err(NetvscError::Timeout("a packet from the host"));
        }
    }
}

/// Completes a receive packet (the 8-byte completion Linux sends).
pub fn complete_receive(ch: &mut impl VscChannel, tid: u64) -> Result<(), NetvscError> {
    ch.outgoing()
        .write_completion(tid, &nvsp::rndis_pkt_complete(nvsp::status::SUCCESS))?;
    Ok(())
}

/// Waits for the completion `txid` on `ch`, discarding anything else.
pub fn wait_completion(ch: &mut impl VscChannel, txid: u64) -> Result<NvspMessage, NetvscError> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match wait_packet(ch, left)? {
            HostPacket::Completion { tid, payload } if tid == txid => {
                return Ok(NvspMessage::from_prefix(&payload));
            }
            _ => continue,
        }
    }
}

pub use super::rndis::message as rndis_message;

/// A QUERY or SET message for `oid` with `info` as its information buffer
/// (right after the request, at offset 20; offset 0 when empty, as Linux
/// sends queries).
pub fn oid_message(msg_type: u32, req_id: u32, oid: u32, info: &[u8]) -> Vec<u8> {
    let body = rndis::OidRequest {
        req_id: req_id.into(),
        oid: oid.into(),
        info_buflen: (info.len() as u32).into(),
        info_buf_offset: if info.is_empty() && msg_type == rndis::msg::QUERY {
            0
        } else {
            size_of::<rndis::OidRequest>() as u32
        }
        .into(),
        dev_vc_handle: 0.into(),
    };
    rndis_message(msg_type, body.as_bytes(), info)
}

/// Parses a QUERY_COMPLETE as Linux does: offset at least 16, data inside
/// the message.
pub fn parse_query_complete(r: &[u8]) -> Result<(u32, Vec<u8>), NetvscError> {
    let bad = NetvscError::Malformed("QUERY_COMPLETE");
    let c = rndis::QueryComplete::read_from_prefix(
        r.get(8..).ok_or(NetvscError::Malformed("QUERY_COMPLETE"))?,
    )
    .map_err(|_| NetvscError::Malformed("QUERY_COMPLETE"))?
    .0;
    if c.status.get() != rndis::status::SUCCESS {
        return Ok((c.status.get(), Vec::new()));
    }
    let (off, len) = (
        c.info_buf_offset.get() as usize,
        c.info_buflen.get() as usize,
    );
    if off < 16 || 8 + off + len > r.len() {
        return Err(bad);
    }
    Ok((c.status.get(), r[8 + off..8 + off + len].to_vec()))
}
