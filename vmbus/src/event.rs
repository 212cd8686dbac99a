//! Signals between the two sides of a channel, and what worker loops wait on.
//!
//! Each direction of a channel has one signal. The side that waits holds an
//! [`EventFd`]; the side that signals holds something implementing
//! [`Notify`]: an eventfd in hosted mode, an ioeventfd the guest's
//! HvSignalEvent lands on, or the VMM's SynIC interrupt injection.
//!
//! [`EventFd`] is the workspace's one eventfd type: channel doorbells,
//! switch port doorbells, stop tokens, inbox bells and the virtio-net
//! poller's kicks are all this. A loop waits on a few fixed descriptors
//! with [`poll_readable`], or on a changing set with [`Epoll`].
#![allow(unsafe_code)]

use std::io;
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
        self.take() > 0
    }

    /// Clears the counter; returns how many signals it held (0: none).
    pub fn take(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking fd.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 { v } else { 0 }
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

/// An epoll instance waiting for readability of a set of descriptors.
#[derive(Debug)]
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The token of a descriptor watched by its number: a descriptor that
    /// fired is recognised however the watched set changes.
    pub fn token(fd: BorrowedFd<'_>) -> u64 {
        fd.as_raw_fd() as u64
    }

    /// Watches `fd` for input (level-triggered), reporting `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open for the call and `ev` is a valid,
        // initialised epoll_event the kernel only reads.
        let rc = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` with its [`Epoll::token`].
    pub fn watch(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.add(fd, Self::token(fd))
    }

    /// Stops watching `fd`.
    pub fn del(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: both descriptors are open for the call; EPOLL_CTL_DEL
        // ignores the event pointer, which may be null.
        let rc = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until a watched descriptor is readable or `timeout` passes;
    /// replaces `ready` with the tokens of the ready descriptors.
    pub fn wait(&self, timeout: Option<Duration>, ready: &mut Vec<u64>) -> io::Result<()> {
        let ms = timeout.map_or(-1, |t| t.as_millis().clamp(0, i32::MAX as u128) as i32);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        // SAFETY: `events` is a writable array of the length passed.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                ms,
            )
        };
        ready.clear();
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(err);
        }
        ready.extend(events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_wakes_epoll() {
        let ep = Epoll::new().unwrap();
        let ev = EventFd::new().unwrap();
        ep.add(ev.as_fd(), 7).unwrap();
        let mut ready = Vec::new();
        ep.wait(Some(Duration::from_millis(1)), &mut ready).unwrap();
        assert!(ready.is_empty());
        ev.signal();
        ev.signal();
        ep.wait(Some(Duration::from_millis(100)), &mut ready)
            .unwrap();
        assert_eq!(ready, [7]);
        ev.consume();
        ep.wait(Some(Duration::from_millis(1)), &mut ready).unwrap();
        assert!(ready.is_empty());
        ep.del(ev.as_fd()).unwrap();
        ep.watch(ev.as_fd()).unwrap();
        ev.signal();
        ep.wait(Some(Duration::from_millis(100)), &mut ready)
            .unwrap();
        assert_eq!(ready, [Epoll::token(ev.as_fd())]);
    }

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
