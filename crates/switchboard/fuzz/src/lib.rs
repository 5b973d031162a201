//! Fuzz harnesses for switchboard. The checks live in `harness.rs`, which the
//! switchboard crate's `tests/fuzz_seeds.rs` also compiles, so the seed inputs
//! in `seeds/` run on stable with every `cargo test`.

#[path = "harness.rs"]
pub mod harness;
