//! The hypercall page and hypercall dispatch.
//!
//! A Linux guest calls into its hypercall page with RCX = control, RDX =
//! input GPA (or the first fast parameter) and R8 = output GPA, and may
//! lose RCX, RDX and R8-R11. Real Hyper-V puts `vmcall` there; vspa's page
//! traps with port I/O, which works wherever KVM runs:
//!
//! ```text
//! 00: cmp rcx, 0x1005d      ; fast HvSignalEvent, no reps?
//! 07: jne generic
//! 09: mov rax, rdx
//! 0c: shr rax, 32           ; flag number must be 0 for the fast path
//! 10: jnz generic
//! 12: mov eax, edx          ; connection id
//! 14: xor r9d, r9d          ; status 0 unless the VMM says otherwise
//! 17: mov dx, HV_SIGNAL_PORT
//! 1b: out dx, eax           ; KVM ioeventfd (datamatch = connection id)
//! 1c: mov eax, r9d
//! 1f: ret
//! 20: generic:
//!     mov r9, rdx           ; keep the input GPA / fast parameter
//!     mov dx, HV_HYPERCALL_PORT
//!     out dx, al            ; exits to the VMM, which reads RCX, R9, R8 and sets RAX
//!     ret
//! ```
//!
//! The signal write of an open channel's connection id never leaves the
//! kernel: KVM matches it against the channel's ioeventfd. Any other id
//! exits to the VMM, which answers through R9.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Partition;
use super::regs::{MAX_PAYLOAD, call, status};
use super::synic::page_in_ram;
use crate::layout::{HV_HYPERCALL_PORT, HV_SIGNAL_PORT};

/// The hypercall page's code (see the module docs).
pub fn page_code() -> Vec<u8> {
    let [hc_lo, hc_hi] = HV_HYPERCALL_PORT.to_le_bytes();
    let [sg_lo, sg_hi] = HV_SIGNAL_PORT.to_le_bytes();
    vec![
        0x48, 0x81, 0xf9, 0x5d, 0x00, 0x01, 0x00, // cmp rcx, 0x1005d
        0x75, 0x17, // jne +0x17 (generic)
        0x48, 0x89, 0xd0, // mov rax, rdx
        0x48, 0xc1, 0xe8, 0x20, // shr rax, 32
        0x75, 0x0e, // jnz +0x0e (generic)
        0x89, 0xd0, // mov eax, edx
        0x45, 0x31, 0xc9, // xor r9d, r9d
        0x66, 0xba, sg_lo, sg_hi, // mov dx, HV_SIGNAL_PORT
        0xef,  // out dx, eax
        0x44, 0x89, 0xc8, // mov eax, r9d
        0xc3, // ret
        0x49, 0x89, 0xd1, // generic: mov r9, rdx
        0x66, 0xba, hc_lo, hc_hi, // mov dx, HV_HYPERCALL_PORT
        0xee,  // out dx, al
        0xc3,  // ret
    ]
}

/// Fills the guest page at `gpa` with the hypercall code. `None` if the
/// page is not guest RAM.
pub fn write_page(mem: &GuestMemoryMmap, gpa: u64) -> Option<()> {
    if !page_in_ram(mem, gpa) {
        return None;
    }
    let mut page = vec![0u8; 4096];
    let code = page_code();
    page[..code.len()].copy_from_slice(&code);
    mem.write_slice(&page, GuestAddress(gpa)).ok()
}

/// The registers of a trapped hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// RCX: call code, fast flag, rep count and start index.
    pub control: u64,
    /// Input GPA, or the first fast parameter (RDX, moved to R9 by the page).
    pub param1: u64,
    /// Output GPA, or the second fast parameter (R8).
    pub param2: u64,
}

/// Decoded hypercall control value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub code: u16,
    pub fast: bool,
    pub rep_count: u16,
    pub rep_start: u16,
    pub var_header_size: u16,
}

/// Control bits that must be zero: 27..31, 44..47, 60..63.
const CONTROL_RESERVED: u64 = 0xf000_f000_f800_0000;

impl Control {
    pub fn decode(control: u64) -> Result<Control, u16> {
        if control & CONTROL_RESERVED != 0 {
            return Err(status::INVALID_HYPERCALL_INPUT);
        }
        Ok(Control {
            code: control as u16,
            fast: control & (1 << 16) != 0,
            var_header_size: ((control >> 17) & 0x3ff) as u16,
            rep_count: ((control >> 32) & 0xfff) as u16,
            rep_start: ((control >> 48) & 0xfff) as u16,
        })
    }

    /// PostMessage and SignalEvent are simple calls: no reps, no variable
    /// header.
    fn is_simple(&self) -> bool {
        self.rep_count == 0 && self.rep_start == 0 && self.var_header_size == 0
    }
}

/// `struct hv_input_post_message` (TLFS): 16-byte header, 240-byte payload.
#[repr(C)]
#[derive(Debug, Clone, Copy, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)]
pub struct PostMessageInput {
    pub connection_id: u32,
    pub reserved: u32,
    pub message_type: u32,
    pub payload_size: u32,
    pub payload: [u8; MAX_PAYLOAD],
}

/// Connection ids a guest posts VMBus messages to (1; 4 from VMBus 5.0).
const VMBUS_MESSAGE_CONNECTIONS: [u32; 2] = [
    vmbus::wire::connection_id::MESSAGE,
    vmbus::wire::connection_id::MESSAGE_4,
];

