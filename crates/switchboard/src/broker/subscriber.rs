//! The subscriber: the task that keeps one instance's subscriptions on one
//! Redis connection of its own ([`super::pubsub`]) and delivers what arrives
//! into the [`Inbox`].
//!
//! It owns the set of live channels with a count of local sessions each. It
//! subscribes on a channel's first session and unsubscribes after its last,
//! so `PUBSUB NUMSUB` falls back to 0.
//!
//! It never stops delivering to wait for Redis:
//! - subscribe requests that queue up together go out as one `SUBSCRIBE`
//!   of many channels, written while messages keep being read;
//! - confirmations are matched as they arrive, in the order Redis answers
//!   commands; a session's request resolves when its channel's confirmation
//!   arrives, so it is subscribed before its welcome;
//! - every reply is checked: an error reply to a subscribe (an ACL that
//!   denies the channel, `NOAUTH` after a password change, `-BUSY`, …) fails
//!   the sessions that waited for it, and unless Redis refused only those
//!   channels, the connection is dropped and made again, so the instance is
//!   never deaf while it looks healthy;
//! - a `PING` goes out every [`PROBE_EVERY`]; a Redis that neither answers it
//!   nor sends anything else for [`PROBE_TIMEOUT`] is taken as lost (a frozen
//!   or unreachable server sends nothing at all).
//!
//! When the connection is lost it reconnects with backoff, subscribes every
//! live channel again (in batches), and tells the [`Inbox`] which channels
//! are back as each batch is confirmed: pub/sub is at-most-once, so anything
//! published meanwhile is gone (the sessions tell their clients `resync`).
//! `/readyz` is unready from the loss until every channel is back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pubsub::{Event, Reader, Writer};
use super::target::Target;
use super::{BrokerError, Inbox};

/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time allowed for connecting and authenticating.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the connection is probed with `PING`.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Silence, with a `PING` unanswered, after which the connection is lost.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most channels named in one `SUBSCRIBE` or `UNSUBSCRIBE`.
const MAX_CHANNELS_PER_COMMAND: usize = 1024;
/// Most requests taken from the queue at once.
const MAX_REQUESTS: usize = 1024;

/// A session's request to the subscriber.
pub enum Request {
    /// Count one more local session on the channel; answered once it is live.
    Subscribe(Arc<str>, oneshot::Sender<Result<(), BrokerError>>),
    /// Count one fewer.
    Unsubscribe(Box<str>),
}

type Ack = oneshot::Sender<Result<(), BrokerError>>;

/// A command written and not yet fully answered.
enum InFlight {
    /// `SUBSCRIBE` of new channels (`resubscribe: false`) or of live ones
    /// after a reconnect; the channels not confirmed yet.
    Subscribe { channels: VecDeque<Arc<str>>, resubscribe: bool },
    /// `UNSUBSCRIBE`; how many confirmations are still due.
    Unsubscribe(usize),
    /// `PING`, sent at this time.
    Ping(Instant),
}

/// The subscriber task's state, which outlives its connections.
pub struct Subscriber {
    target: Target,
    inbox: Arc<dyn Inbox>,
    ready: Arc<AtomicBool>,
    /// Local sessions per subscribed channel.
    counts: HashMap<Arc<str>, usize>,
    first: Option<oneshot::Sender<()>>,
}

/// Why a connected spell ended.
enum Ended {
    Shutdown,
    Lost(String),
}

/// One connected spell: what is in flight on this connection.
struct Spell {
    reader: Reader,
    writer: Writer,
    in_flight: VecDeque<InFlight>,
    /// Sessions waiting for a channel's first confirmation.
    waiting: HashMap<Arc<str>, Vec<Ack>>,
    /// Channels queued for `UNSUBSCRIBE` in the current batch.
    leaving: Vec<Arc<str>>,
    /// Resubscribe batches not yet confirmed.
    resubscribing: usize,
    last_heard: Instant,
}

