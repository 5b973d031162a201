//! Which sessions of which pairs live on this instance.
//!
//! The registry is the brokers' [`Inbox`]: both deliver into it what arrives
//! on a channel, and it fans that out to the channel's local sessions. It
//! holds a std `Mutex` only for the lookup and the non-blocking deliveries,
//! never across an `.await`. It also decides what clients hear when the
//! broker's subscriber reconnects: a resumable session gets what it missed
//! meanwhile from its pair's history (replayed by a task of its own, see
//! [`Registry::replay_with`]), or `resync` where the history has a hole; any
//! other session gets `resync`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::handle::{self, Cursor, Replayed, SessionHandle};
use crate::broker::{envelope, Broker, Inbox, Replay, Seq, SessionId};
use crate::protocol::ServerEvent;

/// How many replays one broker reconnect runs at once.
const REPLAYS_AT_ONCE: usize = 16;
/// How long a broker reconnect's replay may take before its sessions get
/// `resync` (their live frames wait meanwhile).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Replays what resubscribed channels missed, once the instance's state
    /// set it up (see [`Registry::replay_with`]); until then, `resync`.
    replayer: OnceLock<Replayer>,
}

/// What a broker reconnect's replays need: the broker, the registry to
/// deliver into, and the runtime to run on. Weak, as the broker holds the
/// registry (its inbox).
#[derive(Debug)]
struct Replayer {
    registry: Weak<Registry>,
    broker: Weak<dyn Broker>,
    runtime: tokio::runtime::Handle,
    /// The outbox's size, in frames and bytes: a replay must fit in half.
    outbox: (usize, usize),
}

/// A resumable session of a resubscribed channel, which may have missed what followed `after`.
#[derive(Debug)]
struct Missed {
    session: Arc<SessionHandle>,
    channel: Arc<str>,
    after: Seq,
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

    /// Ends a resuming session's replay (see [`Cursor::finish_replay`])
    /// atomically with respect to dispatch.
    pub fn finish_replay(&self, session: &SessionHandle, first: Vec<Bytes>, last: Option<Seq>) {
        let _map = self.lock();
        if let Some(cursor) = self.cursors().get_mut(&session.id) {
            cursor.finish_replay(session, first, last);
        }
    }

    /// Notes where a resumable session's join is in its pair's history (its
    /// place, until it hears something newer): a broker reconnect replays
    /// from there what it missed.
    pub fn joined(&self, session: &SessionHandle, join: Option<Seq>) {
        let _map = self.lock();
        if let Some(cursor) = self.cursors().get_mut(&session.id) {
            cursor.joined(join);
        }
    }

    /// Ends a broker reconnect's replay for `session` (see
    /// [`Cursor::finish_broker_replay`]) atomically with respect to dispatch.
    pub fn finish_broker_replay(&self, session: &SessionHandle, replayed: Replayed) {
        let _map = self.lock();
        if let Some(cursor) = self.cursors().get_mut(&session.id) {
            cursor.finish_broker_replay(session, replayed);
        }
    }

    /// From now on, when the broker's subscriber reconnects, resumable
    /// sessions get what they missed from `broker`'s history, read by a task
    /// on `runtime`; a replay must fit in half of an outbox of `outbox`
    /// frames and bytes. Once only, and only for a broker that keeps history.
    pub fn replay_with(
        self: &Arc<Self>,
        broker: &Arc<dyn Broker>,
        runtime: tokio::runtime::Handle,
        outbox: (usize, usize),
    ) {
        if broker.history().is_none() {
            return;
        }
        let replayer = Replayer { registry: Arc::downgrade(self), broker: Arc::downgrade(broker), runtime, outbox };
        let _ = self.replayer.set(replayer);
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
                let cursor = cursors.get_mut(&session.id);
                match cursor {
                    Some(cursor) => {
                        cursor.saw(env.seq);
                        session.on_envelope_at(&env, raw, body_at, Some(cursor));
                    }
                    None => session.on_envelope(&env, raw, body_at),
                }
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
        // Anything published while the subscriber was away did not come, nor
        // did the echoes senders wait for. Resumable sessions get it from the
        // history (their live frames wait meanwhile); the others' clients
        // must renegotiate.
        let channels: Vec<&str> = channels.collect();
        self.forget_echoes(channels.iter().copied());
        let replayer = self.replayer.get();
        let resync = ServerEvent::Resync.to_bytes();
        let mut missed = Vec::new();
        {
            let map = self.lock();
            let mut cursors = (self.resumables.load(Ordering::Relaxed) > 0).then(|| self.cursors());
            for (channel, list) in channels.iter().filter_map(|c| map.get_key_value(*c)) {
                for session in list {
                    let Some(cursor) = cursors.as_mut().and_then(|c| c.get_mut(&session.id)) else {
                        session.deliver(resync.clone());
                        continue;
                    };
                    match (cursor.hold(), replayer) {
                        (Some(after), Some(_)) => {
                            missed.push(Missed { session: session.clone(), channel: channel.clone(), after });
                        }
                        // Nothing to replay from, or no history to replay.
                        _ => cursor.finish_broker_replay(session, Replayed::Resync(None)),
                    }
                }
            }
        }
        if let (Some(replayer), false) = (replayer, missed.is_empty()) {
            replayer.spawn(missed);
        }
    }
}

