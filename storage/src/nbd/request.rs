//! Checking one transmission request against the export and what was
//! negotiated: a pure function of the 28-byte header, so the server's
//! request parser can be fuzzed on its own. The verdict says what to run,
//! which NBD error to answer (the spec's choice of EINVAL, EPERM, ENOSPC,
//! EOVERFLOW), or that the stream cannot be trusted any more.

use vhd::nbd::wire::{MAX_PAYLOAD, REQUEST_MAGIC, RequestHeader, cmd, cmd_flag, errno};

/// What a request may do on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Minimum block size (offsets and lengths are multiples of it).
    pub block: u32,
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub allocation: bool,
    /// The device can discard (TRIM is advertised).
    pub trim: bool,
}

/// A request to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    /// A range already rounded inward to whole blocks (may be empty).
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    /// A range rounded outward to whole blocks, inside the export.
    Cache {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    Disconnect,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Run(Action),
    /// Answer with NBD error `errno` after discarding `payload` bytes of
    /// WRITE data.
    Refuse {
        errno: u32,
        payload: u32,
    },
    /// The stream cannot be parsed on (or would cost too much): answer
    /// `errno` if given, then disconnect.
    Drop {
        errno: Option<u32>,
        why: String,
    },
}

/// Flags each command accepts (FUA is valid on every command).
fn allowed_flags(command: u16, structured: bool) -> u16 {
    let extra = match command {
        cmd::READ if structured => cmd_flag::DF,
        cmd::WRITE_ZEROES => cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmd_flag::REQ_ONE,
        _ => 0,
    };
    cmd_flag::FUA | extra
}

