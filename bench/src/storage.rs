//! `vspa-bench storage`: the whole storage stack against fio.
//!
//! This process is the appliance: the storage VSP (one controller, one
//! channel, so one worker and one io_uring) serves a page-cached 1 GiB
//! dynamic VHD in hosted mode. A second process (this binary, re-executed
//! as `storage-client`) is the guest: a storvsc client driving 4 KiB random
//! reads and writes at QD1 and QD32 and 64 KiB sequential reads through the
//! VMBus ring. fio with io_uring runs the same patterns on the raw file the
//! VHD was made from, in the same run.

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

use crate::disk::{FioResult as RunResultFio, fio_run, warm, write_random};

const SIZE: u64 = 1 << 30;

#[derive(Debug, clap::Args)]
pub struct StorageArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Directory for the images (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Arguments of the client process.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    socket: PathBuf,
    /// randread, randwrite or seqread.
    #[arg(long)]
    pattern: String,
    #[arg(long)]
    block: u32,
    #[arg(long)]
    depth: u32,
    #[arg(long)]
    seconds: u64,
}

/// What one client run measured.
#[derive(Debug, Serialize, Deserialize)]
struct RunResult {
    iops: f64,
    mean_lat_us: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    vspa_randread_qd32_iops: f64,
    fio_raw_randread_qd32_iops: f64,
    vspa_randread_qd1_lat_us: f64,
    fio_raw_randread_qd1_lat_us: f64,
    vspa_randwrite_qd32_iops: f64,
    fio_raw_randwrite_qd32_iops: f64,
    vspa_randwrite_qd1_lat_us: f64,
    fio_raw_randwrite_qd1_lat_us: f64,
    vspa_seqread_64k_mib_per_s: f64,
    fio_raw_seqread_64k_mib_per_s: f64,
    randread_qd32_ratio: f64,
    target_randread_qd32_ratio: f64,
}

pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let raw = dir.join("disk.raw");
    let image = dir.join("disk.vhd");
    write_random(&raw, SIZE)?;
    let target = vhd::tool::ConvertTarget {
        format: vhd::Format::Vhd,
        subformat: vhd::tool::Subformat::Dynamic,
        block_size: vhd::format::DEFAULT_BLOCK_SIZE,
    };
    vhd::tool::convert(&raw, &image, target, &mut |_, _| {})?;
    warm(&raw)?;
    warm(&image)?;

    let socket = dir.join("bench.sock");
    let disk = vhd::open_by_name(&image, &DiskOptions::default().cache(CacheMode::Cached))?;
    let mut config = ControllerConfig::new("bench", Default::default());
    config.max_subchannels = 0;
    let controller = Controller::new(config);
    controller.add_lun(
        0,
        Lun::disk(disk, storage::controller::DEFAULT_MAX_TRANSFER),
    )?;
    let registry = Registry::new();
    registry.add(Arc::new(controller));
    let server = HostedServer::start(&socket, registry)?;

    let s = args.seconds;
    let client =
        |pattern: &str, block: u32, depth: u32| client_run(&socket, pattern, block, depth, s);
    let rr32 = client("randread", 4096, 32)?;
    let rr1 = client("randread", 4096, 1)?;
    let rw32 = client("randwrite", 4096, 32)?;
    let rw1 = client("randwrite", 4096, 1)?;
    let seq = client("seqread", 65536, 32)?;
    server.stop();
    let fio = |rw: &str, bs: &str, depth: u32| -> anyhow::Result<RunResult> {
        let RunResultFio { iops, mean_lat_us } = fio_run(&raw, SIZE, rw, bs, depth, s)?;
        Ok(RunResult { iops, mean_lat_us })
    };
    let frr32 = fio("randread", "4k", 32)?;
    let frr1 = fio("randread", "4k", 1)?;
    let frw32 = fio("randwrite", "4k", 32)?;
    let frw1 = fio("randwrite", "4k", 1)?;
    let fseq = fio("read", "64k", 32)?;
    let mib = |r: &RunResult| r.iops * 65536.0 / (1 << 20) as f64;
    let report = Report {
        vspa_randread_qd32_iops: rr32.iops,
        fio_raw_randread_qd32_iops: frr32.iops,
        vspa_randread_qd1_lat_us: rr1.mean_lat_us,
        fio_raw_randread_qd1_lat_us: frr1.mean_lat_us,
        vspa_randwrite_qd32_iops: rw32.iops,
        fio_raw_randwrite_qd32_iops: frw32.iops,
        vspa_randwrite_qd1_lat_us: rw1.mean_lat_us,
        fio_raw_randwrite_qd1_lat_us: frw1.mean_lat_us,
        vspa_seqread_64k_mib_per_s: mib(&seq),
        fio_raw_seqread_64k_mib_per_s: mib(&fseq),
        randread_qd32_ratio: rr32.iops / frr32.iops,
        target_randread_qd32_ratio: 0.9,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:<28} {:>14} {:>14} {:>8}",
            "4 KiB unless noted", "vspa", "fio (raw)", "ratio"
        );
        let row =
            |name: &str, v: f64, f: f64| println!("{name:<28} {v:>14.0} {f:>14.0} {:>8.2}", v / f);
        row("randread QD32 IOPS", rr32.iops, frr32.iops);
        row("randread QD1 latency us", rr1.mean_lat_us, frr1.mean_lat_us);
        row("randwrite QD32 IOPS", rw32.iops, frw32.iops);
        row(
            "randwrite QD1 latency us",
            rw1.mean_lat_us,
            frw1.mean_lat_us,
        );
        row("64 KiB seqread MiB/s", mib(&seq), mib(&fseq));
    }
    Ok(())
}

