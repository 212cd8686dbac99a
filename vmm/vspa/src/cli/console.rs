//! The interactive serial console of `vspa run`: standard input to the
//! guest's COM1.
//!
//! On a terminal the console is raw (no local echo or line editing: the
//! guest echoes, and Ctrl-C goes to the guest), restored when `vspa run`
//! ends, and Ctrl-A x stops the VM (Ctrl-A Ctrl-A sends one Ctrl-A), as in
//! QEMU. Input that is not a terminal (a pipe, a file) is passed through
//! unchanged.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};

/// The escape byte: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// What the console does with the bytes it reads.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes to the guest.
    Send(Vec<u8>),
    /// Send these bytes, then stop the VM.
    Quit(Vec<u8>),
}

/// Ctrl-A sequences in the input stream, across reads.
#[derive(Debug, Default)]
pub struct Escapes {
    pending: bool,
}

impl Escapes {
    /// Splits `input` into what goes to the guest and whether to quit.
    pub fn feed(&mut self, input: &[u8]) -> Action {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if !self.pending {
                if b == ESCAPE {
                    self.pending = true;
                } else {
                    out.push(b);
                }
                continue;
            }
            self.pending = false;
            match b {
                b'x' | b'X' => return Action::Quit(out),
                ESCAPE => out.push(ESCAPE),
                // Unknown sequences are dropped, as QEMU does.
                _ => {}
            }
        }
        Action::Send(out)
    }
}

/// A terminal in raw mode; its settings come back on drop.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts `fd` into raw mode if it is a terminal (None if it is not).
    #[allow(unsafe_code)]
    pub fn enter(fd: &impl AsRawFd) -> io::Result<Option<RawTerminal>> {
        let fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for an open fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the VMM's own messages stay readable.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: `raw` is a valid termios; the call only reads it.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawTerminal { fd, saved }))
    }
}

impl Drop for RawTerminal {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: restores settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Standard input with Ctrl-A handling: at Ctrl-A x, the bytes before it
/// are still returned, then `quit` is called and reads end (EOF).
pub struct EscapedInput<R, F> {
    inner: R,
    escapes: Escapes,
    quit: Option<F>,
    /// Ctrl-A x seen: EOF once `buffered` is handed out.
    quitting: bool,
    /// Bytes decoded but not yet returned.
    buffered: Vec<u8>,
}

impl<R: Read, F: FnOnce()> EscapedInput<R, F> {
    pub fn new(inner: R, quit: F) -> Self {
        EscapedInput {
            inner,
            escapes: Escapes::default(),
            quit: Some(quit),
            quitting: false,
            buffered: Vec::new(),
        }
    }
}

impl<R: Read, F: FnOnce()> Read for EscapedInput<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.buffered.is_empty() {
                let n = buf.len().min(self.buffered.len());
                buf[..n].copy_from_slice(&self.buffered[..n]);
                self.buffered.drain(..n);
                return Ok(n);
            }
            if self.quitting {
                // What came before Ctrl-A x has been handed out.
                if let Some(quit) = self.quit.take() {
                    quit();
                }
                return Ok(0);
            }
            let mut raw = [0u8; 256];
            let n = self.inner.read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            match self.escapes.feed(&raw[..n]) {
                Action::Send(bytes) => self.buffered = bytes,
                Action::Quit(bytes) => {
                    self.buffered = bytes;
                    self.quitting = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_split_across_reads() {
        let mut e = Escapes::default();
        assert_eq!(e.feed(b"ls\r"), Action::Send(b"ls\r".to_vec()));
        assert_eq!(e.feed(b"a\x01"), Action::Send(b"a".to_vec()));
        assert_eq!(e.feed(b"\x01b"), Action::Send(b"\x01b".to_vec()));
        assert_eq!(e.feed(b"\x01?c"), Action::Send(b"c".to_vec()));
        assert_eq!(
            e.feed(b"\x03"),
            Action::Send(vec![3]),
            "Ctrl-C to the guest"
        );
        assert_eq!(e.feed(b"bye\x01"), Action::Send(b"bye".to_vec()));
        assert_eq!(e.feed(b"xjunk"), Action::Quit(Vec::new()));
    }

    #[test]
    fn escaped_input_ends_at_ctrl_a_x() {
        let mut quit = false;
        let mut input = EscapedInput::new(&b"echo hi\r\x01\x01\x01xignored"[..], || quit = true);
        let mut got = Vec::new();
        input.read_to_end(&mut got).unwrap();
        drop(input);
        assert_eq!(got, b"echo hi\r\x01");
        assert!(quit);
    }
}