impl Replayer {
    /// Replays what `missed` sessions missed, on a task of its own: the
    /// subscriber delivers live frames meanwhile (which the cursors hold).
    fn spawn(&self, missed: Vec<Missed>) {
        let Some(registry) = self.registry.upgrade() else { return };
        let Some(broker) = self.broker.upgrade() else {
            // The instance is going away: whoever is left hears resync.
            for m in &missed {
                registry.finish_broker_replay(&m.session, Replayed::Resync(None));
            }
            return;
        };
        tracing::info!(sessions = missed.len(), "subscriber reconnected: replaying what resumable sessions missed");
        self.runtime.spawn(replay_missed(registry, broker, missed, self.outbox));
    }
}

/// Reads what followed each session's `after` in its pair's history (once
/// per channel and `seq`) and hands it to the session's cursor: the frames if
/// the history covers the gap and they fit in half of its outbox, else `resync`.
async fn replay_missed(registry: Arc<Registry>, broker: Arc<dyn Broker>, missed: Vec<Missed>, outbox: (usize, usize)) {
    let mut groups: HashMap<(Arc<str>, Seq), Vec<Arc<SessionHandle>>> = HashMap::new();
    for Missed { session, channel, after } in missed {
        groups.entry((channel, after)).or_default().push(session);
    }
    let fits = |frames: &[(Option<Seq>, Bytes)]| {
        frames.len() <= outbox.0 / 2 && frames.iter().map(|(_, f)| f.len()).sum::<usize>() <= outbox.1 / 2
    };
    let (registry, broker, fits) = (&registry, &broker, &fits);
    futures_util::stream::iter(groups)
        .for_each_concurrent(REPLAYS_AT_ONCE, |((channel, after), sessions)| async move {
            let replay = match tokio::time::timeout(REPLAY_TIMEOUT, broker.replay(&channel, after)).await {
                Ok(Ok(replay)) => Some(replay),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, channel = &*channel, "replay after a reconnect failed: resync");
                    None
                }
                Err(_) => {
                    tracing::warn!(channel = &*channel, "replay after a reconnect timed out: resync");
                    None
                }
            };
            for session in sessions {
                let replayed = match &replay {
                    Some(Replay::Covered { envelopes, last }) => {
                        let frames = handle::replayed_at(&session.user, envelopes);
                        if fits(&frames) {
                            Replayed::Frames(frames)
                        } else {
                            Replayed::Resync(Some(*last))
                        }
                    }
                    Some(Replay::Gap { last }) => Replayed::Resync(*last),
                    None => Replayed::Resync(None),
                };
                match &replayed {
                    Replayed::Frames(frames) => {
                        tracing::debug!(
                            session = session.id,
                            frames = frames.len(),
                            "replayed what a reconnect missed"
                        );
                    }
                    Replayed::Resync(_) => {
                        tracing::debug!(
                            session = session.id,
                            "the history does not cover what a reconnect missed: resync"
                        );
                    }
                }
                registry.finish_broker_replay(&session, replayed);
            }
        })
        .await;
}
