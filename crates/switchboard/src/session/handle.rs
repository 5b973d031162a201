//! The part of a session that other tasks touch, in plain parts: its
//! [`Outbox`] (queue and close signal), its [`EchoWindow`], its [`PeerView`],
//! and its heartbeat clock. [`SessionHandle::on_envelope`] is where a session
//! decides what its client hears of its pair's channel.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::clock::{ms_at, now_ms};
use super::echo::EchoWindow;
use super::outbox::{Outbox, Work};
use super::peer::PeerView;
use crate::broker::envelope::{Envelope, Kind};
use crate::broker::{envelope, BrokerError, RelayOrigin, Seq, SessionId};
use crate::pair::{PairId, UserId};
use crate::protocol::{CloseReason, ServerEvent};

/// Shared handle of one live session.
#[derive(Debug)]
pub struct SessionHandle {
    /// This session's random ID.
    pub id: SessionId,
    /// The session's user.
    pub user: UserId,
    /// The pair the session belongs to.
    pub pair: PairId,
    /// What the session's task is asked to write, and its close signal.
    pub outbox: Outbox,
    /// Bytes published and not echoed yet.
    pub echo: EchoWindow,
    /// The peer's presence as this session knows it.
    pub peer: PeerView,
    /// When a frame last came from the client ([`now_ms`]).
    heard_at: AtomicU64,
    /// When the heartbeat last pinged this socket ([`now_ms`]).
    pinged_at: AtomicU64,
}

/// What a resumable session (one whose client asked to resume) delivered of
/// its pair's history: its relayed frames go out as `relay` events with their
/// `seq`, and this keeps their order across replays. The registry keeps it
/// beside the session (and the session's handle stays as small as before).
///
/// A replay is the setup's (the client resumed) or a broker reconnect's (the
/// subscriber missed what was published while it was away). While any is
/// under way, live frames wait; once all are done, they go out in `seq`
/// order, those not delivered yet only.
#[derive(Debug, Default)]
pub struct Cursor {
    /// Replays are under way: live frames wait here, with their `seq`, and so
    /// do the frames of a broker reconnect's replay that ended before another.
    held: Option<Vec<(Option<Seq>, Bytes)>>,
    /// The newest `seq` delivered (or replayed past); older ones are dropped.
    last: Option<Seq>,
    /// The `seq` of the newest envelope of any kind (the session's own join
    /// and messages too) that reached the session: how far its channel was
    /// heard, where a broker reconnect's replay starts.
    seen: Option<Seq>,
    /// How many replays are under way.
    replays: u32,
    /// A broker reconnect's replay found a hole: `resync` is owed once the
    /// replays end, and only frames past this `seq` (the history's newest
    /// entry then; all, for `None`) follow it.
    resync: Option<Option<Seq>>,
}

/// What a broker reconnect's replay (see [`Cursor::hold`]) found for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The history covered the gap: these `relay` events (see [`replayed_at`]) were missed.
    Frames(Vec<(Option<Seq>, Bytes)>),
    /// It did not (a hole, a replay too big for the outbox, or a failure):
    /// the client gets `resync`, then the frames past this `seq`.
    Resync(Option<Seq>),
}

impl Cursor {
    /// A cursor; with `replaying`, live frames wait for [`Cursor::finish_replay`].
    pub fn new(replaying: bool) -> Self {
        Self { held: replaying.then(Vec::new), replays: u32::from(replaying), ..Self::default() }
    }

    /// Ends the setup's replay: queues `first` (the replayed frames, or
    /// `resync`) for `session`, notes that everything up to `last` was
    /// replayed, then, unless a broker reconnect's replay is still under way,
    /// lets the held live frames through, those past `last` only.
    pub fn finish_replay(&mut self, session: &SessionHandle, first: Vec<Bytes>, last: Option<Seq>) {
        for frame in first {
            session.deliver(frame);
        }
        if last.is_some() {
            self.last = self.last.max(last);
        }
        self.replay_ended(session);
    }

