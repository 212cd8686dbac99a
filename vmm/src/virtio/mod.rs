//! virtio-mmio fallback devices (filled in below).