impl Subscriber {
    /// A subscriber for `target`, delivering into `inbox`; `ready` tells
    /// whether every live channel is subscribed, and `first` is told after
    /// the first connection attempt (successful or not).
    pub fn new(target: Target, inbox: Arc<dyn Inbox>, ready: Arc<AtomicBool>, first: oneshot::Sender<()>) -> Self {
        Self { target, inbox, ready, counts: HashMap::new(), first: Some(first) }
    }

    /// Runs until `shutdown`, serving `requests`.
    pub async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>, shutdown: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        let mut connected_before = false;
        let mut last_why: Option<String> = None;
        loop {
            let connect = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.target.subscriber_connection(CONNECT_TIMEOUT) => c,
            };
            let ended = match connect {
                Ok((reader, writer)) => {
                    backoff = FIRST_BACKOFF;
                    let spell = Spell::new(reader, writer);
                    let ended = self.connected(spell, &mut requests, &shutdown, connected_before).await;
                    connected_before = true;
                    ended
                }
                Err(e) => Ended::Lost(format!("connect failed: {e}")),
            };
            let was_ready = self.ready.swap(false, Ordering::Relaxed);
            // Whatever was published and not yet read is lost with the connection.
            self.inbox.connection_lost(&mut self.counts.keys().map(|c| &**c));
            let why = match ended {
                Ended::Shutdown => return,
                Ended::Lost(why) => why,
            };
            if was_ready || self.first.is_some() {
                tracing::warn!(reason = %why, "redis subscriber: connection lost");
            } else if last_why.as_deref() != Some(why.as_str()) {
                // A new reason (refused at login after the loss, say): worth a line.
                tracing::warn!(reason = %why, "redis subscriber: still unreachable");
            } else {
                tracing::debug!(reason = %why, "redis subscriber: still unreachable");
            }
            last_why = Some(why);
            if let Some(first) = self.first.take() {
                let _ = first.send(());
            }
            // Wait out the backoff while still answering requests.
            let until = Instant::now() + backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF).min(self.target.max_backoff());
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    request = requests.recv() => match request {
                        None => return,
                        Some(request) => self.offline(request),
                    },
                }
            }
        }
    }

    /// While disconnected: a new session is refused, a leaving one is uncounted.
    fn offline(&mut self, request: Request) {
        match request {
            Request::Subscribe(_, ack) => {
                let _ = ack.send(Err(BrokerError::Disconnected));
            }
            Request::Unsubscribe(channel) => {
                self.uncount(&channel, 1);
            }
        }
    }

    /// Drops `n` counts; true when that was the channel's last.
    fn uncount(&mut self, channel: &str, n: usize) -> bool {
        match self.counts.get_mut(channel) {
            Some(count) if *count > n => {
                *count -= n;
                false
            }
            Some(_) => {
                self.counts.remove(channel);
                true
            }
            None => false,
        }
    }

    async fn connected(
        &mut self,
        mut spell: Spell,
        requests: &mut mpsc::UnboundedReceiver<Request>,
        shutdown: &CancellationToken,
        reconnected: bool,
    ) -> Ended {
        if self.counts.is_empty() {
            self.now_ready(reconnected);
        } else {
            let live: Vec<Arc<str>> = self.counts.keys().cloned().collect();
            for batch in live.chunks(MAX_CHANNELS_PER_COMMAND) {
                spell.subscribe(batch.iter().cloned().collect(), true);
            }
        }
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(64);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ended::Shutdown,
                event = spell.reader.next() => {
                    spell.last_heard = Instant::now();
                    let event = match event {
                        None => return Ended::Lost("closed by Redis".into()),
                        Some(Err(e)) => return Ended::Lost(e.to_string()),
                        Some(Ok(event)) => event,
                    };
                    if let Err(why) = self.heard(&mut spell, event, reconnected) {
                        return Ended::Lost(why);
                    }
                }
                written = spell.writer.write_some(), if spell.writer.pending() => {
                    if let Err(e) = written {
                        return Ended::Lost(format!("write failed: {e}"));
                    }
                }
                n = requests.recv_many(&mut batch, MAX_REQUESTS) => {
                    if n == 0 {
                        return Ended::Shutdown;
                    }
                    self.take_requests(&mut spell, &mut batch);
                }
                _ = probe.tick() => {
                    if let Some(why) = spell.probe() {
                        crate::metrics::broker_probe_failed();
                        return Ended::Lost(why);
                    }
                }
            }
        }
    }

    fn now_ready(&mut self, reconnected: bool) {
        self.ready.store(true, Ordering::Relaxed);
        if let Some(first) = self.first.take() {
            let _ = first.send(());
        }
        if reconnected {
            tracing::info!(channels = self.counts.len(), "redis subscriber: reconnected");
            crate::metrics::broker_reconnect();
        } else {
            tracing::info!("redis subscriber: connected");
        }
    }

    /// Counts the requests in `batch` and writes what they need: one
    /// `SUBSCRIBE` for the channels that are new, one `UNSUBSCRIBE` for those
    /// that lost their last session.
    fn take_requests(&mut self, spell: &mut Spell, batch: &mut Vec<Request>) {
        let mut joining: Vec<Arc<str>> = Vec::new();
        for request in batch.drain(..) {
            match request {
                Request::Subscribe(channel, ack) => {
                    let count = self.counts.entry(channel.clone()).or_insert(0);
                    *count += 1;
                    if *count > 1 {
                        match spell.waiting.get_mut(&channel) {
                            // Its first confirmation is still due.
                            Some(acks) => acks.push(ack),
                            None => {
                                let _ = ack.send(Ok(()));
                            }
                        }
                    } else if let Some(at) = spell.leaving.iter().position(|c| *c == channel) {
                        // Its last session left in this same batch: it never stopped being subscribed.
                        spell.leaving.swap_remove(at);
                        let _ = ack.send(Ok(()));
                    } else {
                        spell.waiting.insert(channel.clone(), vec![ack]);
                        joining.push(channel);
                    }
                }
                Request::Unsubscribe(channel) => {
                    if self.uncount(&channel, 1) {
                        spell.leaving.push(channel.into());
                    }
                }
            }
        }
        for chunk in joining.chunks(MAX_CHANNELS_PER_COMMAND) {
            spell.subscribe(chunk.iter().cloned().collect(), false);
        }
        let leaving = std::mem::take(&mut spell.leaving);
        for chunk in leaving.chunks(MAX_CHANNELS_PER_COMMAND) {
            spell.unsubscribe(chunk);
        }
    }

    /// Handles one thing Redis said. An `Err` ends the connection.
    fn heard(&mut self, spell: &mut Spell, event: Event, reconnected: bool) -> Result<(), String> {
        match event {
            Event::Message { channel, payload } => {
                if let Ok(channel) = std::str::from_utf8(&channel) {
                    // A copy: a message held in a slow session's queue keeps only its own bytes alive.
                    self.inbox.envelope(channel, &Bytes::copy_from_slice(&payload));
                }
            }
            Event::Subscribed(name) => match spell.in_flight.front_mut() {
                Some(InFlight::Subscribe { channels, resubscribe }) => {
                    let resubscribe = *resubscribe;
                    let Some(channel) = channels.pop_front() else { return Err("unexpected reply".into()) };
                    if *channel.as_bytes() != name[..] {
                        return Err(format!(
                            "confirmation for {:?} while {channel:?} was due",
                            String::from_utf8_lossy(&name)
                        ));
                    }
                    for ack in spell.waiting.remove(&channel).into_iter().flatten() {
                        let _ = ack.send(Ok(()));
                    }
                    if channels.is_empty() {
                        self.batch_done(spell, resubscribe, reconnected);
                    }
                }
                _ => return Err("a subscribe confirmation nobody asked for".into()),
            },
            Event::Unsubscribed(_) => match spell.in_flight.front_mut() {
                Some(InFlight::Unsubscribe(due)) => {
                    *due -= 1;
                    if *due == 0 {
                        spell.in_flight.pop_front();
                    }
                }
                // Redis dropped a subscription by itself (in a cluster: a
                // failover or a slot migration). Start again.
                _ => return Err("Redis dropped a subscription".into()),
            },
            Event::Pong => match spell.in_flight.front() {
                Some(InFlight::Ping(_)) => {
                    spell.in_flight.pop_front();
                }
                _ => return Err("a PONG nobody asked for".into()),
            },
            Event::Error(e) => return self.refused(spell, e),
            Event::Other => return Err("an unexpected reply".into()),
        }
        Ok(())
    }

    /// A `SUBSCRIBE` batch is fully confirmed.
    fn batch_done(&mut self, spell: &mut Spell, resubscribe: bool, reconnected: bool) {
        let Some(InFlight::Subscribe { .. }) = spell.in_flight.pop_front() else { return };
        if resubscribe {
            spell.resubscribing -= 1;
            if spell.resubscribing == 0 {
                // Every live channel is back; whatever was published while
                // it was away is gone, which the inbox tells its sessions.
                self.now_ready(reconnected);
                self.inbox.resubscribed(&mut self.counts.keys().map(|c| &**c));
            }
        }
    }

    /// Redis answered the oldest command with an error.
    fn refused(&mut self, spell: &mut Spell, error: String) -> Result<(), String> {
        match spell.in_flight.pop_front() {
            Some(InFlight::Subscribe { channels, resubscribe }) => {
                tracing::warn!(error = %error, channels = channels.len(), "redis subscriber: SUBSCRIBE refused");
                crate::metrics::broker_subscribe_refused();
                for channel in channels {
                    let acks = spell.waiting.remove(&channel).unwrap_or_default();
                    self.uncount(&channel, acks.len());
                    for ack in acks {
                        let _ = ack.send(Err(BrokerError::Refused(error.clone())));
                    }
                }
                // Only a refusal of these channels themselves leaves the
                // connection good for the others.
                if resubscribe || !error.starts_with("NOPERM") {
                    return Err(format!("SUBSCRIBE refused: {error}"));
                }
                Ok(())
            }
            _ => Err(format!("Redis answered with an error: {error}")),
        }
    }
}

