//! `vspa-bench nbd`: vspa's NBD server against `qemu-nbd`, in one run on
//! the same raw image (page-cached in both, as qemu-nbd's default
//! `cache=writeback` is), each over a Unix socket and driven by fio's
//! `nbd` engine (libnbd): 4 KiB random reads and random writes at QD32 for
//! a fixed time. The image lives in /dev/shm when that is a tmpfs, so the
//! figures measure the servers rather than a disk file system's buffered
//! write path (on ext4, io_uring hands every buffered write to one
//! io-wq worker per file). The servers take turns (each locks the image), in
//! `--rounds` rounds; each figure is its best round. Besides IOPS it
//! reports each server's CPU time per request (vspa's server runs in this
//! process, which does nothing else meanwhile; qemu-nbd's from /proc).

use anyhow::{Context, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::nbd::{ExportConfig, Listen, Server, ServerConfig};

#[derive(Debug, clap::Args)]
pub struct NbdArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Directory for the image and sockets (default: /dev/shm if it is a
    /// tmpfs, else the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Image size in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Rounds; each figure is its best round.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
}

/// The figures: requests per second, ratios, server CPU microseconds per
/// request.
#[derive(Debug, Default, Serialize)]
struct Figures {
    vspa_randread_iops: f64,
    qemu_nbd_randread_iops: f64,
    randread_ratio: f64,
    vspa_randwrite_iops: f64,
    qemu_nbd_randwrite_iops: f64,
    randwrite_ratio: f64,
    vspa_randread_cpu_us_per_io: f64,
    qemu_nbd_randread_cpu_us_per_io: f64,
    vspa_randwrite_cpu_us_per_io: f64,
    qemu_nbd_randwrite_cpu_us_per_io: f64,
}

/// One fio run against one server.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    iops: f64,
    cpu_us_per_io: f64,
}

impl Run {
    /// Keeps the better round (CPU per request of that round).
    fn best(self, other: Run) -> Run {
        if other.iops > self.iops { other } else { self }
    }
}

pub fn run(args: NbdArgs) -> anyhow::Result<()> {
    for tool in ["fio", "qemu-nbd"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is required (apt-get install fio qemu-utils)");
        }
    }
    let base = args.dir.clone().unwrap_or_else(default_dir);
    let dir = base.join(format!("vspa-bench-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let f = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        println!("4 KiB, QD32, fio nbd engine over a Unix socket, page cache");
        for (name, vspa, qemu, ratio, vcpu, qcpu) in [
            (
                "random read",
                f.vspa_randread_iops,
                f.qemu_nbd_randread_iops,
                f.randread_ratio,
                f.vspa_randread_cpu_us_per_io,
                f.qemu_nbd_randread_cpu_us_per_io,
            ),
            (
                "random write",
                f.vspa_randwrite_iops,
                f.qemu_nbd_randwrite_iops,
                f.randwrite_ratio,
                f.vspa_randwrite_cpu_us_per_io,
                f.qemu_nbd_randwrite_cpu_us_per_io,
            ),
        ] {
            println!(
                "{name:<13} vspa {vspa:>9.0} IOPS ({vcpu:.1} us CPU/io)   qemu-nbd {qemu:>9.0} IOPS ({qcpu:.1} us CPU/io)   {ratio:.2} x"
            );
        }
    }
    Ok(())
}

