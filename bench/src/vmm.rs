//! `vspa-bench vmm`: the VMM's start-up time to the first guest
//! instruction and its resident memory apart from guest RAM.
//!
//! Each run starts `vspa run` on a 64 MiB flat guest whose first
//! instruction writes a byte to the serial port; `startup_ms` is the time
//! from spawning the process to that byte arriving on its stdout (exec,
//! KVM setup, boot structures, ACPI, first instruction, serial exit).
//! `rss_overhead_mib` is the process's VmRSS minus RssShmem: guest RAM is a
//! memfd, so what remains is the VMM's own footprint.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct VmmArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Number of VM starts measured.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
}

#[derive(Debug, Serialize)]
struct VmmReport {
    startup_ms: f64,
    startup_ms_min: f64,
    rss_overhead_mib: f64,
    runs: usize,
    target_startup_ms: f64,
    target_rss_overhead_mib: f64,
}

/// mov al,'X'; mov dx,0x3f8; out dx,al; cli; hlt; jmp hlt.
const GUEST: [u8; 11] = [
    0xb0, b'X', 0x66, 0xba, 0xf8, 0x03, 0xee, 0xfa, 0xf4, 0xeb, 0xfd,
];

pub fn run(args: VmmArgs) -> anyhow::Result<()> {
    let vspa = std::env::current_exe()?
        .parent()
        .context("bench binary has a directory")?
        .join("vspa");
    if !vspa.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bin vspa`",
            vspa.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("vspa-bench-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = dir.join("first-instruction.bin");
    std::fs::write(&guest, GUEST)?;
    let mut startups = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..args.runs.max(1) {
        let (ms, mib) = one_start(&vspa, &guest)?;
        startups.push(ms);
        rss.push(mib);
    }
    let _ = std::fs::remove_dir_all(&dir);
    startups.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    let report = VmmReport {
        startup_ms: startups[startups.len() / 2],
        startup_ms_min: startups[0],
        rss_overhead_mib: rss[rss.len() / 2],
        runs: startups.len(),
        target_startup_ms: 20.0,
        target_rss_overhead_mib: 16.0,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "start-up to first guest instruction: {:.2} ms median ({:.2} ms best, target 20 ms)",
            report.startup_ms, report.startup_ms_min
        );
        println!(
            "resident memory apart from guest RAM: {:.2} MiB (target 16 MiB)",
            report.rss_overhead_mib
        );
    }
    Ok(())
}

/// One VM start: milliseconds to the guest's first serial byte, and the
/// VMM's resident MiB (without guest RAM) at that point.
fn one_start(vspa: &std::path::Path, guest: &std::path::Path) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let mut child = Command::new(vspa)
        .args([
            "run",
            "--kernel-format",
            "flat",
            "--memory",
            "64",
            "--kernel",
        ])
        .arg(guest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn vspa run")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut byte = [0u8];
    let n = out.read(&mut byte)?;
    let elapsed = start.elapsed();
    if n != 1 || byte[0] != b'X' {
        let _ = child.kill();
        bail!("the guest did not print its byte");
    }
    // Let the VMM settle (threads started) before sampling its memory.
    std::thread::sleep(Duration::from_millis(50));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
    let _ = child.kill();
    let _ = child.wait();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let overhead = (kib("VmRSS:") - kib("RssShmem:")) / 1024.0;
    Ok((elapsed.as_secs_f64() * 1e3, overhead))
}
