//! NVSP control: reading a channel's packets, parsing each into an
//! [`NvspRequest`] and answering it by the NIC's [`NicState`].
//!
//! A Linux guest (`netvsc_connect_vsp`, `netvsc_init_buf`) sends INIT
//! (newest version first, stepping down on failure), SEND_NDIS_CONFIG and
//! SEND_NDIS_VER, SEND_RECV_BUF and SEND_SEND_BUF, then RNDIS in
//! SEND_RNDIS_PKTs and, from NVSP 5, SUBCHANNEL. The answers:
//!
//! | request | valid when | otherwise |
//! | --- | --- | --- |
//! | INIT | before the receive buffer (a guest may step down again) | FAIL |
//! | SEND_NDIS_CONFIG / SEND_NDIS_VER | a version is agreed | ignored |
//! | SEND_RECV_BUF | agreed, none yet, primary channel | FAIL |
//! | SEND_SEND_BUF | agreed, none yet | FAIL |
//! | REVOKE_RECV_BUF | primary channel (back to "agreed") | ignored |
//! | REVOKE_SEND_BUF | any time | |
//! | SEND_RNDIS_PKT | a version is agreed | FAIL |
//! | SUBCHANNEL | NVSP 5 or later, primary channel | FAIL |
//! | SWITCH_DATA_PATH | always (nothing to switch) | |
//! | unknown type | never | FAIL, same type |
//!
//! SWITCH_DATA_PATH gets an empty completion (no payload): Linux's
//! `netvsc_switch_datapath` waits for `channel_init_wait`, which only
//! `netvsc_send_completion`'s zero-length branch completes for it; a
//! completion with a payload is "Unknown send completion type" there and
//! leaves the guest waiting with RTNL held.
//!
//! Every refusal is counted in `bad_nvsp` (except a refused INIT version,
//! which is negotiation). FAIL is sent only when the guest asked for a
//! completion, as every answer is. Completions of receive packets the
//! host never sent are counted in `bad_completions`.

use vmbus::ring::RingError;
use vmbus::wire::PACKET_FLAG_COMPLETION_REQUESTED;
use zerocopy::IntoBytes;

use super::{
    Chan, FRAME_BUDGET, NicCore, NicState, READ_BUDGET, RndisState, RxBuffer, SECTION_SIZE, Session,
};
use crate::netvsp::buffers::{RecvBuffer, SendBuffer};
use crate::netvsp::nvsp::{self, NvspMessage, NvspRequest, PacketError};
use vmbus::wire::packet_type;

/// Largest range list of a GPA-direct packet (Linux sends at most a few
/// dozen pages); longer ones are refused before they are parsed.
const MAX_GPA_HEADER: usize = 8 * 1024;
/// Most bytes a GPA-direct packet may describe: one LSO frame and its
/// RNDIS header, with room to spare.
const MAX_GPA_BYTES: u64 = 128 * 1024;

/// A request's packet: its transaction and whether it wants a completion.
#[derive(Debug, Clone, Copy)]
pub(super) struct Txn {
    pub tid: u64,
    pub completion: bool,
}

impl NicCore {
    /// Reads and answers a channel's packets (up to the pass's budgets).
    pub(super) fn read_channel(&mut self, c: &mut Chan) -> Result<bool, RingError> {
        let mut progress = false;
        for _ in 0..READ_BUDGET {
            if self.frames.len() >= FRAME_BUDGET || !self.drain_outbox(c)? {
                break;
            }
            let Some(p) = c.ch.incoming.read()? else {
                break;
            };
            progress = true;
            let desc = p.desc;
            let payload = p.payload();
            let mut raw = [0u8; nvsp::MESSAGE_SIZE];
            let n = payload.len().min(raw.len());
            payload
                .read_at(0, &mut raw[..n])
                .expect("inside the payload");
            let gpa = desc.packet_type == packet_type::DATA_USING_GPA_DIRECT;
            let ranges_ok = !gpa
                || (desc.data_offset as usize <= MAX_GPA_HEADER
                    && self.ranges.parse(&p).is_ok()
                    && self.ranges.total_bytes() <= MAX_GPA_BYTES);
            let txn = Txn {
                tid: desc.transaction_id,
                completion: desc.flags & PACKET_FLAG_COMPLETION_REQUESTED != 0,
            };
            match NvspRequest::parse(&raw[..n], desc.packet_type) {
                Ok(NvspRequest::RecvComplete) => self.on_recv_complete(txn.tid),
                Ok(request) => self.on_request(c, txn, request, gpa, ranges_ok)?,
                Err(PacketError::Completion(_)) => self.count(|c| &c.bad_completions, 1),
                Err(PacketError::Short(_) | PacketError::PacketType(_)) => {
                    self.count(|c| &c.bad_nvsp, 1)
                }
            }
        }
        Ok(progress)
    }

