//! HTTP handlers.

pub mod assets;
pub mod health;
pub mod ws;
