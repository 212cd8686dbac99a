//! The virtual switch: a MUX-style L2 learning switch and its ports.
//!
//! Place in the data path: frames come in from ports — a guest's netvsc
//! driver through a netvsp port (VMBus), a host tap device, the appliance's
//! own smoltcp interface, a VXLAN tunnel to other hosts ([`vxlan`]) — and
//! leave through other ports or a mirror (another port or a pcap file). In
//! between, the switch core ([`Switch`]) parses each frame once, applies the
//! ingress port's policy (VLAN, MAC spoofing guard, DHCP guard,
//! router-advertisement guard, storm control, rate limit, ACL), learns the
//! source MAC and sends the frame to the learned port or floods it in its
//! VLAN, applying each destination's VLAN tagging and ACL.
//!
//! Architecture, unikernel style: one process, worker threads that each own
//! their ports and run to completion in a poll loop.
//! - A port's owner holds its [`PortHandle`]: [`PortHandle::ingress`] forwards
//!   a batch on the owner's thread straight into the destinations' bounded
//!   lock-free queues; [`PortHandle::drain`] takes the port's queued frames.
//!   An owner that sleeps waits on [`PortHandle::doorbell_fd`], an eventfd the
//!   switch rings once per batch when it queued frames for a sleeping owner.
//! - Ports that are plain file descriptors (tap, pcap, the internal port,
//!   VXLAN) implement [`Port`] and run in a [`Worker`]; a netvsp port (a
//!   guest's netvsc NIC, [`netvsp`]) lives in the poll loop of the NIC
//!   thread that owns its VMBus channels and uses its handle directly.
//! - Frames move as [`bytes::Bytes`] (reference counted, never copied inside
//!   the switch): a [`Frame`] is the bytes a port received plus offload state;
//!   a [`Delivery`] adds how to rewrite the VLAN tag, which the sending port
//!   does with scatter-gather (`parts`). The only copies are the software
//!   offload fallbacks: a GSO frame for a port without TSO is segmented and
//!   a partial checksum completed for a port without checksum offload
//!   ([`OffloadCaps`]).
//! - The MAC table is shared by all threads without locks (a seqlock per
//!   slot, see [`mac_table`]); port sets are immutable snapshots swapped on
//!   port changes.
//! - Packet bytes are read and written through the typed headers of
//!   [`wire`]; IPv4 header checksums are written only by
//!   [`wire::Ipv4Hdr::fill_checksum`] and partial L4 checksums completed
//!   only by [`offload::partial_csum_value`]. [`testing`] builds the frames
//!   tests and benchmarks send.
//!
//! Configuration ([`config`]) is the `[[switch]]` part of the appliance's TOML
//! file; [`runtime::start`] builds switches, ports and workers from it.
//!
//! ## A port in another thread's poll loop
//!
//! A port whose owner already has a poll loop (a VMBus channel worker that
//! owns its ring) attaches with [`Switch::add_port`] and never blocks on the
//! switch:
//!
//! ```no_run
//! use switch::{Delivery, Frame, OffloadCaps, PortSpec, Switch};
//! # fn frames_from_guest(_: &mut Vec<Frame>) {}
//! # fn copy_to_guest(_: &Delivery) {}
//! # fn wait_readable(_: std::os::fd::BorrowedFd<'_>) {}
//! let sw = Switch::new("sw0", 4096, 300);
//! let mut port = sw.add_port(PortSpec::new("vm1", OffloadCaps::ALL))?;
//! let (mut rx, mut tx) = (Vec::new(), Vec::new());
//! loop {
//!     frames_from_guest(&mut rx); // frames the guest sent, as `Bytes`
//!     port.ingress(&mut rx); // forwarded now, on this thread
//!     if port.drain(&mut tx, 256) > 0 {
//!         tx.drain(..).for_each(|d| copy_to_guest(&d)); // d.parts() + d.out_offload()
//!         continue;
//!     }
//!     if port.prepare_sleep() {
//!         wait_readable(port.doorbell_fd()); // with the channel's own descriptors
//!     }
//!     port.woke(true); // after the doorbell fired
//! }
//! # Ok::<(), switch::SwitchError>(())
//! ```

pub mod config;
mod core;
pub mod frame;
pub mod internal;
pub mod mac_table;
pub mod netvsp;
pub mod offload;
pub mod pcap;
pub mod policy;
pub mod port;
pub mod runtime;
mod stats;
pub mod sys;
pub mod tap;
pub mod testing;
pub mod vxlan;
pub mod wire;

pub use crate::core::{
    MAX_PORTS, PortCounters, PortHandle, PortSpec, PortStats, Switch, SwitchCounters, SwitchError,
    SwitchStats,
};
pub use frame::{Delivery, Frame, Gso, GsoKind, Offload, OffloadCaps, PartialCsum};
pub use port::{Port, Worker};

#[cfg(test)]
mod core_tests;
