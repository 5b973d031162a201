//! The session's coarse monotonic clock: milliseconds since the process
//! first asked, kept in atomics by the heartbeat and the call-setup metric.

use std::sync::OnceLock;

/// Milliseconds on the process's monotonic clock, for the heartbeat fields.
pub fn now_ms() -> u64 {
    ms_at(tokio::time::Instant::now())
}

/// `at` in [`now_ms`] milliseconds.
pub fn ms_at(at: tokio::time::Instant) -> u64 {
    static START: OnceLock<tokio::time::Instant> = OnceLock::new();
    // The clock starts a millisecond before its first reading, so that 0
    // stays free to mean "never".
    let start = *START.get_or_init(|| at.checked_sub(std::time::Duration::from_millis(1)).unwrap_or(at));
    u64::try_from(at.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}
