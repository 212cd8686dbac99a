//! The socket calls of the VXLAN port that std does not wrap: socket
//! options (DF, checksums, GRO, GSO), `recvmmsg` with the source address
//! and the GRO segment size of each buffer, and `sendmmsg` of
//! scatter-gather datagrams with an optional GSO segment size each.
//! All of the VXLAN port's `unsafe` is here.
#![allow(unsafe_code)]

use bytes::BytesMut;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// `SO_NO_CHECK` (send IPv4 UDP with a zero checksum); not in `libc` for
/// every target.
const SO_NO_CHECK: libc::c_int = 11;

fn setsockopt(
    sock: &UdpSocket,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the socket is open for the call and the option value is a
    // live c_int whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A UDP socket bound to `addr` with DF set (never fragmented), the
/// checksum choice applied and large buffers. `blocking_send`: sends wait
/// for buffer space for up to that long (back-pressure instead of loss).
pub fn udp_socket(
    addr: SocketAddr,
    udp_csum: bool,
    blocking_send: Option<Duration>,
) -> io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    if addr.is_ipv4() {
        setsockopt(
            &sock,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
        if !udp_csum {
            setsockopt(&sock, libc::SOL_SOCKET, SO_NO_CHECK, 1)?;
        }
    } else {
        setsockopt(
            &sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )?;
        setsockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).ok();
        if !udp_csum {
            setsockopt(&sock, libc::SOL_UDP, libc::UDP_NO_CHECK6_TX, 1)?;
            setsockopt(&sock, libc::SOL_UDP, libc::UDP_NO_CHECK6_RX, 1)?;
        }
    }
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // Privileged callers get the size asked for; others what rmem_max allows.
        if setsockopt(&sock, libc::SOL_SOCKET, force, 8 << 20).is_err() {
            setsockopt(&sock, libc::SOL_SOCKET, plain, 8 << 20)?;
        }
    }
    match blocking_send {
        Some(t) => sock.set_write_timeout(Some(t))?,
        None => sock.set_nonblocking(true)?,
    }
    Ok(sock)
}

/// Turns on UDP GRO; false where the kernel lacks it.
pub fn enable_gro(sock: &UdpSocket) -> bool {
    setsockopt(sock, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// Whether the kernel takes UDP GSO (`UDP_SEGMENT`) on this socket.
pub fn has_gso(sock: &UdpSocket) -> bool {
    setsockopt(sock, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok()
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(&raw const *ss).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&raw const *ss).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            let v6 = SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id);
            // A v4-mapped source (dual-stack socket) is the IPv4 address.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
                None => SocketAddr::V6(v6),
            })
        }
        _ => None,
    }
}

/// Room for one control message carrying an int (UDP_GRO), 8-aligned.
type Cmsg = [u64; 4];

/// What `recvmmsg` said about one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: Option<SocketAddr>,
    /// Size of each datagram in the buffer (UDP GRO), if several.
    pub segment: Option<usize>,
    /// The datagram did not fit the buffer.
    pub truncated: bool,
}

