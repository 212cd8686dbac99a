//! The NBD server (handshake and request parser) on arbitrary client bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    storage::nbd::fuzz::server_session(data);
});
