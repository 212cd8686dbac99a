//! The guest-physical memory map every VM gets.
//!
//! ```text
//! 0x0000_0500  boot GDT                 0x0000_7000  zero page (boot_params)
//! 0x0000_9000  PML4, PDPT, 4 PDs        identity map of the low 4 GiB, 2 MiB pages
//! 0x0002_0000  kernel command line      0x000e_0000  ACPI tables (RSDP first)
//! 0x0010_0000  kernel / flat image      ...          RAM up to 3 GiB
//! 0xc000_0000  MMIO gap: virtio-mmio at 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

/// Boot GDT: null, null, code64 (0x10), data (0x18), TSS (0x20), as the
/// Linux 64-bit boot protocol expects (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18).
pub const BOOT_GDT: u64 = 0x500;
/// The zero page (`struct boot_params`) handed to a Linux kernel in RSI.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer (grows down below the page tables).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables: PML4, then one PDPT, then four page directories.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line (NUL-terminated).
pub const CMDLINE: u64 = 0x2_0000;
/// Longest command line accepted (Linux's COMMAND_LINE_SIZE on x86-64).
pub const CMDLINE_MAX: usize = 2048;
/// ACPI tables, in the BIOS area Linux scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where RAM below the EBDA ends in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// Kernels and flat images load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO gap: RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IOAPIC pin used by virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The 16550 UART (COM1) and its IOAPIC pin.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller's data and command ports.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// The PCI reset control register (a write of 0x6/0xe resets).
pub const RESET_CONTROL: u16 = 0xcf9;
/// Hypercall trap ports written by the hypercall page (see `hv::hypercall`).
pub const HV_HYPERCALL_PORT: u16 = 0x4856;
pub const HV_SIGNAL_PORT: u16 = 0x4857;
/// KVM's TSS and identity-map pages (Intel needs them below 4 GiB).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Guest-physical ranges of RAM for `ram_bytes` of memory: below the MMIO
/// gap first, the rest from 4 GiB.
pub fn ram_ranges(ram_bytes: u64) -> Vec<(u64, u64)> {
    if ram_bytes <= MMIO_GAP_START {
        vec![(0, ram_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, ram_bytes - MMIO_GAP_START),
        ]
    }
}

/// GPA of the `index`th virtio-mmio window.
pub fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT, 40),
            (ZERO_PAGE, 4096),
            (PML4, 4096),
            (PDPT, 4096),
            (PD, 4 * 4096),
            (CMDLINE, CMDLINE_MAX as u64),
            (ACPI_START, ACPI_END - ACPI_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        const { assert!(BOOT_STACK < PML4 && BOOT_STACK > ZERO_PAGE + 4096) };
    }
}
