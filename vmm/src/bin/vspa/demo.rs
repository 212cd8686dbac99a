//! `vspa demo`: the appliance on an embedded default, driven by a client.
//!
//! Starts hosted mode on a temporary socket with the built-in devices and
//! drives a client through it, printing each step.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use storage::controller::DEFAULT_MAX_TRANSFER;
use storage::{Controller, ControllerConfig, Lun};
use vhd::DiskOptions;
use vmbus::channel::Wait;
use vmbus::echo::EchoDevice;
use vmbus::guid::ECHO_INTERFACE;
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::{ClientChannel, HostedClient};
use vmbus::server::Registry;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Packets to echo through the VMBus ring.
    #[arg(long, default_value_t = 200_000)]
    pub packets: u64,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("vspa-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("vspa.sock");
    let registry = Registry::new();
    registry.add(Arc::new(EchoDevice::new(Default::default())));
    let image = dir.join("demo.vhd");
    vhd::create::create_dynamic(&image, DEMO_DISK, 2 << 20).context("creating the demo VHD")?;
    let disk = vhd::open(&image, &DiskOptions::default()).context("opening the demo VHD")?;
    let controller = Controller::new(ControllerConfig::new(
        "demo-scsi",
        storage::config::guid_from_name("demo"),
    ));
    controller.add_lun(0, Lun::disk(disk, DEFAULT_MAX_TRANSFER))?;
    registry.add(Arc::new(controller));
    let server = HostedServer::start(&socket, registry).context("starting hosted mode")?;
    println!("appliance: hosted mode listening on {}", socket.display());
    println!(
        "appliance: SCSI controller with a {} MiB dynamic VHD at LUN 0",
        DEMO_DISK >> 20
    );
    let result = echo_demo(&server, args.packets).and_then(|()| storage_demo(&server, &image));
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    println!("demo: all parts passed");
    Ok(ExitCode::SUCCESS)
}

fn echo_demo(server: &HostedServer, packets: u64) -> anyhow::Result<()> {
    let mut client = HostedClient::connect(server.path(), 4 << 20)?;
    let v = client.version();
    println!(
        "client: connected, VMBus {}.{} negotiated, 4 MiB memfd shared",
        v >> 16,
        v & 0xffff
    );
    let offers = client.request_offers()?;
    for o in &offers {
        println!(
            "client: offer relid {} interface {} instance {}",
            o.relid, o.interface, o.instance
        );
    }
    let offer = offers
        .iter()
        .find(|o| o.interface == ECHO_INTERFACE)
        .context("no echo offer")?;
    let mut ch = client.open_channel(offer, 64, 64, &[])?;
    println!(
        "client: channel {} open, rings of 252 KiB each way in a GPADL",
        ch.relid()
    );
    let start = Instant::now();
    let bytes = pump(&mut ch, packets)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "echo: {packets} packets ({:.1} MB) echoed and checksum-verified in {secs:.2} s ({:.2} Mpps round trip)",
        bytes as f64 / 1e6,
        packets as f64 / secs / 1e6
    );
    client.close_channel(ch)?;
    println!("client: channel closed, GPADL torn down");
    Ok(())
}

/// Size of the demo's VHD.
const DEMO_DISK: u64 = 64 << 20;

