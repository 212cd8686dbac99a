//! The network VSP: a netvsc-compatible synthetic NIC (NVSP + RNDIS host)
//! that is a port of the switch.
//!
//! # Place in the data path
//!
//! ```text
//!  guest netvsc ── VMBus channel(s) ──▶ pool thread: Nic::poll ──▶ PortHandle::ingress ──▶ switch
//!    send buffer sections / GPA-direct      RNDIS PACKET -> Frame (one copy, PPIs -> offloads)
//!    receive buffer ◀── transfer pages ◀─── PortHandle::drain ◀── switch queues
//!                       (one copy per frame, up to 375 frames per packet)
//! ```
//!
//! # Architecture
//!
//! - [`Netvsp`] is one configured NIC: a VMBus [`Device`] registered in the
//!   appliance's registry. When a peer opens its primary channel it becomes
//!   a switch port (its [`PortHandle`](crate::PortHandle) lives as long as the channel) and a
//!   `Nic` that one [`Pool`] thread owns; sub-channels the guest asks for
//!   (NVSP SUBCHANNEL, up to `channels - 1`) attach to the same `Nic`. Only
//!   one peer at a time may have a NIC open.
//! - Threads: a [`Pool`] per switch runs its NICs to completion (see
//!   `pool`); all channels of one NIC are on one thread, so a NIC needs no
//!   locks; NICs spread over the pool's threads.
//! - Buffers ([`buffers`]): the guest's receive and send buffers are GPADLs
//!   mapped contiguously. The receive buffer is a ring of packed RNDIS
//!   messages shared by the NIC's channels, freed as the guest completes
//!   transfer-page packets; when it or the table of packets in flight is
//!   full the port drops and counts, it never blocks the switch.
//! - Batching: a pass reads up to 256 packets per channel (each may carry
//!   several RNDIS messages), ingresses all their frames at once, drains up
//!   to 512 frames into one transfer-page packet per channel (up to 375
//!   ranges), and publishes each ring once, signalling at most once.
//! - Offloads: checksum and LSOv2 PPIs become [`crate::Offload`] state (the
//!   IP lengths and header checksum the guest leaves zero on LSO are fixed
//!   on the copy); frames to the guest have their partial checksums
//!   completed on the copy and marked valid in a checksum PPI. Large
//!   segments are cut by the switch (the port does not take GSO). VLAN tags
//!   travel as 802.1Q PPIs on the guest side and in the frame in the switch.
//! - Link state: [`Netvsp::set_link`] changes what OID_GEN_MEDIA_CONNECT_STATUS
//!   answers, sends an RNDIS INDICATE_STATUS, and while down drops frames
//!   both ways.
//! - Sub-channels and RSS: the guest's OID_GEN_RECEIVE_SCALE_PARAMETERS
//!   (Toeplitz key, indirection table) choose the channel each received
//!   flow goes to, with the hash in an NBL_HASH_VALUE PPI; the host sends
//!   the guest a send indirection table when sub-channels are allocated.
//!
//! [`client`] is a netvsc-like guest library over hosted mode, [`fuzz`] the
//! harness of `switch/fuzz`'s netvsp target and of the proptests.

pub mod buffers;
pub mod client;
pub mod fuzz;
mod nic;
pub mod nvsp;
mod pool;
pub mod rndis;
pub mod rss;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmbus::Guid;
use vmbus::channel::ChannelWorker;
use vmbus::guid::NETWORK_INTERFACE;
use vmbus::server::{ChannelContext, Device, DeviceOffer, OpenError, OpenedChannel};
use vmbus::worker::{StopToken, lock};

use crate::core::{PortSpec, Switch};
use crate::frame::OffloadCaps;
use crate::wire::MacAddr;
pub use nic::AttachError;
pub use pool::{Pool, PoolError};

/// What a netvsp port takes from the switch: partial checksums (completed
/// while copying into the receive buffer), no large segments.
pub const CAPS: OffloadCaps = OffloadCaps {
    csum: true,
    tso4: false,
    tso6: false,
};

