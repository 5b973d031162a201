//! The part of a session that other tasks touch: its outbox and its close signal.
//!
//! The registry delivers into the outbox with `try_send` and never waits, so the
//! broker's read loop can't be slowed by a socket. A session whose queue is full,
//! in messages or in bytes, is closed with 1008 instead of being waited on.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::envelope::{Envelope, Kind};
use crate::broker::{BrokerError, RelayFailure, SessionId};
use crate::pair::UserId;
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
}

/// Shared handle of one live session.
#[derive(Debug)]
pub struct SessionHandle {
    /// This session's random ID.
    pub id: SessionId,
    /// The session's user.
    pub user: UserId,
    outbox: mpsc::Sender<Bytes>,
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    own_join_seen: AtomicBool,
    /// Set once the welcome's `peerOnline` is decided; peer joins seen before
    /// that are folded into it rather than announced.
    welcomed: AtomicBool,
    /// The peer's live session as far as this session knows (0: none).
    peer_session: AtomicU64,
    close: OnceLock<CloseReason>,
    /// When the first offer from the peer arrived, for the call-setup metric.
    first_offer_at: OnceLock<Instant>,
    /// Whether the call-setup time was already observed.
    setup_observed: AtomicBool,
    ended: CancellationToken,
}

impl SessionHandle {
    /// Creates a handle and the receiving end of its outbox.
    pub fn new(id: SessionId, user: UserId, max_messages: usize, max_bytes: usize) -> (Self, mpsc::Receiver<Bytes>) {
        let (outbox, rx) = mpsc::channel(max_messages.max(1));
        let handle = Self {
            id,
            user,
            outbox,
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: max_bytes,
            own_join_seen: AtomicBool::new(false),
            welcomed: AtomicBool::new(false),
            peer_session: AtomicU64::new(0),
            close: OnceLock::new(),
            first_offer_at: OnceLock::new(),
            setup_observed: AtomicBool::new(false),
            ended: CancellationToken::new(),
        };
        (handle, rx)
    }

    /// Queues a text frame for the socket without waiting. Closes the session
    /// with 1008 when its queue is full.
    pub fn deliver(&self, frame: Bytes) {
        if self.ended.is_cancelled() {
            // Closing: a gap followed by later frames would be worse than nothing.
            return;
        }
        let len = frame.len();
        let queued = self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(CloseReason::SLOW_CONSUMER);
            return;
        }
        match self.outbox.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.close(CloseReason::SLOW_CONSUMER);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
        }
    }

    /// Tells the handle that the writer put `len` queued bytes on the socket.
    pub fn sent(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Asks the session to close; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.close.set(reason);
        self.ended.cancel();
    }

    /// The reason given to [`SessionHandle::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.get().copied()
    }

    /// Resolves when someone asked the session to close.
    pub fn closing(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.ended.cancelled()
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
        let offered = *self.first_offer_at.get()?;
        (!self.setup_observed.swap(true, Ordering::Relaxed)).then(|| offered.elapsed())
    }

    /// Forgets the known peer session and returns it, if there was one.
    pub fn forget_peer(&self) -> Option<SessionId> {
        Some(self.peer_session.swap(0, Ordering::Relaxed)).filter(|&s| s != 0)
    }

    /// Acts on one envelope from the pair's channel. `raw` holds the whole
    /// envelope so a relayed body is sliced from it, not copied.
    pub fn on_envelope(&self, env: &Envelope<'_>, raw: &Bytes, body_at: usize) {
        let from_me = env.from == self.user.as_str();
        match (env.kind, from_me) {
            (Kind::Message | Kind::Answer, false) => self.deliver(raw.slice(body_at..)),
            (Kind::Offer, false) => {
                let _ = self.first_offer_at.set(Instant::now());
                self.deliver(raw.slice(body_at..));
            }
            (Kind::Message | Kind::Offer | Kind::Answer, true) => {}
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
    fn relay_failed(&self, error: &BrokerError) {
        tracing::warn!(error = %error, session = self.id, "publish failed");
        crate::metrics::reject("broker_unavailable");
        let message = "the message could not be relayed: the broker is unavailable";
        self.deliver(ServerEvent::Error { code: "broker_unavailable", message }.to_bytes());
    }
}
