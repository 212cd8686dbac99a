//! Ring reader and packet parsers on arbitrary ring contents.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmbus::fuzz::ring_reader(data);
});
