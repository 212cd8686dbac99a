//! `vspa-bench net`'s VXLAN figures: iperf3 TCP from namespace A to
//! namespace B across a VXLAN tunnel over a veth underlay, once through
//! vspa and once through the kernel alone, in the same run.
//!
//! - vspa: A's tap -> vspa (its switch and VXLAN port running in this
//!   process, sockets in namespace U) -> veth -> the kernel's `vxlan`
//!   device in B. Key `vspa_vxlan_iperf_gbps`.
//! - kernel: A's veth -> a Linux bridge with a `vxlan` device in U -> veth
//!   -> the kernel's `vxlan` device in B. Key `kernel_vxlan_iperf_gbps`.
//!
//! Both use a 1500-byte underlay and inner MTU 1450, and B's underlay veth
//! checksums in software (a veth never completes a partial checksum, and
//! vspa's UDP socket cannot tell one from a complete one; a NIC does it in
//! hardware).
#![allow(unsafe_code)]

use crate::net::{Cleanup, NetArgs, iperf3, median, sh};
use anyhow::Context;
use std::os::fd::AsRawFd;

/// One round, Gbit/s.
#[derive(Debug, serde::Serialize)]
pub struct Round {
    pub kernel: f64,
    pub vspa: f64,
}

/// The medians over the rounds.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub kernel: f64,
    pub vspa: f64,
    pub rounds: Vec<Round>,
}

impl Report {
    /// Adds the report's keys to `net`'s JSON object.
    pub fn add_to(&self, out: &mut serde_json::Value) {
        out["vspa_vxlan_iperf_gbps"] = self.vspa.into();
        out["kernel_vxlan_iperf_gbps"] = self.kernel.into();
        out["vspa_vxlan_vs_kernel"] = (self.vspa / self.kernel).into();
        out["vxlan_rounds"] = serde_json::to_value(&self.rounds).unwrap_or_default();
    }

    /// The report as lines of `net`'s table.
    pub fn print(&self) {
        println!(
            "iperf3 TCP across VXLAN (A -> tunnel -> B), median of {} rounds",
            self.rounds.len()
        );
        println!("  kernel vxlan + bridge {:8.2} Gbit/s", self.kernel);
        println!(
            "  vspa vxlan port       {:8.2} Gbit/s  ({:.2}x kernel; target >= 0.8)",
            self.vspa,
            self.vspa / self.kernel
        );
        for (i, r) in self.rounds.iter().enumerate() {
            println!(
                "  round {}: kernel {:.2}, vspa {:.2}",
                i + 1,
                r.kernel,
                r.vspa
            );
        }
    }
}

/// Runs the rounds.
pub fn measure(args: &NetArgs, cpus: &[usize]) -> anyhow::Result<Report> {
    sh(&["sh", "-c", "command -v ethtool"]).context("ethtool is not installed")?;
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let kernel = kernel_run(args).context("kernel vxlan run")?;
        let vspa = vspa_run(args, cpus).context("vspa vxlan run")?;
        rounds.push(Round { kernel, vspa });
    }
    Ok(Report {
        kernel: median(rounds.iter().map(|r| r.kernel)),
        vspa: median(rounds.iter().map(|r| r.vspa)),
        rounds,
    })
}

/// Namespaces `{p}a`, `{p}u`, `{p}b`, the underlay veth between U and B
/// (10.218.0.1 in U, 10.218.0.2 in B) and B's kernel VTEP with
/// 192.168.218.2/24.
fn common(c: &mut Cleanup, p: &str) -> anyhow::Result<()> {
    for n in ["a", "u", "b"] {
        c.netns(&format!("{p}{n}"))?;
    }
    let (u, b) = (format!("{p}u"), format!("{p}b"));
    let (vu, vb) = (format!("{p}vu"), format!("{p}vb"));
    sh(&[
        "ip", "link", "add", &vu, "netns", &u, "type", "veth", "peer", "name", &vb, "netns", &b,
    ])?;
    sh(&["ip", "-n", &u, "addr", "add", "10.218.0.1/24", "dev", &vu])?;
    sh(&["ip", "-n", &u, "link", "set", &vu, "up"])?;
    sh(&["ip", "-n", &b, "addr", "add", "10.218.0.2/24", "dev", &vb])?;
    sh(&["ip", "-n", &b, "link", "set", &vb, "up"])?;
    sh(&["ip", "netns", "exec", &b, "ethtool", "-K", &vb, "tx", "off"])?;
    let vx = format!("{p}xb");
    sh(&[
        "ip",
        "-n",
        &b,
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
        "10.218.0.2",
        "remote",
        "10.218.0.1",
        "dev",
        &vb,
        "udpcsum",
    ])?;
    sh(&[
        "ip",
        "-n",
        &b,
        "addr",
        "add",
        "192.168.218.2/24",
        "dev",
        &vx,
    ])?;
    sh(&["ip", "-n", &b, "link", "set", &vx, "up"])
}

