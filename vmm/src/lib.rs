//! The minimal KVM VMM and the wiring of the `vspa` appliance.
//!
//! # Place in the data path
//!
//! The VMM is how a guest reaches the same VSPs that hosted-mode clients
//! use. It gives the guest the Hyper-V synthetic interface ([`hv`]), which
//! becomes one more [`vmbus::server::Transport`]: the channel server sits
//! behind it unchanged, and VSP workers serve the guest's rings in guest RAM
//! exactly as they serve a client's memfd. On the data path the VMM is not
//! involved at all: the guest's HvSignalEvent lands on an ioeventfd inside
//! KVM and wakes the VSP worker; the worker interrupts the guest with an
//! atomic OR into the SIEFP page and one KVM_SIGNAL_MSI.
//!
//! # Architecture
//!
//! ```text
//!  vspa run ──▶ vm::Vm::new(VmConfig)
//!                ├─ memory: guest RAM in a memfd (ring pages can be mapped twice)
//!                ├─ boot:   bzImage / ELF / flat, zero page, e820, GDT, page tables
//!                ├─ acpi:   RSDP, XSDT, FADT, MADT, DSDT with the "VMBus" device
//!                ├─ cpuid:  KVM's leaves + Hyper-V leaves 0x4000_0000..
//!                ├─ hv:     synthetic MSRs (userspace MSR exits), hypercall page
//!                │          (port I/O traps), SynIC transport ──▶ vmbus::server
//!                ├─ devices: 16550 UART, i8042 reset, 0xcf9
//!                └─ virtio: virtio-mmio block / net fallback devices
//!              vm::Vm::start() ─▶ one thread per vCPU (exit loop), one for
//!                                 VMBus control requests
//!              virtio::net::NetPoller ─▶ one thread per virtio NIC on a
//!                                 switch port (frames into the guest)
//! ```
//!
//! The VSPs come from the appliance's configuration exactly as for
//! `vspa serve`: storage controllers and the switches' netvsp NICs are
//! devices in the registry; a virtio NIC is a [`virtio::net::SwitchPort`]
//! of a running switch.
//!
//! Adding a VMBus device: implement [`vmbus::server::Device`] and add it to
//! the [`vmbus::server::Registry`] in [`vm::VmConfig`]. Adding a virtio
//! backend: implement [`virtio::block::BlockBackend`] or
//! [`virtio::net::NetBackend`] and wrap it in a [`virtio::mmio::VirtioMmio`].
//!
//! # Testing without a stock kernel
//!
//! `testguest` (feature `testguest`) is a tiny guest that sets the
//! synthetic interface up as Linux does and then runs mailbox commands
//! (post a message, signal an event, wait for an interrupt, ...). Its
//! `GuestVsc` and `GuestChannel` implement [`vmbus::vsc`], so guest-side
//! client libraries written over those traits (the netvsc client of
//! `switch::netvsp::client`) run inside the VM through real KVM exits.
//!
//! # Trust
//!
//! The guest is untrusted. MSR values, hypercall inputs (pointers, sizes,
//! connection ids), messages, page numbers and virtqueue descriptors are
//! validated; bad ones get a #GP, an error status or a device error, and a
//! triple fault or an instruction KVM cannot run stops the VM, never the
//! VMM.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod hv;
pub mod layout;
pub mod memory;
pub mod probe;
#[cfg(feature = "testguest")]
pub mod testguest;
pub mod virtio;
pub mod vm;
