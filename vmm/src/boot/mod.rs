//! Loading a guest and the machine state it starts in.
//!
//! Every guest starts in 64-bit long mode at its entry point, as Linux's
//! 64-bit boot protocol describes: flat segments from the boot GDT, identity
//! page tables for the low 4 GiB, RSI pointing at the zero page. Images are a
//! Linux bzImage, an ELF (vmlinux or a test guest) or a flat binary loaded at
//! 1 MiB (test guests only; asked for explicitly).

pub mod gdt;
pub mod paging;
pub mod zeropage;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::layout::{self, BOOT_GDT, BOOT_STACK, CMDLINE, CMDLINE_MAX, HIMEM_START, ZERO_PAGE};

/// What kind of image `--kernel` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// bzImage or ELF, recognised by their magic numbers.
    #[default]
    Auto,
    BzImage,
    Elf,
    /// Raw 64-bit code loaded at 1 MiB and entered at its first byte.
    Flat,
}

/// The guest to boot.
#[derive(Debug, Clone, Default)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub format: ImageFormat,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Why a guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} is neither a bzImage (no \"HdrS\" at 0x202) nor an ELF file; pass --kernel-format flat for raw test guests"
    )]
    UnknownFormat(PathBuf),
    #[error(
        "bzImage {0} has no 64-bit entry point (XLF_KERNEL_64) or is older than boot protocol 2.06"
    )]
    NotBoot64(PathBuf),
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{what} of {size} bytes does not fit in guest memory")]
    TooLarge { what: &'static str, size: u64 },
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} - 1 fit")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("guest memory: {0}")]
    Memory(String),
}

/// Where the guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    pub entry: u64,
    pub zero_page: u64,
}

/// Loads kernel, initrd, command line, zero page, GDT and page tables.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    cfg: &BootConfig,
) -> Result<BootInfo, BootError> {
    if cfg.cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cfg.cmdline.len()));
    }
    if cfg.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut file = open(&cfg.kernel)?;
    let format = match cfg.format {
        ImageFormat::Auto => detect(&mut file, &cfg.kernel)?,
        f => f,
    };
    let (entry, header) = match format {
        ImageFormat::BzImage => load_bzimage(mem, &mut file, &cfg.kernel)?,
        ImageFormat::Elf => (load_elf(mem, &mut file, &cfg.kernel)?, None),
        ImageFormat::Flat | ImageFormat::Auto => (load_flat(mem, &mut file, &cfg.kernel)?, None),
    };
    let initrd = match &cfg.initrd {
        Some(path) => Some(load_initrd(mem, ram_bytes, path, header.as_ref())?),
        None => None,
    };
    write(mem, CMDLINE, cfg.cmdline.as_bytes())?;
    write(mem, CMDLINE + cfg.cmdline.len() as u64, &[0])?;
    let params = zeropage::build(header, ram_bytes, cfg.cmdline.len(), initrd);
    write(mem, ZERO_PAGE, zeropage::as_bytes(&params))?;
    write_cpu_tables(mem)?;
    Ok(BootInfo {
        entry,
        zero_page: ZERO_PAGE,
    })
}

/// Writes the boot GDT and the identity page tables.
pub fn write_cpu_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    write(mem, BOOT_GDT, gdt::boot_gdt().as_bytes())?;
    let t = paging::boot_page_tables();
    write(mem, layout::PML4, t.pml4.as_bytes())?;
    write(mem, layout::PDPT, t.pdpt.as_bytes())?;
    for (i, pd) in t.pds.iter().enumerate() {
        write(mem, layout::PD + i as u64 * 4096, pd.as_bytes())?;
    }
    Ok(())
}

fn write(mem: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|e| BootError::Memory(e.to_string()))
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> BootError + '_ {
    move |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Recognises a bzImage ("HdrS" at 0x202) or an ELF file.
