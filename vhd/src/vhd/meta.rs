//! Reading and validating the metadata of one VHD file: footer (and its
//! copy), dynamic header, BAT, parent locator regions, block placement.

use crate::error::ImageError;
use crate::file::IoFile;
use crate::format::{
    BAT_UNUSED, DiskType, DynHeader, FOOTER_SIZE, Footer, SECTOR, bat_size, bitmap_size,
};

/// Largest accepted block size (256 MiB); the format allows any power of
/// two, but larger blocks only come from damaged or hostile images.
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most blocks accepted in one image (16 Mi: 32 TiB of 2 MiB blocks).
const MAX_BLOCKS: u64 = 1 << 24;

/// Parsed and validated metadata of one VHD file.
#[derive(Debug, Clone)]
pub struct VhdMeta {
    pub footer: Footer,
    pub header: Option<DynHeader>,
    pub file_len: u64,
    /// Offset of the footer this file ends with (for dynamic/differencing:
    /// where the next block goes).
    pub footer_offset: u64,
    /// The footer at the end of the file was damaged; the copy at offset 0
    /// was used.
    pub end_footer_damaged: bool,
    /// The copy at offset 0 differs from the footer at the end.
    pub footer_copy_differs: bool,
    /// BAT (empty for fixed disks).
    pub bat: Vec<u32>,
    /// End of the metadata and the highest referenced block.
    pub data_end: u64,
}

