//! Hyper-V compatible VMBus.
pub mod guid;
pub mod memory;
pub mod ring;
pub mod wire;

pub use guid::Guid;
pub use memory::{MemoryError, SharedMemory, SharedSlice};
