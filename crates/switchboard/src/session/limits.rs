//! Per-socket message rate limit: a token bucket, plus a flood rule.
//!
//! Each client message takes a token; tokens refill at `rate` per second up to
//! `burst`. A message without a token is dropped (the sender gets
//! `rate_limited`). More than `burst` drops within one 10-second window is a
//! flood, and the socket is closed with 1008.

use std::time::Duration;

use tokio::time::Instant;

/// The window in which drops are counted for the flood rule.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// What to do with one incoming message.
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
    // `f32` is exact for any whole number of tokens a bucket can hold here
    // (at most 2^24), and keeps every idle socket's limiter small.
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

    /// Takes a token for a message arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
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
            assert_eq!(limit.check(t0), Verdict::Pass);
        }
        assert_eq!(limit.check(t0), Verdict::Drop);
        // 100 ms later one token is back.
        assert_eq!(limit.check(t0 + Duration::from_millis(100)), Verdict::Pass);
        let later = t0 + Duration::from_millis(100);
        for _ in 0..4 {
            assert_eq!(limit.check(later), Verdict::Drop);
        }
        assert_eq!(limit.check(later), Verdict::Flood, "more than `burst` drops in the window");
    }

    #[test]
    fn occasional_drops_spread_over_windows_are_no_flood() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(1, 2);
        let mut now = t0;
        for _ in 0..10 {
            limit.check(now);
            limit.check(now);
            assert_ne!(limit.check(now), Verdict::Flood);
            now += FLOOD_WINDOW + Duration::from_secs(1);
        }
    }
}
