//! [`Stream`]: one NBD socket (TCP or Unix), for both ends of the protocol.
//! Blocking reads and writes with deadlines for the handshake; vectored
//! non-blocking sends and receives (straight from and into request memory)
//! for the transmission phase. Sends never raise SIGPIPE.

use super::uri::Endpoint;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connected stream socket.
#[derive(Debug)]
pub struct Stream {
    fd: OwnedFd,
}

impl Stream {
    /// Connects to `endpoint` within `timeout` (TCP with TCP_NODELAY, as
    /// the spec recommends).
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
        match endpoint {
            Endpoint::Unix(path) => Ok(Stream::from(UnixStream::connect(path)?)),
            Endpoint::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => return Stream::from_tcp(s),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// Wraps an accepted or connected TCP socket (TCP_NODELAY on).
    pub fn from_tcp(stream: TcpStream) -> io::Result<Stream> {
        stream.set_nodelay(true)?;
        Ok(Stream {
            fd: OwnedFd::from(stream),
        })
    }

    /// Both ends of a connected Unix socket pair (tests and fuzzing).
    pub fn pair() -> io::Result<(Stream, Stream)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Stream::from(a), Stream::from(b)))
    }

    /// Deadline of each blocking read and write (None: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = timeout.map_or(
            libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            |t| libc::timeval {
                tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_usec: t.subsec_micros().max(u32::from(t.is_zero())) as libc::suseconds_t,
            },
        );
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: `tv` is a valid timeval for the call's duration.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// One blocking read (within the timeout); 0 at the end of the stream.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers `buf`, borrowed mutably for this call.
        unsafe { self.recv_into(&iov, 0) }
    }

    /// Reads exactly `buf.len()` bytes (blocking, within the timeout).
    pub fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let iov = [libc::iovec {
                iov_base: buf[done..].as_mut_ptr().cast(),
                iov_len: buf.len() - done,
            }];
            // SAFETY: the iovec covers the unread tail of `buf`, borrowed
            // mutably for this call.
            match unsafe { self.recv_into(&iov, 0) } {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` (blocking, within the timeout).
    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let iov = [libc::iovec {
                iov_base: buf[done..].as_ptr().cast_mut().cast(),
                iov_len: buf.len() - done,
            }];
            // SAFETY: the iovec covers the unsent tail of `buf`, which the
            // kernel only reads.
            match unsafe { self.send_from(&iov, 0) } {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One `recvmsg` into `iov` without blocking (`WouldBlock` when nothing
    /// is there); 0 means the peer closed its side.
    ///
    /// # Safety
    /// Every iovec must describe memory writable for its length that
    /// nothing else accesses during the call.
    pub unsafe fn recv_nonblocking(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's contract.
        unsafe { self.recv_into(iov, libc::MSG_DONTWAIT) }
    }

    /// One `sendmsg` from `iov` without blocking (`WouldBlock` when the
    /// socket buffer is full).
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its length.
    pub unsafe fn send_nonblocking(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's contract.
        unsafe { self.send_from(iov, libc::MSG_DONTWAIT) }
    }

    /// # Safety
    /// As [`Stream::recv_nonblocking`].
    unsafe fn recv_into(&self, iov: &[libc::iovec], flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; the fields set point at the
        // caller's iovec array for the call's duration.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len().min(libc::UIO_MAXIOV as usize) as _;
        // SAFETY: `msg` and what it points at are valid; the caller
        // guarantees the iovecs' memory.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, flags) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// # Safety
    /// As [`Stream::send_nonblocking`].
    unsafe fn send_from(&self, iov: &[libc::iovec], flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: as in recv_into.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len().min(libc::UIO_MAXIOV as usize) as _;
        // SAFETY: `msg` is valid; MSG_NOSIGNAL: a closed peer is an EPIPE
        // error, not a signal.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, flags | libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// `shutdown(2)`; errors (e.g. not connected) are ignored.
    pub fn shutdown(&self, how: std::net::Shutdown) {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown takes no pointers.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), how) };
    }

    /// Waits until the socket is readable (or writable too, with
    /// `writable`) or `other` is readable, at most `timeout`.
    pub fn wait(&self, writable: bool, other: Option<BorrowedFd<'_>>, timeout: Duration) {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN | if writable { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: other.map_or(-1, |o| o.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid array of two pollfds (a negative fd is
        // ignored by poll).
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    }
}

/// A server's connection set can end the stream (vspa's NBD server).
impl vspa_threads::conns::Stream for Stream {
    fn stop_reading(&self) {
        self.shutdown(std::net::Shutdown::Read);
    }
    fn cut_off(&self) {
        self.shutdown(std::net::Shutdown::Both);
    }
}

impl From<UnixStream> for Stream {
    fn from(stream: UnixStream) -> Stream {
        Stream {
            fd: OwnedFd::from(stream),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Drops the first `n` bytes of an iovec list (after a partial send).
pub fn skip_front(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for v in iov.iter_mut() {
        if n < v.iov_len {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        whole += 1;
    }
    iov.drain(..whole);
}
