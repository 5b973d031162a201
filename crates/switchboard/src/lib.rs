//! switchboard: a horizontally scalable WebRTC signaling relay.
//!
//! # Layout
//!
//! A peer's signaling follows the file names:
//!
//! ```text
//! socket ─▶ app (accept) ─▶ routes::ws ─▶ session (the task) ─▶ session::reader + wire ─▶ session::frames
//!   ─▶ session::limits ─▶ protocol (check) ─▶ broker::envelope ─▶ broker::lanes ─▶ Redis channel {prefix}:pair:{lower}:{higher}
//!                                                                        (cluster: {prefix}:{p<partition>}:pair:…)  │
//! socket ◀─ session::writer + wire ◀─ session::outbox ◀─ session::handle ◀─ session::registry ◀─ broker::node ◀──────┘
//!                                                         (broker::subscriber places each channel on a node; broker::pubsub is the connection)
//! ```
//!
//! Floors run one way: [`routes`] → [`state`] → [`session`] → [`broker`] →
//! the leaves. The broker delivers into its own [`broker::Inbox`] trait and
//! knows no client events; `tests/layers.rs` checks the imports.
//!
//! - [`app`]: the router and [`app::run`], which serves a listener through
//!   the instance's phases until shutdown. Connections are accepted, served
//!   and set up as sessions on a front thread of their own; welcomed sessions
//!   move to the runtime `run` was called on, so connect storms don't queue
//!   in front of live calls.
//! - [`routes`]: HTTP only: `/ws` (query checks and the upgrade), health
//!   probes, page files.
//! - [`state`]: [`state::AppState`], the lifecycle [`state::Phase`] and the
//!   socket cap.
//! - [`session`]: one socket in one task at a time: setup on the front
//!   thread, then, on the live runtime, a loop that reads
//!   frames (from `session::reader`, which holds no buffer while the client
//!   is quiet) and writes what its outbox collected (as one batch per write,
//!   built by `session::writer`), then cleanup. `session::wire` holds the
//!   RFC 6455 framing both sides need. Beside it: the registry (the broker's
//!   inbox), the handle other tasks touch (outbox, echo window, peer view),
//!   and two instance-wide tasks, presence upkeep and the heartbeat.
//! - [`broker`]: the [`broker::Broker`] and [`broker::Inbox`] traits, the
//!   in-memory broker, the Redis broker with its command lanes and its Lua
//!   scripts (`broker::scripts`, run by SHA1), and the
//!   envelope that carries the sender's identity next to the client's bytes.
//!   With `SWITCHBOARD_RESUME_SECS` > 0, `broker::history`: each pair's last
//!   envelopes (a Redis stream, or a ring in memory), whose `Seq` resuming
//!   clients name; the session's side is the registry's cursors.
//!   Redis is reached through a `broker::target` (one server, Sentinel's
//!   master, or a cluster's seeds; TLS in `broker::tls`). Subscriptions are
//!   switchboard's own: `broker::subscriber` counts sessions per channel and
//!   places each channel on a `broker::node` (one connection per server, or
//!   per cluster master, `broker::pubsub`'s RESP2 framing), using
//!   `broker::cluster`'s slot map in a cluster.
//! - Leaves: [`pair`] (IDs, pairs, channel and key names with their cluster
//!   hash tags, [`pair::Identity`]),
//!   [`protocol`] (client frame checks, server events, close codes and
//!   reasons), [`auth`], [`origin`] and [`turn`] (signed links, the `Origin`
//!   check, TURN credentials; see `docs/security.md`), [`config`] (settings
//!   from defaults, a TOML file and `SWITCHBOARD_*` variables), [`metrics`]
//!   (Prometheus series at `/metrics`) and [`error`] (HTTP errors by fault).

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
