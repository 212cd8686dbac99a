//! Connecting as Linux's hv_netvsc does, step by step: NVSP INIT (newest
//! version first), NDIS config and version, the receive and send buffers
//! as GPADLs, RNDIS INIT, the OID queries and sets, then sub-channels and
//! the RSS parameters.

use super::*;

fn register(
    host: &mut impl VscBus,
    relid: u32,
    bytes: u64,
    scatter: bool,
) -> Result<Buffer, NetvscError> {
    let count = bytes.div_ceil(4096).max(1);
    let pages = host.alloc_pages(count)?;
    let mut pfns = pages.pfns();
    if scatter {
        // Swap neighbours: no two adjacent buffer pages are adjacent in memory.
        for pair in pfns.chunks_mut(2) {
            pair.reverse();
        }
    }
    let gpadl = host.create_gpadl(relid, &pfns)?;
    let map = host.memory().map_pages(&pfns)?;
    Ok(Buffer { pages, gpadl, map })
}

/// Waits for the completion `txid` of an initialisation request and
/// checks it as `netvsc_send_completion` does before it wakes
/// `channel_init_wait`.
fn init_completion(ch: &mut impl VscChannel, txid: u64) -> Result<NvspMessage, NetvscError> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let HostPacket::Completion { tid, payload } = wait_packet(ch, left)?
            && tid == txid
        {
            return match linux::send_completion(&payload)? {
                linux::Completion::Init(m) => Ok(m),
                _ => Err(NetvscError::Malformed("initialisation completion")),
            };
        }
    }
}

/// NVSP INIT with each of `versions` in turn (newest first) until the host
/// accepts one; returns it.
fn negotiate(ch: &mut impl VscChannel, versions: &[u32]) -> Result<u32, NetvscError> {
    for &v in versions {
        let m = NvspMessage::new(
            nvsp::msg::INIT,
            &nvsp::Init {
                min_version: v.into(),
                max_version: v.into(),
            },
        );
        send_nvsp(ch, INIT_TXID, true, &m)?;
        let r = init_completion(ch, INIT_TXID)?;
        if r.msg_type.get() != nvsp::msg::INIT_COMPLETE {
            return Err(NetvscError::Malformed("INIT_COMPLETE"));
        }
        let c: nvsp::InitComplete = r.body_as();
        if c.status.get() == nvsp::status::SUCCESS {
            return Ok(v);
        }
    }
    Err(NetvscError::NoVersion)
}

/// SEND_NDIS_CONFIG (NVSP 2 and later: MTU + 14, 802.1Q) and
/// SEND_NDIS_VER (6.1 up to NVSP 4, 6.30 after), neither answered.
fn send_ndis_settings(ch: &mut impl VscChannel, version: u32, mtu: u32) -> Result<(), NetvscError> {
    if version >= nvsp::version::V2 {
        let m = NvspMessage::new(
            nvsp::msg::SEND_NDIS_CONFIG,
            &nvsp::NdisConfig {
                mtu: (mtu + 14).into(),
                reserved: 0.into(),
                capabilities: nvsp::ndis_config::IEEE8021Q.into(),
            },
        );
        send_nvsp(ch, NO_RESPONSE_TXID, false, &m)?;
    }
    let minor = if version <= nvsp::version::V4 { 1 } else { 30 };
    let m = NvspMessage::new(
        nvsp::msg::SEND_NDIS_VER,
        &nvsp::SendNdisVersion {
            major: 6.into(),
            minor: minor.into(),
        },
    );
    send_nvsp(ch, NO_RESPONSE_TXID, false, &m)
}

/// SEND_RECV_BUF (id 0xCAFE) for a `size`-byte buffer; returns the
/// section size and count Linux takes (`netvsc_init_buf`).
fn give_recv_buffer(
    ch: &mut impl VscChannel,
    gpadl: u32,
    size: u64,
) -> Result<(u32, u32), NetvscError> {
    let m = NvspMessage::new(
        nvsp::msg::SEND_RECV_BUF,
        &nvsp::SendBuffer {
            gpadl: gpadl.into(),
            id: nvsp::RECV_BUFFER_ID.into(),
        },
    );
    send_nvsp(ch, INIT_TXID, true, &m)?;
    let r = init_completion(ch, INIT_TXID)?;
    Ok(linux::init_recv_buf(&r, size)?)
}

