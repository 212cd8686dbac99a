//! `vspa-bench tenants`: noisy neighbours. Two tenants of one appliance,
//! each with its own controller and page-cached 1 GiB raw disk. Tenant B's
//! 4 KiB random-read IOPS (QD32, its own client process) is measured alone,
//! then while tenant A floods its disk at QD256 under a per-LUN cap
//! (`[tenant.limits] lun_iops`, default 50,000). The figure that matters is
//! `tenant_b_shared_vs_alone` (target >= 0.8): A's flood costs B at most
//! its share of the machine, not A's appetite.
//!
//! B is placed as an operator places a tenant whose throughput matters:
//! its worker bound to the last CPU (`cpus` in its controller), its client
//! to the first, as in `vspa-bench storage`. A, the flooder, is left to the
//! scheduler. Unbound, B's figure alone swings by a third from run to run
//! here (its client and worker land on one CPU and take turns).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::disk::warm;
use crate::storage::{ClientArgs, SIZE, bench_cpus, client_process};

#[derive(Debug, clap::Args)]
pub struct TenantsArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Tenant A's per-LUN IOPS cap.
    #[arg(long, default_value_t = 50_000)]
    pub cap: u32,
    /// Directory for the images (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    seconds: u64,
    tenant_a_lun_iops_cap: u32,
    tenant_a_depth: u32,
    tenant_b_depth: u32,
    /// Where B's worker and client are bound (A is unbound).
    tenant_b_worker_cpu: usize,
    tenant_b_client_cpu: usize,
    /// A alone at QD256 under its cap (shows the cap holds).
    tenant_a_alone_iops: f64,
    tenant_b_alone_iops: f64,
    tenant_a_shared_iops: f64,
    tenant_b_shared_iops: f64,
    tenant_b_shared_vs_alone: f64,
}

const A_DEPTH: u32 = 256;
const B_DEPTH: u32 = 32;

pub fn run(args: TenantsArgs) -> anyhow::Result<()> {
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

/// The appliance's configuration: controllers `a` and `b`, one LUN each,
/// one tenant each, A capped.
fn config_text(dir: &Path, cap: u32, b_worker_cpu: usize) -> String {
    let mut text = String::new();
    for t in ["a", "b"] {
        let (limits, cpus) = if t == "a" {
            (
                format!("[tenant.limits]\nlun_iops = {cap}\n"),
                String::new(),
            )
        } else {
            (String::new(), format!("cpus = [{b_worker_cpu}]\n"))
        };
        text += &format!(
            r#"
[[controller]]
name = "{t}"
subchannels = 0
{cpus}[[controller.lun]]
lun = 0
path = "{t}.img"
cache = "cached"

[[tenant]]
name = "{t}"
socket = "{sock}"
controllers = ["{t}"]
{limits}"#,
            sock = dir.join(format!("{t}.sock")).display(),
        );
    }
    text
}

/// A raw disk of [`SIZE`] bytes with data in every page.
fn fill(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..SIZE / chunk.len() as u64 {
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(())
}

fn client(dir: &Path, tenant: &str, depth: u32, seconds: u64, cpu: Option<usize>) -> ClientArgs {
    ClientArgs {
        socket: dir.join(format!("{tenant}.sock")),
        pattern: "randread".into(),
        block: 4096,
        depth,
        seconds,
        lun: 0,
        cpu,
    }
}

fn measure(args: &TenantsArgs, dir: &Path) -> anyhow::Result<Report> {
    for t in ["a", "b"] {
        let path = dir.join(format!("{t}.img"));
        fill(&path)?;
        warm(&path)?;
    }
    let (b_worker_cpu, b_client_cpu) = bench_cpus()?;
    let text = config_text(dir, args.cap, b_worker_cpu);
    let config = vspa::ValidConfig::from_toml(&text, dir)?;
    // Serving mode (tenants' own sockets); no implicit tenant is made when
    // the file has tenant tables.
    let options = vspa::Options {
        serve: Some(dir.join("serve.sock")),
        ..vspa::Options::default()
    };
    let app = vspa::Appliance::start(&config, &options)?;
    let secs = args.seconds;
    let run = |t: &str, depth: u32, s: u64| {
        let cpu = (t == "b").then_some(b_client_cpu);
        client_process("storage-client", &client(dir, t, depth, s, cpu))
            .with_context(|| format!("tenant {t}'s client"))
    };
    let a_alone = run("a", A_DEPTH, secs)?.iops;
    let b_alone = run("b", B_DEPTH, secs)?.iops;
    // A starts first and runs a second longer on each side of B's run.
    let (a_shared, b_shared) = std::thread::scope(|s| {
        let a = s.spawn(|| run("a", A_DEPTH, secs + 2));
        std::thread::sleep(Duration::from_secs(1));
        let b = run("b", B_DEPTH, secs);
        let a = a.join().expect("tenant a's thread");
        anyhow::Ok((a?.iops, b?.iops))
    })?;
    drop(app);
    Ok(Report {
        seconds: secs,
        tenant_a_lun_iops_cap: args.cap,
        tenant_a_depth: A_DEPTH,
        tenant_b_depth: B_DEPTH,
        tenant_b_worker_cpu: b_worker_cpu,
        tenant_b_client_cpu: b_client_cpu,
        tenant_a_alone_iops: a_alone.round(),
        tenant_b_alone_iops: b_alone.round(),
        tenant_a_shared_iops: a_shared.round(),
        tenant_b_shared_iops: b_shared.round(),
        tenant_b_shared_vs_alone: b_shared / b_alone,
    })
}

fn print_table(r: &Report) {
    println!(
        "4 KiB random reads, page-cached 1 GiB raw disks, {} s each; tenant A at QD{} capped at {} IOPS per LUN, B at QD{}",
        r.seconds, r.tenant_a_depth, r.tenant_a_lun_iops_cap, r.tenant_b_depth
    );
    println!(
        "{:<28} {:>12}",
        "tenant A alone IOPS", r.tenant_a_alone_iops
    );
    println!(
        "{:<28} {:>12}",
        "tenant B alone IOPS", r.tenant_b_alone_iops
    );
    println!(
        "{:<28} {:>12}",
        "tenant A with B IOPS", r.tenant_a_shared_iops
    );
    println!(
        "{:<28} {:>12}",
        "tenant B with A IOPS", r.tenant_b_shared_iops
    );
    println!(
        "{:<28} {:>12.2}  (target >= 0.8)",
        "B shared / alone", r.tenant_b_shared_vs_alone
    );
}