    /// The guest completed a receive packet.
    fn on_recv_complete(&mut self, tid: u64) {
        let known = self
            .state
            .rx_mut()
            .is_some_and(|rx| rx.ring.complete(tid).is_ok());
        if !known {
            self.count(|c| &c.bad_completions, 1);
        }
    }

    fn on_request(
        &mut self,
        c: &mut Chan,
        txn: Txn,
        request: NvspRequest,
        gpa: bool,
        ranges_ok: bool,
    ) -> Result<(), RingError> {
        let reply = match request {
            NvspRequest::SendRndisPkt(pkt) => {
                let status = match ranges_ok && self.state.session().is_some() {
                    true => self.on_rndis_pkt(c, pkt, gpa)?,
                    false => self.refuse(nvsp::status::FAIL),
                };
                return self.answer(c, txn, &nvsp::rndis_pkt_complete(status));
            }
            NvspRequest::Subchannel(req) => return self.on_subchannel(c, txn, req),
            NvspRequest::Init(init) => Some(self.on_init(init)),
            NvspRequest::SendNdisVersion(_) => {
                // Nothing depends on the guest's NDIS version.
                self.need_session();
                None
            }
            NvspRequest::SendNdisConfig(cfg) => {
                if let Some(s) = self.need_session() {
                    s.ndis_mtu = cfg.mtu.get();
                    s.ndis_caps = cfg.capabilities.get();
                }
                None
            }
            NvspRequest::SendRecvBuffer(b) => Some(self.on_recv_buf(c, b)),
            NvspRequest::SendSendBuffer(b) => Some(self.on_send_buf(b)),
            NvspRequest::RevokeRecvBuffer => {
                self.revoke_recv_buf(c);
                None
            }
            NvspRequest::RevokeSendBuffer => {
                if let Some(s) = self.state.session_mut() {
                    s.send = None;
                }
                None
            }
            NvspRequest::SwitchDataPath(_) => return self.answer(c, txn, &[]),
            NvspRequest::Unknown(t) => Some(self.on_unknown(t)),
            NvspRequest::RecvComplete => unreachable!("handled by read_channel"),
        };
        match reply {
            Some(m) => self.answer(c, txn, m.as_bytes()),
            None => Ok(()),
        }
    }

    /// Sends `bytes` as the completion of `txn` if the guest asked for one.
    fn answer(&mut self, c: &mut Chan, txn: Txn, bytes: &[u8]) -> Result<(), RingError> {
        if txn.completion {
            self.complete(c, txn.tid, bytes)?;
        }
        Ok(())
    }

    /// Counts a refused request; returns `status` for its answer.
    fn refuse(&self, status: u32) -> u32 {
        self.count(|c| &c.bad_nvsp, 1);
        status
    }

    /// The session for a request that needs a version agreed; counts the
    /// request as refused if there is none.
    fn need_session(&mut self) -> Option<&mut Session> {
        if self.state.session().is_none() {
            self.refuse(nvsp::status::FAIL);
        }
        self.state.session_mut()
    }

    fn on_unknown(&self, t: u32) -> NvspMessage {
        tracing::debug!(
            port = self.port.name(),
            msg_type = t,
            "unknown NVSP message"
        );
        self.refuse(nvsp::status::FAIL);
        // Answer a request that wants one rather than leave the guest
        // waiting: same type, failure status.
        NvspMessage::new(
            t,
            &nvsp::RndisPktComplete {
                status: nvsp::status::FAIL.into(),
            },
        )
    }

