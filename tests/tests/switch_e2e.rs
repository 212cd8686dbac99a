//! End-to-end tests of the switch: a real `vspa serve --config` process with
//! tap ports moved into network namespaces the test creates, driven by real
//! ping, iperf3, bash's /dev/tcp and tshark. Every address used lives inside
//! those namespaces.

use std::process::{Command, Stdio};
use vspa_tests::net::{Netns, counter, counters_over_tcp, iperf3, names, run_ok};
use vspa_tests::{VspaServe, require_tool, workspace_bin};

fn ping(ns: &Netns, addr: &str, count: u32) -> bool {
    let count = count.to_string();
    ns.output(&["ping", "-c", &count, "-i", "0.2", "-W", "2", addr])
        .status
        .success()
}

#[test]
fn switch_ping_internal_counters_and_mirror_pcap() {
    for tool in ["ip", "ping", "tshark", "bash"] {
        require_tool(tool);
    }
    let (ns, tap) = names("m");
    let vspa = VspaServe::with_config(&format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "t1"
tap = {{ ifname = "{tap}1" }}
mirror = "cap"
[[switch.port]]
name = "t2"
tap = {{ ifname = "{tap}2" }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:c0:fe", ip = "10.201.0.254/24", counters_port = 9100 }}
[[switch.port]]
name = "cap"
pcap = {{ path = "@DIR@/mirror.pcap" }}
"#
    ));
    let ns1 = Netns::new(format!("{ns}1"));
    let ns2 = Netns::new(format!("{ns}2"));
    ns1.take(&format!("{tap}1"), "10.201.0.1/24");
    ns2.take(&format!("{tap}2"), "10.201.0.2/24");

    assert!(ping(&ns1, "10.201.0.2", 5), "ping between the namespaces");
    assert!(ping(&ns2, "10.201.0.254", 3), "ping of the internal port");

    let text = counters_over_tcp(&ns1, "10.201.0.254", 9100);
    for line in text.lines() {
        let mut f = line.split(' ');
        let (name, value) = (f.next().unwrap(), f.next().unwrap_or(""));
        assert!(
            name.starts_with("switch.sw.") && value.parse::<u64>().is_ok(),
            "{line:?}"
        );
        assert!(f.next().is_none(), "{line:?}");
    }
    assert!(counter(&text, "switch.sw.port.t1.rx_frames") >= 5);
    assert!(counter(&text, "switch.sw.port.t2.tx_frames") >= 5);
    assert!(counter(&text, "switch.sw.port.mgmt.rx_frames") >= 3);
    assert!(counter(&text, "switch.sw.mac_entries") >= 3);
    assert_eq!(counter(&text, "switch.sw.port.t1.drop_malformed"), 0);

    let pcap = vspa.path("mirror.pcap");
    let fields = run_ok(
        "tshark",
        &[
            "-r",
            pcap.to_str().unwrap(),
            "-Y",
            "icmp",
            "-T",
            "fields",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "icmp.type",
        ],
    );
    let count = |want: &str| fields.lines().filter(|l| *l == want).count();
    assert_eq!(
        count("10.201.0.1\t10.201.0.2\t8"),
        5,
        "echo requests mirrored:\n{fields}"
    );
    assert_eq!(
        count("10.201.0.2\t10.201.0.1\t0"),
        5,
        "echo replies mirrored:\n{fields}"
    );
    assert!(
        !fields.contains("10.201.0.254"),
        "t1 saw no internal-port pings"
    );
}

fn bytes(report: &serde_json::Value, which: &str) -> u64 {
    report["end"][which]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {which} in {report}"))
}

