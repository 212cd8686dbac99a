//! The block engine against a model: async queues at depth, concurrent
//! allocation, differencing semantics, O_DIRECT bounces, doorbells.
// Async requests over test-owned buffers need `Request::new`.
#![allow(unsafe_code)]

use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};
use std::path::Path;
use std::sync::Arc;
use vhd::create::{create_differencing, create_dynamic, create_fixed};
use vhd::{
    BlockDevice, BlockingIo, CacheMode, Completion, DiskOptions, IoQueue, Op, Request, VhdDisk,
};

fn cached() -> DiskOptions {
    DiskOptions::default().cache(CacheMode::Cached)
}

/// Content of a 4 KiB page: self-describing (page index, generation) then
/// bytes derived from both.
fn page(index: u64, generation: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(index.wrapping_mul(0x9e37_79b9) ^ generation);
    let mut p = vec![0u8; 4096];
    rng.fill_bytes(&mut p);
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..16].copy_from_slice(&generation.to_le_bytes());
    p
}

/// Writes `pages` (index, content) at queue depth `depth`; every write
/// completes Ok with 4096 bytes.
fn write_pages(dev: &dyn BlockDevice, queue: &mut IoQueue, pages: &[(u64, Vec<u8>)], depth: usize) {
    let mut next = 0;
    let mut in_flight = 0;
    let mut done = 0;
    let iovs: Vec<libc::iovec> = pages
        .iter()
        .map(|(_, p)| libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        })
        .collect();
    while done < pages.len() {
        while in_flight < depth && next < pages.len() {
            let (index, _) = &pages[next];
            // SAFETY: `pages` outlives this function, which reaps every
            // request before returning; the buffers are not changed.
            let req = unsafe {
                Request::new(Op::Write, index * 8, 8, &iovs[next..next + 1], next as u64)
            };
            dev.submit(queue, req).expect("submit write");
            next += 1;
            in_flight += 1;
        }
        queue.submit_and_wait().expect("wait");
        queue.reap(|c| match c {
            Completion::Request { result, .. } => {
                assert_eq!(result, Ok(4096));
                in_flight -= 1;
                done += 1;
            }
            other => panic!("unexpected {other:?}"),
        });
    }
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    BlockingIo::new().unwrap().read_all(dev).unwrap()
}

#[test]
fn dynamic_disk_matches_a_model_at_depth() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let size = 24 << 20;
    create_dynamic(&path, size, 1 << 20).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(1);
    let mut queue = IoQueue::new(32).unwrap();
    {
        let disk = VhdDisk::open(&path, &cached()).unwrap();
        let pages: Vec<(u64, Vec<u8>)> = (0..600)
            .map(|g| {
                let index = rng.random_range(0..size / 4096);
                (index, page(index, g))
            })
            .collect();
        for (index, p) in &pages {
            model[*index as usize * 4096..][..4096].copy_from_slice(p);
        }
        write_pages(&disk, &mut queue, &pages, 32);
        assert_eq!(read_all(&disk), model);
        BlockingIo::new().unwrap().flush(&disk).unwrap();
    }
    queue.release_closed_files(); // and with the file, the writer's locks
    let disk = VhdDisk::open(&path, &cached().read_only(true)).unwrap();
    assert_eq!(read_all(&disk), model);
    assert!(vhd::tool::check(&path).is_clean());
    assert_eq!(disk.meta().leaked_bytes(), 0);
}