impl Spell {
    fn new(reader: Reader, writer: Writer) -> Self {
        Self {
            reader,
            writer,
            in_flight: VecDeque::new(),
            waiting: HashMap::new(),
            leaving: Vec::new(),
            resubscribing: 0,
            last_heard: Instant::now(),
        }
    }

    fn subscribe(&mut self, channels: VecDeque<Arc<str>>, resubscribe: bool) {
        let mut cmd = redis::cmd("SUBSCRIBE");
        for channel in &channels {
            cmd.arg(&**channel);
            if resubscribe {
                // A session that arrives meanwhile waits for it, as for a new channel.
                self.waiting.entry(channel.clone()).or_default();
            }
        }
        self.writer.queue(&cmd);
        if resubscribe {
            self.resubscribing += 1;
        }
        self.in_flight.push_back(InFlight::Subscribe { channels, resubscribe });
    }

    fn unsubscribe(&mut self, channels: &[Arc<str>]) {
        let mut cmd = redis::cmd("UNSUBSCRIBE");
        for channel in channels {
            cmd.arg(&**channel);
        }
        self.writer.queue(&cmd);
        self.in_flight.push_back(InFlight::Unsubscribe(channels.len()));
    }

    /// Sends a `PING` unless one is unanswered; `Some(why)` when the one
    /// that is has waited too long while nothing else arrived either.
    fn probe(&mut self) -> Option<String> {
        let unanswered = self.in_flight.iter().find_map(|c| match c {
            InFlight::Ping(at) => Some(*at),
            _ => None,
        });
        match unanswered {
            Some(at) if at.elapsed() >= PROBE_TIMEOUT && self.last_heard.elapsed() >= PROBE_TIMEOUT => {
                Some(format!("no answer to PING for {:?}", at.elapsed()))
            }
            Some(_) => None,
            None => {
                self.writer.queue(&redis::cmd("PING"));
                self.in_flight.push_back(InFlight::Ping(Instant::now()));
                None
            }
        }
    }
}
