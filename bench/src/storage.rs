//! `vspa-bench storage`: the whole storage stack against fio and against
//! qemu-storage-daemon, in one run on the same data.
//!
//! This process is the appliance: the storage VSP (one controller, one
//! channel, so one worker and one io_uring, bound to the last CPU) serves a
//! page-cached 1 GiB dynamic VHD (LUN 0, cache mode `cached`), a fresh
//! dynamic VHD (LUN 1) and a copy of the first VHD in cache mode `mapped`
//! (LUN 2, random writes only) in hosted mode. The random-write figures
//! with targets are LUN 2's (vspa's fastest write path, as fio's best
//! engine is fio's); LUN 0's `cached` figures are reported beside them. A second process (this binary, re-executed as
//! `storage-client`, bound to the first CPU) is the guest: a storvsc client
//! driving 4 KiB random reads and writes at QD1 and QD32 and 64 KiB
//! sequential reads through the VMBus ring, and 64 KiB sequential writes
//! into the fresh VHD (every block allocated on first touch).
//!
//! Peers, same run:
//! - fio (`crate::fio`: tuned, psync and io_uring, bound to the worker's
//!   CPU) on the raw file the VHD was made from, and sequential writes into
//!   a fresh sparse file; for random writes also fio's `mmap` engine, the
//!   like-for-like peer of cache mode `mapped` (reported beside it);
//! - qemu-storage-daemon serving the same VHD (`driver=vpc` over
//!   `driver=file`, `aio=io_uring` and `aio=threads`, one IOThread, bound
//!   to the worker's CPU) as a vhost-user-blk export, driven by a client
//!   process with the same pattern, depth and CPU (`crate::qsd`).
//!
//! Reads run on a cache warmed by sequential reads (large folios), writes
//! on a cache of 4 KiB folios (see `disk::warm_small_folios`): on this
//! kernel a 4 KiB write into a large folio costs 15-30x more for every
//! writer alike. QD1 latency is the inverse of QD1 IOPS for everyone.
//! vspa and fio alternate for `--rounds` rounds and each figure is its best
//! round: single 5 s runs here swing by 10-15% for both, in both directions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use storage::client::{Buffer, Srb, StorvscClient, cdb, read_reply, send_srb};
use storage::protocol::{direction, srb};
use storage::{Controller, ControllerConfig, Lun};
use vhd::{CacheMode, DiskOptions};
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::HostedClient;
use vmbus::server::Registry;

use crate::disk::{warm, warm_small_folios, write_random, xorshift};
use crate::fio::{self, FioJob, FioPair, mib_per_s, qd1_lat_us};
use crate::qsd;

pub(crate) const SIZE: u64 = 1 << 30;
const SEQ_BLOCK: u32 = 64 << 10;

#[derive(Debug, clap::Args)]
pub struct StorageArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Rounds of the vspa and fio measurements, interleaved; each figure
    /// is its best round (host noise only ever slows a round down).
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Directory for the images (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Skip qemu-storage-daemon.
    #[arg(long)]
    pub no_qsd: bool,
}

/// Arguments of a client process (storvsc for vspa, vhost-user-blk for
/// qemu-storage-daemon).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    pub socket: PathBuf,
    /// randread, randwrite, seqread, or seqwrite-once (one pass).
    #[arg(long)]
    pub pattern: String,
    #[arg(long)]
    pub block: u32,
    #[arg(long)]
    pub depth: u32,
    #[arg(long)]
    pub seconds: u64,
    /// LUN (storvsc only).
    #[arg(long, default_value_t = 0)]
    pub lun: u8,
    /// CPU to run on.
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// What one client run measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct RunResult {
    pub iops: f64,
}

/// The offsets a client visits: the same for every server.
#[derive(Debug)]
pub(crate) struct Access {
    blocks: u64,
    block: u64,
    random: bool,
    once: bool,
    rng: u64,
    next_seq: u64,
    pub write: bool,
}

