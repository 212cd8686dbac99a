//! VHDX open (full validation, log replay in memory and on disk), reads,
//! check, info, and a write with a metadata flush, on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhd::fuzzing::vhdx_open_and_read(data);
});
