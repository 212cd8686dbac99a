//! Restricted rings (the sandbox's io_uring layer): the kernel refuses
//! every opcode and SQE flag the allow-list leaves out and every register
//! call once the ring runs, while images are still served through the
//! registered-file table (kept with FILES_UPDATE SQEs) and a closed image's
//! file is let go, so its lock is free again.
// Owner SQEs, requests over test buffers and a raw register call.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};
use vhd::{BlockDevice, Completion, DiskOptions, IoQueue, Op, QueueConfig, RawDisk, Request};

fn restricted(slots: u32) -> IoQueue {
    let queue = IoQueue::with_config(QueueConfig {
        slots,
        ring_entries: 16,
        registered_files: 8,
        restricted: true,
        socket_io: false,
    })
    .expect("restricted io_uring rings (Linux 5.10 or later)");
    assert!(queue.is_restricted());
    queue
}

/// Runs owner SQEs and returns their results by tag.
fn results(queue: &mut IoQueue, count: usize) -> Vec<(u64, i32)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        queue.submit_and_wait().unwrap();
        queue.reap(|c| {
            if let Completion::User { tag, result, .. } = c {
                seen.push((tag, result));
            }
        });
    }
    seen.sort();
    seen
}

#[test]
fn other_opcodes_flags_and_register_calls_get_eacces() {
    let mut queue = restricted(4);
    let file = tempfile::tempfile().unwrap();
    std::fs::write(format!("/proc/self/fd/{}", file.as_raw_fd()), [7u8; 8]).unwrap();
    let mut buf = [0u8; 8];
    let path = c"/etc/hostname";
    let read = || opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_ptr().cast_mut(), 8);
    // SAFETY: every SQE's memory (`buf`, `path`) outlives its reaping below.
    unsafe {
        queue.push_user(opcode::Nop::new().build(), 1).unwrap();
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr());
        queue.push_user(open.build(), 2).unwrap();
        let drained = read().build().flags(squeue::Flags::IO_DRAIN);
        queue.push_user(drained, 3).unwrap();
        queue.push_user(read().offset(0).build(), 4).unwrap();
    }
    let eacces = -libc::EACCES;
    assert_eq!(
        results(&mut queue, 4),
        [(1, eacces), (2, eacces), (3, eacces), (4, 8)]
    );
    assert_eq!(buf, [7u8; 8], "the allowed read ran");

    // No register opcode is allowed once the ring runs.
    let fds = [file.as_raw_fd()];
    // SAFETY: IORING_REGISTER_FILES_UPDATE with a valid update struct.
    let rc = unsafe {
        let update = [0u64, fds.as_ptr() as u64];
        libc::syscall(
            libc::SYS_io_uring_register,
            queue.ring_fd(),
            6u32, // IORING_REGISTER_FILES_UPDATE
            update.as_ptr(),
            1u32,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EACCES)
    );
    let region = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: nothing gets registered (the call is refused).
    assert!(unsafe { queue.register_memory(&region) }.is_err());
}

#[test]
fn images_are_served_on_registered_files_and_closed_ones_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let quick = DiskOptions {
        lock_wait: std::time::Duration::ZERO,
        ..DiskOptions::default().cache(vhd::CacheMode::Cached)
    };
    let mut queue = restricted(4);
    let run = |queue: &mut IoQueue, disk: &dyn BlockDevice, op: Op, buf: &mut [u8]| {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` outlives the request, which is reaped here.
        let req = unsafe { Request::new(op, 3, (buf.len() / 512) as u32, &iov, 5) };
        disk.submit(queue, req).unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            queue.submit_and_wait().unwrap();
            queue.reap(|c| done.push(c));
        }
        assert!(
            matches!(
                done[0],
                Completion::Request {
                    tag: 5,
                    result: Ok(_)
                }
            ),
            "{done:?}"
        );
    };
    let disk = RawDisk::open(&path, &quick).unwrap();
    let mut data: Vec<u8> = (0..4096).map(|i| (i % 253) as u8).collect();
    run(&mut queue, &disk, Op::Write, &mut data);
    let mut back = vec![0u8; 4096];
    run(&mut queue, &disk, Op::Read, &mut back);
    assert!(back == data, "read back what was written");
    let stats = queue.stats();
    assert!(stats.fixed_file_sqes > 0, "{stats:?}");
    assert!(matches!(
        RawDisk::open(&path, &quick),
        Err(vhd::ImageError::Locked { .. })
    ));
    drop(disk);
    // The ring held the closed image's file; an idle sweep lets it go.
    queue.release_closed_files();
    let reopened = RawDisk::open(&path, &quick).unwrap();
    let mut again = vec![0u8; 4096];
    run(&mut queue, &reopened, Op::Read, &mut again);
    assert!(again == data, "the reopened image holds the data");
}