#[test]
fn requests_spanning_blocks_and_many_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    create_dynamic(&path, 8 << 20, 64 << 10).unwrap();
    let disk = VhdDisk::open(&path, &cached()).unwrap();
    let mut queue = IoQueue::new(4).unwrap();
    // 200 KiB across four 64 KiB blocks, as 50 segments of 4 KiB.
    let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    let iov: Vec<libc::iovec> = data
        .chunks(4096)
        .map(|c| libc::iovec {
            iov_base: c.as_ptr().cast_mut().cast(),
            iov_len: c.len(),
        })
        .collect();
    // SAFETY: `data` is reaped before it goes out of scope and is unchanged.
    let req = unsafe { Request::new(Op::Write, 100, 400, &iov, 7) };
    disk.submit(&mut queue, req).unwrap();
    let mut seen = Vec::new();
    while seen.is_empty() {
        queue.submit_and_wait().unwrap();
        queue.reap(|c| seen.push(c));
    }
    assert_eq!(
        seen,
        vec![Completion::Request {
            tag: 7,
            result: Ok(200 * 1024)
        }]
    );
    let mut back = vec![0u8; 200 * 1024];
    BlockingIo::new()
        .unwrap()
        .read(&disk, 100, &mut back)
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn range_and_length_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    create_dynamic(&path, 1 << 20, 1 << 20).unwrap();
    let disk = VhdDisk::open(&path, &cached()).unwrap();
    let mut io = BlockingIo::new().unwrap();
    let mut buf = vec![0u8; 1024];
    assert!(matches!(
        io.read(&disk, 2047, &mut buf),
        Err(vhd::BlockError::OutOfRange { .. })
    ));
    let mut queue = IoQueue::new(2).unwrap();
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: 1000,
    }];
    // SAFETY: rejected at submission; nothing is queued.
    let req = unsafe { Request::new(Op::Read, 0, 2, &iov, 1) };
    assert!(matches!(
        disk.submit(&mut queue, req),
        Err(vhd::BlockError::LengthMismatch { .. })
    ));
    drop(disk);
    let ro = VhdDisk::open(&path, &cached().read_only(true)).unwrap();
    assert_eq!(io.write(&ro, 0, &buf), Err(vhd::BlockError::ReadOnly));
    let child = dir.path().join("c.vhd");
    create_differencing(&child, &path, 1 << 20).unwrap();
    let child = VhdDisk::open(&child, &cached()).unwrap();
    assert_eq!(
        io.discard(&child, 0, 1),
        Err(vhd::BlockError::DiscardUnsupported)
    );
    assert_eq!(io.discard(&ro, 0, 1), Err(vhd::BlockError::ReadOnly));
}

/// Discard on a dynamic disk punches the data of allocated blocks: the
/// range reads zeros, the host gets the space back, neighbours and the
/// metadata are untouched, and a block never written stays unallocated.
#[test]
fn dynamic_discard_punches_allocated_data() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    create_dynamic(&path, 8 << 20, 2 << 20).unwrap();
    let disk = VhdDisk::open(&path, &cached()).unwrap();
    assert!(disk.info().supports_discard);
    let mut io = BlockingIo::new().unwrap();
    let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    io.write(&disk, 0, &data).unwrap();
    io.flush(&disk).unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    // Sectors 8..4088 of block 0 (1 MiB + 8 sectors short of it all), and
    // a range in block 2, which was never written.
    io.discard(&disk, 8, 4080).unwrap();
    io.discard(&disk, 8192, 64).unwrap();
    io.flush(&disk).unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(
        after + 3900 < before,
        "space not returned: {before} -> {after} blocks"
    );
    let all = read_all(&disk);
    assert_eq!(&all[..8 * 512], &data[..8 * 512]);
    assert!(all[8 * 512..4088 * 512].iter().all(|&b| b == 0));
    assert_eq!(&all[4088 * 512..2 << 20], &data[4088 * 512..]);
    assert!(all[2 << 20..].iter().all(|&b| b == 0));
    assert_eq!(
        disk.bat_entry(2),
        Some(u32::MAX),
        "discard allocated a block"
    );
    drop(disk);
    let report = vhd::tool::check(&path);
    assert!(report.is_clean(), "{report:?}");
    // qemu reads the punched image as the same bytes.
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &all).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(&path)
        .arg(&raw)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Two threads, each with its own queue, hammer the same unallocated
/// blocks: every block must be allocated exactly once.
#[test]
fn concurrent_writers_never_allocate_a_block_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let block = 64u64 << 10;
    let blocks = 64u64;
    create_dynamic(&path, blocks * block, block as u32).unwrap();
    let disk = Arc::new(VhdDisk::open(&path, &cached()).unwrap());
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut queue = IoQueue::new(16).unwrap();
                // Thread t writes the t-th 4 KiB page of every block.
                let pages: Vec<(u64, Vec<u8>)> = (0..blocks)
                    .map(|b| {
                        let index = b * (block / 4096) + t;
                        (index, page(index, 1))
                    })
                    .collect();
                write_pages(&*disk, &mut queue, &pages, 16);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    BlockingIo::new().unwrap().flush(&*disk).unwrap();
    let entries: Vec<u32> = (0..blocks as usize)
        .map(|i| disk.bat_entry(i).unwrap())
        .collect();
    let mut sorted = entries.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), blocks as usize, "a block was allocated twice");
    for &entry in &entries {
        assert_eq!(
            (u64::from(entry) * 512 + 512) % 4096,
            0,
            "data area not page-aligned"
        );
    }
    let all = read_all(&*disk);
    for b in 0..blocks {
        for t in 0..2 {
            let index = b * (block / 4096) + t;
            assert_eq!(&all[index as usize * 4096..][..4096], &page(index, 1)[..]);
        }
    }
    // Closed, exactly `blocks` blocks are in the file (the space reserved
    // while open is given back): metadata (footer copy, header, one BAT
    // sector) ends at 2560; each block's data starts on the next 4 KiB
    // boundary after its 512-byte bitmap; the footer follows the last.
    drop(disk);
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, 4096 + blocks * block + (blocks - 1) * 4096 + 512);
}

