//! The network VSP over the VMM: the test guest boots with an appliance
//! configuration holding a SCSI controller and a switch with a netvsp NIC
//! and a tap port in a network namespace this test creates. The guest gets
//! both offers (`vmm_storage` drives the storage side), finds the NIC's,
//! opens its channel with the rings in guest memory, registers the receive
//! and send buffers as GPADLs of guest pages and runs netvsc's NVSP/RNDIS
//! initialization — the same `switch::netvsp::client` code hosted clients
//! run, here over `GuestVsc`: every channel message an HvPostMessage, every
//! signal an HvSignalEvent caught by KVM's ioeventfd, every host signal a
//! SynIC event flag plus the VMBus vector. Then it exchanges frames with
//! the namespace's kernel: ARP and pings seen there by tshark, UDP
//! datagrams from the namespace checked byte for byte in the guest.

use std::time::{Duration, Instant};

use switch::netvsp::client::packets::pump;
use switch::netvsp::client::{NetvscClient, NetvscOptions};
use switch::offload::{fold, ones_sum};
use vmbus::guid::{NETWORK_INTERFACE, SCSI_INTERFACE};
use vmm::testguest::{GuestOptions, GuestVsc, TestGuest};
use vspa_tests::net::{Netns, Tshark, names, ping_seen_by_tshark};
use vspa_tests::require_tool;

const NIC: &str = "5a1b2c3d-0601-4e5f-8a9b-0c1d2e3f4a5b";
const GUEST_MAC: &str = "02:00:00:00:06:02";