    fn on_init(&mut self, init: nvsp::Init) -> NvspMessage {
        let (lo, hi) = (init.min_version.get(), init.max_version.get());
        let chosen = nvsp::SUPPORTED_VERSIONS
            .iter()
            .copied()
            .find(|&v| lo <= v && v <= hi);
        let agreed = match (chosen, &mut self.state) {
            (Some(v), NicState::Negotiating) => {
                self.state = NicState::Negotiated(Session {
                    version: v,
                    ndis_mtu: 0,
                    ndis_caps: 0,
                    send: None,
                });
                Some(v)
            }
            (Some(v), NicState::Negotiated(s)) => {
                s.version = v;
                Some(v)
            }
            (Some(_), NicState::Receiving { .. }) => {
                self.refuse(nvsp::status::FAIL);
                None
            }
            (None, _) => None,
        };
        NvspMessage::new(
            nvsp::msg::INIT_COMPLETE,
            &nvsp::InitComplete {
                negotiated_version: agreed.unwrap_or(0).into(),
                max_mdl_chain_len: 0.into(),
                status: match agreed {
                    Some(_) => nvsp::status::SUCCESS,
                    None => nvsp::status::FAIL,
                }
                .into(),
            },
        )
    }

    fn on_recv_buf(&mut self, c: &Chan, b: nvsp::SendBuffer) -> NvspMessage {
        let fail = NvspMessage::new(
            nvsp::msg::SEND_RECV_BUF_COMPLETE,
            &nvsp::RecvBufComplete {
                status: nvsp::status::FAIL.into(),
                ..Default::default()
            },
        );
        if !matches!(self.state, NicState::Negotiated(_)) || !c.is_primary() {
            self.refuse(nvsp::status::FAIL);
            return fail;
        }
        let Some(map) = self.map_gpadl(b.gpadl.get()) else {
            return fail;
        };
        let Some(recv) = RecvBuffer::new(map, b.gpadl.get(), self.max_rx_message()) else {
            tracing::warn!(port = self.port.name(), "receive buffer too small");
            return fail;
        };
        let reply = nvsp::RecvBufComplete {
            status: nvsp::status::SUCCESS.into(),
            num_sections: 1.into(),
            section: nvsp::RecvSection {
                offset: 0.into(),
                sub_alloc_size: recv.sub_alloc_size.into(),
                num_sub_allocs: recv.num_sub_allocs.into(),
                end_offset: (recv.sub_alloc_size * recv.num_sub_allocs).into(),
            },
        };
        let NicState::Negotiated(session) =
            std::mem::replace(&mut self.state, NicState::Negotiating)
        else {
            unreachable!("checked above")
        };
        self.state = NicState::Receiving {
            session,
            rx: RxBuffer {
                ring: recv.ring(),
                recv,
            },
            rndis: RndisState::Uninitialized,
        };
        NvspMessage::new(nvsp::msg::SEND_RECV_BUF_COMPLETE, &reply)
    }

    /// Only the primary may revoke; the RNDIS device goes with the buffer.
    fn revoke_recv_buf(&mut self, c: &Chan) {
        if !c.is_primary() || !matches!(self.state, NicState::Receiving { .. }) {
            return;
        }
        let NicState::Receiving { session, .. } =
            std::mem::replace(&mut self.state, NicState::Negotiating)
        else {
            unreachable!("checked above")
        };
        self.state = NicState::Negotiated(session);
    }

    fn on_send_buf(&mut self, b: nvsp::SendBuffer) -> NvspMessage {
        let status = match self.state.session() {
            Some(s) if s.send.is_none() => {
                match self
                    .map_gpadl(b.gpadl.get())
                    .and_then(|m| SendBuffer::new(m, b.gpadl.get(), SECTION_SIZE))
                {
                    Some(send) => {
                        self.state.session_mut().expect("checked").send = Some(send);
                        nvsp::status::SUCCESS
                    }
                    None => nvsp::status::FAIL,
                }
            }
            _ => self.refuse(nvsp::status::FAIL),
        };
        NvspMessage::new(
            nvsp::msg::SEND_SEND_BUF_COMPLETE,
            &nvsp::SendBufComplete {
                status: status.into(),
                section_size: if status == nvsp::status::SUCCESS {
                    SECTION_SIZE
                } else {
                    0
                }
                .into(),
            },
        )
    }

