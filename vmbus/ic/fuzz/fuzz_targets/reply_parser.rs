//! The IC reply checks (common header, negotiation, each service's body)
//! on damaged and arbitrary replies.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ic::fuzz::reply_parser(data);
});
