//! End-to-end tests of VXLAN tunnel ports: `vspa serve` against the Linux
//! kernel's own `vxlan` device across a veth underlay (ping and iperf3 TCP
//! both ways, tshark decoding the underlay, both sides' FDBs learning),
//! and two `vspa serve` processes in two namespaces joined by VXLAN, each
//! with netvsp guest NICs driven by hosted netvsc clients (ARP and frames
//! between the guests, two VNIs kept apart, a remote removed by reload),
//! and the `gso_tap` path over IPv4 and IPv6 underlays against the
//! kernel's VTEP. Every address lives in namespaces the tests create.

use std::time::{Duration, Instant};

use switch::netvsp::client::packets::{arp, eth};
use switch::netvsp::client::{NetvscClient, NetvscOptions, TxFrame, connect_hosted};
use switch::wire::MacAddr;
use vmbus::hosted::client::HostedClient;
use vspa_tests::net::{Netns, Tshark, counter, counters_over_tcp, iperf3, names, run_ok};
use vspa_tests::{VspaServe, require_tool};

/// A veth pair between two namespaces, addressed and up.
fn underlay(a: &Netns, b: &Netns, (ia, ib): (&str, &str), (ca, cb): (&str, &str)) {
    run_ok(
        "ip",
        &[
            "link", "add", ia, "netns", &a.0, "type", "veth", "peer", "name", ib, "netns", &b.0,
        ],
    );
    for (ns, dev, cidr) in [(a, ia, ca), (b, ib, cb)] {
        // IPv6 addresses must be usable at once (vspa binds them).
        let dad = if cidr.contains(':') { "nodad" } else { "" };
        let args = ["-n", &ns.0, "addr", "add", cidr, "dev", dev, dad];
        run_ok("ip", &args[..if dad.is_empty() { 7 } else { 8 }]);
        run_ok("ip", &["-n", &ns.0, "link", "set", dev, "up"]);
    }
}

/// Moves `dev` from namespace `from` into `to`, addressed, up, MTU `mtu`.
fn move_dev(from: &Netns, to: &Netns, dev: &str, cidr: &str, mtu: u32) {
    run_ok("ip", &["-n", &from.0, "link", "set", dev, "netns", &to.0]);
    run_ok("ip", &["-n", &to.0, "addr", "add", cidr, "dev", dev]);
    let mtu = mtu.to_string();
    run_ok("ip", &["-n", &to.0, "link", "set", dev, "mtu", &mtu, "up"]);
}

fn ping(ns: &Netns, addr: &str, count: u32) -> bool {
    let count = count.to_string();
    ns.output(&["ping", "-c", &count, "-i", "0.2", "-W", "2", addr])
        .status
        .success()
}

/// Bytes a 2-second iperf3 TCP run from `client` to a server at `addr` in
/// `server` delivered.
fn iperf3_bytes(server: &Netns, client: &Netns, addr: &str) -> u64 {
    let report = iperf3(server, client, addr, &["-t", "2"]);
    report["end"]["sum_received"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no received bytes in {report}"))
}

/// Runs `probe` until `tshark` shows it captures (20 s at most), then
/// drops what it printed so far.
fn until_captured(tshark: &Tshark, mut probe: impl FnMut()) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        probe();
        if tshark.next(Duration::from_millis(200)).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "tshark never saw a packet");
    }
    while tshark.next(Duration::from_millis(300)).is_some() {}
}

/// A command line's words.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn mac_of(ns: &Netns, dev: &str) -> String {
    let path = format!("/sys/class/net/{dev}/address");
    ns.ok(&["cat", &path]).trim().to_string()
}

fn sysfs_stat(ns: &Netns, dev: &str, stat: &str) -> u64 {
    let path = format!("/sys/class/net/{dev}/statistics/{stat}");
    ns.ok(&["cat", &path]).trim().parse().unwrap()
}