/// Checks one request header.
pub fn check(h: &RequestHeader, limits: &Limits) -> Verdict {
    if h.magic.get() != REQUEST_MAGIC {
        return Verdict::Drop {
            errno: None,
            why: format!("bad request magic {:#010x}", h.magic.get()),
        };
    }
    let (command, flags) = (h.command.get(), h.flags.get());
    let (offset, length) = (h.offset.get(), h.length.get());
    let payload = if command == cmd::WRITE { length } else { 0 };
    if payload > MAX_PAYLOAD {
        return Verdict::Drop {
            errno: Some(errno::EOVERFLOW),
            why: format!("WRITE of {length} bytes exceeds the 32 MiB maximum payload"),
        };
    }
    let refuse = |errno| Verdict::Refuse { errno, payload };
    if command == cmd::DISC {
        return Verdict::Run(Action::Disconnect);
    }
    if !matches!(
        command,
        cmd::READ
            | cmd::WRITE
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
    ) {
        return refuse(errno::EINVAL);
    }
    if flags & !allowed_flags(command, limits.structured) != 0 {
        return refuse(errno::EINVAL);
    }
    let fua = flags & cmd_flag::FUA != 0;
    let block = u64::from(limits.block.max(1));
    let end = offset.checked_add(u64::from(length));
    let in_range = end.is_some_and(|end| end <= limits.size);
    let aligned = offset % block == 0 && u64::from(length) % block == 0;
    let writes = matches!(command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && limits.read_only {
        return refuse(errno::EPERM);
    }
    let action = match command {
        cmd::READ if length > MAX_PAYLOAD => {
            return refuse(if limits.structured {
                errno::EOVERFLOW
            } else {
                errno::EINVAL
            });
        }
        cmd::READ if !in_range || !aligned => return refuse(errno::EINVAL),
        cmd::READ => Action::Read { offset, length },
        cmd::WRITE | cmd::WRITE_ZEROES if !in_range => return refuse(errno::ENOSPC),
        cmd::WRITE | cmd::WRITE_ZEROES if !aligned => return refuse(errno::EINVAL),
        cmd::WRITE => Action::Write {
            offset,
            length,
            fua,
        },
        cmd::WRITE_ZEROES => Action::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: flags & cmd_flag::NO_HOLE != 0,
            fast: flags & cmd_flag::FAST_ZERO != 0,
        },
        cmd::FLUSH if offset != 0 || length != 0 => return refuse(errno::EINVAL),
        cmd::FLUSH => Action::Flush,
        cmd::TRIM if !limits.trim || !in_range => return refuse(errno::EINVAL),
        cmd::TRIM => {
            // Advisory: only whole blocks inside the range are discarded.
            let start = offset.next_multiple_of(block);
            let stop = (offset + u64::from(length)) / block * block;
            Action::Trim {
                offset: start,
                length: stop.saturating_sub(start) as u32,
                fua,
            }
        }
        cmd::CACHE if !in_range => return refuse(errno::EINVAL),
        cmd::CACHE => {
            let start = offset / block * block;
            let stop = (offset + u64::from(length))
                .next_multiple_of(block)
                .min(limits.size);
            Action::Cache {
                offset: start,
                length: u32::try_from(stop.saturating_sub(start)).unwrap_or(u32::MAX),
            }
        }
        _ if !limits.allocation || !limits.structured => return refuse(errno::EINVAL),
        _ if !in_range || offset % block != 0 || length == 0 => return refuse(errno::EINVAL),
        // The length is a hint: whole blocks, inside the export.
        _ => Action::BlockStatus {
            offset,
            length: u32::try_from(
                (offset + u64::from(length))
                    .next_multiple_of(block)
                    .min(limits.size)
                    - offset,
            )
            .unwrap_or(u32::MAX / limits.block.max(1) * limits.block.max(1)),
            req_one: flags & cmd_flag::REQ_ONE != 0,
        },
    };
    Verdict::Run(action)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        block: 512,
        read_only: false,
        structured: true,
        allocation: true,
        trim: true,
    };

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader::new(command, flags, 1, offset, length)
    }

    #[test]
    fn good_requests_run() {
        let cases = [
            (
                req(cmd::READ, 0, 0, 4096),
                Action::Read {
                    offset: 0,
                    length: 4096,
                },
            ),
            (
                req(cmd::WRITE, cmd_flag::FUA, 512, 512),
                Action::Write {
                    offset: 512,
                    length: 512,
                    fua: true,
                },
            ),
            (req(cmd::FLUSH, 0, 0, 0), Action::Flush),
            (
                req(cmd::TRIM, 0, 100, 1500),
                Action::Trim {
                    offset: 512,
                    length: 1024,
                    fua: false,
                },
            ),
            (
                req(cmd::CACHE, 0, 100, 100),
                Action::Cache {
                    offset: 0,
                    length: 512,
                },
            ),
            (
                req(cmd::BLOCK_STATUS, cmd_flag::REQ_ONE, 0, 1 << 20),
                Action::BlockStatus {
                    offset: 0,
                    length: 1 << 20,
                    req_one: true,
                },
            ),
            (req(cmd::DISC, 0, 0, 0), Action::Disconnect),
        ];
        for (h, want) in cases {
            assert_eq!(check(&h, &LIMITS), Verdict::Run(want), "{h:?}");
        }
    }

    #[test]
    fn bad_requests_get_the_spec_errors() {
        let refuse = |errno, payload| Verdict::Refuse { errno, payload };
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        let simple = Limits {
            structured: false,
            ..LIMITS
        };
        let cases = [
            (
                req(cmd::READ, 0, 1 << 20, 512),
                LIMITS,
                refuse(errno::EINVAL, 0),
            ),
            (
                req(cmd::READ, 0, 100, 512),
                LIMITS,
                refuse(errno::EINVAL, 0),
            ),
            (
                req(cmd::READ, 0, 0, u32::MAX),
                LIMITS,
                refuse(errno::EOVERFLOW, 0),
            ),
            (
                req(cmd::READ, 0, 0, u32::MAX),
                simple,
                refuse(errno::EINVAL, 0),
            ),
            (
                req(cmd::READ, cmd_flag::DF, 0, 512),
                simple,
                refuse(errno::EINVAL, 0),
            ),
            (
                req(cmd::READ, 0, u64::MAX, 512),
                LIMITS,
                refuse(errno::EINVAL, 0),
            ),
            (
                req(cmd::WRITE, 0, 1 << 20, 512),
                LIMITS,
                refuse(errno::ENOSPC, 512),
            ),
            (req(cmd::WRITE, 0, 0, 512), ro, refuse(errno::EPERM, 512)),
            (
                req(cmd::WRITE, cmd_flag::REQ_ONE, 0, 512),
                LIMITS,
                refuse(errno::EINVAL, 512),
            ),
            (req(cmd::TRIM, 0, 0, 512), ro, refuse(errno::EPERM, 0)),
            (
                req(cmd::WRITE_ZEROES, 0, 1 << 20, 512),
                LIMITS,
                refuse(errno::ENOSPC, 0),
            ),
            (req(cmd::FLUSH, 0, 0, 512), LIMITS, refuse(errno::EINVAL, 0)),
            (
                req(cmd::BLOCK_STATUS, 0, 0, 512),
                simple,
                refuse(errno::EINVAL, 0),
            ),
            (
                req(cmd::BLOCK_STATUS, 0, 0, 0),
                LIMITS,
                refuse(errno::EINVAL, 0),
            ),
            (req(42, 0, 0, 0), LIMITS, refuse(errno::EINVAL, 0)),
        ];
        for (h, limits, want) in cases {
            assert_eq!(check(&h, &limits), want, "{h:?}");
        }
        let mut bad = req(cmd::READ, 0, 0, 512);
        bad.magic = 0x1256_0953.into();
        assert!(matches!(
            check(&bad, &LIMITS),
            Verdict::Drop { errno: None, .. }
        ));
        assert!(matches!(
            check(&req(cmd::WRITE, 0, 0, MAX_PAYLOAD + 512), &LIMITS),
            Verdict::Drop {
                errno: Some(errno::EOVERFLOW),
                ..
            }
        ));
    }
}
