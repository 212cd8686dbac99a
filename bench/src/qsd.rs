//! qemu-storage-daemon as the peer users would pick instead of vspa.
//!
//! QSD serves the same dynamic VHD (`driver=vpc` over `driver=file`,
//! through the page cache) as a vhost-user-blk export on one IOThread, once
//! with `aio=io_uring` and once with `aio=threads`; the whole daemon is
//! bound to the CPU vspa's worker has. A client process (this binary,
//! re-executed as `qsd-client`, on the client CPU) drives it through the
//! `virtio-driver` crate with the same access pattern and queue depth as
//! vspa's storvsc client, polling then sleeping the same way. Its request
//! buffers live in a memfd the daemon maps (vhost-user needs shared memory).
//! Each figure is the better of the two aio modes.
#![allow(unsafe_code)] // mmap of the shared buffer memory, raw virtio requests into it

use anyhow::{Context, bail};
use serde::Serialize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use virtio_driver::{
    VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkReqBuf,
    VirtioBlkTransport, VirtioFeatureFlags,
};

use crate::disk::{warm, warm_small_folios};
use crate::fio::qd1_lat_us;
use crate::storage::{Access, ClientArgs, SIZE, client_process, report_run};

/// The aio modes QSD is run with.
const AIO_MODES: [&str; 2] = ["io_uring", "threads"];

/// One aio mode's figures.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct QsdMode {
    randread_qd32_iops: f64,
    randwrite_qd32_iops: f64,
    randread_qd1_lat_us: f64,
    randwrite_qd1_lat_us: f64,
}

/// QSD's figures (the better aio mode for each) and vspa's ratios to them.
#[derive(Debug, Default, Serialize)]
pub(crate) struct QsdReport {
    qsd_randread_qd32_iops: f64,
    qsd_randread_qd32_aio: &'static str,
    qsd_randwrite_qd32_iops: f64,
    qsd_randwrite_qd32_aio: &'static str,
    qsd_randread_qd1_lat_us: f64,
    qsd_randread_qd1_aio: &'static str,
    qsd_randwrite_qd1_lat_us: f64,
    qsd_randwrite_qd1_aio: &'static str,
    qsd_io_uring: QsdMode,
    qsd_threads: QsdMode,
    vspa_to_qsd_randread_qd32_ratio: f64,
    vspa_to_qsd_randwrite_qd32_ratio: f64,
    target_vspa_to_qsd_qd32_ratio: f64,
    vspa_to_qsd_randread_qd1_lat_ratio: f64,
    vspa_to_qsd_randwrite_qd1_lat_ratio: f64,
    target_vspa_to_qsd_qd1_lat_ratio_below: f64,
}

impl QsdReport {
    /// Adds vspa's ratios to QSD's best.
    pub fn with_ratios(mut self, rr32: f64, rw32: f64, rr1_lat: f64, rw1_lat: f64) -> QsdReport {
        self.vspa_to_qsd_randread_qd32_ratio = rr32 / self.qsd_randread_qd32_iops;
        self.vspa_to_qsd_randwrite_qd32_ratio = rw32 / self.qsd_randwrite_qd32_iops;
        self.target_vspa_to_qsd_qd32_ratio = 1.5;
        self.vspa_to_qsd_randread_qd1_lat_ratio = rr1_lat / self.qsd_randread_qd1_lat_us;
        self.vspa_to_qsd_randwrite_qd1_lat_ratio = rw1_lat / self.qsd_randwrite_qd1_lat_us;
        self.target_vspa_to_qsd_qd1_lat_ratio_below = 1.0;
        self
    }