fn iperf(p: &str, args: &NetArgs) -> anyhow::Result<f64> {
    iperf3(
        &format!("{p}b"),
        &format!("{p}a"),
        "192.168.218.2",
        args.seconds,
        args.congestion.as_deref(),
    )
}

fn kernel_run(args: &NetArgs) -> anyhow::Result<f64> {
    let p = format!("vkx{}", std::process::id() % 100_000);
    let mut c = Cleanup::default();
    common(&mut c, &p)?;
    let (a, u) = (format!("{p}a"), format!("{p}u"));
    let (br, vx, va, vua) = (
        format!("{p}br"),
        format!("{p}xu"),
        format!("{p}va"),
        format!("{p}vua"),
    );
    sh(&["ip", "-n", &u, "link", "add", &br, "type", "bridge"])?;
    sh(&[
        "ip",
        "-n",
        &u,
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
        "10.218.0.1",
        "remote",
        "10.218.0.2",
        "dev",
        &format!("{p}vu"),
        "udpcsum",
    ])?;
    sh(&[
        "ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vua, "netns", &u,
    ])?;
    for dev in [&vx, &vua] {
        sh(&["ip", "-n", &u, "link", "set", dev, "master", &br, "up"])?;
    }
    sh(&["ip", "-n", &u, "link", "set", &br, "up"])?;
    sh(&[
        "ip",
        "-n",
        &a,
        "addr",
        "add",
        "192.168.218.1/24",
        "dev",
        &va,
    ])?;
    sh(&["ip", "-n", &a, "link", "set", &va, "mtu", "1450", "up"])?;
    iperf(&p, args)
}

fn vspa_run(args: &NetArgs, cpus: &[usize]) -> anyhow::Result<f64> {
    let p = format!("vvx{}", std::process::id() % 100_000);
    let mut c = Cleanup::default();
    common(&mut c, &p)?;
    let tap = format!("{p}t");
    let config: toml::Table = toml::from_str(&format!(
        r#"
[[switch]]
name = "bench"
workers = {workers}
spin_us = {spin}
cpus = {cpus:?}
[[switch.port]]
name = "tap"
tap = {{ ifname = "{tap}" }}
[[switch.port]]
name = "vx"
vxlan = {{ local = "10.218.0.1:4789", vni = 42, remotes = ["10.218.0.2"], udp_csum = true }}
"#,
        workers = args.workers,
        spin = args.spin_us,
    ))?;
    let switches: Vec<switch::config::SwitchConfig> = config["switch"].clone().try_into()?;
    // The sockets and the tap are made in U, where the underlay is.
    let runtime = in_netns(&format!("{p}u"), move || {
        switch::runtime::start(&switches, &[])
    })??;
    let a = format!("{p}a");
    sh(&[
        "ip",
        "-n",
        &format!("{p}u"),
        "link",
        "set",
        &tap,
        "netns",
        &a,
    ])?;
    sh(&["ip", "-n", &a, "link", "set", &tap, "mtu", "1450"])?;
    place_up(&tap, &a)?;
    let gbps = iperf(&p, args);
    drop(c);
    runtime.stop()?;
    gbps
}

/// Addresses A's side and brings it up (the tap is already in A).
fn place_up(dev: &str, ns: &str) -> anyhow::Result<()> {
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        "192.168.218.1/24",
        "dev",
        dev,
    ])?;
    sh(&["ip", "-n", ns, "link", "set", dev, "up"])
}

/// Runs `f` on a thread inside network namespace `ns` (threads it starts
/// stay there).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file =
        std::fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
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
