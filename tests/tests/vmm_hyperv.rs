//! The userspace Hyper-V synthetic interface, proven through real KVM
//! exits with vspa's test guest: CPUID detection, every synthetic MSR,
//! the hypercall page (HvPostMessage, HvSignalEvent), SynIC message slots
//! with the pending/EOM protocol, and a misbehaving guest.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmbus::echo::EchoDevice;
use vmbus::server::Registry;
use vmbus::wire::{InitiateContact, MessageHeader, msgtype};
use vmm::hv::regs::{msr, status};
use vmm::testguest::{GUEST_OS_ID, GuestOptions, TestGuest, gpa};
use vmm::vm::VmExit;
use zerocopy::{FromZeros, IntoBytes};

fn boot() -> TestGuest {
    boot_with(Registry::new())
}

fn boot_with(registry: Registry) -> TestGuest {
    TestGuest::boot(GuestOptions {
        memory_mib: 16,
        registry,
        ..Default::default()
    })
    .expect("test guest boots")
}

fn initiate_contact(version: u32) -> Vec<u8> {
    let mut m = InitiateContact::new_zeroed();
    m.header = MessageHeader::new(msgtype::INITIATE_CONTACT);
    m.version_requested = version.into();
    m.interrupt_page_or_sint = 2.into();
    m.as_bytes().to_vec()
}

fn msg_type(payload: &[u8]) -> u32 {
    u32::from_le_bytes(payload[..4].try_into().unwrap())
}

#[test]
fn hv_detection_cpuid() {
    let g = boot();
    let [max, b, c, d] = g.cpuid(0x4000_0000, 0).unwrap();
    assert!((0x4000_0005..=0x4000_ffff).contains(&max), "{max:#x}");
    let vendor: Vec<u8> = [b, c, d].iter().flat_map(|r| r.to_le_bytes()).collect();
    assert_eq!(vendor, b"Microsoft Hv");
    assert_eq!(g.cpuid(0x4000_0001, 0).unwrap()[0].to_le_bytes(), *b"Hv#1");
    let [priv_lo, priv_hi, _, _] = g.cpuid(0x4000_0003, 0).unwrap();
    // HYPERCALL (5) and VP_INDEX (6) MSRs, SynIC (2), reference counter (1);
    // PostMessages and SignalEvents privileges.
    assert_eq!(priv_lo & 0x66, 0x66, "{priv_lo:#x}");
    assert_eq!(priv_hi & 0x30, 0x30, "{priv_hi:#x}");
    assert_ne!(
        g.cpuid(0x4000_0004, 0).unwrap()[0] & (1 << 9),
        0,
        "deprecate AEOI"
    );
    assert_ne!(g.cpuid(1, 0).unwrap()[2] & (1 << 31), 0, "hypervisor bit");
    // KVM's own signature stays reachable one block up.
    let [_, b, c, _] = g.cpuid(0x4000_0100, 0).unwrap();
    let kvm: Vec<u8> = [b, c].iter().flat_map(|r| r.to_le_bytes()).collect();
    assert_eq!(&kvm, b"KVMKVMKV");
}

#[test]
fn synthetic_msrs_round_trip() {
    msr_round_trips(boot());
}

/// The same through KVM's MSR filter, the path kernels with their own
/// Hyper-V emulation take.
#[test]
fn synthetic_msrs_round_trip_through_the_msr_filter() {
    msr_round_trips(
        TestGuest::boot(GuestOptions {
            memory_mib: 16,
            force_msr_filter: true,
            ..Default::default()
        })
        .unwrap(),
    );
}