    /// Notes that `seq` (of an envelope of any kind) reached the session.
    pub fn saw(&mut self, seq: Option<Seq>) {
        if seq.is_some() {
            self.seen = seq;
        }
    }

    /// Notes the session's join at `seq` in the history, unless it heard
    /// its channel already (then it is heard from there on).
    pub fn joined(&mut self, seq: Option<Seq>) {
        self.seen = self.seen.or(seq);
    }

    /// The broker's subscriber reconnected: holds live frames until
    /// [`Cursor::finish_broker_replay`], and returns the `seq` after which the
    /// session may have missed frames: the newest it heard of its channel
    /// (its join, at least) or delivered. `None`: it has no place it could
    /// name, and the replay can only end in `resync`.
    pub fn hold(&mut self) -> Option<Seq> {
        self.held.get_or_insert_with(Vec::new);
        self.replays += 1;
        self.seen.max(self.last)
    }

    /// Ends a broker reconnect's replay (see [`Cursor::hold`]) with what it
    /// found; once no replay is under way, `session`'s client gets what it
    /// missed and what was held, in `seq` order and each frame once.
    pub fn finish_broker_replay(&mut self, session: &SessionHandle, replayed: Replayed) {
        match replayed {
            Replayed::Frames(frames) => self.held.get_or_insert_with(Vec::new).extend(frames),
            Replayed::Resync(last) => self.resync = Some(self.resync.flatten().max(last)),
        }
        self.replay_ended(session);
    }

    /// One replay ended; if it was the last one under way, delivers what is
    /// owed: `resync` first if a replay found a hole, then the held frames.
    fn replay_ended(&mut self, session: &SessionHandle) {
        self.replays = self.replays.saturating_sub(1);
        if self.replays > 0 {
            return;
        }
        if let Some(last) = self.resync.take() {
            session.deliver(ServerEvent::Resync.to_bytes());
            // After a failover or a restart the history may number anew, from
            // lower IDs: what follows its newest entry is what is new.
            self.last = last;
        }
        let mut held = self.held.take().unwrap_or_default();
        // Live frames came in `seq` order; a replay's frames go among them.
        held.sort_by_key(|(seq, _)| *seq);
        for (seq, frame) in held {
            if self.advance(seq) {
                session.deliver(frame);
            }
        }
    }

    /// Whether a frame at `seq` is new, noting it as delivered if so.
    fn advance(&mut self, seq: Option<Seq>) -> bool {
        match (seq, self.last) {
            (Some(seq), Some(last)) if seq <= last => false,
            (Some(seq), _) => {
                self.last = Some(seq);
                true
            }
            (None, _) => true,
        }
    }
}

impl SessionHandle {
    /// Creates a handle whose outbox holds at most `max_messages` frames and `max_bytes` bytes.
    pub fn new(id: SessionId, user: UserId, pair: PairId, max_messages: usize, max_bytes: usize) -> Self {
        Self {
            id,
            user,
            pair,
            outbox: Outbox::new(max_messages, max_bytes),
            echo: EchoWindow::default(),
            peer: PeerView::default(),
            heard_at: AtomicU64::new(now_ms()),
            pinged_at: AtomicU64::new(0),
        }
    }

    /// A relayed frame from the peer: as is, or as a `relay` event with its
    /// `seq` for a resumable session (held while a replay is under way, and
    /// dropped if the replay already gave it).
    fn relay(&self, env: &Envelope<'_>, raw: &Bytes, body_at: usize, cursor: Option<&mut Cursor>) {
        let Some(cursor) = cursor else {
            self.deliver(raw.slice(body_at..));
            return;
        };
        let event = || crate::protocol::relay_event(env.seq.map(|s| s.to_string()).as_deref(), env.body);
        if let Some(held) = &mut cursor.held {
            held.push((env.seq, event()));
        } else if cursor.advance(env.seq) {
            self.deliver(event());
        }
    }

