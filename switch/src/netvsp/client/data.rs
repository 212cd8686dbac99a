//! The client's data path: packing frames into send-buffer sections (or
//! sending them GPA-direct), and reading transfer-page packets in place
//! from the receive buffer, completing each.

use super::*;

impl<C: VscChannel> NetvscClient<C> {
    /// Sends `msg` (an RNDIS message) GPA-direct from the direct pages;
    /// returns the transaction id. One direct send at a time.
    pub fn send_direct(
        &mut self,
        chan: usize,
        msg: &[u8],
        placement: Placement,
        channel_type: u32,
    ) -> Result<u64, NetvscError> {
        let page = self.direct.first_pfn;
        let (offset, ranges): (u32, Vec<(u32, u32, Vec<u64>)>) = match placement {
            Placement::PageStart => {
                let n = (msg.len() as u64).div_ceil(4096).max(1);
                (0, vec![(msg.len() as u32, 0, (page..page + n).collect())])
            }
            Placement::StraddleOneRange { before } => {
                let off = 4096 - before.min(4095);
                let n = (u64::from(off) + msg.len() as u64).div_ceil(4096);
                (
                    off,
                    vec![(msg.len() as u32, off, (page..page + n).collect())],
                )
            }
            Placement::StraddleTwoRanges { before } => {
                let off = 4096 - before.min(4095);
                let first = (4096 - off).min(msg.len() as u32);
                let rest = msg.len() as u32 - first;
                let n = u64::from(rest).div_ceil(4096).max(1);
                let mut r = vec![(first, off, vec![page])];
                if rest > 0 {
                    r.push((rest, 0, (page + 1..page + 1 + n).collect()));
                }
                (off, r)
            }
        };
        let dst = self
            .memory
            .slice(page * 4096 + u64::from(offset), msg.len())?;
        dst.write_at(0, msg).expect("direct pages hold the message");
        let tid = (self.next_seq << TID_SECTION_BITS) | u64::from(DIRECT_TAG);
        self.next_seq += 1;
        let m = NvspMessage::new(
            nvsp::msg::SEND_RNDIS_PKT,
            &nvsp::SendRndisPkt {
                channel_type: channel_type.into(),
                section_index: nvsp::NO_SECTION.into(),
                section_size: 0.into(),
            },
        );
        let refs: Vec<(u32, u32, &[u64])> = ranges
            .iter()
            .map(|(c, o, p)| (*c, *o, p.as_slice()))
            .collect();
        let ch = &mut self.channels[chan];
        write_gpa_direct(
            ch.outgoing(),
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            &refs,
            m.as_bytes(),
        )?;
        ch.flush()?;
        Ok(tid)
    }

    /// Sends one large data frame GPA-direct (an LSO frame, as Linux sends
    /// them): the RNDIS header and the frame in the direct pages.
    pub fn send_frame_direct(
        &mut self,
        chan: usize,
        frame: &TxFrame<'_>,
        placement: Placement,
    ) -> Result<u64, NetvscError> {
        let mut hdr = [0u8; 96];
        let n = rndis::write_packet_headers(&mut hdr, frame.data.len(), &frame.info);
        let mut msg = hdr[..n].to_vec();
        msg.extend_from_slice(frame.data);
        self.send_direct(chan, &msg, placement, nvsp::channel_type::DATA)
    }

    // -------------------------------------------------------------------
    // Data path.

