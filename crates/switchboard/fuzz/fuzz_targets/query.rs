#![no_main]
//! `cargo +nightly fuzz run query`: see docs/security.md.

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchboard_fuzz::harness::query(data));
