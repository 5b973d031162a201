//! Which sessions of which pairs live on this instance.
//!
//! The registry is the brokers' [`Inbox`]: both deliver into it what arrives
//! on a channel, and it fans that out to the channel's local sessions. It
//! holds a std `Mutex` only for the lookup and the non-blocking deliveries,
//! never across an `.await`. It also decides what clients hear when the
//! broker's subscriber reconnects: `resync`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::handle::{Cursor, SessionHandle};
use crate::broker::{envelope, Inbox, Seq, SessionId};
use crate::protocol::ServerEvent;

/// Local sessions by pair channel.
#[derive(Debug, Default)]
pub struct Registry {
    /// Keyed by the same `Arc<str>` the sessions hold, so a channel's name is stored once.
    channels: Mutex<HashMap<Arc<str>, Vec<Arc<SessionHandle>>>>,
    /// The cursors of resumable sessions (see [`Cursor`]), by session. Taken
    /// only under `channels`' lock, so that their frames' order is dispatch order.
    cursors: Mutex<HashMap<SessionId, Cursor>>,
    /// How many cursors there are (changed under `channels`' lock): while
    /// none, dispatch takes no second lock (resume off, or never asked for).
    resumables: AtomicUsize,
    /// How often the broker's subscriber lost or regained its connection: the
    /// presence upkeep judges a peer gone only across a span without either.
    interruptions: AtomicU64,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Vec<Arc<SessionHandle>>>> {
        // A panic while holding the lock leaves the map consistent: every
        // critical section is a single insert, remove or loop of try_sends.
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session under `channel`.
    pub fn insert(&self, channel: &Arc<str>, session: Arc<SessionHandle>) {
        let mut map = self.lock();
        let list = map.entry(channel.clone()).or_default();
        if list.is_empty() {
            crate::metrics::pair_channel_opened();
        }
        list.push(session);
    }

    fn cursors(&self) -> MutexGuard<'_, HashMap<SessionId, Cursor>> {
        self.cursors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the session `id` resumable: its relayed frames go out as `relay`
    /// events; with `replaying`, held until [`Registry::finish_replay`].
    /// Before [`Registry::insert`].
    pub fn make_resumable(&self, id: SessionId, replaying: bool) {
        let _map = self.lock();
        if self.cursors().insert(id, Cursor::new(replaying)).is_none() {
            self.resumables.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes the session `id` from `channel`.
    pub fn remove(&self, channel: &str, id: u64) {
        let mut map = self.lock();
        if self.resumables.load(Ordering::Relaxed) > 0 && self.cursors().remove(&id).is_some() {
            self.resumables.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(list) = map.get_mut(channel) {
            list.retain(|s| s.id != id);
            if list.is_empty() {
                map.remove(channel);
                crate::metrics::pair_channel_closed();
            }
        }
    }

    /// Decides a session's `peerOnline` atomically with respect to dispatch.
    pub fn finish_setup(&self, session: &SessionHandle, from_presence: Option<u64>) -> bool {
        let _map = self.lock();
        session.peer.finish_setup(from_presence)
    }

    /// Ends a resuming session's replay (see [`SessionHandle::finish_replay`])
    /// atomically with respect to dispatch.
    pub fn finish_replay(&self, session: &SessionHandle, first: Vec<Bytes>, last: Option<Seq>) {
        let _map = self.lock();
        if let Some(cursor) = self.cursors().get_mut(&session.id) {
            cursor.finish_replay(session, first, last);
        }
    }

    /// Hands an envelope received on `channel` to every local session there.
    /// Returns how many local sessions the channel has.
    pub fn dispatch(&self, channel: &str, raw: &Bytes) -> usize {
        let Some(env) = envelope::decode(raw) else {
            tracing::warn!(channel, "dropping a malformed envelope from the broker");
            return 0;
        };
        let body_at = raw.len() - env.body.len();
        let map = self.lock();
        let Some(list) = map.get(channel) else {
            return 0;
        };
        if self.resumables.load(Ordering::Relaxed) == 0 {
            for session in list {
                session.on_envelope(&env, raw, body_at);
            }
        } else {
            let mut cursors = self.cursors();
            for session in list {
                session.on_envelope_at(&env, raw, body_at, cursors.get_mut(&session.id));
            }
        }
        list.len()
    }

    /// Queues `frame` for every session of the given channels.
    pub fn broadcast<'a>(&self, channels: impl IntoIterator<Item = &'a str>, frame: &Bytes) {
        let map = self.lock();
        for channel in channels {
            for session in map.get(channel).into_iter().flatten() {
                session.deliver(frame.clone());
            }
        }
    }

    /// Tells every local session of `channels` that awaited echoes will
    /// never come (the subscriber's connection that carried them dropped).
    pub fn forget_echoes<'a>(&self, channels: impl IntoIterator<Item = &'a str>) {
        let map = self.lock();
        for channel in channels {
            for session in map.get(channel).into_iter().flatten() {
                session.forget_echoes();
            }
        }
    }

    /// Every local session, for shutdown.
    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().values().flatten().cloned().collect()
    }

    /// How many times the broker's subscriber lost or regained its
    /// connection so far.
    pub fn interruptions(&self) -> u64 {
        self.interruptions.load(Ordering::Relaxed)
    }

    /// Number of local sessions.
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Whether no session is local.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inbox for Registry {
    fn envelope(&self, channel: &str, envelope: &Bytes) {
        self.dispatch(channel, envelope);
    }

    fn connection_lost(&self, channels: &mut dyn Iterator<Item = &str>) {
        self.interruptions.fetch_add(1, Ordering::Relaxed);
        self.forget_echoes(channels);
    }

    fn resubscribed(&self, channels: &mut dyn Iterator<Item = &str>) {
        self.interruptions.fetch_add(1, Ordering::Relaxed);
        // Anything published while the subscriber was away is gone, and so
        // are the echoes senders wait for: their clients must renegotiate.
        let channels: Vec<&str> = channels.collect();
        self.forget_echoes(channels.iter().copied());
        self.broadcast(channels.iter().copied(), &ServerEvent::Resync.to_bytes());
        // The history may be gone too (a failover), and a new one may number
        // from lower IDs: resumable sessions take whatever comes next.
        let map = self.lock();
        if self.resumables.load(Ordering::Relaxed) > 0 {
            let mut cursors = self.cursors();
            for session in channels.iter().filter_map(|c| map.get(*c)).flatten() {
                if let Some(cursor) = cursors.get_mut(&session.id) {
                    cursor.forget_position();
                }
            }
        }
    }
}