    /// Maps a buffer GPADL the guest named; None (logged, counted) if
    /// unusable.
    fn map_gpadl(&self, id: u32) -> Option<vmbus::MappedPages> {
        let why = match self.gpadls.get(id) {
            None => "unknown buffer GPADL".to_string(),
            Some(g) => match g.single_range_pages() {
                None => "buffer GPADL is not one range".to_string(),
                Some(pages) => match self.memory.map_pages(pages) {
                    Ok(m) => return Some(m),
                    Err(e) => format!("buffer GPADL: {e}"),
                },
            },
        };
        tracing::warn!(port = self.port.name(), gpadl = id, "{why}");
        self.refuse(nvsp::status::FAIL);
        None
    }

    fn on_subchannel(
        &mut self,
        c: &mut Chan,
        txn: Txn,
        req: nvsp::SubchannelRequest,
    ) -> Result<(), RingError> {
        let allowed = c.is_primary()
            && self.state.version().is_some_and(|v| v >= nvsp::version::V5)
            && req.op.get() == nvsp::SUBCHANNEL_ALLOCATE;
        let free = self
            .dev
            .config
            .channels
            .saturating_sub(1 + self.settings.subchannels);
        let n = if allowed {
            (req.count.get().min(u32::from(free))) as u16
        } else {
            self.refuse(nvsp::status::FAIL);
            0
        };
        let reply = NvspMessage::new(
            nvsp::msg::SUBCHANNEL,
            &nvsp::SubchannelComplete {
                status: if allowed {
                    nvsp::status::SUCCESS
                } else {
                    nvsp::status::FAIL
                }
                .into(),
                count: u32::from(n).into(),
            },
        );
        self.answer(c, txn, reply.as_bytes())?;
        if n > 0 {
            self.settings.subchannels += n;
            self.control.offer_subchannels(n);
            self.send_indirection_table(c)?;
        }
        Ok(())
    }

    /// Tells the guest how to spread its sends over the channels.
    fn send_indirection_table(&mut self, c: &mut Chan) -> Result<(), RingError> {
        let total = u32::from(1 + self.settings.subchannels);
        let mut m = NvspMessage::new(
            nvsp::msg::SEND_INDIRECTION_TABLE,
            &nvsp::SendIndirectionTable {
                count: (nvsp::SEND_TABLE_SIZE as u32).into(),
                offset: (nvsp::MESSAGE_SIZE as u32).into(),
            },
        )
        .as_bytes()
        .to_vec();
        for i in 0..nvsp::SEND_TABLE_SIZE as u32 {
            m.extend_from_slice(&(i % total).to_le_bytes());
        }
        self.queue(c, super::outbox::Reply::Inband(m))
    }

    /// Largest untagged frame for the guest: the NIC's MTU, or the
    /// guest's own (SEND_NDIS_CONFIG carries MTU + 14) if smaller.
    pub(super) fn max_rx_frame(&self) -> usize {
        let nic = self.dev.max_rx_frame();
        match self.state.session().map_or(0, |s| s.ndis_mtu as usize) {
            m if m >= 68 + 14 => nic.min(m),
            _ => nic,
        }
    }

    /// Whether the guest takes VLAN tags as 802.1Q PPIs (it said so in
    /// SEND_NDIS_CONFIG); otherwise tags stay in the frames.
    pub(super) fn vlan_ppi(&self) -> bool {
        self.state
            .session()
            .is_some_and(|s| s.ndis_caps & nvsp::ndis_config::IEEE8021Q != 0)
    }

    /// Largest RNDIS message the host sends in one range: a data message
    /// of the largest frame, or the largest control reply when the guest's
    /// MTU is so small that the reply is longer (this size becomes the
    /// guest's receive section, and Linux drops longer ranges).
    fn max_rx_message(&self) -> u32 {
        let data = super::MAX_RX_HEADER + self.max_rx_frame() + 4;
        data.max(super::control::MAX_CONTROL_REPLY) as u32
    }
}
