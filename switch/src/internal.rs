//! The internal port: the appliance's own network interface, a smoltcp stack
//! with its own MAC and IPv4 address. smoltcp answers ARP and ping by itself;
//! on top, a TCP service on a configured port sends the appliance's counters
//! as plain text, one `name value` line per counter, and closes.
//!
//! This port is a management endpoint, not a data path: frames it receives
//! are checksummed and segmented by the switch beforehand (it declares no
//! offloads), and frames smoltcp builds are fresh buffers.

use crate::frame::{Delivery, Frame, OffloadCaps};
use crate::port::Port;
use crate::wire::MacAddr;
use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Something with counters to serve.
pub trait CounterSource: Send + Sync + std::fmt::Debug {
    /// Appends `name value` lines.
    fn write_counters(&self, out: &mut String);

    /// The source is gone for good (its port was removed): it is dropped
    /// from the list the next time one is added.
    fn retired(&self) -> bool {
        false
    }
}

impl CounterSource for crate::Switch {
    fn write_counters(&self, out: &mut String) {
        crate::Switch::write_counters(self, out);
    }
}

/// The counter sources internal ports serve: shared, so guest NICs added
/// or removed at run time show up. Read once per connection (never on the
/// frame path).
#[derive(Debug, Clone, Default)]
pub struct CounterSources(Arc<Mutex<Vec<Arc<dyn CounterSource>>>>);

impl CounterSources {
    pub fn new(sources: Vec<Arc<dyn CounterSource>>) -> Self {
        CounterSources(Arc::new(Mutex::new(sources)))
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn CounterSource>>> {
        vmbus::worker::lock(&self.0)
    }

    pub fn push(&self, source: Arc<dyn CounterSource>) {
        let mut list = self.list();
        list.retain(|s| !s.retired());
        list.push(source);
    }

    /// Removes `source` (the same `Arc` that was pushed).
    pub fn remove(&self, source: &Arc<dyn CounterSource>) {
        self.list().retain(|s| !Arc::ptr_eq(s, source));
    }

    /// Every source's `name value` lines.
    pub fn write_all(&self, out: &mut String) {
        for s in self.list().iter() {
            s.write_counters(out);
        }
    }
}

/// Concurrent connections the counters service accepts.
const LISTENERS: usize = 4;
/// Frames waiting for smoltcp before the port drops.
const RX_QUEUE: usize = 256;
/// Largest Ethernet frame smoltcp sends or takes.
const MTU: usize = 1514;

/// What the internal port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalSpec {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub counters_port: u16,
}

/// Frames between the switch and smoltcp.
#[derive(Debug, Default)]
struct QueueDevice {
    rx: VecDeque<Bytes>,
    tx: Vec<Bytes>,
}

struct Rx(Bytes);
struct Tx<'a>(&'a mut Vec<Bytes>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(Bytes::from(buf));
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// One connection slot of the counters service.
#[derive(Debug)]
struct Listener {
    handle: SocketHandle,
    /// Text still to send to the current connection, and how far it got.
    text: Vec<u8>,
    sent: Option<usize>,
}

/// The smoltcp-backed internal port.
pub struct InternalPort {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    listeners: Vec<Listener>,
    sources: CounterSources,
    spec: InternalSpec,
    epoch: Instant,
    /// When smoltcp next needs polling without new frames (its timers).
    next_poll: Instant,
}

