//! CPUID for each vCPU: what KVM supports, plus the Hyper-V leaves that make
//! a Linux guest take the Hyper-V path (and load `hv_vmbus`).
//!
//! KVM's own signature leaves move from 0x4000_0000 to 0x4000_0100, where
//! Linux still finds kvmclock while detecting "Microsoft Hv" first.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 0x4000_0000: highest leaf, "Microsoft Hv".
pub const HV_VENDOR_LEAF: u32 = 0x4000_0000;
pub const HV_MAX_LEAF: u32 = 0x4000_0006;
/// Where KVM's signature leaves move.
pub const KVM_LEAF_BASE: u32 = 0x4000_0100;

/// HYPERV_CPUID_FEATURES EAX: partition privileges (low half).
pub mod features {
    pub const TIME_REF_COUNT: u32 = 1 << 1;
    pub const SYNIC: u32 = 1 << 2;
    pub const HYPERCALL: u32 = 1 << 5;
    pub const VP_INDEX: u32 = 1 << 6;
    pub const REFERENCE_TSC: u32 = 1 << 9;
    /// EBX (high half of the privilege mask): PostMessages, SignalEvents.
    pub const POST_MESSAGES: u32 = 1 << 4;
    pub const SIGNAL_EVENTS: u32 = 1 << 5;
}

/// HYPERV_CPUID_ENLIGHTMENT_INFO EAX bit 9: do not use auto-EOI.
pub const DEPRECATE_AUTO_EOI: u32 = 1 << 9;

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

fn regs_of(s: &[u8; 12]) -> [u32; 3] {
    std::array::from_fn(|i| u32::from_le_bytes(s[i * 4..i * 4 + 4].try_into().expect("4")))
}

/// The Hyper-V leaves 0x4000_0000..=0x4000_0006 for `vcpus` processors;
/// `tsc_page` offers the reference TSC page.
pub fn hyperv_leaves(vcpus: u32, tsc_page: bool) -> Vec<kvm_cpuid_entry2> {
    let privileges = features::TIME_REF_COUNT
        | features::SYNIC
        | features::HYPERCALL
        | features::VP_INDEX
        | if tsc_page { features::REFERENCE_TSC } else { 0 };
    let [b, c, d] = regs_of(b"Microsoft Hv");
    vec![
        leaf(HV_VENDOR_LEAF, HV_MAX_LEAF, b, c, d),
        // Interface signature "Hv#1".
        leaf(0x4000_0001, u32::from_le_bytes(*b"Hv#1"), 0, 0, 0),
        // System identity: build 0, version 10.0.
        leaf(0x4000_0002, 0, 10 << 16, 0, 0),
        leaf(
            0x4000_0003,
            privileges,
            features::POST_MESSAGES | features::SIGNAL_EVENTS,
            0,
            0,
        ),
        // Recommendations: no auto-EOI; never notify on long spinlocks.
        leaf(0x4000_0004, DEPRECATE_AUTO_EOI, u32::MAX, 0, 0),
        // Implementation limits: max VPs, max LPs.
        leaf(0x4000_0005, vcpus, vcpus, 0, 0),
        leaf(0x4000_0006, 0, 0, 0, 0),
    ]
}

/// Builds the CPUID of vCPU `id` from KVM's supported set.
pub fn vcpu_cpuid(
    supported: &CpuId,
    id: u32,
    vcpus: u32,
    tsc_page: bool,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let mut out = Vec::new();
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            1 => {
                // APIC id, logical processor count, hypervisor present.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((vcpus.min(255)) << 16);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = id,
            0x4000_0000..=0x4000_00ff => {
                // KVM's leaves: keep them, one block up.
                e.function += KVM_LEAF_BASE - HV_VENDOR_LEAF;
                if e.function == KVM_LEAF_BASE {
                    e.eax = KVM_LEAF_BASE + 1;
                }
            }
            _ => {}
        }
        out.push(e);
    }
    out.extend(hyperv_leaves(vcpus, tsc_page));
    CpuId::from_entries(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyperv_leaves_are_what_linux_checks() {
        let l = hyperv_leaves(2, true);
        let v = &l[0];
        assert_eq!(v.function, 0x4000_0000);
        assert!((0x4000_0005..=0x4000_ffff).contains(&v.eax));
        let mut sig = Vec::new();
        for r in [v.ebx, v.ecx, v.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(sig, b"Microsoft Hv");
        assert_eq!(l[1].eax, 0x3123_7648, "Hv#1");
        // HV_MSR_HYPERCALL_AVAILABLE (bit 5) and HV_MSR_VP_INDEX_AVAILABLE (bit 6).
        assert_eq!(l[3].eax & 0x60, 0x60);
        assert_eq!(l[3].eax & 0x4, 0x4, "SynIC");
        assert_eq!(l[3].eax & 0x200, 0x200, "HV_MSR_REFERENCE_TSC_AVAILABLE");
        assert_eq!(hyperv_leaves(2, false)[3].eax & 0x200, 0);
        assert_eq!(l[4].eax & (1 << 9), 1 << 9);
        assert_eq!(l[5].eax, 2);
    }
}
