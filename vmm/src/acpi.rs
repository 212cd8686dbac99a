//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT whose
//! `\_SB.VMBS` device has `_HID "VMBus"`, the device `hv_vmbus` binds to.
//!
//! The tables sit in the BIOS area at `layout::ACPI_START`, where Linux
//! also finds the RSDP through the zero page's `acpi_rsdp_addr`.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};

pub const OEM_ID: [u8; 6] = *b"VSPA  ";
pub const OEM_TABLE_ID: [u8; 8] = *b"VSPAVMM ";

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables of {0} bytes do not fit the BIOS area")]
    TooLarge(usize),
    #[error("writing ACPI tables: {0}")]
    Memory(String),
}

/// MADT Interrupt Source Override (type 2): ISA IRQ `source` is GSI `gsi`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
pub struct InterruptSourceOverride {
    pub r#type: u8,
    pub length: u8,
    pub bus: u8,
    pub source: u8,
    pub gsi: u32,
    pub flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The DSDT's AML body: `Scope(\_SB) { Device(VMBS) { _HID "VMBus", _UID 0 } }`.
pub fn dsdt_aml() -> Vec<u8> {
    let hid = aml::Name::new(aml::Path::new("_HID"), &"VMBus");
    let uid = aml::Name::new(aml::Path::new("_UID"), &aml::ZERO);
    let vmbus = aml::Device::new(aml::Path::new("VMBS"), vec![&hid, &uid]);
    let sb = aml::Scope::new(aml::Path::new("\\_SB_"), vec![&vmbus]);
    let mut bytes = Vec::new();
    sb.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT table.
pub fn dsdt() -> Vec<u8> {
    let mut t = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    t.append_slice(&dsdt_aml());
    t.as_slice().to_vec()
}

/// The MADT: one local APIC per vCPU, the IOAPIC, IRQ0 -> GSI2.
pub fn madt(vcpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    m.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    to_bytes(&m)
}

/// A hardware-reduced FADT pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .finalize();
    to_bytes(&f)
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// All tables with their guest addresses, RSDP first.
pub fn build(vcpus: u32) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let align = |a: u64| a.next_multiple_of(16);
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + two entries.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let dsdt_bytes = dsdt();
    let fadt_bytes_len = acpi_tables::fadt::FADT::len() as u64;
    let dsdt_addr = align(fadt_addr + fadt_bytes_len);
    let madt_addr = align(dsdt_addr + dsdt_bytes.len() as u64);
    let madt_bytes = madt(vcpus);
    let end = madt_addr + madt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge((end - ACPI_START) as usize));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    Ok(vec![
        (rsdp_addr, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        (xsdt_addr, to_bytes(&xsdt)),
        (fadt_addr, fadt(dsdt_addr)),
        (dsdt_addr, dsdt_bytes),
        (madt_addr, madt_bytes),
    ])
}

/// Writes the tables into guest memory. (`virtio` devices are announced on
/// the command line, not in the DSDT.)
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u32, _virtio: usize) -> Result<(), AcpiError> {
    for (gpa, bytes) in build(vcpus)? {
        mem.write_slice(&bytes, GuestAddress(gpa))
            .map_err(|e| AcpiError::Memory(e.to_string()))?;
    }
    Ok(())
}

/// True if the bytes sum to zero (ACPI checksum rule).
pub fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn tables_link_up_and_checksum() {
        let t = build(2).unwrap();
        let (rsdp_addr, rsdp) = &t[0];
        assert_eq!(*rsdp_addr, 0xe_0000);
        assert_eq!(rsdp.len(), 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]), "ACPI 1.0 checksum");
        assert!(checksum_ok(rsdp), "extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(rsdp, 20), 36, "length");
        let (xsdt_addr, xsdt) = &t[1];
        assert_eq!(u64_at(rsdp, 24), *xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(u64_at(xsdt, 36), t[2].0, "XSDT[0] = FADT");
        assert_eq!(u64_at(xsdt, 44), t[4].0, "XSDT[1] = MADT");
        for (_, table) in &t[1..] {
            assert!(checksum_ok(table), "{:?}", &table[..4]);
            assert_eq!(u32_at(table, 4) as usize, table.len());
            assert_eq!(&table[10..16], b"VSPA  ");
        }
        let fadt = &t[2].1;
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(u64_at(fadt, 140), t[3].0, "X_DSDT");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        let madt = &t[4].1;
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        // Two local APICs (type 0, len 8), the IOAPIC (1, 12), the override (2, 10).
        assert_eq!(&madt[44..52], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&madt[52..60], &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&madt[60..72], &[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        assert_eq!(&madt[72..82], &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(madt.len(), 82);
    }

    #[test]
    fn dsdt_aml_bytes() {
        // Scope (\_SB) { Device (VMBS) { Name (_HID, "VMBus") Name (_UID, Zero) } }
        let expected: Vec<u8> = [
            &[0x10, 0x1f][..],   // ScopeOp, PkgLength 31
            b"\\_SB_",           // RootChar + NameSeg
            &[0x5b, 0x82, 0x17], // DeviceOp, PkgLength 23
            b"VMBS",
            &[0x08],
            b"_HID",
            &[0x0d],
            b"VMBus",
            &[0x00], // Name(_HID, "VMBus")
            &[0x08],
            b"_UID",
            &[0x00], // Name(_UID, Zero)
        ]
        .concat();
        assert_eq!(dsdt_aml(), expected);
        let d = dsdt();
        assert_eq!(&d[..4], b"DSDT");
        assert!(checksum_ok(&d));
        assert_eq!(&d[36..], &expected[..]);
    }
}
