//! The few system calls std does not wrap: eventfd, epoll, the tap ioctls and
//! a read into a buffer's uninitialised spare capacity. All of the crate's
//! `unsafe` is here, each block with the reason it is sound.
#![allow(unsafe_code)]

use bytes::BytesMut;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

/// An eventfd used as a doorbell: writers add one, the sleeper reads it to zero.
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nothing else owns.
        Ok(EventFd(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Wakes the sleeper (never blocks: the counter cannot overflow in practice).
    pub fn ring(&self) {
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }

    /// Resets the counter after a wake-up.
    pub fn clear(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.0).read(&mut b);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
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

/// Reads one datagram with scatter: its first `head.len()` bytes into
/// `head`, the rest into the spare capacity of `buf` (growing `buf.len()`).
/// Returns the total length.
pub fn readv_into(file: &File, head: &mut [u8], buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let iov = [
        libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        },
    ];
    // SAFETY: both iovecs describe memory borrowed mutably for the call
    // (`head` and the spare capacity of `buf`); readv(2) writes at most their
    // lengths.
    let n = unsafe { libc::readv(file.as_raw_fd(), iov.as_ptr(), 2) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let body = n.saturating_sub(head.len());
    // SAFETY: the kernel initialised the first `body` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + body) };
    Ok(n)
}

/// Appends `src` (memory shared with a guest) to `buf` in one copy, into
/// its spare capacity; false if the spare capacity is too small.
pub fn append_shared(buf: &mut BytesMut, src: &vmbus::SharedSlice<'_>) -> bool {
    let spare = buf.spare_capacity_mut();
    if spare.len() < src.len() {
        return false;
    }
    // SAFETY: `src` is valid for reads of its length (SharedSlice's
    // contract) and the destination is our own spare capacity of at least
    // that length; the guest may change the source meanwhile, which only
    // changes the bytes copied. Afterwards those bytes are initialised.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), spare.as_mut_ptr().cast(), src.len());
        buf.set_len(buf.len() + src.len());
    }
    true
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
/// TUNSETOFFLOAD flags: what the kernel may hand us.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: u16,
    _pad: [u8; 22],
}

/// Opens (creating if needed) tap `ifname` with IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR, non-blocking, and sets its offloads.
pub fn open_tap(ifname: &str, offloads: u32) -> io::Result<File> {
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: `req` is a properly sized, initialised ifreq the kernel reads and
    // writes for the duration of the call; `file` is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is shared.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_wakes_epoll() {
        let ep = Epoll::new().unwrap();
        let ev = EventFd::new().unwrap();
        ep.add(ev.fd(), 7).unwrap();
        let mut ready = Vec::new();
        ep.wait(Some(Duration::from_millis(1)), &mut ready).unwrap();
        assert!(ready.is_empty());
        ev.ring();
        ev.ring();
        ep.wait(Some(Duration::from_millis(100)), &mut ready)
            .unwrap();
        assert_eq!(ready, [7]);
        ev.clear();
        ep.wait(Some(Duration::from_millis(1)), &mut ready).unwrap();
        assert!(ready.is_empty());
    }

    #[test]
    fn rejects_bad_tap_names() {
        assert!(open_tap("", 0).is_err());
        assert!(open_tap("sixteen-chars-xx", 0).is_err());
    }
}
