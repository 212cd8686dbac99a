//! The network VSP and the virtual switch.
//!
//! Place in the data path: a VSC's netvsc driver sends RNDIS packets over a
//! VMBus channel to a netvsp port; the switch core learns MACs, applies VLAN,
//! security, ACL and QoS policy and forwards frames as `bytes` buffers to other
//! ports (netvsp, host tap devices, an internal smoltcp stack, mirrors).
//!
//! This crate is filled in by the switch issue; until then it only reserves
//! its place in the workspace.
#![forbid(unsafe_code)]
