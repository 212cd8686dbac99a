//! fio as the strongest peer: one job on a page-cached file, tuned the way
//! fio's authors tune it (`--gtod_reduce=1 --norandommap
//! --random_generator=lfsr`, and for io_uring `--fixedbufs
//! --registerfiles`), with both the synchronous (`psync`) and the io_uring
//! engine, so each comparison holds vspa against the faster of the two.

use anyhow::{Context, bail};
use serde::Serialize;
use std::path::Path;
use std::process::Command;

/// One fio job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FioJob<'a> {
    pub path: &'a Path,
    pub size: u64,
    /// fio's `--rw`: randread, randwrite, read, write.
    pub rw: &'a str,
    pub bs: u32,
    /// Queue depth (io_uring; psync always has one request in flight).
    pub depth: u32,
    pub seconds: u64,
    /// CPU the job runs on (the VSP worker's, for a like-for-like figure).
    pub cpu: Option<usize>,
}

/// What both engines measured for one job, and the faster.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct FioPair {
    pub psync_iops: f64,
    pub io_uring_iops: f64,
}

impl FioPair {
    /// Each engine's better figure of two rounds.
    pub fn best_of(self, other: FioPair) -> FioPair {
        FioPair {
            psync_iops: self.psync_iops.max(other.psync_iops),
            io_uring_iops: self.io_uring_iops.max(other.io_uring_iops),
        }
    }

    pub fn best_iops(&self) -> f64 {
        self.psync_iops.max(self.io_uring_iops)
    }

    pub fn best_engine(&self) -> &'static str {
        if self.psync_iops >= self.io_uring_iops {
            "psync"
        } else {
            "io_uring"
        }
    }
}

/// Runs `job` with each engine.
pub(crate) fn pair(job: FioJob<'_>) -> anyhow::Result<FioPair> {
    Ok(FioPair {
        psync_iops: run(job, "psync")?,
        io_uring_iops: run(job, "io_uring")?,
    })
}

/// Runs `job` with `engine` through the page cache (`--invalidate=0`, so it
/// uses what is cached, as vspa does); returns IOPS. Latency at QD1 is the
/// inverse (`--gtod_reduce` drops fio's own latency statistics).
pub(crate) fn run(job: FioJob<'_>, engine: &str) -> anyhow::Result<f64> {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=bench", "--numjobs=1", "--thread"])
        .arg(format!("--ioengine={engine}"))
        .args(["--direct=0", "--invalidate=0", "--randrepeat=0"])
        .args([
            "--gtod_reduce=1",
            "--norandommap",
            "--random_generator=lfsr",
        ])
        .args(["--time_based", "--output-format=json"])
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--runtime={}", job.seconds))
        .arg(format!("--size={}", job.size))
        .arg(format!("--filename={}", job.path.display()));
    if engine == "io_uring" {
        cmd.arg(format!("--iodepth={}", job.depth))
            .args(["--fixedbufs", "--registerfiles"]);
    }
    if let Some(cpu) = job.cpu {
        cmd.arg(format!("--cpus_allowed={cpu}"));
    }
    let out = cmd.output().context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let side = if job.rw.contains("write") {
        "write"
    } else {
        "read"
    };
    v["jobs"][0][side]["iops"]
        .as_f64()
        .context("fio JSON has no iops")
}

/// Checks that the peers a benchmark needs are installed.
pub(crate) fn require(tools: &[&str]) -> anyhow::Result<()> {
    for tool in tools {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is required (apt-get install fio qemu-utils)");
        }
    }
    Ok(())
}

/// MiB/s of `iops` requests of `bs` bytes.
pub(crate) fn mib_per_s(iops: f64, bs: u32) -> f64 {
    iops * f64::from(bs) / f64::from(1u32 << 20)
}

/// Mean latency in microseconds of a QD1 run of `iops`.
pub(crate) fn qd1_lat_us(iops: f64) -> f64 {
    1e6 / iops.max(f64::MIN_POSITIVE)
}