fn detect(file: &mut File, path: &Path) -> Result<ImageFormat, BootError> {
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(read_err(path))?;
    file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(ImageFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(ImageFormat::BzImage);
    }
    Err(BootError::UnknownFormat(path.to_path_buf()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// XLF_KERNEL_64: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;

fn load_bzimage(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
) -> Result<(u64, Option<linux_loader::loader::bootparam::setup_header>), BootError> {
    let r = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    let hdr = r
        .setup_header
        .ok_or(BootError::NotBoot64(path.to_path_buf()))?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < 0x0206 || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::NotBoot64(path.to_path_buf()));
    }
    Ok((r.kernel_load.0 + 0x200, Some(hdr)))
}

fn load_elf(mem: &GuestMemoryMmap, file: &mut File, path: &Path) -> Result<u64, BootError> {
    let r = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok(r.kernel_load.0)
}

fn load_flat(mem: &GuestMemoryMmap, file: &mut File, path: &Path) -> Result<u64, BootError> {
    let mut image = Vec::new();
    file.read_to_end(&mut image).map_err(read_err(path))?;
    if image.is_empty() {
        return Err(BootError::Load {
            path: path.to_path_buf(),
            reason: "the image is empty".into(),
        });
    }
    mem.write_slice(&image, GuestAddress(HIMEM_START))
        .map_err(|_| BootError::TooLarge {
            what: "flat image",
            size: image.len() as u64,
        })?;
    Ok(HIMEM_START)
}

/// Places the initrd as high as the kernel allows, page aligned.
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    path: &Path,
    header: Option<&linux_loader::loader::bootparam::setup_header>,
) -> Result<zeropage::Initrd, BootError> {
    let data = std::fs::read(path).map_err(read_err(path))?;
    let size = data.len() as u64;
    let max = header.map_or(u64::from(u32::MAX), |h| u64::from(h.initrd_addr_max));
    let low_ram_end = ram_bytes.min(layout::MMIO_GAP_START);
    let top = low_ram_end.min(max.saturating_add(1));
    let gpa = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= 16 << 20)
        .ok_or(BootError::TooLarge {
            what: "initrd",
            size,
        })?;
    write(mem, gpa, &data)?;
    Ok(zeropage::Initrd { gpa, size })
}

/// Register state for entering long mode at `info.entry`.
pub fn long_mode_registers(info: &BootInfo, sregs: &mut kvm_sregs) -> kvm_regs {
    let gdt = gdt::boot_gdt();
    let code = gdt::segment(gdt::CODE_SELECTOR, gdt[2]);
    let data = gdt::segment(gdt::DATA_SELECTOR, gdt[3]);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(gdt::TSS_SELECTOR, gdt[4]);
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET | CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    kvm_regs {
        rflags: 0x2,
        rip: info.entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: info.zero_page,
        ..Default::default()
    }
}

/// FPU state after reset: x87 control word and MXCSR defaults.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ram() -> std::sync::Arc<GuestMemoryMmap> {
        crate::memory::create_guest_ram(32 << 20).unwrap()
    }

    #[test]
    fn garbage_images_are_refused_clearly() {
        let mem = ram();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x90; 1000]).unwrap();
        let cfg = BootConfig {
            kernel: f.path().into(),
            ..Default::default()
        };
        let e = load(&mem, 32 << 20, &cfg).unwrap_err();
        assert!(e.to_string().contains("neither a bzImage"), "{e}");
        let missing = BootConfig {
            kernel: "/nonexistent/vmlinuz".into(),
            ..Default::default()
        };
        assert!(matches!(
            load(&mem, 32 << 20, &missing),
            Err(BootError::Read { .. })
        ));
        // A bzImage header without the 64-bit entry point.
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 1;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
        bz[0x211] = 1;
        bz[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bz).unwrap();
        let cfg = BootConfig {
            kernel: f.path().into(),
            ..Default::default()
        };
        assert!(matches!(
            load(&mem, 32 << 20, &cfg),
            Err(BootError::NotBoot64(_))
        ));
    }

    #[test]
    fn flat_image_with_cmdline_and_initrd() {
        let mem = ram();
        let mut k = tempfile::NamedTempFile::new().unwrap();
        k.write_all(&[0xf4]).unwrap();
        let mut i = tempfile::NamedTempFile::new().unwrap();
        i.write_all(&[7u8; 5000]).unwrap();
        let cfg = BootConfig {
            kernel: k.path().into(),
            format: ImageFormat::Flat,
            initrd: Some(i.path().into()),
            cmdline: "console=ttyS0".into(),
        };
        let info = load(&mem, 32 << 20, &cfg).unwrap();
        assert_eq!(info.entry, HIMEM_START);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIMEM_START)).unwrap(), 0xf4);
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        let image: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x218)).unwrap();
        let size: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x21c)).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(image % 4096, 0);
        assert!(u64::from(image) + 5000 <= 32 << 20);
        let gdt: u64 = mem.read_obj(GuestAddress(BOOT_GDT + 16)).unwrap();
        assert_eq!(gdt, 0x00af_9b00_0000_ffff);
        let long = BootConfig {
            cmdline: "x".repeat(CMDLINE_MAX),
            ..cfg
        };
        assert!(matches!(
            load(&mem, 32 << 20, &long),
            Err(BootError::CmdlineTooLong(_))
        ));
    }
}
