//! The VXLAN port: its sockets, its FDB and the two directions of the data
//! path (see the module docs of [`crate::vxlan`] for the behaviour).

use super::fdb::{Fdb, Learn, RemoteId};
use super::gso_tap::GsoTap;
use super::sys::{self, Outgoing, Received, Receiver, RxBuf, Sender};
use super::wire::{DecapError, VXLAN_HLEN, VxlanHdr, decap, flow_hash, tag_in_place};
use super::{VxlanCounters, VxlanShared, VxlanSpec};
use crate::frame::{Delivery, Frame, Gso, OffloadCaps, parse};
use crate::offload::{TcpSegments, partial_csum_value};
use crate::port::Port;
use crate::wire::{ETHERTYPE_VLAN, MacAddr};
use bytes::{Buf, BytesMut};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

/// No VNI for this VLAN.
const NO_VNI: u32 = u32::MAX;
/// Most segments the kernel takes in one UDP GSO send.
const MAX_GSO_SEGMENTS: usize = 64;
/// Receive slot with UDP GRO: the largest coalesced buffer.
const GRO_SLOT: usize = 65_536;
/// How long a send waits for socket buffer space before the datagram is
/// dropped (back-pressure on a busy underlay instead of loss).
const SEND_WAIT: Duration = Duration::from_millis(20);

/// A VXLAN tunnel port.
#[derive(Debug)]
pub struct VxlanPort {
    rx: UdpSocket,
    tx: Vec<UdpSocket>,
    /// UDP GSO usable (the kernel has it and checksums are on).
    gso: bool,
    /// Largest UDP payload of one send.
    max_udp: usize,
    trunk: bool,
    access_vni: u32,
    vni_vlan: HashMap<u32, u16>,
    vlan_vni: Box<[u32; 4096]>,
    max_inner: usize,
    /// Remote VTEPs: the configured ones first (floods go to the first
    /// `flood` of them), then static entries' remotes, then sources
    /// learned with `learn_unknown` (at most `max_remotes`).
    pub(super) remotes: Vec<SocketAddr>,
    flood: usize,
    max_remotes: usize,
    by_ip: HashMap<IpAddr, RemoteId>,
    default_port: u16,
    learn_unknown: bool,
    fdb: Fdb,
    epoch: Instant,
    last_expire: u32,
    shared: Arc<VxlanShared>,
    rxbuf: RxBuf,
    receiver: Receiver,
    received: Vec<Received>,
    sender: Sender,
    build: TxBuild,
    failed: Vec<usize>,
    /// The tunnel-GSO path, if configured.
    gso_tap: Option<GsoTap>,
    /// The UDP source port of each sending socket (the tunnel-GSO path
    /// uses the one the flow's frames would leave from).
    tx_ports: Vec<u16>,
    /// A tap write failed already (logged once).
    tap_failed: bool,
}

/// A piece of an outgoing datagram: bytes of the port's scratch buffer
/// (headers) or of frame `n` of the batch (payload, never copied here).
#[derive(Debug, Clone)]
enum Piece {
    Scratch(Range<usize>),
    Frame(usize, Range<usize>),
}

/// What an outgoing datagram carries: `packets` VXLAN packets with
/// `bytes` of inner frames, to remote `remote`.
#[derive(Debug, Clone, Copy)]
struct MsgMeta {
    remote: RemoteId,
    packets: u64,
    bytes: u64,
}

/// What one `send_batch` builds before the sends.
#[derive(Debug, Default)]
struct TxBuild {
    scratch: Vec<u8>,
    pieces: Vec<Piece>,
    msgs: Vec<Outgoing>,
    meta: Vec<MsgMeta>,
    /// Headers of the GSO frame being cut, without its VLAN tag.
    tmpl: Vec<u8>,
    dests: Vec<RemoteId>,
}

/// Where a frame goes and how.
struct Encap {
    frame: usize,
    vni: u32,
    sock: usize,
    /// Bytes after the MAC addresses start here (16 when the frame's own
    /// tag is dropped, else 12).
    rest_from: usize,
}

