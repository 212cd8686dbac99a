//! Hyper-V compatible VMBus.
pub mod channel;
pub mod echo;
pub mod event;
pub mod gpadl;
pub mod guid;
pub mod hosted;
pub mod memory;
pub mod packet;
pub mod ring;
pub mod server;
pub mod wire;

pub use guid::Guid;
pub use memory::{MemoryError, SharedMemory, SharedSlice};
