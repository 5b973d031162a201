//! When a relay renews its pair's history TTL (with history on, Redis).
//!
//! Setting the stream's TTL with every relayed message was one more write
//! per message in the append script (measured by `bench/run`: about a sixth
//! of the history's Redis CPU). Instead a relay renews it only when this
//! instance has not renewed that channel's stream for [`RENEW_EVERY`], and
//! the TTL is the resume window plus that period: a stream still lives at
//! least the window after its last entry (the renewal before that entry was
//! at most one period earlier), and at most one period longer.
//!
//! The table is fixed (a few thousand atomics per instance, no lock, no
//! growth). Each slot holds a channel's fingerprint and when it last renewed;
//! two channels that share a slot only renew more often, never less.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often, at most, one instance renews one stream's TTL.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Slots in the table (a power of two).
const SLOTS: usize = 4096;
/// Milliseconds fit the low 48 bits (8,900 years); the fingerprint, the rest.
const MS_BITS: u32 = 48;
const MS_MASK: u64 = (1 << MS_BITS) - 1;

/// The last renewal of each channel's stream, by a hash of its name.
pub struct Renewals {
    slots: Box<[AtomicU64]>,
    start: Instant,
}

impl Default for Renewals {
    fn default() -> Self {
        Self { slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(), start: Instant::now() }
    }
}

impl std::fmt::Debug for Renewals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewals").finish_non_exhaustive()
    }
}

impl Renewals {
    /// Whether a relay on `channel` now should renew its stream's TTL (and,
    /// if so, notes that it does).
    pub fn due(&self, channel: &str) -> bool {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.due_at(channel, now)
    }

    fn due_at(&self, channel: &str, now_ms: u64) -> bool {
        let (at, tag) = place(channel);
        let slot = &self.slots[at];
        let mark = slot.load(Ordering::Relaxed);
        let every = u64::try_from(RENEW_EVERY.as_millis()).unwrap_or(u64::MAX);
        if mark >> MS_BITS == tag && now_ms.saturating_sub(mark & MS_MASK) < every {
            return false;
        }
        slot.store((tag << MS_BITS) | (now_ms & MS_MASK), Ordering::Relaxed);
        true
    }
}

/// A channel's slot and fingerprint (never zero, so an empty slot matches
/// no channel).
fn place(channel: &str) -> (usize, u64) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    channel.hash(&mut hasher);
    let hash = hasher.finish();
    ((hash as usize) & (SLOTS - 1), (hash >> MS_BITS) | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_renews_once_per_period_and_others_are_not_held_back() {
        let renewals = Renewals::default();
        let every = u64::try_from(RENEW_EVERY.as_millis()).unwrap();
        assert!(renewals.due_at("a", 1_000), "the first relay renews");
        assert!(!renewals.due_at("a", 1_001), "the next, within the period, does not");
        assert!(!renewals.due_at("a", 1_000 + every - 1));
        assert!(renewals.due_at("a", 1_000 + every), "one period later it renews again");
        assert!(!renewals.due_at("a", 1_000 + every + 10));
        // Another channel in the same slot renews on its first relay, and
        // then "a" renews again at once: sharing a slot only renews more often.
        let (slot, tag) = place("a");
        let other = (0..).map(|i| format!("pair:{i}")).find(|c| place(c).0 == slot && place(c).1 != tag).unwrap();
        assert!(renewals.due_at(&other, 1_000 + every + 20), "{other} renews");
        assert!(renewals.due_at("a", 1_000 + every + 30), "a is not held back by {other}");
    }
}