/// Reusable state of `recvmmsg` calls.
#[derive(Debug, Default)]
pub struct Receiver {
    names: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<Cmsg>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in the vectors are rebuilt before every call and
// never dereferenced outside it.
unsafe impl Send for Receiver {}

impl Receiver {
    /// Receives up to `buf.len() / slot` datagrams (or GRO batches)
    /// without waiting, one per `slot`-byte piece of `buf`, replacing `out`
    /// with what came.
    pub fn recv(
        &mut self,
        sock: &UdpSocket,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<()> {
        out.clear();
        let n = buf.len() / slot.max(1);
        if n == 0 {
            return Ok(());
        }
        // SAFETY: all-zero sockaddr_storage and mmsghdr are valid values.
        self.names.resize(n, unsafe { zeroed() });
        self.cmsgs.resize(n, [0; 4]);
        self.iovs.clear();
        self.iovs
            .extend(buf.chunks_exact_mut(slot).map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }));
        self.hdrs.clear();
        for i in 0..n {
            // SAFETY: an all-zero msghdr is valid; the pointers set below
            // point into vectors that live, unmoved, through the call.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = (&raw mut self.names[i]).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &raw mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = size_of::<Cmsg>() as _;
            self.hdrs.push(h);
        }
        // SAFETY: `hdrs` holds `n` initialised headers whose buffers (the
        // caller's, borrowed mutably for the call) and name and control
        // areas are writable for the lengths given.
        let got = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            };
        }
        for h in &self.hdrs[..got as usize] {
            let m = &h.msg_hdr;
            out.push(Received {
                len: h.msg_len as usize,
                // SAFETY: msg_name points at one of our sockaddr_storages.
                from: from_sockaddr(unsafe { &*m.msg_name.cast::<libc::sockaddr_storage>() }),
                segment: gro_segment(m),
                truncated: m.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
        Ok(())
    }
}

/// The UDP_GRO control message's segment size, if the kernel sent one.
fn gro_segment(m: &libc::msghdr) -> Option<usize> {
    // SAFETY: `m` is a msghdr the kernel filled in, whose control area is
    // ours and `msg_controllen` long; the CMSG macros stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = libc::CMSG_DATA(c).cast::<libc::c_int>().read_unaligned();
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

/// One datagram to send from socket `sock`: iovecs `iov` of the batch,
/// to `to`, cut by the kernel into `segment`-byte datagrams when given
/// (UDP GSO).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub sock: usize,
    pub to: SocketAddr,
    pub iov: std::ops::Range<usize>,
    pub segment: Option<u16>,
}

/// Reusable state of `sendmmsg` calls.
#[derive(Debug, Default)]
pub struct Sender {
    iovs: Vec<libc::iovec>,
    names: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    cmsgs: Vec<Cmsg>,
    hdrs: Vec<libc::mmsghdr>,
    /// Index in the batch of each header in `hdrs`.
    order: Vec<usize>,
}

// SAFETY: as for `Receiver`: pointers are rebuilt for every call.
unsafe impl Send for Sender {}

impl Sender {
    /// Sends `msgs` from `socks[msg.sock]`, their data the slices `pieces`
    /// (`msg.iov` indexes them); the messages of one socket keep their
    /// order. Appends the index of every message the kernel refused to
    /// `failed` (each is skipped; the rest still go).
    pub fn send<'a>(
        &mut self,
        socks: &[UdpSocket],
        pieces: impl Iterator<Item = &'a [u8]>,
        msgs: &[Outgoing],
        failed: &mut Vec<usize>,
    ) {
        self.iovs.clear();
        self.iovs.extend(pieces.map(|p| libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        }));
        self.names.clear();
        self.names.extend(msgs.iter().map(|m| to_sockaddr(m.to)));
        self.cmsgs.clear();
        self.cmsgs.resize(msgs.len(), [0; 4]);
        for (s, sock) in socks.iter().enumerate() {
            self.hdrs.clear();
            self.order.clear();
            for (i, m) in msgs.iter().enumerate().filter(|(_, m)| m.sock == s) {
                if m.iov.end > self.iovs.len() {
                    failed.push(i);
                    continue;
                }
                let h = self.header(i, m);
                self.hdrs.push(h);
                self.order.push(i);
            }
            self.send_all(sock, failed);
        }
    }

    /// The mmsghdr of message `i`.
    fn header(&mut self, i: usize, m: &Outgoing) -> libc::mmsghdr {
        // SAFETY: an all-zero msghdr is valid; the pointers set below point
        // into our vectors, which are not touched until the send is done.
        let mut h: libc::mmsghdr = unsafe { zeroed() };
        h.msg_hdr.msg_name = (&raw mut self.names[i].0).cast();
        h.msg_hdr.msg_namelen = self.names[i].1;
        h.msg_hdr.msg_iov = self.iovs[m.iov.clone()].as_mut_ptr();
        h.msg_hdr.msg_iovlen = m.iov.len();
        if let Some(seg) = m.segment {
            let ctl = &mut self.cmsgs[i];
            h.msg_hdr.msg_control = ctl.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is arithmetic.
            h.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
            // SAFETY: the control area is ours and holds one cmsghdr with a
            // u16 (`Cmsg` is 32 bytes, CMSG_SPACE(2) is 24).
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                libc::CMSG_DATA(c).cast::<u16>().write_unaligned(seg);
            }
        }
        h
    }

    fn send_all(&mut self, sock: &UdpSocket, failed: &mut Vec<usize>) {
        let mut at = 0;
        while at < self.hdrs.len() {
            let chunk = (self.hdrs.len() - at).min(1024);
            // SAFETY: the headers from `at` are initialised and point at
            // memory that stays valid and unmoved for the call.
            let sent = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.hdrs[at..].as_mut_ptr(),
                    chunk as libc::c_uint,
                    0,
                )
            };
            if sent > 0 {
                at += sent as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The message at `at` was refused (too big, no buffer space
            // within the send timeout, no route): count it and go on.
            tracing::debug!("vxlan send: {e}");
            failed.push(self.order[at]);
            at += 1;
        }
    }
}

/// A receive buffer cut into fixed slots for `recvmmsg`, whose pieces go
/// to the switch as `Bytes` without copying. Invariant: every byte of the
/// current allocation is initialised (zeroed when allocated, written only
/// since), so its length may be set over bytes the kernel did not write.
#[derive(Debug)]
pub struct RxBuf {
    buf: BytesMut,
    slot: usize,
    slots: usize,
}

impl RxBuf {
    pub fn new(slot: usize, slots: usize) -> Self {
        RxBuf {
            buf: Self::chunk(slot * slots),
            slot,
            slots,
        }
    }

    fn chunk(len: usize) -> BytesMut {
        let mut b = BytesMut::with_capacity(len);
        let cap = b.capacity();
        b.resize(cap, 0);
        b.clear();
        b
    }

    /// Receives into up to `max` slots; `out` says what each slot got, in
    /// order; take each with [`RxBuf::take`].
    pub fn recv(
        &mut self,
        rx: &mut Receiver,
        sock: &UdpSocket,
        max: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<()> {
        let want = self.slot * self.slots;
        if self.buf.capacity() < self.slot && !self.buf.try_reclaim(want) {
            // Frames of the old chunk are still queued elsewhere.
            self.buf = Self::chunk(want);
        }
        let k = (self.buf.capacity() / self.slot)
            .min(self.slots)
            .min(max.max(1));
        // SAFETY: `k` slots fit the capacity, and by the invariant every
        // byte of the allocation is initialised. `try_reclaim` keeps the
        // same allocation; a new one is zeroed whole by `chunk`.
        unsafe { self.buf.set_len(k * self.slot) };
        let r = rx.recv(sock, &mut self.buf, self.slot, out);
        if r.is_err() {
            self.buf.clear();
        }
        r
    }

    /// The next slot, cut to `len` bytes.
    pub fn take(&mut self, len: usize) -> BytesMut {
        let mut s = self.buf.split_to(self.slot.min(self.buf.len()));
        s.truncate(len);
        s
    }

    /// Gives back the slots nothing was received into.
    pub fn done(&mut self) {
        self.buf.clear();
    }
}
