//! virtio-net over a [`NetBackend`]: the transmit queue hands frames to the
//! backend, received frames fill the driver's receive buffers. Every frame
//! carries the 12-byte `virtio_net_hdr_v1` (no offloads negotiated).

use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::VIRTIO_F_VERSION_1;
use super::mmio::{VirtioBackend, read_config_bytes};

/// VIRTIO_NET_F_MAC: the device has a MAC address in config space.
pub const F_MAC: u64 = 1 << 5;
pub const HEADER_LEN: usize = 12;
/// Largest frame accepted: Ethernet + VLAN tag, no jumbo frames.
pub const MAX_FRAME: usize = 1518;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Where a NIC's frames go. A `switch` port implements this through an
/// adapter once merged; [`ChannelBackend`] connects a test peer.
pub trait NetBackend: Send + std::fmt::Debug {
    fn mac(&self) -> [u8; 6];
    /// Hands one frame to the network.
    fn send(&mut self, frame: &[u8]);
    /// The next received frame, if any (non-blocking).
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize>;
}

/// The virtio-net device model.
#[derive(Debug)]
pub struct VirtioNet {
    backend: Box<dyn NetBackend>,
    sizes: [u16; 2],
    frame: Vec<u8>,
    /// A received frame waiting for a receive buffer.
    pending: Option<usize>,
}

impl VirtioNet {
    pub fn new(backend: Box<dyn NetBackend>) -> Self {
        VirtioNet {
            backend,
            sizes: [QUEUE_SIZE, QUEUE_SIZE],
            frame: vec![0; HEADER_LEN + MAX_FRAME],
            pending: None,
        }
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(mem) {
                let len = reader.available_bytes();
                if (HEADER_LEN..=HEADER_LEN + MAX_FRAME).contains(&len)
                    && reader.read_exact(&mut self.frame[..len]).is_ok()
                {
                    self.backend.send(&self.frame[HEADER_LEN..len]);
                } else {
                    tracing::debug!(len, "dropped malformed virtio-net frame");
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.frame[HEADER_LEN..]) {
                    Some(len) => len.min(MAX_FRAME),
                    None => return used,
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.pending = Some(len);
                return used;
            };
            let head = chain.head_index();
            // virtio_net_hdr_v1: no flags, no GSO, num_buffers = 1.
            self.frame[..HEADER_LEN].fill(0);
            self.frame[10] = 1;
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= HEADER_LEN + len => {
                    w.write_all(&self.frame[..HEADER_LEN + len]).is_ok() as u32
                        * (HEADER_LEN + len) as u32
                }
                _ => 0, // buffer too small: the frame is dropped
            };
            if queue.add_used(mem, head, written).is_err() {
                return used;
            }
            used = true;
        }
    }
}

impl VirtioBackend for VirtioNet {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status u16 (LINK_UP).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.backend.mac());
        config[6] = 1;
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            TX => self.transmit(queue, mem),
            RX => self.receive(queue, mem),
            _ => false,
        }
    }

    fn poll(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match queues.get_mut(RX) {
            Some(q) if q.ready() => self.receive(q, mem),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

/// A backend connected to an in-process peer by two channels.
#[derive(Debug)]
pub struct ChannelBackend {
    mac: [u8; 6],
    to_peer: Sender<Vec<u8>>,
    from_peer: Receiver<Vec<u8>>,
}

/// The other end of a [`ChannelBackend`].
#[derive(Debug)]
pub struct ChannelPeer {
    pub to_device: Sender<Vec<u8>>,
    pub from_device: Receiver<Vec<u8>>,
}

/// A connected backend/peer pair.
pub fn channel_pair(mac: [u8; 6]) -> (ChannelBackend, ChannelPeer) {
    let (to_peer, from_device) = channel();
    let (to_device, from_peer) = channel();
    (
        ChannelBackend {
            mac,
            to_peer,
            from_peer,
        },
        ChannelPeer {
            to_device,
            from_device,
        },
    )
}

impl NetBackend for ChannelBackend {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn send(&mut self, frame: &[u8]) {
        let _ = self.to_peer.send(frame.to_vec());
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self.from_peer.try_recv() {
            Ok(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Some(n)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }
}
