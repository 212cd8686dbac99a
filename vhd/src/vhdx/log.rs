//! The VHDX log: finding the active sequence, replaying it (to the file, or
//! into an in-memory overlay for a read-only open), and writing new entries.
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is a header
//! sector holding up to 126 descriptors (more descriptor sectors if needed),
//! then one data sector per data descriptor. A data sector carries bytes
//! 8..4092 of the page it restores; the first 8 and last 4 bytes travel in
//! its descriptor, so a data sector always starts with "data" and ends with
//! the low half of the sequence number (a torn sector is detectable). Each
//! entry has a CRC-32C over all of it.
//!
//! Replay: every 4 KiB position of the log is tried as the start of a chain
//! of valid entries with consecutive sequence numbers, each starting where
//! the previous ended. A chain counts when the `tail` of its last entry (the
//! head) names one of its entries; the entries from there to the head are a
//! complete sequence. The complete sequence whose head has the highest
//! sequence number is the active one and is replayed in order. An entry
//! whose write was torn fails its CRC and ends its chain, so a crash while
//! writing an entry replays the sequence before it.

use super::error::VhdxError;
use super::format::{
    DATA_DESC_SIGNATURE, DATA_SECTOR_SIGNATURE, DESCRIPTOR_SIZE, Descriptor,
    FIRST_SECTOR_DESCRIPTORS, Guid, HEADER_SECTION, LOG_CHECKSUM_AT, LOG_HEADER_SIZE, LOG_SECTOR,
    LOG_SIGNATURE, LogEntryHeader, ZERO_DESC_SIGNATURE, crc_with_hole, descriptor_sectors,
    seal_crc, stored_crc,
};
use crate::error::ImageError;
use crate::file::IoFile;
use std::collections::BTreeMap;
use zerocopy::{FromBytes, IntoBytes};

const SECTOR: usize = LOG_SECTOR as usize;
/// Largest log this implementation searches (Hyper-V and qemu use 1 MiB).
pub const MAX_LOG_LENGTH: u64 = 64 << 20;
/// How far past the end of the file a log may ask the file to grow.
const MAX_GROWTH: u64 = 4 << 30;
/// Most bytes of zeros one replay writes.
const MAX_ZEROED: u64 = 1 << 30;
/// Most bytes of zeros a read-only (in-memory) replay takes.
const MAX_OVERLAY_ZERO: u64 = 256 << 20;

/// Where the log lives in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRegion {
    pub offset: u64,
    pub length: u64,
}

/// One change a log entry makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A 4 KiB page at `offset`.
    Page { offset: u64, data: Box<[u8]> },
    /// `len` bytes of zeros at `offset`.
    Zero { offset: u64, len: u64 },
}

/// The active sequence of a log, ready to replay.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Changes in replay order.
    pub changes: Vec<Change>,
    /// Entries in the sequence, and the first and last sequence numbers.
    pub entries: usize,
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// The file must be at least this long afterwards.
    pub last_file_offset: u64,
}

/// A valid entry at some position of the log.
#[derive(Clone)]
struct Parsed {
    position: u64,
    length: u64,
    header: LogEntryHeader,
    bytes: Vec<u8>,
}

/// Reads the log and finds its active sequence (None: nothing to replay).
pub fn find_active(
    file: &IoFile,
    region: LogRegion,
    guid: Guid,
    file_len: u64,
) -> Result<Option<Replay>, ImageError> {
    if guid.is_zero() || region.length == 0 {
        return Ok(None);
    }
    if region.length > MAX_LOG_LENGTH {
        return Err(VhdxError::BadLog(format!(
            "log of {} bytes is larger than the {MAX_LOG_LENGTH} this implementation replays",
            region.length
        ))
        .into());
    }
    let mut log = vec![0u8; region.length as usize];
    file.read_exact_at(&mut log, region.offset)?;
    find_in(&log, guid, file_len, region)
}

