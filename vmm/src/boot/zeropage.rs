//! The Linux zero page (`struct boot_params`) and its e820 memory map.
//!
//! The struct itself is linux-loader's `#[repr(C, packed)]` binding of
//! `arch/x86/include/uapi/asm/bootparam.h`; the tests pin the fields vspa
//! fills to their byte offsets in that header.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout::{self, ACPI_START, CMDLINE, EBDA_START, HIMEM_START};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// "HdrS", the setup header magic.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// loadflags: kernel loaded high; the loader may use the heap.
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;

/// The e820 map for `ram_bytes` of RAM: low RAM, the BIOS area (which holds
/// the ACPI tables) reserved, RAM from 1 MiB, and RAM above 4 GiB if any.
pub fn e820_map(ram_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (gpa, len) in layout::ram_ranges(ram_bytes) {
        let start = gpa.max(HIMEM_START);
        if gpa + len > start {
            map.push(entry(start, gpa + len - start, E820_RAM));
        }
    }
    map
}

/// Where the initrd sits in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub gpa: u64,
    pub size: u64,
}

/// Fills a zero page from the kernel's setup header.
pub fn build(
    header: Option<setup_header>,
    ram_bytes: u64,
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> Box<boot_params> {
    let mut params = Box::new(boot_params::default());
    let mut hdr = header.unwrap_or_default();
    hdr.boot_flag = 0xaa55;
    hdr.header = HDRS_MAGIC;
    hdr.type_of_loader = 0xff; // undefined loader
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        hdr.ramdisk_image = i.gpa as u32;
        hdr.ramdisk_size = i.size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = ACPI_START;
    let map = e820_map(ram_bytes);
    params.e820_entries = map.len() as u8;
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = e;
    }
    params
}

/// The zero page as bytes (to write into guest memory).
pub fn as_bytes(params: &boot_params) -> &[u8] {
    // boot_params is packed plain data of exactly 4096 bytes.
    let ptr = (params as *const boot_params).cast::<u8>();
    #[allow(unsafe_code)]
    // SAFETY: boot_params is repr(C, packed) plain old data (no padding, no
    // pointers); viewing it as bytes for its own size is sound.
    unsafe {
        std::slice::from_raw_parts(ptr, size_of::<boot_params>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn e820_map_for_small_and_large_guests() {
        let small = e820_map(64 << 20);
        let got: Vec<(u64, u64, u32)> = small.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (0x10_0000, (64 << 20) - 0x10_0000, 1)
            ]
        );
        let large = e820_map(5 << 30);
        assert_eq!(large.len(), 4);
        assert_eq!(
            (large[2].addr, large[2].size),
            (0x10_0000, (3 << 30) - 0x10_0000)
        );
        assert_eq!((large[3].addr, large[3].size), (4 << 30, 2 << 30));
    }

    #[test]
    fn zero_page_bytes_at_bootparam_h_offsets() {
        let header = setup_header {
            setup_sects: 27,
            version: 0x020f,
            xloadflags: 0x7f,
            ..Default::default()
        };
        let p = build(
            Some(header),
            64 << 20,
            12,
            Some(Initrd {
                gpa: 0x300_0000,
                size: 0x12345,
            }),
        );
        let b = as_bytes(&p);
        assert_eq!(b.len(), 4096);
        assert_eq!(u64_at(b, 0x070), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(b[0x1e8], 3, "e820_entries");
        assert_eq!(b[0x1f1], 27, "setup_sects");
        assert_eq!(&b[0x1fe..0x200], &[0x55, 0xaa], "boot_flag");
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(&b[0x206..0x208], &[0x0f, 0x02], "version");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(b[0x211], 0x81, "loadflags");
        assert_eq!(u32_at(b, 0x218), 0x300_0000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 0x12345, "ramdisk_size");
        assert_eq!(&b[0x224..0x226], &[0x00, 0xfe], "heap_end_ptr");
        assert_eq!(u32_at(b, 0x228), 0x2_0000, "cmd_line_ptr");
        assert_eq!(&b[0x236..0x238], &[0x7f, 0], "xloadflags");
        assert_eq!(u32_at(b, 0x238), 12, "cmdline_size");
        // e820_table at 0x2d0, 20 bytes per entry: addr u64, size u64, type u32.
        assert_eq!(u64_at(b, 0x2d0), 0);
        assert_eq!(u64_at(b, 0x2d8), 0x9fc00);
        assert_eq!(u32_at(b, 0x2e0), 1);
        assert_eq!(u64_at(b, 0x2e4), 0x9fc00);
        assert_eq!(u32_at(b, 0x2f4), 2);
        assert_eq!(u64_at(b, 0x2f8), 0x10_0000);
        assert_eq!(u64_at(b, 0x300), (64 << 20) - 0x10_0000);
        assert_eq!(u32_at(b, 0x308), 1);
        assert!(b[0x30c..0x320].iter().all(|&x| x == 0));
    }
}