    /// Queues a text frame for the socket (see [`Outbox::deliver`]).
    pub fn deliver(&self, frame: Bytes) {
        self.outbox.deliver(frame);
    }

    /// Asks the session to answer a ping with `payload`.
    pub fn pong(&self, payload: Box<[u8]>) {
        self.outbox.pong(payload);
    }

    /// Takes everything there is to write (see [`Outbox::next_work`]). Not
    /// an `async fn`: the outbox's own future, with no wrapper around it.
    pub fn next_work(&self) -> impl std::future::Future<Output = Option<Work>> + '_ {
        self.outbox.next_work()
    }

    /// Asks the session to close; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        self.outbox.close(reason);
    }

    /// The reason given to [`SessionHandle::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.outbox.close_reason()
    }

    /// Asks the session to send a ping, and notes when.
    pub fn ping(&self) {
        self.pinged_at.store(now_ms(), Ordering::Relaxed);
        self.outbox.ping();
    }

    /// Notes that a frame came from the client at `at`.
    pub fn heard(&self, at: tokio::time::Instant) {
        self.heard_at.store(ms_at(at), Ordering::Relaxed);
    }

    /// When a frame last came from the client, and when the heartbeat last
    /// pinged ([`now_ms`]; 0 for never pinged).
    pub fn heartbeat(&self) -> (u64, u64) {
        (self.heard_at.load(Ordering::Relaxed), self.pinged_at.load(Ordering::Relaxed))
    }

    /// Waits until this session may publish an envelope of `len` bytes, and
    /// counts it (see [`EchoWindow::room`]). Called by the session's own task only.
    pub async fn echo_room(&self, len: usize) -> bool {
        self.echo.room(len, &self.outbox).await
    }

    /// `len` bytes of this session's envelopes came back (or never will).
    pub fn echoed(&self, len: usize) {
        self.echo.echoed(len, &self.outbox);
    }

    /// Forgets every awaited echo: the subscriber lost its connection, and what
    /// was published meanwhile will never come back.
    pub fn forget_echoes(&self) {
        self.echo.forget(&self.outbox);
    }

    /// The peer's presence key is back while this session took the peer for
    /// gone: its client hears `peer-joined` (see [`PeerView::present`]).
    pub fn peer_presence_seen(&self, peer: SessionId) {
        if self.peer.present(peer) {
            tracing::info!(session = self.id, peer_session = format_args!("{peer:x}"), "peer presence is back");
            self.deliver(ServerEvent::PeerJoined { peer_id: self.pair.other(&self.user).as_str() }.to_bytes());
        }
    }

    /// The peer's presence stayed away long enough to prove it gone (its
    /// replica died without announcing a leave, see [`PeerView::missing`]): a
    /// peer this session knew of is reported as gone.
    pub fn peer_presence_gone(&self) {
        if let Some(gone) = self.peer.expire() {
            tracing::info!(session = self.id, peer_session = format_args!("{gone:x}"), "peer presence expired");
            self.deliver(ServerEvent::PeerLeft { peer_id: self.pair.other(&self.user).as_str() }.to_bytes());
        }
    }

    /// Acts on one envelope from the pair's channel. `raw` holds the whole
    /// envelope so a relayed body is sliced from it, not copied.
    pub fn on_envelope(&self, env: &Envelope<'_>, raw: &Bytes, body_at: usize) {
        self.on_envelope_at(env, raw, body_at, None);
    }

    /// [`SessionHandle::on_envelope`], for a resumable session with its `cursor`.
    pub fn on_envelope_at(&self, env: &Envelope<'_>, raw: &Bytes, body_at: usize, cursor: Option<&mut Cursor>) {
        let from_me = env.from == self.user.as_str();
        match (env.kind, from_me) {
            (Kind::Message | Kind::Answer, false) => self.relay(env, raw, body_at, cursor),
            (Kind::Offer, false) => {
                self.peer.offered();
                self.relay(env, raw, body_at, cursor);
            }
            (Kind::Message | Kind::Offer | Kind::Answer, true) => {
                if env.session == self.id {
                    // Counted as sent, without the `seq` the broker added.
                    self.echoed(raw.len() - env.stamp_len);
                }
            }
            (Kind::Join, true) if env.session == self.id => {
                self.peer.own_join();
            }
            // A later join of the same user, in the channel's single order, replaces this one.
            (Kind::Join, true) if self.peer.own_join_seen() => self.close(CloseReason::Replaced),
            (Kind::Join, true) => {}
            (Kind::Join, false) => {
                if self.peer.joined(env.session) {
                    self.deliver(ServerEvent::PeerJoined { peer_id: env.from }.to_bytes());
                }
            }
            (Kind::Leave, true) => {}
            (Kind::Leave, false) => {
                if self.peer.left(env.session) {
                    self.deliver(ServerEvent::PeerLeft { peer_id: env.from }.to_bytes());
                }
            }
        }
    }
}

