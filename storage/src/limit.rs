//! Per-LUN I/O caps (a tenant's `lun_iops` and `lun_mbps`): how a noisy
//! tenant is kept to its share without touching the others' data path.
//!
//! Each capped LUN has two rate buckets (operations and bytes) kept as one
//! atomic "theoretical arrival time" each, the generic cell rate algorithm:
//! a request pushes the time forward by its cost, and a bucket whose time
//! runs more than [`BURST`] ahead of the clock is in debt. Every channel of
//! the controller charges the same buckets, so sub-channels share the cap.
//!
//! Charging never refuses a request already read from the ring: the worker
//! submits it and then stops reading its ring until the debt is paid
//! ([`Charge::pause`]). The guest's requests wait in its own ring, which is
//! the back-pressure a real device's queue gives. A throttled channel pauses
//! every LUN it carries; caps apply to all of a tenant's LUNs alike.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How far ahead of the clock a bucket may run before its channel pauses:
/// the burst a capped LUN may take at once.
pub const BURST: Duration = Duration::from_millis(4);

/// A paused channel resumes when its bucket is this close to the clock
/// again (half the burst), so that pauses are long enough to sleep through.
const RESUME: Duration = Duration::from_millis(2);

/// Bytes in the megabyte of `lun_mbps` (decimal, as fio and iostat say MB).
pub const MEGABYTE: u64 = 1_000_000;

/// A per-LUN cap; `None` fields are unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Reads and writes per second.
    pub iops: Option<u32>,
    /// Bytes read or written per second.
    pub bytes_per_sec: Option<u64>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bytes_per_sec.is_none()
    }
}

/// Nanoseconds on a process-wide monotonic clock.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One rate bucket: the time (on [`now_ns`]'s clock) at which everything
/// charged so far would have been served at the cap.
#[derive(Debug, Default)]
struct Bucket(AtomicU64);

impl Bucket {
    /// Charges `cost_ns`; returns how far ahead of `now` the bucket is.
    fn charge(&self, now: u64, cost_ns: u64) -> u64 {
        let mut tat = self.0.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost_ns);
            match self
                .0
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next - now,
                Err(seen) => tat = seen,
            }
        }
    }
}

/// What a charge asks of the channel that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Within the cap: keep reading.
    Go,
    /// In debt: read nothing more until this instant.
    Pause(Instant),
}

/// Time cost of one unit at `per_sec` units a second, in nanoseconds.
fn unit_cost(per_sec: u64) -> u64 {
    1_000_000_000 / per_sec.max(1)
}

/// The buckets of one controller's LUNs (indexed by LUN number), shared by
/// its channel workers.
#[derive(Debug)]
pub struct LunLimiter {
    limit: RateLimit,
    ops: Box<[Bucket]>,
    bytes: Box<[Bucket]>,
}

impl LunLimiter {
    /// Buckets for every LUN number, or `None` when `limit` caps nothing.
    pub fn new(limit: RateLimit) -> Option<Self> {
        if limit.is_unlimited() {
            return None;
        }
        let buckets = || (0..=u8::MAX).map(|_| Bucket::default()).collect();
        Some(LunLimiter {
            limit,
            ops: buckets(),
            bytes: buckets(),
        })
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Charges one read or write of `bytes` to LUN `lun`.
    pub fn charge(&self, lun: u8, bytes: u32) -> Charge {
        self.charge_at(now_ns(), lun, bytes)
    }

    fn charge_at(&self, now: u64, lun: u8, bytes: u32) -> Charge {
        let mut ahead = 0;
        if let Some(iops) = self.limit.iops {
            ahead = self.ops[usize::from(lun)].charge(now, unit_cost(iops.into()));
        }
        if let Some(rate) = self.limit.bytes_per_sec {
            // Cost of `bytes` at `rate`, in u128 so large rates stay exact.
            let cost = u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1));
            let cost = u64::try_from(cost).unwrap_or(u64::MAX);
            ahead = ahead.max(self.bytes[usize::from(lun)].charge(now, cost));
        }
        let burst = BURST.as_nanos() as u64;
        if ahead <= burst {
            return Charge::Go;
        }
        let wait = ahead - RESUME.as_nanos() as u64;
        Charge::Pause(Instant::now() + Duration::from_nanos(wait))
    }
}

/// How long a paused worker may sleep, rounded up to whole milliseconds
/// (what poll(2) counts in) so that it never wakes early and spins.
pub fn sleep_for(until: Instant) -> Duration {
    let left = until.saturating_duration_since(Instant::now());
    let ms = left.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(n: u32) -> LunLimiter {
        LunLimiter::new(RateLimit {
            iops: Some(n),
            bytes_per_sec: None,
        })
        .unwrap()
    }

    #[test]
    fn unlimited_makes_no_limiter() {
        assert!(LunLimiter::new(RateLimit::default()).is_none());
    }

    #[test]
    fn a_burst_passes_then_the_channel_pauses() {
        // 1,000 IOPS: 1 ms per operation, 4 ms of burst.
        let l = ops(1000);
        let t = 1_000_000_000;
        for _ in 0..4 {
            assert_eq!(l.charge_at(t, 0, 4096), Charge::Go);
        }
        assert!(matches!(l.charge_at(t, 0, 4096), Charge::Pause(_)));
        // Another LUN has its own bucket.
        assert_eq!(l.charge_at(t, 1, 4096), Charge::Go);
    }

    #[test]
    fn the_rate_over_time_is_the_cap() {
        // Offered 10x the cap for one simulated second, charging only when
        // not paused: the admitted count is the cap plus the burst.
        let l = ops(50_000);
        let (mut t, mut admitted, mut paused_until) = (0u64, 0u64, 0u64);
        while t < 1_000_000_000 {
            if t >= paused_until {
                admitted += 1;
                if let Charge::Pause(_) = l.charge_at(t, 3, 4096) {
                    let ahead = l.ops[3].0.load(Ordering::Relaxed) - t;
                    paused_until = t + ahead - RESUME.as_nanos() as u64;
                }
            }
            t += 2_000; // 500,000 offers a second
        }
        let burst = 50_000 * BURST.as_millis() as u64 / 1000;
        assert!(
            (50_000..=50_000 + burst + 1).contains(&admitted),
            "{admitted} admitted"
        );
    }

    #[test]
    fn bandwidth_counts_bytes() {
        // 1 MB/s: a 1 MB write is a second of debt.
        let l = LunLimiter::new(RateLimit {
            iops: None,
            bytes_per_sec: Some(MEGABYTE),
        })
        .unwrap();
        assert_eq!(l.charge_at(0, 0, 4000), Charge::Go); // 4 ms
        assert!(matches!(l.charge_at(0, 0, 1_000_000), Charge::Pause(_)));
        let ahead = l.bytes[0].0.load(Ordering::Relaxed);
        assert_eq!(ahead, 1_004_000_000);
    }

    #[test]
    fn sleeps_round_up_to_milliseconds() {
        let d = sleep_for(Instant::now() + Duration::from_micros(1500));
        assert!(d == Duration::from_millis(2) || d == Duration::from_millis(1));
        assert_eq!(sleep_for(Instant::now()), Duration::ZERO);
    }
}
