//! VHD open (full validation) and reads of arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhd::fuzzing::vhd_open_and_read(data);
});