/// The `relay` events of the peer's messages among replayed `envelopes`
/// (joins, leaves and this user's own messages are not replayed).
pub fn replayed(user: &UserId, envelopes: &[Bytes]) -> Vec<Bytes> {
    replayed_at(user, envelopes).into_iter().map(|(_, frame)| frame).collect()
}

/// [`replayed`], each event with its `seq`.
pub fn replayed_at(user: &UserId, envelopes: &[Bytes]) -> Vec<(Option<Seq>, Bytes)> {
    envelopes
        .iter()
        .filter_map(|raw| envelope::decode(raw))
        .filter(|env| matches!(env.kind, Kind::Message | Kind::Offer | Kind::Answer) && env.from != user.as_str())
        .map(|env| (env.seq, crate::protocol::relay_event(env.seq.map(|s| s.to_string()).as_deref(), env.body)))
        .collect()
}

impl RelayOrigin for SessionHandle {
    fn relay_failed(&self, error: &BrokerError, len: usize) {
        // It never reached Redis, so its copy will never come back.
        self.echoed(len);
        tracing::warn!(error = %error, session = self.id, "publish failed");
        crate::metrics::reject("broker_unavailable");
        let message = "the message could not be relayed: the broker is unavailable";
        self.deliver(ServerEvent::Error { code: "broker_unavailable", message }.to_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::session::echo::ECHO_WINDOW;

    fn handle(max_messages: usize, max_bytes: usize) -> SessionHandle {
        let (alice, bob) = (UserId::parse("alice").expect("valid"), UserId::parse("bob").expect("valid"));
        let pair = PairId::new(&alice, &bob).expect("two users");
        SessionHandle::new(7, alice, pair, max_messages, max_bytes)
    }

    #[test]
    fn a_ping_is_queued_and_its_time_noted() {
        let h = handle(16, 1 << 20);
        h.ping();
        let work = tokio::runtime::Builder::new_current_thread().build().expect("rt").block_on(h.next_work());
        assert!(work.expect("work").ping);
        assert_ne!(h.heartbeat().1, 0, "the ping's time is noted");
    }

    #[tokio::test]
    async fn a_sender_waits_for_its_own_echo_beyond_the_window() {
        use crate::broker::envelope::{self, decode};
        let h = Arc::new(handle(16, 1 << 20));
        let env = envelope::encode(Kind::Message, &h.user, h.id, &vec![b'x'; ECHO_WINDOW / 2 - 64]);
        assert!(h.echo_room(env.len()).await);
        assert!(h.echo_room(env.len()).await, "two halves fit");
        let third = tokio::spawn({
            let h = h.clone();
            let len = env.len();
            async move { h.echo_room(len).await }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "the window is full");
        // The first copy comes back on the pair's channel: room again.
        let parsed = decode(&env).expect("an envelope");
        h.on_envelope(&parsed, &env, env.len() - parsed.body.len());
        assert!(third.await.expect("task"), "released by the echo");

        // A closing session stops waiting, and a lost connection forgets the debt.
        let blocked = tokio::spawn({
            let h = h.clone();
            let len = env.len();
            async move { h.echo_room(len).await }
        });
        tokio::task::yield_now().await;
        h.close(CloseReason::Shutdown);
        assert!(!blocked.await.expect("task"));
        h.forget_echoes();
        assert_eq!(h.echo.owed(), 0);
    }

    #[test]
    fn another_sessions_copy_or_a_failed_publish_settle_only_what_they_owe() {
        let h = handle(16, 1 << 20);
        assert!(h.echo.try_room(100));
        h.relay_failed(&BrokerError::Disconnected, 40);
        assert_eq!(h.echo.owed(), 60);
        let other = crate::broker::envelope::encode(Kind::Message, &h.user, h.id + 1, b"{}");
        let parsed = crate::broker::envelope::decode(&other).expect("an envelope");
        h.on_envelope(&parsed, &other, other.len() - parsed.body.len());
        assert_eq!(h.echo.owed(), 60, "the same user's other session's copy is not ours");
    }

    #[test]
    fn a_resumable_session_holds_live_frames_during_a_replay_and_never_repeats_one() {
        use crate::broker::envelope::{decode, encode, stamp};
        let h = handle(16, 1 << 20);
        let bob = UserId::parse("bob").expect("valid");
        let mut cursor = Cursor::new(true);
        let live = |n: Option<u64>, cursor: &mut Cursor| {
            let raw = encode(Kind::Message, &bob, 9, format!(r#"{{"n":{}}}"#, n.unwrap_or(0)).as_bytes());
            let raw = match n {
                Some(n) => stamp(&raw, Seq { ms: 1, n }),
                None => raw,
            };
            let env = decode(&raw).expect("an envelope");
            h.on_envelope_at(&env, &raw, raw.len() - env.body.len(), Some(cursor));
        };
        // Live frames 3 to 5 arrive while the replay (up to 4) is read.
        for n in 3..=5 {
            live(Some(n), &mut cursor);
        }
        cursor.finish_replay(
            &h,
            vec![Bytes::from_static(b"replayed 3"), Bytes::from_static(b"replayed 4")],
            Some(Seq { ms: 1, n: 4 }),
        );
        live(Some(5), &mut cursor);
        live(Some(6), &mut cursor);
        live(None, &mut cursor);
        let work = tokio::runtime::Builder::new_current_thread().build().expect("rt").block_on(h.next_work());
        let frames: Vec<String> =
            work.expect("work").frames.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
        assert_eq!(
            frames,
            [
                "replayed 3",
                "replayed 4",
                r#"{"type":"relay","seq":"1-5","data":{"n":5}}"#,
                r#"{"type":"relay","seq":"1-6","data":{"n":6}}"#,
                r#"{"type":"relay","data":{"n":0}}"#,
            ]
        );
    }

    /// Bob's frames as `relay` events, by `seq` (`1-n`).
    fn bobs(h: &SessionHandle, cursor: &mut Cursor, ns: impl IntoIterator<Item = u64>) {
        use crate::broker::envelope::{decode, encode, stamp};
        let bob = UserId::parse("bob").expect("valid");
        for n in ns {
            let raw = stamp(&encode(Kind::Message, &bob, 9, format!(r#"{{"n":{n}}}"#).as_bytes()), seq(n));
            let env = decode(&raw).expect("an envelope");
            cursor.saw(env.seq);
            h.on_envelope_at(&env, &raw, raw.len() - env.body.len(), Some(cursor));
        }
    }

    fn seq(n: u64) -> Seq {
        Seq { ms: 1, n }
    }

    fn replayed(ns: impl IntoIterator<Item = u64>) -> Replayed {
        let frames = ns
            .into_iter()
            .map(|n| {
                (
                    Some(seq(n)),
                    crate::protocol::relay_event(Some(&seq(n).to_string()), format!(r#"{{"n":{n}}}"#).as_bytes()),
                )
            })
            .collect();
        Replayed::Frames(frames)
    }

    /// The `n`s (or `resync`s, as -1) the client was given so far.
    fn given(h: &SessionHandle) -> Vec<i64> {
        use futures_util::FutureExt;
        let Some(work) = h.next_work().now_or_never().flatten() else {
            return Vec::new();
        };
        work.frames
            .iter()
            .map(|f| {
                let event: serde_json::Value = serde_json::from_slice(f).expect("JSON");
                match event["type"].as_str() {
                    Some("resync") => -1,
                    _ => event["data"]["n"].as_i64().expect("a numbered relay"),
                }
            })
            .collect()
    }

    #[test]
    fn after_a_broker_reconnect_what_was_missed_comes_first_then_the_held_frames() {
        let h = handle(64, 1 << 20);
        let mut cursor = Cursor::new(false);
        bobs(&h, &mut cursor, 1..=3);
        assert_eq!(given(&h), [1, 2, 3]);
        // 4 and 5 were published while the subscriber was away; 5 to 7 came
        // live after it subscribed again, while the replay was read.
        assert_eq!(cursor.hold(), Some(seq(3)), "replayed from the newest seq heard");
        bobs(&h, &mut cursor, 5..=7);
        assert_eq!(given(&h), [0; 0], "held");
        cursor.finish_broker_replay(&h, replayed(4..=5));
        assert_eq!(given(&h), [4, 5, 6, 7], "each once, in order");
        bobs(&h, &mut cursor, [8]);
        assert_eq!(given(&h), [8]);
    }

    #[test]
    fn a_hole_in_the_history_gives_resync_then_only_newer_frames() {
        let h = handle(64, 1 << 20);
        let mut cursor = Cursor::new(false);
        bobs(&h, &mut cursor, [1]);
        assert_eq!(given(&h), [1]);
        assert_eq!(cursor.hold(), Some(seq(1)));
        // The history kept 70 to 90 only; 85 to 91 came live meanwhile.
        bobs(&h, &mut cursor, 85..=91);
        cursor.finish_broker_replay(&h, Replayed::Resync(Some(seq(90))));
        assert_eq!(given(&h), [-1, 91]);

        // A history that starts over (a restart without persistence) numbers anew.
        assert_eq!(cursor.hold(), Some(seq(91)));
        bobs(&h, &mut cursor, [2]);
        cursor.finish_broker_replay(&h, Replayed::Resync(None));
        assert_eq!(given(&h), [-1, 2]);
    }

    #[test]
    fn a_broker_reconnect_during_the_setups_replay_waits_for_both() {
        let h = handle(64, 1 << 20);
        // The client resumed after 2; live frames from 4 on arrived during the
        // setup's replay, then the subscriber lost 6 and 7.
        let mut cursor = Cursor::new(true);
        bobs(&h, &mut cursor, 4..=5);
        assert_eq!(cursor.hold(), Some(seq(5)));
        bobs(&h, &mut cursor, 7..=8);
        // The reconnect's replay ends first: nothing goes out before the setup's.
        cursor.finish_broker_replay(&h, replayed(6..=7));
        assert_eq!(given(&h), [0; 0]);
        let setup: Vec<Bytes> = [3, 4].iter().map(|n| Bytes::from(format!(r#"{{"data":{{"n":{n}}}}}"#))).collect();
        cursor.finish_replay(&h, setup, Some(seq(4)));
        assert_eq!(given(&h), [3, 4, 5, 6, 7, 8]);

        // A resumable session that heard nothing yet can only be told resync.
        let mut fresh = Cursor::new(false);
        assert_eq!(fresh.hold(), None);
        fresh.finish_broker_replay(&h, Replayed::Resync(None));
        assert_eq!(given(&h), [-1]);
    }
}
