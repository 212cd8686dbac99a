//! `vspa-bench net`: iperf3 TCP between two network namespaces, through the
//! vspa switch (a tap in each namespace, the switch running in this process
//! exactly as `vspa serve` runs it) and through a Linux bridge with veth
//! pairs, in the same run; then frames per second between two netvsc
//! guests in a client process, through the switch (see `netvsc`). The run
//! starts with the VXLAN figures (see `vxlan`).

use anyhow::{Context, bail};
use std::process::Command;
use std::time::Duration;
use vspa_tests::net::{Link, Netns, iperf3, received_gbps, run_ok};

#[derive(Debug, clap::Args)]
pub struct NetArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Switch worker threads (the config's `workers`).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Worker poll time after the last frame (the config's `spin_us`).
    #[arg(long, default_value_t = 50)]
    pub spin_us: u32,
    /// CPUs for the switch's worker threads (the config's `cpus`), comma
    /// separated; `none` leaves placement to the scheduler. Default: the
    /// last CPU this process may use. The bare tap forwarder's thread is
    /// bound the same way.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Rounds of the three iperf3 runs (bridge, vspa, forwarder, in that
    /// order each round); each figure is the median over the rounds, and
    /// every round is printed too.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// TCP congestion control for both iperf3 runs (`iperf3 -C`); the
    /// host's default when absent. Pacing algorithms such as BBR react to
    /// a forwarding hop differently from loss-based ones such as cubic.
    #[arg(long)]
    pub congestion: Option<String>,
    /// Seconds per netvsc frame-rate measurement.
    #[arg(long, default_value_t = 5.0)]
    pub netvsc_seconds: f64,
    /// NIC threads for the netvsc measurement (the config's `netvsp_workers`).
    #[arg(long, default_value_t = 1)]
    pub netvsp_workers: usize,
    /// Only the netvsc measurement (no iperf3).
    #[arg(long)]
    pub netvsc_only: bool,
    /// Only the VXLAN measurement (vspa's VXLAN port against the kernel's).
    #[arg(long)]
    pub vxlan_only: bool,
}

/// One round's iperf3 figures, Gbit/s.
#[derive(Debug, serde::Serialize)]
struct Round {
    bridge: f64,
    vspa: f64,
    forwarder: f64,
}

pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `--cpus`: a comma-separated list, `none`, or by default the last CPU
/// this process may use.
fn worker_cpus(arg: Option<&str>) -> anyhow::Result<Vec<usize>> {
    match arg {
        Some("none") => Ok(Vec::new()),
        Some(list) => list
            .split(',')
            .map(|c| c.trim().parse().with_context(|| format!("bad CPU {c:?}")))
            .collect(),
        None => {
            let allowed = vmbus::cpu::allowed_cpus()?;
            Ok(allowed.last().into_iter().copied().collect())
        }
    }
}

/// The host's default TCP congestion control (new namespaces inherit it).
fn default_congestion_host() -> anyhow::Result<String> {
    let cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .context("reading the TCP congestion control")?;
    Ok(cc.trim().to_string())
}

/// iperf3 TCP from `client` to `addr` in `server` for `seconds`: Gbit/s
/// received (the shared runner of the tests, `vspa_tests::net::iperf3`).
pub(crate) fn gbps(
    server: &Netns,
    client: &Netns,
    addr: &str,
    seconds: u32,
    cc: Option<&str>,
) -> f64 {
    let secs = seconds.to_string();
    let mut extra = vec!["-t", secs.as_str()];
    if let Some(cc) = cc {
        extra.extend(["-C", cc]);
    }
    received_gbps(&iperf3(server, client, addr, &extra))
}

fn bridge_run(seconds: u32, congestion: Option<&str>) -> anyhow::Result<f64> {
    let id = std::process::id() % 100_000;
    let br = Link::add(&format!("vbb{id}"), &["type", "bridge"]);
    run_ok("ip", &["link", "set", &br.0, "up"]);
    let mut links = vec![br];
    let mut ns = Vec::new();
    for i in 1..=2 {
        let n = Netns::new(format!("vbn{id}-{i}"));
        let (inner, outer) = (format!("vbi{id}-{i}"), format!("vbo{id}-{i}"));
        links.push(Link::add(&outer, &["type", "veth", "peer", "name", &inner]));
        run_ok("ip", &["link", "set", &outer, "master", &links[0].0, "up"]);
        n.take(&inner, &format!("10.210.0.{i}/24"));
        ns.push(n);
    }
    Ok(gbps(&ns[1], &ns[0], "10.210.0.2", seconds, congestion))
}

