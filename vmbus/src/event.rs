//! Signals between the two sides of a channel.
//!
//! Each direction of a channel has one signal. The side that waits holds an
//! [`EventFd`]; the side that signals holds something implementing
//! [`Notify`]: an eventfd in hosted mode, an ioeventfd the guest's
//! HvSignalEvent lands on, or the VMM's SynIC interrupt injection.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Raises a signal at the other side of a channel.
pub trait Notify: Send + Sync + std::fmt::Debug {
    fn notify(&self);
}

/// A Linux eventfd used as a doorbell.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd with valid flags returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is fresh and owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adopts an eventfd received from a peer (made non-blocking here).
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Self> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl F_GETFL on an fd we own.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fcntl F_SETFL on an fd we own.
        if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventFd(self.0.try_clone()?))
    }

    pub fn into_fd(self) -> OwnedFd {
        self.0
    }

    /// Adds one to the counter, waking a waiter.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our fd. A full counter
        // (EAGAIN) already means "signalled", so the result is not needed.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears the counter; returns true if it was signalled.
    pub fn consume(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking fd.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8
    }

    /// Waits until signalled or the timeout passes; consumes the signal.
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> bool {
        poll_readable([self.as_fd()], timeout)[0] && self.consume()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Notify for EventFd {
    fn notify(&self) {
        self.signal();
    }
}

/// Waits until any of `fds` is readable; returns which are. Interrupted or
/// timed-out waits return all false.
pub fn poll_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Option<Duration>,
) -> [bool; N] {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: pfds is a valid array of N pollfds.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if n <= 0 {
        return [false; N];
    }
    pfds.map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_then_wait() {
        let e = EventFd::new().unwrap();
        assert!(!e.consume());
        assert!(!e.wait_timeout(Some(Duration::from_millis(1))));
        e.signal();
        e.signal();
        assert!(e.wait_timeout(Some(Duration::from_millis(100))));
        assert!(!e.consume(), "one read clears all signals");
        let c = e.try_clone().unwrap();
        c.notify();
        assert!(e.consume());
    }
}