impl Access {
    pub fn new(pattern: &str, disk_bytes: u64, block: u32) -> anyhow::Result<Access> {
        let (random, write, once) = match pattern {
            "randread" => (true, false, false),
            "randwrite" => (true, true, false),
            "seqread" => (false, false, false),
            "seqwrite-once" => (false, true, true),
            other => bail!("unknown pattern {other}"),
        };
        Ok(Access {
            blocks: disk_bytes / u64::from(block),
            block: u64::from(block),
            random,
            once,
            rng: 0x9e37_79b9_7f4a_7c15,
            next_seq: 0,
            write,
        })
    }

    /// Byte offset of the next request; None once a one-pass pattern is done.
    pub fn next(&mut self) -> Option<u64> {
        let index = if self.random {
            self.rng = xorshift(self.rng);
            self.rng % self.blocks
        } else {
            if self.next_seq == self.blocks {
                if self.once {
                    return None;
                }
                self.next_seq = 0;
            }
            self.next_seq += 1;
            self.next_seq - 1
        };
        Some(index * self.block)
    }
}

/// CPUs of the run: (worker/server/fio, client).
pub(crate) fn bench_cpus() -> anyhow::Result<(usize, usize)> {
    let allowed = vmbus::cpu::allowed_cpus()?;
    let (first, last) = (allowed.first(), allowed.last());
    match (first, last) {
        (Some(&f), Some(&l)) => Ok((l, f)),
        _ => bail!("no CPU to run on"),
    }
}

/// The whole report (flat keys; each vspa figure with its peer and ratio).
#[derive(Debug, Default, Serialize)]
struct Report {
    worker_cpu: usize,
    client_cpu: usize,
    seconds: u64,
    /// Each figure, vspa's and fio's, is the best of this many rounds.
    rounds: u32,
    vspa_randread_qd32_iops: f64,
    fio_psync_randread_qd32_iops: f64,
    fio_io_uring_randread_qd32_iops: f64,
    fio_best_randread_qd32_iops: f64,
    fio_best_randread_qd32_engine: &'static str,
    randread_qd32_ratio: f64,
    target_randread_qd32_ratio: f64,
    vspa_randread_qd1_lat_us: f64,
    fio_psync_randread_qd1_lat_us: f64,
    fio_io_uring_randread_qd1_lat_us: f64,
    /// vspa's random writes are its fastest cache mode's: `mapped` (LUN 2).
    vspa_randwrite_cache_mode: &'static str,
    vspa_randwrite_qd32_iops: f64,
    fio_psync_randwrite_qd32_iops: f64,
    fio_io_uring_randwrite_qd32_iops: f64,
    fio_best_randwrite_qd32_iops: f64,
    fio_best_randwrite_qd32_engine: &'static str,
    randwrite_qd32_ratio: f64,
    target_randwrite_qd32_ratio: f64,
    vspa_randwrite_qd1_lat_us: f64,
    fio_psync_randwrite_qd1_lat_us: f64,
    fio_io_uring_randwrite_qd1_lat_us: f64,
    randwrite_qd1_lat_ratio: f64,
    target_randwrite_qd1_lat_ratio_max: f64,
    /// fio's `mmap` engine (stores into a mapping, one at a time): the
    /// like-for-like peer of cache mode `mapped`, beside the target.
    fio_mmap_randwrite_iops: f64,
    randwrite_qd32_to_fio_mmap_ratio: f64,
    /// Cache mode `cached` (LUN 0, `pwritev`; each page old or new if the
    /// process is killed); ratios to the same fio figures.
    vspa_cached_randwrite_qd32_iops: f64,
    cached_randwrite_qd32_ratio: f64,
    vspa_cached_randwrite_qd1_lat_us: f64,
    cached_randwrite_qd1_lat_ratio: f64,
    vspa_seqread_64k_mib_per_s: f64,
    fio_psync_seqread_64k_mib_per_s: f64,
    fio_io_uring_seqread_64k_mib_per_s: f64,
    fio_best_seqread_64k_mib_per_s: f64,
    fio_best_seqread_64k_engine: &'static str,
    seqread_64k_ratio: f64,
    target_seqread_64k_ratio: f64,
    vspa_alloc_seqwrite_mib_per_s: f64,
    fio_psync_fresh_seqwrite_64k_mib_per_s: f64,
    alloc_seqwrite_ratio: f64,
    #[serde(flatten)]
    qsd: Option<qsd::QsdReport>,
}

pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    fio::require(&["fio"])?;
    if !args.no_qsd {
        fio::require(&["qemu-storage-daemon"])?;
    }
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let report = measure(&args, &dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn measure(args: &StorageArgs, dir: &Path) -> anyhow::Result<Report> {
    let (worker_cpu, client_cpu) = bench_cpus()?;
    let raw = dir.join("disk.raw");
    let image = dir.join("disk.vhd");
    let fresh = dir.join("fresh.vhd");
    let mapped = dir.join("mapped.vhd");
    write_random(&raw, SIZE)?;
    let target = vhd::tool::ConvertTarget {
        format: vhd::Format::Vhd,
        subformat: vhd::tool::Subformat::Dynamic,
        block_size: vhd::format::DEFAULT_BLOCK_SIZE,
    };
    vhd::tool::convert(&raw, &image, target, &mut |_, _| {})?;
    vhd::create::create_dynamic(&fresh, SIZE, vhd::format::DEFAULT_BLOCK_SIZE)?;
    std::fs::copy(&image, &mapped)?;

    let s = args.seconds;
    let mut r = Report {
        worker_cpu,
        client_cpu,
        seconds: s,
        rounds: args.rounds.max(1),
        target_randread_qd32_ratio: 0.9,
        target_randwrite_qd32_ratio: 0.9,
        target_randwrite_qd1_lat_ratio_max: 2.0,
        target_seqread_64k_ratio: 0.9,
        ..Report::default()
    };
    let socket = dir.join("vspa.sock");
    let server = start_vspa(&socket, [&image, &fresh, &mapped], worker_cpu)?;
    let client = |pattern: &str, block: u32, depth: u32, lun: u8| {
        let args = ClientArgs {
            socket: socket.clone(),
            pattern: pattern.into(),
            block,
            depth,
            seconds: s,
            lun,
            cpu: Some(client_cpu),
        };
        client_process("storage-client", &args).map(|run| run.iops)
    };
    let mut vspa: Option<VspaRound> = None;
    let mut peer: Option<FioRound> = None;
    for round in 1..=r.rounds {
        let v = vspa_round(&client, &raw, &image, &mapped)?;
        vspa = Some(vspa.map_or(v, |b| b.best_of(v)));
        let f = fio_round(&raw, s, worker_cpu)?;
        eprintln!("round {round}: vspa {v:.0?}\nround {round}: fio {f:.0?}");
        peer = Some(peer.map_or(f, |b| b.best_of(f)));
    }
    let (vspa, peer) = (vspa.context("no round")?, peer.context("no round")?);
    r.vspa_randread_qd32_iops = vspa.rr32;
    r.vspa_randread_qd1_lat_us = qd1_lat_us(vspa.rr1);
    r.vspa_seqread_64k_mib_per_s = mib_per_s(vspa.seq, SEQ_BLOCK);
    r.vspa_randwrite_cache_mode = "mapped";
    r.vspa_randwrite_qd32_iops = vspa.mapped_rw32;
    r.vspa_randwrite_qd1_lat_us = qd1_lat_us(vspa.mapped_rw1);
    r.vspa_cached_randwrite_qd32_iops = vspa.rw32;
    r.vspa_cached_randwrite_qd1_lat_us = qd1_lat_us(vspa.rw1);
    fill_fio(&mut r, peer);
    // Allocation runs once: a second pass would find the blocks allocated.
    crate::disk::sync_all();
    let alloc = client("seqwrite-once", SEQ_BLOCK, 32, 1)?;
    r.vspa_alloc_seqwrite_mib_per_s = mib_per_s(alloc, SEQ_BLOCK);
    server.stop();
    crate::disk::sync_all();
    r.fio_psync_fresh_seqwrite_64k_mib_per_s = fresh_seqwrite(dir, SIZE, worker_cpu)?;
    r.alloc_seqwrite_ratio =
        r.vspa_alloc_seqwrite_mib_per_s / r.fio_psync_fresh_seqwrite_64k_mib_per_s;
    if !args.no_qsd {
        let qsd = qsd::measure(dir, &image, s, worker_cpu, client_cpu)?;
        r.qsd = Some(qsd.with_ratios(
            r.vspa_randread_qd32_iops,
            r.vspa_randwrite_qd32_iops,
            r.vspa_randread_qd1_lat_us,
            r.vspa_randwrite_qd1_lat_us,
        ));
    }
    Ok(r)
}

/// vspa's IOPS for each pattern in one round.
#[derive(Debug, Clone, Copy)]
struct VspaRound {
    rr32: f64,
    rr1: f64,
    seq: f64,
    rw32: f64,
    rw1: f64,
    /// Random writes on the `mapped` LUN.
    mapped_rw32: f64,
    mapped_rw1: f64,
}

impl VspaRound {
    fn best_of(self, o: VspaRound) -> VspaRound {
        VspaRound {
            rr32: self.rr32.max(o.rr32),
            rr1: self.rr1.max(o.rr1),
            seq: self.seq.max(o.seq),
            rw32: self.rw32.max(o.rw32),
            rw1: self.rw1.max(o.rw1),
            mapped_rw32: self.mapped_rw32.max(o.mapped_rw32),
            mapped_rw1: self.mapped_rw1.max(o.mapped_rw1),
        }
    }
}

/// fio's figures for the same patterns in one round.
#[derive(Debug, Clone, Copy)]
struct FioRound {
    rr32: FioPair,
    rr1: FioPair,
    seq: FioPair,
    rw32: FioPair,
    rw1: FioPair,
    /// Random writes with the `mmap` engine (QD1 by nature: a store).
    mmap_rw: f64,
}

impl FioRound {
    fn best_of(self, o: FioRound) -> FioRound {
        FioRound {
            rr32: self.rr32.best_of(o.rr32),
            rr1: self.rr1.best_of(o.rr1),
            seq: self.seq.best_of(o.seq),
            rw32: self.rw32.best_of(o.rw32),
            rw1: self.rw1.best_of(o.rw1),
            mmap_rw: self.mmap_rw.max(o.mmap_rw),
        }
    }
}

/// One round through vspa: reads on a warm cache, writes on small folios.
fn vspa_round(
    client: &dyn Fn(&str, u32, u32, u8) -> anyhow::Result<f64>,
    raw: &Path,
    image: &Path,
    mapped: &Path,
) -> anyhow::Result<VspaRound> {
    warm(raw)?;
    warm(image)?;
    let rr32 = client("randread", 4096, 32, 0)?;
    let rr1 = client("randread", 4096, 1, 0)?;
    let seq = client("seqread", SEQ_BLOCK, 32, 0)?;
    warm_small_folios(raw)?;
    warm_small_folios(image)?;
    let rw32 = client("randwrite", 4096, 32, 0)?;
    let rw1 = client("randwrite", 4096, 1, 0)?;
    warm_small_folios(mapped)?;
    let mapped_rw32 = client("randwrite", 4096, 32, 2)?;
    let mapped_rw1 = client("randwrite", 4096, 1, 2)?;
    Ok(VspaRound {
        rr32,
        rr1,
        seq,
        rw32,
        rw1,
        mapped_rw32,
        mapped_rw1,
    })
}

/// One round of fio on the raw file, in the same cache states.
fn fio_round(raw: &Path, seconds: u64, cpu: usize) -> anyhow::Result<FioRound> {
    let job = |rw, bs, depth| FioJob {
        path: raw,
        size: SIZE,
        rw,
        bs,
        depth,
        seconds,
        cpu: Some(cpu),
    };
    warm(raw)?;
    let rr32 = fio::pair(job("randread", 4096, 32))?;
    let rr1 = fio::pair(job("randread", 4096, 1))?;
    let seq = fio::pair(job("read", SEQ_BLOCK, 32))?;
    warm_small_folios(raw)?;
    let rw32 = fio::pair(job("randwrite", 4096, 32))?;
    let rw1 = fio::pair(job("randwrite", 4096, 1))?;
    let mmap_rw = fio::run(job("randwrite", 4096, 1), "mmap")?;
    Ok(FioRound {
        rr32,
        rr1,
        seq,
        rw32,
        rw1,
        mmap_rw,
    })
}

fn fill_fio(r: &mut Report, fio: FioRound) {
    let FioRound {
        rr32,
        rr1,
        seq,
        rw32,
        rw1,
        mmap_rw,
    } = fio;
    r.fio_psync_randread_qd32_iops = rr32.psync_iops;
    r.fio_io_uring_randread_qd32_iops = rr32.io_uring_iops;
    r.fio_best_randread_qd32_iops = rr32.best_iops();
    r.fio_best_randread_qd32_engine = rr32.best_engine();
    r.randread_qd32_ratio = r.vspa_randread_qd32_iops / rr32.best_iops();
    r.fio_psync_randread_qd1_lat_us = qd1_lat_us(rr1.psync_iops);
    r.fio_io_uring_randread_qd1_lat_us = qd1_lat_us(rr1.io_uring_iops);
    r.fio_psync_randwrite_qd32_iops = rw32.psync_iops;
    r.fio_io_uring_randwrite_qd32_iops = rw32.io_uring_iops;
    r.fio_best_randwrite_qd32_iops = rw32.best_iops();
    r.fio_best_randwrite_qd32_engine = rw32.best_engine();
    r.randwrite_qd32_ratio = r.vspa_randwrite_qd32_iops / rw32.best_iops();
    r.fio_psync_randwrite_qd1_lat_us = qd1_lat_us(rw1.psync_iops);
    r.fio_io_uring_randwrite_qd1_lat_us = qd1_lat_us(rw1.io_uring_iops);
    r.randwrite_qd1_lat_ratio = r.vspa_randwrite_qd1_lat_us / r.fio_psync_randwrite_qd1_lat_us;
    r.fio_mmap_randwrite_iops = mmap_rw;
    r.randwrite_qd32_to_fio_mmap_ratio = r.vspa_randwrite_qd32_iops / mmap_rw;
    r.cached_randwrite_qd32_ratio = r.vspa_cached_randwrite_qd32_iops / rw32.best_iops();
    r.cached_randwrite_qd1_lat_ratio =
        r.vspa_cached_randwrite_qd1_lat_us / r.fio_psync_randwrite_qd1_lat_us;
    r.fio_psync_seqread_64k_mib_per_s = mib_per_s(seq.psync_iops, SEQ_BLOCK);
    r.fio_io_uring_seqread_64k_mib_per_s = mib_per_s(seq.io_uring_iops, SEQ_BLOCK);
    r.fio_best_seqread_64k_mib_per_s = mib_per_s(seq.best_iops(), SEQ_BLOCK);
    r.fio_best_seqread_64k_engine = seq.best_engine();
    r.seqread_64k_ratio = r.vspa_seqread_64k_mib_per_s / r.fio_best_seqread_64k_mib_per_s;
}

/// fio psync writing 64 KiB sequentially through a fresh sparse file of
/// `size` bytes, once (the page-cache cost of first-touch writes).
pub(crate) fn fresh_seqwrite(dir: &Path, size: u64, cpu: usize) -> anyhow::Result<f64> {
    let path = dir.join("fresh.raw");
    let _ = std::fs::remove_file(&path);
    let out = Command::new("fio")
        .args(["--name=fresh", "--ioengine=psync", "--thread", "--rw=write"])
        .args(["--direct=0", "--fallocate=none", "--gtod_reduce=1"])
        .args(["--output-format=json", "--end_fsync=0"])
        .arg(format!("--bs={SEQ_BLOCK}"))
        .arg(format!("--size={size}"))
        .arg(format!("--cpus_allowed={cpu}"))
        .arg(format!("--filename={}", path.display()))
        .output()
        .context("running fio")?;
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let iops = v["jobs"][0]["write"]["iops"]
        .as_f64()
        .context("fio JSON has no iops")?;
    Ok(mib_per_s(iops, SEQ_BLOCK))
}

/// The VSP: one controller, one channel (one worker on `cpu`), LUN 0 the
/// image, LUN 1 the fresh image, both in cache mode `cached`, LUN 2 the
/// image's copy in cache mode `mapped`.
fn start_vspa(socket: &Path, images: [&Path; 3], cpu: usize) -> anyhow::Result<HostedServer> {
    let mut config = ControllerConfig::new("bench", Default::default());
    config.max_subchannels = 0;
    config.cpus = vec![cpu];
    let controller = Controller::new(config);
    let modes = [CacheMode::Cached, CacheMode::Cached, CacheMode::Mapped];
    for (lun, (path, cache)) in images.into_iter().zip(modes).enumerate() {
        let disk = vhd::open_by_name(path, &DiskOptions::default().cache(cache))?;
        controller.add_lun(
            lun as u8,
            Lun::disk(disk, storage::controller::DEFAULT_MAX_TRANSFER),
        )?;
    }
    let registry = Registry::new();
    registry.add(Arc::new(controller));
    Ok(HostedServer::start(socket, registry)?)
}

fn print_table(r: &Report) {
    println!(
        "one VSP worker on CPU {}, client on CPU {}, {} s per figure",
        r.worker_cpu, r.client_cpu, r.seconds
    );
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>7} {:>7}",
        "4 KiB unless noted", "vspa", "fio psync", "fio uring", "ratio", "target"
    );
    let row = |name: &str, v: f64, p: f64, u: f64, ratio: f64, target: &str| {
        println!("{name:<30} {v:>12.0} {p:>12.0} {u:>12.0} {ratio:>7.2} {target:>7}");
    };
    row(
        "randread QD32 IOPS",
        r.vspa_randread_qd32_iops,
        r.fio_psync_randread_qd32_iops,
        r.fio_io_uring_randread_qd32_iops,
        r.randread_qd32_ratio,
        ">=0.9",
    );
    row(
        "randread QD1 latency us",
        r.vspa_randread_qd1_lat_us,
        r.fio_psync_randread_qd1_lat_us,
        r.fio_io_uring_randread_qd1_lat_us,
        r.vspa_randread_qd1_lat_us / r.fio_psync_randread_qd1_lat_us,
        "",
    );
    row(
        "randwrite QD32 IOPS (mapped)",
        r.vspa_randwrite_qd32_iops,
        r.fio_psync_randwrite_qd32_iops,
        r.fio_io_uring_randwrite_qd32_iops,
        r.randwrite_qd32_ratio,
        ">=0.9",
    );
    row(
        "randwrite QD1 lat us (mapped)",
        r.vspa_randwrite_qd1_lat_us,
        r.fio_psync_randwrite_qd1_lat_us,
        r.fio_io_uring_randwrite_qd1_lat_us,
        r.randwrite_qd1_lat_ratio,
        "<=2",
    );
    row(
        "  cached: randwrite QD32 IOPS",
        r.vspa_cached_randwrite_qd32_iops,
        r.fio_psync_randwrite_qd32_iops,
        r.fio_io_uring_randwrite_qd32_iops,
        r.cached_randwrite_qd32_ratio,
        "",
    );
    row(
        "  cached: randwrite QD1 lat us",
        r.vspa_cached_randwrite_qd1_lat_us,
        r.fio_psync_randwrite_qd1_lat_us,
        r.fio_io_uring_randwrite_qd1_lat_us,
        r.cached_randwrite_qd1_lat_ratio,
        "",
    );
    println!(
        "  fio mmap engine randwrite: {:.0} IOPS (mapped QD32 at {:.2}x)",
        r.fio_mmap_randwrite_iops, r.randwrite_qd32_to_fio_mmap_ratio
    );
    row(
        "64 KiB seqread MiB/s",
        r.vspa_seqread_64k_mib_per_s,
        r.fio_psync_seqread_64k_mib_per_s,
        r.fio_io_uring_seqread_64k_mib_per_s,
        r.seqread_64k_ratio,
        ">=0.9",
    );
    row(
        "64 KiB first-touch write MiB/s",
        r.vspa_alloc_seqwrite_mib_per_s,
        r.fio_psync_fresh_seqwrite_64k_mib_per_s,
        f64::NAN,
        r.alloc_seqwrite_ratio,
        "",
    );
    if let Some(q) = &r.qsd {
        q.print_table();
    }
}