/// SEND_SEND_BUF; returns the section size the host divides it into.
fn give_send_buffer(ch: &mut impl VscChannel, gpadl: u32) -> Result<u32, NetvscError> {
    let m = NvspMessage::new(
        nvsp::msg::SEND_SEND_BUF,
        &nvsp::SendBuffer {
            gpadl: gpadl.into(),
            id: 0.into(),
        },
    );
    send_nvsp(ch, INIT_TXID, true, &m)?;
    let r = init_completion(ch, INIT_TXID)?;
    let sc: nvsp::SendBufComplete = r.body_as();
    if r.msg_type.get() != nvsp::msg::SEND_SEND_BUF_COMPLETE
        || sc.status.get() != nvsp::status::SUCCESS
        || sc.section_size.get() == 0
    {
        return Err(NetvscError::Status {
            what: "SEND_SEND_BUF",
            status: sc.status.get(),
        });
    }
    Ok(sc.section_size.get())
}

impl<C: VscChannel> NetvscClient<C> {
    /// Opens the NIC's primary channel through `host` and initialises it as
    /// Linux does.
    pub fn connect(
        host: &mut impl VscBus<Channel = C>,
        offer: &Offer,
        opts: &NetvscOptions,
    ) -> Result<Self, NetvscError> {
        let mut ch = host.open_channel(offer, opts.ring_pages, opts.ring_pages)?;
        let version = negotiate(&mut ch, &opts.versions)?;
        send_ndis_settings(&mut ch, version, opts.mtu)?;
        let relid = ch.offer().relid;
        let recv = register(host, relid, opts.recv_buffer_bytes, opts.scatter_buffers)?;
        let recv_sub_alloc = give_recv_buffer(&mut ch, recv.gpadl, recv.map.len() as u64)?;
        let send = register(host, relid, opts.send_buffer_bytes, opts.scatter_buffers)?;
        let section_size = give_send_buffer(&mut ch, send.gpadl)?;
        let sections = (send.map.len() as u32) / section_size;
        let direct = host.alloc_pages(18)?;
        let mut c = NetvscClient {
            channels: vec![ch],
            memory: host.memory().clone(),
            version,
            mac: MacAddr::default(),
            mtu: 0,
            linux_mtu: opts.mtu,
            link_speed: 0,
            friendly_name: None,
            offload: Vec::new(),
            rss_caps: Vec::new(),
            rss_queues: None,
            features: linux::Features::default(),
            max_pkt_per_msg: 1,
            pkt_align: 8,
            section_size,
            recv_sub_alloc,
            recv,
            send,
            direct,
            free_sections: (0..sections).rev().collect(),
            next_seq: 1,
            next_req: 1,
            state: ClientState::default(),
            frames_while_waiting: 0,
            ranges: TransferPages::default(),
        };
        c.rndis_init(opts.control_placement)?;
        c.query_all(opts.control_placement)?;
        if opts.subchannels > 0 && version >= nvsp::version::V5 {
            c.open_subchannels(host, opts)?;
        }
        if opts.packet_filter != 0 {
            c.set_packet_filter(opts.packet_filter, opts.control_placement)?;
        }
        Ok(c)
    }

    fn set_packet_filter(&mut self, filter: u32, placement: Placement) -> Result<(), NetvscError> {
        let st = self.set(
            rndis::oid::GEN_CURRENT_PACKET_FILTER,
            &filter.to_le_bytes(),
            placement,
        )?;
        if st != rndis::status::SUCCESS {
            return Err(NetvscError::Status {
                what: "packet filter",
                status: st,
            });
        }
        Ok(())
    }

    fn rndis_init(&mut self, placement: Placement) -> Result<(), NetvscError> {
        let req = self.req_id();
        let body = rndis::InitRequest {
            req_id: req.into(),
            major: 1.into(),
            minor: 0.into(),
            max_xfer_size: 0x4000.into(),
        };
        let reply = self.request(
            &rndis_message(rndis::msg::INIT, body.as_bytes(), &[]),
            placement,
        )?;
        let c = rndis::InitComplete::read_from_prefix(&reply[8..])
            .map_err(|_| NetvscError::Malformed("RNDIS INIT_COMPLETE"))?
            .0;
        let (max_pkt, align) = linux::init_device(&c)?;
        self.max_pkt_per_msg = max_pkt.max(1);
        self.pkt_align = align.min(4096);
        Ok(())
    }