/// A table array of an appliance configuration file.
#[test]
fn guest_netvsc_over_the_synic_exchanges_frames_with_a_tap_in_a_namespace() {
    for tool in ["ip", "tshark", "bash"] {
        require_tool(tool);
    }
    let started = Instant::now();
    let (ns_name, tap) = names("vn");
    let dev = format!("{tap}0");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    let text = format!(
        r#"
[[controller]]
name = "scsi0"
[[controller.lun]]
lun = 0
path = "disk.raw"

[[switch]]
name = "sw"
[[switch.port]]
name = "vm"
netvsp = {{ mac = "{GUEST_MAC}", instance = "{NIC}" }}
[[switch.port]]
name = "t"
tap = {{ ifname = "{dev}" }}
"#
    );
    // What `vspa run --config` does: start the appliance (its controllers,
    // its switches) and give its devices to the VM.
    let config = vspa::ValidConfig::from_toml(&text, dir.path()).unwrap();
    let appliance = vspa::Appliance::start(&config, &vspa::Options::default()).unwrap();
    let registry = appliance
        .registry(vspa::tenant::DEFAULT_TENANT)
        .unwrap()
        .clone();
    let runtime = appliance.network();
    let nic = runtime.netvsp_devices().next().expect("a NIC").clone();
    let ns = Netns::new(format!("{ns_name}0"));
    ns.take(&dev, "10.206.0.1/24");
    let tshark = Tshark::start(
        &ns,
        &dev,
        "icmp",
        &["eth.src", "ip.src", "icmp.type", "icmp.seq"],
    );

    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 64,
        registry: registry.clone(),
        ..Default::default()
    })
    .unwrap();
    let partition = guest.vm().partition().clone();
    let (me, there) = ([10, 206, 0, 2], [10, 206, 0, 1]);
    {
        let mut vsc = GuestVsc::connect(&guest).unwrap();
        let offers = vsc.request_offers().unwrap();
        assert!(offers.iter().any(|o| o.interface == SCSI_INTERFACE));
        let offer = offers
            .iter()
            .find(|o| o.interface == NETWORK_INTERFACE)
            .expect("NIC offer")
            .clone();
        assert_eq!(offer.instance, NIC.parse().unwrap());
        // netvsc's initialization inside the VM: NVSP version, NDIS
        // config, receive and send buffers (GPADLs of guest pages), RNDIS
        // INIT, the OID queries and sets, the packet filter.
        let opts = NetvscOptions {
            recv_buffer_bytes: 1 << 20,
            send_buffer_bytes: 512 << 10,
            ring_pages: 32,
            ..Default::default()
        };
        let mut c = NetvscClient::connect(&mut vsc, &offer, &opts).unwrap();
        assert!(nic.is_open(), "the guest has the NIC open");
        assert_eq!(c.mac.to_string(), GUEST_MAC);
        assert_eq!(c.friendly_name.as_deref(), Some("vm"));
        assert_eq!(c.mtu, 1500);
        assert!(c.state.link_up);
        // The buffers the host copies frames into are guest RAM.
        let (recv, send) = c.buffer_pages();
        let ram = vm_memory::GuestMemoryBackend::last_addr(&**guest.memory()).0;
        for p in [recv, send] {
            assert!(p.gpa() >= vmm::testguest::gpa::FREE && p.gpa() + p.len() as u64 <= ram);
        }
        let slow_before = partition.slow_signals();
        let irqs_before = guest.vmbus_irqs();

        // Guest -> namespace: ARP, then pings answered by the namespace's
        // kernel; tshark there saw the guest's requests (from its MAC and
        // IP) and the kernel's replies.
        let (_, lines) = ping_seen_by_tshark(&mut c, me, there, &tshark, 3);
        drop(tshark);
        assert_eq!(lines.len(), 6, "{lines:?}");
        for (i, l) in lines.iter().enumerate() {
            let f: Vec<&str> = l.split('\t').collect();
            let seq = (i / 2).to_string();
            if i % 2 == 0 {
                assert_eq!(f, [GUEST_MAC, "10.206.0.2", "8", &seq], "request");
            } else {
                assert_eq!(f[1..], ["10.206.0.1", "0", &seq], "reply");
            }
        }

        // Namespace -> guest: the kernel there resolves the guest (the
        // guest answers its ARP request) and sends UDP datagrams, which
        // the guest reads in place from its receive buffer and checks
        // byte for byte, checksum included.
        let mut sender = ns
            .cmd(&[
                "bash",
                "-c",
                "for i in 1 2 3 4 5; do echo -n vmm-netvsc-$i-$(printf '%0*d' $((i*200)) 0) \
                 > /dev/udp/10.206.0.2/7777; sleep 0.1; done",
            ])
            .spawn()
            .unwrap();
        let mut got = Vec::new();
        pump(&mut c, me, Duration::from_secs(15), |f, _| {
            let udp_to_us = f.len() >= 42
                && f[12..14] == [8, 0]
                && f[23] == 17
                && f[30..34] == me
                && f[36..38] == 7777u16.to_be_bytes();
            if udp_to_us {
                let ulen = u16::from_be_bytes([f[38], f[39]]) as usize;
                let pseudo = ones_sum(&f[26..34], 17 + ulen as u64);
                assert_eq!(
                    fold(ones_sum(&f[34..34 + ulen], pseudo)),
                    0xffff,
                    "UDP checksum"
                );
                got.push(f[42..34 + ulen].to_vec());
            }
            got.len() == 5
        })
        .unwrap();
        assert!(sender.wait().unwrap().success());
        let expected: Vec<Vec<u8>> = (1..=5)
            .map(|i| format!("vmm-netvsc-{i}-{}", "0".repeat(i * 200)).into_bytes())
            .collect();
        assert!(got == expected, "datagrams from the namespace, in order");
        assert_eq!(c.state.failed_sends, 0);

        // Every guest signal stayed in the kernel (ioeventfd), and the host
        // reached the guest with SynIC interrupts.
        assert_eq!(partition.slow_signals(), slow_before);
        assert!(guest.vmbus_irqs() > irqs_before + 5);
    }

    let stats = nic.stats();
    assert_eq!(stats.drop_tx_malformed, 0);
    assert_eq!(stats.bad_nvsp, 0);
    assert!(stats.rx_packets >= 8, "{stats:?}");
    let tap_port = runtime.switch("sw").unwrap().port_stats("t").unwrap();
    // From the namespace: ARP reply, 4 echo replies, ARP request, 5
    // datagrams; to it: ARP request, 4 echo requests, ARP reply.
    assert!(
        tap_port.rx_frames >= 11 && tap_port.tx_frames >= 6,
        "{tap_port:?}"
    );
    guest.stop();
    assert!(!nic.is_open(), "the NIC closed with the VM");
    appliance.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
