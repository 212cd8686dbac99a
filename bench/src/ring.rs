//! `vspa-bench ring`: VMBus ring throughput, one way, producer and consumer
//! on different threads over a doubly mapped memfd ring (the hosted-mode
//! layout), measured against a plain memcpy of the same sizes in the same
//! run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmbus::SharedMemory;
use vmbus::ring::{IncomingRing, OutgoingRing, RingMemory, WriteError};

#[derive(Debug, clap::Args)]
pub struct RingArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Data area of the ring for the 64 KiB measurement; memcpy uses the
    /// same working set.
    #[arg(long, default_value_t = 1024)]
    pub ring_kib: u32,
}

#[derive(Debug, Serialize)]
struct RingReport {
    inband_64b_mpps: f64,
    payload_64k_gbytes_per_s: f64,
    memcpy_gbytes_per_s: f64,
    payload_to_memcpy_ratio: f64,
    /// Reference: two threads handing 64 KiB buffers through shared memory
    /// of the same size with a bare pair of counters (no ring protocol):
    /// what this machine gives a cross-core copy.
    crosscore_copy_gbytes_per_s: f64,
    payload_to_crosscore_ratio: f64,
    /// The most any ring could reach against the memcpy reference here:
    /// the bare cross-core copy over memcpy.
    crosscore_to_memcpy_ratio: f64,
    ring_kib: u32,
    target_inband_64b_mpps: f64,
    target_payload_to_memcpy_ratio: f64,
}

pub fn run(args: RingArgs) -> anyhow::Result<()> {
    let dur = Duration::from_secs_f64(args.seconds);
    let small = one_way(64, 64, dur)?;
    let big = one_way(64 * 1024, args.ring_kib as usize / 4, dur)?;
    let memcpy = memcpy_rate(64 * 1024, args.ring_kib as usize * 1024, dur);
    let crosscore = crosscore_rate(64 * 1024, args.ring_kib as usize * 1024, dur)?;
    let report = RingReport {
        inband_64b_mpps: small.packets_per_s / 1e6,
        payload_64k_gbytes_per_s: big.bytes_per_s / 1e9,
        memcpy_gbytes_per_s: memcpy / 1e9,
        payload_to_memcpy_ratio: big.bytes_per_s / memcpy,
        crosscore_copy_gbytes_per_s: crosscore / 1e9,
        payload_to_crosscore_ratio: big.bytes_per_s / crosscore,
        crosscore_to_memcpy_ratio: crosscore / memcpy,
        ring_kib: args.ring_kib,
        target_inband_64b_mpps: 10.0,
        target_payload_to_memcpy_ratio: 0.6,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{:<34} {:>10}", "measure", "value");
        println!(
            "{:<34} {:>10.2}",
            "in-band 64 B one way (Mpps)", report.inband_64b_mpps
        );
        let p = report.payload_64k_gbytes_per_s;
        println!("{:<34} {:>10.2}", "64 KiB payload one way (GB/s)", p);
        println!(
            "{:<34} {:>10.2}",
            "memcpy 64 KiB (GB/s)", report.memcpy_gbytes_per_s
        );
        println!(
            "{:<34} {:>10.2}",
            "ring / memcpy", report.payload_to_memcpy_ratio
        );
        let x = report.crosscore_copy_gbytes_per_s;
        println!("{:<34} {:>10.2}", "bare cross-core copy (GB/s)", x);
        let r = report.payload_to_crosscore_ratio;
        println!("{:<34} {:>10.2}", "ring / bare cross-core copy", r);
        let c = report.crosscore_to_memcpy_ratio;
        println!("{:<34} {:>10.2}", "bare cross-core copy / memcpy", c);
    }
    Ok(())
}

struct Rate {
    packets_per_s: f64,
    bytes_per_s: f64,
}

/// A doubly mapped ring of `data_pages` pages in a memfd, as hosted mode
/// maps it.
fn ring_pair(data_pages: usize) -> anyhow::Result<(OutgoingRing, IncomingRing, SharedMemory)> {
    let (mem, _fd) = SharedMemory::create(((1 + data_pages) * 4096) as u64)?;
    let pfns: Vec<u64> = (0..=data_pages as u64).collect();
    let ring = RingMemory::from_pages(mem.map_ring(&pfns)?)?;
    ring.init_control();
    Ok((
        OutgoingRing::new(ring.clone())?,
        IncomingRing::new(ring)?,
        mem,
    ))
}