#[test]
fn differencing_reads_resolve_through_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let mid = dir.path().join("mid.vhd");
    let top = dir.path().join("top.vhd");
    let size = 4u64 << 20;
    create_fixed(&base, size).unwrap();
    let mut model: Vec<u8> = (0..size).map(|i| (i / 512 % 200 + 1) as u8).collect();
    let mut io = BlockingIo::new().unwrap();
    {
        let d = VhdDisk::open(&base, &cached()).unwrap();
        io.write(&d, 0, &model).unwrap();
        io.flush(&d).unwrap();
    }
    create_differencing(&mid, &base, 1 << 20).unwrap();
    {
        let d = VhdDisk::open(&mid, &cached()).unwrap();
        // Single sectors and odd runs, across a block boundary.
        for (sector, count, fill) in [(3u64, 1u64, 0xa1u8), (2040, 20, 0xa2), (5000, 3, 0xa3)] {
            let buf = vec![fill; (count * 512) as usize];
            io.write(&d, sector, &buf).unwrap();
            model[(sector * 512) as usize..][..buf.len()].copy_from_slice(&buf);
        }
        io.flush(&d).unwrap();
        assert!(d.sector_present(3).unwrap());
        assert!(!d.sector_present(4).unwrap());
    }
    create_differencing(&top, &mid, 512 << 10).unwrap();
    let d = VhdDisk::open(&top, &cached()).unwrap();
    for (sector, count, fill) in [(2u64, 3u64, 0xb1u8), (2047, 2, 0xb2)] {
        let buf = vec![fill; (count * 512) as usize];
        io.write(&d, sector, &buf).unwrap();
        model[(sector * 512) as usize..][..buf.len()].copy_from_slice(&buf);
    }
    assert_eq!(read_all(&d), model);
    io.flush(&d).unwrap();
    drop(d);
    let d = VhdDisk::open(&top, &cached().read_only(true)).unwrap();
    assert_eq!(d.chain_paths().len(), 3);
    assert_eq!(read_all(&d), model);
    assert!(vhd::tool::check(&top).is_clean());
}

#[test]
fn merge_commits_the_child_into_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    create_dynamic(&base, 4 << 20, 1 << 20).unwrap();
    let mut io = BlockingIo::new().unwrap();
    let mut model = vec![0u8; 4 << 20];
    {
        let d = VhdDisk::open(&base, &cached()).unwrap();
        let buf = vec![0x11u8; 8192];
        io.write(&d, 100, &buf).unwrap();
        model[100 * 512..][..8192].copy_from_slice(&buf);
        io.flush(&d).unwrap();
    }
    create_differencing(&child, &base, 1 << 20).unwrap();
    {
        let d = VhdDisk::open(&child, &cached()).unwrap();
        let buf = vec![0x22u8; 1024];
        io.write(&d, 104, &buf).unwrap();
        io.write(&d, 6000, &buf).unwrap();
        model[104 * 512..][..1024].copy_from_slice(&buf);
        model[6000 * 512..][..1024].copy_from_slice(&buf);
        io.flush(&d).unwrap();
    }
    let result = vhd::tool::merge(&child, false, &mut |_, _| {}).unwrap();
    assert_eq!(result.sectors_merged, 4);
    assert!(!child.exists());
    let d = VhdDisk::open(&base, &cached().read_only(true)).unwrap();
    assert_eq!(read_all(&d), model);
}

