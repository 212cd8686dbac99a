//! Fuzzes VXLAN decapsulation: arbitrary bytes arrive at a real VXLAN port
//! as a datagram or a UDP GRO batch (see `switch::vxlan::fuzz`). Nothing
//! may panic; every datagram ends as a frame for the switch or a counted
//! drop.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switch::vxlan::fuzz::decap(data);
});
