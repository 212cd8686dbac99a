//! The channel-management state machine on arbitrary message sequences.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmbus::fuzz::channel_messages(data);
});
