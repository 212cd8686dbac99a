//! A storvsc-like client: the guest side of the storage protocol, for tests
//! and benchmarks. It runs over any [`VscBus`]/[`VscChannel`]: hosted mode
//! (a client process) or the VMM's test guest (inside a VM).
//!
//! It speaks exactly what Linux's storvsc sends: the initialization
//! sequence with transaction id `u64::MAX - 2`, versions newest first,
//! CREATE_SUB_CHANNELS, and EXECUTE_SRB as in-band packets (no data) or
//! GPA-direct packets whose single range covers the data buffer.

use std::time::{Duration, Instant};

use vmbus::channel::Wait;
use vmbus::hosted::client::{ClientChannel, Pages};
use vmbus::packet::write_gpa_direct;
use vmbus::ring::{RingError, WriteError};
use vmbus::vsc::{BusError, Offer, VscBus, VscChannel};
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use zerocopy::{FromBytes, IntoBytes};

pub mod linux;

use crate::protocol::{
    ChannelProperties, PACKET_SIZE, ProtocolVersion, REQUEST_COMPLETION_FLAG, SUPPORTED_VERSIONS,
    ScsiRequest, VstorPacket, direction, operation, status,
};

/// Transaction id Linux uses for initialization packets.
pub const INIT_TXID: u64 = u64::MAX - 2;

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum StorvscError {
    #[error("VMBus: {0}")]
    Bus(BusError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("ring full")]
    Full,
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("host answered {what} with status {status:#x}")]
    Status { what: &'static str, status: u32 },
    #[error("host accepted no storage protocol version")]
    NoVersion,
    /// A packet Linux's storvsc would drop.
    #[error("Linux drops the host's packet: {0}")]
    Linux(#[from] linux::PacketDropped),
    /// QUERY_PROPERTIES leaves Linux no transfer size (`max_sectors` 0).
    #[error("max_transfer_bytes {0} gives Linux no sectors")]
    MaxTransfer(u32),
}

impl From<BusError> for StorvscError {
    fn from(e: BusError) -> Self {
        StorvscError::Bus(e)
    }
}

impl From<WriteError> for StorvscError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Full { .. } => StorvscError::Full,
            WriteError::Ring(r) => StorvscError::Ring(r),
        }
    }
}

/// One SCSI request to send.
#[derive(Debug, Clone, Copy)]
pub struct Srb<'a> {
    pub lun: u8,
    pub target: u8,
    pub cdb: &'a [u8],
    /// `direction::READ`, `WRITE` or `NONE`.
    pub data_in: u8,
    pub data_transfer_length: u32,
}

impl<'a> Srb<'a> {
    pub fn new(lun: u8, cdb: &'a [u8], data_in: u8, len: u32) -> Self {
        Srb {
            lun,
            target: 0,
            cdb,
            data_in,
            data_transfer_length: len,
        }
    }
}

/// A guest buffer: pages of client memory, used from `offset`.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub pages: Pages,
    pub offset: u32,
    pub len: u32,
}

impl Buffer {
    fn pfns(&self) -> impl Iterator<Item = u64> {
        let first = self.offset as u64 / 4096;
        let count = (self.offset as u64 % 4096 + self.len as u64).div_ceil(4096);
        (self.pages.first_pfn + first..self.pages.first_pfn + first + count).take(32 * 1024)
    }
}

/// A completion as the client sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub txid: u64,
    pub packet_type: u16,
    pub packet: VstorPacket,
    pub len: usize,
}

impl Reply {
    pub fn srb(&self) -> ScsiRequest {
        self.packet.srb()
    }
    pub fn status(&self) -> u32 {
        self.packet.header.status.get()
    }
    pub fn operation(&self) -> u32 {
        self.packet.header.operation.get()
    }
    /// Sense bytes the host returned.
    pub fn sense(&self) -> Vec<u8> {
        let s = self.srb();
        s.cdb_or_sense[..(s.sense_info_length as usize).min(20)].to_vec()
    }
}