/// Most channels (primary + sub-channels) a NIC may have.
pub const MAX_CHANNELS: u16 = 64;
/// MTUs a NIC may have (the configuration refuses others).
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=9000;
/// Channel counts a NIC may have (the configuration refuses others).
pub const CHANNELS_RANGE: std::ops::RangeInclusive<u16> = 1..=MAX_CHANNELS;

/// Settings of one NIC.
#[derive(Debug, Clone)]
pub struct NetvspConfig {
    /// Port name; also the friendly name the guest sees.
    pub name: String,
    pub instance: Guid,
    /// Permanent MAC address.
    pub mac: MacAddr,
    /// MTU (OID_GEN_MAXIMUM_FRAME_SIZE): frames to the guest are at most
    /// this plus an Ethernet header.
    pub mtu: u32,
    /// Channels the guest may use (1 + sub-channels).
    pub channels: u16,
    pub link_speed_mbps: u32,
}

impl NetvspConfig {
    pub fn new(name: &str, instance: Guid, mac: MacAddr) -> Self {
        NetvspConfig {
            name: name.to_string(),
            instance,
            mac,
            mtu: 1500,
            channels: 4,
            link_speed_mbps: 10_000,
        }
    }
}

crate::stats::counters!(
    /// Counters of one NIC (the switch port has the frame counters).
    NetvspCounters, NetvspStats {
    /// Transfer-page packets sent to the guest with frames.
    rx_packets,
    /// Frames for the guest dropped: its receive buffer region or its
    /// table of packets in flight was full (it does not complete them).
    drop_rx_no_buffer,
    /// Frames for the guest dropped because its ring was full.
    drop_rx_ring_full,
    /// Frames for the guest dropped before it was ready (no receive buffer,
    /// RNDIS not initialised, packet filter 0) or while the link was down.
    drop_rx_not_ready,
    /// Frames for the guest its packet filter does not take.
    drop_rx_filtered,
    /// Frames for the guest larger than its MTU, or with bad offload state.
    drop_rx_oversize,
    /// Malformed RNDIS data messages from the guest.
    drop_tx_malformed,
    /// Malformed or unknown NVSP messages (answered with a failure status).
    bad_nvsp,
    /// Malformed or unknown RNDIS control messages.
    bad_control,
    /// Control replies dropped (no receive buffer, or too many queued).
    drop_control_replies,
    /// Completions from the guest that matched no packet in flight.
    bad_completions,
    /// RNDIS control messages handled.
    control_messages,
    /// Link status indications sent.
    link_indications,
    /// Channels reset after a ring violation.
    channel_resets,
    }
);

/// What the NIC threads share with the control plane.
#[derive(Debug)]
pub(crate) struct DeviceShared {
    pub config: NetvspConfig,
    pub counters: NetvspCounters,
    link: AtomicBool,
}

impl DeviceShared {
    pub fn link_up(&self) -> bool {
        self.link.load(Ordering::Relaxed)
    }

    /// Largest frame (untagged) sent to the guest.
    pub fn max_rx_frame(&self) -> usize {
        self.config.mtu as usize + crate::wire::ETH_HLEN
    }
}

/// The NIC a peer has open.
#[derive(Debug, Clone, Copy)]
struct Active {
    peer: u64,
    nic: u64,
    thread: usize,
}

/// A netvsc-compatible NIC on a switch: register it as a VMBus device.
#[derive(Debug, Clone)]
pub struct Netvsp {
    shared: Arc<DeviceShared>,
    switch: Arc<Switch>,
    spec: PortSpec,
    pool: Arc<Pool>,
    active: Arc<Mutex<Option<Active>>>,
}

impl Netvsp {
    /// A NIC that joins `switch` as a port with `spec`'s policy and queue
    /// (its name and capabilities come from `config` and [`CAPS`]) while a
    /// peer has it open, run by a thread of `pool`.
    ///
    /// # Panics
    /// If `config` was not validated: its MTU outside [`MTU_RANGE`] or its
    /// channels outside [`CHANNELS_RANGE`] (the configuration refuses
    /// both, so reaching here with them is a bug, not a guest's doing).
    pub fn new(config: NetvspConfig, switch: Arc<Switch>, spec: PortSpec, pool: Arc<Pool>) -> Self {
        assert!(
            MTU_RANGE.contains(&config.mtu) && CHANNELS_RANGE.contains(&config.channels),
            "unvalidated netvsp config: mtu {}, channels {}",
            config.mtu,
            config.channels
        );
        let spec = PortSpec {
            name: config.name.clone(),
            caps: CAPS,
            ..spec
        };
        Netvsp {
            shared: Arc::new(DeviceShared {
                config,
                counters: NetvspCounters::default(),
                link: AtomicBool::new(true),
            }),
            switch,
            spec,
            pool,
            active: Arc::new(Mutex::new(None)),
        }
    }

