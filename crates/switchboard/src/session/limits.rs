//! Per-socket rate limit: a token bucket, plus a flood rule.
//!
//! Every client frame but a close takes from the bucket: the first frame of
//! a message takes a whole token ([`MESSAGE`]); a ping, a pong or a
//! continuation frame takes a sixteenth ([`FRAME`]), so a client that
//! fragments its messages or pings now and then never notices, and a flood
//! of them is held like a flood of messages. Tokens refill at `rate` per
//! second up to `burst`. A frame without its share is dropped (the sender
//! gets `rate_limited`). More than `burst` drops within one 10-second window
//! is a flood, and the socket is closed with 1008.
//!
//! A client is charged only for what it sent in time. While the session does
//! not read (it waits for room in the broker's queue, say, while Redis is
//! slow), the client's frames pile up in the socket's buffer and would later
//! be read in one go, as if sent as one burst. So the time the session spent
//! not reading earns tokens at `rate` beyond `burst` ([`RateLimit::stalled`]),
//! as if those frames had been read as they came; once the session has read
//! everything waiting ([`RateLimit::caught_up`]), what is left of that
//! credit lapses, and the bucket holds at most `burst` again.

use std::time::Duration;

use tokio::time::Instant;

/// The window in which drops are counted for the flood rule.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// What the first frame of a message takes from the bucket.
pub const MESSAGE: f32 = 1.0;
/// What a ping, a pong or a continuation frame takes (exact in `f32`).
pub const FRAME: f32 = 1.0 / 16.0;

/// Most tokens a bucket holds, credit included: every count of sixteenths
/// below it is exact in `f32`.
const MAX_TOKENS: f32 = (1u32 << 20) as f32;

/// What to do with one incoming frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Relay it.
    Pass,
    /// Drop it and tell the sender.
    Drop,
    /// Drop it and close the socket.
    Flood,
}

/// A token bucket with a flood counter.
#[derive(Debug)]
pub struct RateLimit {
    // `f32` is exact for any number of sixteenths of a token a bucket can
    // hold here (at most 2^20 tokens), and keeps every idle socket's limiter small.
    rate: f32,
    burst: f32,
    tokens: f32,
    drops: u32,
    last: Instant,
    window_start: Instant,
}

impl RateLimit {
    /// A full bucket of `burst` tokens refilling at `rate` per second.
    pub fn new(rate: u32, burst: u32) -> Self {
        let now = Instant::now();
        Self { rate: rate as f32, burst: burst as f32, tokens: burst as f32, last: now, window_start: now, drops: 0 }
    }

    /// Refills up to `now`: at `rate`, up to `burst` (a credit above it is
    /// kept, not added to).
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst.max(self.tokens));
        self.last = now;
    }

    /// The session did not read from `from` to `to`: what the client sent
    /// meanwhile waits in the socket, and is charged as if it had been read
    /// as it came. The bucket refills as usual up to `from`, then gains
    /// `rate` tokens a second for the stall, past `burst`.
    pub fn stalled(&mut self, from: Instant, to: Instant) {
        self.refill(from);
        let stall = to.saturating_duration_since(self.last).as_secs_f32();
        self.tokens = (self.tokens + stall * self.rate).min(MAX_TOKENS.max(self.burst));
        self.last = to;
    }

    /// The session has read everything the client sent so far: credit from
    /// stalls lapses.
    pub fn caught_up(&mut self) {
        self.tokens = self.tokens.min(self.burst);
    }

    /// Takes `cost` ([`MESSAGE`] or [`FRAME`]) for a frame arriving at `now`.
    pub fn check(&mut self, now: Instant, cost: f32) -> Verdict {
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            return Verdict::Pass;
        }
        if now.saturating_duration_since(self.window_start) > FLOOD_WINDOW {
            self.window_start = now;
            self.drops = 0;
        }
        self.drops += 1;
        if self.drops as f32 > self.burst {
            Verdict::Flood
        } else {
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_then_flood() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(10, 5);
        for _ in 0..5 {
            assert_eq!(limit.check(t0, MESSAGE), Verdict::Pass);
        }
        assert_eq!(limit.check(t0, MESSAGE), Verdict::Drop);
        // 100 ms later one token is back.
        assert_eq!(limit.check(t0 + Duration::from_millis(100), MESSAGE), Verdict::Pass);
        let later = t0 + Duration::from_millis(100);
        for _ in 0..4 {
            assert_eq!(limit.check(later, MESSAGE), Verdict::Drop);
        }
        assert_eq!(limit.check(later, MESSAGE), Verdict::Flood, "more than `burst` drops in the window");
    }

    #[test]
    fn a_backlog_from_a_stall_is_charged_as_if_read_in_time() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(10, 2);
        // A client at 5/s while the session did not read for 3 s: 15 frames
        // wait, and are read at once when the stall ends.
        let end = t0 + Duration::from_secs(3);
        limit.stalled(t0, end);
        for n in 0..15 {
            assert_eq!(limit.check(end, MESSAGE), Verdict::Pass, "frame {n} of the backlog");
        }
        // Read up: the credit lapses, and the bucket is back to its burst.
        limit.caught_up();
        let later = end + Duration::from_secs(10);
        assert_eq!(limit.check(later, MESSAGE), Verdict::Pass);
        assert_eq!(limit.check(later, MESSAGE), Verdict::Pass);
        assert_eq!(limit.check(later, MESSAGE), Verdict::Drop, "no more than the burst after the credit lapsed");
        // A stall earns only `rate` a second: a bigger backlog is still held.
        let mut limit = RateLimit::new(10, 2);
        limit.stalled(t0, t0 + Duration::from_secs(1));
        let passed = (0..40).filter(|_| limit.check(t0 + Duration::from_secs(1), MESSAGE) == Verdict::Pass).count();
        assert_eq!(passed, 12, "the burst plus ten for the second");
    }

    #[test]
    fn quiet_time_before_a_stall_earns_no_more_than_the_burst() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(10, 2);
        let from = t0 + Duration::from_secs(3600);
        limit.stalled(from, from + Duration::from_millis(500));
        let at = from + Duration::from_millis(500);
        let passed = (0..40).filter(|_| limit.check(at, MESSAGE) == Verdict::Pass).count();
        assert_eq!(passed, 7, "the burst, and five for the half second of the stall");
    }

    #[test]
    fn occasional_drops_spread_over_windows_are_no_flood() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(1, 2);
        let mut now = t0;
        for _ in 0..10 {
            limit.check(now, MESSAGE);
            limit.check(now, MESSAGE);
            assert_ne!(limit.check(now, MESSAGE), Verdict::Flood);
            now += FLOOD_WINDOW + Duration::from_secs(1);
        }
    }

    #[test]
    fn control_frames_and_fragments_take_a_sixteenth_and_flood_alike() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(1, 2);
        for _ in 0..32 {
            assert_eq!(limit.check(t0, FRAME), Verdict::Pass);
        }
        assert_eq!(limit.check(t0, FRAME), Verdict::Drop);
        assert_eq!(limit.check(t0, FRAME), Verdict::Drop);
        assert_eq!(limit.check(t0, FRAME), Verdict::Flood, "more than `burst` drops in the window");
        // A second later there is a token again, for a message.
        let mut limit = RateLimit::new(1, 2);
        for _ in 0..31 {
            limit.check(t0, FRAME);
        }
        assert_eq!(limit.check(t0, MESSAGE), Verdict::Drop, "a sixteenth left");
        assert_eq!(limit.check(t0 + Duration::from_secs(1), MESSAGE), Verdict::Pass);
    }
}