    pub fn print_table(&self) {
        println!(
            "{:<30} {:>12} {:>12} {:>12} {:>7} {:>7}",
            "qemu-storage-daemon (vpc)", "aio=io_uring", "aio=threads", "best", "vspa/q", "target"
        );
        let (u, t) = (&self.qsd_io_uring, &self.qsd_threads);
        let row = |name: &str, a: f64, b: f64, best: f64, ratio: f64, target: &str| {
            println!("{name:<30} {a:>12.0} {b:>12.0} {best:>12.0} {ratio:>7.2} {target:>7}");
        };
        row(
            "randread QD32 IOPS",
            u.randread_qd32_iops,
            t.randread_qd32_iops,
            self.qsd_randread_qd32_iops,
            self.vspa_to_qsd_randread_qd32_ratio,
            ">=1.5",
        );
        row(
            "randwrite QD32 IOPS",
            u.randwrite_qd32_iops,
            t.randwrite_qd32_iops,
            self.qsd_randwrite_qd32_iops,
            self.vspa_to_qsd_randwrite_qd32_ratio,
            ">=1.5",
        );
        row(
            "randread QD1 latency us",
            u.randread_qd1_lat_us,
            t.randread_qd1_lat_us,
            self.qsd_randread_qd1_lat_us,
            self.vspa_to_qsd_randread_qd1_lat_ratio,
            "<1",
        );
        row(
            "randwrite QD1 latency us",
            u.randwrite_qd1_lat_us,
            t.randwrite_qd1_lat_us,
            self.qsd_randwrite_qd1_lat_us,
            self.vspa_to_qsd_randwrite_qd1_lat_ratio,
            "<1",
        );
    }
}

/// Both aio modes on `image`, reads on a read-warmed cache and writes on a
/// cache of small folios (as for vspa and fio).
pub(crate) fn measure(
    dir: &Path,
    image: &Path,
    seconds: u64,
    server_cpu: usize,
    client_cpu: usize,
) -> anyhow::Result<QsdReport> {
    let mut modes = [QsdMode::default(); 2];
    for (mode, aio) in modes.iter_mut().zip(AIO_MODES) {
        let daemon = Daemon::start(dir, image, aio, server_cpu)?;
        let client = |pattern: &str, depth: u32| {
            let args = ClientArgs {
                socket: daemon.socket.clone(),
                pattern: pattern.into(),
                block: 4096,
                depth,
                seconds,
                lun: 0,
                cpu: Some(client_cpu),
            };
            client_process("qsd-client", &args).map(|r| r.iops)
        };
        warm(image)?;
        mode.randread_qd32_iops = client("randread", 32)?;
        mode.randread_qd1_lat_us = qd1_lat_us(client("randread", 1)?);
        warm_small_folios(image)?;
        mode.randwrite_qd32_iops = client("randwrite", 32)?;
        mode.randwrite_qd1_lat_us = qd1_lat_us(client("randwrite", 1)?);
    }
    let [u, t] = modes;
    let higher = |a: f64, b: f64| {
        if a >= b {
            (a, AIO_MODES[0])
        } else {
            (b, AIO_MODES[1])
        }
    };
    let lower = |a: f64, b: f64| {
        if a <= b {
            (a, AIO_MODES[0])
        } else {
            (b, AIO_MODES[1])
        }
    };
    let (rr32, rr32_aio) = higher(u.randread_qd32_iops, t.randread_qd32_iops);
    let (rw32, rw32_aio) = higher(u.randwrite_qd32_iops, t.randwrite_qd32_iops);
    let (rr1, rr1_aio) = lower(u.randread_qd1_lat_us, t.randread_qd1_lat_us);
    let (rw1, rw1_aio) = lower(u.randwrite_qd1_lat_us, t.randwrite_qd1_lat_us);
    Ok(QsdReport {
        qsd_randread_qd32_iops: rr32,
        qsd_randread_qd32_aio: rr32_aio,
        qsd_randwrite_qd32_iops: rw32,
        qsd_randwrite_qd32_aio: rw32_aio,
        qsd_randread_qd1_lat_us: rr1,
        qsd_randread_qd1_aio: rr1_aio,
        qsd_randwrite_qd1_lat_us: rw1,
        qsd_randwrite_qd1_aio: rw1_aio,
        qsd_io_uring: u,
        qsd_threads: t,
        ..QsdReport::default()
    })
}

