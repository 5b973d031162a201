//! switchboard: a horizontally scalable WebRTC signaling relay.
//!
//! # Layout
//!
//! A peer's signaling follows the file names:
//!
//! ```text
//! socket ─▶ routes::ws ─▶ session::reader ─▶ session ─▶ broker (publish) ─▶ Redis channel {prefix}:pair:{lower}:{higher}
//!                                                                           │
//! socket ◀─ session::writer ◀─ session::handle ◀─ registry ◀─ broker (subscribe) ◀┘
//! ```
//!
//! - [`config`]: settings from defaults, a TOML file and `SWITCHBOARD_*` variables.
//! - [`app`]: the router and [`app::run`], which serves a listener until shutdown.
//! - [`routes`]: `/ws` (query checks and the upgrade), health probes, page files.
//! - [`pair`]: user IDs, pairs, channel and key names.
//! - [`protocol`]: client frame checks, server events, close codes.
//! - [`session`]: one socket in one task: setup, then a loop that reads
//!   frames (from `session::reader`, which holds no buffer while the client
//!   is quiet) and writes what the outbox in `session::handle` collected (as
//!   one batch per write, built by `session::writer`), then cleanup.
//!   `session::wire` holds the RFC 6455 framing both sides need.
//! - [`broker`]: the [`broker::Broker`] trait, the in-memory broker, the Redis broker
//!   and the envelope that carries the sender's identity next to the client's bytes.
//! - [`metrics`]: Prometheus series at `/metrics`.
//! - [`registry`]: which local sessions belong to which pair channel; fans out
//!   what the broker receives without ever waiting on a socket.
//! - [`presence`]: one task per instance that keeps every local session's
//!   presence alive and reports peers whose replica died.
//! - [`heartbeat`]: one task per instance that pings silent sockets and closes
//!   those that stay silent.
//! - [`auth`], [`origin`], [`turn`]: signed links, the `Origin` check, and
//!   TURN credentials (see `docs/security.md`).

pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod error;
pub mod metrics;
pub mod origin;
pub mod pair;
pub mod protocol;
pub mod routes;
pub mod session;
pub mod state;
pub mod telemetry;
pub mod turn;
