//! The part of a session that other tasks touch: its outbox, its close signal
//! and its heartbeat clock.
//!
//! The registry delivers into the outbox without waiting, so the broker's read
//! loop can't be slowed by a socket. A session whose queue is full, in messages
//! or in bytes, is closed with 1008 instead of being waited on.
//!
//! The outbox is a `VecDeque` behind a std `Mutex` (never held across an
//! `.await`) plus one `Notify` that wakes the session's task, not a channel:
//! an idle session holds no queue memory at all, where a tokio channel keeps a
//! block of 32 slots allocated for its whole life. Control frames (pong, ping)
//! live beside the queue and are written ahead of it. A close request wakes
//! the same `Notify`, so the session waits on one thing for both.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::broker::envelope::{Envelope, Kind};
use crate::broker::{BrokerError, RelayFailure, SessionId};
use crate::pair::{PairId, UserId};
use crate::protocol::{close, ServerEvent};

/// Why the server ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// The WebSocket close code.
    pub code: u16,
    /// The close reason text.
    pub reason: &'static str,
    /// The `reason` label of the sessions-closed metric.
    pub label: &'static str,
}

impl CloseReason {
    /// A newer session of the same user took over.
    pub const REPLACED: Self = Self { code: close::REPLACED, reason: "replaced", label: "replaced" };
    /// The server is shutting down.
    pub const SHUTDOWN: Self = Self { code: close::GOING_AWAY, reason: "server shutting down", label: "shutdown" };
    /// The server drains before a restart; reconnect elsewhere.
    pub const DRAIN: Self = Self { code: close::SERVICE_RESTART, reason: "service restart", label: "drain" };
    /// The socket did not read its queue fast enough.
    pub const SLOW_CONSUMER: Self =
        Self { code: close::POLICY, reason: "outbound queue overflow", label: "slow_consumer" };
    /// The socket failed; no close frame can be sent.
    pub const GONE: Self = Self { code: 1006, reason: "connection lost", label: "gone" };
    /// The client sent a binary frame.
    pub const BINARY: Self =
        Self { code: close::UNSUPPORTED_DATA, reason: "binary frames are not supported", label: "binary" };
    /// The client sent a message over the limit.
    pub const TOO_BIG: Self = Self { code: close::TOO_BIG, reason: "message too big", label: "too_big" };
    /// The client broke the WebSocket protocol.
    pub const PROTOCOL: Self = Self { code: 1002, reason: "protocol error", label: "protocol" };
    /// The client kept sending over its rate limit.
    pub const FLOOD: Self = Self { code: close::POLICY, reason: "rate limit exceeded", label: "flood" };
    /// The client answered no ping in time.
    pub const PING_TIMEOUT: Self = Self { code: close::GOING_AWAY, reason: "ping timeout", label: "ping_timeout" };
    /// The broker failed while the session opened.
    pub const BROKER_UNAVAILABLE: Self = Self { code: 1013, reason: "broker unavailable", label: "broker_unavailable" };

    /// Every reason, so that a handle stores one as a small index.
    const ALL: [Self; 11] = [
        Self::REPLACED,
        Self::SHUTDOWN,
        Self::DRAIN,
        Self::SLOW_CONSUMER,
        Self::GONE,
        Self::BINARY,
        Self::TOO_BIG,
        Self::PROTOCOL,
        Self::FLOOD,
        Self::PING_TIMEOUT,
        Self::BROKER_UNAVAILABLE,
    ];

    /// One more than this reason's place in [`CloseReason::ALL`] (0 stands for none).
    fn index(self) -> u8 {
        let at = Self::ALL.iter().position(|r| *r == self).expect("every reason is listed");
        u8::try_from(at + 1).expect("a few reasons")
    }

    fn from_index(index: u8) -> Option<Self> {
        Self::ALL.get(usize::from(index).checked_sub(1)?).copied()
    }
}

/// What the session has to write next, taken in one go by [`SessionHandle::next_work`].
#[derive(Debug, Default)]
pub struct Work {
    /// A ping's payload to answer (only the latest one is answered, as RFC 6455 allows).
    pub pong: Option<Box<[u8]>>,
    /// Send a ping.
    pub ping: bool,
    /// Text frames, oldest first.
    pub frames: VecDeque<Bytes>,
}

