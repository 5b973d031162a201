//! Brokers carry envelopes between the instances that serve a pair.
//!
//! [`memory::MemoryBroker`] relays inside one process; [`redis::RedisBroker`]
//! publishes on the pair's Redis channel and runs one dedicated subscriber
//! connection per instance. Both deliver what they receive into an [`Inbox`]:
//! the instance's session registry, which fans it out to local sessions and
//! decides what their clients hear. The broker speaks channels and envelopes
//! only, never client events.

pub mod cluster;
pub mod envelope;
pub mod history;
pub mod lanes;
pub mod memory;
pub mod node;
pub mod pubsub;
pub mod redis;
pub mod renewals;
pub mod scripts;
pub mod subscriber;
pub mod target;
pub mod tls;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::pair::{PairId, UserId};
pub use envelope::SessionId;
pub use history::{Replay, Seq};

/// What [`Broker::claim`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The peer's live session, if any.
    pub peer: Option<SessionId>,
    /// With history on: the join's place in the pair's history.
    pub seq: Option<Seq>,
}

/// Whose fault a broker failure is. Every broker failure is the broker's (Redis), never the client's.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Redis is unreachable or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A command lane could not connect to Redis.
    #[error("redis connect: {0}")]
    Connect(String),
    /// A command failed, or its connection did.
    #[error("redis command: {0}")]
    Command(String),
    /// Redis refused a command (an ACL, a password, a busy server).
    #[error("redis refused: {0}")]
    Refused(String),
    /// The subscriber connection is down; messages can't be delivered now.
    #[error("the broker's subscriber connection is down")]
    Disconnected,
}

/// Where a broker delivers what it receives.
pub trait Inbox: Send + Sync + 'static {
    /// An envelope arrived on `channel`.
    fn envelope(&self, channel: &str, envelope: &Bytes);

    /// The subscriber's connection that carried `channels` is lost: nothing
    /// published on them from now on, nor anything not read yet, will arrive.
    fn connection_lost(&self, channels: &mut dyn Iterator<Item = &str>);

    /// The subscriber is connected again and subscribed to `channels` anew;
    /// whatever was published on them while it was away is gone.
    fn resubscribed(&self, channels: &mut dyn Iterator<Item = &str>);
}

/// A wait for room in a broker's queue (see [`Broker::relay`]).
pub type Waiting = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Told what became of the messages handed to [`Broker::relay`], in the
/// order they were handed over.
pub trait RelayOrigin: Send + Sync + 'static {
    /// The broker could not publish a relayed message of `len` envelope bytes;
    /// the client should hear of it.
    fn relay_failed(&self, error: &BrokerError, len: usize);

    /// The broker has the message: published (and kept in the history, with
    /// history on), or dropped as a resend of a [`Numbered`] message it
    /// already had.
    fn relay_done(&self) {}
}

/// A client message's place in its sender's numbering, for confirmed sends
/// (see docs/protocol.md, "Resuming"): the `n`-th message of the sender's
/// `lineage` (the session that first asked to resume, and every session
/// that resumed it since). With history on, a broker publishes each `(lineage, n)`
/// at most once: a resend of a message it already published is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbered {
    /// The session ID that started the numbering.
    pub lineage: SessionId,
    /// The message's number, from 1.
    pub n: u64,
}

/// The operations a session needs from a broker.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Starts receiving `channel` on this instance. Counted: only the first
    /// local session of a pair subscribes; resolves once the subscription is live.
    /// An `Arc` so that a broker which keeps the name shares the sessions' copy.
    async fn subscribe(&self, channel: &Arc<str>) -> Result<(), BrokerError>;

    /// Drops one count of `channel`'s subscription; the last one unsubscribes.
    fn unsubscribe(&self, channel: &str);

    /// Publishes an envelope on `channel`. One session's publishes are
    /// awaited one after another, so they arrive in order. Not kept in the
    /// history (leaves).
    async fn publish(&self, channel: &str, envelope: Bytes) -> Result<(), BrokerError>;

    /// Queues a client's message on `channel` without waiting for Redis to
    /// confirm it: a session's relayed messages are published in the order it
    /// queued them, after anything it published before. Returns at once when
    /// the broker's queue takes it, which is nearly always; when the queue is
    /// full, returns the wait for room, which the session awaits before its
    /// next message (so the sending socket slows down). A failure is reported
    /// to `origin` once the broker knows of it. With history on, the envelope
    /// is appended to the pair's history and published with its `Seq`; a
    /// `numbered` message the broker already published is dropped instead
    /// (and reported done).
    fn relay(
        &self,
        channel: &str,
        envelope: Bytes,
        origin: Arc<dyn RelayOrigin>,
        numbered: Option<Numbered>,
    ) -> Option<Waiting>;

    /// Records `session` as `user`'s live session in `pair`, publishes
    /// `join` (the session's join envelope) on the pair's `channel` in the
    /// same step (with history on, appended to the history first), and
    /// returns the peer's live session, if any, and the join's `Seq`.
    ///
    /// One step, so that the order in which sessions of one user claim the
    /// key is the order in which their joins arrive: the session that the
    /// joins make the survivor (the last one) is the one whose key stays, and
    /// the losers' cleanup (which removes only a key still theirs) leaves it.
    async fn claim(
        &self,
        pair: &PairId,
        user: &UserId,
        session: SessionId,
        channel: &str,
        join: Bytes,
    ) -> Result<Claimed, BrokerError>;

    /// [`Broker::claim`], for the peer's session only.
    async fn claim_presence(
        &self,
        pair: &PairId,
        user: &UserId,
        session: SessionId,
        channel: &str,
        join: Bytes,
    ) -> Result<Option<SessionId>, BrokerError> {
        Ok(self.claim(pair, user, session, channel, join).await?.peer)
    }

    /// How long a pair's history outlives its last envelope; `None` when
    /// the broker keeps none (`SWITCHBOARD_RESUME_SECS=0`).
    fn history(&self) -> Option<std::time::Duration> {
        None
    }

    /// What `channel`'s history holds after `after` (see [`history`]). A
    /// broker without history has a gap everywhere.
    async fn replay(&self, _channel: &str, _after: Seq) -> Result<Replay, BrokerError> {
        Ok(Replay::Gap { last: None })
    }

    /// The secret named `name` that every instance of the deployment shares:
    /// the one stored in the broker, or `proposed` if none is (then it is
    /// stored). A broker of one process has nothing to share with.
    async fn shared_secret(&self, _name: &str, proposed: &str) -> Result<String, BrokerError> {
        Ok(proposed.to_owned())
    }

    /// Keeps the presence of each `(pair, user, session)` alive (re-creating
    /// it if it expired) and returns each one's peer's live session, if any,
    /// in the same order. One call covers many sessions: an instance refreshes
    /// all of its sessions together.
    async fn refresh_presences(
        &self,
        sessions: &[(&PairId, &UserId, SessionId)],
    ) -> Result<Vec<Option<SessionId>>, BrokerError>;

    /// Removes `user`'s presence in `pair` if it is still `session`'s.
    async fn release_presence(&self, pair: &PairId, user: &UserId, session: SessionId) -> Result<(), BrokerError>;

    /// Whether the broker can take new sessions right now.
    fn is_ready(&self) -> bool;

    /// Whether some channels are cut off right now while the broker is
    /// ready: in a Redis Cluster, a shard failing over. Its sessions were
    /// told (`resync` follows); sessions of other shards carry on, and new
    /// sessions are taken (those of the lost shard are refused with 1013).
    fn is_degraded(&self) -> bool {
        false
    }
}