/// The search of [`find_active`] over the log's bytes.
pub fn find_in(
    log: &[u8],
    guid: Guid,
    file_len: u64,
    region: LogRegion,
) -> Result<Option<Replay>, ImageError> {
    let sectors = log.len() / SECTOR;
    // Parse each position once; the CRC work is bounded so that a hostile
    // log of overlapping would-be entries cannot make the search crawl.
    let mut budget = 64 * log.len() as u64;
    let mut parsed: Vec<Option<Parsed>> = Vec::with_capacity(sectors);
    for s in 0..sectors {
        parsed.push(parse_entry(log, (s * SECTOR) as u64, guid, &mut budget)?);
    }
    let mut best: Option<Vec<usize>> = None;
    for start in 0..sectors {
        let chain = chain_from(&parsed, start, sectors);
        let Some(head) = chain.last().and_then(|&i| parsed[i].as_ref()) else {
            continue;
        };
        let tail = u64::from(head.header.tail.get());
        let Some(from) = chain
            .iter()
            .position(|&i| parsed[i].as_ref().is_some_and(|e| e.position == tail))
        else {
            continue;
        };
        let sequence = chain[from..].to_vec();
        let seq_of = |c: &Vec<usize>| {
            c.last()
                .and_then(|&i| parsed[i].as_ref())
                .map_or(0, |e| e.header.sequence_number.get())
        };
        if best.as_ref().is_none_or(|b| seq_of(&sequence) > seq_of(b)) {
            best = Some(sequence);
        }
    }
    let Some(sequence) = best else {
        return Ok(None);
    };
    let entries: Vec<&Parsed> = sequence
        .iter()
        .filter_map(|&i| parsed[i].as_ref())
        .collect();
    build_replay(&entries, file_len, region).map(Some)
}

/// Indices of the chain of consecutive entries starting at sector `start`.
fn chain_from(parsed: &[Option<Parsed>], start: usize, sectors: usize) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut at = start;
    let mut prev: Option<u64> = None;
    while let Some(entry) = parsed[at].as_ref() {
        let seq = entry.header.sequence_number.get();
        if prev.is_some_and(|p| p.checked_add(1) != Some(seq)) {
            break;
        }
        chain.push(at);
        prev = Some(seq);
        at = (at + (entry.length / LOG_SECTOR) as usize) % sectors;
        if at == start || chain.len() >= sectors {
            break;
        }
    }
    chain
}

/// Bytes `[pos, pos + len)` of the circular log.
fn circular(log: &[u8], pos: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut at = pos as usize;
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(log.len() - at);
        out.extend_from_slice(&log[at..at + n]);
        left -= n;
        at = (at + n) % log.len();
    }
    out
}

/// The entry at `pos`, if it is valid (structure, GUID, CRC, descriptors,
/// data sectors).
fn parse_entry(
    log: &[u8],
    pos: u64,
    guid: Guid,
    budget: &mut u64,
) -> Result<Option<Parsed>, ImageError> {
    let Ok((header, _)) = LogEntryHeader::read_from_prefix(&log[pos as usize..]) else {
        return Ok(None);
    };
    let length = u64::from(header.entry_length.get());
    let count = u64::from(header.descriptor_count.get());
    let desc_sectors = descriptor_sectors(count);
    if &header.signature != LOG_SIGNATURE
        || header.log_guid != guid
        || header.sequence_number.get() == 0
        || length == 0
        || !length.is_multiple_of(LOG_SECTOR)
        || length > log.len() as u64
        || desc_sectors * LOG_SECTOR > length
    {
        return Ok(None);
    }
    *budget = budget.checked_sub(length).ok_or_else(|| {
        VhdxError::BadLog("too many overlapping would-be entries to search".into())
    })?;
    let bytes = circular(log, pos, length);
    if crc_with_hole(&bytes, LOG_CHECKSUM_AT) != stored_crc(&bytes, LOG_CHECKSUM_AT) {
        return Ok(None);
    }
    let seq = header.sequence_number.get();
    let mut data_sector = desc_sectors;
    for d in descriptors(&bytes, count) {
        let data = &d.signature == DATA_DESC_SIGNATURE;
        let zero = &d.signature == ZERO_DESC_SIGNATURE;
        if !(data || zero)
            || d.sequence_number.get() != seq
            || !d.file_offset.get().is_multiple_of(LOG_SECTOR)
            || (zero && !d.wide.get().is_multiple_of(LOG_SECTOR))
        {
            return Ok(None);
        }
        if data {
            let at = (data_sector * LOG_SECTOR) as usize;
            let Some(sector) = bytes.get(at..at + SECTOR) else {
                return Ok(None);
            };
            let high = u32::from_le_bytes([sector[4], sector[5], sector[6], sector[7]]);
            let low = u32::from_le_bytes([sector[4092], sector[4093], sector[4094], sector[4095]]);
            if &sector[..4] != DATA_SECTOR_SIGNATURE
                || (u64::from(high) << 32 | u64::from(low)) != seq
            {
                return Ok(None);
            }
            data_sector += 1;
        }
    }
    Ok(Some(Parsed {
        position: pos,
        length,
        header,
        bytes,
    }))
}