/// Writes one EXECUTE_SRB packet (GPA-direct when there is a buffer).
pub fn send_srb(
    ch: &mut impl VscChannel,
    txid: u64,
    srb: &Srb<'_>,
    buffer: Option<&Buffer>,
) -> Result<(), StorvscError> {
    let mut p = VstorPacket::new(operation::EXECUTE_SRB, 0);
    p.header.flags = REQUEST_COMPLETION_FLAG.into();
    let mut r = <ScsiRequest as zerocopy::FromZeros>::new_zeroed();
    r.length = (size_of::<ScsiRequest>() as u16).into();
    r.target_id = srb.target;
    r.lun = srb.lun;
    r.cdb_length = srb.cdb.len() as u8;
    r.sense_info_length = crate::protocol::SENSE_BUFFER_SIZE as u8;
    r.data_in = srb.data_in;
    r.data_transfer_length = srb.data_transfer_length.into();
    let n = srb.cdb.len().min(16);
    r.cdb_or_sense[..n].copy_from_slice(&srb.cdb[..n]);
    p.set_srb(&r);
    let out = ch.outgoing();
    match buffer {
        Some(b) => {
            let pfns: Vec<u64> = b.pfns().collect();
            write_gpa_direct(
                out,
                txid,
                PACKET_FLAG_COMPLETION_REQUESTED,
                &[(b.len, b.offset % 4096, &pfns)],
                p.as_bytes(),
            )?;
        }
        None => out.write_packet(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            txid,
            &[],
            p.as_bytes(),
        )?,
    }
    Ok(())
}

/// Reads the next reply, if one is there.
pub fn read_reply(ch: &mut impl VscChannel) -> Result<Option<Reply>, StorvscError> {
    let Some(p) = ch.incoming().read()? else {
        return Ok(None);
    };
    let payload = p.payload();
    let mut raw = [0u8; PACKET_SIZE];
    let len = payload.len().min(PACKET_SIZE);
    payload.read_at(0, &mut raw[..len]).expect("within payload");
    let op = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
    linux::on_channel_callback(
        p.desc.length as usize,
        payload.len(),
        p.desc.transaction_id,
        op,
    )?;
    Ok(Some(Reply {
        txid: p.desc.transaction_id,
        packet_type: p.desc.packet_type,
        packet: VstorPacket::read_from_bytes(&raw).expect("64 bytes"),
        len: payload.len(),
    }))
}

/// Waits for the reply to `txid`; unsolicited packets (id 0) are kept.
pub fn wait_reply(
    ch: &mut impl VscChannel,
    txid: u64,
    unsolicited: &mut Vec<u32>,
    timeout: Duration,
) -> Result<Reply, StorvscError> {
    let deadline = Instant::now() + timeout;
    loop {
        ch.flush()?;
        while let Some(r) = read_reply(ch)? {
            if r.txid == txid {
                ch.flush()?;
                return Ok(r);
            }
            if r.txid == 0 {
                unsolicited.push(r.operation());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StorvscError::Timeout("storage reply"));
        }
        if ch.wait(left)? == Wait::Stopped {
            return Err(StorvscError::Timeout("storage reply"));
        }
    }
}

/// A connected storvsc client: the primary channel and its sub-channels.
#[derive(Debug)]
pub struct StorvscClient<C: VscChannel = ClientChannel> {
    pub channels: Vec<C>,
    pub version: u16,
    pub properties: ChannelProperties,
    /// Operations of unsolicited packets seen (ENUMERATE_BUS, REMOVE_DEVICE).
    pub unsolicited: Vec<u32>,
}

/// Reply timeout for synchronous calls.
pub const TIMEOUT: Duration = Duration::from_secs(10);

impl<C: VscChannel> StorvscClient<C> {
    /// Opens the controller's primary channel, runs the initialization
    /// sequence and opens up to `subchannels` sub-channels.
    pub fn connect(
        host: &mut impl VscBus<Channel = C>,
        offer: &Offer,
        subchannels: u16,
        ring_pages: u64,
    ) -> Result<Self, StorvscError> {
        let ch = host.open_channel(offer, ring_pages, ring_pages)?;
        let mut c = StorvscClient {
            channels: vec![ch],
            version: 0,
            properties: <ChannelProperties as zerocopy::FromZeros>::new_zeroed(),
            unsolicited: Vec::new(),
        };
        c.init_op(operation::BEGIN_INITIALIZATION, "BEGIN_INITIALIZATION")?;
        c.version = c.negotiate()?;
        let props = c.init_op(operation::QUERY_PROPERTIES, "QUERY_PROPERTIES")?;
        c.properties = props.packet.body_as();
        c.init_op(operation::END_INITIALIZATION, "END_INITIALIZATION")?;
        if linux::max_sectors(&c.properties) == 0 {
            return Err(StorvscError::MaxTransfer(
                c.properties.max_transfer_bytes.get(),
            ));
        }
        // As a guest with `subchannels + 1` CPUs.
        let n = linux::subchannels(&c.properties, u32::from(subchannels) + 1);
        if n > 0 {
            c.create_subchannels(host, n, ring_pages)?;
        }
        Ok(c)
    }

