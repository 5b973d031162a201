//! A pair's short history, for resuming sessions (`SWITCHBOARD_RESUME_SECS`).
//!
//! With history on, every envelope a broker publishes on a pair's channel is
//! first appended to the pair's history, and carries the entry's [`Seq`] in
//! its header (see [`super::envelope`]). A session that comes back names the
//! last `Seq` its client received: if that entry is still in the history,
//! nothing after it was lost, and the broker returns everything after it
//! ([`super::Broker::replay`]); if not, the history no longer covers the gap.
//!
//! Redis keeps the history in a stream per pair (the entry ID is the `Seq`);
//! the in-memory broker in a [`Ring`] per pair.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// How many entries a pair's history keeps (Redis trims at about this many,
/// `MAXLEN ~`, so it may keep a few more).
pub const HISTORY_LEN: usize = 64;

/// A position in a pair's history: a Redis stream entry ID, `<ms>-<n>`. The
/// in-memory broker counts with `n` alone (`0-<n>`). Ordered as Redis orders IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence part.
    pub n: u64,
}

impl Seq {
    /// Parses `<ms>-<n>`, as Redis writes stream IDs (no signs, no spaces).
    pub fn parse(text: &str) -> Option<Self> {
        let (ms, n) = text.split_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(n) {
            return None;
        }
        Some(Self { ms: ms.parse().ok()?, n: n.parse().ok()? })
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.n)
    }
}

/// What a replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// The named entry is in the history: these envelopes (with their `Seq`
    /// in the header) followed it, oldest first, and `last` is the history's
    /// newest entry when it was read (the named one if nothing followed).
    Covered {
        /// The envelopes after the named entry.
        envelopes: Vec<Bytes>,
        /// The newest entry.
        last: Seq,
    },
    /// The named entry is gone (expired, trimmed, or never there): what
    /// followed it can't be told. `last` is the history's newest entry, if
    /// any: everything up to it is lost to the client.
    Gap {
        /// The newest entry.
        last: Option<Seq>,
    },
}

/// The in-memory broker's history of one pair: the last [`HISTORY_LEN`]
/// envelopes (without their `Seq`), forgotten as a whole `window` after the
/// last append, as Redis expires the stream.
#[derive(Debug)]
pub struct Ring {
    entries: VecDeque<(Seq, Bytes)>,
    touched: Instant,
}

impl Ring {
    /// An empty history.
    pub fn new(now: Instant) -> Self {
        Self { entries: VecDeque::with_capacity(HISTORY_LEN), touched: now }
    }

    /// Whether the history expired at `now`.
    pub fn expired(&self, now: Instant, window: Duration) -> bool {
        now.duration_since(self.touched) >= window
    }

    /// Appends `envelope` as `seq` (greater than any before), dropping the oldest beyond [`HISTORY_LEN`].
    pub fn push(&mut self, seq: Seq, envelope: Bytes, now: Instant) {
        if self.entries.len() == HISTORY_LEN {
            self.entries.pop_front();
        }
        self.entries.push_back((seq, envelope));
        self.touched = now;
    }

    /// What followed `after`, with each envelope's `Seq` put in by `stamp`.
    pub fn replay(&self, after: Seq, stamp: impl Fn(&Bytes, Seq) -> Bytes) -> Replay {
        let newest = self.entries.back().map(|(seq, _)| *seq);
        let Ok(at) = self.entries.binary_search_by(|(seq, _)| seq.cmp(&after)) else {
            return Replay::Gap { last: newest };
        };
        let envelopes = self.entries.iter().skip(at + 1).map(|(seq, env)| stamp(env, *seq)).collect();
        Replay::Covered { envelopes, last: newest.unwrap_or(after) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u64) -> Seq {
        Seq { ms: 0, n }
    }

    #[test]
    fn seqs_parse_print_and_order_like_stream_ids() {
        let id = Seq::parse("1700000000000-12").unwrap();
        assert_eq!(id, Seq { ms: 1_700_000_000_000, n: 12 });
        assert_eq!(id.to_string(), "1700000000000-12");
        assert!(Seq::parse("5-10").unwrap() > Seq::parse("5-9").unwrap(), "numeric, not textual");
        assert!(Seq::parse("6-0").unwrap() > Seq::parse("5-99").unwrap());
        for bad in ["", "5", "-5", "5-", "5-+1", " 5-1", "a-1", "1-2-3", "99999999999999999999999-1"] {
            assert_eq!(Seq::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_ring_replays_what_followed_a_kept_entry_and_nothing_else() {
        let now = Instant::now();
        let mut ring = Ring::new(now);
        for n in 1..=HISTORY_LEN as u64 + 10 {
            ring.push(seq(n), Bytes::from(n.to_string()), now);
        }
        let stamp = |env: &Bytes, s: Seq| Bytes::from(format!("{s}:{}", String::from_utf8_lossy(env)));
        // The first 10 fell out: a client that last saw one of them has a gap.
        let last = seq(HISTORY_LEN as u64 + 10);
        assert_eq!(ring.replay(seq(10), stamp), Replay::Gap { last: Some(last) });
        assert_eq!(ring.replay(seq(1000), stamp), Replay::Gap { last: Some(last) }, "a Seq never given out");
        assert_eq!(Ring::new(now).replay(seq(1), stamp), Replay::Gap { last: None });
        match ring.replay(seq(HISTORY_LEN as u64 + 7), stamp) {
            Replay::Covered { envelopes, last: newest } => {
                assert_eq!(envelopes, ["0-72:72", "0-73:73", "0-74:74"].map(Bytes::from));
                assert_eq!(newest, last);
            }
            Replay::Gap { .. } => panic!("covered"),
        }
        assert_eq!(ring.replay(last, stamp), Replay::Covered { envelopes: vec![], last });
        assert_eq!(ring.replay(seq(11), stamp), Replay::Covered { envelopes: ring_after(&ring, 11), last });
    }

    fn ring_after(ring: &Ring, n: u64) -> Vec<Bytes> {
        ring.entries
            .iter()
            .filter(|(s, _)| s.n > n)
            .map(|(s, e)| Bytes::from(format!("{s}:{}", String::from_utf8_lossy(e))))
            .collect()
    }

    #[test]
    fn a_ring_expires_a_window_after_its_last_append() {
        let start = Instant::now();
        let mut ring = Ring::new(start);
        let window = Duration::from_secs(30);
        ring.push(seq(1), Bytes::new(), start + Duration::from_secs(20));
        assert!(!ring.expired(start + Duration::from_secs(49), window));
        assert!(ring.expired(start + Duration::from_secs(50), window));
    }
}
