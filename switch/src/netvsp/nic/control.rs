//! RNDIS control: the messages of the RNDIS device inside the NIC
//! (INITIALIZE, QUERY and SET of OIDs, RESET, KEEPALIVE, HALT) and the
//! link-state indications. Replies travel through the receive buffer, so
//! they need the NIC to be receiving.
//!
//! The answers by state:
//! - before the receive buffer, a control message changes nothing and its
//!   reply is dropped and counted (`drop_control_replies`): it has nowhere
//!   to go;
//! - INITIALIZE makes the device initialised (packet filter 0, the link
//!   state taken as told); a repeated one is answered again and keeps the
//!   packet filter; HALT makes it uninitialised;
//! - QUERY, RESET and KEEPALIVE are answered in either device state;
//! - SET is answered in either state, but the packet filter can only be
//!   set on an initialised device (RNDIS_STATUS_FAILURE before, as NDIS
//!   indicates no packets before INITIALIZE);
//! - frames reach the guest only on an initialised device whose packet
//!   filter is not 0, with the link up.

use vmbus::ring::RingError;
use zerocopy::{FromBytes, IntoBytes};

use super::outbox::Reply;
use super::{
    Chan, MAX_LSO_SIZE, MAX_PKT_PER_MSG, NicCore, NicState, PKT_ALIGNMENT_FACTOR, RndisState,
    SECTION_SIZE,
};
use crate::netvsp::nvsp;
use crate::netvsp::rndis::{self, message};
use crate::netvsp::rss::RssParams;

/// Largest RNDIS control message accepted.
pub(super) const MAX_CONTROL_MESSAGE: usize = 16 * 1024;
/// Most bytes of OID_GEN_FRIENDLY_NAME (UTF-16LE with its NUL; Linux's
/// `rndis_get_friendly_name` takes up to 512).
const FRIENDLY_NAME_BYTES: usize = 256;
/// Largest control reply vspa sends: the QUERY_COMPLETE of the longest
/// friendly name (8 + 16 + 256 = 280 bytes; the offload capabilities take
/// 180). Linux drops a range longer than its receive section
/// (`netvsc_receive`), so the section must hold this whatever the MTU.
pub(super) const MAX_CONTROL_REPLY: usize =
    rndis::HEADER_SIZE + size_of::<rndis::QueryComplete>() + FRIENDLY_NAME_BYTES;