fn msr_round_trips(g: TestGuest) {
    // What the guest's own setup wrote.
    assert_eq!(g.rdmsr(msr::GUEST_OS_ID).unwrap(), Ok(GUEST_OS_ID));
    assert_eq!(
        g.rdmsr(msr::HYPERCALL).unwrap(),
        Ok(gpa::HYPERCALL_PAGE | 1)
    );
    assert_eq!(g.rdmsr(msr::SIMP).unwrap(), Ok(gpa::SIMP | 1));
    assert_eq!(g.rdmsr(msr::SIEFP).unwrap(), Ok(gpa::SIEFP | 1));
    assert_eq!(g.rdmsr(msr::SCONTROL).unwrap(), Ok(1));
    assert_eq!(g.rdmsr(msr::SINT0 + 2).unwrap(), Ok(0xf3));
    assert_eq!(g.rdmsr(msr::VP_INDEX).unwrap(), Ok(0));
    assert_eq!(g.rdmsr(msr::SVERSION).unwrap(), Ok(1));
    // Round trips of new values.
    g.wrmsr(msr::GUEST_OS_ID, 0x8100_0000_0006_0200)
        .unwrap()
        .unwrap();
    assert_eq!(
        g.rdmsr(msr::GUEST_OS_ID).unwrap(),
        Ok(0x8100_0000_0006_0200)
    );
    for sint in 0..16 {
        let v = 0x10000 | (0x30 + sint as u64);
        g.wrmsr(msr::SINT0 + sint, v).unwrap().unwrap();
        assert_eq!(g.rdmsr(msr::SINT0 + sint).unwrap(), Ok(v), "SINT{sint}");
    }
    g.wrmsr(msr::SINT0 + 2, 0xf3).unwrap().unwrap();
    g.wrmsr(msr::SIEFP, 0x20_8000 | 1).unwrap().unwrap();
    assert_eq!(g.rdmsr(msr::SIEFP).unwrap(), Ok(0x20_8001));
    g.wrmsr(msr::SIEFP, gpa::SIEFP | 1).unwrap().unwrap();
    g.wrmsr(msr::SCONTROL, 0).unwrap().unwrap();
    assert_eq!(g.rdmsr(msr::SCONTROL).unwrap(), Ok(0));
    g.wrmsr(msr::SCONTROL, 1).unwrap().unwrap();
    g.wrmsr(msr::EOM, 0).unwrap().unwrap();
    assert_eq!(g.rdmsr(msr::EOM).unwrap(), Ok(0));
    // Moving the hypercall page fills the new page with the trap code.
    let new_page = 0x20_9000;
    g.wrmsr(msr::HYPERCALL, new_page | 1).unwrap().unwrap();
    assert_eq!(g.rdmsr(msr::HYPERCALL).unwrap(), Ok(new_page | 1));
    let mut code = [0u8; 3];
    vm_memory::Bytes::read_slice(&**g.memory(), &mut code, vm_memory::GuestAddress(new_page))
        .unwrap();
    assert_eq!(code, [0x48, 0x81, 0xf9]);
    g.wrmsr(msr::HYPERCALL, gpa::HYPERCALL_PAGE | 1)
        .unwrap()
        .unwrap();
    // The reference counter runs in 100 ns units.
    let t1 = g.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let t2 = g.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap();
    assert!(t2 - t1 >= 200_000, "{t1} -> {t2}");
    // The hypercall page still works after all that.
    assert_eq!(
        g.hypercall(0x99, 0, 0).unwrap(),
        u64::from(status::INVALID_HYPERCALL_CODE)
    );
}

#[test]
fn bad_msr_values_get_a_general_protection_fault() {
    let g = boot();
    let faults = g.faults();
    let bad: [(u32, u64); 9] = [
        (msr::VP_INDEX, 1),                // read-only
        (msr::TIME_REF_COUNT, 0),          // read-only
        (msr::SCONTROL, 2),                // reserved bit
        (msr::SIMP, gpa::SIMP | 0x10 | 1), // reserved bits 1..11
        (msr::SIMP, 0x7000_0000 | 1),      // page outside guest RAM
        (msr::SIEFP, 0xffff_ffff_f000 | 1),
        (msr::SINT0 + 2, 0x05),            // unmasked vector below 16
        (msr::SINT0 + 2, 1 << 20 | 0xf3),  // reserved bit
        (msr::HYPERCALL, 0xdead_0000 | 1), // page outside guest RAM
    ];
    for (i, (index, value)) in bad.iter().enumerate() {
        assert_eq!(
            g.wrmsr(*index, *value).unwrap(),
            Err(()),
            "wrmsr {index:#x} {value:#x}"
        );
        assert_eq!(g.faults(), faults + i as u64 + 1);
    }
    assert_eq!(
        g.rdmsr(0x4000_00ff).unwrap(),
        Err(()),
        "unknown synthetic MSR"
    );
    // Nothing changed.
    assert_eq!(g.rdmsr(msr::SIMP).unwrap(), Ok(gpa::SIMP | 1));
    assert_eq!(g.rdmsr(msr::SINT0 + 2).unwrap(), Ok(0xf3));
    assert_eq!(
        g.rdmsr(msr::HYPERCALL).unwrap(),
        Ok(gpa::HYPERCALL_PAGE | 1)
    );
}