    /// Packs `frames` into send-buffer sections (several per section, up to
    /// the host's max_pkt_per_msg) and sends one SEND_RNDIS_PKT per section
    /// on channel `chan`. Returns how many frames went out (fewer when no
    /// section is free: poll for completions and retry).
    pub fn send(&mut self, chan: usize, frames: &[TxFrame<'_>]) -> Result<usize, NetvscError> {
        let mut sent = 0;
        let section_size = self.section_size as usize;
        let align = self.pkt_align as usize;
        let buf = self.send.map.slice();
        while sent < frames.len() {
            let Some(&section) = self.free_sections.last() else {
                break;
            };
            let base = section as usize * section_size;
            let mut used = 0usize;
            let mut count = 0u32;
            let mut last_len_at = None;
            while sent < frames.len() && count < self.max_pkt_per_msg {
                let f = &frames[sent];
                let mut hdr = [0u8; 96];
                let hl = rndis::write_packet_headers(&mut hdr, f.data.len(), &f.info);
                let len = hl + f.data.len();
                let start = used.next_multiple_of(align);
                if start + len > section_size {
                    if count == 0 {
                        return Err(NetvscError::Malformed("frame larger than a section"));
                    }
                    break;
                }
                // Pad the previous message so this one starts aligned.
                if let Some(at) = last_len_at {
                    let padded = (start - at) as u32;
                    buf.write_at(base + at + 4, &padded.to_le_bytes())
                        .expect("inside the section");
                }
                buf.write_at(base + start, &hdr[..hl]).expect("inside");
                buf.write_at(base + start + hl, f.data).expect("inside");
                last_len_at = Some(start);
                used = start + len;
                count += 1;
                sent += 1;
            }
            self.free_sections.pop();
            let tid = (self.next_seq << TID_SECTION_BITS) | u64::from(section);
            self.next_seq += 1;
            let m = NvspMessage::new(
                nvsp::msg::SEND_RNDIS_PKT,
                &nvsp::SendRndisPkt {
                    channel_type: nvsp::channel_type::DATA.into(),
                    section_index: section.into(),
                    section_size: (used as u32).into(),
                },
            );
            let r = self.channels[chan].outgoing().write_packet(
                packet_type::DATA_INBAND,
                PACKET_FLAG_COMPLETION_REQUESTED,
                tid,
                &[],
                m.as_bytes(),
            );
            if let Err(e) = r {
                self.free_sections.push(section);
                sent -= count as usize;
                if matches!(e, WriteError::Full { .. }) {
                    break;
                }
                return Err(e.into());
            }
        }
        self.channels[chan].flush()?;
        Ok(sent)
    }

    /// Handles everything waiting on channel `chan`: send completions free
    /// sections, received frames go to `on_frame` (read in place) and are
    /// completed, control replies and indications are kept. Returns the
    /// number of frames.
    pub fn poll(
        &mut self,
        chan: usize,
        mut on_frame: impl FnMut(RxFrame<'_>),
    ) -> Result<usize, NetvscError> {
        let mut frames = 0;
        self.pump(chan, None, &mut |f| {
            frames += 1;
            on_frame(f)
        })?;
        Ok(frames)
    }

    /// Like [`NetvscClient::poll`] but stops at the completion `want`, which
    /// it returns.
    pub(super) fn pump_for(
        &mut self,
        chan: usize,
        want: Option<u64>,
    ) -> Result<Option<NvspMessage>, NetvscError> {
        let mut dropped = 0;
        let r = self.pump(chan, want, &mut |_| dropped += 1);
        self.frames_while_waiting += dropped;
        r
    }

    fn pump(
        &mut self,
        chan: usize,
        want: Option<u64>,
        on_frame: &mut dyn FnMut(RxFrame<'_>),
    ) -> Result<Option<NvspMessage>, NetvscError> {
        let NetvscClient {
            channels,
            recv,
            ranges,
            free_sections,
            state,
            version,
            recv_sub_alloc,
            ..
        } = self;
        let recv = recv.map.slice();
        let recv_size = u32::try_from(recv.len()).unwrap_or(u32::MAX);
        let ch = &mut channels[chan];
        let mut found = None;
        while let Some(p) = ch.incoming().read()? {
            linux::packet_fits(p.desc.length as usize)?;
            let tid = p.desc.transaction_id;
            match p.desc.packet_type {
                packet_type::COMPLETION => {
                    // Every size Linux checks is below 40: the first 40
                    // bytes give the same verdict as the whole payload.
                    let mut raw = [0u8; nvsp::MESSAGE_SIZE];
                    let n = p.payload().len().min(raw.len());
                    p.payload().read_at(0, &mut raw[..n]).expect("inside");
                    let c = linux::send_completion(&raw[..n])?;
                    if Some(tid) == want {
                        found = Some(NvspMessage::from_prefix(&raw[..n]));
                        break;
                    }
                    if let linux::Completion::RndisPkt(st) = c {
                        if st != nvsp::status::SUCCESS {
                            state.failed_sends += 1;
                        }
                        let section = (tid & 0xFFFF_FFFF) as u32;
                        if section != DIRECT_TAG {
                            free_sections.push(section);
                        }
                    }
                }
                packet_type::DATA_INBAND => {
                    let mut raw = vec![0u8; p.payload().len()];
                    p.payload().read_at(0, &mut raw).expect("inside");
                    let m = NvspMessage::from_prefix(&raw);
                    if m.msg_type.get() == nvsp::msg::SEND_INDIRECTION_TABLE {
                        state.send_table = Some(linux::send_table(&raw, *version)?.to_vec());
                    }
                }
                packet_type::DATA_USING_TRANSFER_PAGES => {
                    let parsed = ranges.parse(&p);
                    let mut head = [0u8; 4];
                    let n = p.payload().len().min(4);
                    p.payload().read_at(0, &mut head[..n]).expect("inside");
                    if parsed.is_err() {
                        return Err(NetvscError::Malformed("transfer-page packet"));
                    }
                    let count = ranges.ranges.len() as u32;
                    linux::receive_packet(p.desc.data_offset, &head[..n], ranges.set_id, count)?;
                    for r in &ranges.ranges {
                        let (len, off) = (r.byte_count.get(), r.byte_offset.get());
                        linux::receive_range(off, len, recv_size, recv_sub_alloc.0)?;
                        let msg = recv
                            .subslice(off as usize, len as usize)
                            .map_err(|_| NetvscError::Malformed("receive range"))?;
                        on_message(state, chan, msg, on_frame)?;
                    }
                    complete_receive(ch, tid)?;
                }
                _ => {}
            }
        }
        ch.flush()?;
        Ok(found)
    }
}

fn on_message(
    state: &mut ClientState,
    chan: usize,
    msg: SharedSlice<'_>,
    on_frame: &mut dyn FnMut(RxFrame<'_>),
) -> Result<(), NetvscError> {
    let mut head = [0u8; crate::netvsp::nic::MAX_RX_HEADER];
    let n = msg.len().min(head.len());
    msg.read_at(0, &mut head[..n]).expect("inside");
    let head = &head[..n];
    // rndis_filter_receive: what Linux dispatches, and on what.
    match linux::rndis_receive(head, msg.len())? {
        rndis::msg::PACKET => {
            let rx = linux::receive_data(head, msg.len())?;
            let mut area = [0u8; 256];
            let info = match rx.ppi_area()? {
                Some((off, len)) => {
                    let area = area
                        .get_mut(..len)
                        .ok_or(NetvscError::Malformed("PPI area"))?;
                    msg.read_at(off, area).expect("inside the range");
                    linux::receive_ppis(area)?
                }
                None => PacketInfo::default(),
            };
            let data = msg
                .subslice(rx.data_offset, rx.data_len)
                .expect("inside the range");
            on_frame(RxFrame {
                data,
                info,
                channel: chan,
            });
        }
        rndis::msg::INDICATE_STATUS => {
            let msg_len = u32::from_le_bytes(head[4..8].try_into().expect("4")) as usize;
            match linux::link_status(&head[..msg_len.min(n)])? {
                Some(linux::LinkEvent::Down) => state.link_up = false,
                Some(_) => state.link_up = true,
                None => {}
            }
            let s = rndis::IndicateStatus::read_from_prefix(&head[8..])
                .expect("checked")
                .0;
            state.indications.push(s.status.get());
        }
        _ => {
            let msg_len = u32::from_le_bytes(head[4..8].try_into().expect("4"));
            let mut v = vec![0u8; msg_len as usize];
            msg.read_at(0, &mut v).expect("inside");
            linux::response_req_id(&v)?;
            state.replies.push_back(v);
        }
    }
    Ok(())
}
