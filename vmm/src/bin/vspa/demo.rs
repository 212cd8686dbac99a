//! `vspa demo`: the appliance on an embedded default, driven by a client.
//!
//! Starts hosted mode on a temporary socket with the built-in devices and
//! drives a client through it, printing each step.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
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
    let server = HostedServer::start(&socket, registry).context("starting hosted mode")?;
    println!("appliance: hosted mode listening on {}", socket.display());
    let result = echo_demo(&server, args.packets);
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