/// The queue's owner can wait on its own POLL_ADD (a doorbell eventfd) in
/// the same ring as disk completions.
#[test]
fn doorbell_eventfd_wakes_the_queue() {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall; the returned fd is owned by `bell` below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let bell = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut queue = IoQueue::new(4).unwrap();
    let poll = io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as u32).build();
    // SAFETY: POLL_ADD references no memory; the eventfd outlives the wait.
    unsafe { queue.push_user(poll, 42) }.unwrap();
    queue.submit().unwrap();
    let mut got = Vec::new();
    queue.reap(|c| got.push(c));
    assert!(got.is_empty(), "poll completed before the doorbell rang");
    let ring = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        use std::io::Write;
        (&bell).write_all(&1u64.to_ne_bytes()).unwrap();
        bell
    });
    while got.is_empty() {
        queue.submit_and_wait().unwrap();
        queue.reap(|c| got.push(c));
    }
    assert!(
        matches!(got[0], Completion::User { tag: 42, result, .. } if result & libc::POLLIN as i32 != 0)
    );
    let bell = ring.join().unwrap();
    // Nothing in flight: waiting returns at once instead of hanging.
    queue.submit_and_wait().unwrap();
    // A doorbell that never rings: a timed wait returns after its timeout.
    let poll = io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as u32).build();
    // SAFETY: as above; `bell` (the eventfd) outlives the queue.
    unsafe { queue.push_user(poll, 43) }.unwrap();
    let mut counter = [0u8; 8];
    use std::io::Read;
    (&bell).read_exact(&mut counter).unwrap(); // consume the first ring
    let started = std::time::Instant::now();
    queue
        .submit_and_wait_timeout(std::time::Duration::from_millis(30))
        .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(25));
    assert_eq!(queue.reap(|_| {}), 0);
    // SAFETY: reserved tag bit is rejected before anything is pushed.
    let bad = unsafe { queue.push_user(io_uring::opcode::Nop::new().build(), 1 << 63) };
    assert_eq!(bad, Err(vhd::BlockError::BadTag(1 << 63)));
    drop(queue);
    drop(bell);
}