#[test]
fn switch_iperf3_tcp_udp_and_software_segmentation() {
    for tool in ["ip", "iperf3", "ping"] {
        require_tool(tool);
    }
    let (ns, tap) = names("i");
    let _vspa = VspaServe::with_config(&format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "t1"
tap = {{ ifname = "{tap}1" }}
[[switch.port]]
name = "t2"
tap = {{ ifname = "{tap}2" }}
[[switch.port]]
name = "plain"
tap = {{ ifname = "{tap}3", offloads = false }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:c0:fe", ip = "10.202.0.254/24", counters_port = 9100 }}
"#
    ));
    let ns1 = Netns::new(format!("{ns}1"));
    let ns2 = Netns::new(format!("{ns}2"));
    let ns3 = Netns::new(format!("{ns}3"));
    ns1.take(&format!("{tap}1"), "10.202.0.1/24");
    ns2.take(&format!("{tap}2"), "10.202.0.2/24");
    ns3.take(&format!("{tap}3"), "10.202.0.3/24");
    assert!(ping(&ns1, "10.202.0.2", 2));

    let tcp = iperf3(&ns2, &ns1, "10.202.0.2", &["-t", "10"]);
    let (sent, received) = (bytes(&tcp, "sum_sent"), bytes(&tcp, "sum_received"));
    assert!(received > 100 << 20, "TCP received only {received} bytes");
    assert!(
        received * 100 >= sent * 99,
        "TCP received {received} of {sent}"
    );

    let udp = iperf3(&ns2, &ns1, "10.202.0.2", &["-u", "-b", "100M", "-t", "3"]);
    let (sent, received) = (bytes(&udp, "sum_sent"), bytes(&udp, "sum_received"));
    assert!(received > 10 << 20, "UDP received only {received} bytes");
    assert!(
        received * 10 >= sent * 8,
        "UDP lost too much: {received} of {sent}"
    );

    // ns1 sends 64 KiB GSO frames; the tap without offloads gets them cut
    // and checksummed by the switch, or TCP would stall.
    let soft = iperf3(&ns3, &ns1, "10.202.0.3", &["-t", "3"]);
    let (sent, received) = (bytes(&soft, "sum_sent"), bytes(&soft, "sum_received"));
    assert!(
        received > 10 << 20,
        "TCP to the plain tap received only {received}"
    );
    // What was still in flight when the client stopped may not have
    // arrived; on a loaded host that can be a few percent of 3 s.
    assert!(received * 100 >= sent * 95, "received {received} of {sent}");

    // Large segments crossed whole between the offloading taps, and only
    // MTU-sized frames went to the plain one.
    let text = counters_over_tcp(&ns1, "10.202.0.254", 9100);
    let avg = |port: &str, dir: &str| {
        counter(&text, &format!("switch.sw.port.{port}.{dir}_bytes"))
            / counter(&text, &format!("switch.sw.port.{port}.{dir}_frames")).max(1)
    };
    assert!(avg("t1", "rx") > 8000, "t1 sent GSO frames:\n{text}");
    assert!(avg("t2", "tx") > 8000, "t2 got them whole:\n{text}");
    assert!(
        avg("plain", "tx") <= 1514,
        "the plain tap got segments:\n{text}"
    );
    assert!(counter(&text, "switch.sw.port.plain.tx_frames") > 5000);
    assert_eq!(counter(&text, "switch.sw.port.plain.drop_offload"), 0);
}

fn vlan_config(tap: &str, vlan1: &str, vlan2: &str) -> String {
    format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "t1"
tap = {{ ifname = "{tap}1" }}
vlan = {vlan1}
[[switch.port]]
name = "t2"
tap = {{ ifname = "{tap}2" }}
vlan = {vlan2}
mirror = "cap"
[[switch.port]]
name = "cap"
pcap = {{ path = "@DIR@/t2.pcap" }}
"#
    )
}

/// Frames t2 sent or received whose ARP sender is `ip`, from its mirror.
fn arp_from(vspa: &VspaServe, ip: &str) -> usize {
    let pcap = vspa.path("t2.pcap");
    let filter = format!("arp.src.proto_ipv4 == {ip}");
    let out = run_ok("tshark", &["-r", pcap.to_str().unwrap(), "-Y", &filter]);
    out.lines().count()
}

