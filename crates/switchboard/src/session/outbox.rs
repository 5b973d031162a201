//! A session's outbox and close signal: what other tasks ask its task to do.
//!
//! The registry delivers into the outbox without waiting, so the broker's read
//! loop can't be slowed by a socket. A session whose queue is full, in messages
//! or in bytes, is closed with 1008 instead of being waited on.
//!
//! The queue is a `VecDeque` behind a std `Mutex` (never held across an
//! `.await`) plus one `Notify` that wakes the session's task, not a channel:
//! an idle session holds no queue memory at all, where a tokio channel keeps a
//! block of 32 slots allocated for its whole life. Control frames (pong, ping)
//! live beside the queue and are written ahead of it. A close request wakes
//! the same `Notify`, so the session waits on one thing for both.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::protocol::CloseReason;

/// What the session has to write next, taken in one go by [`Outbox::next_work`].
#[derive(Debug, Default)]
pub struct Work {
    /// A ping's payload to answer (only the latest one is answered, as RFC 6455 allows).
    pub pong: Option<Box<[u8]>>,
    /// Send a ping.
    pub ping: bool,
    /// Text frames, oldest first.
    pub frames: VecDeque<Bytes>,
    /// Confirmed sends: the `ack` to write after the frames (0: none). The
    /// outbox queues an empty frame in its place (see `confirm`), which the
    /// session swaps for this before writing.
    pub ack: u64,
}

impl Work {
    /// Whether there is nothing to do yet.
    pub fn is_empty(&self) -> bool {
        self.pong.is_none() && !self.ping && self.frames.is_empty() && self.ack == 0
    }
}

/// What waits to be written; [`Work`] plus the byte count, which stays.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    pong: Option<Box<[u8]>>,
    /// Bytes queued and not yet written to the socket (at most the limit, a `u32`).
    bytes: u32,
    ping: bool,
}

/// A session's queue of frames to write, its control frames and its close signal.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the session's task when the queue gains work or a close is asked for.
    wake: Notify,
    /// The close reason's `repr`; 0 while none was given.
    close: AtomicU8,
    max_messages: u32,
    max_bytes: u32,
}

impl Outbox {
    /// An outbox that holds at most `max_messages` frames and `max_bytes` bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            queue: Mutex::default(),
            wake: Notify::new(),
            close: AtomicU8::new(0),
            max_messages: u32::try_from(max_messages.max(1)).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every critical section is a few field updates; a panic can't leave it half done.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the queue and wakes the session's task.
    fn order(&self, change: impl FnOnce(&mut Queue)) {
        change(&mut self.queue());
        self.wake.notify_one();
    }

    /// Queues a text frame for the socket without waiting. Closes the session
    /// with 1008 when its queue is full.
    pub fn deliver(&self, frame: Bytes) {
        if self.is_closing() {
            // Closing: a gap followed by later frames would be worse than nothing.
            return;
        }
        {
            let mut queue = self.queue();
            let bytes = queue.bytes as usize + frame.len();
            let full = queue.frames.len() >= self.max_messages as usize || bytes > self.max_bytes as usize;
            if !full {
                // At most `max_bytes`, so it fits.
                queue.bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
                queue.frames.push_back(frame);
                drop(queue);
                self.wake.notify_one();
                return;
            }
        }
        self.close(CloseReason::SlowConsumer);
    }

    /// Tells the outbox that `len` queued bytes went onto the socket.
    pub fn sent(&self, len: usize) {
        let mut queue = self.queue();
        queue.bytes = queue.bytes.saturating_sub(u32::try_from(len).unwrap_or(u32::MAX));
    }

    /// Asks the session to answer a ping with `payload`.
    pub fn pong(&self, payload: Box<[u8]>) {
        self.order(|q| q.pong = Some(payload));
    }

    /// Asks the session to send a ping.
    pub fn ping(&self) {
        self.order(|q| q.ping = true);
    }

    /// Takes everything there is to write, waiting until there is something.
    /// The queue's memory goes with it, so an idle session keeps none. Returns
    /// `None` once a close was asked for: nothing queued is written after that.
    pub async fn next_work(&self) -> Option<Work> {
        loop {
            if self.is_closing() {
                return None;
            }
            {
                let mut queue = self.queue();
                if queue.pong.is_some() || queue.ping || !queue.frames.is_empty() {
                    return Some(Work {
                        pong: queue.pong.take(),
                        ping: std::mem::take(&mut queue.ping),
                        ack: 0,
                        frames: std::mem::take(&mut queue.frames),
                    });
                }
            }
            // `notify_one` stores a permit when nobody waits, so no wake-up is lost here.
            self.wake.notified().await;
        }
    }

