//! Emulated fallback devices for guests without VMBus drivers:
//! virtio-mmio ([`mmio`]) with block ([`block`]) and net ([`net`])
//! backends. Guests find them on the kernel command line
//! (`virtio_mmio.device=4K@0xd0000000:5`, see [`cmdline_entry`]).
//!
//! The device models process a queue when the driver notifies it (in the
//! vCPU thread that took the MMIO exit) and signal the driver through an
//! interrupt callback (an irqfd in the VM). Device-initiated work (frames
//! arriving for a NIC) runs in a poll thread ([`net::NetPoller`]) woken by
//! the backend's descriptor. Backends are small traits so that the `vhd`
//! block devices and `switch` ports ([`net::SwitchPort`]) plug in
//! unchanged. These are fallback devices: a device's state sits behind one
//! lock shared by the vCPU and poll threads, unlike the VMBus path.

pub mod block;
pub mod mmio;
pub mod net;

use crate::layout;

/// Feature bit: the device follows the virtio 1.x spec.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The `virtio_mmio.device=` kernel parameter announcing device `index`.
pub fn cmdline_entry(index: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        layout::virtio_mmio_addr(index),
        layout::VIRTIO_IRQ_BASE + index as u32
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn cmdline_entries() {
        assert_eq!(
            super::cmdline_entry(0),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            super::cmdline_entry(2),
            "virtio_mmio.device=4K@0xd0002000:7"
        );
    }
}