impl VxlanPort {
    /// Opens the sockets of port `port` of switch `switch`.
    pub fn open(switch: &str, port: &str, spec: &VxlanSpec) -> io::Result<Self> {
        let cfg = &spec.config;
        let rx = sys::udp_socket(cfg.local, cfg.udp_csum, None)?;
        let gro = cfg.offloads && sys::enable_gro(&rx);
        let any = SocketAddr::new(cfg.local.ip(), 0);
        let tx = (0..cfg.tx_sockets)
            .map(|_| sys::udp_socket(any, cfg.udp_csum, Some(SEND_WAIT)))
            .collect::<io::Result<Vec<_>>>()?;
        let gso = cfg.offloads && cfg.udp_csum && sys::has_gso(&tx[0]);
        let tx_ports = tx
            .iter()
            .map(|t| t.local_addr().map(|a| a.port()))
            .collect::<io::Result<Vec<_>>>()?;
        let gso_tap = match &cfg.gso_tap {
            Some(name) => Some(
                GsoTap::open(name, cfg.local.ip(), cfg.udp_csum, rx.as_fd())
                    .map_err(io::Error::other)?,
            ),
            None => None,
        };
        let default_port = cfg.default_port();
        let mut remotes: Vec<SocketAddr> =
            cfg.remotes.iter().map(|r| r.addr(default_port)).collect();
        let flood = remotes.len();
        for s in &cfg.statics {
            let a = s.remote.addr(default_port);
            if !remotes.contains(&a) {
                remotes.push(a);
            }
        }
        let maps = &spec.maps;
        let mut vlan_vni = Box::new([NO_VNI; 4096]);
        for m in maps {
            vlan_vni[usize::from(m.vlan & 0x0fff)] = m.vni;
        }
        let id = |a: SocketAddr| remotes.iter().position(|&r| r == a).unwrap_or(0) as RemoteId;
        let statics: Vec<(u32, MacAddr, RemoteId)> = cfg
            .statics
            .iter()
            .flat_map(|s| {
                let rid = id(s.remote.addr(default_port));
                maps.iter()
                    .filter(move |m| s.vni.is_none_or(|v| v == m.vni))
                    .map(move |m| (m.vni, s.mac, rid))
            })
            .collect();
        let shared = Arc::new(VxlanShared::new(switch, port, &remotes));
        let by_ip = remotes
            .iter()
            .enumerate()
            .map(|(i, a)| (a.ip(), i as RemoteId))
            .collect();
        let slot = if gro {
            GRO_SLOT
        } else {
            (cfg.mtu as usize).next_multiple_of(64)
        };
        let slots = if gro { 16 } else { 64 };
        let gso_tap_name = gso_tap.as_ref().map(|t| t.name().to_string());
        tracing::info!(switch, port, local = %cfg.local, gso, gro, gso_tap = gso_tap_name, "vxlan port open");
        Ok(VxlanPort {
            rx,
            tx,
            gso,
            max_udp: if cfg.local.is_ipv4() { 65_507 } else { 65_527 },
            trunk: spec.trunk(),
            access_vni: maps[0].vni,
            vni_vlan: maps.iter().map(|m| (m.vni, m.vlan)).collect(),
            vlan_vni,
            max_inner: cfg.max_inner(),
            max_remotes: remotes.len() + cfg.fdb_size.min(4096),
            remotes,
            flood,
            by_ip,
            default_port,
            learn_unknown: cfg.learn_unknown,
            fdb: Fdb::new(&statics, cfg.fdb_size, cfg.fdb_age_secs),
            epoch: Instant::now(),
            last_expire: 0,
            shared,
            rxbuf: RxBuf::new(slot, slots),
            receiver: Receiver::default(),
            received: Vec::new(),
            sender: Sender::default(),
            build: TxBuild::default(),
            failed: Vec::new(),
            gso_tap,
            tx_ports,
            tap_failed: false,
        })
    }

    /// The port's counters, for the control plane.
    pub fn shared(&self) -> Arc<VxlanShared> {
        self.shared.clone()
    }

