//! Hyper-V compatible VMBus.
