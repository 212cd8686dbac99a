//! Boot structures as the guest sees them: ACPI tables that Debian's
//! `iasl` disassembles (the DSDT shows the VMBus device), and the zero
//! page, e820 map, page tables and tables in a VM's memory.

use std::process::Command;

use vm_memory::{Bytes, GuestAddress};
use vmm::boot::{BootConfig, ImageFormat};
use vmm::vm::{Vm, VmConfig};
use vspa_tests::require_tool;

fn disassemble(dir: &std::path::Path, name: &str, table: &[u8]) -> String {
    let aml = dir.join(format!("{name}.dat"));
    std::fs::write(&aml, table).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&aml)
        .current_dir(dir)
        .output()
        .expect("run iasl");
    assert!(
        out.status.success(),
        "iasl -d {name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

#[test]
fn iasl_disassembles_the_tables_and_the_dsdt_shows_vmbus() {
    require_tool("iasl");
    let dir = tempfile::tempdir().unwrap();
    let dsdt = disassemble(dir.path(), "dsdt", &vmm::acpi::dsdt());
    assert!(dsdt.contains("Device (VMBS)"), "{dsdt}");
    assert!(dsdt.contains("Name (_HID, \"VMBus\")"), "{dsdt}");
    assert!(dsdt.contains("Scope (\\_SB)"), "{dsdt}");
    let tables = vmm::acpi::build(2).unwrap();
    let madt = disassemble(dir.path(), "apic", &tables[4].1);
    assert!(madt.contains("Local Apic Address : FEE00000"), "{madt}");
    assert!(madt.contains("Subtable Type : 01 [I/O APIC]"), "{madt}");
    assert!(madt.contains("Interrupt : 00000002"), "{madt}");
    assert!(!madt.to_lowercase().contains("invalid checksum"), "{madt}");
    let fadt = disassemble(dir.path(), "facp", &tables[2].1);
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(!fadt.to_lowercase().contains("invalid checksum"), "{fadt}");
}

#[test]
fn guest_memory_holds_the_boot_structures() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("k.bin");
    std::fs::write(&kernel, [0xf4]).unwrap();
    let vm = Vm::new(VmConfig {
        memory_bytes: 64 << 20,
        vcpus: 2,
        boot: BootConfig {
            kernel,
            format: ImageFormat::Flat,
            initrd: None,
            cmdline: "console=ttyS0".into(),
        },
        console: Box::new(std::io::sink()),
        registry: Default::default(),
        virtio: Vec::new(),
        force_msr_filter: false,
    })
    .unwrap();
    let mem = vm.memory();
    let read = |gpa: u64, len: usize| {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b
    };
    // Zero page: "HdrS", cmd_line_ptr, three e820 entries, RSDP pointer.
    let zp = read(0x7000, 4096);
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(&zp[0x228..0x22c], &0x2_0000u32.to_le_bytes());
    assert_eq!(zp[0x1e8], 3);
    assert_eq!(&zp[0x070..0x078], &0xe_0000u64.to_le_bytes());
    assert_eq!(&read(0x2_0000, 14), b"console=ttyS0\0");
    // Page tables: PML4[0] -> PDPT, PD0[0] = 2 MiB page at 0.
    assert_eq!(&read(0x9000, 8), &0xa003u64.to_le_bytes());
    assert_eq!(&read(0xb000, 8), &0x83u64.to_le_bytes());
    // RSDP -> XSDT -> FADT and MADT, all with valid checksums.
    let rsdp = read(0xe_0000, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert!(vmm::acpi::checksum_ok(&rsdp));
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let xsdt_len = u32::from_le_bytes(read(xsdt_addr + 4, 4).try_into().unwrap()) as usize;
    let xsdt = read(xsdt_addr, xsdt_len);
    assert!(vmm::acpi::checksum_ok(&xsdt));
    for entry in xsdt[36..].chunks(8) {
        let addr = u64::from_le_bytes(entry.try_into().unwrap());
        let len = u32::from_le_bytes(read(addr + 4, 4).try_into().unwrap()) as usize;
        let table = read(addr, len);
        assert!(vmm::acpi::checksum_ok(&table), "{:?}", &table[..4]);
        assert!(matches!(&table[..4], b"FACP" | b"APIC"));
    }
}
