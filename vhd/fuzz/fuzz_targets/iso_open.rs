//! ISO 9660 open (volume descriptors, root directory) of arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhd::fuzzing::iso_open(data);
});
