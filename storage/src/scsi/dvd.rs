//! The MMC command set of a read-only virtual DVD drive (what Linux's sr
//! driver and udev's cdrom_id use), with media that can be ejected and
//! inserted while the guest runs.
//!
//! The drive ([`DvdDrive`]) is shared by every channel's worker; each
//! worker keeps a [`DvdSession`] that notices media changes through a
//! generation counter (one atomic load per command, no lock) and then
//! reports them once as a unit attention and a media event.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use vmbus::worker::lock;

use super::disk::{mode_data, no_sense, standard_inquiry};
use super::{
    BlockOp, Command, MediaInfo, Outcome, Sense, be16, check_transfer, opcode, respond, rw_lba,
};

/// MMC profile number of DVD-ROM media.
const PROFILE_DVD_ROM: u16 = 0x0010;

/// Media events (GET EVENT STATUS NOTIFICATION, media class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaEvent {
    NoChange = 0,
    EjectRequest = 1,
    NewMedia = 2,
    MediaRemoval = 3,
}

#[derive(Debug)]
struct DriveInner<M> {
    media: Option<(M, MediaInfo)>,
    locked: bool,
}

/// A DVD drive whose media the host can change at run time.
#[derive(Debug)]
pub struct DvdDrive<M> {
    inner: Mutex<DriveInner<M>>,
    generation: AtomicU64,
}

/// The guest locked the tray (PREVENT MEDIUM REMOVAL).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("medium removal is prevented by the guest")]
pub struct MediumLocked;

impl<M: Clone> DvdDrive<M> {
    pub fn new(media: Option<(M, MediaInfo)>) -> Self {
        DvdDrive {
            inner: Mutex::new(DriveInner {
                media,
                locked: false,
            }),
            generation: AtomicU64::new(1),
        }
    }

