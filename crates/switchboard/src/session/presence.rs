//! Presence upkeep for the whole instance: one timer, and one Redis script
//! call per few hundred sessions, every third of the presence TTL.
//!
//! Each session claims its presence key when it opens and removes it when it
//! leaves. While it lives, this task keeps the key from expiring and learns
//! in the same call whether the peer's key still exists. A peer whose key
//! expired lost its replica without a chance to say goodbye, so its session
//! here hears `peer-left`.
//!
//! Done per session, the same upkeep cost a timer per socket and one script
//! call per socket every few seconds, which was most of an idle instance's
//! CPU and Redis's.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::handle::SessionHandle;
use super::registry::Registry;
use crate::broker::Broker;

/// Sessions refreshed by one script call.
const BATCH: usize = 500;

/// Refreshes every local session's presence each `every` until `stop`.
pub async fn keep_alive(registry: Arc<Registry>, broker: Arc<dyn Broker>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sessions = registry.all();
        for chunk in sessions.chunks(BATCH) {
            refresh(broker.as_ref(), chunk).await;
        }
    }
}

/// Refreshes `sessions` in one call and tells those whose peer is gone.
pub async fn refresh(broker: &dyn Broker, sessions: &[Arc<SessionHandle>]) {
    let live: Vec<&Arc<SessionHandle>> = sessions.iter().filter(|s| !s.peer.presence_released()).collect();
    let keys: Vec<_> = live.iter().map(|s| (&s.pair, &s.user, s.id)).collect();
    let peers = match broker.refresh_presences(&keys).await {
        Ok(peers) => peers,
        Err(e) => {
            tracing::debug!(error = %e, sessions = keys.len(), "presence refresh failed");
            return;
        }
    };
    for (session, peer) in live.iter().zip(peers) {
        if session.peer.presence_released() {
            // It left while the call was on its way, and the call may have put
            // its key back: take it away again.
            if let Err(e) = broker.release_presence(&session.pair, &session.user, session.id).await {
                tracing::debug!(error = %e, "presence release failed");
            }
        } else if peer.is_none() {
            session.peer_presence_gone();
        }
    }
}
