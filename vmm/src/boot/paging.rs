//! Identity page tables for the first 4 GiB (2 MiB pages), so a kernel or
//! test guest starts in long mode with RAM, MMIO and the LAPIC reachable at
//! their physical addresses.

use crate::layout::{PD, PDPT};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;

/// One 4 KiB page-table page.
#[repr(C, align(4096))]
#[derive(Clone, Debug, zerocopy::IntoBytes, zerocopy::Immutable)]
pub struct PageTable(pub [u64; 512]);

/// The boot page tables: PML4, PDPT and four page directories.
#[derive(Clone, Debug)]
pub struct BootPageTables {
    pub pml4: PageTable,
    pub pdpt: PageTable,
    pub pds: [PageTable; 4],
}

/// Builds identity tables for `[0, 4 GiB)` at the fixed layout addresses.
pub fn boot_page_tables() -> BootPageTables {
    let mut pml4 = PageTable([0; 512]);
    pml4.0[0] = PDPT | PRESENT | WRITABLE;
    let mut pdpt = PageTable([0; 512]);
    for (i, e) in pdpt.0.iter_mut().take(4).enumerate() {
        *e = (PD + i as u64 * 4096) | PRESENT | WRITABLE;
    }
    let pds = std::array::from_fn(|d| {
        let mut pd = PageTable([0; 512]);
        for (i, e) in pd.0.iter_mut().enumerate() {
            let addr = ((d as u64) << 30) | ((i as u64) << 21);
            *e = addr | PRESENT | WRITABLE | HUGE;
        }
        pd
    });
    BootPageTables { pml4, pdpt, pds }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn tables_identity_map_four_gib() {
        let t = boot_page_tables();
        assert_eq!(size_of::<PageTable>(), 4096);
        // PML4[0] -> PDPT at 0xa000, present + writable.
        assert_eq!(&t.pml4.as_bytes()[..8], &[0x03, 0xa0, 0, 0, 0, 0, 0, 0]);
        assert!(t.pml4.as_bytes()[8..].iter().all(|&b| b == 0));
        // PDPT[0..4] -> PDs at 0xb000, 0xc000, 0xd000, 0xe000.
        assert_eq!(&t.pdpt.as_bytes()[..8], &[0x03, 0xb0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&t.pdpt.as_bytes()[24..32], &[0x03, 0xe0, 0, 0, 0, 0, 0, 0]);
        assert!(t.pdpt.as_bytes()[32..].iter().all(|&b| b == 0));
        // PD0[1] maps 2 MiB as a huge page; PD3[511] maps the LAPIC's 2 MiB.
        assert_eq!(&t.pds[0].as_bytes()[8..16], &[0x83, 0, 0x20, 0, 0, 0, 0, 0]);
        assert_eq!(t.pds[3].0[511], 0xffe0_0083);
        // The LAPIC page (0xfee0_0000) is PD3[503], identity mapped.
        assert_eq!(t.pds[3].0[503], crate::layout::LAPIC_ADDR | 0x83);
    }
}