#[test]
fn vxlan_interoperates_with_the_kernel() {
    for tool in [
        "ip", "bridge", "ping", "iperf3", "tshark", "bash", "ethtool",
    ] {
        require_tool(tool);
    }
    let (ns, dev) = names("x");
    // K: the kernel's VTEP; U: vspa's underlay; T: behind vspa's tap.
    let k = Netns::new(format!("{ns}k"));
    let u = Netns::new(format!("{ns}u"));
    let t = Netns::new(format!("{ns}t"));
    let (vk, vu, vx, tap) = (
        format!("{dev}k"),
        format!("{dev}u"),
        format!("{dev}v"),
        format!("{dev}t"),
    );
    underlay(&k, &u, (&vk, &vu), ("10.216.0.1/24", "10.216.0.2/24"));
    // A veth never completes checksums a sender left partial, and a UDP
    // socket cannot tell them from complete ones: the kernel's side must
    // checksum inner TCP before it leaves (a NIC does that in hardware).
    k.ok(&["ethtool", "-K", &vk, "tx", "off"]);
    // GRO on vspa's side of the underlay (NAPI on the veth, as a NIC has)
    // lets the kernel hand vspa's socket many datagrams per buffer.
    u.ok(&["ethtool", "-K", &vu, "gro", "on"]);
    // A second remote that is no VTEP: floods reach it, learned unicast
    // must not (a static neighbour puts its packets on the wire).
    run_ok(
        "ip",
        &[
            "-n",
            &u.0,
            "neigh",
            "add",
            "10.216.0.3",
            "lladdr",
            "02:00:00:00:33:33",
            "dev",
            &vu,
        ],
    );
    k.ok(&[
        "ip",
        "link",
        "add",
        &vx,
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "4789",
        "local",
        "10.216.0.1",
        "remote",
        "10.216.0.2",
        "dev",
        &vk,
        "udpcsum",
    ]);
    k.ok(&["ip", "addr", "add", "192.168.216.1/24", "dev", &vx]);
    k.ok(&["ip", "link", "set", &vx, "up"]);
    assert!(k.ok(&["cat", &format!("/sys/class/net/{vx}/mtu")]).trim() == "1450");

    // An IPv6 underlay to a second kernel VTEP, VNI 43, in the same VLAN.
    let k6 = Netns::new(format!("{ns}6"));
    let (v6k, v6u, vx6) = (format!("{dev}6k"), format!("{dev}6u"), format!("{dev}6v"));
    underlay(&k6, &u, (&v6k, &v6u), ("fd00:216::1/64", "fd00:216::2/64"));
    k6.ok(&words(&format!(
        "ip link add {vx6} type vxlan id 43 dstport 4789 local fd00:216::1 \
         remote fd00:216::2 dev {v6k} udpcsum"
    )));
    k6.ok(&["ip", "addr", "add", "192.168.216.3/24", "dev", &vx6]);
    k6.ok(&["ip", "link", "set", &vx6, "up"]);

    let _vspa = VspaServe::with_config_in(
        &u,
        &format!(
            r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "tap"
tap = {{ ifname = "{tap}" }}
[[switch.port]]
name = "vx"
vxlan = {{ local = "10.216.0.2:4789", vni = 42, remotes = ["10.216.0.1", "10.216.0.3"], udp_csum = true }}
[[switch.port]]
name = "vx6"
vxlan = {{ local = "[fd00:216::2]:4789", vni = 43, remotes = ["fd00:216::1"], udp_csum = true }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:16:fe", ip = "192.168.216.254/24", counters_port = 9100 }}
"#
        ),
    );
    // The guest side of the tunnel: 1450 = 1500 underlay - 50.
    move_dev(&u, &t, &tap, "192.168.216.2/24", 1450);
    let tap_mac = mac_of(&t, &tap);
    let kernel_mac = mac_of(&k, &vx);

    let tshark = Tshark::start(
        &u,
        &vu,
        "udp port 4789",
        &[
            "ip.src",
            "ip.dst",
            "udp.srcport",
            "udp.checksum",
            "vxlan.flags",
            "vxlan.vni",
            "eth.src",
            "eth.type",
            "icmp.type",
            "ip.flags.df",
        ],
    );
    // Ping until tshark shows it captures, then the pings it must see.
    until_captured(&tshark, || {
        t.output(&["ping", "-c", "1", "-W", "1", "192.168.216.1"]);
    });
    assert!(
        ping(&t, "192.168.216.1", 3),
        "vspa's side pings the kernel's"
    );
    assert!(
        ping(&k, "192.168.216.2", 3),
        "the kernel's side pings vspa's"
    );
    let lines = tshark.collect(40, Duration::from_secs(5), |f| {
        f.len() == 10 && f[8].contains('8')
    });
    drop(tshark);
    assert!(
        lines.len() >= 6,
        "echo requests on the underlay: {lines:#?}"
    );
    // Fields with an outer and an inner occurrence print both: "outer,inner".
    let from_vspa = lines
        .iter()
        .filter(|l| l.starts_with("10.216.0.2,"))
        .count();
    let from_kernel = lines
        .iter()
        .filter(|l| l.starts_with("10.216.0.1,"))
        .count();
    assert!(from_vspa >= 3 && from_kernel >= 3, "{lines:#?}");
    for l in &lines {
        let f: Vec<&str> = l
            .split('\t')
            .map(|f| f.split(',').next().unwrap())
            .collect();
        let inner_src = l.split('\t').nth(6).unwrap().split(',').nth(1);
        assert_eq!(
            l.split('\t').nth(7),
            Some("0x0800,0x0800"),
            "IPv4 in IPv4: {l}"
        );
        assert_eq!(f[5], "42", "VNI: {l}");
        assert_eq!(f[4], "0x0800", "flags: only I: {l}");
        let want = if f[0] == "10.216.0.2" {
            &tap_mac
        } else {
            &kernel_mac
        };
        assert_eq!(inner_src, Some(want.as_str()), "inner source MAC: {l}");
        let sport: u16 = f[2].parse().unwrap();
        if f[0] == "10.216.0.2" {
            assert_ne!(f[3], "0x0000", "vspa sends UDP checksums: {l}");
            assert!(matches!(f[9], "1" | "True"), "vspa sets DF: {l}");
            assert!(
                sport >= 1024 && sport != 4789,
                "source port from the flow hash: {l}"
            );
        }
    }

    // Over IPv6 (where the kernel insists on UDP checksums) too.
    assert!(ping(&t, "192.168.216.3", 3), "ping over the IPv6 underlay");
    let fdb6 = k6.ok(&["bridge", "fdb", "show", "dev", &vx6]);
    assert!(
        fdb6.lines()
            .any(|l| l.starts_with(&tap_mac) && l.contains("dst fd00:216::2")),
        "{fdb6}"
    );

    // TCP both ways, through the tunnel: thousands of unicast frames.
    let before = counters_over_tcp(&t, "192.168.216.254", 9100);
    let to_kernel = iperf3_bytes(&k, &t, "192.168.216.1");
    let to_vspa = iperf3_bytes(&t, &k, "192.168.216.2");
    assert!(
        to_kernel > 10 << 20,
        "iperf3 to the kernel: {to_kernel} bytes"
    );
    assert!(to_vspa > 10 << 20, "iperf3 to vspa: {to_vspa} bytes");
    assert_eq!(
        sysfs_stat(&k, &vx, "rx_errors"),
        0,
        "the kernel took every packet"
    );

    // The kernel learned the tap's MAC behind vspa's address.
    let fdb = k.ok(&["bridge", "fdb", "show", "dev", &vx]);
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&tap_mac) && l.contains("dst 10.216.0.2")),
        "{fdb}"
    );
    // vspa learned the kernel's: unicast went to 10.216.0.1 only; the
    // other remote got floods (ARP broadcasts) and nothing else.
    let text = counters_over_tcp(&t, "192.168.216.254", 9100);
    let c = |name: &str| counter(&text, &format!("vxlan.sw.vx.{name}"));
    assert!(c("fdb_learned") >= 1, "{text}");
    let v6 = |name: &str| counter(&text, &format!("vxlan.sw.vx6.{name}"));
    assert!(v6("remote.fd00:216::1.rx_packets") >= 3, "{text}");
    assert!(v6("remote.fd00:216::1.tx_packets") >= 3, "{text}");
    assert!(c("fdb_entries") >= 1, "{text}");
    assert!(c("remote.10.216.0.1.tx_packets") > 5000, "{text}");
    let sent_to =
        |text: &str, ip: &str| counter(text, &format!("vxlan.sw.vx.remote.{ip}.tx_packets"));
    let to_other = sent_to(&text, "10.216.0.3") - sent_to(&before, "10.216.0.3");
    assert!(
        to_other <= 10,
        "unicast went to the other remote: {to_other}"
    );
    assert!(c("remote.10.216.0.1.rx_packets") > 1000, "{text}");
    assert!(c("tx_gso_sends") > 100, "TCP left as UDP GSO sends: {text}");
    assert!(c("rx_gro_batches") > 0, "UDP GRO batches came in: {text}");
    for drop in [
        "drop_bad_flags",
        "drop_unknown_source",
        "drop_tx_too_big",
        "tx_errors",
    ] {
        assert_eq!(c(drop), 0, "{drop}: {text}");
    }
}