    fn request(&mut self, p: &VstorPacket, what: &'static str) -> Result<Reply, StorvscError> {
        let ch = &mut self.channels[0];
        ch.outgoing().write_packet(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            INIT_TXID,
            &[],
            p.as_bytes(),
        )?;
        let r = wait_reply(ch, INIT_TXID, &mut self.unsolicited, TIMEOUT)?;
        if r.operation() != operation::COMPLETE_IO {
            return Err(StorvscError::Status {
                what,
                status: r.status(),
            });
        }
        Ok(r)
    }

    fn init_op(&mut self, op: u32, what: &'static str) -> Result<Reply, StorvscError> {
        let mut p = VstorPacket::new(op, 0);
        p.header.flags = REQUEST_COMPLETION_FLAG.into();
        let r = self.request(&p, what)?;
        if r.status() != status::SUCCESS {
            return Err(StorvscError::Status {
                what,
                status: r.status(),
            });
        }
        Ok(r)
    }

    fn negotiate(&mut self) -> Result<u16, StorvscError> {
        for v in SUPPORTED_VERSIONS {
            let mut p = VstorPacket::new(operation::QUERY_PROTOCOL_VERSION, 0);
            p.header.flags = REQUEST_COMPLETION_FLAG.into();
            p.set_body(&ProtocolVersion {
                major_minor: v.into(),
                revision: 0.into(),
            });
            if self.request(&p, "QUERY_PROTOCOL_VERSION")?.status() == status::SUCCESS {
                return Ok(v);
            }
        }
        Err(StorvscError::NoVersion)
    }

    fn create_subchannels(
        &mut self,
        host: &mut impl VscBus<Channel = C>,
        n: u16,
        ring_pages: u64,
    ) -> Result<(), StorvscError> {
        let mut p = VstorPacket::new(operation::CREATE_SUB_CHANNELS, 0);
        p.header.flags = REQUEST_COMPLETION_FLAG.into();
        p.set_body(&zerocopy::little_endian::U16::new(n));
        let r = self.request(&p, "CREATE_SUB_CHANNELS")?;
        if r.status() != status::SUCCESS {
            return Err(StorvscError::Status {
                what: "CREATE_SUB_CHANNELS",
                status: r.status(),
            });
        }
        let primary = self.channels[0].offer().clone();
        for _ in 0..n {
            let offer = host.wait_offer()?;
            if offer.instance != primary.instance || offer.subchannel_index == 0 {
                continue;
            }
            let ch = host.open_channel(&offer, ring_pages, ring_pages)?;
            self.channels.push(ch);
        }
        Ok(())
    }

    /// Sends an SRB on channel `chan` and waits for its completion.
    pub fn execute(
        &mut self,
        chan: usize,
        srb: &Srb<'_>,
        buffer: Option<&Buffer>,
    ) -> Result<Reply, StorvscError> {
        let ch = &mut self.channels[chan];
        let txid = 1 + (ch.offer().relid as u64) * 0x1_0000;
        send_srb(ch, txid, srb, buffer)?;
        wait_reply(ch, txid, &mut self.unsolicited, TIMEOUT)
    }
}

/// Convenience CDBs.
pub mod cdb {
    pub fn inquiry(evpd: bool, page: u8, len: u16) -> [u8; 6] {
        let l = len.to_be_bytes();
        [0x12, evpd as u8, page, l[0], l[1], 0]
    }

    pub fn read_capacity_16() -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        c
    }

    pub fn report_luns(len: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = 0xa0;
        c[6..10].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    pub fn read_16(lba: u64, blocks: u32) -> [u8; 16] {
        rw16(0x88, lba, blocks)
    }

    pub fn write_16(lba: u64, blocks: u32) -> [u8; 16] {
        rw16(0x8a, lba, blocks)
    }

    pub fn read_10(lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = 0x28;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    pub fn synchronize_cache() -> [u8; 10] {
        [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    }

    pub fn mode_sense_10(page: u8, len: u16) -> [u8; 10] {
        let l = len.to_be_bytes();
        [0x5a, 0, page, 0, 0, 0, 0, l[0], l[1], 0]
    }

    pub fn test_unit_ready() -> [u8; 6] {
        [0; 6]
    }
}

pub use crate::protocol::direction as dir;
pub use direction::{NONE, READ, WRITE};
