//! `vspa-bench`: reproducible benchmarks of vspa against real peers, printed
//! side by side as ratios, with `--json` for machines.

use clap::{Parser, Subcommand};

mod disk;
mod fio;
mod nbd;
mod net;
mod netvsc;
mod qsd;
mod ring;
mod storage;
mod tenants;
mod vmm;
mod vxlan;
mod writepath;

#[derive(Debug, Parser)]
#[command(name = "vspa-bench", about = "Benchmarks of vspa against real peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// VMBus ring throughput against memcpy.
    Ring(ring::RingArgs),
    /// Disk backends against fio and qemu-img bench.
    Disk(disk::DiskArgs),
    /// The storage stack (client process, ring, VSP, VHD, io_uring) against
    /// fio and qemu-storage-daemon.
    Storage(storage::StorageArgs),
    /// The guest side of `storage` (run by it as a separate process).
    #[command(hide = true)]
    StorageClient(storage::ClientArgs),
    /// The vhost-user-blk client `storage` drives qemu-storage-daemon with.
    #[command(hide = true)]
    QsdClient(storage::ClientArgs),
    /// iperf3 through the switch against a Linux bridge, and frames per
    /// second between two netvsc guests.
    Net(net::NetArgs),
    /// The guests of `net`'s netvsc measurement (run by it as a separate process).
    #[command(hide = true)]
    NetvscClient(netvsc::ClientArgs),
    /// What one buffered 4 KiB write costs through each submission method.
    WritePath(writepath::WritePathArgs),
    /// VMM start-up time and resident memory apart from guest RAM.
    Vmm(vmm::VmmArgs),
    /// vspa's NBD server against qemu-nbd, driven by fio's nbd engine.
    Nbd(nbd::NbdArgs),
    /// Noisy neighbours: one tenant's IOPS alone and while another floods
    /// its disk under a per-LUN cap.
    Tenants(tenants::TenantsArgs),
}

/// Starts the appliance on configuration `text` (paths relative to the
/// working directory), as `vspa serve` would.
fn start_appliance(text: &str) -> anyhow::Result<vspa::Appliance> {
    let config = vspa::ValidConfig::from_toml(text, std::path::Path::new("."))?;
    Ok(vspa::Appliance::start(&config, &vspa::Options::default())?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Ring(args) => ring::run(args),
        Command::Disk(args) => disk::run(args),
        Command::Storage(args) => storage::run(args),
        Command::StorageClient(args) => storage::client(args),
        Command::QsdClient(args) => qsd::client(args),
        Command::Net(args) => net::run(args),
        Command::NetvscClient(args) => netvsc::client(args),
        Command::Vmm(args) => vmm::run(args),
        Command::WritePath(args) => writepath::run(args),
        Command::Nbd(args) => nbd::run(args),
        Command::Tenants(args) => tenants::run(args),
    }
}