    /// The local address the port receives on (its port number resolved).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.rx.local_addr()
    }

    fn counters(&self) -> &VxlanCounters {
        &self.shared.counters
    }

    fn count(&self, c: fn(&VxlanCounters) -> &AtomicU64, n: u64) {
        c(self.counters()).fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn secs(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// The remote a datagram came from, added when unknown sources are
    /// learned; None to drop it.
    fn source(&mut self, from: SocketAddr) -> Option<RemoteId> {
        if let Some(&id) = self.by_ip.get(&from.ip()) {
            return Some(id);
        }
        if !self.learn_unknown || self.remotes.len() >= self.max_remotes {
            return None;
        }
        let id = self.remotes.len() as RemoteId;
        self.remotes
            .push(SocketAddr::new(from.ip(), self.default_port));
        self.by_ip.insert(from.ip(), id);
        Some(id)
    }

    /// Decapsulates one datagram from `remote` into `batch`.
    fn take_datagram(
        &mut self,
        mut dgram: BytesMut,
        remote: RemoteId,
        now: u32,
        batch: &mut Vec<Frame>,
    ) {
        let vni_vlan = &self.vni_vlan;
        let d = match decap(&dgram, self.max_inner, |v| vni_vlan.contains_key(&v)) {
            Ok(d) => d,
            Err(e) => return self.count(decap_counter(e), 1),
        };
        match self.fdb.learn(d.vni, MacAddr(d.src), remote, now) {
            Learn::New => self.count(|c| &c.fdb_learned, 1),
            Learn::Moved => self.count(|c| &c.fdb_moves, 1),
            Learn::Full => self.count(|c| &c.fdb_full, 1),
            Learn::StaticConflict => return self.count(|c| &c.drop_static_conflict, 1),
            Learn::Refreshed | Learn::Static => {}
        }
        let inner = (dgram.len() - VXLAN_HLEN) as u64;
        self.count(|c| &c.rx_packets, 1);
        self.count(|c| &c.rx_bytes, inner);
        if let Some(r) = self.shared.remotes.get(usize::from(remote)) {
            r.rx_packets.fetch_add(1, Ordering::Relaxed);
            r.rx_bytes.fetch_add(inner, Ordering::Relaxed);
        }
        let start = if self.trunk {
            tag_in_place(&mut dgram, self.vni_vlan[&d.vni])
        } else {
            d.inner
        };
        dgram.advance(start);
        batch.push(Frame::new(dgram.freeze()));
    }

    /// Takes the datagrams of one receive buffer `buf` (several with GRO),
    /// as `recvmmsg` described it in `r`.
    pub(super) fn ingest(
        &mut self,
        mut buf: BytesMut,
        r: Received,
        now: u32,
        batch: &mut Vec<Frame>,
    ) {
        if r.truncated {
            return self.count(|c| &c.drop_truncated, 1);
        }
        let Some(remote) = r.from.and_then(|from| self.source(from)) else {
            let n = r.segment.map_or(1, |s| r.len.div_ceil(s)).max(1) as u64;
            return self.count(|c| &c.drop_unknown_source, n);
        };
        if r.segment.is_some_and(|s| s < r.len) {
            self.count(|c| &c.rx_gro_batches, 1);
        }
        if buf.is_empty() {
            return self.count(|c| &c.drop_truncated, 1);
        }
        let seg = r.segment.unwrap_or(r.len).max(1);
        while !buf.is_empty() {
            let d = buf.split_to(seg.min(buf.len()));
            self.take_datagram(d, remote, now, batch);
        }
    }

    /// The VNI a frame to send belongs to, and where its bytes after the
    /// MAC addresses start.
    fn classify(&self, d: &Delivery) -> Option<(u32, usize)> {
        let data = &d.data;
        let has_tag = data.len() >= 18 && data[12..14] == ETHERTYPE_VLAN.to_be_bytes();
        let rest_from = if has_tag { 16 } else { 12 };
        if !self.trunk {
            return Some((self.access_vni, rest_from));
        }
        let own = (has_tag && !d.strip_tag).then(|| u16::from_be_bytes([data[14], data[15]]));
        let vid = d.tag.or(own)? & 0x0fff;
        let vni = self.vlan_vni[usize::from(vid)];
        (vni != NO_VNI).then_some((vni, rest_from))
    }

    /// Builds the datagrams of frame `n` of the batch (or writes it to the
    /// `gso_tap`).
    fn encap(&mut self, n: usize, frames: &[Delivery]) {
        let d = &frames[n];
        let Some((vni, rest_from)) = self.classify(d) else {
            return self.count(|c| &c.drop_no_vni, 1);
        };
        let info = parse(&d.data).ok();
        let sock = flow_hash(&d.data, info.as_ref()) as usize % self.tx.len();
        let dst = MacAddr(d.data[..6].try_into().expect("parsed frame"));
        let known = (!dst.is_multicast())
            .then(|| self.fdb.lookup(vni, dst, self.secs()))
            .flatten();
        let b = &mut self.build;
        b.dests.clear();
        match known {
            Some(r) => b.dests.push(r),
            None => b.dests.extend((0..self.flood).map(|r| r as RemoteId)),
        }
        if b.dests.is_empty() {
            return self.count(|c| &c.drop_no_remote, 1);
        }
        let e = Encap {
            frame: n,
            vni,
            sock,
            rest_from,
        };
        let ok = match (d.offload.gso, info) {
            (Some(gso), Some(info)) => self.encap_gso(&e, frames, gso, info.l3_offset),
            (Some(_), None) => Err(Refused::Offload),
            (None, _) => self.encap_one(&e, d),
        };
        match ok {
            Ok(()) => {}
            Err(Refused::TooBig) => self.count(|c| &c.drop_tx_too_big, 1),
            Err(Refused::Offload) => self.count(|c| &c.drop_bad_offload, 1),
        }
    }

    /// One frame, one VXLAN packet per destination; a partial checksum is
    /// completed into a 2-byte scratch piece.
    fn encap_one(&mut self, e: &Encap, d: &Delivery) -> Result<(), Refused> {
        let data = &d.data;
        let inner = 12 + data.len() - e.rest_from;
        if inner > self.max_inner {
            return Err(Refused::TooBig);
        }
        let b = &mut self.build;
        let first = b.pieces.len();
        b.push_scratch(VxlanHdr::new(e.vni).as_bytes());
        b.pieces.push(Piece::Frame(e.frame, 0..12));
        match d.offload.csum {
            None => b
                .pieces
                .push(Piece::Frame(e.frame, e.rest_from..data.len())),
            Some(c) => {
                let value = match partial_csum_value(data, c) {
                    Ok(v) if usize::from(c.start) >= e.rest_from => v,
                    _ => {
                        b.pieces.truncate(first);
                        return Err(Refused::Offload);
                    }
                };
                let at = usize::from(c.start) + usize::from(c.offset);
                b.pieces.push(Piece::Frame(e.frame, e.rest_from..at));
                b.push_scratch(&value.to_be_bytes());
                b.pieces.push(Piece::Frame(e.frame, at + 2..data.len()));
            }
        }
        b.add_msgs(e.sock, first, None, 1, inner as u64, &self.remotes);
        Ok(())
    }

    /// A TCP GSO frame: one header block per segment and the payload
    /// slices, sent as UDP GSO datagrams of up to `MAX_GSO_SEGMENTS`
    /// VXLAN packets (or one datagram per packet without UDP GSO).
    fn encap_gso(
        &mut self,
        e: &Encap,
        frames: &[Delivery],
        gso: Gso,
        l3: usize,
    ) -> Result<(), Refused> {
        let data = &frames[e.frame].data[..];
        let shift = e.rest_from - 12;
        let whole = TcpSegments::new(data, l3, gso).map_err(|_| Refused::Offload)?;
        let hlen0 = whole.headers_len();
        // The headers without the frame's own tag, kept apart from the
        // build so segments can be written while they are read.
        let mut tmpl = std::mem::take(&mut self.build.tmpl);
        tmpl.clear();
        tmpl.extend_from_slice(&data[..12]);
        tmpl.extend_from_slice(&data[e.rest_from..hlen0]);
        let payload = &data[hlen0..];
        let r = TcpSegments::from_parts(&tmpl, payload, l3 - shift, gso)
            .map_err(|_| Refused::Offload)
            .and_then(|segs| {
                if segs.headers_len() + usize::from(gso.mss) > self.max_inner {
                    return Err(Refused::TooBig);
                }
                let from = match self.tap_route() {
                    Some((r, to)) => self.send_to_tap(e, frames, &segs, r, to),
                    None => Some(0),
                };
                if let Some(from) = from {
                    self.add_segments(e, &segs, from, hlen0, gso);
                }
                Ok(())
            });
        self.build.tmpl = tmpl;
        r
    }

    /// The one remote a frame goes to, when the `gso_tap` can take it
    /// (floods take the socket path).
    fn tap_route(&self) -> Option<(RemoteId, SocketAddr)> {
        let tap = self.gso_tap.as_ref()?;
        let &[r] = &self.build.dests[..] else {
            return None;
        };
        let to = self.remotes[usize::from(r)];
        tap.reaches(to).then_some((r, to))
    }

    /// Writes a GSO frame to the `gso_tap`, after the datagrams built for
    /// the frames before it (frames leave in the order they came). If the
    /// tap refuses it, returns the first segment not sent, for the socket
    /// path to send.
    fn send_to_tap(
        &mut self,
        e: &Encap,
        frames: &[Delivery],
        segs: &TcpSegments<'_>,
        remote: RemoteId,
        to: SocketAddr,
    ) -> Option<usize> {
        if !self.build.msgs.is_empty() {
            self.flush(frames);
        }
        let sport = self.tx_ports[e.sock];
        let tap = self.gso_tap.as_mut()?;
        let (sent, unsent) = match tap.send(segs, e.vni, to, sport) {
            Ok(sent) => (sent, None),
            Err(u) => {
                if !self.tap_failed {
                    self.tap_failed = true;
                    tracing::warn!(tap = tap.name(), error = %u.error,
                        "vxlan gso_tap write failed; such frames take the socket path");
                }
                (u.sent, Some(u.from))
            }
        };
        let c = &self.shared.counters;
        c.tx_gso_tap_sends.fetch_add(sent.writes, Ordering::Relaxed);
        if unsent.is_some() {
            c.tx_gso_tap_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.count_tx(remote, sent.packets, sent.bytes);
        unsent
    }

    /// Segments `from..` of a GSO frame as UDP GSO datagrams (one per
    /// packet without UDP GSO).
    fn add_segments(
        &mut self,
        e: &Encap,
        segs: &TcpSegments<'_>,
        from: usize,
        hlen0: usize,
        gso: Gso,
    ) {
        let b = &mut self.build;
        let hlen = segs.headers_len();
        let mss = usize::from(gso.mss);
        let wire = VXLAN_HLEN + hlen + mss;
        let per_send = if self.gso {
            (self.max_udp / wire).clamp(1, MAX_GSO_SEGMENTS)
        } else {
            1
        };
        let count = segs.count();
        let mut i = from;
        while i < count {
            let n = per_send.min(count - i);
            let first = b.pieces.len();
            let mut bytes = 0;
            for s in i..i + n {
                let at = b.scratch.len();
                b.scratch.extend_from_slice(VxlanHdr::new(e.vni).as_bytes());
                b.scratch.resize(at + VXLAN_HLEN + hlen, 0);
                segs.write_headers(s, &mut b.scratch[at + VXLAN_HLEN..]);
                b.pieces.push(Piece::Scratch(at..b.scratch.len()));
                let len = segs.payload_of(s).len();
                let from = hlen0 + s * mss;
                b.pieces.push(Piece::Frame(e.frame, from..from + len));
                bytes += (hlen + len) as u64;
            }
            let segment = (n > 1).then_some(wire as u16);
            b.add_msgs(e.sock, first, segment, n as u64, bytes, &self.remotes);
            i += n;
        }
    }

    /// Sends the datagrams built so far and counts them.
    fn flush(&mut self, frames: &[Delivery]) {
        let b = &self.build;
        let pieces = b.pieces.iter().map(|p| match p {
            Piece::Scratch(r) => &b.scratch[r.clone()],
            Piece::Frame(n, r) => &frames[*n].data[r.clone()],
        });
        self.failed.clear();
        self.sender
            .send(&self.tx, pieces, &b.msgs, &mut self.failed);
        self.failed.sort_unstable();
        let c = &self.shared.counters;
        let mut failed = self.failed.iter().peekable();
        for (i, (out, m)) in b.msgs.iter().zip(&b.meta).enumerate() {
            if failed.peek() == Some(&&i) {
                failed.next();
                continue;
            }
            if out.segment.is_some() {
                c.tx_gso_sends.fetch_add(1, Ordering::Relaxed);
            }
            self.shared.count_tx(m.remote, m.packets, m.bytes);
        }
        c.tx_errors
            .fetch_add(self.failed.len() as u64, Ordering::Relaxed);
        self.build.clear();
    }
}

/// Why a frame to send was dropped.
enum Refused {
    TooBig,
    Offload,
}

impl TxBuild {
    fn push_scratch(&mut self, bytes: &[u8]) {
        let at = self.scratch.len();
        self.scratch.extend_from_slice(bytes);
        self.pieces.push(Piece::Scratch(at..self.scratch.len()));
    }

    /// One datagram of the pieces from `first` on, to each destination.
    fn add_msgs(
        &mut self,
        sock: usize,
        first: usize,
        segment: Option<u16>,
        packets: u64,
        bytes: u64,
        remotes: &[SocketAddr],
    ) {
        let iov = first..self.pieces.len();
        for &r in &self.dests {
            self.msgs.push(Outgoing {
                sock,
                to: remotes[usize::from(r)],
                iov: iov.clone(),
                segment,
            });
            self.meta.push(MsgMeta {
                remote: r,
                packets,
                bytes,
            });
        }
    }

    fn clear(&mut self) {
        self.scratch.clear();
        self.pieces.clear();
        self.msgs.clear();
        self.meta.clear();
    }
}

fn decap_counter(e: DecapError) -> fn(&VxlanCounters) -> &AtomicU64 {
    match e {
        DecapError::Truncated => |c| &c.drop_truncated,
        DecapError::BadFlags => |c| &c.drop_bad_flags,
        DecapError::UnknownVni => |c| &c.drop_unknown_vni,
        DecapError::ShortInner => |c| &c.drop_short_inner,
        DecapError::TooBig => |c| &c.drop_rx_too_big,
        DecapError::InnerTag => |c| &c.drop_inner_tag,
        DecapError::BadSource => |c| &c.drop_bad_source_mac,
    }
}

impl Drop for VxlanPort {
    fn drop(&mut self) {
        self.shared.live.store(false, Ordering::Relaxed);
    }
}

impl Port for VxlanPort {
    fn recv_batch(&mut self, batch: &mut Vec<Frame>, max: usize) -> io::Result<usize> {
        let now = self.secs();
        if now != self.last_expire {
            self.last_expire = now;
            self.fdb.expire(now);
            let live = self.fdb.learned(now) as u64;
            self.counters().fdb_entries.store(live, Ordering::Relaxed);
        }
        let mut received = std::mem::take(&mut self.received);
        self.rxbuf
            .recv(&mut self.receiver, &self.rx, max, &mut received)?;
        for r in received.drain(..) {
            let buf = self.rxbuf.take(r.len);
            self.ingest(buf, r, now, batch);
        }
        self.rxbuf.done();
        self.received = received;
        // Bad datagrams are counted on the VXLAN port's own counters.
        Ok(0)
    }

    fn send_batch(&mut self, frames: &mut Vec<Delivery>) -> io::Result<usize> {
        self.build.clear();
        for n in 0..frames.len() {
            self.encap(n, frames);
        }
        self.flush(frames);
        frames.clear();
        Ok(0)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.rx.as_fd())
    }

    fn caps(&self) -> OffloadCaps {
        OffloadCaps::ALL
    }
}
