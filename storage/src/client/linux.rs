//! What a Linux 6.1 guest's SCSI midlayer accepts from a device, written
//! as Linux's own checks (drivers/scsi/scsi.c) so tests can state them in
//! the guest's terms.

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