/// O_DIRECT on a real filesystem, with caller memory that is not aligned:
/// the queue bounces it and the data still round-trips.
#[test]
fn direct_io_with_unaligned_memory_bounces() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("raw.img");
    vhd::create::create_raw(&path, 1 << 20).unwrap();
    let disk = vhd::RawDisk::open(&path, &DiskOptions::default()).unwrap();
    assert!(
        disk.is_direct(),
        "target dir filesystem should support O_DIRECT"
    );
    let mut io = BlockingIo::new().unwrap();
    let mut backing = vec![0u8; 8192 + 1];
    let data = &mut backing[1..];
    data.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 253) as u8);
    let expected = data.to_vec();
    io.write(&disk, 16, data).unwrap();
    let mut back_backing = vec![0u8; 8192 + 3];
    let back = &mut back_backing[3..];
    io.read(&disk, 16, back).unwrap();
    assert_eq!(back, &expected[..]);
    io.flush(&disk).unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[16 * 512..16 * 512 + 8192], &expected[..]);
    // Discard punches a hole: the range reads zeros afterwards.
    io.discard(&disk, 16, 16).unwrap();
    io.read(&disk, 16, back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn tmpfs_falls_back_to_buffered_io_cleanly() {
    let shm = Path::new("/dev/shm");
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("d.vhd");
    create_dynamic(&path, 1 << 20, 1 << 20).unwrap();
    let disk = VhdDisk::open(&path, &DiskOptions::default()).unwrap();
    let mut io = BlockingIo::new().unwrap();
    let data = vec![0x5au8; 4096];
    io.write(&disk, 8, &data).unwrap();
    let mut back = vec![0u8; 4096];
    io.read(&disk, 8, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn raw_file_with_a_partial_last_sector() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.raw");
    std::fs::write(&path, vec![7u8; 1000]).unwrap();
    let disk = vhd::RawDisk::open(&path, &cached().read_only(true)).unwrap();
    assert_eq!(disk.info().blocks, 2);
    let mut back = vec![1u8; 1024];
    BlockingIo::new()
        .unwrap()
        .read(&disk, 0, &mut back)
        .unwrap();
    assert!(back[..1000].iter().all(|&b| b == 7));
    assert!(back[1000..].iter().all(|&b| b == 0));
}

/// Memory registered with the queue (as guest RAM would be) is used through
/// READ_FIXED/WRITE_FIXED, on registered files; other memory still works.
#[test]
fn registered_memory_and_files_are_used() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("d.vhd");
    create_dynamic(&path, 4 << 20, 1 << 20).unwrap();
    let disk = VhdDisk::open(&path, &DiskOptions::default()).unwrap();
    assert!(disk.is_direct());
    let mut queue = IoQueue::new(8).unwrap();
    let mut arena = vec![0u8; (256 << 10) + 4096];
    let skip = arena.as_ptr().align_offset(4096);
    let region = &mut arena[skip..skip + (256 << 10)];
    let whole = [libc::iovec {
        iov_base: region.as_mut_ptr().cast(),
        iov_len: region.len(),
    }];
    // SAFETY: `arena` outlives the queue's use of it: every request is
    // reaped and the memory unregistered before it is dropped.
    unsafe { queue.register_memory(&whole) }.unwrap();

    region[..64 << 10]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 241) as u8);
    let run = |queue: &mut IoQueue, op: Op, offset: u64, iov: &[libc::iovec]| {
        let blocks = (iov.iter().map(|v| v.iov_len).sum::<usize>() / 512) as u32;
        // SAFETY: the memory is valid (region or `other`) and the request is
        // reaped before this closure returns.
        let req = unsafe { Request::new(op, offset, blocks, iov, 9) };
        disk.submit(queue, req).unwrap();
        let mut results = Vec::new();
        while results.is_empty() {
            queue.submit_and_wait().unwrap();
            queue.reap(|c| results.push(c));
        }
        assert!(matches!(
            results[0],
            Completion::Request {
                tag: 9,
                result: Ok(_)
            }
        ));
    };
    let first = [libc::iovec {
        iov_base: region.as_mut_ptr().cast(),
        iov_len: 64 << 10,
    }];
    run(&mut queue, Op::Write, 2040, &first); // across a block boundary
    let second = [libc::iovec {
        iov_base: region[128 << 10..].as_mut_ptr().cast(),
        iov_len: 64 << 10,
    }];
    run(&mut queue, Op::Read, 2040, &second);
    let stats = queue.stats();
    assert_eq!(stats.fixed_buffer_sqes, 4, "{stats:?}");
    assert_eq!(stats.fixed_file_sqes, stats.sqes);
    assert_eq!(stats.inline_writes, 0, "O_DIRECT writes go to the ring");
    assert_eq!(region[..64 << 10], region[128 << 10..192 << 10]);

    // Memory outside the registration takes the ordinary path.
    let mut other = vec![0u8; 8192 + 4096];
    let skip = other.as_ptr().align_offset(4096);
    let outside = [libc::iovec {
        iov_base: other[skip..].as_mut_ptr().cast(),
        iov_len: 8192,
    }];
    run(&mut queue, Op::Read, 2040, &outside);
    assert_eq!(queue.stats().fixed_buffer_sqes, 4);
    assert_eq!(other[skip..skip + 8192], region[..8192]);
    queue.unregister_memory().unwrap();
}