impl NicCore {
    /// Answers one RNDIS control message; false if it was malformed.
    pub(super) fn control(
        &mut self,
        c: &mut Chan,
        m: &[u8],
        msg_type: u32,
    ) -> Result<bool, RingError> {
        self.count(|c| &c.control_messages, 1);
        let body = &m[rndis::HEADER_SIZE..];
        let req_id = u32::from_le_bytes(
            body.get(..4)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 4]),
        );
        let reply = match msg_type {
            rndis::msg::INIT => {
                if rndis::InitRequest::read_from_prefix(body).is_err() {
                    return Ok(false);
                }
                self.initialize();
                init_complete(req_id)
            }
            rndis::msg::QUERY => {
                let Ok((r, _)) = rndis::OidRequest::read_from_prefix(body) else {
                    return Ok(false);
                };
                let (status, data) = self.query(r.oid.get());
                let b = rndis::QueryComplete {
                    req_id: req_id.into(),
                    status: status.into(),
                    info_buflen: (data.len() as u32).into(),
                    info_buf_offset: (size_of::<rndis::QueryComplete>() as u32).into(),
                };
                message(rndis::msg::QUERY_COMPLETE, b.as_bytes(), &data)
            }
            rndis::msg::SET => {
                let Ok((r, _)) = rndis::OidRequest::read_from_prefix(body) else {
                    return Ok(false);
                };
                let (off, n) = (
                    r.info_buf_offset.get() as usize,
                    r.info_buflen.get() as usize,
                );
                let status = match body.get(off..off.saturating_add(n)) {
                    Some(info) if n == 0 || off >= size_of::<rndis::OidRequest>() => {
                        self.set(r.oid.get(), info)
                    }
                    _ => rndis::status::INVALID_DATA,
                };
                let b = rndis::SetComplete {
                    req_id: req_id.into(),
                    status: status.into(),
                };
                message(rndis::msg::SET_COMPLETE, b.as_bytes(), &[])
            }
            rndis::msg::RESET => {
                let b = rndis::ResetComplete {
                    status: rndis::status::SUCCESS.into(),
                    addressing_reset: 0.into(),
                };
                message(rndis::msg::RESET_COMPLETE, b.as_bytes(), &[])
            }
            rndis::msg::KEEPALIVE => {
                let b = rndis::SetComplete {
                    req_id: req_id.into(),
                    status: rndis::status::SUCCESS.into(),
                };
                message(rndis::msg::KEEPALIVE_COMPLETE, b.as_bytes(), &[])
            }
            rndis::msg::HALT => {
                if let NicState::Receiving { rndis, .. } = &mut self.state {
                    *rndis = RndisState::Uninitialized;
                }
                return Ok(true);
            }
            _ => return Ok(false),
        };
        self.queue(c, Reply::Control(reply))?;
        Ok(true)
    }

    /// INITIALIZE: the device becomes initialised (on a receiving NIC).
    fn initialize(&mut self) {
        let link = self.dev.link_up();
        if let NicState::Receiving { rndis, .. } = &mut self.state {
            let filter = match *rndis {
                RndisState::Initialized { filter, .. } => filter,
                RndisState::Uninitialized => 0,
            };
            *rndis = RndisState::Initialized {
                filter,
                link_told: link,
            };
        }
    }

    fn query(&self, oid: u32) -> (u32, Vec<u8>) {
        use rndis::oid;
        let cfg = &self.dev.config;
        let version = self.state.version();
        let data = match oid {
            oid::GEN_MAXIMUM_FRAME_SIZE => cfg.mtu.to_le_bytes().to_vec(),
            oid::GEN_LINK_SPEED => (cfg.link_speed_mbps.saturating_mul(10_000))
                .to_le_bytes()
                .to_vec(),
            oid::GEN_MEDIA_CONNECT_STATUS => u32::from(!self.dev.link_up()).to_le_bytes().to_vec(),
            oid::P802_3_PERMANENT_ADDRESS => cfg.mac.0.to_vec(),
            oid::P802_3_CURRENT_ADDRESS => self.settings.mac.to_vec(),
            oid::GEN_CURRENT_PACKET_FILTER => self.state.filter().to_le_bytes().to_vec(),
            oid::GEN_FRIENDLY_NAME => rndis::utf16_name(&cfg.name, FRIENDLY_NAME_BYTES),
            oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES => {
                let caps = rndis::offload_capabilities(version.unwrap_or(0), MAX_LSO_SIZE);
                let size = usize::from(caps.header.size.get());
                caps.as_bytes()[..size].to_vec()
            }
            oid::GEN_RECEIVE_SCALE_CAPABILITIES
                if cfg.channels > 1 && version.is_some_and(|v| v >= nvsp::version::V5) =>
            {
                rss_capabilities(cfg.channels).as_bytes().to_vec()
            }
            _ => return (rndis::status::NOT_SUPPORTED, Vec::new()),
        };
        (rndis::status::SUCCESS, data)
    }

    fn set(&mut self, oid: u32, info: &[u8]) -> u32 {
        use rndis::{oid, status};
        match oid {
            oid::GEN_CURRENT_PACKET_FILTER => match info.get(..4) {
                Some(b) => self.set_filter(u32::from_le_bytes(b.try_into().expect("4 bytes"))),
                None => status::INVALID_DATA,
            },
            oid::TCP_OFFLOAD_PARAMETERS => match rndis::ObjectHeader::read_from_prefix(info) {
                Ok((h, rest))
                    if h.obj_type == rndis::OBJECT_TYPE_OFFLOAD_PARAMETERS
                        && rest.len() >= self.settings.offload_params.len() =>
                {
                    let n = self.settings.offload_params.len();
                    self.settings.offload_params.copy_from_slice(&rest[..n]);
                    status::SUCCESS
                }
                _ => status::INVALID_DATA,
            },
            oid::GEN_RNDIS_CONFIG_PARAMETER => self.config_parameter(info),
            oid::GEN_RECEIVE_SCALE_PARAMETERS => match RssParams::parse(info) {
                Ok(RssParams::Disable) => {
                    self.settings.rss = None;
                    status::SUCCESS
                }
                Ok(RssParams::Enable(r)) => {
                    self.settings.rss = Some(*r);
                    status::SUCCESS
                }
                Err(_) => status::INVALID_DATA,
            },
            _ => status::NOT_SUPPORTED,
        }
    }

    fn set_filter(&mut self, new: u32) -> u32 {
        match &mut self.state {
            NicState::Receiving {
                rndis: RndisState::Initialized { filter, .. },
                ..
            } => {
                *filter = new;
                rndis::status::SUCCESS
            }
            _ => rndis::status::FAILURE,
        }
    }

    fn config_parameter(&mut self, info: &[u8]) -> u32 {
        use rndis::status;
        let Ok((p, _)) = rndis::ConfigParameter::read_from_prefix(info) else {
            return status::INVALID_DATA;
        };
        let field = |off: u32, len: u32| {
            let (off, len) = (off as usize, len as usize);
            info.get(off..off.checked_add(len)?)
        };
        let (Some(name), Some(value)) = (
            field(p.name_offset.get(), p.name_length.get()),
            field(p.value_offset.get(), p.value_length.get()),
        ) else {
            return status::INVALID_DATA;
        };
        if !rndis::from_utf16(name).eq_ignore_ascii_case("NetworkAddress") {
            // Other parameters are accepted and ignored.
            return status::SUCCESS;
        }
        match (p.param_type.get(), parse_mac(&rndis::from_utf16(value))) {
            (2, Some(mac)) => {
                self.settings.mac = mac;
                status::SUCCESS
            }
            _ => status::INVALID_DATA,
        }
    }

    /// Tells the guest about a link change; true if an indication went out.
    pub(super) fn tell_link(&mut self, c: &mut Chan) -> bool {
        let up = self.dev.link_up();
        let NicState::Receiving {
            rndis: RndisState::Initialized { link_told, .. },
            ..
        } = &mut self.state
        else {
            return false;
        };
        if *link_told == up {
            return false;
        }
        *link_told = up;
        let b = rndis::IndicateStatus {
            status: if up {
                rndis::status::MEDIA_CONNECT
            } else {
                rndis::status::MEDIA_DISCONNECT
            }
            .into(),
            status_buflen: 0.into(),
            status_buf_offset: 0.into(),
        };
        self.count(|c| &c.link_indications, 1);
        let msg = message(rndis::msg::INDICATE_STATUS, b.as_bytes(), &[]);
        if let Err(e) = self.queue(c, Reply::Control(msg)) {
            self.fail(c, e);
        }
        true
    }
}