/// The descriptors of an entry (which holds at least their sectors).
fn descriptors(bytes: &[u8], count: u64) -> impl Iterator<Item = Descriptor> + '_ {
    (0..count as usize).filter_map(move |i| {
        let at = LOG_HEADER_SIZE + i * DESCRIPTOR_SIZE;
        Descriptor::read_from_prefix(bytes.get(at..)?)
            .ok()
            .map(|(d, _)| d)
    })
}

/// Turns the active sequence into changes, checking where they land.
fn build_replay(
    entries: &[&Parsed],
    file_len: u64,
    region: LogRegion,
) -> Result<Replay, ImageError> {
    let bad = |m: String| ImageError::from(VhdxError::BadLog(m));
    let mut replay = Replay {
        entries: entries.len(),
        first_sequence: entries
            .first()
            .map_or(0, |e| e.header.sequence_number.get()),
        last_sequence: entries.last().map_or(0, |e| e.header.sequence_number.get()),
        ..Replay::default()
    };
    let mut zeroed = 0u64;
    for e in entries {
        let seq = e.header.sequence_number.get();
        let flushed = e.header.flushed_file_offset.get();
        let last = e.header.last_file_offset.get();
        if flushed > file_len {
            return Err(bad(format!(
                "entry {seq} says the file was flushed at {flushed} bytes, but it has {file_len}: truncated or damaged"
            )));
        }
        if last > file_len.saturating_add(MAX_GROWTH) {
            return Err(bad(format!(
                "entry {seq} asks the file to grow to {last} bytes (it has {file_len})"
            )));
        }
        let limit = file_len.max(last);
        let count = u64::from(e.header.descriptor_count.get());
        let mut data_sector = descriptor_sectors(count) as usize;
        for d in descriptors(&e.bytes, count) {
            let offset = d.file_offset.get();
            let data = &d.signature == DATA_DESC_SIGNATURE;
            let len = if data { LOG_SECTOR } else { d.wide.get() };
            let end = offset.saturating_add(len);
            let in_log = offset < region.offset + region.length && region.offset < end;
            if offset < HEADER_SECTION || end > limit || in_log {
                return Err(bad(format!(
                    "entry {seq} writes {len} bytes at offset {offset}, outside the file's data area (file {limit} bytes, log at {}+{})",
                    region.offset, region.length
                )));
            }
            if data {
                let sector = &e.bytes[data_sector * SECTOR..][..SECTOR];
                let mut page = vec![0u8; SECTOR].into_boxed_slice();
                page[..8].copy_from_slice(&d.wide.get().to_le_bytes());
                page[8..4092].copy_from_slice(&sector[8..4092]);
                page[4092..].copy_from_slice(&d.word.get().to_le_bytes());
                replay.changes.push(Change::Page { offset, data: page });
                data_sector += 1;
            } else if len > 0 {
                zeroed += len;
                if zeroed > MAX_ZEROED {
                    return Err(bad(format!(
                        "the sequence zeroes more than {MAX_ZEROED} bytes"
                    )));
                }
                replay.changes.push(Change::Zero { offset, len });
            }
        }
        replay.last_file_offset = replay.last_file_offset.max(last);
    }
    Ok(replay)
}

impl Replay {
    /// Applies the changes to the file and grows it to the last file
    /// offset; the caller makes it durable.
    pub fn apply(&self, file: &IoFile) -> Result<(), ImageError> {
        let zeros = vec![0u8; 1 << 20];
        for change in &self.changes {
            match change {
                Change::Page { offset, data } => file.write_all_at(data, *offset)?,
                Change::Zero { offset, len } => {
                    let mut done = 0;
                    while done < *len {
                        let n = (len - done).min(zeros.len() as u64);
                        file.write_all_at(&zeros[..n as usize], offset + done)?;
                        done += n;
                    }
                }
            }
        }
        if file.len()? < self.last_file_offset {
            file.set_len(self.last_file_offset)?;
        }
        Ok(())
    }

