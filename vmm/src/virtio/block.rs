//! virtio-blk over a [`BlockBackend`]: read, write, flush and get-id
//! requests, each validated against the disk size and guest memory.

use std::io::{Read, Write};
use std::sync::Arc;

use vhd::BlockingIo;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::VIRTIO_F_VERSION_1;
use super::mmio::{VirtioBackend, read_config_bytes};

pub const SECTOR: u64 = 512;
/// Request types and status values (virtio spec 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Feature bits.
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_TOPOLOGY: u64 = 1 << 10;

const QUEUE_SIZE: u16 = 256;
/// Bytes moved per backend call.
const CHUNK: usize = 64 << 10;

/// Where a block device's bytes live: [`ImageDisk`] serves every image
/// the `vhd` crate opens (raw files and block devices, VHD fixed, dynamic
/// and differencing), the same backends the storage VSP uses.
pub trait BlockBackend: Send + std::fmt::Debug {
    /// Size in bytes (a multiple of the block size).
    fn size(&self) -> u64;
    /// Logical block size: 512 or 4096. Requests (in 512-byte sectors)
    /// must be whole blocks.
    fn block_size(&self) -> u32 {
        SECTOR as u32
    }
    /// Physical block size (an alignment hint for the driver).
    fn physical_block_size(&self) -> u32 {
        self.block_size()
    }
    fn read_only(&self) -> bool;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
}

/// A `vhd` block device (512 or 4096-byte blocks) as a virtio-blk backend. Requests
/// run one at a time on a private io_uring: this is the fallback path for
/// guests without VMBus drivers, not the data path.
#[derive(Debug)]
pub struct ImageDisk {
    device: Arc<dyn vhd::BlockDevice>,
    io: BlockingIo,
}

/// An image a virtio disk cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ImageDiskError {
    #[error(transparent)]
    Image(#[from] vhd::ImageError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "image has {0}-byte blocks; virtio-blk serves 512 and 4096-byte disks (use a SCSI DVD for ISO media)"
    )]
    BlockSize(u32),
    #[error("image is smaller than one sector")]
    Empty,
}

impl ImageDisk {
    /// Opens any image `vhd` knows (format detected), page-cached.
    pub fn open(path: &std::path::Path, read_only: bool) -> Result<Self, ImageDiskError> {
        let options = vhd::DiskOptions::default()
            .read_only(read_only)
            .cache(vhd::CacheMode::Cached);
        Self::new(vhd::open_by_name(path, &options)?)
    }

    pub fn new(device: Arc<dyn vhd::BlockDevice>) -> Result<Self, ImageDiskError> {
        let info = device.info();
        if info.block_size != 512 && info.block_size != 4096 {
            return Err(ImageDiskError::BlockSize(info.block_size));
        }
        if info.blocks == 0 {
            return Err(ImageDiskError::Empty);
        }
        Ok(ImageDisk {
            device,
            io: BlockingIo::new()?,
        })
    }
}

