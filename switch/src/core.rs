//! The switch core: ports, their queues, and the forwarding of a batch.
//!
//! Threads: whoever owns a port (a worker's poll loop, or a VMBus channel
//! worker for a netvsp port) holds its [`PortHandle`]. It pushes the frames
//! the port received into the switch with [`PortHandle::ingress`], which runs
//! the whole forwarding decision on the calling thread and queues the result
//! on each destination port's bounded lock-free queue, and it takes the frames
//! destined to its port with [`PortHandle::drain`]. A destination whose owner
//! sleeps is woken through its doorbell (an eventfd), rung at most once per
//! batch and only when the owner said it was going to sleep.
//!
//! Shared state and why it needs no lock on the data path:
//! - the port set is an immutable snapshot behind an `ArcSwap`, loaded once
//!   per batch; adding or removing a port (control path, under a mutex)
//!   publishes a new snapshot;
//! - the MAC table is a seqlock table (see `mac_table`);
//! - queues are `crossbeam` `ArrayQueue`s (bounded, lock-free, MPMC): a full
//!   queue drops the frame and counts it on the destination port;
//! - counters are relaxed atomics; rate-limit and storm-control buckets
//!   belong to the port's handle, so only its owner touches them.

use crate::frame::{Delivery, Frame, FrameInfo, OffloadCaps, parse};
use crate::mac_table::{Learned, MacTable};
use crate::offload;
use crate::policy::Direction;
use crate::policy::{Egress, PortPolicy, TokenBucket};
use crate::stats::counters;
use crate::wire::{ICMPV6_REDIRECT, ICMPV6_ROUTER_ADVERT, IPPROTO_ICMPV6};
use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use std::fmt::Write as _;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmbus::event::EventFd;
use vmbus::worker::lock;

/// Most ports one switch can have.
pub const MAX_PORTS: usize = 256;

counters!(
    /// Counters of one port, updated by any thread.
    PortCounters, PortStats {
        /// Frames and bytes received from the port.
        rx_frames, rx_bytes,
        /// Frames and bytes handed to the port for sending.
        tx_frames, tx_bytes,
        /// Frames the port failed to write.
        tx_errors,
        /// Received frames that did not parse, or had a multicast source.
        drop_malformed,
        /// Received frames of a VLAN the port is not in.
        drop_vlan,
        /// Received frames with a source MAC the port may not use.
        drop_spoof,
        /// Received DHCP server messages (DHCP guard).
        drop_dhcp_guard,
        /// Received router advertisements or redirects (RA guard).
        drop_ra_guard,
        /// Frames denied by the port's ACL, from and to the port.
        drop_acl_outbound, drop_acl_inbound,
        /// Broadcast/multicast frames over the storm limit.
        drop_storm,
        /// Frames over the ingress and egress rate limits.
        drop_ingress_rate, drop_egress_rate,
        /// Frames for the port dropped because its queue was full.
        drop_queue_full,
        /// Frames for the port whose offloads could not be done in software.
        drop_offload,
        /// Known unicast frames whose destination is the port they came from.
        drop_same_port,
        /// Received frames flooded (unknown unicast, broadcast, multicast).
        flooded,
    }
);

counters!(
    /// Counters of the switch as a whole.
    SwitchCounters, SwitchStats {
        /// Source MACs not learned because the table was full.
        learn_table_full,
        /// Stations seen moving to another port.
        mac_moves,
    }
);

/// What a port is, for [`Switch::add_port`].
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: String,
    pub policy: PortPolicy,
    /// Offloads the port takes; the switch completes the rest in software.
    pub caps: OffloadCaps,
    /// Bound of the port's delivery queue, in frames.
    pub queue_len: usize,
}

impl PortSpec {
    /// A port with the default policy (access VLAN 1, no guards).
    pub fn new(name: impl Into<String>, caps: OffloadCaps) -> Self {
        PortSpec {
            name: name.into(),
            policy: PortPolicy::default(),
            caps,
            queue_len: 1024,
        }
    }
}

/// Errors adding a port.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("switch {switch:?} already has a port named {port:?}")]
    DuplicatePort { switch: String, port: String },
    #[error("switch {0:?} has no room for another port")]
    TooManyPorts(String),
    #[error("port queue length must be at least 1")]
    EmptyQueue,
    #[error("creating the port's doorbell: {0}")]
    Doorbell(#[from] std::io::Error),
}

