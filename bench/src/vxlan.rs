//! `vspa-bench net`'s VXLAN figures: iperf3 TCP from namespace A to
//! namespace B across a VXLAN tunnel over a veth underlay, once through
//! vspa and once through the kernel alone, in the same run.
//!
//! - vspa: A's tap -> vspa (its switch and VXLAN port running in this
//!   process, sockets and its `gso_tap` in namespace U, which forwards)
//!   -> veth -> the kernel's `vxlan` device in B. Key
//!   `vspa_vxlan_iperf_gbps`; the same without the `gso_tap` (UDP GSO
//!   datagrams from the port's sockets only) `vspa_vxlan_sockets_iperf_gbps`.
//! - kernel: A's veth -> a Linux bridge with a `vxlan` device in U -> veth
//!   -> the kernel's `vxlan` device in B. Key `kernel_vxlan_iperf_gbps`.
//!
//! Both use a 1500-byte underlay and inner MTU 1450, and B's underlay veth
//! checksums in software (a veth never completes a partial checksum, and
//! vspa's UDP socket cannot tell one from a complete one; a NIC does it in
//! hardware).
//!
//! Each round also runs both over a *wire-like* underlay (keys
//! `*_vxlan_wire_*`): U's veth segments everything it sends into
//! MTU-sized packets (no TSO, no UDP or UDP-tunnel segmentation offload)
//! and B's veth runs GRO, as a NIC and a wire between two hosts do. The
//! plain veth favours the kernel VTEP: its TCP-in-VXLAN super-packets
//! (`SKB_GSO_UDP_TUNNEL`) cross to B whole and are decapsulated whole,
//! while vspa's UDP GSO datagrams (`SKB_GSO_UDP_L4`) are cut back into
//! single packets by B's VXLAN socket, which does not take UDP GSO, and
//! each is decapsulated and re-merged on its own. A veth delivers in the
//! sender's context, so that work lands on vspa's switch thread. Across a
//! wire both arrive as MTU-sized packets and B's GRO merges both alike.
//! With its `gso_tap` vspa sends super-packets of the kernel's kind too.
//!
//! Every run binds the iperf3 client to the first CPU vspa's switch
//! worker is not bound to (see [`client_cpu`]); the server is left to the
//! scheduler.
#![allow(unsafe_code)]

use crate::net::{NetArgs, bench_switch, median};
use anyhow::Context;
use std::os::fd::AsRawFd;
use vspa_tests::net::{Netns, iperf3, received_gbps, run_ok};

/// One round, Gbit/s.
#[derive(Debug, serde::Serialize)]
pub struct Round {
    pub kernel: f64,
    pub vspa: f64,
    /// vspa with its socket path only (no `gso_tap`).
    pub vspa_sockets: f64,
    /// The same over the wire-like underlay.
    pub kernel_wire: f64,
    pub vspa_wire: f64,
}

/// The medians over the rounds.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub kernel: f64,
    pub vspa: f64,
    pub vspa_sockets: f64,
    pub kernel_wire: f64,
    pub vspa_wire: f64,
    /// The CPU every run's iperf3 client is bound to.
    pub client_cpu: Option<usize>,
    pub rounds: Vec<Round>,
}

impl Report {
    /// Adds the report's keys to `net`'s JSON object.
    pub fn add_to(&self, out: &mut serde_json::Value) {
        out["vspa_vxlan_iperf_gbps"] = self.vspa.into();
        out["kernel_vxlan_iperf_gbps"] = self.kernel.into();
        out["vspa_vxlan_vs_kernel"] = (self.vspa / self.kernel).into();
        out["vspa_vxlan_sockets_iperf_gbps"] = self.vspa_sockets.into();
        out["vspa_vxlan_sockets_vs_kernel"] = (self.vspa_sockets / self.kernel).into();
        out["vspa_vxlan_wire_iperf_gbps"] = self.vspa_wire.into();
        out["kernel_vxlan_wire_iperf_gbps"] = self.kernel_wire.into();
        out["vspa_vxlan_wire_vs_kernel"] = (self.vspa_wire / self.kernel_wire).into();
        out["vxlan_iperf_client_cpu"] = self.client_cpu.into();
        out["vxlan_rounds"] = serde_json::to_value(&self.rounds).unwrap_or_default();
    }