/// InCsumErrors of protocol `proto` ("Udp:", "Tcp:") in namespace `ns`
/// (/proc/net/snmp).
fn csum_errors(ns: &Netns, proto: &str) -> u64 {
    let snmp = ns.ok(&["cat", "/proc/net/snmp"]);
    let mut udp = snmp.lines().filter(|l| l.starts_with(proto));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "InCsumErrors");
    at.and_then(|i| values.split_whitespace().nth(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no InCsumErrors in {snmp}"))
}

/// Runs `vspa serve` on `config` in `ns`, which must fail: its stderr.
fn refused_in(ns: &Netns, config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vspa.toml");
    std::fs::write(&path, config).unwrap();
    let socket = dir.path().join("vspa.sock");
    let vspa = vspa_tests::workspace_bin("vspa");
    let out = ns.output(&[
        vspa.to_str().unwrap(),
        "serve",
        "--socket",
        socket.to_str().unwrap(),
        "--config",
        path.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "vspa serve started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Makes `dev` in `ns` segment and checksum what it sends in software, as
/// a NIC and a wire between hosts do: only MTU-sized packets with
/// complete checksums cross.
fn wire_like(ns: &Netns, dev: &str) {
    for feature in [
        "tx",
        "tso",
        "tx-udp_tnl-segmentation",
        "tx-udp_tnl-csum-segmentation",
    ] {
        ns.ok(&["ethtool", "-K", dev, feature, "off"]);
    }
}

/// Asserts that VXLAN port `port` of switch `sw` sent everything it was
/// given (`text`: the counters service's answer).
fn no_send_drops(text: &str, port: &str) {
    for drop in [
        "tx_errors",
        "tx_gso_tap_errors",
        "drop_bad_offload",
        "drop_tx_too_big",
    ] {
        let n = counter(text, &format!("vxlan.sw.{port}.{drop}"));
        assert_eq!(n, 0, "{drop}: {text}");
    }
}

/// `name`'s value in namespace `ns`'s /proc/net/snmp6.
fn snmp6(ns: &Netns, name: &str) -> u64 {
    let text = ns.ok(&["cat", "/proc/net/snmp6"]);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// A `gso_tap` test bed: namespaces K (the kernel's VTEP on `vk`), U
/// (vspa, its underlay end `vu` and its `gso_tap`) and T (behind vspa's tap,
/// `NET.2`; the kernel's VTEP is `NET.1`, vspa's counters at `NET.254`).
struct GsoTapBed {
    k: Netns,
    u: Netns,
    t: Netns,
    vk: String,
    vu: String,
    vx: String,
    tap: String,
    gt: String,
    net: &'static str,
    config: String,
}

impl GsoTapBed {
    /// The namespaces, the underlay (`k_addr` in K, `u_addr` in U, MTU
    /// `mtu`), the kernel's VTEP on VNI `vni`, and vspa's configuration.
    fn new(
        test: &str,
        vni: u32,
        (k_addr, u_addr): (&str, &str),
        mtu: u32,
        net: &'static str,
    ) -> Self {
        let (ns, dev) = names(test);
        let d = |s: &str| format!("{dev}{s}");
        let bed = GsoTapBed {
            k: Netns::new(format!("{ns}k")),
            u: Netns::new(format!("{ns}u")),
            t: Netns::new(format!("{ns}t")),
            vk: d("k"),
            vu: d("u"),
            vx: d("v"),
            tap: d("t"),
            gt: d("g"),
            net,
            config: String::new(),
        };
        let (k, u) = (&bed.k, &bed.u);
        let cidr = |a: &str| format!("{a}/{}", if a.contains(':') { 64 } else { 24 });
        underlay(k, u, (&bed.vk, &bed.vu), (&cidr(k_addr), &cidr(u_addr)));
        for (ns, dev) in [(k, &bed.vk), (u, &bed.vu)] {
            ns.ok(&["ip", "link", "set", dev, "mtu", &mtu.to_string()]);
        }
        k.ok(&["ethtool", "-K", &bed.vk, "tx", "off"]);
        let (vx, vk) = (&bed.vx, &bed.vk);
        k.ok(&words(&format!(
            "ip link add {vx} type vxlan id {vni} dstport 4789 local {k_addr} \
             remote {u_addr} dev {vk} udpcsum"
        )));
        k.ok(&["ip", "addr", "add", &format!("{net}.1/24"), "dev", vx]);
        k.ok(&["ip", "link", "set", vx, "up"]);
        let local = if u_addr.contains(':') {
            format!("[{u_addr}]")
        } else {
            u_addr.to_string()
        };
        let (tap, gt) = (&bed.tap, &bed.gt);
        let config = format!(
            r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "tap"
tap = {{ ifname = "{tap}" }}
[[switch.port]]
name = "vx"
vxlan = {{ local = "{local}:4789", vni = {vni}, remotes = ["{k_addr}"], udp_csum = true, mtu = {mtu}, gso_tap = "{gt}" }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:19:fe", ip = "{net}.254/24", counters_port = 9100 }}
"#
        );
        GsoTapBed { config, ..bed }
    }

    /// Starts vspa in U with `config` and moves its tap to T.
    fn start(&self, config: &str) -> VspaServe {
        let vspa = VspaServe::with_config_in(&self.u, config);
        move_dev(
            &self.u,
            &self.t,
            &self.tap,
            &format!("{}.2/24", self.net),
            1450,
        );
        assert!(
            ping(&self.t, &format!("{}.1", self.net), 3),
            "ping through the tunnel"
        );
        vspa
    }

    fn counters(&self) -> String {
        counters_over_tcp(&self.t, &format!("{}.254", self.net), 9100)
    }

    /// iperf3 from T to the kernel's side: bytes delivered, and the
    /// counters before and after.
    fn to_kernel(&self) -> (u64, String, String) {
        let before = self.counters();
        let bytes = iperf3_bytes(&self.k, &self.t, &format!("{}.1", self.net));
        assert!(bytes > 10 << 20, "iperf3 to the kernel: {bytes} bytes");
        (bytes, before, self.counters())
    }

    /// TCP to the kernel leaves through the tap and crosses the veth whole
    /// (far fewer packets on K's underlay than VXLAN packets sent); the
    /// kernel's replies come in through the port's socket.
    fn check_super_packets(&self) {
        let k_before = sysfs_stat(&self.k, &self.vk, "rx_packets");
        let (_, before, text) = self.to_kernel();
        let c = |text: &str, name: &str| counter(text, &format!("vxlan.sw.vx.{name}"));
        let writes = c(&text, "tx_gso_tap_sends") - c(&before, "tx_gso_tap_sends");
        let sent = c(&text, "tx_packets") - c(&before, "tx_packets");
        let arrived = sysfs_stat(&self.k, &self.vk, "rx_packets") - k_before;
        assert!(writes > 100, "TCP left through the gso_tap: {text}");
        assert!(
            arrived * 4 < sent,
            "super-packets crossed whole: {arrived} packets arrived for {sent} sent"
        );
        assert_eq!(sysfs_stat(&self.k, &self.vx, "rx_errors"), 0);
        let to_vspa = iperf3_bytes(&self.t, &self.k, &format!("{}.2", self.net));
        assert!(to_vspa > 10 << 20, "iperf3 to vspa: {to_vspa} bytes");
    }

    /// As over a wire (U segments and checksums in software), the kernel's
    /// VTEP receives MTU-sized packets and `errors` (its checksum error
    /// counters) do not move.
    fn check_wire_like<E: PartialEq + std::fmt::Debug>(&self, errors: impl Fn(&Netns) -> E) {
        wire_like(&self.u, &self.vu);
        let before = errors(&self.k);
        let k_before = sysfs_stat(&self.k, &self.vk, "rx_packets");
        let (bytes, _, text) = self.to_kernel();
        let arrived = sysfs_stat(&self.k, &self.vk, "rx_packets") - k_before;
        assert!(
            arrived as f64 > bytes as f64 / 1500.0,
            "MTU-sized packets: {arrived} for {bytes} bytes"
        );
        assert_eq!(
            errors(&self.k),
            before,
            "outer UDP and inner TCP checksums verify"
        );
        no_send_drops(&text, "vx");
    }
}

/// A VXLAN port with a `gso_tap` against the kernel's VTEP over IPv4: TCP
/// GSO frames leave as UDP-tunnel GSO packets through the tap and U's
/// kernel forwards them whole; with U's offloads off (a wire) the kernel
/// verifies every checksum. The port refuses to open while U does not
/// forward, reopens on a reload under the sandbox, and falls back to its
/// sockets when the tap refuses a write.
#[test]
fn gso_tap_sends_tunnel_super_packets_the_kernel_takes() {
    for tool in ["ip", "iperf3", "ethtool", "ping"] {
        require_tool(tool);
    }
    let bed = GsoTapBed::new("g", 44, ("10.219.0.1", "10.219.0.2"), 1500, "192.168.219");
    // Forwarding off (a new namespace's default): refused, and said why.
    let stderr = refused_in(&bed.u, &bed.config);
    assert!(stderr.contains("net.ipv4.ip_forward=1"), "{stderr}");
    bed.u.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let vspa = bed.start(&bed.config);
    bed.check_super_packets();

    // IPv6 TCP inside the IPv4 tunnel takes the tap too.
    bed.k.ok(&words(&format!(
        "ip -6 addr add fd01:219::1/64 dev {} nodad",
        bed.vx
    )));
    bed.t.ok(&words(&format!(
        "ip -6 addr add fd01:219::2/64 dev {} nodad",
        bed.tap
    )));
    let before = bed.counters();
    let bytes = iperf3_bytes(&bed.k, &bed.t, "fd01:219::1");
    assert!(bytes > 10 << 20, "iperf3 over inner IPv6: {bytes} bytes");
    let text = bed.counters();
    let c = |text: &str, name: &str| counter(text, &format!("vxlan.sw.vx.{name}"));
    let writes = c(&text, "tx_gso_tap_sends") - c(&before, "tx_gso_tap_sends");
    assert!(writes > 100, "inner IPv6 TCP through the gso_tap: {text}");

    // A reload that changes the port reopens it, tap and all (under the
    // default sandbox: the tap's ioctls and sysctls are allowed).
    vspa.reload(
        &bed.config
            .replace(r#"["10.219.0.1"]"#, r#"["10.219.0.1", "10.219.0.3"]"#),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bed
        .counters()
        .contains("vxlan.sw.vx.remote.10.219.0.3.tx_packets")
    {
        assert!(Instant::now() < deadline, "the port never reopened");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ping(&bed.t, "192.168.219.1", 2), "ping after the reload");
    let (_, _, text) = bed.to_kernel();
    assert!(
        c(&text, "tx_gso_tap_sends") > 100,
        "reopened gso_tap: {text}"
    );

    bed.check_wire_like(|ns| (csum_errors(ns, "Udp:"), csum_errors(ns, "Tcp:")));

    // A tap set down refuses writes: TCP goes on through the sockets.
    bed.u.ok(&["ip", "link", "set", &bed.gt, "down"]);
    let (_, _, after) = bed.to_kernel();
    assert!(c(&after, "tx_gso_tap_errors") > 100, "{after}");
    assert!(
        c(&after, "tx_gso_sends") > 100,
        "the socket path took over: {after}"
    );
}

/// The `gso_tap` over an IPv6 underlay (no `accept_local` there: IPv6
/// forwards a packet from a local source as it is): refused until U
/// forwards IPv6, then TCP crosses whole to the kernel's VTEP, and over
/// a wire-like underlay the kernel verifies every checksum. 1520 bytes of
/// underlay carry the 1450-byte inner MTU over IPv6 (70 bytes of headers).
#[test]
fn gso_tap_over_an_ipv6_underlay() {
    for tool in ["ip", "iperf3", "ethtool", "ping"] {
        require_tool(tool);
    }
    let bed = GsoTapBed::new("6", 45, ("fd00:217::1", "fd00:217::2"), 1520, "192.168.217");
    let stderr = refused_in(&bed.u, &bed.config);
    assert!(
        stderr.contains("net.ipv6.conf.all.forwarding=1"),
        "{stderr}"
    );
    bed.u
        .ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let _vspa = bed.start(&bed.config);
    bed.check_super_packets();
    bed.check_wire_like(|ns| (snmp6(ns, "Udp6InCsumErrors"), csum_errors(ns, "Tcp:")));
}

const NICS: [&str; 4] = [
    "5a1b2c3d-0a01-4e5f-8a9b-0c1d2e3f4a5b",
    "5a1b2c3d-0a02-4e5f-8a9b-0c1d2e3f4a5b",
    "5a1b2c3d-0b01-4e5f-8a9b-0c1d2e3f4a5b",
    "5a1b2c3d-0b02-4e5f-8a9b-0c1d2e3f4a5b",
];

fn two_vnis_config(side: char, nics: &[&str], local: &str, remotes: &str) -> String {
    format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "vm1"
netvsp = {{ mac = "02:00:00:00:{side}0:01", instance = "{}", mtu = 1450 }}
vlan = {{ mode = "access", id = 10 }}
[[switch.port]]
name = "vm2"
netvsp = {{ mac = "02:00:00:00:{side}0:02", instance = "{}", mtu = 1450 }}
vlan = {{ mode = "access", id = 20 }}
[[switch.port]]
name = "vx"
vxlan = {{ local = "{local}:4789", vnis = [{{ vni = 100, vlan = 10 }}, {{ vni = 200, vlan = 20 }}], remotes = {remotes}, udp_csum = true }}
"#,
        nics[0], nics[1]
    )
}

/// The netvsc client of NIC `instance` of `vspa`.
fn guest(vspa: &VspaServe, instance: &str) -> (HostedClient, NetvscClient) {
    let opts = NetvscOptions::default();
    connect_hosted(&vspa.socket(), 64 << 20, instance.parse().unwrap(), &opts)
        .unwrap_or_else(|e| panic!("NIC {instance}: {e}"))
}

/// Frames `c` receives that `keep` selects, until there are `want` of
/// them or `wait` passed.
fn receive(
    c: &mut NetvscClient,
    wait: Duration,
    want: usize,
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        c.poll(0, |f| {
            let v = f.to_vec();
            if keep(&v) {
                got.push(v);
            }
        })
        .unwrap();
        c.wait(0, Duration::from_millis(5)).unwrap();
    }
    got
}

/// Sends `f` from `c` until `to` receives a frame equal to it (the first
/// frames may be lost while tshark or the path warms up).
fn deliver(c: &mut NetvscClient, to: &mut NetvscClient, f: &[u8]) {
    for _ in 0..20 {
        c.send(0, &[TxFrame::new(f)]).unwrap();
        if !receive(to, Duration::from_millis(300), 1, |g| g == f).is_empty() {
            return;
        }
    }
    panic!("the frame never arrived");
}

fn is_arp(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [8, 6]
}

#[test]
fn two_vspa_processes_joined_by_vxlan() {
    for tool in ["ip", "tshark"] {
        require_tool(tool);
    }
    let (ns, dev) = names("y");
    let a = Netns::new(format!("{ns}a"));
    let b = Netns::new(format!("{ns}b"));
    let (va, vb) = (format!("{dev}a"), format!("{dev}b"));
    underlay(&a, &b, (&va, &vb), ("10.217.0.1/24", "10.217.0.2/24"));
    run_ok(
        "ip",
        &[
            "-n",
            &a.0,
            "neigh",
            "add",
            "10.217.0.3",
            "lladdr",
            "02:00:00:00:33:33",
            "dev",
            &va,
        ],
    );
    let both = r#"["10.217.0.2", "10.217.0.3"]"#;
    let config_a = |remotes: &str| two_vnis_config('a', &NICS[..2], "10.217.0.1", remotes);
    let vspa_a = VspaServe::with_config_in(&a, &config_a(both));
    let vspa_b = VspaServe::with_config_in(
        &b,
        &two_vnis_config('b', &NICS[2..], "10.217.0.2", r#"["10.217.0.1"]"#),
    );
    let (_h1, mut a1) = guest(&vspa_a, NICS[0]);
    let (_h2, mut a2) = guest(&vspa_a, NICS[1]);
    let (_h3, mut b1) = guest(&vspa_b, NICS[2]);
    let (_h4, mut b2) = guest(&vspa_b, NICS[3]);
    let tshark = Tshark::start(
        &a,
        &va,
        "udp port 4789",
        &["ip.dst", "vxlan.vni", "eth.src", "eth.type"],
    );
    let probe = eth(MacAddr::BROADCAST, a1.mac, 0x88b6, &[0; 46]);
    until_captured(&tshark, || {
        a1.send(0, &[TxFrame::new(&probe)]).unwrap();
    });

    // ARP between a1 and b1 (VLAN 10 <-> VNI 100): the request floods
    // across, the reply comes back unicast.
    let (ip_a1, ip_b1) = ([192, 168, 217, 1], [192, 168, 217, 2]);
    let req = arp(1, a1.mac, ip_a1, MacAddr::default(), ip_b1);
    deliver(&mut a1, &mut b1, &req);
    let reply = arp(2, b1.mac, ip_b1, a1.mac, ip_a1);
    deliver(&mut b1, &mut a1, &reply);
    // b2 (VLAN 20 <-> VNI 200) saw none of VNI 100's broadcasts.
    let leaked = receive(&mut b2, Duration::from_millis(300), 1, |f| {
        is_arp(f) && f[6..12] == a1.mac.0
    });
    assert!(leaked.is_empty(), "VNI 100's ARP reached VLAN 20");

    // Frames both ways, byte-exact and in order.
    const N: u32 = 300;
    let frame = |dst: MacAddr, src: MacAddr, i: u32| {
        let len = 60 + (i as usize * 31) % 1380;
        let mut payload = vec![0u8; len];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        for (j, b) in payload[4..].iter_mut().enumerate() {
            *b = (i as usize * 7 + j) as u8;
        }
        eth(dst, src, 0x88b5, &payload)
    };
    let sent: Vec<Vec<u8>> = (0..N).map(|i| frame(b1.mac, a1.mac, i)).collect();
    for chunk in sent.chunks(32) {
        let batch: Vec<TxFrame> = chunk.iter().map(|f| TxFrame::new(f)).collect();
        a1.send(0, &batch).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = receive(&mut b1, Duration::from_secs(5), N as usize, |f| {
        f.len() >= 14 && f[12..14] == [0x88, 0xb5]
    });
    assert_eq!(got.len(), N as usize, "every frame crossed");
    assert_eq!(got, sent, "byte-exact, in order");

    // VLAN 20 <-> VNI 200 works on its own.
    let req2 = arp(
        1,
        a2.mac,
        [192, 168, 218, 1],
        MacAddr::default(),
        [192, 168, 218, 2],
    );
    deliver(&mut a2, &mut b2, &req2);
    let leaked = receive(&mut b1, Duration::from_millis(300), 1, |f| {
        is_arp(f) && f[6..12] == a2.mac.0
    });
    assert!(leaked.is_empty(), "VNI 200's ARP reached VLAN 10");

    // The underlay: a1's frames in VNI 100, a2's in VNI 200; floods also
    // went to the second remote.
    let lines = tshark.collect(1000, Duration::from_secs(3), |f| f.len() == 4);
    let vni_of = |mac: MacAddr| {
        let m = mac.to_string();
        let mut v: Vec<&str> = lines
            .iter()
            .filter(|l| l.split('\t').nth(2).is_some_and(|s| s.ends_with(&m)))
            .map(|l| l.split('\t').nth(1).unwrap())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(vni_of(a1.mac), ["100"], "{lines:#?}");
    assert_eq!(vni_of(a2.mac), ["200"], "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.starts_with("10.217.0.3\t")),
        "floods to both remotes"
    );

    // A reload drops the second remote: the port is replaced, floods go
    // to 10.217.0.2 only and still arrive. While the old port runs, each
    // probe flood shows twice on the underlay.
    vspa_a.reload(&config_a(r#"["10.217.0.2"]"#));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        while tshark.next(Duration::from_millis(50)).is_some() {}
        a1.send(0, &[TxFrame::new(&probe)]).unwrap();
        let lines = tshark.collect(2, Duration::from_millis(500), |f| f.len() == 4);
        if lines.len() == 1 && lines[0].starts_with("10.217.0.2\t") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never replaced the port"
        );
    }
    let req3 = arp(1, a1.mac, ip_a1, MacAddr::default(), [192, 168, 217, 9]);
    deliver(&mut a1, &mut b1, &req3);
    for _ in 0..5 {
        a1.send(0, &[TxFrame::new(&req3)]).unwrap();
    }
    let lines = tshark.collect(20, Duration::from_secs(1), |f| f.len() == 4);
    assert!(
        lines.iter().any(|l| l.starts_with("10.217.0.2\t")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("10.217.0.3\t")),
        "the removed remote got floods: {lines:#?}"
    );
}