    /// The replayed pages in memory, for a read-only open.
    pub fn overlay(&self) -> Result<Overlay, ImageError> {
        let mut pages: BTreeMap<u64, Option<Box<[u8]>>> = BTreeMap::new();
        let mut zeroed = 0u64;
        for change in &self.changes {
            match change {
                Change::Page { offset, data } => {
                    pages.insert(*offset, Some(data.clone()));
                }
                Change::Zero { offset, len } => {
                    zeroed += len;
                    if zeroed > MAX_OVERLAY_ZERO {
                        return Err(VhdxError::LogNeedsWrite(
                            "zeroes more than can be replayed in memory".into(),
                        )
                        .into());
                    }
                    for page in (0..len / LOG_SECTOR).map(|i| offset + i * LOG_SECTOR) {
                        pages.insert(page, None);
                    }
                }
            }
        }
        Ok(Overlay {
            pages,
            len: self.last_file_offset,
        })
    }
}

/// The file as the log would leave it, for reads of metadata by a
/// read-only open: replayed pages (None: zeros) over the file's bytes.
#[derive(Debug, Default)]
pub struct Overlay {
    pages: BTreeMap<u64, Option<Box<[u8]>>>,
    /// Length the replay would give the file (at least).
    len: u64,
}

impl Overlay {
    /// Byte ranges the overlay changes.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pages.keys().map(|&p| (p, LOG_SECTOR))
    }

    /// Length the file would have after the replay.
    pub fn file_len(&self, file_len: u64) -> u64 {
        file_len.max(self.len)
    }

    /// Reads `buf` at `offset` of the replayed file.
    pub fn read(&self, file: &IoFile, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let file_len = file.len()?;
        let end = offset + buf.len() as u64;
        let in_file = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if in_file > 0 {
            file.read_exact_at(&mut buf[..in_file], offset)?;
        }
        buf[in_file..].fill(0);
        let first = offset / LOG_SECTOR * LOG_SECTOR;
        for (&page, data) in self.pages.range(first..end) {
            let from = page.max(offset);
            let to = (page + LOG_SECTOR).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(from - page) as usize..(to - page) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }
}

/// Writes log entries for a read-write open.
#[derive(Debug)]
pub struct LogWriter {
    region: LogRegion,
    guid: Guid,
    /// Sequence number of the next entry.
    sequence: u64,
    /// Offset in the log of the next entry.
    position: u64,
}

impl LogWriter {
    /// A writer starting at the beginning of an (empty) log with `guid`.
    pub fn new(region: LogRegion, guid: Guid) -> LogWriter {
        LogWriter {
            region,
            guid,
            sequence: 1,
            position: 0,
        }
    }

    /// Pages one round may carry: a round takes at most half the log, so
    /// it never overwrites the round before it, which stays replayable
    /// until this one is complete.
    pub fn pages_per_round(&self) -> usize {
        let half = (self.region.length / 2 / LOG_SECTOR) as usize;
        let per_entry = FIRST_SECTOR_DESCRIPTORS + 1;
        (half / per_entry).max(1) * FIRST_SECTOR_DESCRIPTORS
    }

    /// Writes `pages` (4 KiB each, with their file offsets) as one round
    /// of entries whose tail is the round's first entry: everything logged
    /// before has been applied and made durable. `file_end` is the size of
    /// the file, durable, covering every structure the pages refer to.
    /// The caller fdatasyncs before applying the pages.
    pub fn write_round(
        &mut self,
        file: &IoFile,
        pages: &[(u64, &[u8])],
        file_end: u64,
    ) -> Result<(), ImageError> {
        let tail = self.position;
        let mut round = Vec::new();
        for chunk in pages.chunks(FIRST_SECTOR_DESCRIPTORS) {
            round.extend_from_slice(&self.entry(chunk, tail as u32, file_end));
            self.sequence += 1;
        }
        if round.len() as u64 > self.region.length / 2 {
            return Err(VhdxError::BadLog("round larger than half the log".into()).into());
        }
        // The round may wrap around the end of the log.
        let first = (self.region.length - self.position).min(round.len() as u64) as usize;
        file.write_all_at(&round[..first], self.region.offset + self.position)?;
        if first < round.len() {
            file.write_all_at(&round[first..], self.region.offset)?;
        }
        self.position = (self.position + round.len() as u64) % self.region.length;
        Ok(())
    }

