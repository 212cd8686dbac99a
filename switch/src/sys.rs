//! The few system calls std does not wrap that only the switch needs: the
//! tap ioctls and a read into a buffer's uninitialised spare capacity. All
//! of the crate's `unsafe` is here, each block with the reason it is sound.
//! Eventfds and epoll, which every worker loop shares, are
//! [`vmbus::event`]'s (re-exported here for the tap benchmark).
#![allow(unsafe_code)]

use bytes::BytesMut;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

pub use vmbus::event::Epoll;

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

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
/// TUNSETOFFLOAD flags: what the kernel may hand us.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// TCP GSO inside a UDP tunnel, without and with the outer UDP checksum
/// (Linux 6.17+; older kernels refuse TUNSETOFFLOAD with these bits).
pub const TUN_F_UDP_TUNNEL_GSO: u32 = 0x80;
pub const TUN_F_UDP_TUNNEL_GSO_CSUM: u32 = 0x100;

/// Opens (creating if needed) tap `ifname` with IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR, non-blocking, and sets its offloads.
pub fn open_tap(ifname: &str, offloads: u32) -> io::Result<File> {
    let mut req = ifreq(ifname)?;
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    ifreq_ioctl(file.as_fd(), TUNSETIFF, &mut req)?;
    set_offloads(&file, offloads)?;
    Ok(file)
}

/// Sets the offloads (TUN_F_*) tap `file` takes in frames we write and
/// may hand us in frames we read.
pub fn set_offloads(file: &File, offloads: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is shared.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the size of the virtio_net_hdr in front of every frame of tap
/// `file` (10 by default; 24 for the UDP-tunnel header).
pub fn set_vnet_hdr_size(file: &File, size: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(size).map_err(io::Error::other)?;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
    // points at a live local; `file` is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &raw const size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct ifreq` with the union as raw bytes (the flags, a hardware
/// address, as the request says).
#[repr(C)]
struct IfReqRaw {
    name: [u8; 16],
    data: [u8; 24],
}

fn ifreq(ifname: &str) -> io::Result<IfReqRaw> {
    let mut req = IfReqRaw {
        name: [0; 16],
        data: [0; 24],
    };
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() > 15 || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    req.name[..name.len()].copy_from_slice(name);
    Ok(req)
}

/// An ioctl taking an ifreq, on `fd` (a socket, or the tun device for
/// TUNSETIFF).
fn ifreq_ioctl(fd: BorrowedFd<'_>, request: libc::c_ulong, req: &mut IfReqRaw) -> io::Result<()> {
    // SAFETY: `req` is a live, properly sized ifreq the kernel reads and
    // writes for the duration of the call; `fd` is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &raw mut *req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings interface `ifname` up (SIOCGIFFLAGS, SIOCSIFFLAGS) and returns
/// its MAC address (SIOCGIFHWADDR), using `sock`, any socket of the
/// interface's network namespace.
pub fn link_up(sock: BorrowedFd<'_>, ifname: &str) -> io::Result<[u8; 6]> {
    let mut req = ifreq(ifname)?;
    ifreq_ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | libc::IFF_UP as i16;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ifreq_ioctl(sock, libc::SIOCSIFFLAGS, &mut req)?;
    let mut req = ifreq(ifname)?;
    ifreq_ioctl(sock, libc::SIOCGIFHWADDR, &mut req)?;
    // struct sockaddr: family (2 bytes), then the address.
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req.data[2..8]);
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_tap_names() {
        assert!(open_tap("", 0).is_err());
        assert!(open_tap("sixteen-chars-xx", 0).is_err());
    }
}