/// Runs one hypercall; returns RAX (status in bits 0..15, reps done 0).
pub fn dispatch(p: &Partition, _vp: u32, input: Input) -> u64 {
    let result = Control::decode(input.control).and_then(|c| match c.code {
        call::POST_MESSAGE => post_message(p, c, input.param1),
        call::SIGNAL_EVENT => signal_event(p, c, input.param1),
        _ => Err(status::INVALID_HYPERCALL_CODE),
    });
    match result {
        Ok(()) => u64::from(status::SUCCESS),
        Err(s) => u64::from(s),
    }
}

fn post_message(p: &Partition, c: Control, gpa: u64) -> Result<(), u16> {
    if c.fast || !c.is_simple() {
        return Err(status::INVALID_HYPERCALL_INPUT);
    }
    let len = size_of::<PostMessageInput>() as u64;
    // Input must be 8-byte aligned and must not cross a page.
    if !gpa.is_multiple_of(8) || (gpa & 0xfff) + len > 4096 {
        return Err(status::INVALID_ALIGNMENT);
    }
    let mut msg = PostMessageInput {
        connection_id: 0,
        reserved: 0,
        message_type: 0,
        payload_size: 0,
        payload: [0; MAX_PAYLOAD],
    };
    p.memory()
        .read_slice(
            zerocopy::IntoBytes::as_mut_bytes(&mut msg),
            GuestAddress(gpa),
        )
        .map_err(|_| status::INVALID_PARAMETER)?;
    if !VMBUS_MESSAGE_CONNECTIONS.contains(&msg.connection_id) {
        return Err(status::INVALID_CONNECTION_ID);
    }
    // Types with the top bit set are the hypervisor's own.
    if msg.message_type == 0 || msg.message_type & 0x8000_0000 != 0 {
        return Err(status::INVALID_PARAMETER);
    }
    let size = msg.payload_size as usize;
    if size > MAX_PAYLOAD {
        return Err(status::INVALID_PARAMETER);
    }
    p.post_message(&msg.payload[..size]);
    Ok(())
}

fn signal_event(p: &Partition, c: Control, param: u64) -> Result<(), u16> {
    if !c.is_simple() {
        return Err(status::INVALID_HYPERCALL_INPUT);
    }
    let value = if c.fast {
        param
    } else {
        if !param.is_multiple_of(8) {
            return Err(status::INVALID_ALIGNMENT);
        }
        p.memory()
            .read_obj::<u64>(GuestAddress(param))
            .map_err(|_| status::INVALID_PARAMETER)?
    };
    // connection id (bits 0..31), flag number (32..47), reserved (48..63).
    if value >> 48 != 0 {
        return Err(status::INVALID_PARAMETER);
    }
    if p.signal_connection(value as u32) {
        Ok(())
    } else {
        Err(status::INVALID_CONNECTION_ID)
    }
}

/// Status for a signal-port write that KVM did not match to an ioeventfd.
pub fn unmatched_signal(p: &Partition, connection_id: u32) -> u64 {
    if p.signal_connection(connection_id) {
        u64::from(status::SUCCESS)
    } else {
        u64::from(status::INVALID_CONNECTION_ID)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_code_disassembles_as_documented() {
        use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};
        let code = page_code();
        let mut d = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE);
        let mut f = NasmFormatter::new();
        let mut out = Vec::new();
        for ins in d.iter() {
            let mut s = String::new();
            f.format(&ins, &mut s);
            out.push(format!("{:02x}: {s}", ins.ip()));
        }
        assert_eq!(
            out,
            [
                "00: cmp rcx,1005Dh",
                "07: jne short 0000000000000020h",
                "09: mov rax,rdx",
                "0c: shr rax,20h",
                "10: jne short 0000000000000020h",
                "12: mov eax,edx",
                "14: xor r9d,r9d",
                "17: mov dx,4857h",
                "1b: out dx,eax",
                "1c: mov eax,r9d",
                "1f: ret",
                "20: mov r9,rdx",
                "23: mov dx,4856h",
                "27: out dx,al",
                "28: ret",
            ]
        );
    }

    #[test]
    fn post_message_input_layout() {
        assert_eq!(size_of::<PostMessageInput>(), 256);
        let m = PostMessageInput {
            connection_id: 4,
            reserved: 0,
            message_type: 1,
            payload_size: 0x18,
            payload: [0xab; MAX_PAYLOAD],
        };
        let b = zerocopy::IntoBytes::as_bytes(&m);
        assert_eq!(
            &b[..16],
            &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x18, 0, 0, 0]
        );
        assert_eq!(b[16], 0xab);
    }

    #[test]
    fn control_decoding_rejects_reserved_bits() {
        let c = Control::decode(0x0001_005d).unwrap();
        assert_eq!((c.code, c.fast, c.rep_count), (0x5d, true, 0));
        let c = Control::decode(0x0002_0003_0000_005c).unwrap();
        assert_eq!((c.rep_count, c.rep_start, c.fast), (3, 2, false));
        assert_eq!(
            Control::decode(1 << 63),
            Err(status::INVALID_HYPERCALL_INPUT)
        );
        assert_eq!(
            Control::decode(1 << 27),
            Err(status::INVALID_HYPERCALL_INPUT)
        );
    }
}
