//! How fast does this host's KVM run guest code?
//!
//! Some hosts (nested setups without hardware virtualization exposed) give
//! a `/dev/kvm` that emulates every guest instruction: small guests run,
//! a stock Linux kernel cannot (it is too slow, and the emulator lacks
//! CMPXCHG16B, XSAVE and software interrupts). A probe guest runs a counted
//! loop; its instruction rate tells the two kinds apart.

use std::time::{Duration, Instant};

use crate::boot::{BootConfig, ImageFormat};
use crate::vm::{Vm, VmConfig, VmError, VmExit};

/// Below this many guest instructions per second, KVM is emulating.
pub const NATIVE_MIPS_THRESHOLD: f64 = 20.0;

/// Iterations of the probe loop (two instructions each).
const LOOPS: u32 = 2_000_000;

/// `mov ecx, n; l: dec ecx; jnz l; mov al, 0xfe; out 0x64, al`.
fn probe_code(n: u32) -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend_from_slice(&n.max(1).to_le_bytes());
    code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xb0, 0xfe, 0xe6, 0x64]);
    code
}

fn time_guest(n: u32) -> Result<Duration, VmError> {
    let path = std::env::temp_dir().join(format!("vspa-probe-{}-{n}.bin", std::process::id()));
    std::fs::write(&path, probe_code(n))?;
    let vm = Vm::new(VmConfig {
        memory_bytes: 8 << 20,
        vcpus: 1,
        boot: BootConfig {
            kernel: path.clone(),
            format: ImageFormat::Flat,
            initrd: None,
            cmdline: String::new(),
        },
        console: Box::new(std::io::sink()),
        registry: Default::default(),
        virtio: Vec::new(),
        force_msr_filter: false,
    });
    let _ = std::fs::remove_file(&path);
    let running = vm?.start()?;
    let start = Instant::now();
    let exit = running.wait_timeout(Duration::from_secs(60));
    let elapsed = start.elapsed();
    running.stop();
    match exit {
        Some(VmExit::Reset) => Ok(elapsed),
        other => Err(VmError::Setup(if other.is_none() {
            "probe guest did not finish within 60 s"
        } else {
            "probe guest did not reset"
        })),
    }
}

/// Guest instructions per second (in millions) on this host's KVM.
pub fn guest_mips() -> Result<f64, VmError> {
    let base = time_guest(1)?;
    let full = time_guest(LOOPS)?;
    let secs = full.saturating_sub(base).as_secs_f64().max(1e-6);
    Ok(2.0 * f64::from(LOOPS) / secs / 1e6)
}

/// True if KVM here emulates guest code instead of running it natively.
pub fn emulation_only() -> Result<bool, VmError> {
    Ok(guest_mips()? < NATIVE_MIPS_THRESHOLD)
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_code_bytes() {
        assert_eq!(
            super::probe_code(0x100),
            [
                0xb9, 0, 1, 0, 0, 0xff, 0xc9, 0x75, 0xfc, 0xb0, 0xfe, 0xe6, 0x64
            ]
        );
    }
}
