//! The single-process broker: publishing is a direct call into the inbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::history::{Replay, Ring, Seq};
use super::{envelope, Broker, BrokerError, Claimed, Inbox, Numbered, RelayOrigin, SessionId, Waiting};
use crate::pair::{PairId, UserId};

/// Appends between two sweeps of expired histories.
const SWEEP_EVERY: u64 = 1024;

/// Relays between sessions of one process. Order holds because every publish
/// is delivered before it returns.
pub struct MemoryBroker {
    inbox: Arc<dyn Inbox>,
    presence: Mutex<HashMap<(PairId, UserId), SessionId>>,
    /// With history on: how long a pair's ring outlives its last append.
    window: Option<Duration>,
    histories: Mutex<Histories>,
}

/// Every pair's ring, and the counter that numbers their entries (one
/// counter for all, so a ring that expired and came back never repeats a `Seq`).
#[derive(Default)]
struct Histories {
    rings: HashMap<Box<str>, Ring>,
    next: u64,
    /// Each sender's highest numbered message published (confirmed sends),
    /// by channel and lineage, and when it was: kept as long as a ring.
    sent: HashMap<(Box<str>, SessionId), (u64, Instant)>,
}

impl Histories {
    /// Appends `envelope` to `channel`'s ring and returns its `Seq`; now and
    /// then forgets the rings that expired.
    fn append(&mut self, channel: &str, envelope: Bytes, window: Duration) -> Seq {
        let now = Instant::now();
        self.next += 1;
        let seq = Seq { ms: 0, n: self.next };
        if self.next.is_multiple_of(SWEEP_EVERY) {
            self.rings.retain(|_, ring| !ring.expired(now, window));
            self.sent.retain(|_, (_, at)| now.duration_since(*at) < window);
        }
        let ring = match self.rings.get_mut(channel) {
            Some(ring) if ring.expired(now, window) => {
                *ring = Ring::new(now);
                ring
            }
            Some(ring) => ring,
            None => self.rings.entry(channel.into()).or_insert_with(|| Ring::new(now)),
        };
        ring.push(seq, envelope, now);
        seq
    }

    /// Whether `numbered` is new on `channel` (not a resend of a message
    /// published already), noting it as published if so.
    fn first_time(&mut self, channel: &str, numbered: Numbered, window: Duration) -> bool {
        let now = Instant::now();
        let key = (Box::from(channel), numbered.lineage);
        match self.sent.get_mut(&key) {
            Some((n, at)) if now.duration_since(*at) < window && numbered.n <= *n => false,
            Some(entry) => {
                *entry = (numbered.n, now);
                true
            }
            None => {
                self.sent.insert(key, (numbered.n, now));
                true
            }
        }
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// A broker delivering into `inbox`.
    pub fn new(inbox: Arc<dyn Inbox>) -> Self {
        Self { inbox, presence: Mutex::default(), window: None, histories: Mutex::default() }
    }

    /// Keeps each pair's last envelopes for `window` after its last one (see
    /// [`super::history`]); a zero window keeps none.
    pub fn with_history(mut self, window: Duration) -> Self {
        self.window = (!window.is_zero()).then_some(window);
        self
    }

    fn histories(&self) -> std::sync::MutexGuard<'_, Histories> {
        self.histories.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers `envelope`, first appending it to the history when that is on.
    /// Under the history's lock, so that delivery order is `Seq` order. With
    /// history on, a `numbered` message published before is dropped.
    fn deliver(&self, channel: &str, envelope: &Bytes, numbered: Option<Numbered>) -> Option<Seq> {
        let Some(window) = self.window else {
            self.inbox.envelope(channel, envelope);
            return None;
        };
        let mut histories = self.histories();
        if let Some(numbered) = numbered {
            if !histories.first_time(channel, numbered, window) {
                return None;
            }
        }
        let seq = histories.append(channel, envelope.clone(), window);
        self.inbox.envelope(channel, &envelope::stamp(envelope, seq));
        Some(seq)
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

    fn relay(
        &self,
        channel: &str,
        envelope: Bytes,
        origin: Arc<dyn RelayOrigin>,
        numbered: Option<Numbered>,
    ) -> Option<Waiting> {
        self.deliver(channel, &envelope, numbered);
        origin.relay_done();
        None
    }

    async fn claim(
        &self,
        pair: &PairId,
        user: &UserId,
        session: SessionId,
        channel: &str,
        join: Bytes,
    ) -> Result<Claimed, BrokerError> {
        // Under one lock, as Redis runs the claim script: claims and joins
        // of one user take the same order.
        let mut map = self.presence();
        map.insert((pair.clone(), user.clone()), session);
        let seq = self.deliver(channel, &join, None);
        Ok(Claimed { peer: map.get(&(pair.clone(), pair.other(user).clone())).copied(), seq })
    }

    fn history(&self) -> Option<Duration> {
        self.window
    }

    async fn replay(&self, channel: &str, after: Seq) -> Result<Replay, BrokerError> {
        let Some(window) = self.window else { return Ok(Replay::Gap { last: None }) };
        let histories = self.histories();
        Ok(match histories.rings.get(channel) {
            Some(ring) if !ring.expired(Instant::now(), window) => {
                ring.replay(after, |env, seq| envelope::stamp(env, seq))
            }
            _ => Replay::Gap { last: None },
        })
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