/// Writes a pattern over the demo disk through the storage VSP (two
/// channels), flushes, reads it back and checks it, then checks the image
/// file itself is still a clean VHD.
fn storage_demo(server: &HostedServer, image: &std::path::Path) -> anyhow::Result<()> {
    use storage::client::{Buffer, Srb, StorvscClient, cdb};
    use storage::protocol::{direction, srb};
    let mut host = HostedClient::connect(server.path(), 8 << 20)?;
    let offer = host
        .request_offers()?
        .into_iter()
        .find(|o| o.interface == vmbus::guid::SCSI_INTERFACE)
        .context("no SCSI offer")?;
    let mut c = StorvscClient::connect(&mut host, &offer, 1, 32)?;
    println!(
        "storvsc: protocol {:#06x}, {} channels, max transfer {} KiB",
        c.version,
        c.channels.len(),
        c.properties.max_transfer_bytes.get() / 1024
    );
    const CHUNK: u32 = 256 * 1024;
    let buf = Buffer {
        pages: host.alloc_pages(u64::from(CHUNK / 4096))?,
        offset: 0,
        len: CHUNK,
    };
    let chunks = (DEMO_DISK / u64::from(CHUNK)) as u32;
    let start = Instant::now();
    let mut data = vec![0u8; CHUNK as usize];
    for i in 0..chunks {
        fill_chunk(&mut data, i);
        host.slice(&buf.pages).write_at(0, &data)?;
        let w = cdb::write_16(u64::from(i) * u64::from(CHUNK / 512), CHUNK / 512);
        let r = c.execute(
            i as usize % c.channels.len(),
            &Srb::new(0, &w, direction::WRITE, CHUNK),
            Some(&buf),
        )?;
        if r.srb().srb_status != srb::SUCCESS {
            bail!("write {i} failed: srb status {:#x}", r.srb().srb_status);
        }
    }
    let r = c.execute(
        0,
        &Srb::new(0, &cdb::synchronize_cache(), direction::NONE, 0),
        None,
    )?;
    if r.srb().srb_status != srb::SUCCESS {
        bail!("SYNCHRONIZE CACHE failed");
    }
    let wrote = start.elapsed().as_secs_f64();
    let mut got = vec![0u8; CHUNK as usize];
    for i in 0..chunks {
        let rd = cdb::read_16(u64::from(i) * u64::from(CHUNK / 512), CHUNK / 512);
        let r = c.execute(
            i as usize % c.channels.len(),
            &Srb::new(0, &rd, direction::READ, CHUNK),
            Some(&buf),
        )?;
        if r.srb().srb_status != srb::SUCCESS {
            bail!("read {i} failed");
        }
        host.slice(&buf.pages).read_at(0, &mut got)?;
        fill_chunk(&mut data, i);
        if got != data {
            bail!("chunk {i} read back differently");
        }
    }
    println!(
        "storage: wrote {} MiB in {wrote:.2} s, flushed, read back and verified",
        DEMO_DISK >> 20
    );
    drop(c);
    let report = vhd::tool::check(image);
    println!(
        "storage: `vspa image check` on the VHD: {}",
        if report.is_clean() {
            "clean"
        } else {
            "PROBLEMS"
        }
    );
    if !report.is_clean() {
        bail!("the demo VHD is not clean");
    }
    Ok(())
}

fn fill_chunk(buf: &mut [u8], seed: u32) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u32)
            .wrapping_mul(2654435761)
            .wrapping_add(seed)
            .to_le_bytes()[3];
    }
}

/// Sends packets carrying a length and CRC32 and checks every echo.
fn pump(ch: &mut ClientChannel, packets: u64) -> anyhow::Result<u64> {
    let c = &mut ch.channel;
    let (mut sent, mut got, mut bytes) = (0u64, 0u64, 0u64);
    let mut buf = vec![0u8; 2048];
    while got < packets {
        while sent < packets {
            let len = 8 + (sent as usize * 37) % 1500;
            fill(&mut buf[..len], sent);
            if c.outgoing.write_inband(sent, false, &buf[..len]).is_err() {
                break;
            }
            sent += 1;
        }
        c.flush()?;
        let mut progressed = false;
        while let Some(p) = c.incoming.read()? {
            let mut head = [0u8; 8];
            p.payload().read_at(0, &mut head)?;
            let len = u32::from_le_bytes(head[..4].try_into()?) as usize;
            let crc = u32::from_le_bytes(head[4..].try_into()?);
            let mut data = vec![0u8; len];
            p.payload().read_at(8, &mut data)?;
            if p.desc.transaction_id != got || crc32fast::hash(&data) != crc {
                bail!("echo {got} came back wrong");
            }
            bytes += 8 + len as u64;
            got += 1;
            progressed = true;
        }
        c.flush()?;
        if !progressed && c.wait_for_work(Some(Duration::from_secs(5)))? == Wait::TimedOut {
            bail!("echo stalled after {got} packets");
        }
    }
    Ok(bytes)
}

fn fill(buf: &mut [u8], seed: u64) {
    let data_len = buf.len() - 8;
    for (i, b) in buf[8..].iter_mut().enumerate() {
        *b = (seed as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    let crc = crc32fast::hash(&buf[8..]);
    buf[..4].copy_from_slice(&(data_len as u32).to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}