    /// The report as lines of `net`'s table.
    pub fn print(&self) {
        println!(
            "iperf3 TCP across VXLAN (A -> tunnel -> B), median of {} rounds, client on CPU {}",
            self.rounds.len(),
            self.client_cpu.map_or("any".into(), |c| c.to_string())
        );
        println!("  kernel vxlan + bridge {:8.2} Gbit/s", self.kernel);
        println!(
            "  vspa vxlan port       {:8.2} Gbit/s  ({:.2}x kernel; target >= 0.8)",
            self.vspa,
            self.vspa / self.kernel
        );
        println!(
            "  vspa, sockets only    {:8.2} Gbit/s  ({:.2}x kernel)",
            self.vspa_sockets,
            self.vspa_sockets / self.kernel
        );
        println!(
            "  wire-like underlay: kernel {:.2}, vspa {:.2} Gbit/s ({:.2}x)",
            self.kernel_wire,
            self.vspa_wire,
            self.vspa_wire / self.kernel_wire
        );
        for (i, r) in self.rounds.iter().enumerate() {
            println!(
                "  round {}: kernel {:.2}, vspa {:.2} (sockets only {:.2}); wire-like: kernel {:.2}, vspa {:.2}",
                i + 1,
                r.kernel,
                r.vspa,
                r.vspa_sockets,
                r.kernel_wire,
                r.vspa_wire
            );
        }
    }
}

/// The CPU the iperf3 client runs on in every run: the first one vspa's
/// switch worker is not bound to, as a deployment keeps the worker's CPU
/// for it (a client the scheduler puts on the worker's CPU halves vspa's
/// figure and leaves the kernel's, whose sender does all the work, as it
/// is). None when the worker may run anywhere.
fn client_cpu(cpus: &[usize]) -> Option<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus.is_empty() {
        return None;
    }
    (0..n).find(|c| !cpus.contains(c))
}

/// Runs the rounds.
pub fn measure(args: &NetArgs, cpus: &[usize]) -> anyhow::Result<Report> {
    let mut rounds = Vec::new();
    let client = client_cpu(cpus);
    let run = |underlay, path| {
        let r = Run {
            args,
            cpus,
            underlay,
            client,
        };
        vspa_run(&r, path).context("vspa vxlan run")
    };
    let kernel_run = |underlay| {
        kernel_run(&Run {
            args,
            cpus,
            underlay,
            client,
        })
    };
    for _ in 0..args.rounds.max(1) {
        let kernel = kernel_run(Underlay::Veth);
        let vspa = run(Underlay::Veth, Path::GsoTap)?;
        let vspa_sockets = run(Underlay::Veth, Path::Sockets)?;
        let kernel_wire = kernel_run(Underlay::Wire);
        let vspa_wire = run(Underlay::Wire, Path::GsoTap)?;
        eprintln!(
            "vxlan round: kernel {kernel:.2}, vspa {vspa:.2} (sockets {vspa_sockets:.2}); \
             wire-like: kernel {kernel_wire:.2}, vspa {vspa_wire:.2}"
        );
        rounds.push(Round {
            kernel,
            vspa,
            vspa_sockets,
            kernel_wire,
            vspa_wire,
        });
    }
    Ok(Report {
        kernel: median(rounds.iter().map(|r| r.kernel)),
        vspa: median(rounds.iter().map(|r| r.vspa)),
        vspa_sockets: median(rounds.iter().map(|r| r.vspa_sockets)),
        kernel_wire: median(rounds.iter().map(|r| r.kernel_wire)),
        vspa_wire: median(rounds.iter().map(|r| r.vspa_wire)),
        client_cpu: client,
        rounds,
    })
}

/// What one run measures.
struct Run<'a> {
    args: &'a NetArgs,
    cpus: &'a [usize],
    underlay: Underlay,
    /// The iperf3 client's CPU.
    client: Option<usize>,
}

/// How vspa's VXLAN port sends TCP GSO frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// UDP-tunnel GSO packets through a `gso_tap` (U forwards them).
    GsoTap,
    /// UDP GSO datagrams from its sockets.
    Sockets,
}

/// How the underlay veth between U and B behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Underlay {
    /// A plain veth: super-packets cross whole.
    Veth,
    /// Like a wire between hosts: U's end segments, B's end runs GRO.
    Wire,
}

/// U's offloads the wire-like underlay turns off: segmentation happens in
/// software as the packet leaves U, so only MTU-sized packets cross.
const WIRE_OFF: [&str; 4] = [
    "tso",
    "tx-udp-segmentation",
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
];

/// Namespaces A, U and B of one run (deleted on drop, and with them
/// every link in them).
struct Topology {
    prefix: String,
    a: Netns,
    u: Netns,
    b: Netns,
}

