//! vspa's test guest: a few hundred bytes of 64-bit code that set up the
//! Hyper-V synthetic interface the way Linux's `hv_vmbus` does (guest OS
//! id, hypercall page, SIMP, SIEFP, SINT2, SCONTROL, an IDT entry for the
//! VMBus vector that EOIs the LAPIC) and then execute commands the host
//! places in a mailbox page: post a message, signal an event, wait for an
//! interrupt, take the message in the SINT2 slot (EOM as Linux does),
//! read or write an MSR, run CPUID.
//!
//! The guest uses only integer instructions, port I/O, MMIO and MSRs, so it
//! runs even where KVM emulates every instruction. The protocol logic stays
//! on the host side in Rust ([`TestGuest`] and the `vmbus` client pieces);
//! every message and signal still crosses the real KVM exits.
//!
//! [`GuestVsc`] (a [`vmbus::vsc::VscBus`]) and its [`GuestChannel`]s (each a
//! [`vmbus::vsc::VscChannel`]) are the guest's VMBus client: channel
//! messages are HvPostMessage hypercalls and replies arrive in the SINT2
//! slot; a channel's flush is an HvSignalEvent (caught by KVM's ioeventfd)
//! and its wait halts the guest until the VMBus vector brings the
//! channel's SIEFP flag. Client libraries over those traits, like the
//! netvsc client, thus run inside the VM unchanged. Commands take `&self`
//! and are serialized, so channels hold a shared reference to the guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmbus::server::Registry;

use crate::boot::{BootConfig, ImageFormat};
use crate::hv::hypercall::PostMessageInput;
use crate::hv::regs::{MAX_PAYLOAD, VMBUS_VECTOR, call, msr};
use crate::vm::{RunningVm, VirtioSlot, Vm, VmConfig, VmError, VmExit};

/// Guest-physical layout the test guest uses.
pub mod gpa {
    pub const HYPERCALL_PAGE: u64 = 0x20_0000;
    pub const SIMP: u64 = 0x20_1000;
    pub const SIEFP: u64 = 0x20_2000;
    pub const IDT: u64 = 0x20_3000;
    pub const MAILBOX: u64 = 0x20_4000;
    /// Hypercall input page the host fills for HvPostMessage.
    pub const INPUT: u64 = 0x20_5000;
    pub const STACK_TOP: u64 = 0x21_0000;
    /// Memory from here on belongs to the host-side VSC (rings, buffers).
    pub const FREE: u64 = 0x30_0000;
}

/// Mailbox fields (byte offsets).
pub mod mailbox {
    pub const SEQ: u64 = 0x00;
    pub const DONE: u64 = 0x08;
    pub const CMD: u64 = 0x10;
    pub const ARG0: u64 = 0x18;
    pub const ARG1: u64 = 0x20;
    pub const ARG2: u64 = 0x28;
    pub const RESULT: u64 = 0x30; // four u64 results
    pub const FAULTS: u64 = 0x50;
    pub const VMBUS_IRQS: u64 = 0x58;
    pub const KICKS: u64 = 0x60;
    pub const READY: u64 = 0x68;
    /// The host writes a command's sequence number here (and kicks) to end
    /// that command's WAIT_VMBUS_IRQ early.
    pub const CANCEL: u64 = 0x70;
    /// TAKE_MESSAGE copies the 256-byte SINT2 slot here.
    pub const MESSAGE: u64 = 0x100;
}

/// Commands.
pub mod cmd {
    pub const PING: u64 = 1;
    pub const WRMSR: u64 = 2;
    pub const RDMSR: u64 = 3;
    pub const HYPERCALL: u64 = 4;
    pub const WAIT_VMBUS_IRQ: u64 = 5;
    pub const TAKE_MESSAGE: u64 = 6;
    pub const CPUID: u64 = 7;
    pub const TRIPLE_FAULT: u64 = 8;
    pub const RESET: u64 = 9;
    pub const READ32: u64 = 10;
    pub const WRITE32: u64 = 11;
}

/// Vector the host raises to make the guest look at the mailbox.
pub const KICK_VECTOR: u8 = 0x40;
/// What the guest writes into GUEST_OS_ID (Linux's vendor id 0x8100, open source bit 63).
pub const GUEST_OS_ID: u64 = 0x8100_0000_0006_0100;
/// Printed on the serial port once setup is done.
pub const BANNER: &str = "vspa-testguest: synthetic interface ready\n";

const LAPIC_EOI: u64 = 0xfee0_00b0;
const LAPIC_SVR: u64 = 0xfee0_00f0;
const LOAD_ADDR: u64 = crate::layout::HIMEM_START;

/// Emits a command's body (labels: the common exit, the zero IDTR).
type CommandBody = fn(&mut CodeAssembler, CodeLabel, CodeLabel) -> Result<(), IcedError>;

fn mb(off: u64) -> AsmMemoryOperand {
    qword_ptr(gpa::MAILBOX + off)
}

/// Assembles the guest (a flat image loaded and entered at 1 MiB).
pub fn image() -> Vec<u8> {
    assemble().expect("the test guest assembles")
}

fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut gp_handler = a.create_label();
    let mut vmbus_handler = a.create_label();
    let mut kick_handler = a.create_label();
    let mut banner = a.create_label();
    let mut idtr = a.create_label();
    let mut zero_idtr = a.create_label();
    let mut main = a.create_label();

    // Stack, IDT with #GP, the VMBus vector and the kick vector.
    a.mov(rsp, gpa::STACK_TOP)?;
    idt_entry(&mut a, 13, gp_handler)?;
    idt_entry(&mut a, u64::from(VMBUS_VECTOR), vmbus_handler)?;
    idt_entry(&mut a, u64::from(KICK_VECTOR), kick_handler)?;
    a.lidt(ptr(idtr))?;
    // Mask both 8259 PICs (device lines reach the guest through the
    // IOAPIC, as in Linux), then software-enable the LAPIC, spurious
    // vector 0xff.
    a.mov(al, 0xffu32)?;
    a.out(0x21u32, al)?;
    a.out(0xa1u32, al)?;
    a.mov(eax, LAPIC_SVR as u32)?;
    a.mov(dword_ptr(rax), 0x1ffu32)?;
    // The synthetic interface, in the order Linux's hv_init/hv_synic_enable_regs use.
    wrmsr_imm(&mut a, msr::GUEST_OS_ID, GUEST_OS_ID)?;
    wrmsr_imm(&mut a, msr::HYPERCALL, gpa::HYPERCALL_PAGE | 1)?;
    wrmsr_imm(&mut a, msr::SIMP, gpa::SIMP | 1)?;
    wrmsr_imm(&mut a, msr::SIEFP, gpa::SIEFP | 1)?;
    wrmsr_imm(&mut a, msr::SINT0 + 2, u64::from(VMBUS_VECTOR))?;
    wrmsr_imm(&mut a, msr::SCONTROL, 1)?;
    print(&mut a, banner)?;
    a.mov(rax, 1u64)?;
    a.mov(mb(mailbox::READY), rax)?;
    a.sti()?;

    // Main loop: sleep until seq != done, run the command, publish done.
    a.set_label(&mut main)?;
    let mut exec = a.create_label();
    a.cli()?;
    a.mov(rax, mb(mailbox::SEQ))?;
    a.cmp(rax, mb(mailbox::DONE))?;
    a.jne(exec)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(main)?;
    a.set_label(&mut exec)?;
    a.sti()?;
    a.mov(r12, rax)?; // seq (cpuid clobbers rbx; the hypercall page rcx, rdx, r8-r11)
    a.mov(rax, mb(mailbox::CMD))?;
    let mut finish = a.create_label();
    let commands: [(u64, CommandBody); 11] = [
        (cmd::PING, |_, _, _| Ok(())),
        (cmd::WRMSR, cmd_wrmsr),
        (cmd::RDMSR, cmd_rdmsr),
        (cmd::HYPERCALL, cmd_hypercall),
        (cmd::WAIT_VMBUS_IRQ, cmd_wait_irq),
        (cmd::TAKE_MESSAGE, cmd_take_message),
        (cmd::CPUID, cmd_cpuid),
        (cmd::TRIPLE_FAULT, cmd_triple_fault),
        (cmd::RESET, cmd_reset),
        (cmd::READ32, cmd_read32),
        (cmd::WRITE32, cmd_write32),
    ];
    for (code, body) in commands {
        let mut next = a.create_label();
        a.cmp(rax, code as i32)?;
        a.jne(next)?;
        body(&mut a, finish, zero_idtr)?;
        a.jmp(finish)?;
        a.set_label(&mut next)?;
    }
    a.nop()?; // unknown command: nothing to do
    a.set_label(&mut finish)?;
    a.mov(mb(mailbox::DONE), r12)?;
    a.jmp(main)?;

    // #GP (only MSR accesses fault here): count it, skip the 2-byte wrmsr/rdmsr.
    a.set_label(&mut gp_handler)?;
    a.inc(mb(mailbox::FAULTS))?;
    a.add(qword_ptr(rsp + 8), 2)?;
    a.add(rsp, 8)?;
    a.iretq()?;
    // VMBus vector: count, EOI.
    a.set_label(&mut vmbus_handler)?;
    a.inc(mb(mailbox::VMBUS_IRQS))?;
    eoi(&mut a)?;
    a.iretq()?;
    // Kick vector: count, EOI (the main loop re-checks the mailbox).
    a.set_label(&mut kick_handler)?;
    a.inc(mb(mailbox::KICKS))?;
    eoi(&mut a)?;
    a.iretq()?;

    a.set_label(&mut idtr)?;
    a.dw(&[0x0fff])?;
    a.dq(&[gpa::IDT])?;
    a.set_label(&mut zero_idtr)?;
    a.dw(&[0])?;
    a.dq(&[0])?;
    a.set_label(&mut banner)?;
    let mut text = BANNER.as_bytes().to_vec();
    text.push(0);
    a.db(&text)?;
    a.assemble(LOAD_ADDR)
}

/// Writes a 64-bit interrupt gate for `vector` pointing at `handler`.
fn idt_entry(a: &mut CodeAssembler, vector: u64, handler: CodeLabel) -> Result<(), IcedError> {
    let e = gpa::IDT + vector * 16;
    a.lea(rax, ptr(handler))?;
    a.mov(word_ptr(e), ax)?;
    a.mov(word_ptr(e + 2), 0x10u32)?; // __BOOT_CS
    a.mov(word_ptr(e + 4), 0x8e00u32)?; // present, DPL0, 64-bit interrupt gate
    a.shr(rax, 16)?;
    a.mov(word_ptr(e + 6), ax)?;
    a.shr(rax, 16)?;
    a.mov(dword_ptr(e + 8), eax)?;
    a.mov(dword_ptr(e + 12), 0u32)?;
    Ok(())
}

