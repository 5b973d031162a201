//! Confirmed sends, for a resumable session (see docs/protocol.md,
//! "Resuming"): the client numbers its messages, the server tells it with
//! `ack` events which ones it is done with, and a client that comes back
//! resends the rest, which the broker publishes at most once.
//!
//! Every text message the client sends takes the next number, whatever
//! becomes of it: published, or answered with an error event (invalid,
//! dropped by the rate limit, or a broker failure). The broker reports its
//! relays in the order they were handed over, so the messages up to just
//! before the oldest relay still under way are done. A confirmation is not
//! sent per message: the outbox holds one empty frame in its place (a
//! quiet session's handle keeps no room for it), and the session writes the
//! latest confirmation there when it writes its next batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::handle::SessionHandle;
use crate::broker::{BrokerError, Numbered, RelayOrigin, SessionId};

/// A resumable session's count of its client's messages.
#[derive(Debug)]
pub struct Confirm {
    handle: Arc<SessionHandle>,
    lineage: SessionId,
    count: Mutex<Count>,
}

#[derive(Debug)]
struct Count {
    /// The number the client's next message takes.
    next: u64,
    /// The numbers of the relays the broker has not reported yet, oldest first.
    in_flight: VecDeque<u64>,
    /// The last message done with.
    done: u64,
    /// An empty frame in the outbox stands for an `ack` not written yet.
    queued: bool,
}

impl Count {
    /// Notes the last message done with, and queues an `ack`'s place unless one waits already.
    fn done(&mut self, handle: &SessionHandle, done: u64) {
        self.done = done;
        if !self.queued {
            self.queued = true;
            handle.deliver(Bytes::new());
        }
    }
}

impl Confirm {
    /// Counts `handle`'s client's messages in `lineage` from `next`.
    pub fn new(handle: Arc<SessionHandle>, lineage: SessionId, next: u64) -> Arc<Self> {
        let next = next.max(1);
        let count = Count { next, in_flight: VecDeque::new(), done: next - 1, queued: false };
        Arc::new(Self { handle, lineage, count: Mutex::new(count) })
    }

    fn count(&self) -> MutexGuard<'_, Count> {
        // Every critical section is a few field updates and an outbox call.
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers the client's next message, which goes to the broker now.
    pub fn relaying(&self) -> Numbered {
        let mut count = self.count();
        let n = count.next;
        count.next += 1;
        count.in_flight.push_back(n);
        Numbered { lineage: self.lineage, n }
    }

    /// Numbers the client's next message, which was answered with an error
    /// event (or dropped by the rate limit, which said so): done with.
    pub fn refused(&self) {
        let mut count = self.count();
        count.next += 1;
        if count.in_flight.is_empty() {
            let done = count.next - 1;
            count.done(&self.handle, done);
        }
    }

    /// The `ack` to write in place of the outbox's empty frame: the last
    /// message done with.
    pub fn take_ack(&self) -> u64 {
        let mut count = self.count();
        count.queued = false;
        count.done
    }

    /// The broker reported the oldest relay under way.
    fn settled(&self) {
        let mut count = self.count();
        count.in_flight.pop_front();
        let done = count.in_flight.front().map_or(count.next, |&oldest| oldest) - 1;
        if done > count.done {
            count.done(&self.handle, done);
        }
    }
}

impl RelayOrigin for Confirm {
    fn relay_failed(&self, error: &BrokerError, len: usize) {
        self.handle.relay_failed(error, len);
        self.settled();
    }

    fn relay_done(&self) {
        self.settled();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::{PairId, UserId};

    fn handle() -> Arc<SessionHandle> {
        let (a, b) = (UserId::parse("a").unwrap(), UserId::parse("b").unwrap());
        let pair = PairId::new(&a, &b).unwrap();
        Arc::new(SessionHandle::new(1, a, pair, 64, 1 << 20))
    }

    /// What the session writes next, with the `ack` in place of its empty frame.
    async fn written(handle: &SessionHandle, confirm: &Confirm) -> (Vec<Bytes>, Vec<u64>) {
        let work = handle.outbox.next_work().await.unwrap();
        let acks = work.frames.iter().filter(|f| f.is_empty()).map(|_| confirm.take_ack()).collect();
        (work.frames.into_iter().filter(|f| !f.is_empty()).collect(), acks)
    }

    /// Whether the outbox has nothing to write right now.
    fn idle(handle: &SessionHandle) -> bool {
        use std::future::Future;
        let mut work = std::pin::pin!(handle.outbox.next_work());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        work.as_mut().poll(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn confirms_in_order_what_is_done_and_nothing_under_way() {
        let h = handle();
        let c = Confirm::new(h.clone(), 9, 5);
        assert_eq!(c.relaying(), Numbered { lineage: 9, n: 5 });
        c.refused(); // 6: done, but 5 is still under way
        assert_eq!(c.relaying().n, 7);
        assert!(idle(&h), "nothing confirmed while 5 is under way");
        c.relay_done(); // 5 done: 5 and 6
        assert_eq!(written(&h, &c).await.1, [6]);
        c.relay_failed(&BrokerError::Disconnected, 10); // 7: failed, told, done
        let (frames, acks) = written(&h, &c).await;
        assert_eq!(acks, [7]);
        assert!(frames[0].starts_with(br#"{"type":"error","code":"broker_unavailable""#), "{frames:?}");
        c.refused(); // 8, nothing under way: at once
        assert_eq!(written(&h, &c).await.1, [8]);
    }

    #[tokio::test]
    async fn many_confirmations_between_writes_go_out_as_one() {
        let h = handle();
        let c = Confirm::new(h.clone(), 9, 1);
        for _ in 0..100 {
            c.relaying();
        }
        for _ in 0..100 {
            c.relay_done();
        }
        assert_eq!(written(&h, &c).await, (vec![], vec![100]));
        assert!(idle(&h));
    }
}
