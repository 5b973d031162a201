//! What a session knows of presence in its pair: the peer's live session,
//! its own join and presence, and when the peer's first offer came (for the
//! call-setup metric). It answers whether a join or leave is news; the
//! session decides what its client hears.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use super::clock::now_ms;
use crate::broker::SessionId;

/// This session's own join came back on the pair's channel.
const OWN_JOIN_SEEN: u8 = 1;
/// The welcome's `peerOnline` is decided; joins after that are news.
const WELCOMED: u8 = 1 << 1;
/// The call-setup time was observed.
const SETUP_OBSERVED: u8 = 1 << 2;
/// The session removed its own presence; the instance's refresh must not bring it back.
const PRESENCE_RELEASED: u8 = 1 << 3;

/// A session's view of its pair's presence.
#[derive(Debug, Default)]
pub struct PeerView {
    /// The peer's live session as far as this session knows (0: none).
    session: AtomicU64,
    /// When the first offer from the peer arrived ([`now_ms`] plus one; 0:
    /// none yet).
    first_offer_at: AtomicU64,
    flags: AtomicU8,
}

impl PeerView {
    fn has(&self, flag: u8) -> bool {
        self.flags.load(Ordering::Relaxed) & flag != 0
    }

    /// Sets `flag`; true if it was set already.
    fn set(&self, flag: u8) -> bool {
        self.flags.fetch_or(flag, Ordering::Relaxed) & flag != 0
    }

    /// Merges the peer's session learned from presence with any join already
    /// received, and marks the welcome as decided. Returns `peerOnline`.
    /// Called under the registry's lock, so no envelope slips in between.
    pub(crate) fn finish_setup(&self, from_presence: Option<SessionId>) -> bool {
        if let Some(peer) = from_presence {
            let _ = self.session.compare_exchange(0, peer, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.set(WELCOMED);
        self.session.load(Ordering::Relaxed) != 0
    }

    /// The peer's session `peer` joined. True when the client should hear of
    /// it: a new session, after the welcome (earlier ones fold into `peerOnline`).
    pub fn joined(&self, peer: SessionId) -> bool {
        let known = self.session.swap(peer, Ordering::Relaxed);
        known != peer && self.has(WELCOMED)
    }

    /// The peer's session `peer` left. True when the client should hear of
    /// it: a leave from a session already replaced by a newer one is stale.
    pub fn left(&self, peer: SessionId) -> bool {
        let known = self.session.load(Ordering::Relaxed);
        let news = known == 0 || known == peer;
        if news {
            self.session.store(0, Ordering::Relaxed);
        }
        news
    }

    /// Forgets the known peer session and returns it, if there was one.
    pub fn forget(&self) -> Option<SessionId> {
        Some(self.session.swap(0, Ordering::Relaxed)).filter(|&s| s != 0)
    }

    /// This session's own join came back; true if it had before.
    pub fn own_join(&self) -> bool {
        self.set(OWN_JOIN_SEEN)
    }

    /// Whether this session's own join came back already.
    pub fn own_join_seen(&self) -> bool {
        self.has(OWN_JOIN_SEEN)
    }

    /// An offer from the peer arrived; the first one starts the call-setup clock.
    pub fn offered(&self) {
        let _ = self.first_offer_at.compare_exchange(0, now_ms() + 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// On this session's first answer after an offer: the time since that offer.
    pub fn call_setup_time(&self) -> Option<Duration> {
        let offered = self.first_offer_at.load(Ordering::Relaxed).checked_sub(1)?;
        let elapsed = Duration::from_millis(now_ms().saturating_sub(offered));
        (!self.set(SETUP_OBSERVED)).then_some(elapsed)
    }

    /// Records that the session removed its own presence.
    pub fn mark_presence_released(&self) {
        self.set(PRESENCE_RELEASED);
    }

    /// Whether the session removed its own presence.
    pub fn presence_released(&self) -> bool {
        self.has(PRESENCE_RELEASED)
    }
}