#[test]
fn switch_vlans_separate_and_join_taps() {
    for tool in ["ip", "ping", "tshark"] {
        require_tool(tool);
    }
    let (ns, tap) = names("v");
    let ns1 = Netns::new(format!("{ns}1"));
    let ns2 = Netns::new(format!("{ns}2"));
    let (t1, t2) = (format!("{tap}1"), format!("{tap}2"));
    let access = |id: u16| format!("{{ mode = \"access\", id = {id} }}");

    let vspa = VspaServe::with_config(&vlan_config(&tap, &access(10), &access(20)));
    ns1.take(&t1, "10.203.0.1/24");
    ns2.take(&t2, "10.203.0.2/24");
    assert!(
        !ping(&ns1, "10.203.0.2", 2),
        "different access VLANs must not talk"
    );
    assert!(!ping(&ns2, "10.203.0.1", 2));
    assert_eq!(
        arp_from(&vspa, "10.203.0.1"),
        0,
        "no broadcast crossed VLANs"
    );
    assert!(
        arp_from(&vspa, "10.203.0.2") > 0,
        "t2's own ARP requests were seen"
    );
    drop(vspa);

    let vspa = VspaServe::with_config(&vlan_config(&tap, &access(10), &access(10)));
    ns1.take(&t1, "10.203.0.1/24");
    ns2.take(&t2, "10.203.0.2/24");
    assert!(ping(&ns1, "10.203.0.2", 3), "same access VLAN talks");
    assert!(arp_from(&vspa, "10.203.0.1") > 0);
}

#[test]
fn switch_config_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[switch]]\nname = \"a\"\ncolour = 1\n",
            "unknown field `colour`",
        ),
        ("[[swtich]]\nname = \"a\"\n", "unknown field `swtich`"),
        (
            "[[switch]]\nname = \"a\"\n[[switch.port]]\nname = \"p\"\n",
            "needs exactly one of `tap`, `internal`, `pcap`, `netvsp`",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(workspace_bin("vspa"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(err.contains(want), "{text}\n-> {err}");
    }
}

/// Waits (10 s at most) for `check` to hold.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A reload adds a tap port to the running switch (the device appears and
/// forwards at once) and a later one takes it away (the device goes).
#[test]
fn reload_adds_and_removes_tap_ports() {
    for tool in ["ip", "ping"] {
        require_tool(tool);
    }
    let (ns, tap) = names("r");
    let base = r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "mgmt"
internal = { mac = "02:00:00:00:c7:fe", ip = "10.207.0.254/24", counters_port = 9100 }
"#;
    let vspa = VspaServe::with_config(base);
    let ifname = format!("{tap}1");
    let exists = |ns: Option<&Netns>| {
        let mut c = match ns {
            Some(ns) => ns.cmd(&["ip", "link", "show", &ifname]),
            None => {
                let mut c = Command::new("ip");
                c.args(["link", "show", &ifname]);
                c
            }
        };
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c.status().unwrap().success()
    };
    assert!(!exists(None));
    // A file that parses but does not validate (a mirror to no port)
    // changes nothing.
    vspa.reload(&format!(
        "{base}[[switch.port]]\nname = \"t1\"\ntap = {{ ifname = \"{ifname}\" }}\nmirror = \"nope\"\n"
    ));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!exists(None), "a refused reload created the tap");
    vspa.reload(&format!(
        "{base}[[switch.port]]\nname = \"t1\"\ntap = {{ ifname = \"{ifname}\" }}\n"
    ));
    eventually("the tap device appears", || exists(None));
    let ns1 = Netns::new(format!("{ns}1"));
    ns1.take(&ifname, "10.207.0.1/24");
    assert!(ping(&ns1, "10.207.0.254", 3), "ping of the internal port");
    vspa.reload(base);
    eventually("the tap device goes", || !exists(Some(&ns1)));
    assert!(!ping(&ns1, "10.207.0.254", 1));
}
