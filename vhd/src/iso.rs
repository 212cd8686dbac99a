//! ISO 9660 images as read-only DVD media (2048-byte blocks).
//!
//! Opening validates the primary volume descriptor; [`IsoMeta`] also gives
//! the volume label and the root directory (Rock Ridge names when present)
//! for `vspa image info`.

use crate::device::DeviceKind;
use crate::error::ImageError;
use crate::file::{IoFile, derive_id};
use crate::raw::{DiskOptions, RawDisk};
use std::path::Path;

/// ISO 9660 logical block size.
pub const ISO_BLOCK: u64 = 2048;
/// Volume descriptors start at sector 16.
const FIRST_DESCRIPTOR: u64 = 16;
/// Descriptors scanned before giving up on a terminator.
const MAX_DESCRIPTORS: u64 = 64;
/// Largest root directory read for listings.
const MAX_ROOT_DIR: u32 = 4 << 20;

/// One root directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoEntry {
    pub name: String,
    pub is_dir: bool,
    /// First logical block of the entry's data.
    pub extent: u32,
    pub size: u32,
}

/// Validated facts of an ISO image.
#[derive(Debug, Clone)]
pub struct IsoMeta {
    pub volume_label: String,
    /// Volume space size in 2048-byte blocks.
    pub blocks: u32,
    pub root: Vec<IsoEntry>,
    /// The raw primary volume descriptor.
    pub pvd: Vec<u8>,
}

/// Both-endian u32: little endian then big endian copies, which must agree.
fn both_u32(b: &[u8], what: &'static str) -> Result<u32, ImageError> {
    let le = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let be = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    if le != be {
        return Err(ImageError::BadIso(what));
    }
    Ok(le)
}

fn both_u16(b: &[u8], what: &'static str) -> Result<u16, ImageError> {
    let le = u16::from_le_bytes([b[0], b[1]]);
    let be = u16::from_be_bytes([b[2], b[3]]);
    if le != be {
        return Err(ImageError::BadIso(what));
    }
    Ok(le)
}

impl IsoMeta {
    /// Reads and validates the image through `read(offset, buf)`.
    pub fn parse(
        file_len: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), ImageError>,
    ) -> Result<IsoMeta, ImageError> {
        let mut pvd = vec![0u8; ISO_BLOCK as usize];
        let mut found = false;
        for n in FIRST_DESCRIPTOR..FIRST_DESCRIPTOR + MAX_DESCRIPTORS {
            let at = n * ISO_BLOCK;
            if at + ISO_BLOCK > file_len {
                break;
            }
            read(at, &mut pvd)?;
            if &pvd[1..6] != b"CD001" {
                return Err(ImageError::NotIso("no CD001 volume descriptor"));
            }
            match pvd[0] {
                1 => {
                    found = true;
                    break;
                }
                255 => break,
                _ => {}
            }
        }
        if !found {
            return Err(ImageError::NotIso("no primary volume descriptor"));
        }
        if pvd[6] != 1 {
            return Err(ImageError::BadIso("descriptor version is not 1"));
        }
        let blocks = both_u32(&pvd[80..88], "volume space size copies differ")?;
        let block_size = both_u16(&pvd[128..132], "logical block size copies differ")?;
        if u64::from(block_size) != ISO_BLOCK {
            return Err(ImageError::BadIso("logical block size is not 2048"));
        }
        if blocks < (FIRST_DESCRIPTOR + 2) as u32 {
            return Err(ImageError::BadIso("volume space size too small"));
        }
        if u64::from(blocks) * ISO_BLOCK > file_len {
            return Err(ImageError::TooSmall {
                what: "ISO volume",
                len: file_len,
            });
        }
        let volume_label = String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string();
        let root_record = &pvd[156..190];
        if root_record[0] < 34 || root_record[25] & 0x02 == 0 {
            return Err(ImageError::BadIso("root directory record is malformed"));
        }
        let extent = both_u32(&root_record[2..10], "root extent copies differ")?;
        let size = both_u32(&root_record[10..18], "root size copies differ")?;
        if size > MAX_ROOT_DIR
            || u64::from(extent) * ISO_BLOCK + u64::from(size) > u64::from(blocks) * ISO_BLOCK
        {
            return Err(ImageError::BadIso("root directory lies outside the volume"));
        }
        let mut dir = vec![0u8; size as usize];
        read(u64::from(extent) * ISO_BLOCK, &mut dir)?;
        let root = parse_directory(&dir, blocks)?;
        Ok(IsoMeta {
            volume_label,
            blocks,
            root,
            pvd,
        })
    }

    pub fn read(file: &IoFile) -> Result<IsoMeta, ImageError> {
        let len = file.len()?;
        IsoMeta::parse(len, |at, buf| file.read_exact_at(buf, at))
    }

    /// Root entry by name (case-insensitive).
    pub fn find(&self, name: &str) -> Option<&IsoEntry> {
        self.root.iter().find(|e| e.name.eq_ignore_ascii_case(name))
    }
}