    /// The queries and sets of Linux's `rndis_filter_device_add`, in its
    /// order, each reply checked as Linux checks it ([`linux`]).
    fn query_all(&mut self, placement: Placement) -> Result<(), NetvscError> {
        use rndis::oid;
        // Linux keeps its MTU unless a 4-byte reply lowers it.
        if let Ok(mtu) = self.query_linux(oid::GEN_MAXIMUM_FRAME_SIZE, &[], 4, placement)? {
            self.linux_mtu = linux::frame_size(&mtu, self.linux_mtu);
            if mtu.len() == 4 {
                self.mtu = u32::from_le_bytes(mtu[..4].try_into().expect("4"));
            }
        }
        // A refused reply fails rndis_filter_device_add.
        let mac = self.query_linux(oid::P802_3_PERMANENT_ADDRESS, &[], 6, placement)??;
        self.mac = MacAddr(linux::permanent_address(&mac));
        self.set_hwcaps(placement)?;
        let req = self.req_id();
        let q = oid_message(rndis::msg::QUERY, req, oid::GEN_MEDIA_CONNECT_STATUS, &[]);
        let reply = self.request(&q, placement)?;
        if let Some(up) = linux::link_state(&reply) {
            self.state.link_up = up;
        }
        if self.version < nvsp::version::V5 {
            return self.query_friendly_name(placement);
        }
        if let Ok(speed) = self.query_linux(oid::GEN_LINK_SPEED, &[], 4, placement)?
            && speed.len() == 4
        {
            self.link_speed = u32::from_le_bytes(speed[..4].try_into().expect("4"));
        }
        let rss = self.query_linux(
            oid::GEN_RECEIVE_SCALE_CAPABILITIES,
            &[],
            linux::RSS_CAPS_RESULT_SIZE,
            placement,
        )?;
        self.rss_queues = linux::rss_queues(rss.as_deref().map_err(|e| *e));
        self.rss_caps = rss.unwrap_or_default();
        self.query_friendly_name(placement)
    }

    /// `rndis_netdev_set_hwcaps`: query the offload capabilities, work out
    /// the features Linux would enable and set the offload parameters.
    fn set_hwcaps(&mut self, placement: Placement) -> Result<(), NetvscError> {
        use rndis::oid;
        // The guest puts an offload header sized for its NVSP version in
        // the query's input buffer.
        let (rev, size) = if self.version >= nvsp::version::V5 {
            (3u8, rndis::OFFLOAD_SIZE_6_30)
        } else if self.version >= nvsp::version::V4 {
            (2, rndis::OFFLOAD_SIZE_6_1)
        } else {
            (1, rndis::OFFLOAD_SIZE_6_0)
        };
        let mut input = vec![0u8; usize::from(size)];
        input[..4].copy_from_slice(
            rndis::ObjectHeader {
                obj_type: rndis::OBJECT_TYPE_OFFLOAD,
                revision: rev,
                size: size.into(),
            }
            .as_bytes(),
        );
        let caps = self.query_linux(
            oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
            &input,
            linux::OFFLOAD_RESULT_SIZE,
            placement,
        )?;
        let caps = caps.map_err(|_| NetvscError::Malformed("offload capabilities"))?;
        let hw = linux::hardware_caps(&caps)
            .map_err(|_| NetvscError::Malformed("offload capabilities"))?;
        self.offload = caps;
        self.features = linux::features(&hw);
        let params = linux::offload_params(&self.features, self.version);
        let st = self.set(oid::TCP_OFFLOAD_PARAMETERS, &params, placement)?;
        if st != rndis::status::SUCCESS {
            return Err(NetvscError::Status {
                what: "offload parameters",
                status: st,
            });
        }
        Ok(())
    }