    /// One entry: header and descriptors in one sector, then data sectors.
    fn entry(&self, pages: &[(u64, &[u8])], tail: u32, file_end: u64) -> Vec<u8> {
        let seq = self.sequence;
        let mut out = vec![0u8; (1 + pages.len()) * SECTOR];
        let header = LogEntryHeader {
            signature: *LOG_SIGNATURE,
            checksum: 0.into(),
            entry_length: (out.len() as u32).into(),
            tail: tail.into(),
            sequence_number: seq.into(),
            descriptor_count: (pages.len() as u32).into(),
            reserved: 0.into(),
            log_guid: self.guid,
            flushed_file_offset: file_end.into(),
            last_file_offset: file_end.into(),
        };
        out[..LOG_HEADER_SIZE].copy_from_slice(header.as_bytes());
        for (i, (offset, page)) in pages.iter().enumerate() {
            let desc = Descriptor {
                signature: *DATA_DESC_SIGNATURE,
                word: u32::from_le_bytes([page[4092], page[4093], page[4094], page[4095]]).into(),
                wide: u64::from_le_bytes(page[..8].try_into().unwrap_or([0; 8])).into(),
                file_offset: (*offset).into(),
                sequence_number: seq.into(),
            };
            let at = LOG_HEADER_SIZE + i * DESCRIPTOR_SIZE;
            out[at..at + DESCRIPTOR_SIZE].copy_from_slice(desc.as_bytes());
            let sector = &mut out[(1 + i) * SECTOR..][..SECTOR];
            sector[..4].copy_from_slice(DATA_SECTOR_SIGNATURE);
            sector[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
            sector[8..4092].copy_from_slice(&page[8..4092]);
            sector[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
        }
        seal_crc(&mut out, LOG_CHECKSUM_AT);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGION: LogRegion = LogRegion {
        offset: 1 << 20,
        length: 1 << 20,
    };

    fn page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; SECTOR];
        p[..8].copy_from_slice(b"LEADING!");
        p[4092..].copy_from_slice(b"TAIL");
        p
    }

    /// A log image with `rounds` written by the writer, into memory.
    fn write_log(rounds: &[Vec<(u64, Vec<u8>)>], start: u64, guid: Guid) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, vec![0u8; 3 << 20]).unwrap();
        let file = IoFile::open(&path, true, crate::CacheMode::Cached).unwrap();
        let mut w = LogWriter::new(REGION, guid);
        w.position = start;
        for r in rounds {
            let pages: Vec<(u64, &[u8])> = r.iter().map(|(o, p)| (*o, &p[..])).collect();
            w.write_round(&file, &pages, 3 << 20).unwrap();
        }
        let mut log = vec![0u8; REGION.length as usize];
        file.read_exact_at(&mut log, REGION.offset).unwrap();
        log
    }

    #[test]
    fn the_last_round_replays_byte_for_byte_even_across_the_wrap() {
        let guid = Guid::random().unwrap();
        let rounds = vec![
            vec![(2 << 20, page(1)), ((2 << 20) + 4096, page(2))],
            vec![(2 << 20, page(3))],
        ];
        // Start near the end so the second round wraps.
        let log = write_log(&rounds, REGION.length - 2 * 4096, guid);
        let replay = find_in(&log, guid, 3 << 20, REGION).unwrap().unwrap();
        assert_eq!(replay.entries, 1);
        assert_eq!(replay.last_sequence, 2);
        assert_eq!(
            replay.changes,
            [Change::Page {
                offset: 2 << 20,
                data: page(3).into_boxed_slice()
            }]
        );
        // Another GUID sees nothing to replay.
        let other = Guid::random().unwrap();
        assert!(find_in(&log, other, 3 << 20, REGION).unwrap().is_none());
    }

    #[test]
    fn a_torn_entry_falls_back_to_the_sequence_before_it() {
        let guid = Guid::random().unwrap();
        let rounds = vec![vec![(2 << 20, page(1))], vec![(2 << 20, page(2))]];
        let mut log = write_log(&rounds, 0, guid);
        // Tear the second entry's data sector.
        log[2 * SECTOR + 4096 + 100] ^= 0xff;
        let replay = find_in(&log, guid, 3 << 20, REGION).unwrap().unwrap();
        assert_eq!(replay.last_sequence, 1);
        assert_eq!(
            replay.changes,
            [Change::Page {
                offset: 2 << 20,
                data: page(1).into_boxed_slice()
            }]
        );
    }

    #[test]
    fn entries_pointing_outside_the_file_are_refused() {
        let guid = Guid::random().unwrap();
        let log = write_log(&[vec![(64 << 20, page(1))]], 0, guid);
        let err = find_in(&log, guid, 3 << 20, REGION).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let log = write_log(&[vec![(4096, page(1))]], 0, guid);
        assert!(find_in(&log, guid, 3 << 20, REGION).is_err());
        // A file shorter than an entry's flushed offset is damaged.
        let log = write_log(&[vec![(2 << 20, page(1))]], 0, guid);
        let err = find_in(&log, guid, 2 << 20, REGION).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
