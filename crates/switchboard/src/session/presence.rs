//! Presence upkeep for the whole instance: one timer, and one Redis script
//! call per few hundred sessions, every third of the presence TTL.
//!
//! Each session claims its presence key when it opens and removes it when it
//! leaves. While it lives, this task keeps the key from expiring (putting it
//! back if it is gone) and learns in the same call whether the peer's key
//! still exists.
//!
//! A missing key alone is no proof that the peer left: a Redis restart (run
//! without persistence, as recommended), `FLUSHALL`, a write outage or a
//! stall longer than the TTL wipes the keys of users who are still connected,
//! and their replicas put them back on their next refresh. So a peer is
//! judged gone, and its session here hears `peer-left`, only when its key was
//! missing on every refresh over more than the TTL, with the broker healthy
//! throughout (no failed refresh, no lost subscriber connection). A peer that
//! says goodbye is reported at once by its leave envelope instead. A peer
//! taken for gone whose key comes back is reported with `peer-joined`.
//!
//! Done per session, the same upkeep cost a timer per socket and one script
//! call per socket every few seconds, which was most of an idle instance's
//! CPU and Redis's.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::clock::now_ms;
use super::handle::SessionHandle;
use super::registry::Registry;
use crate::broker::Broker;

/// Sessions refreshed by one script call.
const BATCH: usize = 500;

/// What a refresh needs to judge a missing key, in [`now_ms`] milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Judgement {
    /// When the refresh runs.
    pub now: u64,
    /// Since when the broker has been healthy (no failed refresh, no lost
    /// subscriber connection).
    pub healthy_since: u64,
    /// The presence TTL: a key missing for longer than this, all that time
    /// with a healthy broker, belongs to a peer that is gone.
    pub ttl_ms: u64,
}

/// Refreshes every local session's presence every third of `ttl` until `stop`.
pub async fn keep_alive(registry: Arc<Registry>, broker: Arc<dyn Broker>, ttl: Duration, stop: CancellationToken) {
    let every = ttl / 3;
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut interruptions = registry.interruptions();
    let mut healthy_since = now_ms();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let seen = registry.interruptions();
        if seen != interruptions || !broker.is_ready() || broker.is_degraded() {
            interruptions = seen;
            healthy_since = now_ms();
        }
        let sessions = registry.all();
        for chunk in sessions.chunks(BATCH) {
            let judgement = Judgement { now: now_ms(), healthy_since, ttl_ms };
            if !refresh(broker.as_ref(), chunk, judgement).await {
                healthy_since = now_ms();
            }
        }
    }
}

/// Refreshes `sessions` in one call, tells those whose peer is proven gone
/// (see [`Judgement`]) and those whose peer is back. False if the call failed.
pub async fn refresh(broker: &dyn Broker, sessions: &[Arc<SessionHandle>], judgement: Judgement) -> bool {
    let live: Vec<&Arc<SessionHandle>> = sessions.iter().filter(|s| !s.peer.presence_released()).collect();
    let keys: Vec<_> = live.iter().map(|s| (&s.pair, &s.user, s.id)).collect();
    let peers = match broker.refresh_presences(&keys).await {
        Ok(peers) => peers,
        Err(e) => {
            tracing::debug!(error = %e, sessions = keys.len(), "presence refresh failed");
            return false;
        }
    };
    let Judgement { now, healthy_since, ttl_ms } = judgement;
    for (session, peer) in live.iter().zip(peers) {
        if session.peer.presence_released() {
            // It left while the call was on its way, and the call may have put
            // its key back: take it away again.
            if let Err(e) = broker.release_presence(&session.pair, &session.user, session.id).await {
                tracing::debug!(error = %e, "presence release failed");
            }
        } else if let Some(peer) = peer {
            session.peer_presence_seen(peer);
        } else if session.peer.missing(now, healthy_since, ttl_ms) {
            session.peer_presence_gone();
        }
    }
    true
}