/// /dev/shm when it is a tmpfs, else the temp directory.
fn default_dir() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let shm = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/dev/shm") && l.contains(" tmpfs "));
    if shm {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

fn measure(args: &NbdArgs, dir: &Path) -> anyhow::Result<Figures> {
    let size = args.size_mib << 20;
    let image = dir.join("image.raw");
    fill_random(&image, size)?;
    crate::disk::warm(&image)?;
    let mut best = [Run::default(); 4];
    for _ in 0..args.rounds.max(1) {
        let vspa = with_vspa(&image, dir, |uri| {
            Ok([
                fio(uri, "randread", size, args.seconds, self_cpu)?,
                fio(uri, "randwrite", size, args.seconds, self_cpu)?,
            ])
        })?;
        let qemu = with_qemu_nbd(&image, dir, |uri, pid| {
            let cpu = || process_cpu(pid);
            Ok([
                fio(uri, "randread", size, args.seconds, cpu)?,
                fio(uri, "randwrite", size, args.seconds, cpu)?,
            ])
        })?;
        for (b, r) in best.iter_mut().zip(vspa.into_iter().chain(qemu)) {
            *b = b.best(r);
        }
    }
    let [vr, vw, qr, qw] = best;
    Ok(Figures {
        vspa_randread_iops: vr.iops,
        qemu_nbd_randread_iops: qr.iops,
        randread_ratio: vr.iops / qr.iops,
        vspa_randwrite_iops: vw.iops,
        qemu_nbd_randwrite_iops: qw.iops,
        randwrite_ratio: vw.iops / qw.iops,
        vspa_randread_cpu_us_per_io: vr.cpu_us_per_io,
        qemu_nbd_randread_cpu_us_per_io: qr.cpu_us_per_io,
        vspa_randwrite_cpu_us_per_io: vw.cpu_us_per_io,
        qemu_nbd_randwrite_cpu_us_per_io: qw.cpu_us_per_io,
    })
}

/// A raw image of random bytes.
fn fill_random(path: &Path, size: u64) -> anyhow::Result<()> {
    use rand::Rng;
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::rng();
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        rng.fill_bytes(&mut chunk);
        file.write_all(&chunk)?;
    }
    file.flush()?;
    Ok(())
}

/// Runs `body` with vspa's server exporting `image` (page cache).
fn with_vspa<T>(
    image: &Path,
    dir: &Path,
    body: impl FnOnce(&str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let options = vhd::DiskOptions::default().cache(vhd::CacheMode::Cached);
    let device = vhd::open_as(image, vhd::Format::Raw, &options)?;
    let socket = dir.join("vspa.sock");
    let export = ExportConfig {
        name: String::new(),
        device: Arc::clone(&device),
        read_only: false,
        description: String::new(),
    };
    let server = Server::start(ServerConfig::new(
        vec![export],
        vec![Listen::Unix(socket.clone())],
    ))?;
    let result = body(&uri(&socket));
    server.stop(Duration::from_secs(2));
    result
}

/// A qemu-nbd killed when dropped.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `body` with qemu-nbd exporting `image` (its defaults: writeback
/// cache, thread pool I/O), persistent across fio's connections.
fn with_qemu_nbd<T>(
    image: &Path,
    dir: &Path,
    body: impl FnOnce(&str, u32) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let socket = dir.join("qemu-nbd.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new("qemu-nbd")
        .args(["-t", "-f", "raw", "--cache=writeback", "-k"])
        .arg(&socket)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-nbd")?;
    let mut qemu = QemuNbd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if qemu.0.try_wait()?.is_some() || Instant::now() > deadline {
            bail!("qemu-nbd did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = qemu.0.id();
    body(&uri(&socket), pid)
}

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// CPU seconds this process has used.
fn self_cpu() -> f64 {
    process_cpu(std::process::id())
}

/// CPU seconds process `pid` has used (utime + stime of /proc/PID/stat).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    // /proc counts in USER_HZ, which Linux fixes at 100.
    ticks / 100.0
}

/// fio's nbd engine against `uri`: `rw` 4 KiB at QD32 for `seconds`,
/// with the server's CPU time (from `cpu`) per request.
fn fio(uri: &str, rw: &str, size: u64, seconds: u64, cpu: impl Fn() -> f64) -> anyhow::Result<Run> {
    let before = cpu();
    let out = Command::new("fio")
        .args(["--name=nbd", "--ioengine=nbd", "--bs=4k", "--iodepth=32"])
        .args([
            "--randrepeat=0",
            "--norandommap",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={seconds}"))
        .output()
        .context("running fio")?;
    let used = cpu() - before;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find('{').map_or("", |i| &text[i..]);
    let v: serde_json::Value = serde_json::from_str(json).context("fio JSON")?;
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let job = &v["jobs"][0][side];
    let iops = job["iops"].as_f64().context("fio JSON has no iops")?;
    let ios = job["total_ios"]
        .as_f64()
        .unwrap_or(iops * seconds as f64)
        .max(1.0);
    Ok(Run {
        iops,
        cpu_us_per_io: used * 1e6 / ios,
    })
}