/// A running qemu-storage-daemon; killed (by its pid) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, image: &Path, aio: &str, cpu: usize) -> anyhow::Result<Daemon> {
        let socket = dir.join(format!("qsd-{aio}.sock"));
        let pidfile = dir.join(format!("qsd-{aio}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let file = format!(
            "driver=file,node-name=file0,filename={},aio={aio},cache.direct=off",
            image.display()
        );
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,num-queues=1,\
             iothread=io0,addr.type=unix,addr.path={}",
            socket.display()
        );
        let child = Command::new("taskset")
            .args(["-c", &cpu.to_string(), "qemu-storage-daemon"])
            .args(["--object", "iothread,id=io0"])
            .args(["--blockdev", &file])
            .args(["--blockdev", "driver=vpc,node-name=disk0,file=file0"])
            .args(["--export", &export])
            .arg("--pidfile")
            .arg(&pidfile)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-storage-daemon (and taskset)")?;
        let mut daemon = Daemon { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = daemon.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("qemu-storage-daemon exited ({status}): {err}");
            }
            if Instant::now() > deadline {
                bail!("qemu-storage-daemon did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Request buffers in a memfd, mapped here and by the daemon.
struct SharedBuffers {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl SharedBuffers {
    fn new(len: usize) -> anyhow::Result<SharedBuffers> {
        // SAFETY: a NUL-terminated name and no flags; the result is checked.
        let raw = unsafe { libc::memfd_create(c"qsd-client".as_ptr(), 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        std::fs::File::from(fd.try_clone()?).set_len(len as u64)?;
        // SAFETY: maps `len` bytes of our own memfd, shared, at an address
        // the kernel picks; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(SharedBuffers {
            fd,
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for SharedBuffers {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new(); nothing uses it
        // after the client loop, which has drained every request.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Waits up to `timeout` for `fd` to become readable.
fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd on the stack, valid for the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// The vhost-user-blk client: keeps `depth` requests in flight for
/// `seconds`, as `storage::client` does over VMBus.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    if let Some(cpu) = args.cpu {
        vmbus::cpu::pin_current_thread(cpu)?;
    }
    let socket = args.socket.to_str().context("socket path is not UTF-8")?;
    let features = VirtioFeatureFlags::VERSION_1.bits()
        | VirtioFeatureFlags::RING_EVENT_IDX.bits()
        | VirtioBlkFeatureFlags::FLUSH.bits()
        | VirtioBlkFeatureFlags::BLK_SIZE.bits();
    let vhost = VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(socket, features)
        .context("connecting to qemu-storage-daemon")?;
    let mut transport: Box<VirtioBlkTransport> = Box::new(vhost);
    let queue_size = (args.depth * 4).next_power_of_two().clamp(64, 1024) as u16;
    let mut queues = VirtioBlkQueue::<usize>::setup_queues(&mut *transport, 1, queue_size)?;
    let mut queue = queues.pop().context("no queue")?;
    let block = args.block as usize;
    let memory = SharedBuffers::new(block * args.depth as usize)?;
    transport.map_mem_region(memory.ptr as usize, memory.len, memory.fd.as_raw_fd(), 0)?;
    let notifier = transport.get_submission_notifier(0);
    let completions = transport.get_completion_fd(0);
    queue.set_used_notif_enabled(false);

    let mut access = Access::new(&args.pattern, SIZE, args.block)?;
    let mut free: Vec<usize> = (0..args.depth as usize).collect();
    let (mut done, mut in_flight, mut idle) = (0u64, 0usize, 0u32);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    loop {
        let running = Instant::now() < deadline;
        let mut queued = false;
        while let Some(slot) = free.pop() {
            let Some(offset) = access.next().filter(|_| running) else {
                free.push(slot);
                break;
            };
            // Slot `slot` owns bytes [slot * block, +block) of the mapping.
            let buf = memory.ptr.wrapping_add(slot * block);
            // SAFETY: the buffer lies in the shared mapping, which outlives
            // every request (all are drained before it is unmapped), and no
            // other request uses it until this one completes.
            unsafe {
                if access.write {
                    queue.write_raw(offset, buf, block, slot)?;
                } else {
                    queue.read_raw(offset, buf, block, slot)?;
                }
            }
            in_flight += 1;
            queued = true;
        }
        if queued && queue.avail_notif_needed() {
            notifier.notify()?;
        }
        if in_flight == 0 {
            break;
        }
        let mut got = 0;
        for c in queue.completions() {
            if c.ret != 0 {
                bail!("I/O failed: {}", std::io::Error::from_raw_os_error(-c.ret));
            }
            free.push(c.context);
            in_flight -= 1;
            done += 1;
            got += 1;
        }
        if got > 0 {
            idle = 0;
            continue;
        }
        idle += 1;
        // Poll briefly (as vspa's client does), then sleep on the call fd.
        if idle > 2000 {
            idle = 0;
            queue.set_used_notif_enabled(true);
            if !queue.completions().has_next()
                && wait_readable(completions.as_raw_fd(), Duration::from_millis(10))
            {
                completions.read()?;
            }
            queue.set_used_notif_enabled(false);
        }
    }
    report_run(done, start)
}