impl VhdMeta {
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type()
    }

    pub fn virtual_size(&self) -> u64 {
        self.footer.virtual_size()
    }

    pub fn block_size(&self) -> u32 {
        self.header.as_ref().map_or(0, |h| h.block_size.get())
    }

    /// Bytes of trailing space no BAT entry references (a crash leftover).
    pub fn leaked_bytes(&self) -> u64 {
        if self.disk_type() == DiskType::Fixed {
            0
        } else {
            self.footer_offset.saturating_sub(self.data_end)
        }
    }

    /// Reads and validates the metadata of `file`.
    pub fn read(file: &IoFile) -> Result<VhdMeta, ImageError> {
        let file_len = file.len()?;
        if file_len < FOOTER_SIZE as u64 {
            return Err(ImageError::TooSmall {
                what: "VHD footer",
                len: file_len,
            });
        }
        let footer_offset = (file_len - FOOTER_SIZE as u64) / SECTOR * SECTOR;
        let mut buf = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut buf, footer_offset)?;
        let end = Footer::parse(&buf);
        let mut copy_buf = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut copy_buf, 0)?;
        let copy = Footer::parse(&copy_buf);
        let (footer, end_footer_damaged) = match (end, copy) {
            (Ok(f), _) => (f, false),
            (Err(e), Ok(c)) if c.disk_type() != DiskType::Fixed => {
                tracing::warn!(path = %file.path().display(), "end footer damaged ({e}); using the copy at offset 0");
                (c, true)
            }
            (Err(e), _) => return Err(e),
        };
        let footer_copy_differs =
            !end_footer_damaged && footer.disk_type() != DiskType::Fixed && copy_buf != buf;
        let mut meta = VhdMeta {
            footer,
            header: None,
            file_len,
            footer_offset: if end_footer_damaged {
                file_len
            } else {
                footer_offset
            },
            end_footer_damaged,
            footer_copy_differs,
            bat: Vec::new(),
            data_end: 0,
        };
        let size = meta.virtual_size();
        if !size.is_multiple_of(SECTOR) || size > (u64::from(u32::MAX) + 1) * SECTOR {
            return Err(ImageError::BadVirtualSize(size));
        }
        if meta.disk_type() == DiskType::Fixed {
            if size > footer_offset {
                return Err(ImageError::OutsideFile {
                    what: "fixed disk data",
                    offset: 0,
                    len: size,
                    file_len,
                });
            }
            meta.data_end = size;
            return Ok(meta);
        }
        meta.read_dynamic(file)?;
        Ok(meta)
    }

    fn read_dynamic(&mut self, file: &IoFile) -> Result<(), ImageError> {
        let limit = self.footer_offset;
        let header_offset = self.footer.data_offset.get();
        check_inside(
            "dynamic disk header",
            header_offset,
            1024,
            limit,
            self.file_len,
        )?;
        let mut hbuf = [0u8; 1024];
        file.read_exact_at(&mut hbuf, header_offset)?;
        let header = DynHeader::parse(&hbuf)?;
        let block_size = header.block_size.get();
        if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(ImageError::BadBlockSize(block_size));
        }
        let entries = header.max_table_entries.get();
        let size = self.virtual_size();
        if u64::from(entries) * u64::from(block_size) < size {
            return Err(ImageError::BatTooSmall {
                entries,
                block_size,
                size,
            });
        }
        // Entries past the virtual size map nothing; only the needed ones
        // are kept (and bound the memory a hostile header can ask for).
        let needed = size.div_ceil(u64::from(block_size));
        if needed > MAX_BLOCKS {
            return Err(ImageError::TooManyBlocks(needed));
        }
        let bat_offset = header.table_offset.get();
        let bat_len = bat_size(entries);
        check_inside("BAT", bat_offset, bat_len, limit, self.file_len)?;
        // Metadata regions that blocks must not overlap.
        let mut regions: Vec<(u64, u64, &'static str)> = vec![
            (0, FOOTER_SIZE as u64, "footer copy"),
            (header_offset, 1024, "dynamic disk header"),
            (bat_offset, bat_len, "BAT"),
        ];
        if self.disk_type() == DiskType::Differencing {
            for loc in header.locators.iter().filter(|l| l.data_length.get() > 0) {
                let (off, len) = (loc.data_offset.get(), u64::from(loc.data_length.get()));
                check_inside("parent locator", off, len, limit, self.file_len)?;
                regions.push((off, len, "parent locator"));
            }
        }
        check_regions(&regions)?;
        let mut raw = vec![0u8; needed as usize * 4];
        file.read_exact_at(&mut raw, bat_offset)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let extent = bitmap_size(block_size) + u64::from(block_size);
        let mut data_end = regions.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
        data_end = data_end.div_ceil(SECTOR) * SECTOR;
        let mut used: Vec<(u64, u32)> = Vec::new();
        for (index, &sector) in bat.iter().enumerate() {
            if sector == BAT_UNUSED {
                continue;
            }
            let index = index as u32;
            let start = u64::from(sector) * SECTOR;
            if start + extent > limit {
                return Err(ImageError::BlockPastEof { index, sector });
            }
            if regions
                .iter()
                .any(|&(off, len, _)| start < off + len && off < start + extent)
            {
                return Err(ImageError::BlockOverlapsMetadata { index, sector });
            }
            used.push((start, index));
            data_end = data_end.max(start + extent);
        }
        used.sort_unstable();
        for pair in used.windows(2) {
            if pair[0].0 + extent > pair[1].0 {
                return Err(ImageError::BlocksOverlap {
                    first: pair[0].1.min(pair[1].1),
                    second: pair[0].1.max(pair[1].1),
                });
            }
        }
        self.header = Some(header);
        self.bat = bat;
        self.data_end = data_end;
        Ok(())
    }
}

fn check_inside(
    what: &'static str,
    offset: u64,
    len: u64,
    limit: u64,
    file_len: u64,
) -> Result<(), ImageError> {
    if offset.checked_add(len).is_none_or(|end| end > limit) || !offset.is_multiple_of(SECTOR) {
        return Err(ImageError::OutsideFile {
            what,
            offset,
            len,
            file_len,
        });
    }
    Ok(())
}

fn check_regions(regions: &[(u64, u64, &'static str)]) -> Result<(), ImageError> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.0 < b.0 + b.1 && b.0 < a.0 + a.1 {
                return Err(ImageError::MetadataOverlap {
                    what: b.2,
                    offset: b.0,
                    other: a.2,
                });
            }
        }
    }
    Ok(())
}
