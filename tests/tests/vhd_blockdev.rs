//! Passthrough of a host block device (a loop device): size by
//! BLKGETSIZE64, O_DIRECT with unaligned caller memory, BLKDISCARD, and
//! read-only mode.

use std::path::PathBuf;
use std::process::Command;
use vhd::{BlockDevice, BlockError, BlockingIo, DiskOptions, RawDisk};
use vspa_tests::require_tool;

/// Detaches the loop device when dropped.
struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn host_block_device_passthrough() {
    require_tool("losetup");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    std::fs::write(&backing, vec![0xeeu8; 16 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()));

    let disk = RawDisk::open(&device.0, &DiskOptions::default()).unwrap();
    assert_eq!(disk.info().blocks, (16 << 20) / 512);
    assert!(disk.is_direct(), "loop devices support O_DIRECT");
    assert!(disk.info().supports_discard);

    let mut io = BlockingIo::new().unwrap();
    let mut storage = vec![0u8; 64 * 1024 + 1];
    let data = &mut storage[1..]; // deliberately unaligned: bounced
    data.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 249) as u8);
    let expected = data.to_vec();
    io.write(&disk, 2048, data).unwrap();
    io.flush(&disk).unwrap();
    let mut back = vec![0u8; 64 * 1024];
    io.read(&disk, 2048, &mut back).unwrap();
    assert_eq!(back, expected);

    // BLKDISCARD on a loop device punches the backing file: zeros read back.
    io.discard(&disk, 2048, 128).unwrap();
    io.read(&disk, 2048, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    io.read(&disk, 0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0xee));

    drop(disk); // a reader cannot open beside the writer
    let ro = RawDisk::open(&device.0, &DiskOptions::default().read_only(true)).unwrap();
    assert!(ro.info().read_only);
    assert_eq!(io.write(&ro, 0, &back), Err(BlockError::ReadOnly));
    assert_eq!(io.discard(&ro, 0, 8), Err(BlockError::ReadOnly));
}
