//! What tests, the demo and benchmarks send and wait for as a guest: the
//! frame builders of [`crate::testing`] and the exchanges built on them.

use std::time::{Duration, Instant};

use super::{NetvscClient, NetvscError, PacketInfo, TxFrame, VscChannel};
use crate::offload::{fold, ones_sum};
pub use crate::testing::{arp, eth, icmp_echo, ipv4, udp};
use crate::wire::MacAddr;

/// Polls channel 0, answering ARP requests for `ip` (the guest's
/// address), until `f` returns true for a frame or `timeout` passes;
/// false on timeout.
pub fn pump<C: VscChannel>(
    c: &mut NetvscClient<C>,
    ip: [u8; 4],
    timeout: Duration,
    mut f: impl FnMut(&[u8], &PacketInfo) -> bool,
) -> Result<bool, NetvscError> {
    let deadline = Instant::now() + timeout;
    let mac = c.mac;
    let mut frames = Vec::new();
    while Instant::now() < deadline {
        frames.clear();
        c.poll(0, |fr| frames.push((fr.to_vec(), fr.info)))?;
        for (fr, info) in &frames {
            if let Some((sha, spa)) = arp_request_for(fr, ip) {
                c.send(0, &[TxFrame::new(&arp(2, mac, ip, sha, spa))])?;
                continue;
            }
            if f(fr, info) {
                return Ok(true);
            }
        }
        c.wait(0, Duration::from_millis(5))?;
    }
    Ok(false)
}

/// The sender of an ARP request for `ip`.
fn arp_request_for(f: &[u8], ip: [u8; 4]) -> Option<(MacAddr, [u8; 4])> {
    let is = f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == ip;
    is.then(|| {
        (
            MacAddr(f[22..28].try_into().expect("6 bytes")),
            f[28..32].try_into().expect("4 bytes"),
        )
    })
}

/// Resolves `ip` with ARP from the guest at `me` (five tries).
pub fn resolve<C: VscChannel>(
    c: &mut NetvscClient<C>,
    me: [u8; 4],
    ip: [u8; 4],
) -> Result<Option<MacAddr>, NetvscError> {
    let req = arp(1, c.mac, me, MacAddr::default(), ip);
    let mut mac = None;
    for _ in 0..5 {
        c.send(0, &[TxFrame::new(&req)])?;
        let found = pump(c, me, Duration::from_secs(2), |f, _| {
            let reply =
                f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == ip;
            if reply {
                mac = Some(MacAddr(f[22..28].try_into().expect("6 bytes")));
            }
            reply
        })?;
        if found {
            break;
        }
    }
    Ok(mac)
}

/// One ICMP echo from the guest at `me` to `ip` (at `mac`) with a
/// 56-byte payload derived from `seq`; returns the round-trip time if
/// a reply with the same payload and a valid checksum came back.
pub fn ping<C: VscChannel>(
    c: &mut NetvscClient<C>,
    me: [u8; 4],
    ip: [u8; 4],
    mac: MacAddr,
    seq: u16,
) -> Result<Option<Duration>, NetvscError> {
    let payload: Vec<u8> = (0..56).map(|i| (i as u8) ^ (seq as u8)).collect();
    let f = eth(
        mac,
        c.mac,
        0x0800,
        &ipv4(me, ip, 1, &icmp_echo(0x77, seq, &payload)),
    );
    let start = Instant::now();
    c.send(0, &[TxFrame::new(&f)])?;
    let mut ok = false;
    pump(c, me, Duration::from_secs(5), |f, _| {
        let reply = f.len() >= 42
            && f[12..14] == [8, 0]
            && f[23] == 1
            && f[26..30] == ip
            && f[34] == 0
            && f[40..42] == seq.to_be_bytes();
        if reply {
            ok = fold(ones_sum(&f[34..], 0)) == 0xffff && f[42..] == payload[..];
        }
        reply
    })?;
    Ok(ok.then(|| start.elapsed()))
}