fn io_error(e: vhd::BlockError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl BlockBackend for ImageDisk {
    fn size(&self) -> u64 {
        self.device.info().size()
    }
    fn read_only(&self) -> bool {
        self.device.info().read_only
    }
    fn block_size(&self) -> u32 {
        self.device.info().block_size
    }
    fn physical_block_size(&self) -> u32 {
        self.device.physical_block_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let block = u64::from(self.block_size());
        self.io
            .read(&*self.device, offset / block, buf)
            .map_err(io_error)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let block = u64::from(self.block_size());
        self.io
            .write(&*self.device, offset / block, buf)
            .map_err(io_error)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.io.flush(&*self.device).map_err(io_error)
    }
}

/// The virtio-blk device model.
#[derive(Debug)]
pub struct VirtioBlock {
    disk: Box<dyn BlockBackend>,
    id: [u8; 20],
    sizes: [u16; 1],
    scratch: Vec<u8>,
}

impl VirtioBlock {
    pub fn new(disk: Box<dyn BlockBackend>, id: &str) -> Self {
        let mut serial = [0u8; 20];
        let n = id.len().min(20);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        VirtioBlock {
            disk,
            id: serial,
            sizes: [QUEUE_SIZE],
            scratch: vec![0; CHUNK],
        }
    }

    /// Runs one request; returns its status and the bytes written to the
    /// driver's buffers.
    fn request(
        &mut self,
        reader: &mut virtio_queue::Reader<'_>,
        data: &mut virtio_queue::Writer<'_>,
    ) -> (u8, u32) {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes(header[..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(header[8..].try_into().expect("8"));
        match kind {
            T_IN => self.transfer_in(sector, data),
            T_OUT => (self.transfer_out(sector, reader), 0),
            T_FLUSH => (
                if self.disk.flush().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                },
                0,
            ),
            T_GET_ID => match data.write_all(&self.id[..data.available_bytes().min(20)]) {
                Ok(()) => (S_OK, data.bytes_written() as u32),
                Err(_) => (S_IOERR, 0),
            },
            _ => (S_UNSUPP, 0),
        }
    }

    /// Checks that `len` bytes from `sector` are whole blocks on the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let block = u64::from(self.disk.block_size());
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len as u64)?;
        let whole = offset.is_multiple_of(block) && (len as u64).is_multiple_of(block);
        (whole && end <= self.disk.size()).then_some(offset)
    }

    fn transfer_in(&mut self, sector: u64, data: &mut virtio_queue::Writer<'_>) -> (u8, u32) {
        let len = data.available_bytes();
        let Some(mut offset) = self.range(sector, len) else {
            return (S_IOERR, 0);
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = &mut self.scratch[..n];
            if self.disk.read_at(offset, buf).is_err() || data.write_all(buf).is_err() {
                return (S_IOERR, data.bytes_written() as u32);
            }
            offset += n as u64;
            left -= n;
        }
        (S_OK, len as u32)
    }

    fn transfer_out(&mut self, sector: u64, reader: &mut virtio_queue::Reader<'_>) -> u8 {
        if self.disk.read_only() {
            return S_IOERR;
        }
        let len = reader.available_bytes();
        let Some(mut offset) = self.range(sector, len) else {
            return S_IOERR;
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = &mut self.scratch[..n];
            if reader.read_exact(buf).is_err() || self.disk.write_at(offset, buf).is_err() {
                return S_IOERR;
            }
            offset += n as u64;
            left -= n;
        }
        S_OK
    }
}

impl VirtioBackend for VirtioBlock {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.read_only() { F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | F_FLUSH | F_BLK_SIZE | F_TOPOLOGY | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64, in 512-byte sectors) at
        // 0, blk_size (u32) at 20, then the topology: physical block
        // exponent (u8) at 24, alignment offset, min_io_size (u16, in
        // blocks) at 26 and opt_io_size (u32, in blocks) at 28.
        let mut config = [0u8; 32];
        config[..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        let block = self.disk.block_size();
        config[20..24].copy_from_slice(&block.to_le_bytes());
        let per_physical = (self.disk.physical_block_size() / block.max(1)).max(1);
        config[24] = per_physical.trailing_zeros() as u8;
        config[26..28].copy_from_slice(&(per_physical as u16).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (status, written) = match (chain.clone().reader(mem), chain.writer(mem)) {
                (Ok(mut reader), Ok(mut writer)) => {
                    let total = writer.available_bytes();
                    match total.checked_sub(1).map(|n| writer.split_at(n)) {
                        Some(Ok(mut status_writer)) => {
                            let (s, n) = self.request(&mut reader, &mut writer);
                            let ok = status_writer.write_all(&[s]).is_ok();
                            (ok, n + u32::from(ok))
                        }
                        _ => (false, 0),
                    }
                }
                _ => (false, 0),
            };
            if !status {
                tracing::debug!(head, "malformed virtio-blk request");
            }
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}
