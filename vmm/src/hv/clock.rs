//! The partition reference clock in 100 ns units: the TIME_REF_COUNT MSR
//! and the reference TSC page that lets a guest read the same clock with
//! `rdtsc` and no exit (Linux's `hyperv_clocksource_tsc_page`).
//!
//! Both derive from the guest's TSC: reference time is the guest TSC times
//! `scale` (10^7 / TSC Hz as a 0.64 fixed-point fraction) plus an offset that makes the
//! clock start at 0 when it is created (with the VM, as Hyper-V's starts
//! with the partition), so the page and the MSR agree exactly. The VMM sees
//! the guest TSC as its own TSC plus the offset KVM applies,
//! measured once on the first vCPU.

/// TSC page layout (`struct ms_hyperv_tsc_page`): sequence, reserved,
/// scale, offset.
pub const TSC_PAGE_SEQUENCE: usize = 0;
pub const TSC_PAGE_SCALE: usize = 8;
pub const TSC_PAGE_OFFSET: usize = 16;

/// Sequence value published in the page; 0 would tell the guest the page
/// is invalid (fall back to the MSR).
const SEQUENCE: u32 = 1;

/// Slowest TSC the 64-bit scale can express (10 MHz).
const MIN_TSC_KHZ: u32 = 10_000;

/// The guest's reference clock.
#[derive(Debug, Clone, Copy)]
pub struct RefClock {
    scale: u64,
    /// Added to the scaled TSC (the page's `tsc_offset`).
    offset: i64,
    /// Guest TSC minus host TSC (KVM's TSC offset).
    guest_minus_host: u64,
}

/// The host's TSC.
#[allow(unsafe_code)]
pub fn host_tsc() -> u64 {
    // SAFETY: rdtsc reads a counter; it has no memory effects and every
    // x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl RefClock {
    /// A clock for a guest TSC of `tsc_khz`, which read `guest_tsc` when
    /// the host's read `host_tsc`. None for a TSC too slow to scale.
    pub fn new(tsc_khz: u32, guest_tsc: u64, host_tsc: u64) -> Option<Self> {
        if tsc_khz < MIN_TSC_KHZ {
            return None;
        }
        let scale = ((10_000u128 << 64) / u128::from(tsc_khz)) as u64;
        let scaled = ((u128::from(guest_tsc) * u128::from(scale)) >> 64) as i64;
        Some(RefClock {
            scale,
            offset: scaled.wrapping_neg(),
            guest_minus_host: guest_tsc.wrapping_sub(host_tsc),
        })
    }

    pub fn scale(&self) -> u64 {
        self.scale
    }

    /// Reference time for a guest TSC value, as the guest computes it
    /// from the page.
    pub fn at(&self, guest_tsc: u64) -> u64 {
        let scaled = ((u128::from(guest_tsc) * u128::from(self.scale)) >> 64) as i64;
        scaled.wrapping_add(self.offset) as u64
    }

    /// Reference time now.
    pub fn now(&self) -> u64 {
        self.at(host_tsc().wrapping_add(self.guest_minus_host))
    }

    /// The TSC page contents (its first 24 bytes; the rest is reserved).
    pub fn page(&self) -> [u8; 24] {
        let mut p = [0u8; 24];
        p[TSC_PAGE_SEQUENCE..TSC_PAGE_SEQUENCE + 4].copy_from_slice(&SEQUENCE.to_le_bytes());
        p[TSC_PAGE_SCALE..TSC_PAGE_SCALE + 8].copy_from_slice(&self.scale.to_le_bytes());
        p[TSC_PAGE_OFFSET..TSC_PAGE_OFFSET + 8].copy_from_slice(&self.offset.to_le_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_turns_ticks_into_100ns_units() {
        // 2.5 GHz: 2.5e9 ticks are one second, 10^7 units.
        let c = RefClock::new(2_500_000, 0, 0).unwrap();
        assert_eq!(c.at(2_500_000_000), 9_999_999, "floor of 10^7");
        assert_eq!(c.at(250), 0);
        assert_eq!(c.at(2_500_000_000 * 3600), 36_000_000_000 - 1);
        let p = c.page();
        assert_eq!(&p[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(u64::from_le_bytes(p[8..16].try_into().unwrap()), c.scale());
        assert_eq!(&p[16..24], &[0; 8], "created at TSC 0: no offset");
        assert!(RefClock::new(9_999, 0, 0).is_none());
    }

    #[test]
    fn clock_starts_at_zero_whatever_the_guest_tsc() {
        // Created when the guest TSC read 7 s (at 1 GHz) and ours 2 s.
        let c = RefClock::new(1_000_000, 7_000_000_000, 2_000_000_000).unwrap();
        assert_eq!(c.at(7_000_000_000), 0);
        assert_eq!(c.at(8_000_000_000), 10_000_000);
        let p = c.page();
        // The scale is floored, so 7e9 ticks scale to one unit short of 7 s.
        assert_eq!(
            i64::from_le_bytes(p[16..24].try_into().unwrap()),
            -69_999_999
        );
        // Now, by our TSC: the guest is 5 s ahead of us.
        let host = host_tsc();
        let c = RefClock::new(1_000_000, host + 5_000_000_000, host).unwrap();
        let now = c.now();
        assert!((0..1_000_000).contains(&now), "{now}");
    }
}
