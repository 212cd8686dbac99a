//! The fuzz harness of the client's reply decoder, shared by the cargo-fuzz
//! target `nbd_client_reply` (in `vhd/fuzz`) and the proptests: arbitrary
//! server bytes against a table of requests in flight. It must return (any
//! error is fine) and never panic, read outside a request's buffer, or
//! complete a request twice.

use super::reply::{Coverage, Decoder, Expect, Source, Table};
use super::wire::{BlockDescriptor, cmd};
use std::io;

/// A request of the fake table: what was asked and its data buffer.
struct Pending {
    expect: Expect,
    buf: Vec<u8>,
    coverage: Coverage,
    failed: bool,
    done: bool,
}

/// The requests a fuzzed server answers (cookies 1..=6).
struct FakeTable {
    pending: Vec<Pending>,
}

impl FakeTable {
    fn new() -> FakeTable {
        let req = |command, offset, length: u32| Pending {
            expect: Expect {
                command,
                offset,
                length,
            },
            buf: vec![0xee; length as usize],
            coverage: Coverage::default(),
            failed: false,
            done: false,
        };
        FakeTable {
            pending: vec![
                req(cmd::READ, 0, 4096),
                req(cmd::READ, 1 << 20, 512),
                req(cmd::WRITE, 4096, 8192),
                req(cmd::BLOCK_STATUS, 0, 1 << 20),
                req(cmd::FLUSH, 0, 0),
                req(cmd::READ, 512, 0),
            ],
        }
    }

    fn get(&mut self, cookie: u64) -> Option<&mut Pending> {
        let i = usize::try_from(cookie.checked_sub(1)?).ok()?;
        self.pending.get_mut(i).filter(|p| !p.done)
    }
}

impl Table for FakeTable {
    fn expect(&self, cookie: u64) -> Option<Expect> {
        let i = usize::try_from(cookie.checked_sub(1)?).ok()?;
        self.pending.get(i).filter(|p| !p.done).map(|p| p.expect)
    }

    fn content(&mut self, cookie: u64, at: u64, len: u64) -> Result<(), String> {
        let p = self.get(cookie).ok_or("not in flight")?;
        assert!(
            at + len <= p.buf.len() as u64,
            "decoder passed a chunk outside the request"
        );
        p.coverage.add(at, len)
    }

    fn receive(
        &mut self,
        cookie: u64,
        src: &mut dyn Source,
        at: u64,
        len: u64,
    ) -> io::Result<usize> {
        let p = self
            .get(cookie)
            .ok_or_else(|| io::Error::other("not in flight"))?;
        let dest = &mut p.buf[at as usize..(at + len) as usize];
        let iov = [libc::iovec {
            iov_base: dest.as_mut_ptr().cast(),
            iov_len: dest.len(),
        }];
        // SAFETY: the iovec covers `dest`, borrowed mutably here.
        unsafe { src.recv(&iov) }
    }

    fn zero(&mut self, cookie: u64, at: u64, len: u64) {
        if let Some(p) = self.get(cookie) {
            p.buf[at as usize..(at + len) as usize].fill(0);
        }
    }

    fn extents(&mut self, _cookie: u64, _context: u32, descriptors: &[BlockDescriptor]) {
        assert!(!descriptors.is_empty());
    }

    fn fail(&mut self, cookie: u64, _error: u32, _message: &str) {
        if let Some(p) = self.get(cookie) {
            p.failed = true;
        }
    }

    /// As the client's table: a successful READ must be covered.
    fn done(&mut self, cookie: u64) -> Result<(), String> {
        let p = self.get(cookie).ok_or("completed twice")?;
        if !p.failed && p.expect.command == cmd::READ && !p.coverage.complete(p.expect.length) {
            return Err("READ reply ended before covering the request".into());
        }
        p.done = true;
        Ok(())
    }
}

/// Serves the input a few bytes at a time (the first byte picks how many).
struct SliceSource<'a> {
    data: &'a [u8],
    step: usize,
}

