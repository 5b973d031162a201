//! Pings for the whole instance: one timer, not one per socket.
//!
//! A socket that has sent nothing for a ping interval is pinged; one that
//! still sends nothing for the pong timeout after that is closed (its peer
//! hears `peer-left`). Any frame from the client counts as a sign of life,
//! so a busy socket is never pinged. The heartbeat looks at every local
//! session four times per interval, so a ping goes out between one and one
//! and a quarter intervals of silence.
//!
//! A timer per session cost each idle socket a timer entry and its task's
//! room to poll it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::clock::now_ms;
use super::handle::SessionHandle;
use super::registry::Registry;
use crate::protocol::CloseReason;

/// The shortest interval between two walks over the sessions.
const MIN_STEP: Duration = Duration::from_millis(10);

/// What the heartbeat did to one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Heard from recently enough: nothing to do.
    Alive,
    /// Silent for an interval: pinged.
    Pinged,
    /// Silent past the pong timeout: closed.
    Closed,
}

/// Pings and times out every local session until `stop`. `every` must not be zero.
pub async fn run(registry: Arc<Registry>, every: Duration, timeout: Duration, stop: CancellationToken) {
    let step = (every / 4).max(MIN_STEP);
    let mut tick = tokio::time::interval_at(Instant::now() + step, step);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (every, timeout) = (millis(every), millis(timeout));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        for session in registry.all() {
            beat(&session, now, every, timeout);
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Checks one session at `now` (all in [`now_ms`] milliseconds).
pub fn beat(session: &SessionHandle, now: u64, every: u64, timeout: u64) -> Beat {
    let (heard, pinged) = session.heartbeat();
    let silent = now.saturating_sub(heard);
    if silent > every.saturating_add(timeout) {
        tracing::debug!(session = session.id, "no frame since the last ping's deadline");
        session.close(CloseReason::PingTimeout);
        Beat::Closed
    } else if silent >= every && now.saturating_sub(pinged) >= every {
        session.ping();
        Beat::Pinged
    } else {
        Beat::Alive
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::{PairId, UserId};

    #[test]
    fn a_silent_socket_is_pinged_once_per_interval_then_closed() {
        let (a, b) = (UserId::parse("a").expect("id"), UserId::parse("b").expect("id"));
        let pair = PairId::new(&a, &b).expect("pair");
        let s = SessionHandle::new(1, a, pair, 16, 1 << 20);
        s.heard(Instant::now());
        let (heard, _) = s.heartbeat();
        let (every, timeout) = (1000, 500);
        assert_eq!(beat(&s, heard + 999, every, timeout), Beat::Alive);
        assert_eq!(beat(&s, heard + 1000, every, timeout), Beat::Pinged);
        let pinged = s.heartbeat().1;
        assert_eq!(beat(&s, pinged + 10, every, timeout), Beat::Alive, "not pinged twice in one interval");
        // An answer (any frame) resets the clock.
        s.heard(Instant::now());
        let (heard, _) = s.heartbeat();
        assert_eq!(beat(&s, heard + 1500, every, timeout), Beat::Pinged);
        assert_eq!(s.close_reason(), None);
        assert_eq!(beat(&s, heard + 1501, every, timeout), Beat::Closed);
        assert_eq!(s.close_reason(), Some(CloseReason::PingTimeout));
    }
}
