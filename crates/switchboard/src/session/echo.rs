//! The echo window: how far a sender may get ahead of its own subscriber.
//!
//! Every instance receives its own publications on the pair's channel. A
//! sender that got ahead of its instance's subscriber would grow that
//! subscriber's Redis output buffer until Redis cuts it
//! (`client-output-buffer-limit pubsub`, 32 MB), losing everything in flight.
//! So a session counts the bytes of its envelopes that have not come back yet,
//! and waits for its echo once [`ECHO_WINDOW`] bytes are out.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::outbox::Outbox;

/// Most bytes of a session's own envelopes that may be on their way through
/// Redis and back to this instance's subscriber.
pub const ECHO_WINDOW: usize = 256 * 1024;

/// Whether an envelope of `len` bytes may go out while `owed` bytes await
/// their echo: up to [`ECHO_WINDOW`], or one envelope of any size.
fn fits(owed: u32, len: usize) -> bool {
    owed == 0 || owed as usize + len <= ECHO_WINDOW
}

/// A length as the window counts it (saturating: no envelope comes near 4 GiB).
fn counted(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The bytes a session published whose copy has not come back on the pair's
/// channel yet. Only the session's own task adds; echoes only subtract.
#[derive(Debug, Default)]
pub struct EchoWindow {
    owed: AtomicU32,
    /// Whether the session waits in [`EchoWindow::room`]; echoes wake it only
    /// then, so the common case takes no lock per message.
    waiting: AtomicBool,
}

impl EchoWindow {
    /// Waits until an envelope of `len` bytes fits, and counts it. Returns
    /// false, counting nothing, if the session closes meanwhile. The wait is
    /// woken through the session's `outbox`, which a close also wakes.
    pub async fn room(&self, len: usize, outbox: &Outbox) -> bool {
        loop {
            if self.try_room(len) {
                return true;
            }
            // Full: register, say so, then look again, so an echo that lands
            // in between still wakes us (all SeqCst: see `echoed`).
            let room = outbox.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if !fits(self.owed.load(Ordering::SeqCst), len) && !outbox.is_closing() {
                room.await;
            }
            self.waiting.store(false, Ordering::SeqCst);
            if outbox.is_closing() {
                return false;
            }
        }
    }

    /// [`EchoWindow::room`] without the wait: counts `len` and returns true
    /// if it fits now.
    pub fn try_room(&self, len: usize) -> bool {
        // Only the session adds and echoes only subtract, so a fit seen is a fit kept.
        let fit = fits(self.owed.load(Ordering::SeqCst), len);
        if fit {
            let _ =
                self.owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| Some(o.saturating_add(counted(len))));
        }
        fit
    }

    /// `len` bytes of this session's envelopes came back (or never will).
    pub fn echoed(&self, len: usize, outbox: &Outbox) {
        let _ = self.owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| Some(o.saturating_sub(counted(len))));
        // A session that flagged itself after this update saw the new count itself.
        if self.waiting.load(Ordering::SeqCst) {
            outbox.wake_waiters();
        }
    }

    /// Forgets every awaited echo: the subscriber lost its connection, and
    /// what was published meanwhile will never come back.
    pub fn forget(&self, outbox: &Outbox) {
        self.owed.store(0, Ordering::SeqCst);
        outbox.wake_waiters();
    }

    /// Bytes awaiting their echo.
    #[cfg(test)]
    pub(crate) fn owed(&self) -> usize {
        self.owed.load(Ordering::SeqCst) as usize
    }
}