/// Producer writes `size`-byte in-band packets as fast as the ring takes
/// them; the consumer copies each payload out of the ring. Both poll. Each
/// side publishes its index once per batch of about an eighth of the ring,
/// as a busy VSP does, so the two sides overlap instead of taking turns.
fn one_way(size: usize, data_pages: usize, dur: Duration) -> anyhow::Result<Rate> {
    let (mut out, mut inc, _mem) = ring_pair(data_pages)?;
    let batch = ((data_pages * 4096 / 8) / (size + 24)).clamp(1, 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let consumer = std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut dst = vec![0u8; size];
        let mut n = 0u64;
        inc.mask_interrupts();
        while !stop2.load(Ordering::Relaxed) {
            let mut got = 0;
            while let Some(p) = inc.read()? {
                p.payload().read_at(0, &mut dst[..size])?;
                n += 1;
                got += 1;
                if got == batch {
                    break;
                }
            }
            if got == 0 {
                std::hint::spin_loop();
            }
            inc.commit()?;
        }
        std::hint::black_box(&dst);
        Ok(n)
    });
    let src = vec![0x5au8; size];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        let mut staged = 0;
        while staged < batch {
            match out.write_inband(sent, false, &src) {
                Ok(()) => {
                    sent += 1;
                    staged += 1;
                }
                Err(WriteError::Full { .. }) => {
                    out.commit()?;
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e.into()),
            }
        }
        out.commit()?;
    }
    out.commit()?;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let received = consumer.join().expect("consumer thread")?;
    // Count what was consumed within the window (the last few packets in
    // flight are within one ring's worth).
    let n = received.min(sent) as f64;
    Ok(Rate {
        packets_per_s: n / elapsed,
        bytes_per_s: n * size as f64 / elapsed,
    })
}

/// A counter on its own cache lines.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Counter(AtomicU64);

/// Two threads, `set` bytes of shared memory cut into `size`-byte slots:
/// the producer copies into a slot and bumps `head`, the consumer copies it
/// out and bumps `tail`. No descriptors, no trailers, no signalling rules.
fn crosscore_rate(size: usize, set: usize, dur: Duration) -> anyhow::Result<f64> {
    let slots = (set / size).max(2) as u64;
    let (mem, _fd) = SharedMemory::create((slots as usize * size) as u64)?;
    let counters = Arc::new((
        Counter::default(),
        Counter::default(),
        AtomicBool::new(false),
    ));
    let (mem2, c2) = (mem.clone(), counters.clone());
    let consumer = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut dst = vec![0u8; size];
        let mut i = 0u64;
        while !c2.2.load(Ordering::Relaxed) {
            if c2.0.0.load(Ordering::Acquire) <= i {
                std::hint::spin_loop();
                continue;
            }
            mem2.slice((i % slots) * size as u64, size)?
                .read_at(0, &mut dst)?;
            i += 1;
            c2.1.0.store(i, Ordering::Release);
        }
        std::hint::black_box(&dst);
        Ok(())
    });
    let src = vec![0x5au8; size];
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < dur {
        for _ in 0..64 {
            while i - counters.1.0.load(Ordering::Acquire) >= slots {
                std::hint::spin_loop();
            }
            mem.slice((i % slots) * size as u64, size)?
                .write_at(0, &src)?;
            i += 1;
            counters.0.0.store(i, Ordering::Release);
        }
    }
    let done = counters.1.0.load(Ordering::Acquire);
    let secs = start.elapsed().as_secs_f64();
    counters.2.store(true, Ordering::Relaxed);
    consumer.join().expect("consumer thread")?;
    Ok(done as f64 * size as f64 / secs)
}

/// Plain memcpy of `size`-byte buffers over a working set of `set` bytes
/// (source and destination each), the same as the ring's.
fn memcpy_rate(size: usize, set: usize, dur: Duration) -> f64 {
    let bufs = (set / size).max(1);
    let src = vec![0x5au8; size * bufs];
    let mut dst = vec![0u8; size * bufs];
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut i = 0;
    while start.elapsed() < dur {
        for _ in 0..64 {
            let at = (i % bufs) * size;
            dst[at..at + size].copy_from_slice(&src[at..at + size]);
            std::hint::black_box(&dst);
            bytes += size as u64;
            i += 1;
        }
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}
