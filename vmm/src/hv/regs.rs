//! Hyper-V synthetic register numbers, CPUID leaves, hypercall codes and
//! status values (from the Hyper-V TLFS, as Linux's `hyperv-tlfs.h` names
//! them).

/// Synthetic MSRs.
pub mod msr {
    pub const GUEST_OS_ID: u32 = 0x4000_0000;
    pub const HYPERCALL: u32 = 0x4000_0001;
    pub const VP_INDEX: u32 = 0x4000_0002;
    pub const TIME_REF_COUNT: u32 = 0x4000_0020;
    pub const REFERENCE_TSC: u32 = 0x4000_0021;
    pub const SCONTROL: u32 = 0x4000_0080;
    pub const SVERSION: u32 = 0x4000_0081;
    pub const SIEFP: u32 = 0x4000_0082;
    pub const SIMP: u32 = 0x4000_0083;
    pub const EOM: u32 = 0x4000_0084;
    pub const SINT0: u32 = 0x4000_0090;
    pub const SINT15: u32 = 0x4000_009f;
    /// The range the MSR filter sends to userspace.
    pub const RANGE_BASE: u32 = 0x4000_0000;
    pub const RANGE_COUNT: u32 = 0x100;
}

/// Hypercall call codes.
pub mod call {
    pub const POST_MESSAGE: u16 = 0x005c;
    pub const SIGNAL_EVENT: u16 = 0x005d;
}

/// Hypercall result codes (the low 16 bits of RAX).
pub mod status {
    pub const SUCCESS: u16 = 0;
    pub const INVALID_HYPERCALL_CODE: u16 = 2;
    pub const INVALID_HYPERCALL_INPUT: u16 = 3;
    pub const INVALID_ALIGNMENT: u16 = 4;
    pub const INVALID_PARAMETER: u16 = 5;
    pub const INVALID_CONNECTION_ID: u16 = 18;
    pub const INSUFFICIENT_BUFFERS: u16 = 19;
}

/// The SINT VMBus uses for messages and events.
pub const VMBUS_SINT: usize = 2;
/// Linux's HYPERVISOR_CALLBACK_VECTOR, what guests program into SINT2.
pub const VMBUS_VECTOR: u8 = 0xf3;
/// Size of a SynIC message slot and of an event-flags slot.
pub const SLOT_SIZE: u64 = 256;
/// Largest message payload.
pub const MAX_PAYLOAD: usize = 240;
/// Event flags per SINT slot (2048 bits).
pub const EVENT_FLAGS: u32 = 2048;

/// Bits of the SINTx MSRs.
pub mod sint {
    pub const VECTOR: u64 = 0xff;
    pub const MASKED: u64 = 1 << 16;
    pub const AUTO_EOI: u64 = 1 << 17;
    pub const POLLING: u64 = 1 << 18;
    /// Bits a guest may set.
    pub const WRITABLE: u64 = VECTOR | MASKED | AUTO_EOI | POLLING;
}

/// Enable bit shared by SCONTROL, SIMP, SIEFP and HYPERCALL.
pub const ENABLE: u64 = 1;
/// HYPERCALL MSR: the page can no longer be moved.
pub const HYPERCALL_LOCKED: u64 = 1 << 1;
/// Overlay page MSRs: bits 1..11 are reserved.
pub const PAGE_RESERVED: u64 = 0xffe;