    /// Inserts media (replacing any); the guest sees a media change.
    pub fn insert(&self, media: M, info: MediaInfo) {
        let mut inner = lock(&self.inner);
        inner.media = Some((media, info));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Ejects the media. The host may force it; the guest may not while it
    /// holds the tray locked.
    pub fn eject(&self, force: bool) -> Result<(), MediumLocked> {
        let mut inner = lock(&self.inner);
        if inner.locked && !force {
            return Err(MediumLocked);
        }
        if inner.media.take().is_some() {
            self.generation.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }

    pub fn has_media(&self) -> bool {
        lock(&self.inner).media.is_some()
    }

    fn set_locked(&self, locked: bool) {
        lock(&self.inner).locked = locked;
    }

    fn is_locked(&self) -> bool {
        lock(&self.inner).locked
    }
}

/// One worker's view of a drive.
#[derive(Debug)]
pub struct DvdSession<M> {
    generation: u64,
    media: Option<(M, MediaInfo)>,
    event: MediaEvent,
    attention: bool,
}

impl<M: Clone> DvdSession<M> {
    /// A session that has seen the drive as it is now.
    pub fn new(drive: &DvdDrive<M>) -> Self {
        let inner = lock(&drive.inner);
        DvdSession {
            generation: drive.generation.load(Ordering::Acquire),
            media: inner.media.clone(),
            event: MediaEvent::NoChange,
            attention: false,
        }
    }

    /// Picks up a media change made since the last command.
    pub fn refresh(&mut self, drive: &DvdDrive<M>) {
        if drive.generation.load(Ordering::Acquire) == self.generation {
            return;
        }
        let inner = lock(&drive.inner);
        self.generation = drive.generation.load(Ordering::Acquire);
        self.media = inner.media.clone();
        self.event = if self.media.is_some() {
            MediaEvent::NewMedia
        } else {
            MediaEvent::MediaRemoval
        };
        self.attention = self.media.is_some();
    }

    /// The media this session reads from.
    pub fn media(&self) -> Option<&M> {
        self.media.as_ref().map(|(m, _)| m)
    }

    fn info(&self) -> Option<&MediaInfo> {
        self.media.as_ref().map(|(_, i)| i)
    }
}

/// DVD command handling.
#[derive(Debug, Clone, Copy, Default)]
pub struct DvdTarget;

impl DvdTarget {
    /// Executes one CDB for this session; response data goes to `out`.
    pub fn execute<M: Clone>(
        &self,
        drive: &DvdDrive<M>,
        session: &mut DvdSession<M>,
        cmd: &Command<'_>,
        out: &mut [u8],
    ) -> Outcome {
        session.refresh(drive);
        let cdb = cmd.cdb;
        match cdb[0] {
            opcode::INQUIRY => inquiry(cdb, out),
            opcode::REQUEST_SENSE => respond(out, &no_sense()),
            opcode::GET_CONFIGURATION => get_configuration(cdb, session.info().is_some(), out),
            opcode::GET_EVENT_STATUS_NOTIFICATION => event_status(cdb, session, out),
            opcode::MODE_SENSE_10 | opcode::MODE_SENSE_6 => mode_sense(cdb, out),
            opcode::MECHANISM_STATUS => respond(out, &[0u8; 8]),
            opcode::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                drive.set_locked(cdb[4] & 1 != 0);
                Outcome::Good
            }
            opcode::START_STOP_UNIT => start_stop(cdb, drive, session),
            opcode::SET_CD_SPEED | opcode::SYNCHRONIZE_CACHE_10 => Outcome::Good,
            opcode::WRITE_6
            | opcode::WRITE_10
            | opcode::WRITE_12
            | opcode::WRITE_16
            | opcode::WRITE_SAME_10
            | opcode::WRITE_SAME_16
            | opcode::UNMAP
            | opcode::MODE_SELECT_10 => Outcome::Check(Sense::WRITE_PROTECTED),
            opcode::TEST_UNIT_READY => {
                media_check(session).map_or_else(Outcome::Check, |_| Outcome::Good)
            }
            opcode::READ_CAPACITY_10 => with_media(session, |m| read_capacity(m, out)),
            opcode::READ_TOC => with_media(session, |m| read_toc(cdb, m, out)),
            opcode::READ_DISC_INFORMATION => with_media(session, |_| disc_information(out)),
            opcode::READ_10 | opcode::READ_12 => with_media(session, |m| read(cmd, m)),
            _ => Outcome::Check(Sense::INVALID_COMMAND),
        }
    }
}

/// NOT READY without media; a pending change is reported once first.
fn media_check<M>(session: &mut DvdSession<M>) -> Result<&MediaInfo, Sense> {
    if session.attention {
        session.attention = false;
        return Err(Sense::MEDIUM_MAY_HAVE_CHANGED);
    }
    session
        .media
        .as_ref()
        .map(|(_, i)| i)
        .ok_or(Sense::MEDIUM_NOT_PRESENT)
}

fn with_media<M>(session: &mut DvdSession<M>, f: impl FnOnce(&MediaInfo) -> Outcome) -> Outcome {
    match media_check(session) {
        Ok(info) => {
            let info = info.clone();
            f(&info)
        }
        Err(s) => Outcome::Check(s),
    }
}

fn inquiry(cdb: &[u8], out: &mut [u8]) -> Outcome {
    if cdb[1] & 1 == 0 {
        if cdb[2] != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        return respond(out, &standard_inquiry(0x05, true, "Virtual DVD-ROM"));
    }
    match cdb[2] {
        // Supported VPD pages: only this list. Byte 0 is the peripheral type
        // (05h, CD/DVD), byte 1 the page code Linux checks.
        0x00 => respond(out, &[0x05, 0x00, 0x00, 0x01, 0x00]),
        _ => Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
    }
}

fn read(cmd: &Command<'_>, media: &MediaInfo) -> Outcome {
    let (lba, blocks) = rw_lba(cmd.cdb);
    if let Err(s) = check_transfer(media, lba, blocks, cmd.data_len) {
        return Outcome::Check(s);
    }
    if blocks == 0 {
        return Outcome::Good;
    }
    Outcome::Io {
        op: BlockOp::Read,
        lba,
        blocks,
    }
}

fn read_capacity(media: &MediaInfo, out: &mut [u8]) -> Outcome {
    let mut d = [0u8; 8];
    let last = media.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
    d[..4].copy_from_slice(&last.to_be_bytes());
    d[4..].copy_from_slice(&media.block_size.to_be_bytes());
    respond(out, &d)
}

/// LBA to MSF address bytes (0, M, S, F), with the 2-second lead-in;
/// addresses past the largest MSF (255:59:74) are that address.
fn msf(lba: u64) -> [u8; 4] {
    const MAX_FRAMES: u64 = (255 * 60 + 59) * 75 + 74;
    let frames = lba.saturating_add(150).min(MAX_FRAMES);
    let m = (frames / (60 * 75)) as u8;
    let s = ((frames / 75) % 60) as u8;
    let f = (frames % 75) as u8;
    [0, m, s, f]
}

fn toc_address(lba: u64, use_msf: bool) -> [u8; 4] {
    if use_msf {
        msf(lba)
    } else {
        (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes()
    }
}

fn read_toc(cdb: &[u8], media: &MediaInfo, out: &mut [u8]) -> Outcome {
    let use_msf = cdb[1] & 0x02 != 0;
    let format = match cdb[2] & 0x0f {
        0 => cdb[9] >> 6, // old drives put the format in the control byte
        f => f,
    };
    let track = cdb[6];
    let mut d = vec![0u8, 0, 1, 1];
    match format {
        0 => {
            if track > 1 && track != 0xaa {
                return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            if track <= 1 {
                d.extend_from_slice(&[0, 0x14, 1, 0]);
                d.extend_from_slice(&toc_address(0, use_msf));
            }
            d.extend_from_slice(&[0, 0x14, 0xaa, 0]);
            d.extend_from_slice(&toc_address(media.blocks, use_msf));
        }
        1 => {
            // Session information: one session starting at track 1.
            d.extend_from_slice(&[0, 0x14, 1, 0]);
            d.extend_from_slice(&toc_address(0, use_msf));
        }
        _ => return Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
    }
    let len = (d.len() - 2) as u16;
    d[..2].copy_from_slice(&len.to_be_bytes());
    respond(out, &d)
}

fn disc_information(out: &mut [u8]) -> Outcome {
    let mut d = [0u8; 34];
    d[1] = 32;
    d[2] = 0x0e; // last session complete, disc complete, not erasable
    d[3] = 1; // first track on disc
    d[4] = 1; // sessions
    d[5] = 1; // first track in last session
    d[6] = 1; // last track in last session
    respond(out, &d)
}

fn start_stop<M: Clone>(cdb: &[u8], drive: &DvdDrive<M>, session: &mut DvdSession<M>) -> Outcome {
    let load_eject = cdb[4] & 0x02 != 0;
    let start = cdb[4] & 0x01 != 0;
    if !load_eject || start {
        return Outcome::Good;
    }
    if drive.is_locked() {
        return Outcome::Check(Sense::MEDIUM_REMOVAL_PREVENTED);
    }
    let _ = drive.eject(false);
    session.refresh(drive);
    // The guest asked for it: no unit attention for its own eject.
    session.attention = false;
    Outcome::Good
}

fn event_status<M>(cdb: &[u8], session: &mut DvdSession<M>, out: &mut [u8]) -> Outcome {
    if cdb[1] & 1 == 0 {
        // Only polled operation is supported.
        return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
    }
    const MEDIA_CLASS: u8 = 0x10;
    if cdb[4] & MEDIA_CLASS == 0 {
        // No event of a requested class: NEA set, no descriptor.
        return respond(out, &[0, 2, 0x80, MEDIA_CLASS]);
    }
    let event = std::mem::replace(&mut session.event, MediaEvent::NoChange);
    let present = session.media.is_some();
    let d = [
        0,
        6,
        0x04,
        MEDIA_CLASS,
        event as u8,
        if present { 0x02 } else { 0 },
        0,
        0,
    ];
    respond(out, &d)
}

fn get_configuration(cdb: &[u8], present: bool, out: &mut [u8]) -> Outcome {
    let rt = cdb[1] & 0x03;
    let start = be16(cdb, 2);
    if rt == 3 {
        return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
    }
    let current = if present { 0x01 } else { 0x00 };
    // (feature code, persistent, body). MMC: a persistent feature is
    // always current; the media-dependent ones are current with media.
    let features: [(u16, bool, Vec<u8>); 6] = [
        (
            0x0000,
            true,
            vec![
                (PROFILE_DVD_ROM >> 8) as u8,
                PROFILE_DVD_ROM as u8,
                current,
                0,
            ],
        ),
        (0x0001, true, vec![0, 0, 0, 0x01, 0, 0, 0, 0]), // core: SCSI family
        (0x0002, true, vec![0, 0, 0, 0]),                // morphing
        (0x0003, true, vec![0x29, 0, 0, 0]),             // removable: tray, eject, lock
        (0x0010, false, vec![0, 0, 0x08, 0, 0, 1, 0, 0]), // random readable, 2048
        (0x001f, false, vec![0, 0, 0, 0]),               // DVD read
    ];
    let mut d = vec![0u8; 8];
    if present {
        d[6..8].copy_from_slice(&PROFILE_DVD_ROM.to_be_bytes());
    }
    for (code, persistent, body) in &features {
        let is_current = *persistent || present;
        let wanted = match rt {
            0 => *code >= start,
            1 => *code >= start && is_current,
            _ => *code == start,
        };
        if !wanted {
            continue;
        }
        let version_flags = u8::from(*persistent) << 1 | u8::from(is_current);
        d.extend_from_slice(&code.to_be_bytes());
        d.push(version_flags);
        d.push(body.len() as u8);
        d.extend_from_slice(body);
    }
    let len = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&len.to_be_bytes());
    respond(out, &d)
}

fn mode_sense(cdb: &[u8], out: &mut [u8]) -> Outcome {
    let ten = cdb[0] == opcode::MODE_SENSE_10;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    if pc == 3 {
        return Outcome::Check(Sense::SAVING_NOT_SUPPORTED);
    }
    if page != 0x2a && page != 0x3f {
        return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
    }
    let mut p = [0u8; 28];
    if pc != 1 {
        p[0] = 0x2a;
        p[1] = 26;
        p[2] = 0x08; // reads DVD-ROM
        p[4] = 0x71; // audio play, mode 2 form 1, mode 2 form 2, multi-session
        p[5] = 0x00;
        p[6] = 0x29; // tray loading, eject, lock
        p[8..10].copy_from_slice(&(8 * 176u16).to_be_bytes()); // max read speed, KB/s
        p[10..12].copy_from_slice(&256u16.to_be_bytes()); // volume levels
        p[12..14].copy_from_slice(&2048u16.to_be_bytes()); // buffer size, KB
        p[14..16].copy_from_slice(&(8 * 176u16).to_be_bytes()); // current read speed
    } else {
        p[0] = 0x2a;
        p[1] = 26;
    }
    respond(out, &mode_data(ten, 0, &[], &p))
}

#[cfg(test)]
mod tests;