impl Topology {
    /// The namespaces, the underlay veth between U and B (10.218.0.1 in
    /// U, 10.218.0.2 in B) and B's kernel VTEP with 192.168.218.2/24.
    fn new(prefix: String, underlay: Underlay) -> Self {
        let ns = |n: &str| Netns::new(format!("{prefix}{n}"));
        let t = Topology {
            a: ns("a"),
            u: ns("u"),
            b: ns("b"),
            prefix,
        };
        let (vu, vb) = (t.dev("vu"), t.dev("vb"));
        run_ok(
            "ip",
            &[
                "link", "add", &vu, "netns", &t.u.0, "type", "veth", "peer", "name", &vb, "netns",
                &t.b.0,
            ],
        );
        t.u.ok(&["ip", "addr", "add", "10.218.0.1/24", "dev", &vu]);
        t.u.ok(&["ip", "link", "set", &vu, "up"]);
        t.b.ok(&["ip", "addr", "add", "10.218.0.2/24", "dev", &vb]);
        t.b.ok(&["ip", "link", "set", &vb, "up"]);
        t.b.ok(&["ethtool", "-K", &vb, "tx", "off"]);
        if underlay == Underlay::Wire {
            for feature in WIRE_OFF {
                t.u.ok(&["ethtool", "-K", &vu, feature, "off"]);
            }
            t.b.ok(&["ethtool", "-K", &vb, "gro", "on"]);
        }
        let vx = t.dev("xb");
        t.b.ok(&vtep(&vx, "10.218.0.2", "10.218.0.1", &vb));
        t.b.ok(&["ip", "addr", "add", "192.168.218.2/24", "dev", &vx]);
        t.b.ok(&["ip", "link", "set", &vx, "up"]);
        t
    }

    /// A device name of this run.
    fn dev(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// iperf3 TCP from A to B, the client on `client` if given: Gbit/s.
    fn iperf(&self, args: &NetArgs, client: Option<usize>) -> f64 {
        let secs = args.seconds.to_string();
        let cpu = client.map(|c| c.to_string());
        let mut extra = vec!["-t", secs.as_str()];
        if let Some(cc) = &args.congestion {
            extra.extend(["-C", cc.as_str()]);
        }
        if let Some(cpu) = &cpu {
            extra.extend(["-A", cpu.as_str()]);
        }
        received_gbps(&iperf3(&self.b, &self.a, "192.168.218.2", &extra))
    }
}

/// `ip link add` of a kernel VTEP on VNI 42 with UDP checksums.
fn vtep<'a>(name: &'a str, local: &'a str, remote: &'a str, dev: &'a str) -> [&'a str; 17] {
    [
        "ip", "link", "add", name, "type", "vxlan", "id", "42", "dstport", "4789", "local", local,
        "remote", remote, "dev", dev, "udpcsum",
    ]
}

fn kernel_run(r: &Run<'_>) -> f64 {
    let t = Topology::new(format!("vkx{}", std::process::id() % 100_000), r.underlay);
    let (br, vx, va, vua) = (t.dev("br"), t.dev("xu"), t.dev("va"), t.dev("vua"));
    t.u.ok(&["ip", "link", "add", &br, "type", "bridge"]);
    t.u.ok(&vtep(&vx, "10.218.0.1", "10.218.0.2", &t.dev("vu")));
    run_ok(
        "ip",
        &[
            "link", "add", &va, "netns", &t.a.0, "type", "veth", "peer", "name", &vua, "netns",
            &t.u.0,
        ],
    );
    for dev in [&vx, &vua] {
        t.u.ok(&["ip", "link", "set", dev, "master", &br, "up"]);
    }
    t.u.ok(&["ip", "link", "set", &br, "up"]);
    t.a.ok(&["ip", "addr", "add", "192.168.218.1/24", "dev", &va]);
    t.a.ok(&["ip", "link", "set", &va, "mtu", "1450", "up"]);
    t.iperf(r.args, r.client)
}

fn vspa_run(r: &Run<'_>, path: Path) -> anyhow::Result<f64> {
    let t = Topology::new(format!("vvx{}", std::process::id() % 100_000), r.underlay);
    let tap = t.dev("t");
    let gso_tap = match path {
        Path::GsoTap => {
            t.u.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            format!(", gso_tap = \"{}\"", t.dev("g"))
        }
        Path::Sockets => String::new(),
    };
    let ports = format!(
        r#"
[[switch.port]]
name = "tap"
tap = {{ ifname = "{tap}" }}
[[switch.port]]
name = "vx"
vxlan = {{ local = "10.218.0.1:4789", vni = 42, remotes = ["10.218.0.2"], udp_csum = true{gso_tap} }}
"#
    );
    let text = bench_switch(r.args, r.cpus, &ports);
    // The sockets and the tap are made in U, where the underlay is.
    let appliance = in_netns(&t.u, move || crate::start_appliance(&text))??;
    t.u.ok(&["ip", "link", "set", &tap, "netns", &t.a.0]);
    t.a.ok(&["ip", "addr", "add", "192.168.218.1/24", "dev", &tap]);
    t.a.ok(&["ip", "link", "set", &tap, "mtu", "1450", "up"]);
    let gbps = t.iperf(r.args, r.client);
    drop(t);
    appliance.shutdown();
    Ok(gbps)
}

/// Runs `f` on a thread inside network namespace `ns` (threads it starts
/// stay there).
fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{}", ns.0);
    let file = std::fs::File::open(&path).with_context(|| path.clone())?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an open namespace file.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}
