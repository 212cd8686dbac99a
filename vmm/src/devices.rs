//! Legacy port-I/O devices: the COM1 16550 UART (`vm-superio`; output to
//! the console, input fed through [`LegacyDevices::serial_input`]), an
//! i8042 whose CPU-reset command ends the VM cleanly, and the 0xcf9 reset
//! register. Unclaimed ports read as all ones and ignore writes.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{I8042_COMMAND, I8042_DATA, RESET_CONTROL, SERIAL_PORT};

/// Interrupt line of a device: an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Raised when the guest asks for a reset (i8042 0xfe, or 0xcf9).
#[derive(Clone)]
pub struct ResetLine(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ResetLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetLine")
    }
}

/// A device in the MMIO space (virtio-mmio transports).
pub trait MmioDevice: Send + Sync + std::fmt::Debug {
    /// Reads `data.len()` bytes at `offset` into the device's window.
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
    /// Writes at `offset` into the device's window.
    fn mmio_write(&self, offset: u64, data: &[u8]);
}

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// Where the serial console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The legacy devices on the port-I/O bus.
pub struct LegacyDevices {
    serial: Mutex<Serial<IrqLine, NoEvents, ConsoleOut>>,
    i8042: Mutex<I8042Device<ResetLine>>,
    reset: ResetLine,
}

impl std::fmt::Debug for LegacyDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyDevices").finish_non_exhaustive()
    }
}

impl LegacyDevices {
    pub fn new(serial_irq: EventFd, console: ConsoleOut, reset: ResetLine) -> Self {
        LegacyDevices {
            serial: Mutex::new(Serial::new(IrqLine(serial_irq), console)),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
        }
    }

    /// Queues console input in the UART's receive FIFO (raising its
    /// interrupt if the guest enabled it); returns how many bytes fit. The
    /// rest must wait until the guest has read some.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        let mut serial = self.serial.lock().expect("serial");
        let n = bytes.len().min(serial.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input: {e:?}");
                0
            }
        }
    }

    /// Handles a port read; false if no device claims the port.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        data.fill(0xff);
        match port {
            SERIAL_PORT..=0x3ff if data.len() == 1 => {
                let off = (port - SERIAL_PORT) as u8;
                data[0] = self.serial.lock().expect("serial").read(off);
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                data[0] = self
                    .i8042
                    .lock()
                    .expect("i8042")
                    .read((port - I8042_DATA) as u8);
            }
            // CMOS/RTC absent: reading 0 keeps "update in progress" clear.
            0x70 | 0x71 => data.fill(0),
            _ => return false,
        }
        true
    }

    /// Handles a port write; false if no device claims the port.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            SERIAL_PORT..=0x3ff if data.len() == 1 => {
                let off = (port - SERIAL_PORT) as u8;
                let mut serial = self.serial.lock().expect("serial");
                if let Err(e) = serial.write(off, data[0]) {
                    tracing::debug!("serial write: {e:?}");
                }
                if off == 0 {
                    let _ = serial.writer_mut().flush();
                }
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                let _ = self
                    .i8042
                    .lock()
                    .expect("i8042")
                    .write((port - I8042_DATA) as u8, data[0]);
            }
            RESET_CONTROL if data.len() == 1 => {
                // Bit 2 starts the reset (0x6 soft, 0xe hard).
                if data[0] & 0x4 != 0 {
                    let _ = self.reset.trigger();
                }
            }
            _ => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_and_reset_lines() {
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = LegacyDevices::new(
            irq.try_clone().unwrap(),
            Box::new(sink.clone()),
            ResetLine(Arc::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })),
        );
        for b in b"hi" {
            assert!(dev.pio_write(0x3f8, &[*b]));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        let mut lsr = [0u8];
        assert!(dev.pio_read(0x3fd, &mut lsr));
        assert_ne!(lsr[0] & 0x20, 0, "transmit holding register empty");
        assert!(dev.pio_write(0x64, &[0xfe]));
        assert!(dev.pio_write(0xcf9, &[0x06]));
        assert!(dev.pio_write(0xcf9, &[0x02]));
        assert_eq!(resets.load(Ordering::SeqCst), 2);
        let mut x = [0u8; 2];
        assert!(!dev.pio_read(0x1234, &mut x));
        assert_eq!(x, [0xff, 0xff]);
    }

    fn read_port(dev: &LegacyDevices, port: u16) -> u8 {
        let mut b = [0u8];
        assert!(dev.pio_read(port, &mut b));
        b[0]
    }

    #[test]
    fn serial_input_fills_the_receive_fifo_and_interrupts() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = LegacyDevices::new(
            irq.try_clone().unwrap(),
            Box::new(std::io::sink()),
            ResetLine(Arc::new(|| {})),
        );
        // Nothing received yet: LSR data-ready clear.
        assert_eq!(read_port(&dev, 0x3fd) & 1, 0);
        // The guest enables the received-data interrupt (IER bit 0) and
        // OUT2 (MCR bit 3), as Linux's 8250 driver does.
        assert!(dev.pio_write(0x3f9, &[0x01]));
        assert!(dev.pio_write(0x3fc, &[0x08]));
        let line: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        // The 16550's FIFO holds 64 bytes; the rest waits.
        assert_eq!(dev.serial_input(&line), 64);
        assert_eq!(dev.serial_input(&line[64..]), 0);
        assert_eq!(irq.read().unwrap(), 1, "received-data interrupt");
        assert_eq!(read_port(&dev, 0x3fd) & 1, 1, "data ready");
        for (i, want) in line[..10].iter().enumerate() {
            assert_eq!(read_port(&dev, 0x3f8), *want, "byte {i}");
        }
        // Room again: the rest goes in, in order.
        assert_eq!(dev.serial_input(&line[64..74]), 10);
        for want in &line[10..74] {
            assert_eq!(read_port(&dev, 0x3f8), *want);
        }
        assert_eq!(read_port(&dev, 0x3fd) & 1, 0, "drained");
    }
}