/// Runs this binary as a client process (`subcommand`) and parses its result.
pub(crate) fn client_process(subcommand: &str, args: &ClientArgs) -> anyhow::Result<RunResult> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([subcommand, "--socket"])
        .arg(&args.socket)
        .args(["--pattern", &args.pattern])
        .arg(format!("--block={}", args.block))
        .arg(format!("--depth={}", args.depth))
        .arg(format!("--seconds={}", args.seconds))
        .arg(format!("--lun={}", args.lun));
    if let Some(cpu) = args.cpu {
        cmd.arg(format!("--cpu={cpu}"));
    }
    let out = cmd.output().context("running the client process")?;
    if !out.status.success() {
        bail!(
            "{subcommand} {} failed: {}",
            args.pattern,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Prints a client's result for the parent process.
pub(crate) fn report_run(done: u64, start: Instant) -> anyhow::Result<()> {
    let secs = start.elapsed().as_secs_f64();
    let result = RunResult {
        iops: done as f64 / secs,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// The guest side: keeps `depth` requests in flight for `seconds`.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    if let Some(cpu) = args.cpu {
        vmbus::cpu::pin_current_thread(cpu)?;
    }
    let mut host = HostedClient::connect(&args.socket, 64 << 20)?;
    let offer = host
        .request_offers()?
        .into_iter()
        .find(|o| o.interface == vmbus::guid::SCSI_INTERFACE)
        .context("no SCSI offer")?;
    let mut c = StorvscClient::connect(&mut host, &offer, 0, 64)?;
    let pages_per = u64::from(args.block).div_ceil(4096);
    let buffers: Vec<Buffer> = (0..args.depth)
        .map(|_| {
            host.alloc_pages(pages_per).map(|pages| Buffer {
                pages,
                offset: 0,
                len: args.block,
            })
        })
        .collect::<Result<_, _>>()?;
    let mut access = Access::new(&args.pattern, SIZE, args.block)?;
    let mut free: Vec<usize> = (0..args.depth as usize).collect();
    let mut done = 0u64;
    let mut in_flight = 0usize;
    let spin = ControllerConfig::new("client", Default::default()).spin;
    let mut idle = match args.cpu {
        Some(_) => vmbus::worker::IdleSpin::without_yield(spin),
        None => vmbus::worker::IdleSpin::new(spin),
    };
    let ch = &mut c.channels[0];
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    loop {
        let running = Instant::now() < deadline;
        let mut queued = 0u32;
        while let Some(slot) = free.pop() {
            let Some(offset) = access.next().filter(|_| running) else {
                free.push(slot);
                break;
            };
            let (lba, n) = (offset / 512, args.block / 512);
            let (cmd, dir) = if access.write {
                (cdb::write_16(lba, n), direction::WRITE)
            } else {
                (cdb::read_16(lba, n), direction::READ)
            };
            send_srb(
                ch,
                slot as u64 + 1,
                &Srb::new(args.lun, &cmd, dir, args.block),
                Some(&buffers[slot]),
            )?;
            in_flight += 1;
            queued += 1;
            // Publish as we go, as Linux's storvsc does per request, so
            // the host starts on the first while the rest are written.
            if queued.is_multiple_of(8) {
                ch.channel.flush()?;
            }
        }
        if in_flight == 0 {
            break;
        }
        ch.channel.flush()?;
        let mut got = 0;
        while let Some(r) = read_reply(ch)? {
            if r.srb().srb_status != srb::SUCCESS {
                bail!("I/O failed: srb status {:#x}", r.srb().srb_status);
            }
            free.push((r.txid - 1) as usize);
            in_flight -= 1;
            done += 1;
            got += 1;
        }
        // Poll for as long as a VSP worker does after its last progress,
        // then sleep on the channel's interrupt: a guest whose I/O is held
        // back (a capped tenant) does not spin through the wait.
        if !idle.keep_polling(got > 0) {
            ch.channel.wait_for_work(Some(Duration::from_millis(10)))?;
        }
    }
    report_run(done, start)
}
