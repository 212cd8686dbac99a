//! Frames per second between two netvsc guests through the switch.
//!
//! This process is the appliance: a switch with two netvsp NICs run by
//! the NIC pool (`--netvsp-workers` threads), offered in hosted mode. A
//! second process (this binary, re-executed as `netvsc-client`) plays two
//! guests, each on its own hosted-mode connection with Linux's default
//! 16 MiB receive and 1 MiB send buffers: guest A packs frames into
//! send-buffer sections (as many RNDIS messages per section as the host
//! allows) and guest B reads them out of its receive buffer and completes
//! them; both run on one client thread. The client counts the frames B
//! receives in the measured interval and checks their sequence numbers.
//!
//! Each NIC offers 4 channels and each guest negotiates them as Linux 6.1
//! does on this machine (`NetvscOptions::linux` with the online CPU
//! count: sub-channels only after an RSS capabilities reply Linux accepts);
//! the report says how many channels the guests got. The measured flow is
//! one non-IP flow, so it stays on channel 0 as in Linux; B polls all.
//! The switch's threads are bound to `cpus` (`vspa-bench net --cpus`) and
//! the client to a CPU outside them, as in `vspa-bench storage`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use switch::netvsp::client::{NetvscClient, NetvscOptions, TxFrame, connect_hosted};
use switch::wire::MacAddr;
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::HostedClient;

const NIC_A: &str = "bc000000-0000-4000-8000-00000000000a";
const NIC_B: &str = "bc000000-0000-4000-8000-00000000000b";

/// Arguments of the client process.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    socket: PathBuf,
    /// Frame length in bytes.
    #[arg(long)]
    len: usize,
    #[arg(long)]
    seconds: f64,
    /// CPU the client thread is bound to.
    #[arg(long)]
    cpu: Option<usize>,
}

/// What one client run measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub frames: u64,
    pub secs: f64,
    /// Sequence numbers B never saw (frames lost on the way).
    pub missing: u64,
    /// Channels each guest negotiated (primary + sub-channels).
    pub channels: usize,
}

impl RunResult {
    pub fn mpps(&self) -> f64 {
        self.frames as f64 / self.secs / 1e6
    }
}

/// Runs the appliance and the client process for each frame length.
pub fn measure(
    lens: &[usize],
    seconds: f64,
    workers: usize,
    spin_us: u32,
    cpus: &[usize],
) -> anyhow::Result<Vec<RunResult>> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("netvsc.sock");
    let text = format!(
        r#"
[[switch]]
name = "nvbench"
netvsp_workers = {workers}
spin_us = {spin_us}
cpus = {cpus:?}
[[switch.port]]
name = "vm-a"
netvsp = {{ mac = "02:00:00:00:bc:0a", instance = "{NIC_A}", channels = 4 }}
[[switch.port]]
name = "vm-b"
netvsp = {{ mac = "02:00:00:00:bc:0b", instance = "{NIC_B}", channels = 4 }}
"#
    );
    let appliance = crate::start_appliance(&text)?;
    let registry = appliance
        .registry(vspa::tenant::DEFAULT_TENANT)
        .context("the implicit tenant")?;
    let server = HostedServer::start(&socket, registry.clone())?;
    // With the switch's threads bound, the client takes a CPU they leave.
    let client_cpu = if cpus.is_empty() {
        None
    } else {
        let allowed = vmbus::cpu::allowed_cpus()?;
        allowed.iter().copied().find(|c| !cpus.contains(c))
    };
    let mut results = Vec::new();
    for &len in lens {
        results.push(client_run(&socket, len, seconds, client_cpu)?);
    }
    server.stop();
    appliance.shutdown();
    Ok(results)
}

fn client_run(
    socket: &Path,
    len: usize,
    seconds: f64,
    cpu: Option<usize>,
) -> anyhow::Result<RunResult> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["netvsc-client", "--socket"])
        .arg(socket)
        .arg(format!("--len={len}"))
        .arg(format!("--seconds={seconds}"));
    if let Some(cpu) = cpu {
        cmd.arg(format!("--cpu={cpu}"));
    }
    let out = cmd.output().context("running the netvsc client process")?;
    if !out.status.success() {
        bail!(
            "netvsc client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn guest(socket: &Path, instance: &str, cpus: u32) -> anyhow::Result<(HostedClient, NetvscClient)> {
    let opts = NetvscOptions {
        recv_buffer_bytes: 16 << 20,
        send_buffer_bytes: 1 << 20,
        ring_pages: 128,
        ..NetvscOptions::linux(cpus)
    };
    Ok(connect_hosted(socket, 40 << 20, instance.parse()?, &opts)?)
}

fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// The client process: two guests, A sending to B.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    // The guests' CPU count (what Linux sizes its channels by) is the
    // machine's, counted before this thread is bound to one of them.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    if let Some(cpu) = args.cpu {
        vmbus::cpu::pin_current_thread(cpu)?;
    }
    let (_ha, mut a) = guest(&args.socket, NIC_A, cpus)?;
    let (_hb, mut b) = guest(&args.socket, NIC_B, cpus)?;
    // B speaks first so the switch knows where it is.
    let hello = frame(MacAddr::BROADCAST, b.mac, 60);
    b.send(0, &[TxFrame::new(&hello)])?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut learned = false;
    while !learned && Instant::now() < deadline {
        a.poll(0, |_| learned = true)?;
    }
    if !learned {
        bail!("B's hello never reached A");
    }
    // A batch of frames whose bytes 14..18 carry a sequence number.
    let mut frames: Vec<Vec<u8>> = (0..256).map(|_| frame(b.mac, a.mac, args.len)).collect();
    let warmup = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let (mut seq, mut next, mut missing) = (0u32, 0u32, 0u64);
    let (mut counted, mut measuring) = (0u64, None::<Instant>);
    loop {
        let now = Instant::now();
        if measuring.is_none() && now >= start + warmup {
            measuring = Some(now);
            counted = 0;
        }
        if let Some(t) = measuring
            && now >= t + measure
        {
            break;
        }
        for f in frames.iter_mut() {
            f[14..18].copy_from_slice(&seq.to_be_bytes());
            seq = seq.wrapping_add(1);
        }
        let batch: Vec<TxFrame> = frames.iter().map(|f| TxFrame::new(f)).collect();
        let sent = a.send(0, &batch)? as u32;
        // Sequence numbers not sent are reused by the next batch.
        seq = seq.wrapping_sub(256 - sent);
        a.poll(0, |_| {})?;
        let len = args.len;
        for ch in 0..b.channels.len() {
            b.poll(ch, |f| {
                if f.data.len() != len {
                    return;
                }
                let mut s = [0u8; 4];
                let _ = f.data.read_at(14, &mut s);
                let s = u32::from_be_bytes(s);
                missing += u64::from(s.wrapping_sub(next));
                next = s.wrapping_add(1);
                counted += 1;
            })?;
        }
    }
    if a.channels.len() != b.channels.len() {
        bail!(
            "the guests negotiated {} and {} channels",
            a.channels.len(),
            b.channels.len()
        );
    }
    let secs = measuring.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let r = RunResult {
        frames: counted,
        secs,
        missing,
        channels: b.channels.len(),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