fn parse_directory(dir: &[u8], blocks: u32) -> Result<Vec<IsoEntry>, ImageError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let len = dir[pos] as usize;
        if len == 0 {
            // Records never span sectors: skip to the next one.
            pos = (pos / ISO_BLOCK as usize + 1) * ISO_BLOCK as usize;
            continue;
        }
        let record =
            dir.get(pos..pos + len)
                .filter(|r| r.len() >= 34)
                .ok_or(ImageError::BadIso(
                    "directory record overruns its directory",
                ))?;
        let name_len = record[32] as usize;
        let name_bytes = record.get(33..33 + name_len).ok_or(ImageError::BadIso(
            "directory record name overruns the record",
        ))?;
        pos += len;
        if name_bytes == [0] || name_bytes == [1] {
            continue;
        }
        let extent = both_u32(&record[2..10], "extent copies differ")?;
        let size = both_u32(&record[10..18], "size copies differ")?;
        if u64::from(extent) * ISO_BLOCK + u64::from(size) > u64::from(blocks) * ISO_BLOCK {
            return Err(ImageError::BadIso("file extent lies outside the volume"));
        }
        let su_start = 33 + name_len + (1 - name_len % 2);
        let name = rock_ridge_name(record.get(su_start..).unwrap_or(&[])).unwrap_or_else(|| {
            let plain = String::from_utf8_lossy(name_bytes).into_owned();
            let plain = plain.split(';').next().unwrap_or("").to_string();
            plain.strip_suffix('.').map(str::to_string).unwrap_or(plain)
        });
        entries.push(IsoEntry {
            name,
            is_dir: record[25] & 0x02 != 0,
            extent,
            size,
        });
    }
    Ok(entries)
}

/// The Rock Ridge alternate name (NM entries) from a system use area.
fn rock_ridge_name(mut su: &[u8]) -> Option<String> {
    let mut name = Vec::new();
    while su.len() >= 4 {
        let len = su[2] as usize;
        if len < 4 || len > su.len() {
            break;
        }
        if &su[0..2] == b"NM" && len >= 5 {
            name.extend_from_slice(&su[5..len]);
        }
        su = &su[len..];
    }
    (!name.is_empty()).then(|| String::from_utf8_lossy(&name).into_owned())
}

/// Opens an ISO image as read-only 2048-byte-block media.
pub fn open_iso(path: &Path, options: &DiskOptions) -> Result<(RawDisk, IsoMeta), ImageError> {
    let file = IoFile::open_image(path, false, options)?;
    let meta = IsoMeta::read(&file)?;
    let id = derive_id(&meta.pvd);
    let size = u64::from(meta.blocks) * ISO_BLOCK;
    Ok((
        RawDisk::linear(file, ISO_BLOCK as u32, size, DeviceKind::Iso, id, false),
        meta,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal volume built byte by byte: PVD at sector 16, terminator at
    /// 17, root directory at 18 holding one file "A.TXT;1" at sector 19.
    pub(crate) fn tiny_iso() -> Vec<u8> {
        let mut img = vec![0u8; 20 * 2048];
        let pvd = &mut img[16 * 2048..17 * 2048];
        pvd[0] = 1;
        pvd[1..6].copy_from_slice(b"CD001");
        pvd[6] = 1;
        pvd[40..72].copy_from_slice(&[b' '; 32]);
        pvd[40..44].copy_from_slice(b"TINY");
        pvd[80..84].copy_from_slice(&20u32.to_le_bytes());
        pvd[84..88].copy_from_slice(&20u32.to_be_bytes());
        pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
        pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
        let root = &mut pvd[156..190];
        root[0] = 34;
        root[2..6].copy_from_slice(&18u32.to_le_bytes());
        root[6..10].copy_from_slice(&18u32.to_be_bytes());
        root[10..14].copy_from_slice(&2048u32.to_le_bytes());
        root[14..18].copy_from_slice(&2048u32.to_be_bytes());
        root[25] = 2;
        root[32] = 1;
        let term = &mut img[17 * 2048..18 * 2048];
        term[0] = 255;
        term[1..6].copy_from_slice(b"CD001");
        let dir = &mut img[18 * 2048..19 * 2048];
        for (i, id) in [0u8, 1].iter().enumerate() {
            let r = &mut dir[i * 34..i * 34 + 34];
            r[0] = 34;
            r[2..6].copy_from_slice(&18u32.to_le_bytes());
            r[6..10].copy_from_slice(&18u32.to_be_bytes());
            r[25] = 2;
            r[32] = 1;
            r[33] = *id;
        }
        let f = &mut dir[68..68 + 40];
        f[0] = 40;
        f[2..6].copy_from_slice(&19u32.to_le_bytes());
        f[6..10].copy_from_slice(&19u32.to_be_bytes());
        f[10..14].copy_from_slice(&5u32.to_le_bytes());
        f[14..18].copy_from_slice(&5u32.to_be_bytes());
        f[32] = 7;
        f[33..40].copy_from_slice(b"A.TXT;1");
        img[19 * 2048..19 * 2048 + 5].copy_from_slice(b"hello");
        img
    }

    fn parse(img: &[u8]) -> Result<IsoMeta, ImageError> {
        IsoMeta::parse(img.len() as u64, |at, buf| {
            let src =
                img.get(at as usize..at as usize + buf.len())
                    .ok_or(ImageError::TooSmall {
                        what: "read",
                        len: at,
                    })?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    #[test]
    fn parses_a_hand_built_volume() {
        let meta = parse(&tiny_iso()).unwrap();
        assert_eq!(meta.volume_label, "TINY");
        assert_eq!(meta.blocks, 20);
        assert_eq!(
            meta.root,
            vec![IsoEntry {
                name: "A.TXT".into(),
                is_dir: false,
                extent: 19,
                size: 5
            }]
        );
    }

    #[test]
    fn rejects_damaged_descriptors() {
        let mut img = tiny_iso();
        img[16 * 2048 + 84] = 9; // big-endian copy of the volume size
        assert!(matches!(parse(&img), Err(ImageError::BadIso(_))));
        let mut img = tiny_iso();
        img[16 * 2048 + 1] = b'X';
        assert!(matches!(parse(&img), Err(ImageError::NotIso(_))));
        let img = tiny_iso();
        assert!(matches!(
            parse(&img[..19 * 2048]),
            Err(ImageError::TooSmall { .. })
        ));
    }
}