    /// Resolves once a close was asked for. It may take wake-ups meant for
    /// [`Outbox::next_work`], which looks at the queue before it waits.
    pub async fn closed(&self) {
        while !self.is_closing() {
            self.wake.notified().await;
        }
    }

    /// Asks the session to close; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.close.compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        // Wake whoever waits now (for work, or for its echo), and leave a
        // permit for a wait about to begin.
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.close.load(Ordering::Acquire) != 0
    }

    /// The reason given to [`Outbox::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_repr(self.close.load(Ordering::Acquire))
    }

    /// A wake-up of the session's task, for a wait on something else that
    /// [`Outbox::wake_waiters`] announces (the echo window's room).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.wake.notified()
    }

    /// Wakes every wait begun with [`Outbox::notified`].
    pub(crate) fn wake_waiters(&self) {
        self.wake.notify_waiters();
    }

    /// Bytes queued and not yet written, and the queue's capacity.
    #[cfg(test)]
    fn usage(&self) -> (usize, usize) {
        let queue = self.queue();
        (queue.bytes as usize, queue.frames.capacity())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn take(outbox: &Outbox) -> Option<Work> {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(outbox.next_work())
    }

    #[test]
    fn frames_come_out_in_order_and_the_idle_queue_keeps_no_memory() {
        let h = Outbox::new(16, 1 << 20);
        for i in 0..5u8 {
            h.deliver(Bytes::from(vec![i; 10]));
        }
        let work = take(&h).expect("work");
        let firsts: Vec<u8> = work.frames.iter().map(|f| f[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 3, 4]);
        assert_eq!(h.usage().1, 0, "the queue's allocation left with the work");
        assert_eq!(h.usage().0, 50, "bytes count until written");
        for frame in &work.frames {
            h.sent(frame.len());
        }
        assert_eq!(h.usage().0, 0);
    }

    #[test]
    fn a_full_queue_closes_the_session_as_a_slow_consumer() {
        let by_count = Outbox::new(2, 1 << 20);
        for _ in 0..3 {
            by_count.deliver(Bytes::from_static(b"x"));
        }
        assert_eq!(by_count.close_reason(), Some(CloseReason::SlowConsumer));

        let by_bytes = Outbox::new(100, 10);
        by_bytes.deliver(Bytes::from_static(b"123456"));
        assert_eq!(by_bytes.close_reason(), None);
        by_bytes.deliver(Bytes::from_static(b"123456"));
        assert_eq!(by_bytes.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn control_orders_wake_the_session_and_a_close_ends_all_writing() {
        let h = Outbox::new(16, 1 << 20);
        h.pong(Box::from(&b"a"[..]));
        h.pong(Box::from(&b"b"[..]));
        h.ping();
        let work = take(&h).expect("work");
        assert_eq!(work.pong.as_deref(), Some(&b"b"[..]), "the latest ping is answered");
        assert!(work.ping && work.frames.is_empty());
        h.deliver(Bytes::from_static(b"queued"));
        h.close(CloseReason::Replaced);
        assert!(take(&h).is_none(), "nothing queued is written after a close");
        h.deliver(Bytes::from_static(b"late"));
        assert!(h.queue().frames.len() <= 1, "nothing is queued after a close");
        assert_eq!(h.close_reason(), Some(CloseReason::Replaced));
        h.close(CloseReason::Shutdown);
        assert_eq!(h.close_reason(), Some(CloseReason::Replaced), "the first reason wins");
    }

    #[tokio::test]
    async fn a_close_wakes_a_session_that_waits_for_work() {
        let h = Arc::new(Outbox::new(16, 1 << 20));
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.next_work().await.is_none() }
        });
        let closed = tokio::spawn({
            let h = h.clone();
            async move { h.closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && !closed.is_finished());
        h.close(CloseReason::Shutdown);
        assert!(waiting.await.expect("task"), "woken, with nothing to write");
        closed.await.expect("task");
    }
}
