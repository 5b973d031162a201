#![no_main]
//! `cargo +nightly fuzz run frames`: see docs/security.md.

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchboard_fuzz::harness::frames(data));
