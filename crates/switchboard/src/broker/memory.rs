//! The single-process broker: publishing is a direct call into the inbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Broker, BrokerError, Inbox, RelayFailure, SessionId, Waiting};
use crate::pair::{PairId, UserId};

/// Relays between sessions of one process. Order holds because every publish
/// is delivered before it returns.
pub struct MemoryBroker {
    inbox: Arc<dyn Inbox>,
    presence: Mutex<HashMap<(PairId, UserId), SessionId>>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// A broker delivering into `inbox`.
    pub fn new(inbox: Arc<dyn Inbox>) -> Self {
        Self { inbox, presence: Mutex::default() }
    }

    fn presence(&self) -> std::sync::MutexGuard<'_, HashMap<(PairId, UserId), SessionId>> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn subscribe(&self, _channel: &Arc<str>) -> Result<(), BrokerError> {
        Ok(())
    }

    fn unsubscribe(&self, _channel: &str) {}

    async fn publish(&self, channel: &str, envelope: Bytes) -> Result<(), BrokerError> {
        self.inbox.envelope(channel, &envelope);
        Ok(())
    }

    fn relay(&self, channel: &str, envelope: Bytes, _origin: Arc<dyn RelayFailure>) -> Option<Waiting> {
        self.inbox.envelope(channel, &envelope);
        None
    }

    async fn claim_presence(
        &self,
        pair: &PairId,
        user: &UserId,
        session: SessionId,
        channel: &str,
        join: Bytes,
    ) -> Result<Option<SessionId>, BrokerError> {
        // Under one lock, as Redis runs the claim script: claims and joins
        // of one user take the same order.
        let mut map = self.presence();
        map.insert((pair.clone(), user.clone()), session);
        self.inbox.envelope(channel, &join);
        Ok(map.get(&(pair.clone(), pair.other(user).clone())).copied())
    }

    async fn refresh_presences(
        &self,
        sessions: &[(&PairId, &UserId, SessionId)],
    ) -> Result<Vec<Option<SessionId>>, BrokerError> {
        let mut map = self.presence();
        let peers = sessions
            .iter()
            .map(|&(pair, user, session)| {
                // As the Redis script does: a missing key of a live session is put back.
                map.entry((pair.clone(), user.clone())).or_insert(session);
                map.get(&(pair.clone(), pair.other(user).clone())).copied()
            })
            .collect();
        Ok(peers)
    }

    async fn release_presence(&self, pair: &PairId, user: &UserId, session: SessionId) -> Result<(), BrokerError> {
        let key = (pair.clone(), user.clone());
        let mut map = self.presence();
        if map.get(&key) == Some(&session) {
            map.remove(&key);
        }
        Ok(())
    }

    fn is_ready(&self) -> bool {
        true
    }
}
