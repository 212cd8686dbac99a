//! The boot GDT and the segment registers that go with it.
//!
//! Linux's 64-bit boot protocol wants a flat 64-bit code segment at 0x10
//! and a flat data segment at 0x18; test guests use the same. KVM also needs
//! a valid task register, hence the TSS descriptor.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Builds a legacy 8-byte segment descriptor.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Flags (access byte + G/DB/L nibble) of each boot descriptor.
const CODE64_FLAGS: u16 = 0xa09b; // G, L, present, DPL0, code, exec/read, accessed
const DATA_FLAGS: u16 = 0xc093; // G, DB, present, DPL0, data, read/write, accessed
const TSS_FLAGS: u16 = 0x808b; // G, present, busy 64-bit TSS

/// The boot GDT: null, null, code64, data, TSS.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        descriptor(CODE64_FLAGS, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
        descriptor(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// The KVM segment register state matching a descriptor.
pub fn segment(selector: u16, desc: u64) -> kvm_segment {
    let base = ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000);
    let limit = (desc & 0xffff) | ((desc >> 32) & 0xf_0000);
    let g = (desc >> 55) & 1;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g: g as u8,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_hand_checked_values() {
        // The classic flat descriptors (as in Linux's boot code and every VMM).
        let gdt = boot_gdt();
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[4], 0x008f_8b00_0000_ffff);
        let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
        assert_eq!(
            &bytes[16..24],
            &[0xff, 0xff, 0x00, 0x00, 0x00, 0x9b, 0xaf, 0x00]
        );
    }

    #[test]
    fn segments_decode_the_descriptors() {
        let cs = segment(CODE_SELECTOR, boot_gdt()[2]);
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s), (1, 0, 1, 1, 1));
        assert_eq!((cs.type_, cs.limit, cs.base), (0xb, 0xffff_ffff, 0));
        let ds = segment(DATA_SELECTOR, boot_gdt()[3]);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tr = segment(TSS_SELECTOR, boot_gdt()[4]);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
        assert_eq!(
            segment(0x28, descriptor(0x0093, 0x1234_5678, 0x1_2345)).base,
            0x1234_5678
        );
    }
}