impl Source for SliceSource<'_> {
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut done = 0;
        for v in iov {
            let n = v.iov_len.min(self.data.len()).min(self.step - done);
            // SAFETY: the caller guarantees `v` is writable for its length;
            // `n` is within both it and `data`.
            unsafe { std::ptr::copy_nonoverlapping(self.data.as_ptr(), v.iov_base.cast(), n) };
            self.data = &self.data[n..];
            done += n;
            if done == self.step || self.data.is_empty() {
                break;
            }
        }
        Ok(done)
    }
}

/// Decodes `data` as a server's reply stream.
pub fn client_replies(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::new(first & 0x80 != 0);
    let mut table = FakeTable::new();
    let mut src = SliceSource {
        data: rest,
        step: usize::from(first & 0x7f).max(1),
    };
    let _ = decoder.run(&mut src, &mut table);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::{ChunkHeader, SimpleReply, chunk, reply_flag};
    use zerocopy::IntoBytes;

    /// A structured READ reply (data in two chunks and a hole) then a
    /// simple FLUSH reply decode into the table.
    #[test]
    fn decodes_interleaved_replies() {
        let mut stream = vec![0x80 | 7];
        let data_chunk = |cookie, offset: u64, data: &[u8], flags| {
            let mut out =
                ChunkHeader::new(cookie, flags, chunk::OFFSET_DATA, 8 + data.len() as u32)
                    .as_bytes()
                    .to_vec();
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(data);
            out
        };
        stream.extend(data_chunk(1, 0, &[1; 1024], 0));
        stream.extend(SimpleReply::new(5, 0).as_bytes());
        stream.extend(ChunkHeader::new(1, 0, chunk::OFFSET_HOLE, 12).as_bytes());
        stream.extend(1024u64.to_be_bytes());
        stream.extend(1024u32.to_be_bytes());
        stream.extend(data_chunk(1, 2048, &[2; 2048], reply_flag::DONE));
        let mut decoder = Decoder::new(true);
        let mut table = FakeTable::new();
        let mut src = SliceSource {
            data: &stream[1..],
            step: 7,
        };
        decoder.run(&mut src, &mut table).unwrap();
        assert!(decoder.idle());
        assert!(table.pending[0].done && table.pending[4].done);
        let buf = &table.pending[0].buf;
        assert!(buf[..1024].iter().all(|&b| b == 1));
        assert!(buf[1024..2048].iter().all(|&b| b == 0));
        assert!(buf[2048..].iter().all(|&b| b == 2));
    }

    #[test]
    fn refuses_what_a_malicious_server_sends() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "bad magic",
                vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            ),
            (
                "unknown cookie",
                SimpleReply::new(99, 0).as_bytes().to_vec(),
            ),
            (
                "oversized data chunk",
                ChunkHeader::new(2, 0, chunk::OFFSET_DATA, 8 + 4096)
                    .as_bytes()
                    .to_vec(),
            ),
            (
                "data chunk for a write",
                ChunkHeader::new(3, 0, chunk::OFFSET_DATA, 16)
                    .as_bytes()
                    .to_vec(),
            ),
            (
                "unknown chunk type",
                ChunkHeader::new(1, 0, 77, 0).as_bytes().to_vec(),
            ),
            (
                "huge error chunk",
                ChunkHeader::new(1, 0, chunk::ERROR, u32::MAX)
                    .as_bytes()
                    .to_vec(),
            ),
            (
                "simple reply to a structured read",
                SimpleReply::new(1, 0).as_bytes().to_vec(),
            ),
            (
                "done before the read is covered",
                ChunkHeader::new(1, reply_flag::DONE, chunk::NONE, 0)
                    .as_bytes()
                    .to_vec(),
            ),
        ];
        for (what, bytes) in cases {
            let mut decoder = Decoder::new(true);
            let mut table = FakeTable::new();
            let mut src = SliceSource {
                data: &bytes,
                step: 64,
            };
            let err = decoder.run(&mut src, &mut table).expect_err(what);
            assert!(
                matches!(err, super::super::reply::DecodeError::Protocol(_)),
                "{what}: {err}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_replies_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            client_replies(&data);
        }
    }
}