#[test]
fn hypercalls_with_bad_input_get_error_statuses() {
    let g = boot();
    let post = 0x5c;
    let s = |v: u16| u64::from(v);
    // Unaligned, page-crossing and out-of-RAM input pages.
    assert_eq!(
        g.hypercall(post, gpa::INPUT + 4, 0).unwrap(),
        s(status::INVALID_ALIGNMENT)
    );
    assert_eq!(
        g.hypercall(post, gpa::INPUT + 0xf08, 0).unwrap(),
        s(status::INVALID_ALIGNMENT)
    );
    assert_eq!(
        g.hypercall(post, 0x7fff_0000, 0).unwrap(),
        s(status::INVALID_PARAMETER)
    );
    assert_eq!(
        g.hypercall(post, u64::MAX - 7, 0).unwrap(),
        s(status::INVALID_ALIGNMENT)
    );
    // A message larger than 240 bytes, a foreign connection, a bad type.
    let mut input = vec![0u8; 256];
    input[..4].copy_from_slice(&4u32.to_le_bytes());
    input[8..12].copy_from_slice(&1u32.to_le_bytes());
    input[12..16].copy_from_slice(&241u32.to_le_bytes());
    g.write(gpa::INPUT, &input).unwrap();
    assert_eq!(
        g.hypercall(post, gpa::INPUT, 0).unwrap(),
        s(status::INVALID_PARAMETER)
    );
    input[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    g.write(gpa::INPUT, &input).unwrap();
    assert_eq!(
        g.hypercall(post, gpa::INPUT, 0).unwrap(),
        s(status::INVALID_PARAMETER)
    );
    assert_eq!(
        g.post_message(7, &initiate_contact(0x50003)).unwrap(),
        s(status::INVALID_CONNECTION_ID)
    );
    input[12..16].copy_from_slice(&8u32.to_le_bytes());
    input[8..12].copy_from_slice(&0x8000_0001u32.to_le_bytes());
    g.write(gpa::INPUT, &input).unwrap();
    assert_eq!(
        g.hypercall(post, gpa::INPUT, 0).unwrap(),
        s(status::INVALID_PARAMETER)
    );
    // Control values: fast PostMessage, reps, reserved bits, unknown calls.
    assert_eq!(
        g.hypercall(post | 1 << 16, gpa::INPUT, 0).unwrap(),
        s(status::INVALID_HYPERCALL_INPUT)
    );
    assert_eq!(
        g.hypercall(post | 1 << 32, gpa::INPUT, 0).unwrap(),
        s(status::INVALID_HYPERCALL_INPUT)
    );
    assert_eq!(
        g.hypercall(post | 1 << 63, gpa::INPUT, 0).unwrap(),
        s(status::INVALID_HYPERCALL_INPUT)
    );
    assert_eq!(
        g.hypercall(0x4e, 0, 0).unwrap(),
        s(status::INVALID_HYPERCALL_CODE)
    );
    // HvSignalEvent on unknown connections, with reserved bits, slow with a bad pointer.
    assert_eq!(
        g.signal_event(0x1_0001).unwrap(),
        s(status::INVALID_CONNECTION_ID)
    );
    assert_eq!(
        g.hypercall(0x1005d, 1 << 48 | 5, 0).unwrap(),
        s(status::INVALID_PARAMETER)
    );
    assert_eq!(
        g.hypercall(0x5d, 0x7fff_0000, 0).unwrap(),
        s(status::INVALID_PARAMETER)
    );
    assert_eq!(
        g.hypercall(0x5d, gpa::INPUT + 1, 0).unwrap(),
        s(status::INVALID_ALIGNMENT)
    );
    // The guest and the VMM carry on.
    assert_eq!(g.post_message(4, &initiate_contact(0x50003)).unwrap(), 0);
    let reply = g.next_message().unwrap();
    assert_eq!(msg_type(&reply), msgtype::VERSION_RESPONSE);
    assert_eq!(reply[8], 1, "version supported");
}

#[test]
fn host_messages_use_the_slot_with_pending_and_eom() {
    let registry = Registry::new();
    registry.add(Arc::new(EchoDevice::new(
        "11111111-2222-3333-4444-555555555555".parse().unwrap(),
    )));
    let g = boot_with(registry);
    let slot = gpa::SIMP + 2 * 256;
    let read_slot = |g: &TestGuest| {
        let mut b = [0u8; 256];
        vm_memory::Bytes::read_slice(&**g.memory(), &mut b, vm_memory::GuestAddress(slot)).unwrap();
        b
    };
    // A message posted by the host arrives with an interrupt on 0xf3.
    let irqs = g.vmbus_irqs();
    assert_eq!(g.post_message(4, &initiate_contact(0x50003)).unwrap(), 0);
    g.wait_vmbus_irq(irqs + 1).unwrap();
    let s = read_slot(&g);
    assert_eq!(
        u32::from_le_bytes(s[..4].try_into().unwrap()),
        1,
        "message type"
    );
    assert_eq!(s[4], 16, "payload size of VERSION_RESPONSE");
    assert_eq!(msg_type(&s[16..]), msgtype::VERSION_RESPONSE);
    assert_eq!(s[5] & 1, 0, "nothing pending");
    assert!(g.take_message().unwrap().is_some());
    // REQUESTOFFERS gets two messages: the offer fills the slot, the
    // second (ALLOFFERS_DELIVERED) waits and marks the slot pending.
    let irqs = g.vmbus_irqs();
    assert_eq!(
        g.post_message(4, MessageHeader::new(msgtype::REQUESTOFFERS).as_bytes())
            .unwrap(),
        0
    );
    g.wait_vmbus_irq(irqs + 1).unwrap();
    let s = read_slot(&g);
    assert_eq!(msg_type(&s[16..]), msgtype::OFFERCHANNEL);
    assert_eq!(s[5] & 1, 1, "msg_pending set while a message waits");
    let synic = g.vm().partition().synic(0).unwrap().clone();
    assert_eq!(synic.queued(2), 1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(g.vmbus_irqs(), irqs + 1, "no interrupt until EOM");
    assert_eq!(msg_type(&read_slot(&g)[16..]), msgtype::OFFERCHANNEL);
    // The guest clears the slot and writes EOM (msg_pending was set): the
    // second message arrives with its own interrupt.
    let taken = g.take_message().unwrap().unwrap();
    assert_eq!(msg_type(&taken[16..]), msgtype::OFFERCHANNEL);
    g.wait_vmbus_irq(irqs + 2).unwrap();
    let s = read_slot(&g);
    assert_eq!(msg_type(&s[16..]), msgtype::ALLOFFERS_DELIVERED);
    assert_eq!(s[5] & 1, 0);
    assert_eq!(synic.queued(2), 0);
    // A masked SINT still gets the message, without an interrupt.
    g.take_message().unwrap().unwrap();
    g.wrmsr(msr::SINT0 + 2, 0x10000 | 0xf3).unwrap().unwrap();
    let irqs = g.vmbus_irqs();
    assert_eq!(g.post_message(4, &initiate_contact(0x50003)).unwrap(), 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while read_slot(&g)[0] == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "message never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(g.vmbus_irqs(), irqs);
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn serial_console_and_i8042_reset_end_the_vm_cleanly() {
    let console = Console::default();
    let g = TestGuest::boot(GuestOptions {
        memory_mib: 16,
        console: Some(Box::new(console.clone())),
        ..Default::default()
    })
    .unwrap();
    let out = String::from_utf8(console.0.lock().unwrap().clone()).unwrap();
    assert_eq!(out, vmm::testguest::BANNER);
    assert_eq!(g.reset(), VmExit::Reset);
}

#[test]
fn triple_fault_stops_the_vm_not_the_vmm() {
    let g = boot();
    assert_eq!(g.triple_fault(), VmExit::TripleFault { vcpu: 0 });
    // The process is fine: another VM boots and answers.
    let g = boot();
    assert_eq!(g.rdmsr(msr::VP_INDEX).unwrap(), Ok(0));
}

/// The reference TSC page: advertised in CPUID, placed where the guest's
/// REFERENCE_TSC write says, and computing from the guest's own TSC the
/// same time TIME_REF_COUNT returns, running at 10 MHz.
#[test]
fn reference_tsc_page_agrees_with_the_reference_counter() {
    const IA32_TSC: u32 = 0x10;
    let g = boot();
    let [priv_lo, ..] = g.cpuid(0x4000_0003, 0).unwrap();
    assert_ne!(priv_lo & (1 << 9), 0, "HV_MSR_REFERENCE_TSC_AVAILABLE");

    let page = gpa::FREE + 0x1000;
    g.write(page, &[0xee; 24]).unwrap();
    assert_eq!(g.wrmsr(msr::REFERENCE_TSC, page | 1).unwrap(), Ok(()));
    assert_eq!(g.rdmsr(msr::REFERENCE_TSC).unwrap(), Ok(page | 1));
    let mut raw = [0u8; 24];
    vm_memory::Bytes::read_slice(&**g.memory(), &mut raw, vm_memory::GuestAddress(page)).unwrap();
    let sequence = u32::from_le_bytes(raw[0..4].try_into().unwrap());
    let scale = u64::from_le_bytes(raw[8..16].try_into().unwrap());
    let offset = i64::from_le_bytes(raw[16..24].try_into().unwrap());
    assert!(sequence != 0 && sequence != u32::MAX, "valid page");
    // What Linux's hv_read_tsc_page computes from a TSC value.
    let page_time =
        |tsc: u64| (((u128::from(tsc) * u128::from(scale)) >> 64) as i64 + offset) as u64;

    let before = g.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap();
    let tsc = g.rdmsr(IA32_TSC).unwrap().unwrap();
    let after = g.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap();
    let t = page_time(tsc);
    // The clock started with the VM, moments ago (well under a minute).
    assert!(before < 600_000_000, "reference time {before}");
    // 100 µs of slack for how the host measured KVM's TSC offset.
    assert!(
        before.saturating_sub(1000) <= t && t <= after + 1000,
        "{before} <= {t} <= {after}"
    );

    // 10 MHz against the host's clock over about half a second.
    let (h0, r0) = (
        std::time::Instant::now(),
        g.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r1 = g.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap();
    let host_units = h0.elapsed().as_nanos() as f64 / 100.0;
    let ratio = (r1 - r0) as f64 / host_units;
    assert!((0.9..1.1).contains(&ratio), "reference clock at {ratio}x");

    // Reserved bits and pages outside RAM fault; disabling is allowed.
    assert_eq!(g.wrmsr(msr::REFERENCE_TSC, page | 0x2).unwrap(), Err(()));
    assert_eq!(g.wrmsr(msr::REFERENCE_TSC, (1 << 40) | 1).unwrap(), Err(()));
    assert_eq!(g.rdmsr(msr::REFERENCE_TSC).unwrap(), Ok(page | 1));
    assert_eq!(g.wrmsr(msr::REFERENCE_TSC, 0).unwrap(), Ok(()));
    assert_eq!(g.rdmsr(msr::REFERENCE_TSC).unwrap(), Ok(0));
    g.stop();
}