/// Writers exclude each other and consistent readers through the image
/// locks; a queue lets go of a closed image's registered file (which holds
/// the locks until then), so the image can be reopened.
#[test]
fn one_writer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    create_dynamic(&path, 1 << 20, 1 << 20).unwrap();
    let quick = DiskOptions {
        lock_wait: std::time::Duration::ZERO,
        ..cached()
    };
    let in_use = |r: Result<VhdDisk, vhd::ImageError>| match r {
        Err(vhd::ImageError::Locked { conflict, .. }) => {
            assert_eq!(conflict, vhd::LockConflict::InUse(vhd::lock::Perm::Write))
        }
        other => panic!("expected a lock conflict, got {other:?}"),
    };
    let mut queue = IoQueue::new(4).unwrap();
    let first = VhdDisk::open(&path, &quick).unwrap();
    let mut buf = vec![1u8; 512];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` stays put until the completion is reaped below.
    first
        .submit(&mut queue, unsafe {
            Request::new(Op::Write, 0, 1, &iov, 1)
        })
        .unwrap();
    let mut done = false;
    while !done {
        queue.submit_and_wait().unwrap();
        queue.reap(|c| {
            done = matches!(
                c,
                Completion::Request {
                    result: Ok(512),
                    ..
                }
            )
        });
    }
    in_use(VhdDisk::open(&path, &quick));
    in_use(VhdDisk::open(&path, &quick.clone().read_only(true)));
    drop(first);
    // The queue registered the closed image's file, and with it the
    // writer's locks, until it releases closed files (each submit does).
    in_use(VhdDisk::open(&path, &quick));
    queue.release_closed_files();
    VhdDisk::open(&path, &quick).unwrap();
}

/// A worker that only polls (submit + reap, never waits) still sees O_DIRECT
/// completions, which the kernel posts through deferred task work.
#[test]
fn polling_without_waiting_sees_direct_completions() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("raw.img");
    std::fs::write(&path, vec![0x42u8; 1 << 20]).unwrap();
    let disk = vhd::RawDisk::open(&path, &DiskOptions::default()).unwrap();
    assert!(disk.is_direct());
    let mut queue = IoQueue::new(4).unwrap();
    let mut storage = vec![0u8; 8192 + 4096];
    let skip = storage.as_ptr().align_offset(4096);
    let buf = &mut storage[skip..skip + 8192];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    for round in 0..50u64 {
        // SAFETY: `buf` is reaped below before it is read or reused.
        let req = unsafe { Request::new(Op::Read, round * 16, 16, &iov, round) };
        disk.submit(&mut queue, req).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut done = false;
        while !done {
            assert!(
                std::time::Instant::now() < deadline,
                "completion never seen by polling"
            );
            queue.submit().unwrap();
            queue.reap(|c| {
                done = c
                    == Completion::Request {
                        tag: round,
                        result: Ok(8192),
                    }
            });
        }
    }
    assert!(buf.iter().all(|&b| b == 0x42));
}

/// Buffered whole-page writes complete inline (no SQE) and are reported
/// through the queue like any other; a partial-page write and O_DIRECT go
/// to the ring; a write spanning two VHD blocks is two inline writes, and
/// a 64 KiB read over contiguous memory is one SQE, not sixteen.
#[test]
fn buffered_whole_pages_are_written_inline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    create_dynamic(&path, 4 << 20, 1 << 20).unwrap();
    let disk = VhdDisk::open(&path, &cached()).unwrap();
    let mut queue = IoQueue::new(4).unwrap();
    let data = page(3, 1).repeat(16);
    // Requests arrive as one iovec per 4 KiB page, as a VSP builds them
    // from a guest's page list.
    let run = |queue: &mut IoQueue, op: Op, sector: u64, len: usize, buf: *mut u8| {
        let iov: Vec<libc::iovec> = (0..len.div_ceil(4096))
            .map(|i| libc::iovec {
                iov_base: buf.wrapping_add(i * 4096).cast(),
                iov_len: (len - i * 4096).min(4096),
            })
            .collect();
        // SAFETY: `buf` points into a live test buffer of at least `len`
        // bytes, and the request is reaped before this closure returns.
        let req = unsafe { Request::new(op, sector, (len / 512) as u32, &iov, 5) };
        disk.submit(queue, req).unwrap();
        let mut results = Vec::new();
        while results.is_empty() {
            queue.submit_and_wait().unwrap();
            queue.reap(|c| results.push(c));
        }
        assert_eq!(
            results,
            [Completion::Request {
                tag: 5,
                result: Ok(len as u32)
            }]
        );
    };
    // 64 KiB across the boundary of blocks 0 and 1: two whole-page pieces.
    let across = 2048 - 64;
    run(
        &mut queue,
        Op::Write,
        across,
        64 << 10,
        data.as_ptr().cast_mut(),
    );
    assert_eq!(queue.stats().inline_writes, 2);
    assert_eq!(queue.stats().sqes, 0);
    // A partial page goes to the ring.
    run(&mut queue, Op::Write, 3000, 512, data.as_ptr().cast_mut());
    assert_eq!(queue.stats().inline_writes, 2);
    assert_eq!(queue.stats().sqes, 1);
    // Contiguous pages merge into one segment: inside registered memory,
    // that is one READ_FIXED per block.
    let mut back = vec![0u8; 64 << 10];
    let region = [libc::iovec {
        iov_base: back.as_mut_ptr().cast(),
        iov_len: back.len(),
    }];
    // SAFETY: `back` outlives the registration, dropped below.
    unsafe { queue.register_memory(&region) }.unwrap();
    run(&mut queue, Op::Read, across, 64 << 10, back.as_mut_ptr());
    queue.unregister_memory().unwrap();
    assert_eq!(queue.stats().sqes, 3);
    assert_eq!(queue.stats().fixed_buffer_sqes, 2, "one segment per block");
    assert_eq!(back, data);
    let all = read_all(&disk);
    assert_eq!(all[3000 * 512..3001 * 512], data[..512]);
}