impl std::fmt::Debug for InternalPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalPort")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl InternalPort {
    /// A stack with `spec`'s addresses serving the counters of `sources`.
    pub fn new(spec: InternalSpec, sources: CounterSources) -> Self {
        let epoch = Instant::now();
        let mut device = QueueDevice::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(spec.mac.0)));
        config.random_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        let addr = IpCidr::new(spec.ip.into(), spec.prefix);
        iface.update_ip_addrs(|a| {
            let _ = a.push(addr);
        });
        let mut sockets = SocketSet::new(Vec::new());
        let listeners = (0..LISTENERS)
            .map(|_| {
                let rx = tcp::SocketBuffer::new(vec![0; 1024]);
                let tx = tcp::SocketBuffer::new(vec![0; 16 * 1024]);
                Listener {
                    handle: sockets.add(tcp::Socket::new(rx, tx)),
                    text: Vec::new(),
                    sent: None,
                }
            })
            .collect();
        InternalPort {
            iface,
            device,
            sockets,
            listeners,
            sources,
            spec,
            epoch,
            next_poll: epoch,
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs smoltcp and the counters service until both are idle, and notes
    /// when smoltcp's timers next need it.
    fn poll(&mut self) {
        for _ in 0..8 {
            let now = self.now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            if !self.serve() {
                break;
            }
        }
        let delay = self.iface.poll_delay(self.now(), &self.sockets);
        // Without timers, still look at the listeners now and then.
        let delay = delay.map_or(Duration::from_secs(1), |d| {
            Duration::from_micros(d.total_micros())
        });
        self.next_poll = Instant::now() + delay;
    }

    /// Advances every connection of the counters service; true if any socket
    /// changed (smoltcp should run again).
    fn serve(&mut self) -> bool {
        let mut changed = false;
        for l in &mut self.listeners {
            let sock = self.sockets.get_mut::<tcp::Socket>(l.handle);
            match sock.state() {
                tcp::State::Closed => {
                    l.sent = None;
                    changed |= sock.listen(self.spec.counters_port).is_ok();
                }
                tcp::State::TimeWait => {
                    sock.abort();
                    changed = true;
                }
                tcp::State::Established | tcp::State::CloseWait => {
                    let sent = match l.sent {
                        Some(n) => n,
                        None => {
                            l.text.clear();
                            let mut text = String::new();
                            self.sources.write_all(&mut text);
                            l.text = text.into_bytes();
                            0
                        }
                    };
                    let n = sock.send_slice(&l.text[sent..]).unwrap_or(0);
                    l.sent = Some(sent + n);
                    changed |= n > 0;
                    if sent + n == l.text.len() {
                        sock.close();
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        changed
    }
}

impl Port for InternalPort {
    fn recv_batch(&mut self, batch: &mut Vec<Frame>, max: usize) -> io::Result<usize> {
        if Instant::now() >= self.next_poll {
            self.poll();
        }
        let n = self.device.tx.len().min(max);
        batch.extend(self.device.tx.drain(..n).map(Frame::new));
        Ok(0)
    }

    fn send_batch(&mut self, frames: &mut Vec<Delivery>) -> io::Result<usize> {
        let mut dropped = 0;
        for d in frames.drain(..) {
            if self.device.rx.len() >= RX_QUEUE || d.len() > MTU {
                dropped += 1;
                continue;
            }
            self.device.rx.push_back(d.contiguous());
        }
        self.poll();
        Ok(dropped)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn caps(&self) -> OffloadCaps {
        OffloadCaps::NONE
    }

    fn timeout(&mut self) -> Option<Duration> {
        if !self.device.tx.is_empty() {
            return Some(Duration::ZERO);
        }
        Some(self.next_poll.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{eth_tagged as eth, icmp_echo, ipv4};
    use crate::wire::{ETHERTYPE_ARP, ETHERTYPE_IPV4};

    const ME: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);
    const PEER: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);

    #[derive(Debug)]
    struct NoCounters;
    impl CounterSource for NoCounters {
        fn write_counters(&self, out: &mut String) {
            out.push_str("x 1\n");
        }
    }

    fn port() -> InternalPort {
        let spec = InternalSpec {
            mac: ME,
            ip: Ipv4Addr::new(10, 9, 0, 254),
            prefix: 24,
            counters_port: 9100,
        };
        InternalPort::new(spec, CounterSources::new(vec![Arc::new(NoCounters)]))
    }

    fn exchange(port: &mut InternalPort, frame: Vec<u8>) -> Vec<Frame> {
        let mut input = vec![Delivery {
            data: Bytes::from(frame),
            offload: Default::default(),
            strip_tag: false,
            tag: None,
        }];
        assert_eq!(port.send_batch(&mut input).unwrap(), 0);
        let mut out = Vec::new();
        port.recv_batch(&mut out, 16).unwrap();
        out
    }

    #[test]
    fn answers_arp_and_ping() {
        let mut p = port();
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&PEER.0);
        arp.extend_from_slice(&[10, 9, 0, 1, 0, 0, 0, 0, 0, 0, 10, 9, 0, 254]);
        let out = exchange(
            &mut p,
            eth(MacAddr::BROADCAST, PEER, None, ETHERTYPE_ARP, &arp),
        );
        assert_eq!(out.len(), 1);
        let reply = &out[0].data;
        assert_eq!(&reply[..12], &[PEER.0, ME.0].concat()[..]);
        assert_eq!(&reply[12..14], &[0x08, 0x06]);
        assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
        assert_eq!(&reply[28..32], &[10, 9, 0, 254]);

        let icmp = icmp_echo(0x1234, 1, b"ping payload");
        let ip = ipv4([10, 9, 0, 1], [10, 9, 0, 254], 1, &icmp);
        let out = exchange(&mut p, eth(ME, PEER, None, ETHERTYPE_IPV4, &ip));
        assert_eq!(out.len(), 1);
        let reply = &out[0].data;
        assert_eq!(&reply[26..30], &[10, 9, 0, 254]);
        assert_eq!(&reply[30..34], &[10, 9, 0, 1]);
        assert_eq!(reply[34], 0, "echo reply");
        assert_eq!(&reply[42..], b"ping payload");
    }

    #[test]
    fn drops_oversized_frames() {
        let mut p = port();
        let mut input = vec![Delivery {
            data: Bytes::from(vec![0u8; 3000]),
            offload: Default::default(),
            strip_tag: false,
            tag: None,
        }];
        assert_eq!(p.send_batch(&mut input).unwrap(), 1);
    }
}
