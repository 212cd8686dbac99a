//! The NBD client's reply decoder on arbitrary server bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhd::nbd::fuzzing::client_replies(data);
});
