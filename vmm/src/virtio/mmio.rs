//! The virtio-mmio transport (virtio 1.x, register layout version 2) as a
//! device model: registers, feature negotiation, queue setup, notify and
//! interrupt status. The device behind it is a [`VirtioBackend`].
//!
//! Every value the driver writes is validated: queue sizes must be powers
//! of two up to the maximum, rings must lie in guest memory, selectors out
//! of range are ignored; a backend's queue is only used once the driver
//! set DRIVER_OK and the queue is valid.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::devices::MmioDevice;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt"
pub const MAGIC: u32 = 0x7472_6976;
/// "VSPA"
pub const VENDOR: u32 = 0x4150_5356;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: a used buffer was added.
pub const INT_USED_RING: u32 = 1;

/// A virtio device behind the MMIO transport.
pub trait VirtioBackend: Send + std::fmt::Debug {
    /// virtio device id (2 = block, 1 = net).
    fn device_type(&self) -> u32;
    /// Offered feature bits (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver accepted these features.
    fn set_driver_features(&mut self, _features: u64) {}
    /// Processes queue `index` after a notify (or a poll). Returns true if
    /// used buffers were added (the driver should be interrupted).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// Device-initiated work (e.g. received frames); default: none.
    fn poll(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// Device-initiated work while the driver is not running: dropped.
    fn discard(&mut self) {}
    /// The device's poll thread is about to sleep: false if work is
    /// already waiting (poll again instead). Default: sleep.
    fn prepare_sleep(&mut self) -> bool {
        true
    }
    /// The poll thread woke up.
    fn woke(&mut self) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// How a device interrupts its driver.
pub type InterruptFn = Arc<dyn Fn() + Send + Sync>;

#[derive(Debug)]
struct State {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    interrupt_status: u32,
    config_generation: u32,
}

/// A virtio-mmio device: transport registers + backend.
pub struct VirtioMmio {
    mem: Arc<GuestMemoryMmap>,
    state: Mutex<(State, Box<dyn VirtioBackend>)>,
    interrupt: InterruptFn,
}

impl std::fmt::Debug for VirtioMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio").finish_non_exhaustive()
    }
}

impl VirtioMmio {
    pub fn new(
        backend: Box<dyn VirtioBackend>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: InterruptFn,
    ) -> Self {
        let queues = backend
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("backend queue sizes are powers of two"))
            .collect();
        VirtioMmio {
            mem,
            state: Mutex::new((
                State {
                    status: 0,
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    driver_features: 0,
                    queue_sel: 0,
                    queues,
                    interrupt_status: 0,
                    config_generation: 0,
                },
                backend,
            )),
            interrupt,
        }
    }

    /// Runs the backend's device-initiated work (received frames); call
    /// when the backend has something (its fd became readable). Work that
    /// arrives while the driver is not running is dropped.
    pub fn poll(&self) {
        let mut guard = self.state.lock().expect("virtio state");
        let (state, backend) = &mut *guard;
        if state.status & status::DRIVER_OK == 0 || state.status & status::FAILED != 0 {
            backend.discard();
            return;
        }
        if backend.poll(&mut state.queues, &self.mem) {
            state.interrupt_status |= INT_USED_RING;
            drop(guard);
            (self.interrupt)();
        }
    }

    /// For a poll thread after [`VirtioMmio::poll`]: true if it may sleep
    /// on the backend's descriptors (see [`VirtioBackend::prepare_sleep`]).
    pub fn prepare_sleep(&self) -> bool {
        self.state.lock().expect("virtio state").1.prepare_sleep()
    }

    /// For a poll thread: it woke up.
    pub fn woke(&self) {
        self.state.lock().expect("virtio state").1.woke();
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let guard = self.state.lock().expect("virtio state");
        let (s, backend) = &*guard;
        let q = s.queues.get(s.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => backend.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match s.device_features_sel {
                0 => backend.features() as u32,
                1 => (backend.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => s.interrupt_status,
            reg::STATUS => s.status,
            reg::CONFIG_GENERATION => s.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&self, offset: u64, value: u32) {
        let mut guard = self.state.lock().expect("virtio state");
        let (s, backend) = &mut *guard;
        match offset {
            reg::DEVICE_FEATURES_SEL => s.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => s.driver_features_sel = value,
            reg::DRIVER_FEATURES if s.status & status::FEATURES_OK == 0 => {
                // Only features the device offered can be accepted.
                let offered = backend.features();
                match s.driver_features_sel {
                    0 => {
                        s.driver_features =
                            (s.driver_features & !0xffff_ffff) | u64::from(value) & offered;
                    }
                    1 => {
                        s.driver_features =
                            (s.driver_features & 0xffff_ffff) | (u64::from(value) << 32) & offered;
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => s.queue_sel = value,
            reg::QUEUE_NOTIFY => {
                let index = value as usize;
                drop(guard);
                self.notify(index);
            }
            reg::INTERRUPT_ACK => s.interrupt_status &= !value,
            reg::STATUS => self.write_status(s, backend.as_mut(), value),
            _ => self.write_queue_reg(s, offset, value),
        }
    }

    fn write_status(&self, s: &mut State, backend: &mut dyn VirtioBackend, value: u32) {
        if value == 0 {
            s.status = 0;
            s.driver_features = 0;
            s.interrupt_status = 0;
            s.queues.iter_mut().for_each(|q| q.reset());
            backend.reset();
            return;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && s.status & status::FEATURES_OK == 0 {
            // virtio 1.x devices refuse drivers that do not accept VERSION_1.
            if s.driver_features & super::VIRTIO_F_VERSION_1 == 0 {
                value &= !status::FEATURES_OK;
            } else {
                backend.set_driver_features(s.driver_features);
            }
        }
        s.status = value;
    }

    /// Queue configuration registers, writable only before the queue is
    /// ready.
    fn write_queue_reg(&self, s: &mut State, offset: u64, value: u32) {
        let Some(q) = s.queues.get_mut(s.queue_sel as usize) else {
            return;
        };
        if offset == reg::QUEUE_READY {
            // A queue becomes ready only if its rings lie in guest memory.
            q.set_ready(value == 1);
            if value == 1 && !q.is_valid(&*self.mem) {
                tracing::warn!("virtio queue rings outside guest memory; queue stays off");
                q.set_ready(false);
            }
            return;
        }
        if q.ready() {
            return;
        }
        match offset {
            reg::QUEUE_NUM => {
                let n = value as u16;
                if u32::from(n) == value && n.is_power_of_two() && n <= q.max_size() {
                    q.set_size(n);
                }
            }
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// The driver notified queue `index`.
    pub fn notify(&self, index: usize) {
        let mut guard = self.state.lock().expect("virtio state");
        let (s, backend) = &mut *guard;
        if s.status & status::DRIVER_OK == 0 || s.status & status::FAILED != 0 {
            return;
        }
        let Some(q) = s.queues.get_mut(index) else {
            return;
        };
        if !q.ready() {
            return;
        }
        if backend.process_queue(index, q, &self.mem) {
            s.interrupt_status |= INT_USED_RING;
            drop(guard);
            (self.interrupt)();
        }
    }
}

impl MmioDevice for VirtioMmio {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            let guard = self.state.lock().expect("virtio state");
            guard.1.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and must be read as such.
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            return; // no writable configuration fields
        }
        if let Ok(b) = <[u8; 4]>::try_from(data)
            && offset.is_multiple_of(4)
        {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

/// Copies `src` into `data` at `offset` of a config space image.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(off..off.saturating_add(data.len())) {
        data.copy_from_slice(src);
    }
}
