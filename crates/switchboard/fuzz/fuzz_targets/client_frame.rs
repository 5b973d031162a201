#![no_main]
//! `cargo +nightly fuzz run client_frame`: see docs/security.md.

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchboard_fuzz::harness::client_frame(data));