    pub fn config(&self) -> &NetvspConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> NetvspStats {
        self.shared.counters.snapshot()
    }

    pub fn link_up(&self) -> bool {
        self.shared.link_up()
    }

    /// Connects or disconnects the virtual cable: the guest gets a
    /// MEDIA_CONNECT or MEDIA_DISCONNECT indication, and while down no
    /// frames pass either way.
    pub fn set_link(&self, up: bool) {
        self.shared.link.store(up, Ordering::Relaxed);
        if let Some(a) = *lock(&self.active) {
            self.pool.kick(a.thread);
        }
    }

    /// True while a peer has the NIC open.
    pub fn is_open(&self) -> bool {
        lock(&self.active).is_some()
    }

    fn split(ch: OpenedChannel) -> Result<(nic::Chan, ChannelContext), OpenError> {
        let (channel, context) = ch.into_channel(StopToken::new()?);
        let chan = nic::Chan::new(context.subchannel_index, context.relid, channel);
        Ok((chan, context))
    }
}

impl Device for Netvsp {
    fn offer(&self) -> DeviceOffer {
        DeviceOffer::new(
            &self.shared.config.name,
            NETWORK_INTERFACE,
            self.shared.config.instance,
        )
    }

    fn open(&self, channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        let index = channel.subchannel_index;
        let peer = channel.peer;
        let mut active = lock(&self.active);
        if index == 0 {
            if let Some(a) = *active {
                return Err(OpenError::InUse(a.peer));
            }
            let port = self
                .switch
                .add_port(self.spec.clone())
                .map_err(OpenError::device)?;
            let (chan, context) = Self::split(channel)?;
            let id = self.pool.next_id();
            let thread = self.pool.pick();
            let nic = nic::Nic::new(
                id,
                self.shared.clone(),
                port,
                context.memory,
                context.gpadls,
                context.control,
                chan,
            );
            self.pool
                .add(thread, Box::new(nic))
                .map_err(OpenError::device)?;
            *active = Some(Active {
                peer,
                nic: id,
                thread,
            });
            return Ok(Box::new(NicChannel {
                pool: self.pool.clone(),
                active: self.active.clone(),
                thread,
                nic: id,
                index,
            }));
        }
        let Some(a) = active.filter(|a| a.peer == peer) else {
            return Err(OpenError::NoPrimary);
        };
        let (chan, _) = Self::split(channel)?;
        self.pool
            .attach(a.thread, a.nic, chan)
            .map_err(OpenError::device)?;
        Ok(Box::new(NicChannel {
            pool: self.pool.clone(),
            active: self.active.clone(),
            thread: a.thread,
            nic: a.nic,
            index,
        }))
    }
}

impl crate::internal::CounterSource for Netvsp {
    fn write_counters(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = &self.shared.config.name;
        let _ = writeln!(out, "netvsp.{name}.link_up {}", u8::from(self.link_up()));
        self.stats().each(|k, v| {
            let _ = writeln!(out, "netvsp.{name}.{k} {v}");
        });
    }
}

/// One open channel of a NIC, as the VMBus server holds it.
#[derive(Debug)]
struct NicChannel {
    pool: Arc<Pool>,
    active: Arc<Mutex<Option<Active>>>,
    thread: usize,
    nic: u64,
    index: u16,
}

impl ChannelWorker for NicChannel {
    fn stop(self: Box<Self>) {
        self.pool.detach(self.thread, self.nic, self.index);
        if self.index == 0 {
            let mut a = lock(&self.active);
            if a.is_some_and(|a| a.nic == self.nic) {
                *a = None;
            }
        }
    }
}
