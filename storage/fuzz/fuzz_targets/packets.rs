//! vstor packets and SCSI CDBs through the real storage worker.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = storage::fuzz::packets(data);
});