/// The INITIALIZE_COMPLETE vspa answers.
fn init_complete(req_id: u32) -> Vec<u8> {
    let b = rndis::InitComplete {
        req_id: req_id.into(),
        status: rndis::status::SUCCESS.into(),
        major: 1.into(),
        minor: 0.into(),
        dev_flags: 1.into(),
        medium: 0.into(),
        max_pkt_per_msg: MAX_PKT_PER_MSG.into(),
        max_xfer_size: (SECTION_SIZE * 8).into(),
        pkt_alignment_factor: PKT_ALIGNMENT_FACTOR.into(),
        af_list_offset: 0.into(),
        af_list_size: 0.into(),
    };
    message(rndis::msg::INIT_COMPLETE, b.as_bytes(), &[])
}

/// OID_GEN_RECEIVE_SCALE_CAPABILITIES for a NIC of `channels` channels.
fn rss_capabilities(channels: u16) -> rndis::RssCapabilities {
    rndis::RssCapabilities {
        header: rndis::ObjectHeader {
            obj_type: rndis::OBJECT_TYPE_RSS_CAPABILITIES,
            revision: 2,
            size: (size_of::<rndis::RssCapabilities>() as u16).into(),
        },
        capabilities: (rndis::RSS_CAPS_HASH_TOEPLITZ
            | rndis::RSS_CAPS_CLASSIFICATION_AT_DPC
            | rndis::RSS_CAPS_HASH_TYPE_TCP_IPV4
            | rndis::RSS_CAPS_HASH_TYPE_TCP_IPV6)
            .into(),
        num_interrupt_messages: 1.into(),
        num_receive_queues: u32::from(channels).into(),
        num_indirection_entries: (rndis::RSS_TABLE_MAX as u16).into(),
    }
}

/// A unicast MAC address from the 12 hex digits of a NetworkAddress value
/// (separators ignored); None if it is not one.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let hex: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if hex.len() != 12 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}
