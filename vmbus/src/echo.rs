//! The echo device: returns every packet's payload as an in-band packet
//! with the same transaction id. It exercises the whole VMBus path (offers,
//! GPADLs, rings, signalling, backpressure) without any device protocol and
//! serves the demo, the tests and the ring benchmark.

use std::time::{Duration, Instant};

use crate::ThreadKind;
use crate::channel::{Channel, ChannelWorker, Wait, spawn_worker};
use crate::guid::{ECHO_INTERFACE, Guid};
use crate::ring::{DESCRIPTOR_SIZE, RingError, WriteError};
use crate::server::{Device, DeviceOffer, OpenError, OpenedChannel};
use crate::wire::packet_type;
use crate::worker::IdleSpin;

/// Packets echoed per batch before publishing indices.
const BATCH: usize = 64;

/// An echo VSP.
#[derive(Debug, Clone)]
pub struct EchoDevice {
    instance: Guid,
    /// Sub-channels requested when a primary channel opens.
    pub subchannels: u16,
    /// How long a peer may leave our replies unread while we have more to
    /// send before its channel is reset.
    pub stall_timeout: Duration,
    /// How long an idle worker polls before it sleeps (0: at once).
    pub spin: Duration,
}

impl EchoDevice {
    pub fn new(instance: Guid) -> Self {
        EchoDevice {
            instance,
            subchannels: 0,
            stall_timeout: Duration::from_secs(10),
            spin: Duration::ZERO,
        }
    }
}

impl Device for EchoDevice {
    fn offer(&self) -> DeviceOffer {
        DeviceOffer::new("echo", ECHO_INTERFACE, self.instance)
    }

    fn open(&self, ch: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        let (spin, stall) = (self.spin, self.stall_timeout);
        if ch.subchannel_index == 0 && self.subchannels > 0 {
            ch.control.offer_subchannels(self.subchannels);
        }
        let name = format!("echo-{}", ch.relid);
        Ok(spawn_worker(name, ThreadKind::DeviceWorker, move |stop| {
            let (channel, context) = ch.into_channel(stop);
            if let Err(e) = echo_loop(channel, spin, stall) {
                context.control.reset(e.to_string());
            }
        })?)
    }
}

/// Why an echo worker gave up on its channel.
#[derive(Debug, thiserror::Error)]
enum EchoError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("peer stopped reading for {0:?}")]
    Stalled(Duration),
}

fn echo_loop(mut ch: Channel, spin: Duration, stall: Duration) -> Result<(), EchoError> {
    let mut idle = IdleSpin::new(spin);
    loop {
        match echo_batch(&mut ch)? {
            Batch::Full(payload) => wait_space(&mut ch, payload, stall)?,
            batch if idle.keep_polling(matches!(batch, Batch::Progress)) => {}
            _ => {
                if ch.wait_for_work(None)? == Wait::Stopped {
                    return Ok(());
                }
            }
        }
        if ch.stop_token().is_stopped() {
            return Ok(());
        }
    }
}

fn wait_space(ch: &mut Channel, payload: usize, stall: Duration) -> Result<(), EchoError> {
    let start = Instant::now();
    loop {
        match ch.wait_for_space(payload, Some(Duration::from_millis(100)))? {
            Wait::Ready | Wait::Stopped => return Ok(()),
            Wait::TimedOut if start.elapsed() >= stall => return Err(EchoError::Stalled(stall)),
            Wait::TimedOut => {}
        }
    }
}

enum Batch {
    Progress,
    Idle,
    /// A reply with this many payload bytes did not fit.
    Full(usize),
}

fn echo_batch(ch: &mut Channel) -> Result<Batch, RingError> {
    let mut done = 0;
    while done < BATCH {
        let Some(p) = ch.incoming.read()? else { break };
        let payload = p.payload();
        let txid = p.desc.transaction_id;
        match ch.outgoing.reserve(DESCRIPTOR_SIZE, payload.len()) {
            Ok(mut slot) => {
                slot.write_shared(DESCRIPTOR_SIZE, &payload);
                slot.finish(packet_type::DATA_INBAND, 0, txid);
                done += 1;
            }
            Err(WriteError::Full { .. }) => {
                let len = payload.len();
                ch.incoming.unread();
                ch.flush()?;
                return Ok(Batch::Full(len));
            }
            Err(WriteError::Ring(e)) => return Err(e),
        }
    }
    ch.flush()?;
    Ok(if done == 0 {
        Batch::Idle
    } else {
        Batch::Progress
    })
}