/// Moves tap `taps[i]` into a new namespace `{ns}-{i+1}` with address
/// `{subnet}.{i+1}/24` and runs iperf3 from the first to the second. The
/// namespaces live as long as the returned values.
fn iperf_across(taps: &[String; 2], ns: &str, subnet: &str, args: &NetArgs) -> (Vec<Netns>, f64) {
    let spaces: Vec<Netns> = taps
        .iter()
        .enumerate()
        .map(|(i, tap)| {
            let n = Netns::new(format!("{ns}-{}", i + 1));
            n.take(tap, &format!("{subnet}.{}/24", i + 1));
            n
        })
        .collect();
    let g = gbps(
        &spaces[1],
        &spaces[0],
        &format!("{subnet}.2"),
        args.seconds,
        args.congestion.as_deref(),
    );
    (spaces, g)
}

/// The configuration of switch `bench` with `ports` (`[[switch.port]]`
/// tables), its threads as `args` and `cpus` say.
pub(crate) fn bench_switch(args: &NetArgs, cpus: &[usize], ports: &str) -> String {
    format!(
        "[[switch]]\nname = \"bench\"\nworkers = {}\nspin_us = {}\ncpus = {cpus:?}\n{ports}",
        args.workers, args.spin_us,
    )
}

fn vspa_run(args: &NetArgs, cpus: &[usize]) -> anyhow::Result<f64> {
    let id = std::process::id() % 100_000;
    let ports = format!(
        r#"
[[switch.port]]
name = "t1"
tap = {{ ifname = "vbt{id}-1" }}
[[switch.port]]
name = "t2"
tap = {{ ifname = "vbt{id}-2" }}
"#
    );
    let text = bench_switch(args, cpus, &ports);
    let appliance = crate::start_appliance(&text)?;
    let taps = [format!("vbt{id}-1"), format!("vbt{id}-2")];
    let (spaces, gbps) = iperf_across(&taps, &format!("vsn{id}"), "10.211.0", args);
    drop(spaces);
    appliance.shutdown();
    Ok(gbps)
}

/// The least a userspace hop between two taps can do: one thread moving
/// frames (virtio-net header and all, offloads on) from each tap to the
/// other with one read and one write per frame, sleeping in epoll when
/// both are empty. No switching, no policy, no counters. Its iperf3 figure
/// is the ceiling for any switch that forwards between taps.
fn tap_forwarder_run(args: &NetArgs, cpus: &[usize]) -> anyhow::Result<f64> {
    use std::io::{ErrorKind, Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use switch::sys::{Epoll, TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, open_tap};
    let id = std::process::id() % 100_000;
    let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    let names = [format!("vbf{id}-1"), format!("vbf{id}-2")];
    let taps = [
        open_tap(&names[0], offloads)?,
        open_tap(&names[1], offloads)?,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let cpu = cpus.first().copied();
    let thread = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(cpu) = cpu {
            vmbus::cpu::pin_current_thread(cpu)?;
        }
        let epoll = Epoll::new()?;
        for (i, t) in taps.iter().enumerate() {
            epoll.add(std::os::fd::AsFd::as_fd(t), i as u64)?;
        }
        let mut buf = vec![0u8; 70_000];
        let mut ready = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            let mut moved = false;
            for i in 0..2 {
                for _ in 0..64 {
                    let n = match (&taps[i]).read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    };
                    // A frame the peer refuses is dropped, as a NIC would.
                    let _ = (&taps[1 - i]).write(&buf[..n]);
                    moved = true;
                }
            }
            if !moved {
                epoll.wait(Some(Duration::from_millis(100)), &mut ready)?;
            }
        }
        Ok(())
    });
    let (spaces, gbps) = iperf_across(&names, &format!("vfn{id}"), "10.215.0", args);
    // Stop before the namespaces (and with them the taps) go away.
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("forwarder thread")?;
    drop(spaces);
    Ok(gbps)
}