fn wrmsr_imm(a: &mut CodeAssembler, index: u32, value: u64) -> Result<(), IcedError> {
    a.mov(ecx, index)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

fn eoi(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.push(rax)?;
    a.mov(eax, LAPIC_EOI as u32)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rax)
}

fn print(a: &mut CodeAssembler, text: CodeLabel) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut end = a.create_label();
    a.lea(rsi, ptr(text))?;
    a.mov(dx, crate::layout::SERIAL_PORT as u32)?;
    a.set_label(&mut top)?;
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(end)?;
    a.out(dx, al)?;
    a.inc(rsi)?;
    a.jmp(top)?;
    a.set_label(&mut end)?;
    Ok(())
}

fn cmd_wrmsr(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    a.mov(ecx, dword_ptr(gpa::MAILBOX + mailbox::ARG0))?;
    a.mov(eax, dword_ptr(gpa::MAILBOX + mailbox::ARG1))?;
    a.mov(edx, dword_ptr(gpa::MAILBOX + mailbox::ARG1 + 4))?;
    a.wrmsr()
}

fn cmd_rdmsr(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    a.mov(ecx, dword_ptr(gpa::MAILBOX + mailbox::ARG0))?;
    a.xor(eax, eax)?;
    a.xor(edx, edx)?;
    a.rdmsr()?;
    a.mov(dword_ptr(gpa::MAILBOX + mailbox::RESULT), eax)?;
    a.mov(dword_ptr(gpa::MAILBOX + mailbox::RESULT + 4), edx)
}

fn cmd_hypercall(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    a.mov(rcx, mb(mailbox::ARG0))?;
    a.mov(rdx, mb(mailbox::ARG1))?;
    a.mov(r8, mb(mailbox::ARG2))?;
    a.mov(rax, gpa::HYPERCALL_PAGE)?;
    a.call(rax)?;
    a.mov(mb(mailbox::RESULT), rax)
}

/// Sleeps until the VMBus vector was taken ARG0 times in total, or the
/// host cancels this command (CANCEL = its sequence number, then a kick).
fn cmd_wait_irq(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.cli()?;
    a.mov(rax, mb(mailbox::VMBUS_IRQS))?;
    a.cmp(rax, mb(mailbox::ARG0))?;
    a.jae(done)?;
    a.cmp(r12, mb(mailbox::CANCEL))?;
    a.je(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.sti()
}

/// What Linux's vmbus_on_msg_dpc + vmbus_signal_eom do with the slot.
fn cmd_take_message(
    a: &mut CodeAssembler,
    finish: CodeLabel,
    _: CodeLabel,
) -> Result<(), IcedError> {
    let slot = gpa::SIMP + 2 * 256;
    let mut copy = a.create_label();
    a.mov(rsi, slot)?;
    a.mov(rdi, gpa::MAILBOX + mailbox::MESSAGE)?;
    a.mov(ecx, 32u32)?;
    a.set_label(&mut copy)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rsi, 8)?;
    a.add(rdi, 8)?;
    a.dec(ecx)?;
    a.jnz(copy)?;
    a.xor(eax, eax)?;
    a.xchg(dword_ptr(slot), eax)?; // message_type = HVMSG_NONE, full barrier
    a.mov(mb(mailbox::RESULT), rax)?;
    a.test(eax, eax)?;
    a.jz(finish)?;
    a.movzx(eax, byte_ptr(slot + 5))?; // message_flags
    a.test(al, 1)?; // msg_pending
    a.jz(finish)?;
    a.mov(ecx, msr::EOM)?;
    a.xor(eax, eax)?;
    a.xor(edx, edx)?;
    a.wrmsr()
}

fn cmd_cpuid(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(gpa::MAILBOX + mailbox::ARG0))?;
    a.mov(ecx, dword_ptr(gpa::MAILBOX + mailbox::ARG1))?;
    a.cpuid()?;
    a.mov(dword_ptr(gpa::MAILBOX + mailbox::RESULT), eax)?;
    a.mov(dword_ptr(gpa::MAILBOX + mailbox::RESULT + 8), ebx)?;
    a.mov(dword_ptr(gpa::MAILBOX + mailbox::RESULT + 16), ecx)?;
    a.mov(dword_ptr(gpa::MAILBOX + mailbox::RESULT + 24), edx)
}

/// Drops the IDT and touches a non-canonical address: #GP, #DF, shutdown.
fn cmd_triple_fault(
    a: &mut CodeAssembler,
    _: CodeLabel,
    zero_idtr: CodeLabel,
) -> Result<(), IcedError> {
    a.lidt(ptr(zero_idtr))?;
    a.mov(rax, 0x8000_0000_0000_0000u64)?;
    a.mov(rax, qword_ptr(rax))
}

/// A 32-bit load from any guest-physical address (MMIO included).
fn cmd_read32(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    a.mov(rsi, mb(mailbox::ARG0))?;
    a.mov(eax, dword_ptr(rsi))?;
    a.mov(mb(mailbox::RESULT), rax)
}

/// A 32-bit store to any guest-physical address (MMIO included).
fn cmd_write32(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    a.mov(rsi, mb(mailbox::ARG0))?;
    a.mov(rax, mb(mailbox::ARG1))?;
    a.mov(dword_ptr(rsi), eax)
}

fn cmd_reset(a: &mut CodeAssembler, _: CodeLabel, _: CodeLabel) -> Result<(), IcedError> {
    a.mov(al, 0xfeu32)?;
    a.out(0x64u32, al)
}