impl Work {
    /// Whether there is nothing to do yet.
    pub fn is_empty(&self) -> bool {
        self.pong.is_none() && !self.ping && self.frames.is_empty()
    }
}

#[derive(Debug, Default)]
struct Outbox {
    work: Work,
    /// Bytes queued and not yet written to the socket.
    bytes: usize,
}

/// Milliseconds on the process's monotonic clock, for the heartbeat fields.
pub fn now_ms() -> u64 {
    ms_at(tokio::time::Instant::now())
}

/// `at` in [`now_ms`] milliseconds.
pub fn ms_at(at: tokio::time::Instant) -> u64 {
    static START: OnceLock<tokio::time::Instant> = OnceLock::new();
    let start = *START.get_or_init(|| at);
    u64::try_from(at.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

/// Whether an envelope of `len` bytes may go out while `owed` bytes await
/// their echo: up to [`ECHO_WINDOW`], or one envelope of any size.
fn echo_fits(owed: usize, len: usize) -> bool {
    owed == 0 || owed + len <= ECHO_WINDOW
}

/// Most bytes of a session's own envelopes that may be on their way through
/// Redis and back to this instance's subscriber. Every instance receives its
/// own publications on the pair's channel; a sender that got ahead of its own
/// subscriber would grow that subscriber's Redis output buffer until Redis
/// cuts it (`client-output-buffer-limit pubsub`, 32 MB), losing everything in
/// flight. Waiting for the echo keeps each sender at the subscriber's pace.
pub const ECHO_WINDOW: usize = 256 * 1024;

/// Shared handle of one live session.
#[derive(Debug)]
pub struct SessionHandle {
    /// This session's random ID.
    pub id: SessionId,
    /// The session's user.
    pub user: UserId,
    /// The pair the session belongs to.
    pub pair: PairId,
    /// Set once the session removed its presence; the instance's presence
    /// refresh must not bring it back.
    presence_released: AtomicBool,
    outbox: Mutex<Outbox>,
    /// Wakes the session's task when `outbox` gains work or a close is asked for.
    wake: Notify,
    /// When a frame last came from the client ([`now_ms`]).
    heard_at: AtomicU64,
    /// When the heartbeat last pinged this socket ([`now_ms`]).
    pinged_at: AtomicU64,
    /// Bytes of this session's envelopes published whose copy has not come
    /// back on the pair's channel yet (see [`SessionHandle::echo_room`]).
    unechoed: AtomicUsize,
    /// Whether the session waits in [`SessionHandle::echo_room`]; echoes wake
    /// it only then, so the common case takes no lock per message.
    echo_waiting: AtomicBool,
    max_queued_messages: u32,
    max_queued_bytes: u32,
    own_join_seen: AtomicBool,
    /// Set once the welcome's `peerOnline` is decided; peer joins seen before
    /// that are folded into it rather than announced.
    welcomed: AtomicBool,
    /// The peer's live session as far as this session knows (0: none).
    peer_session: AtomicU64,
    /// The close reason's [`CloseReason::index`]; 0 while none was given.
    close: AtomicU8,
    /// When the first offer from the peer arrived ([`now_ms`] plus one; 0:
    /// none yet), for the call-setup metric.
    first_offer_at: AtomicU64,
    /// Whether the call-setup time was already observed.
    setup_observed: AtomicBool,
}

impl SessionHandle {
    /// Creates a handle whose outbox holds at most `max_messages` frames and `max_bytes` bytes.
    pub fn new(id: SessionId, user: UserId, pair: PairId, max_messages: usize, max_bytes: usize) -> Self {
        Self {
            id,
            user,
            pair,
            presence_released: AtomicBool::new(false),
            outbox: Mutex::default(),
            wake: Notify::new(),
            heard_at: AtomicU64::new(now_ms()),
            pinged_at: AtomicU64::new(0),
            unechoed: AtomicUsize::new(0),
            echo_waiting: AtomicBool::new(false),
            max_queued_messages: u32::try_from(max_messages.max(1)).unwrap_or(u32::MAX),
            max_queued_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            own_join_seen: AtomicBool::new(false),
            welcomed: AtomicBool::new(false),
            peer_session: AtomicU64::new(0),
            close: AtomicU8::new(0),
            first_offer_at: AtomicU64::new(0),
            setup_observed: AtomicBool::new(false),
        }
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // Every critical section is a few field updates; a panic can't leave it half done.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the session's pending work and wakes its task.
    fn order(&self, change: impl FnOnce(&mut Work)) {
        change(&mut self.outbox().work);
        self.wake.notify_one();
    }

    /// Queues a text frame for the socket without waiting. Closes the session
    /// with 1008 when its queue is full.
    pub fn deliver(&self, frame: Bytes) {
        if self.is_closing() {
            // Closing: a gap followed by later frames would be worse than nothing.
            return;
        }
        {
            let mut outbox = self.outbox();
            let len = frame.len();
            let full = outbox.work.frames.len() >= self.max_queued_messages as usize
                || outbox.bytes + len > self.max_queued_bytes as usize;
            if !full {
                outbox.bytes += len;
                outbox.work.frames.push_back(frame);
                drop(outbox);
                self.wake.notify_one();
                return;
            }
        }
        self.close(CloseReason::SLOW_CONSUMER);
    }

    /// Tells the handle that `len` queued bytes went onto the socket.
    pub fn sent(&self, len: usize) {
        let mut outbox = self.outbox();
        outbox.bytes = outbox.bytes.saturating_sub(len);
    }

    /// Asks the session to answer a ping with `payload`.
    pub fn pong(&self, payload: Box<[u8]>) {
        self.order(|w| w.pong = Some(payload));
    }

    /// Asks the session to send a ping, and notes when.
    pub fn ping(&self) {
        self.pinged_at.store(now_ms(), Ordering::Relaxed);
        self.order(|w| w.ping = true);
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

    /// Takes everything there is to write, waiting until there is something.
    /// The queue's memory goes with it, so an idle session keeps none. Returns
    /// `None` once a close was asked for: nothing queued is written after that.
    pub async fn next_work(&self) -> Option<Work> {
        loop {
            if self.is_closing() {
                return None;
            }
            {
                let mut outbox = self.outbox();
                if !outbox.work.is_empty() {
                    return Some(std::mem::take(&mut outbox.work));
                }
            }
            // `notify_one` stores a permit when nobody waits, so no wake-up is lost here.
            self.wake.notified().await;
        }
    }

    /// Resolves once a close was asked for. It may take wake-ups meant for
    /// [`SessionHandle::next_work`], which looks at the outbox before it waits.
    pub async fn closed(&self) {
        while !self.is_closing() {
            self.wake.notified().await;
        }
    }

    /// Waits until this session may publish an envelope of `len` bytes, and
    /// counts it: at most [`ECHO_WINDOW`] bytes (or one envelope of any size)
    /// may be waiting for their echo. Returns false, counting nothing, if the
    /// session closes meanwhile. Called by the session's own task only.
    pub async fn echo_room(&self, len: usize) -> bool {
        loop {
            if self.try_echo_room(len) {
                return true;
            }
            // Full: register, say so, then look again, so an echo that lands
            // in between still wakes us (all SeqCst: see `echoed`).
            let room = self.wake.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            self.echo_waiting.store(true, Ordering::SeqCst);
            // `close` wakes this waiter too, after setting its reason.
            if !echo_fits(self.unechoed.load(Ordering::SeqCst), len) && !self.is_closing() {
                room.await;
            }
            self.echo_waiting.store(false, Ordering::SeqCst);
            if self.is_closing() {
                return false;
            }
        }
    }

    /// [`SessionHandle::echo_room`] without the wait: counts `len` and
    /// returns true if it fits now.
    pub fn try_echo_room(&self, len: usize) -> bool {
        // Only the session adds and echoes only subtract, so a fit seen is a fit kept.
        let fits = echo_fits(self.unechoed.load(Ordering::SeqCst), len);
        if fits {
            self.unechoed.fetch_add(len, Ordering::SeqCst);
        }
        fits
    }

    /// `len` bytes of this session's envelopes came back (or never will).
    pub fn echoed(&self, len: usize) {
        let _ = self.unechoed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| Some(owed.saturating_sub(len)));
        // A session that flagged itself after this load saw the new count itself.
        if self.echo_waiting.load(Ordering::SeqCst) {
            self.wake.notify_waiters();
        }
    }

    /// Forgets every awaited echo: the subscriber lost its connection, and what
    /// was published meanwhile will never come back.
    pub fn forget_echoes(&self) {
        self.unechoed.store(0, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    /// Asks the session to close; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.close.compare_exchange(0, reason.index(), Ordering::AcqRel, Ordering::Acquire);
        // Wake whoever waits now (for work, or in `echo_room`), and leave a
        // permit for a wait about to begin.
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.close.load(Ordering::Acquire) != 0
    }

    /// The reason given to [`SessionHandle::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_index(self.close.load(Ordering::Acquire))
    }

    /// Merges the peer's session learned from presence with any join already
    /// received, and marks the welcome as decided. Returns `peerOnline`.
    /// Called under the registry's lock, so no envelope slips in between.
    pub(crate) fn finish_setup(&self, from_presence: Option<SessionId>) -> bool {
        if let Some(peer) = from_presence {
            let _ = self.peer_session.compare_exchange(0, peer, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.welcomed.store(true, Ordering::Relaxed);
        self.peer_session.load(Ordering::Relaxed) != 0
    }

    /// On this session's first answer after an offer: the time since that offer.
    pub fn call_setup_time(&self) -> Option<Duration> {
        let offered = self.first_offer_at.load(Ordering::Relaxed).checked_sub(1)?;
        let elapsed = Duration::from_millis(now_ms().saturating_sub(offered));
        (!self.setup_observed.swap(true, Ordering::Relaxed)).then_some(elapsed)
    }

    /// Forgets the known peer session and returns it, if there was one.
    pub fn forget_peer(&self) -> Option<SessionId> {
        Some(self.peer_session.swap(0, Ordering::Relaxed)).filter(|&s| s != 0)
    }

    /// The peer's presence expired (its replica died without announcing a
    /// leave): a peer this session knew of is reported as gone.
    pub fn peer_presence_gone(&self) {
        if let Some(gone) = self.forget_peer() {
            tracing::info!(session = self.id, peer_session = format_args!("{gone:x}"), "peer presence expired");
            self.deliver(ServerEvent::PeerLeft { peer_id: self.pair.other(&self.user).as_str() }.to_bytes());
        }
    }

    /// Records that the session removed its own presence.
    pub fn mark_presence_released(&self) {
        self.presence_released.store(true, Ordering::Relaxed);
    }

    /// Whether the session removed its own presence.
    pub fn presence_released(&self) -> bool {
        self.presence_released.load(Ordering::Relaxed)
    }

    /// Acts on one envelope from the pair's channel. `raw` holds the whole
    /// envelope so a relayed body is sliced from it, not copied.
    pub fn on_envelope(&self, env: &Envelope<'_>, raw: &Bytes, body_at: usize) {
        let from_me = env.from == self.user.as_str();
        match (env.kind, from_me) {
            (Kind::Message | Kind::Answer, false) => self.deliver(raw.slice(body_at..)),
            (Kind::Offer, false) => {
                let _ = self.first_offer_at.compare_exchange(0, now_ms() + 1, Ordering::Relaxed, Ordering::Relaxed);
                self.deliver(raw.slice(body_at..));
            }
            (Kind::Message | Kind::Offer | Kind::Answer, true) => {
                if env.session == self.id {
                    self.echoed(raw.len());
                }
            }
            (Kind::Join, true) if env.session == self.id => self.own_join_seen.store(true, Ordering::Relaxed),
            // A later join of the same user, in the channel's single order, replaces this one.
            (Kind::Join, true) if self.own_join_seen.load(Ordering::Relaxed) => self.close(CloseReason::REPLACED),
            (Kind::Join, true) => {}
            (Kind::Join, false) => {
                // Known already, or folded into the welcome's peerOnline: not news.
                let known = self.peer_session.swap(env.session, Ordering::Relaxed);
                if known != env.session && self.welcomed.load(Ordering::Relaxed) {
                    self.deliver(ServerEvent::PeerJoined { peer_id: env.from }.to_bytes());
                }
            }
            (Kind::Leave, true) => {}
            (Kind::Leave, false) => {
                // A leave from a session already replaced by a newer one is stale.
                let known = self.peer_session.load(Ordering::Relaxed);
                if known == 0 || known == env.session {
                    self.peer_session.store(0, Ordering::Relaxed);
                    self.deliver(ServerEvent::PeerLeft { peer_id: env.from }.to_bytes());
                }
            }
        }
    }
}

impl RelayFailure for SessionHandle {
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

    fn handle(max_messages: usize, max_bytes: usize) -> SessionHandle {
        let (alice, bob) = (UserId::parse("alice").expect("valid"), UserId::parse("bob").expect("valid"));
        let pair = PairId::new(&alice, &bob).expect("two users");
        SessionHandle::new(7, alice, pair, max_messages, max_bytes)
    }

    fn take(h: &SessionHandle) -> Option<Work> {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(h.next_work())
    }

    #[test]
    fn frames_come_out_in_order_and_the_idle_queue_keeps_no_memory() {
        let h = handle(16, 1 << 20);
        for i in 0..5u8 {
            h.deliver(Bytes::from(vec![i; 10]));
        }
        let work = take(&h).expect("work");
        let firsts: Vec<u8> = work.frames.iter().map(|f| f[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 3, 4]);
        assert_eq!(h.outbox().work.frames.capacity(), 0, "the queue's allocation left with the work");
        assert_eq!(h.outbox().bytes, 50, "bytes count until written");
        for frame in &work.frames {
            h.sent(frame.len());
        }
        assert_eq!(h.outbox().bytes, 0);
    }

    #[test]
    fn a_full_queue_closes_the_session_as_a_slow_consumer() {
        let by_count = handle(2, 1 << 20);
        for _ in 0..3 {
            by_count.deliver(Bytes::from_static(b"x"));
        }
        assert_eq!(by_count.close_reason(), Some(CloseReason::SLOW_CONSUMER));

        let by_bytes = handle(100, 10);
        by_bytes.deliver(Bytes::from_static(b"123456"));
        assert_eq!(by_bytes.close_reason(), None);
        by_bytes.deliver(Bytes::from_static(b"123456"));
        assert_eq!(by_bytes.close_reason(), Some(CloseReason::SLOW_CONSUMER));
    }

    #[test]
    fn control_orders_wake_the_session_and_a_close_ends_all_writing() {
        let h = handle(16, 1 << 20);
        h.pong(Box::from(&b"a"[..]));
        h.pong(Box::from(&b"b"[..]));
        h.ping();
        let work = take(&h).expect("work");
        assert_eq!(work.pong.as_deref(), Some(&b"b"[..]), "the latest ping is answered");
        assert!(work.ping && work.frames.is_empty());
        assert_ne!(h.heartbeat().1, 0, "the ping's time is noted");
        h.deliver(Bytes::from_static(b"queued"));
        h.close(CloseReason::REPLACED);
        assert!(take(&h).is_none(), "nothing queued is written after a close");
        h.deliver(Bytes::from_static(b"late"));
        assert!(h.outbox().work.frames.len() <= 1, "nothing is queued after a close");
        assert_eq!(h.close_reason(), Some(CloseReason::REPLACED));
        h.close(CloseReason::SHUTDOWN);
        assert_eq!(h.close_reason(), Some(CloseReason::REPLACED), "the first reason wins");
    }

    #[tokio::test]
    async fn a_close_wakes_a_session_that_waits_for_work() {
        let h = Arc::new(handle(16, 1 << 20));
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.next_work().await.is_none() }
        });
        let closed = tokio::spawn({
            let h = h.clone();
            async move { h.closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && !closed.is_finished());
        h.close(CloseReason::SHUTDOWN);
        assert!(waiting.await.expect("task"), "woken, with nothing to write");
        closed.await.expect("task");
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
        h.close(CloseReason::SHUTDOWN);
        assert!(!blocked.await.expect("task"));
        h.forget_echoes();
        assert_eq!(h.unechoed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn another_sessions_copy_or_a_failed_publish_settle_only_what_they_owe() {
        let h = handle(16, 1 << 20);
        h.unechoed.store(100, Ordering::Relaxed);
        h.relay_failed(&BrokerError::Disconnected, 40);
        assert_eq!(h.unechoed.load(Ordering::Relaxed), 60);
        let other = crate::broker::envelope::encode(Kind::Message, &h.user, h.id + 1, b"{}");
        let parsed = crate::broker::envelope::decode(&other).expect("an envelope");
        h.on_envelope(&parsed, &other, other.len() - parsed.body.len());
        assert_eq!(h.unechoed.load(Ordering::Relaxed), 60, "the same user's other session's copy is not ours");
    }
}