/// The part of a port every thread sees.
#[derive(Debug)]
struct PortShared {
    name: String,
    /// Generation (high 16 bits) and index: what the MAC table stores.
    pref: u32,
    policy: PortPolicy,
    caps: OffloadCaps,
    queue: ArrayQueue<Delivery>,
    /// The owner is about to sleep or sleeping: ring the doorbell.
    sleeping: AtomicBool,
    doorbell: EventFd,
    counters: PortCounters,
}

impl PortShared {
    fn index(&self) -> usize {
        (self.pref & 0xffff) as usize
    }

    fn count(&self, c: fn(&PortCounters) -> &AtomicU64) {
        c(&self.counters).fetch_add(1, Ordering::Relaxed);
    }

    /// Queues `d`, or drops it and counts.
    fn push(&self, d: Delivery, touched: &mut Touched) {
        if self.queue.push(d).is_err() {
            self.count(|c| &c.drop_queue_full);
        } else {
            touched.mark(self.index());
        }
    }
}

/// An immutable snapshot of a switch's ports.
#[derive(Debug, Default)]
struct PortSet {
    ports: Vec<Option<Arc<PortShared>>>,
    /// Index of each port's mirror target, resolved by name.
    mirror: Vec<Option<usize>>,
}

impl PortSet {
    fn by_ref(&self, pref: u32) -> Option<&Arc<PortShared>> {
        let p = self.ports.get((pref & 0xffff) as usize)?.as_ref()?;
        (p.pref == pref).then_some(p)
    }

    fn live(&self) -> impl Iterator<Item = &Arc<PortShared>> {
        self.ports.iter().flatten()
    }

    fn mirror_of(&self, port: &PortShared) -> Option<&Arc<PortShared>> {
        let target = self.mirror.get(port.index()).copied().flatten()?;
        self.ports.get(target)?.as_ref()
    }

    fn with_mirrors_resolved(ports: Vec<Option<Arc<PortShared>>>) -> PortSet {
        let mirror = ports
            .iter()
            .map(|p| {
                let target = p.as_ref()?.policy.mirror.as_ref()?;
                ports
                    .iter()
                    .position(|q| q.as_ref().is_some_and(|q| &q.name == target))
            })
            .collect();
        PortSet { ports, mirror }
    }
}

/// Ports that got frames during a batch, to ring their doorbells once.
#[derive(Debug, Default)]
struct Touched([u64; MAX_PORTS / 64]);

impl Touched {
    fn mark(&mut self, idx: usize) {
        self.0[idx / 64] |= 1 << (idx % 64);
    }

    fn ring(&mut self, set: &PortSet) {
        fence(Ordering::SeqCst);
        for (word, bits) in self.0.iter_mut().enumerate() {
            while *bits != 0 {
                let idx = word * 64 + bits.trailing_zeros() as usize;
                *bits &= *bits - 1;
                if let Some(Some(p)) = set.ports.get(idx)
                    && p.sleeping.load(Ordering::SeqCst)
                    && p.sleeping.swap(false, Ordering::SeqCst)
                {
                    p.doorbell.signal();
                }
            }
        }
    }
}

/// An L2 learning switch.
#[derive(Debug)]
pub struct Switch {
    name: String,
    table: MacTable,
    ports: ArcSwap<PortSet>,
    /// Serialises port changes; holds the next port generation.
    control: Mutex<u16>,
    epoch: Instant,
    counters: SwitchCounters,
}