pub fn run(args: NetArgs) -> anyhow::Result<()> {
    let netvsc = || {
        let cpus = worker_cpus(args.cpus.as_deref())?;
        crate::netvsc::measure(
            &[64, 1500],
            args.netvsc_seconds,
            args.netvsp_workers,
            args.spin_us,
            &cpus,
        )
        .context("netvsc run")
    };
    if args.netvsc_only {
        let r = netvsc()?;
        let out = serde_json::json!({
            "netvsc_64b_mpps": r[0].mpps(),
            "netvsc_1500b_mpps": r[1].mpps(),
            "netvsc_64b_missing": r[0].missing,
            "netvsc_1500b_missing": r[1].missing,
            "netvsc_channels": r[0].channels,
        });
        println!("{out}");
        return Ok(());
    }
    for tool in ["ip", "iperf3", "ethtool"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?;
        if !found.status.success() {
            bail!("{tool} is not installed");
        }
    }
    let congestion = match &args.congestion {
        Some(cc) => cc.clone(),
        None => default_congestion_host()?,
    };
    let cpus = worker_cpus(args.cpus.as_deref())?;
    let vxlan = crate::vxlan::measure(&args, &cpus).context("VXLAN runs")?;
    if args.vxlan_only {
        let mut out = serde_json::json!({});
        vxlan.add_to(&mut out);
        match args.json {
            true => println!("{out}"),
            false => vxlan.print(),
        }
        return Ok(());
    }
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let bridge =
            bridge_run(args.seconds, args.congestion.as_deref()).context("Linux bridge run")?;
        let vspa = vspa_run(&args, &cpus).context("vspa run")?;
        let forwarder = tap_forwarder_run(&args, &cpus).context("tap forwarder run")?;
        rounds.push(Round {
            bridge,
            vspa,
            forwarder,
        });
    }
    let bridge = median(rounds.iter().map(|r| r.bridge));
    let vspa = median(rounds.iter().map(|r| r.vspa));
    let forwarder = median(rounds.iter().map(|r| r.forwarder));
    let ratio = vspa / bridge;
    let nv = netvsc()?;
    if args.json {
        let mut out = serde_json::json!({
            "vspa_iperf_gbps": vspa,
            "bridge_iperf_gbps": bridge,
            "vspa_vs_bridge": ratio,
            "tcp_congestion": congestion,
            "vspa_worker_cpus": cpus,
            "tap_forwarder_iperf_gbps": forwarder,
            "vspa_vs_tap_forwarder": vspa / forwarder,
            "iperf_rounds": rounds,
            "netvsc_64b_mpps": nv[0].mpps(),
            "netvsc_1500b_mpps": nv[1].mpps(),
            "netvsc_64b_missing": nv[0].missing,
            "netvsc_1500b_missing": nv[1].missing,
            "netvsc_channels": nv[0].channels,
        });
        vxlan.add_to(&mut out);
        println!("{out}");
    } else {
        println!(
            "iperf3 TCP ({congestion}), {} s, between two namespaces; median of {} rounds",
            args.seconds,
            rounds.len()
        );
        println!("  Linux bridge + veth  {bridge:8.2} Gbit/s");
        println!("  vspa switch + taps   {vspa:8.2} Gbit/s  ({ratio:.2}x bridge; target >= 0.8)");
        println!(
            "  bare tap forwarder   {forwarder:8.2} Gbit/s  (ceiling of a userspace hop; vspa {:.2}x)",
            vspa / forwarder
        );
        if cpus.is_empty() {
            println!("  switch worker CPUs   any (the scheduler places the worker)");
        } else {
            println!("  switch worker CPUs   {cpus:?}");
        }
        for (i, r) in rounds.iter().enumerate() {
            println!(
                "  round {}: bridge {:.2}, vspa {:.2}, forwarder {:.2}",
                i + 1,
                r.bridge,
                r.vspa,
                r.forwarder
            );
        }
        println!(
            "netvsc guest to guest through the switch, {} s each",
            args.netvsc_seconds
        );
        println!(
            "  64-byte frames       {:8.2} Mframes/s (target >= 5)",
            nv[0].mpps()
        );
        println!("  1500-byte frames     {:8.2} Mframes/s", nv[1].mpps());
        vxlan.print();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_cpu_lists() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
        assert_eq!(worker_cpus(Some("none")).unwrap(), Vec::<usize>::new());
        assert_eq!(worker_cpus(Some("3, 1")).unwrap(), [3, 1]);
        assert!(worker_cpus(Some("1,x")).is_err());
        let last = *vmbus::cpu::allowed_cpus().unwrap().last().unwrap();
        assert_eq!(worker_cpus(None).unwrap(), [last]);
    }
}
