//! `vspa demo`: the appliance on an embedded default, driven by a client.
//!
//! Starts hosted mode on a temporary socket with the built-in devices (an
//! echo device, a SCSI controller with a dynamic VHD, and a switch with two
//! netvsc NICs and the appliance's own interface) and drives clients
//! through them, printing each step.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmbus::channel::Wait;
use vmbus::guid::ECHO_INTERFACE;
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::{ClientChannel, HostedClient};
use vspa::tenant::DEFAULT_TENANT;
use vspa::{Appliance, Options, ValidConfig};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Packets to echo through the VMBus ring.
    #[arg(long, default_value_t = 200_000)]
    pub packets: u64,
    /// Frames each netvsc NIC sends the other in the network part.
    #[arg(long, default_value_t = 200_000)]
    pub frames: u32,
}

/// The embedded default: a SCSI controller with the demo VHD and a switch
/// with two guest NICs and the appliance's own interface. Paths are
/// relative to the demo's temporary directory.
const DEMO_CONFIG: &str = r#"
[[controller]]
name = "demo-scsi"
[[controller.lun]]
lun = 0
path = "demo.vhd"

[[switch]]
name = "demo-sw"
[[switch.port]]
name = "vm-a"
netvsp = { mac = "02:00:00:00:77:0a", instance = "d3d0a1a1-0000-4000-8000-0000000000a1" }
[[switch.port]]
name = "vm-b"
netvsp = { mac = "02:00:00:00:77:0b", instance = "d3d0a1a1-0000-4000-8000-0000000000b2", channels = 2 }
[[switch.port]]
name = "mgmt"
internal = { mac = "02:00:00:00:77:fe", ip = "10.77.0.254/24", counters_port = 9100 }
"#;

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("vspa-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("vspa.sock");
    let image = dir.join("demo.vhd");
    vhd::create::create_dynamic(&image, DEMO_DISK, 2 << 20).context("creating the demo VHD")?;
    let config = ValidConfig::from_toml(DEMO_CONFIG, &dir)?;
    let options = Options {
        echo: Some((Default::default(), Duration::from_secs(10))),
        serve: None,
    };
    let appliance = Appliance::start(&config, &options).context("starting the appliance")?;
    let registry = appliance
        .registry(DEFAULT_TENANT)
        .context("the demo tenant")?;
    let server = HostedServer::start(&socket, registry.clone()).context("starting hosted mode")?;
    println!("appliance: hosted mode listening on {}", socket.display());
    println!(
        "appliance: SCSI controller with a {} MiB dynamic VHD at LUN 0",
        DEMO_DISK >> 20
    );
    println!(
        "appliance: switch {} with netvsc NICs vm-a, vm-b and the internal port {}",
        network::SWITCH,
        network::MGMT_IP
    );
    let result = echo_demo(&server, args.packets)
        .and_then(|()| storage_demo(&server, &image))
        .and_then(|()| network::demo(&server, &appliance, args.frames));
    server.stop();
    appliance.shutdown();
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
    // The appliance still holds the (flushed) image: check beside it.
    let report = vhd::tool::check_with(image, true);
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

/// The network part: two netvsc guests on a switch with the appliance's
/// smoltcp interface.
mod network {
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use switch::netvsp::client::packets::{ping, resolve};
    use switch::netvsp::client::{NetvscClient, NetvscOptions, TxFrame, connect_hosted};
    use switch::netvsp::rndis;
    use switch::wire::MacAddr;
    use vmbus::hosted::HostedServer;
    use vmbus::hosted::client::HostedClient;
    use vspa::Appliance;

    pub const SWITCH: &str = "demo-sw";
    pub const MGMT_IP: &str = "10.77.0.254/24";

    fn connect(
        server: &HostedServer,
        instance: &str,
        opts: &NetvscOptions,
    ) -> anyhow::Result<(HostedClient, NetvscClient)> {
        let (host, c) = connect_hosted(server.path(), 48 << 20, instance.parse()?, opts)?;
        println!(
            "netvsc: {} NVSP {:#x}, MAC {}, MTU {}, {} channel(s), {} Mbit/s, link {}, {} KiB receive buffer in {} B sub-allocations",
            c.friendly_name.as_deref().unwrap_or("?"),
            c.version,
            c.mac,
            c.mtu,
            c.channels.len(),
            c.link_speed / 10_000,
            if c.state.link_up { "up" } else { "down" },
            opts.recv_buffer_bytes >> 10,
            c.recv_sub_alloc.0
        );
        Ok((host, c))
    }

    fn frame(dst: MacAddr, src: MacAddr, seq: u32) -> Vec<u8> {
        let len = 60 + (seq as usize * 37) % 1455;
        let mut f = vec![0u8; len];
        f[..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f[14..18].copy_from_slice(&seq.to_be_bytes());
        let crc = crc32fast::hash(&f[18..]);
        f[18..22].copy_from_slice(&crc.to_le_bytes());
        for (i, b) in f[22..].iter_mut().enumerate() {
            *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
        }
        f
    }

    pub fn demo(server: &HostedServer, appliance: &Appliance, frames: u32) -> anyhow::Result<()> {
        let net = appliance.network();
        let opts = NetvscOptions {
            recv_buffer_bytes: 16 << 20,
            ..Default::default()
        };
        let (_ha, mut a) = connect(server, "d3d0a1a1-0000-4000-8000-0000000000a1", &opts)?;
        let (_hb, mut b) = connect(
            server,
            "d3d0a1a1-0000-4000-8000-0000000000b2",
            &NetvscOptions {
                subchannels: 1,
                ..opts.clone()
            },
        )?;
        // vm-a pings the appliance's own interface.
        let me = [10, 77, 0, 1];
        let mgmt_ip = [10, 77, 0, 254];
        let mgmt = resolve(&mut a, me, mgmt_ip)?.context("no ARP reply from the internal port")?;
        print!("netvsc: vm-a resolved 10.77.0.254 to {mgmt}; ping");
        for seq in 0..3 {
            match ping(&mut a, me, mgmt_ip, mgmt, seq)? {
                Some(rtt) => print!(" {:.0} us", rtt.as_secs_f64() * 1e6),
                None => bail!("no echo reply from the internal port"),
            }
        }
        println!();

        // Both ways at once, every frame checked.
        let (ma, mb) = (a.mac, b.mac);
        let start = Instant::now();
        let (mut sent_a, mut sent_b, mut got_a, mut got_b, mut bytes) =
            (0u32, 0u32, 0u32, 0u32, 0u64);
        let mut bad = 0u32;
        let mut batch_a = Vec::with_capacity(64);
        let mut batch_b = Vec::with_capacity(64);
        let deadline = start + Duration::from_secs(120);
        while (got_a < frames || got_b < frames) && Instant::now() < deadline {
            if sent_a < frames && sent_a - got_b < 4096 {
                batch_a.clear();
                batch_a.extend((sent_a..frames.min(sent_a + 64)).map(|i| frame(mb, ma, i)));
                let tx: Vec<TxFrame> = batch_a.iter().map(|f| TxFrame::new(f)).collect();
                sent_a += a.send(0, &tx)? as u32;
            }
            if sent_b < frames && sent_b - got_a < 4096 {
                batch_b.clear();
                batch_b.extend((sent_b..frames.min(sent_b + 64)).map(|i| frame(ma, mb, i)));
                let tx: Vec<TxFrame> = batch_b.iter().map(|f| TxFrame::new(f)).collect();
                sent_b += b.send(1, &tx)? as u32;
            }
            a.poll(0, |f| {
                let v = f.to_vec();
                if v.len() >= 22 && v[12..14] == [0x88, 0xb5] {
                    bad += u32::from(v != frame(ma, mb, got_a));
                    bytes += v.len() as u64;
                    got_a += 1;
                }
            })?;
            for ch in 0..b.channels.len() {
                b.poll(ch, |f| {
                    let v = f.to_vec();
                    if v.len() >= 22 && v[12..14] == [0x88, 0xb5] {
                        bad += u32::from(v != frame(mb, ma, got_b));
                        bytes += v.len() as u64;
                        got_b += 1;
                    }
                })?;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if got_a < frames || got_b < frames || bad > 0 {
            bail!("exchange incomplete: vm-a got {got_a}, vm-b got {got_b}, {bad} wrong");
        }
        println!(
            "netvsc: vm-a and vm-b exchanged {} frames of 60..1514 bytes both ways, each checked, in {secs:.2} s ({:.2} Mframes/s, {:.1} Gbit/s)",
            2 * frames,
            2.0 * f64::from(frames) / secs / 1e6,
            bytes as f64 * 8.0 / secs / 1e9
        );

        // Link down and up on vm-b.
        let nic_b = net
            .netvsp_devices()
            .find(|n| n.config().name == "vm-b")
            .context("vm-b")?;
        for up in [false, true] {
            nic_b.set_link(up);
            let deadline = Instant::now() + Duration::from_secs(5);
            while b.state.link_up != up && Instant::now() < deadline {
                b.poll(0, |_| {})?;
                b.wait(0, Duration::from_millis(10))?;
            }
            if b.state.link_up != up {
                bail!("vm-b saw no link indication");
            }
        }
        let names: Vec<&str> = b
            .state
            .indications
            .iter()
            .map(|&s| match s {
                rndis::status::MEDIA_CONNECT => "MEDIA_CONNECT",
                rndis::status::MEDIA_DISCONNECT => "MEDIA_DISCONNECT",
                _ => "other",
            })
            .collect();
        println!("netvsc: vm-b cable pulled and plugged: indications {names:?}");
        let sw = net.switch(SWITCH).context("the demo switch")?;
        for p in ["vm-a", "vm-b", "mgmt"] {
            if let Some(s) = sw.port_stats(p) {
                println!(
                    "switch: port {p}: rx {} frames, tx {} frames, {} dropped",
                    s.rx_frames,
                    s.tx_frames,
                    s.drop_queue_full + s.drop_malformed + s.drop_vlan
                );
            }
        }
        for n in net.netvsp_devices() {
            let s = n.stats();
            println!(
                "netvsp: {}: {} receive packets ({:.1} frames each), {} control messages, {} dropped for lack of buffer",
                n.config().name,
                s.rx_packets,
                sw.port_stats(&n.config().name)
                    .map_or(0.0, |p| p.tx_frames as f64 / s.rx_packets.max(1) as f64),
                s.control_messages,
                s.drop_rx_no_buffer
            );
        }
        Ok(())
    }
}