impl Switch {
    /// A switch with a MAC table of `table_size` entries aging after `age_secs`.
    pub fn new(name: impl Into<String>, table_size: usize, age_secs: u32) -> Arc<Self> {
        Arc::new(Switch {
            name: name.into(),
            table: MacTable::new(table_size, age_secs),
            ports: ArcSwap::from_pointee(PortSet::default()),
            control: Mutex::new(1),
            epoch: Instant::now(),
            counters: SwitchCounters::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn secs(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_secs() as u32
    }

    /// Adds a port; the handle is how its owner moves frames. Dropping the
    /// handle removes the port.
    pub fn add_port(self: &Arc<Self>, spec: PortSpec) -> Result<PortHandle, SwitchError> {
        if spec.queue_len == 0 {
            return Err(SwitchError::EmptyQueue);
        }
        let mut generation = lock(&self.control);
        let current = self.ports.load_full();
        if current.live().any(|p| p.name == spec.name) {
            return Err(SwitchError::DuplicatePort {
                switch: self.name.clone(),
                port: spec.name,
            });
        }
        let mut ports = current.ports.clone();
        let idx = match ports.iter().position(Option::is_none) {
            Some(i) => i,
            None if ports.len() < MAX_PORTS => {
                ports.push(None);
                ports.len() - 1
            }
            None => return Err(SwitchError::TooManyPorts(self.name.clone())),
        };
        *generation = generation.wrapping_add(1).max(1);
        let now = Instant::now();
        let state = IngressState {
            storm: spec
                .policy
                .storm_limit_pps
                .map(|r| TokenBucket::frames(r, now)),
            rate: spec
                .policy
                .ingress_limit_mbps
                .map(|r| TokenBucket::bytes(r, now)),
            soft: Vec::new(),
        };
        let egress_rate = spec
            .policy
            .egress_limit_mbps
            .map(|r| TokenBucket::bytes(r, now));
        let port = Arc::new(PortShared {
            name: spec.name,
            pref: (u32::from(*generation) << 16) | idx as u32,
            policy: spec.policy,
            caps: spec.caps,
            queue: ArrayQueue::new(spec.queue_len),
            sleeping: AtomicBool::new(false),
            doorbell: EventFd::new()?,
            counters: PortCounters::default(),
        });
        ports[idx] = Some(Arc::clone(&port));
        self.ports
            .store(Arc::new(PortSet::with_mirrors_resolved(ports)));
        Ok(PortHandle {
            switch: Arc::clone(self),
            port,
            state,
            egress_rate,
        })
    }

    fn remove_port(&self, pref: u32) {
        let _guard = lock(&self.control);
        let current = self.ports.load_full();
        let mut ports = current.ports.clone();
        if let Some(slot) = ports.get_mut((pref & 0xffff) as usize) {
            *slot = None;
        }
        self.ports
            .store(Arc::new(PortSet::with_mirrors_resolved(ports)));
        self.table.forget_port(pref);
    }

    /// Counters of the port named `name`.
    pub fn port_stats(&self, name: &str) -> Option<PortStats> {
        let set = self.ports.load();
        set.live()
            .find(|p| p.name == name)
            .map(|p| p.counters.snapshot())
    }

    /// Calls `f` with each live port's name and counters (for metrics).
    pub fn each_port(&self, mut f: impl FnMut(&str, PortStats)) {
        for p in self.ports.load().live() {
            f(&p.name, p.counters.snapshot());
        }
    }

    /// Switch-wide counters.
    pub fn stats(&self) -> SwitchStats {
        self.counters.snapshot()
    }

    /// Live entries in the MAC table.
    pub fn mac_entries(&self) -> usize {
        self.table.len(self.secs(Instant::now()))
    }

    /// Appends every counter as a `name value` line.
    pub fn write_counters(&self, out: &mut String) {
        let sw = &self.name;
        let _ = writeln!(out, "switch.{sw}.mac_entries {}", self.mac_entries());
        self.stats().each(|k, v| {
            let _ = writeln!(out, "switch.{sw}.{k} {v}");
        });
        let set = self.ports.load();
        for p in set.live() {
            p.counters.snapshot().each(|k, v| {
                let _ = writeln!(out, "switch.{sw}.port.{}.{k} {v}", p.name);
            });
        }
    }
}

/// Per-port state only the port's owner touches.
#[derive(Debug)]
struct IngressState {
    storm: Option<TokenBucket>,
    rate: Option<TokenBucket>,
    /// Software-offloaded copies of the frame being forwarded, made once and
    /// shared by every destination that needs them.
    soft: Vec<Bytes>,
}

/// The owner's side of a port: push received frames in, drain frames out.
#[derive(Debug)]
pub struct PortHandle {
    switch: Arc<Switch>,
    port: Arc<PortShared>,
    state: IngressState,
    egress_rate: Option<TokenBucket>,
}

impl PortHandle {
    pub fn name(&self) -> &str {
        &self.port.name
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Forwards the frames the port received, emptying `frames`.
    pub fn ingress(&mut self, frames: &mut Vec<Frame>) {
        if frames.is_empty() {
            return;
        }
        let set = self.switch.ports.load();
        let now = Instant::now();
        let ctx = Ctx {
            sw: &self.switch,
            set: &set,
            me: &self.port,
            now,
            secs: self.switch.secs(now),
        };
        let mut touched = Touched::default();
        let (mut count, mut bytes) = (0u64, 0u64);
        for frame in frames.drain(..) {
            count += 1;
            bytes += frame.data.len() as u64;
            ctx.forward(&mut self.state, frame, &mut touched);
        }
        let c = &self.port.counters;
        c.rx_frames.fetch_add(count, Ordering::Relaxed);
        c.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        touched.ring(&set);
    }

    /// Moves up to `max` frames queued for the port into `out`; returns how
    /// many. Frames over the egress rate limit are dropped here.
    pub fn drain(&mut self, out: &mut Vec<Delivery>, max: usize) -> usize {
        let now = self.egress_rate.as_ref().map(|_| Instant::now());
        let (mut count, mut bytes) = (0u64, 0u64);
        while (count as usize) < max {
            let Some(d) = self.port.queue.pop() else {
                break;
            };
            if let (Some(bucket), Some(now)) = (&mut self.egress_rate, now)
                && !bucket.take(d.len() as u64, now)
            {
                self.port.count(|c| &c.drop_egress_rate);
                continue;
            }
            count += 1;
            bytes += d.len() as u64;
            out.push(d);
        }
        let c = &self.port.counters;
        c.tx_frames.fetch_add(count, Ordering::Relaxed);
        c.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        count as usize
    }

    /// Counts frames the port read but could not make sense of.
    pub fn count_rx_malformed(&self, n: u64) {
        self.port
            .counters
            .drop_malformed
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Counts frames the port could not write.
    pub fn count_tx_errors(&self, n: u64) {
        self.port.counters.tx_errors.fetch_add(n, Ordering::Relaxed);
    }

    /// The eventfd rung when frames arrive for a sleeping owner.
    pub fn doorbell_fd(&self) -> BorrowedFd<'_> {
        self.port.doorbell.as_fd()
    }

    /// Announces that the owner is about to wait on the doorbell. Returns
    /// false (and cancels) if frames are already queued: the owner must not
    /// sleep then.
    pub fn prepare_sleep(&self) -> bool {
        self.port.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.port.queue.is_empty() {
            return true;
        }
        self.port.sleeping.store(false, Ordering::SeqCst);
        false
    }

    /// The owner woke up: stop asking for doorbells, and reset the eventfd
    /// if it was what woke the owner (`doorbell_rung`).
    pub fn woke(&self, doorbell_rung: bool) {
        self.port.sleeping.store(false, Ordering::SeqCst);
        if doorbell_rung {
            self.port.doorbell.consume();
        }
    }

    /// Frames waiting in the port's queue.
    pub fn queued(&self) -> usize {
        self.port.queue.len()
    }

    pub fn stats(&self) -> PortStats {
        self.port.counters.snapshot()
    }
}

impl Drop for PortHandle {
    fn drop(&mut self) {
        self.switch.remove_port(self.port.pref);
    }
}

/// What every frame of one batch shares.
struct Ctx<'a> {
    sw: &'a Switch,
    set: &'a PortSet,
    me: &'a PortShared,
    now: Instant,
    secs: u32,
}

/// The output of the ingress checks: a frame ready to switch.
struct Admitted<'a> {
    frame: &'a Frame,
    info: FrameInfo,
    vid: u16,
}

impl Ctx<'_> {
    fn forward(&self, st: &mut IngressState, frame: Frame, touched: &mut Touched) {
        let Some(ok) = self.admit(st, &frame) else {
            return;
        };
        st.soft.clear();
        // Mirror copies go out as received, whatever the target's VLAN.
        if let Some(mirror) = self.set.mirror_of(self.me) {
            self.push_adapted(st, mirror, &frame, &ok.info, false, None, touched);
        }
        self.learn(&ok);
        if !ok.info.dst.is_multicast()
            && let Some(pref) = self.sw.table.lookup(ok.vid, ok.info.dst, self.secs)
            && let Some(dst) = self.set.by_ref(pref)
        {
            if dst.pref == self.me.pref {
                self.me.count(|c| &c.drop_same_port);
            } else {
                self.deliver(st, dst, &ok, touched);
            }
            return;
        }
        self.me.count(|c| &c.flooded);
        for dst in self.set.live() {
            if dst.pref != self.me.pref {
                self.deliver(st, dst, &ok, touched);
            }
        }
    }

    /// Parses and runs the ingress policy; None when the frame was dropped.
    fn admit<'f>(&self, st: &mut IngressState, frame: &'f Frame) -> Option<Admitted<'f>> {
        let me = self.me;
        let drop = |c: fn(&PortCounters) -> &AtomicU64| {
            me.count(c);
            None
        };
        let Ok(info) = parse(&frame.data) else {
            return drop(|c| &c.drop_malformed);
        };
        if info.src.is_multicast() || info.src.0 == [0; 6] {
            return drop(|c| &c.drop_malformed);
        }
        let Some(vid) = me.policy.vlan.ingress_vid(info.tag_vid()) else {
            return drop(|c| &c.drop_vlan);
        };
        let policy = &me.policy;
        if let Some(allowed) = &policy.allowed_macs
            && !allowed.contains(&info.src)
        {
            return drop(|c| &c.drop_spoof);
        }
        if policy.dhcp_guard && info.l4.dhcp_server {
            return drop(|c| &c.drop_dhcp_guard);
        }
        if policy.ra_guard && is_router_message(&info) {
            return drop(|c| &c.drop_ra_guard);
        }
        if let Some(storm) = &mut st.storm
            && info.dst.is_multicast()
            && !storm.take(1, self.now)
        {
            return drop(|c| &c.drop_storm);
        }
        if let Some(rate) = &mut st.rate
            && !rate.take(frame.data.len() as u64, self.now)
        {
            return drop(|c| &c.drop_ingress_rate);
        }
        if !policy.acl_allows(Direction::Outbound, &info) {
            return drop(|c| &c.drop_acl_outbound);
        }
        Some(Admitted { frame, info, vid })
    }

    fn learn(&self, ok: &Admitted<'_>) {
        match self
            .sw
            .table
            .learn(ok.vid, ok.info.src, self.me.pref, self.secs)
        {
            Learned::Full => {
                self.sw
                    .counters
                    .learn_table_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            Learned::Moved => {
                self.sw.counters.mac_moves.fetch_add(1, Ordering::Relaxed);
            }
            Learned::Known | Learned::New => {}
        }
    }

    /// Sends the frame to `dst` if its VLAN and ACL let it, with the tag
    /// rewritten for `dst` and offloads it cannot take done in software.
    fn deliver(
        &self,
        st: &mut IngressState,
        dst: &PortShared,
        ok: &Admitted<'_>,
        touched: &mut Touched,
    ) {
        let had_tag = ok.info.tci.is_some();
        let (strip_tag, tag) = match dst.policy.vlan.egress(ok.vid) {
            Egress::NotMember => return,
            Egress::Untagged => (had_tag, None),
            Egress::Tagged if ok.info.tag_vid() == Some(ok.vid) => (false, None),
            Egress::Tagged => {
                let pcp = ok.info.tci.unwrap_or(0) & 0xf000;
                (had_tag, Some(pcp | ok.vid))
            }
        };
        if !dst.policy.acl_allows(Direction::Inbound, &ok.info) {
            dst.count(|c| &c.drop_acl_inbound);
            return;
        }
        self.push_adapted(st, dst, ok.frame, &ok.info, strip_tag, tag, touched);
        if let Some(mirror) = self.set.mirror_of(dst) {
            self.push_adapted(st, mirror, ok.frame, &ok.info, false, None, touched);
        }
    }

    /// Queues the frame to `dst` whole if `dst` takes its offloads, else as
    /// the software-offloaded copies (made at most once per frame).
    #[allow(clippy::too_many_arguments)]
    fn push_adapted(
        &self,
        st: &mut IngressState,
        dst: &PortShared,
        frame: &Frame,
        info: &FrameInfo,
        strip_tag: bool,
        tag: Option<u16>,
        touched: &mut Touched,
    ) {
        if dst.caps.accepts(&frame.offload) {
            let d = Delivery {
                data: frame.data.clone(),
                offload: frame.offload,
                strip_tag,
                tag,
            };
            dst.push(d, touched);
            return;
        }
        if st.soft.is_empty() && software_offload(frame, info, &mut st.soft).is_err() {
            st.soft.clear();
            dst.count(|c| &c.drop_offload);
            return;
        }
        for data in &st.soft {
            let d = Delivery {
                data: data.clone(),
                offload: Default::default(),
                strip_tag,
                tag,
            };
            dst.push(d, touched);
        }
    }
}

/// Segments or checksums `frame` into `out`.
fn software_offload(
    frame: &Frame,
    info: &FrameInfo,
    out: &mut Vec<Bytes>,
) -> Result<(), offload::OffloadError> {
    match (frame.offload.gso, frame.offload.csum) {
        (Some(gso), _) => offload::segment(&frame.data, info.l3_offset, gso, out),
        (None, Some(csum)) => {
            out.push(offload::complete_csum(&frame.data, csum)?);
            Ok(())
        }
        (None, None) => {
            out.push(frame.data.clone());
            Ok(())
        }
    }
}

/// A router advertisement or redirect, or an IPv6 packet whose upper layer
/// could not be found (it might hide one).
fn is_router_message(info: &FrameInfo) -> bool {
    if info.ethertype != crate::wire::ETHERTYPE_IPV6 {
        return false;
    }
    match info.l4.proto {
        None => true,
        Some(IPPROTO_ICMPV6) => matches!(
            info.l4.icmp6_type,
            Some(ICMPV6_ROUTER_ADVERT | ICMPV6_REDIRECT) | None
        ),
        Some(_) => false,
    }
}
