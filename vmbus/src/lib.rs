//! Hyper-V compatible VMBus for vspa: the transport every VSP sits on.
//!
//! # Architecture
//!
//! ```text
//!  peer (guest, or client process)            vspa
//!  ─────────────────────────────              ────────────────────────────────────
//!  channel messages  ── Transport ──────────▶ server::ChannelServer (control plane)
//!   (SynIC / Unix socket)                       versions, offers, GPADLs, open/close,
//!                                               sub-channels, rescind, unload
//!                                                     │ Device::open(OpenedChannel)
//!                                                     ▼
//!  rings in shared memory ◀── ring::{Incoming,Outgoing}Ring ──▶ VSP worker thread
//!  doorbells / interrupts ◀── event::{EventFd, Notify} ───────▶ (poll loop, data plane)
//! ```
//!
//! - [`wire`]: byte-exact `#[repr(C)]` views of the control page, packet
//!   descriptors and channel messages from `include/linux/hyperv.h`.
//! - [`memory`]: the peer's memory (vm-memory guest RAM, or a sealed memfd in
//!   hosted mode) behind bounds-checked [`SharedSlice`]s; ring pages are
//!   mapped with the data area twice back to back so wrapping packets are
//!   contiguous.
//! - [`ring`]: the ring protocol: 8-byte aligned indices, trailers, the
//!   free-space rule, interrupt_mask and pending_send_sz signalling, batched
//!   reads and writes. [`packet`] adds GPA-direct and transfer-page views.
//! - [`gpadl`]: assembling and validating GPADLs from header/body messages.
//! - [`server`]: the channel-management state machine, written once and
//!   driven by a [`server::Transport`]; devices register in a
//!   [`server::Registry`] and get [`server::OpenedChannel`]s.
//! - [`channel`]: what a worker uses in its poll loop: both rings, the
//!   doorbell, the peer notifier and a stop token; workers start on their
//!   own threads, optionally bound to a CPU ([`cpu`]).
//! - [`worker`] and [`event`]: the toolkit every worker loop in the
//!   workspace uses: the stop token, the control-plane inbox, the
//!   spin-then-sleep policy, the lock-poison rule, the eventfd and epoll.
//! - [`stats`]: per-channel counters (packets, bytes, signals, wake-ups)
//!   kept at no measurable cost and listed in each registry for metrics.
//! - [`hosted`]: hosted mode (Unix socket + memfd + eventfds) and the
//!   client (guest-side) library used by tests and benchmarks.
//! - [`vsc`]: what a guest driver's protocol logic needs from the VMBus
//!   under it (rings, signals, pages, GPADLs, offers), implemented by the
//!   hosted client and by the VMM's test guest, so one client library runs
//!   over both.
//! - [`linux`]: the checks a Linux 6.1 guest applies to the host's
//!   messages and packets, which the guest-side libraries apply too.
//! - [`echo`]: a device that echoes packets, for the demo, tests and benches.
//! - [`fuzz`]: harnesses shared by `vmbus/fuzz` and the proptests.
//!
//! # Data path
//!
//! A worker thread owns its channel's rings. It reads every available
//! packet, writes replies, publishes both indices once per batch and signals
//! the peer only when the ring rules require it. While it works it keeps
//! `interrupt_mask` set so the peer does not signal; when idle it clears the
//! mask, re-checks, and sleeps on its doorbell. Nothing on this path
//! allocates or locks; packet bytes are copied once, from the ring to where
//! they go.
//!
//! # Trust
//!
//! The peer is untrusted. Every index, length, page number and message field
//! is validated; a ring violation resets that channel (rescind and re-offer),
//! a bad GPADL or open gets a failure status, and a peer breaking the
//! transport loses its connection. Nothing a peer sends panics the host.

pub mod channel;
pub mod cpu;
pub mod echo;
pub mod event;
pub mod fuzz;
pub mod gpadl;
pub mod guid;
pub mod hosted;
pub mod linux;
pub mod memory;
pub mod packet;
pub mod ring;
pub mod server;
pub mod stats;
pub mod vsc;
pub mod wire;
pub mod worker;

pub use guid::Guid;
pub use memory::{MappedPages, MemoryError, SharedMemory, SharedSlice};
/// The kind a thread enters when it starts (its sandbox); see `vspa_threads`.
pub use vspa_threads::ThreadKind;