fn client_run(
    socket: &Path,
    pattern: &str,
    block: u32,
    depth: u32,
    seconds: u64,
) -> anyhow::Result<RunResult> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["storage-client", "--socket"])
        .arg(socket)
        .args(["--pattern", pattern])
        .arg(format!("--block={block}"))
        .arg(format!("--depth={depth}"))
        .arg(format!("--seconds={seconds}"))
        .output()
        .context("running the storage client process")?;
    if !out.status.success() {
        bail!(
            "storage client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The guest side: keeps `depth` requests in flight for `seconds`.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
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
    let blocks = SIZE / u64::from(args.block);
    let write = args.pattern == "randwrite";
    let sequential = args.pattern == "seqread";
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_seq = 0u64;
    let mut started = vec![Instant::now(); args.depth as usize];
    let mut free: Vec<usize> = (0..args.depth as usize).collect();
    let (mut done, mut lat_ns) = (0u64, 0u128);
    let mut idle = 0u32;
    let ch = &mut c.channels[0];
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    while Instant::now() < deadline {
        while let Some(slot) = free.pop() {
            let index = if sequential {
                next_seq = (next_seq + 1) % blocks;
                next_seq
            } else {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            };
            let lba = index * u64::from(args.block / 512);
            let n = args.block / 512;
            let (cmd, dir) = if write {
                (cdb::write_16(lba, n), direction::WRITE)
            } else {
                (cdb::read_16(lba, n), direction::READ)
            };
            started[slot] = Instant::now();
            send_srb(
                ch,
                slot as u64 + 1,
                &Srb::new(0, &cmd, dir, args.block),
                Some(&buffers[slot]),
            )?;
        }
        ch.channel.flush()?;
        let mut got = 0;
        while let Some(r) = read_reply(ch)? {
            if r.srb().srb_status != srb::SUCCESS {
                bail!("I/O failed: srb status {:#x}", r.srb().srb_status);
            }
            let slot = (r.txid - 1) as usize;
            lat_ns += started[slot].elapsed().as_nanos();
            free.push(slot);
            done += 1;
            got += 1;
        }
        if got == 0 {
            idle += 1;
            // Poll briefly (as a guest driver in a busy loop would), then sleep.
            if idle > 2000 {
                ch.channel.wait_for_work(Some(Duration::from_millis(10)))?;
                idle = 0;
            }
        } else {
            idle = 0;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let result = RunResult {
        iops: done as f64 / secs,
        mean_lat_us: lat_ns as f64 / done.max(1) as f64 / 1000.0,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
