//! What a Linux 6.1 guest's SCSI midlayer and storvsc accept from the
//! host, written as Linux's own checks (drivers/scsi/scsi.c,
//! drivers/scsi/storvsc_drv.c) so tests and the client state them in the
//! guest's terms.

use crate::protocol::{
    ChannelProperties, PACKET_SIZE, STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL, operation,
};

/// `STORVSC_MAX_PKT_SIZE`: the `max_pkt_size` of storvsc channels,
/// `sizeof(struct vstor_packet)` plus the 16-byte packet descriptor.
pub const MAX_PKT_SIZE: usize = 16 + PACKET_SIZE;

/// Why `storvsc_on_channel_callback` drops a packet from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketDropped {
    #[error("packet of {0} bytes is cut to max_pkt_size 80 (hv_pkt_iter_first)")]
    TooLong(usize),
    #[error("packet payload of {len} bytes is below minlen {min}")]
    Short { len: usize, min: usize },
    #[error("operation {0} with request id 0")]
    Unsolicited(u32),
}

/// `storvsc_on_channel_callback` (storvsc_drv.c): a packet of `len` bytes
/// (`len8 << 3`, descriptor included) with `payload` bytes after its data
/// offset (`hv_pkt_datalen`), request id `rqst_id` and `operation` in its
/// first word. `minlen = rqst_id ? sizeof(struct vstor_packet) :
/// sizeof(enum vstor_packet_operation)`; with id 0, COMPLETE_IO and
/// FCHBA_DATA are "Invalid packet with ID of 0".
pub fn on_channel_callback(
    len: usize,
    payload: usize,
    rqst_id: u64,
    op: u32,
) -> Result<(), PacketDropped> {
    if !vmbus::linux::packet_fits(len, MAX_PKT_SIZE) {
        return Err(PacketDropped::TooLong(len));
    }
    let min = if rqst_id != 0 { PACKET_SIZE } else { 4 };
    if payload < min {
        return Err(PacketDropped::Short { len: payload, min });
    }
    if rqst_id == 0 && (op == operation::COMPLETE_IO || op == operation::FCHBA_DATA) {
        return Err(PacketDropped::Unsolicited(op));
    }
    Ok(())
}

/// `handle_multichannel_storage` (storvsc_drv.c): the sub-channels a guest
/// with `cpus` online CPUs asks for, `min(num_online_cpus() - 1,
/// max_channel_cnt)`, only when the properties say multi-channel.
pub fn subchannels(p: &ChannelProperties, cpus: u32) -> u16 {
    if p.flags.get() & STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL == 0 {
        return 0;
    }
    let cpus = u16::try_from(cpus.saturating_sub(1)).unwrap_or(u16::MAX);
    cpus.min(p.max_channel_count.get())
}

/// `storvsc_probe`: `host->max_sectors = round_down(max_transfer_bytes,
/// HV_HYP_PAGE_SIZE) >> 9` (0 leaves the guest unable to do I/O).
pub fn max_sectors(p: &ChannelProperties) -> u32 {
    (p.max_transfer_bytes.get() & !4095) >> 9
}

/// `SCSI_VPD_HEADER_SIZE`: the allocation length `scsi_get_vpd_size`
/// first asks a page with.
pub const VPD_HEADER_SIZE: usize = 4;

/// Why Linux ignores a VPD page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VpdRefused {
    #[error("page code {got:#04x} in byte 1, asked for {asked:#04x}")]
    WrongPage { asked: u8, got: u8 },
    #[error("page length is 0")]
    Empty,
    #[error("fewer than 4 bytes came back")]
    Short,
}

/// `scsi_vpd_inquiry`: the page length Linux takes from a reply to
/// INQUIRY EVPD `page` (`get_unaligned_be16(&buffer[2]) + 4`), or why it
/// returns -EIO.
pub fn vpd_inquiry(reply: &[u8], page: u8) -> Result<usize, VpdRefused> {
    if reply.len() < VPD_HEADER_SIZE {
        return Err(VpdRefused::Short);
    }
    // if (buffer[1] != page) return -EIO;
    if reply[1] != page {
        return Err(VpdRefused::WrongPage {
            asked: page,
            got: reply[1],
        });
    }
    // result = get_unaligned_be16(&buffer[2]); if (!result) return -EIO;
    let len = usize::from(u16::from_be_bytes([reply[2], reply[3]]));
    if len == 0 {
        return Err(VpdRefused::Empty);
    }
    Ok(len + 4)
}

/// `scsi_attach_vpd`: the pages Linux goes on to fetch, read from the
/// supported-pages list (page 0x00) it accepted.
pub fn listed_pages(page0: &[u8]) -> Result<Vec<u8>, VpdRefused> {
    let len = vpd_inquiry(page0, 0)?;
    Ok(page0
        .get(4..len.min(page0.len()))
        .unwrap_or_default()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checks_of_storvsc_on_channel_callback() {
        assert_eq!(
            on_channel_callback(80, 64, 7, operation::COMPLETE_IO),
            Ok(())
        );
        assert_eq!(
            on_channel_callback(88, 72, 7, operation::COMPLETE_IO),
            Err(PacketDropped::TooLong(88))
        );
        assert_eq!(
            on_channel_callback(64, 48, 7, operation::COMPLETE_IO),
            Err(PacketDropped::Short { len: 48, min: 64 })
        );
        assert_eq!(
            on_channel_callback(24, 8, 0, operation::ENUMERATE_BUS),
            Ok(())
        );
        assert_eq!(
            on_channel_callback(80, 64, 0, operation::COMPLETE_IO),
            Err(PacketDropped::Unsolicited(operation::COMPLETE_IO))
        );
    }

    #[test]
    fn storvsc_channel_init_and_probe_numbers() {
        let mut p = <ChannelProperties as zerocopy::FromZeros>::new_zeroed();
        p.max_channel_count = 4.into();
        p.max_transfer_bytes = 0x40000.into();
        assert_eq!(subchannels(&p, 8), 0, "no multi-channel flag");
        p.flags = STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL.into();
        assert_eq!(subchannels(&p, 8), 4);
        assert_eq!(subchannels(&p, 2), 1);
        assert_eq!(subchannels(&p, 1), 0);
        assert_eq!(max_sectors(&p), 512);
        p.max_transfer_bytes = 4095.into();
        assert_eq!(max_sectors(&p), 0);
    }

    #[test]
    fn the_checks_of_scsi_vpd_inquiry() {
        assert_eq!(vpd_inquiry(&[5, 0, 0, 1, 0], 0), Ok(5));
        assert_eq!(
            vpd_inquiry(&[0, 5, 0, 1, 0], 0),
            Err(VpdRefused::WrongPage { asked: 0, got: 5 })
        );
        assert_eq!(vpd_inquiry(&[0, 0x80, 0, 0], 0x80), Err(VpdRefused::Empty));
        assert_eq!(listed_pages(&[0, 0, 0, 2, 0, 0x80]), Ok(vec![0, 0x80]));
    }
}
