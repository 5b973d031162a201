//! What a session knows of presence in its pair: the peer's live session,
//! its own join and presence, and when the peer's first offer came (for the
//! call-setup metric). It answers whether a join or leave is news; the
//! session decides what its client hears.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
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
/// The client heard `peer-left` because the peer's key stayed away (not
/// because the peer said goodbye): its key coming back is news.
const PEER_EXPIRED: u8 = 1 << 4;

/// A session's view of its pair's presence.
#[derive(Debug, Default)]
pub struct PeerView {
    /// The peer's live session as far as this session knows (0: none).
    session: AtomicU64,
    /// When the first offer from the peer arrived ([`now_ms`] plus one; 0:
    /// none yet).
    first_offer_at: AtomicU64,
    /// When a presence refresh first found the peer's key missing, in this
    /// unbroken run of misses (tenths of a second of [`now_ms`], plus one; 0:
    /// the key was there last time). 32 bits fit beside `flags`, so the
    /// handle stays as small as before.
    missing_since: AtomicU32,
    flags: AtomicU8,
}

/// `ms` ([`now_ms`]) in [`PeerView::missing_since`]'s unit.
fn tenths(ms: u64) -> u32 {
    u32::try_from(ms / 100 + 1).unwrap_or(u32::MAX)
}

impl PeerView {
    fn has(&self, flag: u8) -> bool {
        self.flags.load(Ordering::Relaxed) & flag != 0
    }

    /// Sets `flag`; true if it was set already.
    fn set(&self, flag: u8) -> bool {
        self.flags.fetch_or(flag, Ordering::Relaxed) & flag != 0
    }

    /// Clears `flag`; true if it was set.
    fn clear(&self, flag: u8) -> bool {
        self.flags.fetch_and(!flag, Ordering::Relaxed) & flag != 0
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
        // A join's key was set before it was published: a miss read earlier is stale.
        self.missing_since.store(0, Ordering::Relaxed);
        self.clear(PEER_EXPIRED);
        let known = self.session.swap(peer, Ordering::Relaxed);
        known != peer && self.has(WELCOMED)
    }

    /// The peer's session `peer` left. True when the client should hear of
    /// it: a leave from a session already replaced by a newer one is stale.
    pub fn left(&self, peer: SessionId) -> bool {
        // Gone by its own word: a presence read from before its leave is stale.
        self.clear(PEER_EXPIRED);
        let known = self.session.load(Ordering::Relaxed);
        let news = known == 0 || known == peer;
        if news {
            self.session.store(0, Ordering::Relaxed);
        }
        news
    }

    /// A presence refresh found the peer's key held by `peer`. True when the
    /// client should hear `peer-joined`: the peer was taken for gone (its key
    /// had stayed away), and it is back without a new join (its replica put
    /// its key back after a Redis restart, a stall or a partition).
    pub fn present(&self, peer: SessionId) -> bool {
        self.missing_since.store(0, Ordering::Relaxed);
        self.has(PEER_EXPIRED)
            && self.session.compare_exchange(0, peer, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            && self.clear(PEER_EXPIRED)
    }

    /// A presence refresh at `now` ([`now_ms`]) found the peer's key missing.
    /// True when that proves the peer gone: the key was missing on every
    /// refresh for more than `ttl_ms`, all of them since `healthy_since` (the
    /// broker neither failed a refresh nor lost its connection meanwhile). A
    /// missing key alone proves nothing: a Redis restart, `FLUSHALL` or a
    /// stall past the TTL wipes the keys of peers that are still there, and
    /// their replicas put them back on their next refresh.
    pub fn missing(&self, now: u64, healthy_since: u64, ttl_ms: u64) -> bool {
        let (now, since) = (tenths(now), self.missing_since.load(Ordering::Relaxed));
        if since == 0 || since < tenths(healthy_since) {
            self.missing_since.store(now, Ordering::Relaxed);
            return false;
        }
        u64::from(now.saturating_sub(since)) * 100 > ttl_ms
    }

    /// The peer was judged gone by its presence: forgets the known peer
    /// session and returns it, if there was one (its client hears
    /// `peer-left`, and `peer-joined` if the key comes back).
    pub fn expire(&self) -> Option<SessionId> {
        let gone = self.forget()?;
        self.set(PEER_EXPIRED);
        Some(gone)
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