/// Errors driving the test guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("test guest image: {0}")]
    Image(std::io::Error),
    #[error("guest did not {what} within {timeout:?} (VM exit: {exit:?})")]
    Timeout {
        what: String,
        timeout: Duration,
        exit: Option<VmExit>,
    },
    #[error("guest memory: {0}")]
    Memory(String),
}

/// Options for booting the test guest.
#[derive(Default)]
pub struct GuestOptions {
    pub memory_mib: u64,
    /// Processors (at least one). The test guest runs on the first; the
    /// others wait for a startup IPI that never comes, SynICs disabled.
    pub vcpus: u32,
    pub registry: Registry,
    pub virtio: Vec<VirtioSlot>,
    pub console: Option<crate::devices::ConsoleOut>,
    /// Route synthetic MSRs through the MSR filter (see `VmConfig`).
    pub force_msr_filter: bool,
    /// Builds virtio devices once guest memory exists (they follow
    /// `virtio`).
    pub virtio_with: Option<VirtioBuilder>,
}

/// Makes virtio devices over the VM's memory.
pub type VirtioBuilder = Box<dyn FnOnce(&Arc<GuestMemoryMmap>) -> Vec<VirtioSlot>>;

impl std::fmt::Debug for GuestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestOptions")
            .field("memory_mib", &self.memory_mib)
            .field("vcpus", &self.vcpus)
            .field("virtio", &self.virtio.len())
            .finish_non_exhaustive()
    }
}

/// A running test guest and its mailbox. Commands take `&self` and run
/// one at a time (a lock holds the mailbox for the whole command), so the
/// guest can be shared: channels keep a reference to it to signal the host
/// and wait for interrupts.
#[derive(Debug)]
pub struct TestGuest {
    vm: Option<RunningVm>,
    mem: Arc<GuestMemoryMmap>,
    /// Sequence number of the last command; locked while a command runs.
    seq: std::sync::Mutex<u64>,
    /// How long a command may take (guest code is emulated here: slow).
    pub timeout: Duration,
}

static IMAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestGuest {
    /// Boots the test guest and waits until it finished its setup.
    pub fn boot(opts: GuestOptions) -> Result<TestGuest, GuestError> {
        let path = std::env::temp_dir().join(format!(
            "vspa-testguest-{}-{}.bin",
            std::process::id(),
            IMAGE_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, image()).map_err(GuestError::Image)?;
        let cfg = VmConfig {
            memory_bytes: opts.memory_mib.max(8) << 20,
            vcpus: opts.vcpus.max(1),
            boot: BootConfig {
                kernel: path.clone(),
                format: ImageFormat::Flat,
                initrd: None,
                cmdline: String::new(),
            },
            console: opts.console.unwrap_or_else(|| Box::new(std::io::sink())),
            registry: opts.registry,
            virtio: opts.virtio,
            force_msr_filter: opts.force_msr_filter,
        };
        let builder = opts.virtio_with;
        let vm = Vm::new_with(cfg, |mem| builder.map_or_else(Vec::new, |b| b(mem)));
        let _ = std::fs::remove_file(&path);
        let vm = vm?.start()?;
        let mem = vm.memory().clone();
        let guest = TestGuest {
            vm: Some(vm),
            mem,
            seq: std::sync::Mutex::new(0),
            timeout: Duration::from_secs(30),
        };
        guest.wait_until("finish its setup", |g| g.mailbox(mailbox::READY) == 1)?;
        Ok(guest)
    }

    pub fn vm(&self) -> &RunningVm {
        self.vm.as_ref().expect("running")
    }

    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Reads a mailbox field.
    pub fn mailbox(&self, off: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(gpa::MAILBOX + off))
            .unwrap_or(u64::MAX)
    }

    fn set_mailbox(&self, off: u64, v: u64) {
        let _ = self.mem.write_obj(v, GuestAddress(gpa::MAILBOX + off));
    }

    fn wait_until(
        &self,
        what: &str,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Result<(), GuestError> {
        let deadline = Instant::now() + self.timeout;
        while !cond(self) {
            if let Some(exit) = self.vm().exit_reason() {
                return Err(GuestError::Timeout {
                    what: what.into(),
                    timeout: Duration::ZERO,
                    exit: Some(exit),
                });
            }
            if Instant::now() > deadline {
                return Err(GuestError::Timeout {
                    what: what.into(),
                    timeout: self.timeout,
                    exit: None,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Issues a command and waits for it; returns the four results.
    pub fn command(&self, code: u64, args: [u64; 3]) -> Result<[u64; 4], GuestError> {
        self.command_until(code, args, None)
    }

    /// Issues a command; with `cancel_after`, a command still running
    /// then is cancelled (only WAIT_VMBUS_IRQ looks at the cancel field,
    /// other commands finish on their own).
    fn command_until(
        &self,
        code: u64,
        args: [u64; 3],
        cancel_after: Option<Duration>,
    ) -> Result<[u64; 4], GuestError> {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        self.set_mailbox(mailbox::CMD, code);
        self.set_mailbox(mailbox::ARG0, args[0]);
        self.set_mailbox(mailbox::ARG1, args[1]);
        self.set_mailbox(mailbox::ARG2, args[2]);
        for i in 0..4 {
            self.set_mailbox(mailbox::RESULT + i * 8, 0);
        }
        *seq += 1;
        let seq = *seq;
        std::sync::atomic::fence(Ordering::SeqCst);
        self.set_mailbox(mailbox::SEQ, seq);
        self.vm().raise_msi(0, KICK_VECTOR);
        let what = || format!("finish command {code}");
        let done = |g: &Self| g.mailbox(mailbox::DONE) == seq;
        if let Some(after) = cancel_after {
            let deadline = Instant::now() + after;
            while !done(self) && Instant::now() < deadline {
                if let Some(exit) = self.vm().exit_reason() {
                    return Err(GuestError::Timeout {
                        what: what(),
                        timeout: Duration::ZERO,
                        exit: Some(exit),
                    });
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            if !done(self) {
                self.set_mailbox(mailbox::CANCEL, seq);
                std::sync::atomic::fence(Ordering::SeqCst);
                self.vm().raise_msi(0, KICK_VECTOR);
            }
        }
        self.wait_until(&what(), done)?;
        Ok(std::array::from_fn(|i| {
            self.mailbox(mailbox::RESULT + i as u64 * 8)
        }))
    }

    /// #GP faults the guest took so far.
    pub fn faults(&self) -> u64 {
        self.mailbox(mailbox::FAULTS)
    }

    /// VMBus-vector interrupts the guest took so far.
    pub fn vmbus_irqs(&self) -> u64 {
        self.mailbox(mailbox::VMBUS_IRQS)
    }

    /// `wrmsr`; `Err(())` if the guest took a #GP.
    pub fn wrmsr(&self, index: u32, value: u64) -> Result<Result<(), ()>, GuestError> {
        let before = self.faults();
        self.command(cmd::WRMSR, [u64::from(index), value, 0])?;
        Ok(if self.faults() == before {
            Ok(())
        } else {
            Err(())
        })
    }

    /// `rdmsr`; `Err(())` if the guest took a #GP.
    pub fn rdmsr(&self, index: u32) -> Result<Result<u64, ()>, GuestError> {
        let before = self.faults();
        let r = self.command(cmd::RDMSR, [u64::from(index), 0, 0])?;
        Ok(if self.faults() == before {
            Ok(r[0])
        } else {
            Err(())
        })
    }

    /// A 32-bit guest load from `gpa` (an MMIO exit for device windows).
    pub fn read32(&self, gpa: u64) -> Result<u32, GuestError> {
        Ok(self.command(cmd::READ32, [gpa, 0, 0])?[0] as u32)
    }

    /// A 32-bit guest store to `gpa`.
    pub fn write32(&self, gpa: u64, value: u32) -> Result<(), GuestError> {
        self.command(cmd::WRITE32, [gpa, u64::from(value), 0])
            .map(|_| ())
    }

    /// `cpuid`: [eax, ebx, ecx, edx].
    pub fn cpuid(&self, leaf: u32, subleaf: u32) -> Result<[u32; 4], GuestError> {
        let r = self.command(cmd::CPUID, [u64::from(leaf), u64::from(subleaf), 0])?;
        Ok(r.map(|v| v as u32))
    }

    /// Calls the hypercall page; returns RAX.
    pub fn hypercall(&self, control: u64, param1: u64, param2: u64) -> Result<u64, GuestError> {
        Ok(self.command(cmd::HYPERCALL, [control, param1, param2])?[0])
    }

    /// HvPostMessage of `payload` on `connection_id` (message type 1), the
    /// input page filled as Linux's hv_post_message does.
    pub fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<u64, GuestError> {
        let mut input = PostMessageInput {
            connection_id,
            reserved: 0,
            message_type: 1,
            payload_size: payload.len() as u32,
            payload: [0; MAX_PAYLOAD],
        };
        let n = payload.len().min(MAX_PAYLOAD);
        input.payload[..n].copy_from_slice(&payload[..n]);
        self.write(gpa::INPUT, zerocopy::IntoBytes::as_bytes(&input))?;
        self.hypercall(u64::from(call::POST_MESSAGE), gpa::INPUT, 0)
    }

    /// Fast HvSignalEvent on `connection_id`.
    pub fn signal_event(&self, connection_id: u32) -> Result<u64, GuestError> {
        self.hypercall(
            u64::from(call::SIGNAL_EVENT) | 1 << 16,
            u64::from(connection_id),
            0,
        )
    }

    /// Waits until the guest took `count` VMBus interrupts in total.
    pub fn wait_vmbus_irq(&self, count: u64) -> Result<(), GuestError> {
        self.command(cmd::WAIT_VMBUS_IRQ, [count, 0, 0]).map(|_| ())
    }

    /// Like [`TestGuest::wait_vmbus_irq`], but gives up after `timeout`
    /// (the host cancels the guest's wait); true if the count was reached.
    pub fn wait_vmbus_irq_for(&self, count: u64, timeout: Duration) -> Result<bool, GuestError> {
        self.command_until(cmd::WAIT_VMBUS_IRQ, [count, 0, 0], Some(timeout))?;
        Ok(self.vmbus_irqs() >= count)
    }

    /// Takes the message in the SINT2 slot as Linux does (clear the type,
    /// EOM if pending). `None` if the slot was empty. Returns the slot's
    /// 256 bytes.
    pub fn take_message(&self) -> Result<Option<[u8; 256]>, GuestError> {
        let r = self.command(cmd::TAKE_MESSAGE, [0; 3])?;
        if r[0] == 0 {
            return Ok(None);
        }
        let mut slot = [0u8; 256];
        self.mem
            .read_slice(&mut slot, GuestAddress(gpa::MAILBOX + mailbox::MESSAGE))
            .map_err(|e| GuestError::Memory(e.to_string()))?;
        Ok(Some(slot))
    }

    /// Takes the next VMBus message payload, waiting for its interrupt.
    pub fn next_message(&self) -> Result<Vec<u8>, GuestError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(slot) = self.take_message()? {
                let len = usize::from(slot[4]).min(MAX_PAYLOAD);
                return Ok(slot[16..16 + len].to_vec());
            }
            if Instant::now() > deadline {
                return Err(GuestError::Timeout {
                    what: "receive a VMBus message".into(),
                    timeout: self.timeout,
                    exit: self.vm().exit_reason(),
                });
            }
            let irqs = self.vmbus_irqs();
            self.wait_vmbus_irq(irqs + 1)?;
        }
    }

    /// Test-and-clears event flag `bit` of SINT2 (as Linux's ISR does).
    pub fn take_event_flag(&self, bit: u32) -> bool {
        let addr = gpa::SIEFP + 2 * 256 + u64::from(bit / 8);
        match crate::hv::synic::guest_atomic_u8(&self.mem, addr) {
            Some(b) => b.fetch_and(!(1 << (bit % 8)), Ordering::SeqCst) & (1 << (bit % 8)) != 0,
            None => false,
        }
    }

    /// Writes bytes into guest memory (host side of the VSC).
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), GuestError> {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| GuestError::Memory(e.to_string()))
    }

    /// Makes the guest triple-fault; returns the VM's exit reason.
    pub fn triple_fault(mut self) -> VmExit {
        self.fire(cmd::TRIPLE_FAULT)
    }

    /// Makes the guest reset through the i8042; returns the exit reason.
    pub fn reset(mut self) -> VmExit {
        self.fire(cmd::RESET)
    }

    fn fire(&mut self, code: u64) -> VmExit {
        let _ = self.command(code, [0; 3]);
        let vm = self.vm.take().expect("running");
        match vm.wait_timeout(self.timeout) {
            Some(_) => vm.wait(),
            None => vm.stop(),
        }
    }

    /// Stops the VM.
    pub fn stop(mut self) -> VmExit {
        self.vm.take().map_or(VmExit::Stopped, |vm| vm.stop())
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_assembles_small() {
        let code = image();
        assert!(code.len() < 2048, "{} bytes", code.len());
        assert!(code.ends_with(b"ready\n\0"));
    }
}

/// A VMBus client whose channel messages and signals go through the test
/// guest (HvPostMessage, the SINT2 slot, HvSignalEvent, the VMBus vector)
/// while the protocol logic is the `vmbus` crate's Rust code operating on
/// guest memory.
///
/// It is a [`vmbus::vsc::VscBus`] and its channels are
/// [`vmbus::vsc::VscChannel`]s, so guest-side client libraries written over
/// those traits (the netvsc client) run inside the VM unchanged.
#[derive(Debug)]
pub struct GuestVsc<'g> {
    pub guest: &'g TestGuest,
    memory: vmbus::SharedMemory,
    next_pfn: u64,
    next_gpadl: u32,
    version: u32,
    queued: std::collections::VecDeque<Vec<u8>>,
}

/// An offer as the guest saw it.
pub type GuestOffer = vmbus::vsc::Offer;

/// An open channel: the guest's ends of both rings, and the guest that
/// signals the host and takes its interrupts.
#[derive(Debug)]
pub struct GuestChannel<'g> {
    guest: &'g TestGuest,
    pub offer: GuestOffer,
    /// Guest-to-host ring.
    pub outgoing: vmbus::ring::OutgoingRing,
    /// Host-to-guest ring.
    pub incoming: vmbus::ring::IncomingRing,
    pub gpadl: u32,
    /// Ring pages: guest-to-host ring first.
    pub pfns: Vec<u64>,
}

impl GuestChannel<'_> {
    /// The host's interrupt_mask on the guest-to-host ring (1 while the
    /// VSP worker polls and wants no signals).
    pub fn host_interrupt_mask(&self, mem: &GuestMemoryMmap) -> u32 {
        mem.read_obj(GuestAddress(self.pfns[0] * 4096 + 8))
            .unwrap_or(u32::MAX)
    }

    /// Publishes what was read and written and signals the host through
    /// the guest's HvSignalEvent if the ring rules ask for it. Returns the
    /// hypercall status when a signal was sent.
    pub fn flush(&mut self) -> Result<Option<u64>, VscError> {
        let ring_err = |e: vmbus::ring::RingError| VscError::Ring(e.to_string());
        let freed = self.incoming.commit().map_err(ring_err)?;
        let sent = self.outgoing.commit().map_err(ring_err)?;
        if freed || sent {
            return Ok(Some(self.guest.signal_event(self.offer.connection_id)?));
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the channel's interrupt: the VMBus vector
    /// fired and the channel's SIEFP bit was set (and is now cleared, as
    /// Linux's ISR does). False on timeout.
    pub fn wait_interrupt(&self, timeout: Duration) -> Result<bool, VscError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Count first: a flag set after the check below comes with an
            // interrupt after this count.
            let irqs = self.guest.vmbus_irqs();
            if self.guest.take_event_flag(self.offer.relid) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.guest.wait_vmbus_irq_for(irqs + 1, left)?;
        }
    }
}

impl vmbus::vsc::VscChannel for GuestChannel<'_> {
    fn offer(&self) -> &GuestOffer {
        &self.offer
    }

    fn outgoing(&mut self) -> &mut vmbus::ring::OutgoingRing {
        &mut self.outgoing
    }

    fn incoming(&mut self) -> &mut vmbus::ring::IncomingRing {
        &mut self.incoming
    }

    fn flush(&mut self) -> Result<(), vmbus::vsc::BusError> {
        match GuestChannel::flush(self)? {
            None | Some(0) => Ok(()),
            Some(status) => Err(VscError::Post(status).into()),
        }
    }

    /// As a Linux guest polls (NAPI): host signals stay masked while it
    /// reads; before sleeping it unmasks them, re-checks the ring, and
    /// then halts until the channel's interrupt.
    fn wait(&mut self, timeout: Duration) -> Result<vmbus::channel::Wait, vmbus::vsc::BusError> {
        use vmbus::channel::Wait;
        vmbus::vsc::VscChannel::flush(self)?;
        let ring_err = |e: vmbus::ring::RingError| VscError::Ring(e.to_string());
        if !self.incoming.unmask_and_check_empty().map_err(ring_err)? {
            self.incoming.mask_interrupts();
            return Ok(Wait::Ready);
        }
        let woke = self.wait_interrupt(timeout)?;
        self.incoming.mask_interrupts();
        Ok(if woke { Wait::Ready } else { Wait::TimedOut })
    }
}

/// VSC failures.
#[derive(Debug, thiserror::Error)]
pub enum VscError {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("HvPostMessage returned status {0:#x}")]
    Post(u64),
    #[error("host refused {what} (status {status:#x})")]
    Refused { what: &'static str, status: u32 },
    #[error("no VMBus version accepted")]
    NoVersion,
    #[error("out of guest memory")]
    OutOfMemory,
    #[error("ring: {0}")]
    Ring(String),
    #[error("malformed {0} from the host")]
    Malformed(&'static str),
}

fn msg_type(m: &[u8]) -> u32 {
    m.get(..4)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

impl<'g> GuestVsc<'g> {
    /// Negotiates the newest VMBus version the host accepts, as Linux does
    /// (INITIATE_CONTACT on connection 4 from 5.0, else 1).
    pub fn connect(guest: &'g TestGuest) -> Result<Self, VscError> {
        use vmbus::wire::{InitiateContact, MessageHeader, VersionResponse, msgtype, version};
        use zerocopy::{FromBytes, FromZeros, IntoBytes};
        let memory = vmbus::SharedMemory::from_guest_memory(guest.memory().clone());
        let mut vsc = GuestVsc {
            guest,
            memory,
            next_pfn: gpa::FREE / 4096,
            next_gpadl: 0xe1e10,
            version: 0,
            queued: Default::default(),
        };
        for v in vmbus::server::SUPPORTED_VERSIONS {
            let mut m = InitiateContact::new_zeroed();
            m.header = MessageHeader::new(msgtype::INITIATE_CONTACT);
            m.version_requested = v.into();
            m.interrupt_page_or_sint = 2.into();
            let conn = if v >= version::WIN10_V5 { 4 } else { 1 };
            vsc.post_on(conn, m.as_bytes())?;
            let reply = vsc.wait_for(|m| msg_type(m) == msgtype::VERSION_RESPONSE)?;
            let (r, _) =
                VersionResponse::read_from_prefix(&reply).map_err(|_| VscError::NoVersion)?;
            if r.version_supported == 1 {
                vsc.version = v;
                return Ok(vsc);
            }
        }
        Err(VscError::NoVersion)
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The message connection for the negotiated version.
    fn message_connection(&self) -> u32 {
        if self.version >= vmbus::wire::version::WIN10_V5 {
            4
        } else {
            1
        }
    }

    fn post_on(&mut self, connection: u32, msg: &[u8]) -> Result<(), VscError> {
        match self.guest.post_message(connection, msg)? {
            0 => Ok(()),
            s => Err(VscError::Post(s)),
        }
    }

    /// Posts a channel message on the message connection.
    pub fn post(&mut self, msg: &[u8]) -> Result<(), VscError> {
        let conn = self.message_connection();
        self.post_on(conn, msg)
    }

    /// Waits for a message matching `pred`; others are queued.
    pub fn wait_for(&mut self, pred: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>, VscError> {
        if let Some(i) = self.queued.iter().position(|m| pred(m)) {
            return Ok(self.queued.remove(i).expect("present"));
        }
        loop {
            let m = self.guest.next_message()?;
            if pred(&m) {
                return Ok(m);
            }
            self.queued.push_back(m);
        }
    }

    /// REQUESTOFFERS; collects offers until ALLOFFERS_DELIVERED.
    pub fn request_offers(&mut self) -> Result<Vec<GuestOffer>, VscError> {
        use vmbus::wire::{MessageHeader, msgtype};
        use zerocopy::IntoBytes;
        self.post(MessageHeader::new(msgtype::REQUESTOFFERS).as_bytes())?;
        let mut offers = Vec::new();
        loop {
            let m = self.wait_for(|m| {
                matches!(
                    msg_type(m),
                    msgtype::OFFERCHANNEL | msgtype::ALLOFFERS_DELIVERED
                )
            })?;
            if msg_type(&m) == msgtype::ALLOFFERS_DELIVERED {
                return Ok(offers);
            }
            if let Some(o) = GuestOffer::parse(&m) {
                offers.push(o);
            }
        }
    }

    /// Allocates zeroed pages of guest memory for rings and buffers.
    pub fn alloc_pages(&mut self, count: u64) -> Result<Vec<u64>, VscError> {
        let first = self.next_pfn;
        let end = first + count;
        let slice = self
            .memory
            .slice(first * 4096, (count * 4096) as usize)
            .map_err(|_| VscError::OutOfMemory)?;
        slice.zero();
        self.next_pfn = end;
        Ok((first..end).collect())
    }

    /// Sends GPADL_HEADER/BODY for `pfns`; waits for GPADL_CREATED.
    pub fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, VscError> {
        use vmbus::wire::{GpadlCreated, msgtype};
        use zerocopy::FromBytes;
        let id = self.next_gpadl;
        self.next_gpadl += 1;
        for m in vmbus::gpadl::gpadl_messages(relid, id, pfns) {
            self.post(&m)?;
        }
        let reply = self.wait_for(|m| {
            msg_type(m) == msgtype::GPADL_CREATED
                && GpadlCreated::read_from_prefix(m).is_ok_and(|(r, _)| r.gpadl.get() == id)
        })?;
        let (r, _) = GpadlCreated::read_from_prefix(&reply).expect("matched");
        match r.creation_status.get() {
            0 => Ok(id),
            status => Err(VscError::Refused {
                what: "GPADL",
                status,
            }),
        }
    }

    /// Opens a channel with `out_pages` + `in_pages` ring pages (control
    /// pages included), the rings in guest memory.
    pub fn open_channel(
        &mut self,
        offer: &GuestOffer,
        out_pages: u64,
        in_pages: u64,
    ) -> Result<GuestChannel<'g>, VscError> {
        use vmbus::ring::{IncomingRing, OutgoingRing, RingMemory};
        use vmbus::wire::{MessageHeader, OpenChannel, OpenResult, msgtype};
        use zerocopy::{FromBytes, FromZeros, IntoBytes};
        let pfns = self.alloc_pages(out_pages + in_pages)?;
        let ring = |p: &[u64]| -> Result<Arc<RingMemory>, VscError> {
            let pages = self
                .memory
                .map_ring(p)
                .map_err(|e| VscError::Ring(e.to_string()))?;
            let r = RingMemory::from_pages(pages).map_err(|e| VscError::Ring(e.to_string()))?;
            r.init_control();
            Ok(r)
        };
        let out_mem = ring(&pfns[..out_pages as usize])?;
        let in_mem = ring(&pfns[out_pages as usize..])?;
        let gpadl = self.create_gpadl(offer.relid, &pfns)?;
        let mut m = OpenChannel::new_zeroed();
        m.header = MessageHeader::new(msgtype::OPENCHANNEL);
        m.child_relid = offer.relid.into();
        m.open_id = offer.relid.into();
        m.ring_gpadl = gpadl.into();
        m.target_vp = 0.into();
        m.downstream_ring_page_offset = (out_pages as u32).into();
        self.post(m.as_bytes())?;
        let relid = offer.relid;
        let reply = self.wait_for(|m| {
            msg_type(m) == msgtype::OPENCHANNEL_RESULT
                && OpenResult::read_from_prefix(m).is_ok_and(|(r, _)| r.child_relid.get() == relid)
        })?;
        let (r, _) = OpenResult::read_from_prefix(&reply).expect("matched");
        if r.status.get() != 0 {
            return Err(VscError::Refused {
                what: "OPENCHANNEL",
                status: r.status.get(),
            });
        }
        let ring_err = |e: vmbus::ring::RingError| VscError::Ring(e.to_string());
        Ok(GuestChannel {
            guest: self.guest,
            offer: offer.clone(),
            outgoing: OutgoingRing::new(out_mem).map_err(ring_err)?,
            incoming: IncomingRing::new(in_mem).map_err(ring_err)?,
            gpadl,
            pfns,
        })
    }

    /// [`GuestChannel::flush`].
    pub fn flush(&mut self, chan: &mut GuestChannel<'_>) -> Result<Option<u64>, VscError> {
        chan.flush()
    }

    /// Waits for the channel's interrupt (the guest's timeout at most).
    pub fn wait_channel_interrupt(&mut self, chan: &GuestChannel<'_>) -> Result<(), VscError> {
        if chan.wait_interrupt(self.guest.timeout)? {
            return Ok(());
        }
        Err(GuestError::Timeout {
            what: format!("see channel {}'s event flag", chan.offer.relid),
            timeout: self.guest.timeout,
            exit: self.guest.vm().exit_reason(),
        }
        .into())
    }

    /// Waits for the next offer (sub-channels, hot add).
    pub fn wait_offer(&mut self) -> Result<GuestOffer, VscError> {
        let m = self.wait_for(|m| msg_type(m) == vmbus::wire::msgtype::OFFERCHANNEL)?;
        GuestOffer::parse(&m).ok_or(VscError::Malformed("OFFERCHANNEL"))
    }
}

impl<'g> vmbus::vsc::VscBus for GuestVsc<'g> {
    type Channel = GuestChannel<'g>;

    fn memory(&self) -> &vmbus::SharedMemory {
        &self.memory
    }

    fn alloc_pages(&mut self, count: u64) -> Result<vmbus::vsc::Pages, vmbus::vsc::BusError> {
        let pfns = GuestVsc::alloc_pages(self, count)?;
        Ok(vmbus::vsc::Pages {
            first_pfn: pfns.first().copied().unwrap_or(self.next_pfn),
            count,
        })
    }

    fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, vmbus::vsc::BusError> {
        Ok(GuestVsc::create_gpadl(self, relid, pfns)?)
    }

    fn open_channel(
        &mut self,
        offer: &GuestOffer,
        out_pages: u64,
        in_pages: u64,
    ) -> Result<GuestChannel<'g>, vmbus::vsc::BusError> {
        Ok(GuestVsc::open_channel(self, offer, out_pages, in_pages)?)
    }

    fn wait_offer(&mut self) -> Result<GuestOffer, vmbus::vsc::BusError> {
        Ok(GuestVsc::wait_offer(self)?)
    }
}
