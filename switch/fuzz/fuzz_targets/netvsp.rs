//! Fuzzes the network VSP: NVSP packets (in-band, GPA-direct, completions),
//! send-buffer sections full of RNDIS messages, and frames towards the
//! guest, run through the real NIC code over private rings after a valid
//! initialisation; plus RNDIS parsing on its own. Nothing may panic, and
//! everything the host writes back must be well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switch::netvsp::fuzz::rndis(data);
    switch::netvsp::fuzz::packets(data);
});
