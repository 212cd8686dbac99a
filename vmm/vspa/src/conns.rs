//! Timeouts of the control-plane servers' connections (the control API,
//! metrics): each request bounded in total time ([`Deadline`]). The
//! connections themselves are served by `vspa_threads::conns`. None of
//! this is on the data path.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A connected stream whose reads and writes can be timed.
pub trait Timed: vspa_threads::conns::Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

/// Both socket types have the same calls under the same names.
macro_rules! timed {
    ($t:ty) => {
        impl Timed for $t {
            fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, t)
            }
            fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_write_timeout(self, t)
            }
        }
    };
}
timed!(UnixStream);
timed!(TcpStream);

/// A connection whose request must arrive by a deadline: bounds the
/// request's total time, not only each read (a client sending a byte
/// every few seconds never trips a per-read timeout). Each write of the
/// answer gets the whole limit.
#[derive(Debug)]
pub struct Deadline<'a, S> {
    stream: &'a S,
    until: Instant,
}

impl<'a, S: Timed> Deadline<'a, S> {
    pub fn start(stream: &'a S, limit: Duration) -> io::Result<Self> {
        stream.set_write_timeout(Some(limit))?;
        Ok(Deadline {
            stream,
            until: Instant::now() + limit,
        })
    }
}

impl<S: Timed> Read for Deadline<'_, S>
where
    for<'b> &'b S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

impl<S> Write for Deadline<'_, S>
where
    for<'b> &'b S: Write,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.stream).flush()
    }
}