    /// The NIC's name, as `rndis_get_friendly_name` takes it for the
    /// interface alias (Linux asks while the netdev has no alias).
    fn query_friendly_name(&mut self, placement: Placement) -> Result<(), NetvscError> {
        let name = self.query_linux(
            rndis::oid::GEN_FRIENDLY_NAME,
            &[],
            linux::FRIENDLY_NAME_RESULT_SIZE,
            placement,
        )?;
        if let Ok(name) = name {
            self.friendly_name = linux::friendly_name(&name)?;
        }
        Ok(())
    }

    /// An OID query whose reply goes through Linux's
    /// `rndis_filter_query_device` with a `result_size`-byte buffer: the
    /// information Linux would take, or why it would refuse the reply.
    pub fn query_linux(
        &mut self,
        oid: u32,
        input: &[u8],
        result_size: usize,
        placement: Placement,
    ) -> Result<Result<Vec<u8>, linux::Refused>, NetvscError> {
        let req = self.req_id();
        let r = self.request(&oid_message(rndis::msg::QUERY, req, oid, input), placement)?;
        Ok(linux::query_result(&r, result_size).map(<[u8]>::to_vec))
    }

    fn open_subchannels(
        &mut self,
        host: &mut impl VscBus<Channel = C>,
        opts: &NetvscOptions,
    ) -> Result<(), NetvscError> {
        // Linux asks for sub-channels only after an RSS capabilities
        // reply it accepted, with at least two receive queues.
        let channels = linux::channels(self.rss_queues, u32::from(opts.subchannels) + 1);
        let want = channels - 1;
        if want == 0 {
            return Ok(());
        }
        let m = NvspMessage::new(
            nvsp::msg::SUBCHANNEL,
            &nvsp::SubchannelRequest {
                op: nvsp::SUBCHANNEL_ALLOCATE.into(),
                count: want.into(),
            },
        );
        send_nvsp(&mut self.channels[0], INIT_TXID, true, &m)?;
        let r = self.wait_completion_primary(INIT_TXID)?;
        let n = linux::subchannel_complete(&r, want)?;
        let instance = self.channels[0].offer().instance;
        let mut opened = 0;
        while opened < n {
            let offer = host.wait_offer()?;
            if offer.instance != instance || offer.subchannel_index == 0 {
                continue;
            }
            // rndis_set_subchannel waits for num_chn = 1 + n channels,
            // and netvsc_sc_open opens only indexes below that.
            linux::sc_open(offer.subchannel_index, 1 + n)?;
            let ch = host.open_channel(&offer, opts.ring_pages, opts.ring_pages)?;
            self.channels.push(ch);
            opened += 1;
        }
        self.channels.sort_by_key(|c| c.offer().subchannel_index);
        // RSS parameters: Linux's layout, 128-entry table, 40-byte key.
        let table: Vec<u32> = (0..rndis::RSS_TABLE_MAX as u32)
            .map(|i| i % (1 + n))
            .collect();
        let mut p = rndis::RssParameters {
            header: rndis::ObjectHeader {
                obj_type: rndis::OBJECT_TYPE_RSS_PARAMETERS,
                revision: 2,
                size: 40.into(),
            },
            hash_info: (crate::netvsp::rss::HASH_FUNC_TOEPLITZ
                | crate::netvsp::rss::HASH_IPV4
                | crate::netvsp::rss::HASH_TCP_IPV4
                | crate::netvsp::rss::HASH_IPV6
                | crate::netvsp::rss::HASH_TCP_IPV6)
                .into(),
            table_size: ((table.len() * 4) as u16).into(),
            table_offset: 40.into(),
            key_size: 40.into(),
            key_offset: (40 + table.len() as u32 * 4).into(),
            ..Default::default()
        };
        p.flags.set(0);
        let mut info = p.as_bytes().to_vec();
        info.extend_from_slice(table.as_bytes());
        info.extend_from_slice(&crate::netvsp::rss::DEFAULT_KEY);
        let st = self.set(
            rndis::oid::GEN_RECEIVE_SCALE_PARAMETERS,
            &info,
            opts.control_placement,
        )?;
        if st != rndis::status::SUCCESS {
            return Err(NetvscError::Status {
                what: "RSS parameters",
                status: st,
            });
        }
        Ok(())
    }
}
